//! Command-line interface. Every subcommand but `daemon`, `demo` and `reset` (when no daemon
//! runs) is a request to the daemon over its Unix socket.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use podshaper_api::{
    human_bps,
    proto::{CgroupStatus, Change, NodeStatus, Request, Response, RuleStatus, DEFAULT_SOCKET},
    Direction, PeerRule, Rate,
};
use podshaper_ebpf::pins::DEFAULT_ROOT;
use tracing_subscriber::EnvFilter;

/// Limit the bandwidth of cgroups (pods, containers, systemd services) with eBPF.
///
/// Rates count L3 bytes (IP header and payload) as bits per second, from the point of view of
/// the processes in the cgroup: egress is what they send, ingress what they receive.
#[derive(Parser, Debug)]
#[command(name = "podshaper", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's Unix socket.
    #[arg(long, global = true, env = "PODSHAPER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node daemon in the foreground (root). It loads the BPF programs, adopts limits
    /// pinned by an earlier run and serves the local API.
    Daemon {
        /// bpffs directory for podshaper's pinned programs, maps and links.
        #[arg(long, env = "PODSHAPER_BPFFS", default_value = DEFAULT_ROOT)]
        bpffs: PathBuf,
        /// Do not pace this node's TCP senders at the rates limited receivers ask for in
        /// their rate option (a sock_ops program on the cgroup root); receivers limited
        /// elsewhere can then only police them.
        #[arg(long, env = "PODSHAPER_NO_PEER_PACING")]
        no_peer_pacing: bool,
        /// Where the cgroup v2 hierarchy is mounted; found in /proc/self/mountinfo if not given.
        #[arg(long, env = "PODSHAPER_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
    },
    /// Run the Kubernetes node agent (root; what the DaemonSet runs): the daemon plus a watch
    /// of this node's pods that limits each one as its kubernetes.io/egress-bandwidth and
    /// kubernetes.io/ingress-bandwidth annotations and the BandwidthPolicies selecting it say,
    /// live. Uses the in-cluster config or KUBECONFIG.
    Agent(AgentArgs),
    /// Run the BandwidthPolicy controller (no privileges; what the chart's Deployment runs):
    /// resolves the pod and namespace selectors of every policy into addresses, published as
    /// BandwidthPeerSets for the agents, and writes the policies' status. One replica acts at
    /// a time, the holder of a coordination.k8s.io Lease. Uses the in-cluster config or
    /// KUBECONFIG.
    Controller(ControllerArgs),
    /// Ask every agent of a Helm release to lift all limits on its node and wait for them to
    /// confirm (the chart's pre-delete hook runs this on `helm uninstall`).
    Uninstall {
        /// The agents' namespace.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Label selector of the agent pods.
        #[arg(long, default_value = "app.kubernetes.io/name=podshaper")]
        selector: String,
        /// How long to wait for the agents, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Succeed even if some agents did not confirm (their nodes are down, say). By default
        /// that fails, so `helm uninstall` stops before limits could outlive the chart.
        #[arg(long)]
        ignore_unconfirmed: bool,
    },
    /// Print the CustomResourceDefinitions (YAML: BandwidthPolicy, BandwidthPeerSet) that the chart ships,
    /// generated from the agent's types: `podshaper crd > deploy/helm/podshaper/templates/crds.yaml`.
    Crd,
    /// Set or change the limits of a cgroup v2 directory and everything below it, and the
    /// peer rules it is bound to. Applies live; a direction not given keeps its limit, `none`
    /// removes it.
    Limit {
        /// The cgroup: a path in the cgroup v2 mount, or relative to it.
        #[arg(long)]
        cgroup: PathBuf,
        /// Egress limit: a Kubernetes quantity (10M, 1.5G) or tc-style (10mbit); `none`.
        #[arg(long, value_parser = parse_change)]
        egress: Option<Change>,
        /// Ingress limit, same forms as --egress.
        #[arg(long, value_parser = parse_change)]
        ingress: Option<Change>,
        /// A name for `status` to show instead of the path (kept until the daemon restarts).
        #[arg(long)]
        name: Option<String>,
        /// Bind the cgroup to these peer rules (comma-separated names, see `podshaper rule`),
        /// replacing those it had; `none` unbinds it from all. Not given: keep them.
        #[arg(long, value_delimiter = ',')]
        rules: Option<Vec<String>>,
    },
    /// Peer rules: caps on the traffic to or from a set of addresses, for the cgroups bound to
    /// them (`limit --rules`), beside each cgroup's own limits.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Remove every limit, program and map entry of a cgroup.
    Unlimit {
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Show limited cgroups: limits, current rates, bytes, drops and marks; then the node's
    /// rate-option counters (what receivers here told their senders, what senders here took).
    Status {
        /// Only this cgroup.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Machine-readable output: the cgroups as a JSON array (with --node, the node's
        /// counters as an object).
        #[arg(long)]
        json: bool,
        /// Only the node's rate-option counters.
        #[arg(long)]
        node: bool,
    },
    /// Remove every limit and all pinned state (what an uninstall runs). Works without a
    /// running daemon.
    Reset {
        /// bpffs directory for podshaper's pinned programs, maps and links.
        #[arg(long, env = "PODSHAPER_BPFFS", default_value = DEFAULT_ROOT)]
        bpffs: PathBuf,
    },
    /// Show the shaper at work on this machine: two "pods" in network namespaces and cgroups,
    /// traffic unlimited, limited both ways, then a live change. Needs root and iperf3.
    Demo(crate::demo::Args),
}

