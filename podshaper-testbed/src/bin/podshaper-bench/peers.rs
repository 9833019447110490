//! The peer-rule rows of the bench (docs/policy.md): one pod sending to (or receiving from) a
//! rule's peer and another address at once; a shared rule over two pods; and what the rule
//! lookup costs a packet with 1, 100 and 10k entries in a rule.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context, Result};
use podshaper_api::{human_bps, Direction, IpBlock, PeerRule, Rate};
use podshaper_testbed::{
    bpf_stats, run_clients, ClientOptions, IperfReport, IperfServer, NetnsPair, ServerOptions, Table,
    TempDatapath, Traffic, L3,
};

use crate::{jain, ns_per_run, Dir, BASELINE_PACING, G, HIGH_LIMIT, M, SKIP_SECS};

/// Whether each pod gets the rule's rate, or all of them together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One pod, two peers: the rule's peer (capped) and another address (free), at once.
    PerPeer,
    /// Two pods under one shared rule, both to the rule's peer: their sum is capped.
    Shared,
}

/// Where the peer that sends to the pod runs (ingress rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    ThisNode,
    /// A cgroup of a second datapath: only the rate option joins the two.
    OtherNode,
}

#[derive(Clone, Debug)]
pub struct PeerCase {
    pub scope: Scope,
    pub dir: Dir,
    pub from: Origin,
    /// Flows to the rule's peer (per pod).
    pub flows: u32,
    pub target: u64,
}

impl PeerCase {
    pub fn label(&self) -> String {
        let scope = match self.scope {
            Scope::PerPeer => "per-peer",
            Scope::Shared => "shared",
        };
        let from = match (self.dir, self.from) {
            (Dir::Ingress, Origin::OtherNode) => " from-other-node",
            _ => "",
        };
        format!(
            "peers {scope} {}{from} tcp x{} {}",
            self.dir.name(),
            self.flows,
            human_bps(self.target as f64)
        )
    }

    fn sender(&self) -> &'static str {
        match (self.dir, self.from) {
            (Dir::Egress, _) => "-",
            (_, Origin::ThisNode) => "this node",
            (_, Origin::OtherNode) => "other node",
        }
    }
}

/// The peer cases: per peer both ways (ingress from this node and from another), shared both
/// ways from this node.
pub fn cases(quick: bool) -> Vec<PeerCase> {
    let (targets, flows): (&[u64], &[u32]) = if quick {
        (&[100 * M], &[1])
    } else {
        (&[10 * M, 100 * M, G], &[1, 8])
    };
    let mut cases = Vec::new();
    for &target in targets {
        for &flows in flows {
            for (scope, dir, from) in [
                (Scope::PerPeer, Dir::Egress, Origin::ThisNode),
                (Scope::PerPeer, Dir::Ingress, Origin::ThisNode),
                (Scope::PerPeer, Dir::Ingress, Origin::OtherNode),
                (Scope::Shared, Dir::Egress, Origin::ThisNode),
                (Scope::Shared, Dir::Ingress, Origin::ThisNode),
            ] {
                cases.push(PeerCase {
                    scope,
                    dir,
                    from,
                    flows,
                    target,
                });
            }
        }
    }
    cases
}

pub fn table() -> Table {
    Table::new([
        "scope",
        "direction",
        "sender",
        "flows",
        "target",
        "steady/target",
        "retransmits",
        "unlimited peer Gbit/s",
        "Jain (two pods)",
    ])
}

/// B's second address: the rule's peer. B's first stays outside the rule.
const PEER: Ipv4Addr = NetnsPair::B2_V4;
/// The port of the second iperf3 server.
const SECOND_PORT: u16 = 5202;

fn rule(name: &str, dir: Dir, rate: u64, shared: bool, peers: Vec<IpBlock>) -> Result<PeerRule> {
    Ok(PeerRule {
        name: name.into(),
        direction: match dir {
            Dir::Egress => Direction::Egress,
            Dir::Ingress => Direction::Ingress,
        },
        rate: Rate::from_bps(rate)?,
        shared,
        peers,
    })
}

