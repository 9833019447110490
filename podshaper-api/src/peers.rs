//! Peer rules: a cap on a cgroup's traffic to or from a set of addresses (its peers), beside
//! the cgroup's own limit. A rule is what a node holds of one rule of a BandwidthPolicy (or what
//! a user set with `podshaper rule set`); cgroups are bound to rules by name.
//!
//! Peers are address blocks as in NetworkPolicy's `ipBlock`: a CIDR, less the CIDRs in its
//! `except`. The datapath looks addresses up in a longest-prefix-match table, so a rule becomes
//! one table entry per CIDR and per except: [`PeerRule::entries`] says which of them are in.
use std::{collections::BTreeMap, fmt};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Rate;

/// Longest rule name the datapath keeps (its record holds 112 bytes with the NUL).
pub const MAX_NAME_LEN: usize = 111;
/// Most address blocks in one rule, excepts included: a quarter of the node's table, so that
/// one rule cannot fill it.
pub const MAX_BLOCKS: usize = 65_536;

/// A direction, from the point of view of the cgroup's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    /// Index in the datapath's per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::Egress => 0,
            Direction::Ingress => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// One block of peers: a CIDR less its excepts (IPv4 or IPv6, not mixed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// A block without excepts.
    pub fn of(cidr: IpNet) -> Self {
        Self {
            cidr,
            except: Vec::new(),
        }
    }
}

/// A peer rule as a node holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRule {
    /// Unique on the node; what cgroups are bound to.
    pub name: String,
    pub direction: Direction,
    /// The cap, in bits/s of L3 traffic, on the traffic to (egress) or from (ingress) the peers.
    pub rate: Rate,
    /// One cap for all the cgroups bound to the rule on this node together, rather than one
    /// each.
    #[serde(default)]
    pub shared: bool,
    pub peers: Vec<IpBlock>,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("rule name {0:?}: must be 1 to {MAX_NAME_LEN} bytes, without NUL")]
    Name(String),
    #[error("rule {0}: no peers (a rule caps traffic to or from a set of addresses; a cgroup's own limit covers all of it)")]
    NoPeers(String),
    #[error("rule {rule}: except {except} is not inside {cidr} (an except must be a strictly smaller block within its CIDR)")]
    ExceptOutside {
        rule: String,
        cidr: IpNet,
        except: IpNet,
    },
    #[error("rule {rule}: {count} address blocks, more than the {MAX_BLOCKS} a rule may have")]
    TooManyBlocks { rule: String, count: usize },
}

impl PeerRule {
    /// Checks what the datapath cannot hold or would misread.
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN || self.name.contains('\0') {
            return Err(RuleError::Name(self.name.clone()));
        }
        if self.peers.is_empty() {
            return Err(RuleError::NoPeers(self.name.clone()));
        }
        let count: usize = self.peers.iter().map(|b| 1 + b.except.len()).sum();
        if count > MAX_BLOCKS {
            return Err(RuleError::TooManyBlocks {
                rule: self.name.clone(),
                count,
            });
        }
        for b in &self.peers {
            for e in &b.except {
                let e = e.trunc();
                if !b.cidr.contains(&e) || e.prefix_len() <= b.cidr.prefix_len() {
                    return Err(RuleError::ExceptOutside {
                        rule: self.name.clone(),
                        cidr: b.cidr,
                        except: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// The longest-prefix-match entries that hold the rule's peers: each CIDR and each except
    /// (host bits cleared, IPv4 as written: the datapath maps them into IPv6), and whether an
    /// address whose longest match is that entry is a peer. Every CIDR is in (its own block
    /// covers it). An except is in when another block covers it without excepting it, as
    /// 198.18.1.0/24 inside a second block 198.18.0.0/16 with no except.
    ///
    /// Exact for any overlap: for an address, its longest match E is the most specific entry
    /// that holds it, so every block's CIDR or except holding the address holds E too.
    pub fn entries(&self) -> BTreeMap<IpNet, bool> {
        let mut out = BTreeMap::new();
        for b in &self.peers {
            out.insert(b.cidr.trunc(), true);
        }
        let covered = |e: &IpNet| {
            self.peers
                .iter()
                .any(|b| b.cidr.contains(e) && !b.except.iter().any(|x| x.trunc().contains(e)))
        };
        for b in &self.peers {
            for e in &b.except {
                let e = e.trunc();
                out.entry(e).or_insert_with(|| covered(&e));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn rule(peers: Vec<IpBlock>) -> PeerRule {
        PeerRule {
            name: "r".into(),
            direction: Direction::Egress,
            rate: Rate::from_bps(20_000_000).unwrap(),
            shared: false,
            peers,
        }
    }

    #[test]
    fn an_except_carves_its_range_out_of_its_block() {
        let r = rule(vec![IpBlock {
            cidr: net("198.18.0.0/15"),
            except: vec![net("198.18.1.0/24")],
        }]);
        r.validate().unwrap();
        let e = r.entries();
        assert!(e[&net("198.18.0.0/15")]);
        assert!(!e[&net("198.18.1.0/24")]);
    }

    #[test]
    fn an_except_another_block_covers_stays_in() {
        let r = rule(vec![
            IpBlock {
                cidr: net("2001:2::/48"),
                except: vec![net("2001:2:0:1::/64")],
            },
            IpBlock::of(net("2001:2::/56")),
        ]);
        let e = r.entries();
        assert!(e[&net("2001:2:0:1::/64")]);
        // The except of one block inside another block that excepts it too: out.
        let r = rule(vec![
            IpBlock {
                cidr: net("198.18.0.0/16"),
                except: vec![net("198.18.2.0/24")],
            },
            IpBlock {
                cidr: net("198.18.2.0/23"),
                except: vec![net("198.18.2.0/24")],
            },
        ]);
        assert!(!r.entries()[&net("198.18.2.0/24")]);
    }

    #[test]
    fn host_bits_are_cleared() {
        let r = rule(vec![IpBlock::of(net("198.18.1.7/24"))]);
        assert_eq!(
            r.entries().keys().collect::<Vec<_>>(),
            vec![&net("198.18.1.0/24")]
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let outside = rule(vec![IpBlock {
            cidr: net("198.18.0.0/24"),
            except: vec![net("198.19.0.0/24")],
        }]);
        assert!(matches!(outside.validate(), Err(RuleError::ExceptOutside { .. })));
        let whole = rule(vec![IpBlock {
            cidr: net("198.18.0.0/24"),
            except: vec![net("198.18.0.0/24")],
        }]);
        assert!(whole.validate().is_err());
        let family = rule(vec![IpBlock {
            cidr: net("198.18.0.0/24"),
            except: vec![net("2001:2::/64")],
        }]);
        assert!(family.validate().is_err());
        assert!(matches!(rule(vec![]).validate(), Err(RuleError::NoPeers(_))));
        let mut long = rule(vec![IpBlock::of(net("198.18.0.0/24"))]);
        long.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(long.validate(), Err(RuleError::Name(_))));
        long.name = "x".repeat(MAX_NAME_LEN);
        long.validate().unwrap();
    }

    #[test]
    fn rules_round_trip_as_json() {
        let r = rule(vec![IpBlock {
            cidr: net("198.18.0.0/15"),
            except: vec![net("198.18.1.0/24")],
        }]);
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"name":"r","direction":"egress","rate":20000000,"shared":false,"peers":[{"cidr":"198.18.0.0/15","except":["198.18.1.0/24"]}]}"#
        );
        assert_eq!(serde_json::from_str::<PeerRule>(&s).unwrap(), r);
    }
}