#[derive(Subcommand, Debug)]
enum RuleCommand {
    /// Set a rule, or change it in place (its direction stays); bound cgroups follow live.
    Set {
        /// The rule's name, up to 111 bytes.
        name: String,
        /// Cap the traffic the bound cgroups send to the peers at this rate.
        #[arg(long, value_parser = Rate::parse_cli, conflicts_with = "ingress", required_unless_present = "ingress")]
        egress: Option<Rate>,
        /// Cap the traffic the bound cgroups receive from the peers at this rate.
        #[arg(long, value_parser = Rate::parse_cli)]
        ingress: Option<Rate>,
        /// A block of peer addresses, IPv4 or IPv6 (198.18.0.0/15, 2001:2::/48, 198.18.0.7).
        /// Repeat for more.
        #[arg(long = "peer", required = true, value_parser = parse_net)]
        peers: Vec<ipnet::IpNet>,
        /// Addresses to leave out of the smallest --peer block that holds them. Repeat for
        /// more.
        #[arg(long, value_parser = parse_net)]
        except: Vec<ipnet::IpNet>,
        /// One cap for all the bound cgroups of this host together, not one each.
        #[arg(long)]
        shared: bool,
    },
    /// Remove a rule and unbind it from every cgroup.
    Remove { name: String },
    /// List the rules.
    List {
        /// Machine-readable output: a JSON array.
        #[arg(long)]
        json: bool,
    },
}

// A CIDR, or a single address as its /32 or /128.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("invalid address block {s:?}: expected a CIDR (198.18.0.0/15, 2001:2::/48) or an address")
        })
}

