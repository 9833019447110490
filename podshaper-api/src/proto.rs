//! The daemon's local API: one JSON request per line on the Unix socket, one JSON response
//! per line back. Directions are from the point of view of the processes in the cgroup.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Direction, Limits, PeerRule, Rate};

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/podshaper/podshaper.sock";

/// What to do with one direction's limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Remove the limit.
    Unlimited,
    /// Limit to this rate.
    Set(Rate),
}

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Set or change a cgroup's limits. A cgroup left with no limit is detached.
    Limit {
        cgroup: PathBuf,
        #[serde(default)]
        egress: Change,
        #[serde(default)]
        ingress: Change,
        /// What `status` calls the cgroup, e.g. the pod's namespace/name. Kept in memory: its
        /// owner sets it again after a daemon restart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The peer rules the cgroup is bound to, by name, replacing those it had; absent:
        /// keep them. A cgroup with no limit and no rule is detached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rules: Option<Vec<String>>,
    },
    /// Set a peer rule, or change it in place; cgroups bound to it follow live.
    SetRule { rule: PeerRule },
    /// Remove a peer rule and unbind it from every cgroup.
    RemoveRule { name: String },
    /// The peer rules on this node.
    Rules,
    /// Remove every program, link and map entry of a cgroup.
    Unlimit { cgroup: PathBuf },
    /// The limited cgroups, or one of them.
    Status {
        #[serde(default)]
        cgroup: Option<PathBuf>,
    },
    /// Remove every limit and all pinned state.
    Reset,
}

/// Limits and counters of one cgroup, as `status` shows them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CgroupStatus {
    /// Path of the cgroup directory ("?" if it could not be found).
    pub cgroup: PathBuf,
    /// The kernel's cgroup id.
    pub id: u64,
    /// The name given with the limit (for pods: namespace/name), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub egress: DirectionStatus,
    pub ingress: DirectionStatus,
    /// The peer rules the cgroup is bound to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
}

/// One peer rule of a cgroup: its cap and what its class measured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub rule: String,
    pub direction: Direction,
    pub limit: Rate,
    /// The cap is shared with the other cgroups bound to the rule on this node.
    pub shared: bool,
    /// Measured over the last epoch (50 ms), bits/s of L3 traffic to or from the peers (for a
    /// shared rule: of all its cgroups on the node).
    pub rate_bps: u64,
    /// TCP flows counted as active in the class.
    pub flows: u32,
}

/// A peer rule on the node, as `podshaper rule list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    pub direction: Direction,
    pub limit: Rate,
    pub shared: bool,
    /// Entries of the node's peer table the rule holds: its CIDRs and excepts.
    pub prefixes: usize,
    /// Limited cgroups bound to it.
    pub cgroups: usize,
    /// For a shared rule: what all its cgroups on the node sent or received over the last
    /// epoch (50 ms), bits/s of L3 traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
}

impl CgroupStatus {
    /// The limits in force. The JSON keeps each limit beside its direction's counters.
    pub fn limits(&self) -> Limits {
        Limits {
            egress: self.egress.limit,
            ingress: self.ingress.limit,
        }
    }
}

/// One direction of a [`CgroupStatus`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionStatus {
    /// The limit, or none.
    pub limit: Option<Rate>,
    /// Measured over the last second, bits/s of L3 traffic.
    pub rate_bps: u64,
    /// L3 bytes passed since the cgroup was limited.
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped by the policer.
    pub drops: u64,
    /// Congestion signals: CN (egress) or ECN CE marks (ingress).
    pub marks: u64,
    /// TCP flows that moved data in the last epoch.
    pub flows: u32,
    /// Ingress only: TCP flows the policer dropped after their sender had had time to pace at
    /// the rate option (a sender without podshaper, or a path that strips TCP options).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpaced_flows: Option<u64>,
}

/// The node's rate-option counters since the datapath was loaded ([docs/rate-option.md]):
/// receiver side (options written, pure ACKs that could not carry one) and sender side (options
/// taken, "no limit" taken, malformed or outside the ACK window: ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub options_written: u64,
    /// No room left on the ACK (SACK blocks and timestamps filled the option space).
    pub options_no_room: u64,
    /// Another writer's option of our kind and ExID was already on the ACK.
    pub options_exists: u64,
    pub options_taken: u64,
    pub options_lifted: u64,
    pub options_malformed: u64,
    pub options_outside: u64,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done; for `limit`, the cgroup's status afterwards.
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<CgroupStatus>,
    },
    /// Status of the limited cgroups, and the node's rate-option counters (none while no
    /// datapath is loaded, after a reset).
    Status {
        cgroups: Vec<CgroupStatus>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<NodeStatus>,
    },
    /// The peer rules on the node.
    Rules { rules: Vec<RuleStatus> },
    /// The request was refused or failed; nothing was changed.
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Limit {
            cgroup: "/sys/fs/cgroup/x".into(),
            egress: Change::Set(Rate::parse_quantity("10M").unwrap()),
            ingress: Change::Keep,
            name: None,
            rules: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            line,
            r#"{"op":"limit","cgroup":"/sys/fs/cgroup/x","egress":{"set":10000000},"ingress":"keep"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"limit","cgroup":"/x","egress":{"set":5}}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"op":"limit","cgroup":"/x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Limit {
                cgroup: "/x".into(),
                egress: Change::Keep,
                ingress: Change::Keep,
                name: None,
                rules: None,
            }
        );
    }
}