fn host(ip: Ipv4Addr) -> IpBlock {
    IpBlock::of(ipnet::IpNet::from(IpAddr::V4(ip)))
}

/// One peer case: its table row, and a progress note.
pub fn run(
    pair: &NetnsPair,
    dp: &mut TempDatapath,
    remote: Option<&TempDatapath>,
    case: &PeerCase,
    secs: u32,
) -> Result<(Vec<String>, String)> {
    let shared = case.scope == Scope::Shared;
    let r = rule("bench-peer", case.dir, case.target, shared, vec![host(PEER)])?;
    dp.set_rule(&r).context("set the rule")?;
    let pods = match case.scope {
        Scope::PerPeer => vec![dp.pod("bench-pod")?],
        Scope::Shared => vec![dp.pod("bench-pod")?, dp.pod("bench-pod2")?],
    };
    let server = match (case.dir, case.from) {
        (Dir::Ingress, Origin::OtherNode) => match remote {
            Some(node) => node.pod("bench-remote")?,
            None => bail!("the second node is not loaded"),
        },
        _ => dp.pod("bench-server")?,
    };
    let result = (|| -> Result<(Vec<String>, String)> {
        for pod in &pods {
            dp.bind(&pod.dir()?, std::slice::from_ref(&r.name))
                .context("bind the rule")?;
        }
        let client = |to: IpAddr, port: u16, flows: u32| ClientOptions {
            traffic: Traffic::Tcp {
                congestion: Some("cubic".into()),
            },
            flows,
            secs,
            port,
            reverse: case.dir == Dir::Ingress,
            ..ClientOptions::new(to)
        };
        let ports = [ServerOptions::default().port, SECOND_PORT];
        let _servers = ports
            .iter()
            .map(|&port| {
                IperfServer::start(
                    pair.b(),
                    Some(&server),
                    &ServerOptions {
                        port,
                        ..ServerOptions::default()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Per peer: the pod to the rule's peer and to B's other address. Shared: each pod to
        // the rule's peer.
        let clients: Vec<_> = match case.scope {
            Scope::PerPeer => vec![
                (Some(&pods[0]), client(PEER.into(), ports[0], case.flows)),
                (Some(&pods[0]), client(NetnsPair::B_V4.into(), ports[1], 1)),
            ],
            Scope::Shared => vec![
                (Some(&pods[0]), client(PEER.into(), ports[0], case.flows)),
                (Some(&pods[1]), client(PEER.into(), ports[1], case.flows)),
            ],
        };
        let reports = run_clients(pair.a(), &clients)?;
        let steady = |r: &IperfReport| r.mean_after_bps(SKIP_SECS).map(|v| L3::TCP_V4.l3_bps(v));
        let t = case.target as f64;
        let (capped, other, fairness) = match case.scope {
            Scope::PerPeer => (steady(&reports[0]), steady(&reports[1]), None),
            Scope::Shared => {
                let rates: Option<Vec<f64>> = reports.iter().map(steady).collect();
                (
                    rates.as_ref().map(|r| r.iter().sum()),
                    None,
                    rates.and_then(|r| jain(&r)),
                )
            }
        };
        let capped_reports = match case.scope {
            Scope::PerPeer => &reports[..1],
            Scope::Shared => &reports[..],
        };
        let retransmits: Option<u64> = capped_reports.iter().map(|r| r.retransmits).sum();
        let row = vec![
            match case.scope {
                Scope::PerPeer => "per peer".to_string(),
                Scope::Shared => "shared, 2 pods".to_string(),
            },
            case.dir.name().into(),
            case.sender().into(),
            case.flows.to_string(),
            human_bps(t),
            capped.map_or("-".into(), |c| format!("{:.2}", c / t)),
            retransmits.map_or("-".into(), |r| r.to_string()),
            other.map_or("-".into(), |o| format!("{:.2}", o / 1e9)),
            fairness.map_or("-".into(), |j| format!("{j:.3}")),
        ];
        let note = format!(
            "steady {} retx {} other {} Jain {}",
            row[5], row[6], row[7], row[8]
        );
        Ok((row, note))
    })();
    for pod in &pods {
        dp.remove(pod.id()).context("remove the pod's rules")?;
    }
    dp.remove_rule(&r.name).context("remove the rule")?;
    result
}

/// Entries per rule of the cost rows: 0 is no rule at all.
pub const COST_ENTRIES: [usize; 4] = [0, 1, 100, 10_000];

pub fn cost_table() -> Table {
    Table::new([
        "peer entries per rule",
        "egress ns/run (pod sends)",
        "ingress ns/run (pod receives)",
        "sends Gbit/s",
        "receives Gbit/s",
    ])
}

/// What a packet of a flow to a rule's peer costs the cgroup programs with `entries` /32
/// blocks in each of an egress and an ingress rule (the peer among them), at rates far above
/// what the lab carries, so nothing is shaped: the kernel's bpf_stats of a run each way.
pub fn cost(pair: &NetnsPair, dp: &mut TempDatapath, entries: usize, secs: u32) -> Result<Vec<String>> {
    let pod = dp.pod("bench-cost")?;
    let server = dp.pod("bench-cost-server")?;
    let mut names = Vec::new();
    let result = (|| -> Result<Vec<String>> {
        if entries == 0 {
            dp.set(
                &pod.dir()?,
                podshaper_ebpf::Limits::from_bps(Some(HIGH_LIMIT), Some(HIGH_LIMIT))?,
            )?;
        } else {
            // The peer and entries - 1 other hosts of 198.19.0.0/16, which no traffic goes to.
            let mut blocks = vec![host(PEER)];
            blocks.extend((1..entries).map(|i| host(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8))));
            for dir in [Dir::Egress, Dir::Ingress] {
                let r = rule(
                    &format!("bench-cost-{}", dir.name()),
                    dir,
                    HIGH_LIMIT,
                    false,
                    blocks.clone(),
                )?;
                dp.set_rule(&r)?;
                names.push(r.name);
            }
            dp.bind(&pod.dir()?, &names)?;
        }
        let _stats = bpf_stats::enable_stats()?;
        let mut row = vec![entries.to_string()];
        let mut rates = Vec::new();
        for (reverse, program) in [(false, "ps_egress"), (true, "ps_ingress")] {
            let opts = ClientOptions {
                traffic: Traffic::Tcp {
                    congestion: Some("cubic".into()),
                },
                secs,
                reverse,
                pacing: Some(BASELINE_PACING),
                ..ClientOptions::new(PEER.into())
            };
            // A one-off server (iperf3 -1) per run.
            let _server = IperfServer::start(pair.b(), Some(&server), &ServerOptions::default())?;
            let before = bpf_stats::cgroup_programs(pod.path())?;
            let report = podshaper_testbed::run_client(pair.a(), Some(&pod), &opts)?;
            let after = bpf_stats::cgroup_programs(pod.path())?;
            row.push(ns_per_run(&before, &after, program));
            rates.push(format!("{:.2}", report.received_bps / 1e9));
        }
        row.extend(rates);
        Ok(row)
    })();
    dp.remove(pod.id())?;
    for name in &names {
        dp.remove_rule(name)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_cover_both_directions_and_scopes() {
        let quick = cases(true);
        assert_eq!(quick.len(), 5);
        assert!(quick
            .iter()
            .any(|c| c.scope == Scope::Shared && c.dir == Dir::Ingress));
        assert!(quick.iter().any(|c| c.from == Origin::OtherNode));
        // 3 targets x 2 flow counts x 5.
        assert_eq!(cases(false).len(), 30);
        let labels: std::collections::BTreeSet<_> = cases(false).iter().map(PeerCase::label).collect();
        assert_eq!(labels.len(), 30, "labels must tell the cases apart for --filter");
    }
}