// The peer blocks of `rule set`: each except goes to the smallest block that holds it.
fn blocks(peers: Vec<ipnet::IpNet>, except: Vec<ipnet::IpNet>) -> Result<Vec<podshaper_api::IpBlock>> {
    let mut blocks: Vec<podshaper_api::IpBlock> = peers.into_iter().map(podshaper_api::IpBlock::of).collect();
    for e in except {
        let Some(b) = blocks
            .iter_mut()
            .filter(|b| b.cidr.contains(&e) && b.cidr.prefix_len() < e.prefix_len())
            .max_by_key(|b| b.cidr.prefix_len())
        else {
            bail!("--except {e} is inside no --peer block");
        };
        b.except.push(e);
    }
    Ok(blocks)
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// The node whose pods this agent limits (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The agent's own pod name (downward API); the uninstall signal arrives on it.
    #[arg(long, env = "POD_NAME", requires = "pod_namespace")]
    pod_name: Option<String>,
    /// The agent's own pod namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "PODSHAPER_METRICS_ADDR", default_value = "0.0.0.0:9810")]
    metrics_addr: std::net::SocketAddr,
    /// The highest limit an annotation may set; higher ones are cut to it, with an Event
    /// (BandwidthPolicy rates are not cut: only whoever may write policies sets them).
    #[arg(long, env = "PODSHAPER_MAX_RATE", value_parser = Rate::parse_quantity)]
    max_rate: Option<Rate>,
    /// The kubelet's cgroup driver: auto, systemd or cgroupfs.
    #[arg(long, env = "PODSHAPER_CGROUP_DRIVER", default_value = "auto")]
    cgroup_driver: podshaper_agent::podcgroup::Driver,
    /// Where the host's cgroup v2 hierarchy is (in a container: the hostPath mount); found in
    /// /proc/self/mountinfo if not given.
    #[arg(long, env = "PODSHAPER_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// bpffs directory for podshaper's pinned programs, maps and links.
    #[arg(long, env = "PODSHAPER_BPFFS", default_value = DEFAULT_ROOT)]
    bpffs: PathBuf,
    /// Do not pace this node's TCP senders at the rates limited receivers ask for in their
    /// rate option; pods limited elsewhere can then only police them.
    #[arg(long, env = "PODSHAPER_NO_PEER_PACING")]
    no_peer_pacing: bool,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// The namespace of the Lease (the controller's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The Lease's name.
    #[arg(long, env = "PODSHAPER_LEASE", default_value = "podshaper-controller")]
    lease_name: String,
    /// This replica's name in the Lease (its pod's name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    identity: String,
}

fn parse_change(s: &str) -> Result<Change, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "none" | "unlimited" => Ok(Change::Unlimited),
        _ => Rate::parse_cli(s).map(Change::Set).map_err(|e| e.to_string()),
    }
}

/// Parses the command line, runs it and maps errors to a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the daemon's info lines would only interleave with it.
    let default = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: most of our errors already print their source.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !out.contains(&cause) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&cause);
        }
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("start the async runtime")?;
    match cli.command {
        Command::Daemon {
            bpffs,
            no_peer_pacing,
            cgroup_root,
        } => {
            rt.block_on(podshaper_daemon::run(podshaper_daemon::Options {
                socket: cli.socket,
                bpffs_root: bpffs,
                peer_pacing: !no_peer_pacing,
                cgroup_root,
            }))?;
        }
        Command::Agent(a) => {
            rt.block_on(podshaper_agent::run(podshaper_agent::Options {
                node_name: a.node_name,
                own_pod: a.pod_namespace.zip(a.pod_name),
                metrics_addr: a.metrics_addr,
                max_rate: a.max_rate,
                driver: a.cgroup_driver,
                daemon: podshaper_daemon::Options {
                    socket: cli.socket,
                    bpffs_root: a.bpffs,
                    peer_pacing: !a.no_peer_pacing,
                    cgroup_root: a.cgroup_root,
                },
            }))?;
        }
        Command::Controller(c) => {
            rt.block_on(podshaper_agent::controller::run(
                podshaper_agent::controller::Options {
                    namespace: c.namespace,
                    lease_name: c.lease_name,
                    identity: c.identity,
                },
            ))?;
        }
        Command::Uninstall {
            namespace,
            selector,
            timeout,
            ignore_unconfirmed,
        } => {
            let silent = rt.block_on(podshaper_agent::signal_uninstall(
                &namespace,
                &selector,
                std::time::Duration::from_secs(timeout),
            ))?;
            if !silent.is_empty() {
                let msg = format!(
                    "these agents did not confirm that they lifted their node's limits: {}; run `podshaper reset` on their nodes",
                    silent.join(", ")
                );
                if !ignore_unconfirmed {
                    bail!("{msg} (or pass --ignore-unconfirmed)");
                }
                eprintln!("warning: {msg}");
            }
        }
        Command::Limit {
            cgroup,
            egress,
            ingress,
            name,
            rules,
        } => {
            if egress.is_none() && ingress.is_none() && rules.is_none() {
                bail!("give --egress and/or --ingress (a rate such as 10M, or none), or --rules");
            }
            let rules = rules.map(|r| if r == ["none"] { Vec::new() } else { r });
            let req = Request::Limit {
                cgroup,
                egress: egress.unwrap_or_default(),
                ingress: ingress.unwrap_or_default(),
                name,
                rules,
            };
            if let Response::Ok { status: Some(s) } = rt.block_on(ask(&cli.socket, &req))? {
                print_table(&[s]);
            }
        }
        Command::Rule(RuleCommand::Set {
            name,
            egress,
            ingress,
            peers,
            except,
            shared,
        }) => {
            let (direction, rate) = match (egress, ingress) {
                (Some(r), _) => (Direction::Egress, r),
                (None, Some(r)) => (Direction::Ingress, r),
                (None, None) => bail!("give --egress or --ingress"),
            };
            let rule = PeerRule {
                name,
                direction,
                rate,
                shared,
                peers: blocks(peers, except)?,
            };
            rule.validate()?;
            rt.block_on(ask(&cli.socket, &Request::SetRule { rule }))?;
        }
        Command::Rule(RuleCommand::Remove { name }) => {
            rt.block_on(ask(&cli.socket, &Request::RemoveRule { name }))?;
        }
        Command::Rule(RuleCommand::List { json }) => {
            if let Response::Rules { rules } = rt.block_on(ask(&cli.socket, &Request::Rules))? {
                if json {
                    println!("{}", serde_json::to_string_pretty(&rules)?);
                } else {
                    print_rules(&rules);
                }
            }
        }
        Command::Unlimit { cgroup } => {
            rt.block_on(ask(&cli.socket, &Request::Unlimit { cgroup }))?;
        }
        Command::Status { cgroup, json, node } => {
            if let Response::Status {
                cgroups,
                node: counters,
            } = rt.block_on(ask(&cli.socket, &Request::Status { cgroup }))?
            {
                match (node, json) {
                    (true, true) => println!("{}", serde_json::to_string_pretty(&counters)?),
                    (true, false) => print_node(counters.as_ref()),
                    (false, true) => println!("{}", serde_json::to_string_pretty(&cgroups)?),
                    (false, false) => {
                        print_table(&cgroups);
                        print_node(counters.as_ref());
                    }
                }
            }
        }
        Command::Reset { bpffs } => {
            match rt.block_on(podshaper_daemon::call(&cli.socket, &Request::Reset)) {
                Ok(resp) => {
                    check(resp)?;
                }
                // No daemon holds the programs: removing the pins detaches everything.
                Err(_) => {
                    podshaper_ebpf::reset(&bpffs).with_context(|| format!("reset {}", bpffs.display()))?
                }
            }
        }
        Command::Demo(args) => crate::demo::run(args)?,
        Command::Crd => print!("{}", podshaper_agent::policy::crd_yaml()?),
    }
    Ok(ExitCode::SUCCESS)
}

async fn ask(socket: &std::path::Path, req: &Request) -> Result<Response> {
    let resp = podshaper_daemon::call(socket, req).await.with_context(|| {
        format!(
            "cannot reach the podshaper daemon at {}: is it running? (start it with `podshaper daemon` as root)",
            socket.display()
        )
    })?;
    check(resp)
}

fn check(resp: Response) -> Result<Response> {
    match resp {
        Response::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

fn print_node(n: Option<&NodeStatus>) {
    let Some(n) = n else {
        println!("rate option: no datapath loaded");
        return;
    };
    println!(
        "rate option: written {} (no room {}, another writer's {}); taken {} (no limit {}), ignored: malformed {}, outside the ACK window {}",
        n.options_written,
        n.options_no_room,
        n.options_exists,
        n.options_taken,
        n.options_lifted,
        n.options_malformed,
        n.options_outside
    );
}

fn print_rules(rules: &[RuleStatus]) {
    println!(
        "{:<40} {:<9} {:>9} {:<8} {:>9} {:>8}",
        "RULE", "DIRECTION", "LIMIT", "SCOPE", "PREFIXES", "CGROUPS"
    );
    for r in rules {
        println!(
            "{:<40} {:<9} {:>9} {:<8} {:>9} {:>8}",
            r.name,
            r.direction.to_string(),
            r.limit.to_string(),
            if r.shared { "shared" } else { "each" },
            r.prefixes,
            r.cgroups
        );
    }
}

fn print_table(rows: &[CgroupStatus]) {
    let lim = |r: &Option<Rate>| r.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "{:<44} {:>9} {:>10} {:>9} {:>10} {:>12} {:>12} {:>11} {:>11} {:>7}",
        "NAME (POD OR CGROUP)",
        "EGRESS",
        "EG-RATE",
        "INGRESS",
        "IN-RATE",
        "EG-BYTES",
        "IN-BYTES",
        "DROPS(E/I)",
        "MARKS(E/I)",
        "UNPACED"
    );
    for r in rows {
        println!(
            "{:<44} {:>9} {:>10} {:>9} {:>10} {:>12} {:>12} {:>11} {:>11} {:>7}",
            r.name.clone().unwrap_or_else(|| r.cgroup.display().to_string()),
            lim(&r.egress.limit),
            human_bps(r.egress.rate_bps as f64),
            lim(&r.ingress.limit),
            human_bps(r.ingress.rate_bps as f64),
            r.egress.bytes,
            r.ingress.bytes,
            format!("{}/{}", r.egress.drops, r.ingress.drops),
            format!("{}/{}", r.egress.marks, r.ingress.marks),
            r.ingress.unpaced_flows.unwrap_or(0),
        );
        // The cgroup's peer rules, one line each, under it.
        for p in &r.peers {
            let (eg, eg_rate, ing, in_rate) = match p.direction {
                Direction::Egress => (
                    p.limit.to_string(),
                    human_bps(p.rate_bps as f64),
                    "-".into(),
                    "-".into(),
                ),
                Direction::Ingress => (
                    "-".into(),
                    "-".into(),
                    p.limit.to_string(),
                    human_bps(p.rate_bps as f64),
                ),
            };
            let scope = if p.shared { " (shared)" } else { "" };
            println!(
                "{:<44} {:>9} {:>10} {:>9} {:>10}",
                format!("  peers: {}{scope}", p.rule),
                eg,
                eg_rate,
                ing,
                in_rate
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn limit_parses_rates_and_none() {
        let cli = Cli::try_parse_from([
            "podshaper",
            "limit",
            "--cgroup",
            "/x",
            "--egress",
            "10mbit",
            "--ingress",
            "none",
        ])
        .unwrap();
        let Command::Limit { egress, ingress, .. } = cli.command else {
            panic!("not limit")
        };
        assert_eq!(egress, Some(Change::Set(Rate::from_bps(10_000_000).unwrap())));
        assert_eq!(ingress, Some(Change::Unlimited));
    }

    #[test]
    fn bad_rate_is_refused_with_what_is_accepted() {
        let err =
            Cli::try_parse_from(["podshaper", "limit", "--cgroup", "/x", "--egress", "10Zbit"]).unwrap_err();
        assert!(err.to_string().contains("expected bits per second"), "{err}");
    }

    #[test]
    fn errors_name_each_cause_once() {
        let io = std::io::Error::other("Operation not permitted");
        let inner = anyhow::Error::new(io).context("open map: Operation not permitted");
        let e = inner.context("load the datapath");
        assert_eq!(
            describe(&e),
            "load the datapath: open map: Operation not permitted"
        );
    }
}
