//! podshaper-bench: how close podshaper and TBF (as the Kubernetes bandwidth CNI plugin sets
//! it up) hold a pod to its limit, and what podshaper costs when it does not limit. Runs as
//! root on the node it measures; prints progress to stderr and the tables to stdout.
mod peers;

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use podshaper_api::human_bps;
use podshaper_ebpf::Limits;
use podshaper_testbed::{
    bpf_stats::{self, ProgStats},
    cpu,
    iperf::Protocol,
    run_client, run_clients,
    sampler::{self, InOctetsSampler},
    tbf::CONTAINERD_BURST_BITS,
    Cgroup, ClientOptions, IperfReport, IperfServer, Netns, NetnsPair, ServerOptions, Table, Tbf,
    TempDatapath, Traffic, L3,
};

/// Measure podshaper against TBF set up by the bandwidth CNI plugin, in two network namespaces
/// joined by a veth pair (the pod is namespace A, its peer namespace B). Needs root, iperf3,
/// bpftool and the bandwidth CNI plugin.
#[derive(Parser, Debug)]
#[command(name = "podshaper-bench", version)]
struct Args {
    /// Small matrix: both directions, TCP cubic and bbr with 1 and 8 flows and UDP, at 100M.
    #[arg(long)]
    quick: bool,
    /// Also write the tables as Markdown to FILE.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Seconds per case [default: 5, with --quick 4].
    #[arg(long)]
    secs: Option<u32>,
    /// Shapers to compare.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "podshaper,tbf-cni")]
    shaper: Vec<Shaper>,
    /// Burst (bits) given to the bandwidth plugin; the default is containerd's.
    #[arg(long, default_value_t = CONTAINERD_BURST_BITS)]
    tbf_burst: u64,
    /// Skip the overhead rows.
    #[arg(long)]
    no_overhead: bool,
    /// Skip the peer-rule rows (podshaper only: a rule's peer and another address at once, a
    /// shared rule over two pods, the lookup's cost).
    #[arg(long)]
    no_peers: bool,
    /// Run only the cases whose progress label contains TEXT, e.g. "ingress tcp bbr x8"
    /// (repeat or separate with commas: any of them).
    #[arg(long, value_name = "TEXT", value_delimiter = ',')]
    filter: Vec<String>,
    /// The pod's namespace asks for ECN on the connections it opens (net.ipv4.tcp_ecn=1; Linux
    /// peers accept it by default), so podshaper's ingress policer can mark CE where it would
    /// otherwise only pass or drop.
    #[arg(long)]
    ecn: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shaper {
    Podshaper,
    TbfCni,
}

impl Shaper {
    fn name(self) -> &'static str {
        match self {
            Shaper::Podshaper => "podshaper",
            Shaper::TbfCni => "tbf-cni",
        }
    }
}

/// Direction from the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Egress,
    Ingress,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Egress => "egress",
            Dir::Ingress => "ingress",
        }
    }
}

/// Where the process that sends to the pod runs (ingress only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// On the pod's node (egress rows and TBF rows too: there it makes no difference).
    ThisNode,
    /// On a second node: a datapath and cgroup subtree of its own, whose node-level program
    /// never sees the pod's sockets.
    OtherNode,
    /// On a node without podshaper: a cgroup outside both nodes, no program on its path.
    NoPodshaper,
    /// Half the flows from each of two other nodes (two datapaths of their own): they share
    /// the pod's limit, fairly.
    TwoNodes,
    /// A client on another node uploads to the pod through a Service address (DNAT in its
    /// namespace, as kube-proxy does): its socket's peer is the Service, not the pod.
    Service,
}

impl Sender {
    fn name(self, shaper: Shaper, dir: Dir) -> &'static str {
        match (dir, self) {
            (Dir::Egress, _) => "-",
            (_, _) if shaper == Shaper::TbfCni => "any",
            (_, Sender::ThisNode) => "this node",
            (_, Sender::OtherNode) => "other node",
            (_, Sender::NoPodshaper) => "no podshaper",
            (_, Sender::TwoNodes) => "two nodes",
            (_, Sender::Service) => "other node, via Service",
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    shaper: Shaper,
    dir: Dir,
    sender: Sender,
    /// TCP congestion control, or None for UDP.
    cc: Option<&'static str>,
    flows: u32,
    target: u64,
}

impl Case {
    fn proto(&self) -> &'static str {
        if self.cc.is_some() {
            "tcp"
        } else {
            "udp"
        }
    }

    fn label(&self) -> String {
        let from = match (self.dir, self.sender) {
            (Dir::Ingress, Sender::OtherNode) => " from-other-node",
            (Dir::Ingress, Sender::NoPodshaper) => " from-no-podshaper",
            (Dir::Ingress, Sender::TwoNodes) => " from-two-nodes",
            (Dir::Ingress, Sender::Service) => " via-service",
            _ => "",
        };
        format!(
            "{} {}{from} {} {} x{} {}",
            self.shaper.name(),
            self.dir.name(),
            self.proto(),
            self.cc.unwrap_or("-"),
            self.flows,
            human_bps(self.target as f64)
        )
    }
}

const M: u64 = 1_000_000;
const G: u64 = 1_000_000_000;
const UDP_LEN: u32 = 1400;
/// Overhead runs limit at this rate: far above what the veth carries, so nothing is shaped.
const HIGH_LIMIT: u64 = 40 * G;
/// Pacing cap of every overhead run (`--fq-rate`): above what the veth carries.
const BASELINE_PACING: u64 = 34 * G;
/// Runs per side of an overhead row.
const OVERHEAD_RUNS: usize = 3;
/// Intervals before this (seconds) are slow start and bucket bursts, not steady state.
const SKIP_SECS: f64 = 1.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("podshaper-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the bench creates network namespaces, cgroups and BPF programs");
    }
    // Ctrl-C also kills iperf3 (same process group); the loop then stops and drops the lab.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let secs = args.secs.unwrap_or(if args.quick { 4 } else { 5 });
    let cases = matrix(&args);
    let peer_cases = peer_matrix(&args);
    let pair = NetnsPair::new().context("create the two-namespace lab")?;
    if args.ecn {
        pair.a()
            .run("sysctl", &["-qw", "net.ipv4.tcp_ecn=1"])
            .context("ask for ECN in the pod's namespace")?;
    }
    let mut datapath =
        if args.shaper.contains(&Shaper::Podshaper) || !args.no_overhead || !peer_cases.is_empty() {
            Some(TempDatapath::load("podshaper-bench").context("load the podshaper datapath")?)
        } else {
            None
        };
    // The other nodes, for senders elsewhere.
    let remote = if cases
        .iter()
        .any(|c| matches!(c.sender, Sender::OtherNode | Sender::TwoNodes | Sender::Service))
        || peer_cases.iter().any(|c| c.from == peers::Origin::OtherNode)
    {
        Some(TempDatapath::load("podshaper-bench-remote").context("load the second node's datapath")?)
    } else {
        None
    };
    let remote2 = if cases.iter().any(|c| c.sender == Sender::TwoNodes) {
        Some(TempDatapath::load("podshaper-bench-remote2").context("load the third node's datapath")?)
    } else {
        None
    };
    let service = if cases.iter().any(|c| c.sender == Sender::Service) {
        Some(
            podshaper_testbed::service::add(&pair)
                .context("a Service address (make deps installs iptables)")?,
        )
    } else {
        None
    };
    let remotes = Remotes {
        one: remote.as_ref(),
        two: remote2.as_ref(),
        service,
    };
    let started = Instant::now();
    let info = RunInfo::collect()?;
    let method = method(&args, secs);
    for line in info.lines().iter().chain(&method) {
        println!("{line}");
    }
    println!();

    let mut results = Table::new([
        "shaper",
        "direction",
        "sender",
        "proto",
        "cc",
        "flows",
        "target",
        "achieved/target",
        "goodput/target",
        "steady/target",
        "worst100ms/target",
        "retransmits (UDP: loss)",
        "Jain (two senders)",
    ]);
    for (i, case) in cases.iter().enumerate() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprint!("[{}/{}] {} ... ", i + 1, cases.len(), case.label());
        let t0 = Instant::now();
        let row = match run_case(&pair, datapath.as_mut(), &remotes, case, secs, args.tbf_burst) {
            Ok((m, note)) => {
                let row = row(case, &m);
                let sent = m.report.sent_bps / case.target as f64;
                eprintln!(
                    "steady {} worst {} retx/loss {} sent {sent:.2}{note} [{:.1} s]",
                    row[9],
                    row[10],
                    row[11],
                    t0.elapsed().as_secs_f64()
                );
                row
            }
            Err(e) => {
                eprintln!("failed: {e:#}");
                let mut row = row_head(case);
                row.push("error".into());
                row
            }
        };
        results.push(row);
        thread::sleep(Duration::from_millis(200));
    }

    let (peer_results, peer_costs) = match &mut datapath {
        Some(dp) if !peer_cases.is_empty() => {
            let (results, costs) = run_peers(&pair, dp, remotes.one, &peer_cases, &args, secs)?;
            (Some(results), costs)
        }
        _ => (None, None),
    };

    let overhead = match (&mut datapath, args.no_overhead) {
        (Some(dp), false) if !INTERRUPTED.load(Ordering::SeqCst) => match overhead(&pair, dp, &args, secs) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("overhead failed: {e:#}");
                None
            }
        },
        _ => None,
    };

    println!("{}", results.to_text());
    if let Some(t) = &peer_results {
        println!("Peer rules: TCP cubic, podshaper\n\n{}", t.to_text());
    }
    if let Some(t) = &peer_costs {
        println!(
            "Peer lookup cost: TCP cubic x1, nothing shaped\n\n{}",
            t.to_text()
        );
    }
    if let Some(t) = &overhead {
        println!(
            "Overhead: TCP cubic, limit {} both ways vs no program, median of {OVERHEAD_RUNS} runs\n",
            human_bps(HIGH_LIMIT as f64)
        );
        println!("{}", t.to_text());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    if INTERRUPTED.load(Ordering::SeqCst) {
        // A partial run must not replace the last complete document.
        bail!("interrupted: the tables above are partial, no Markdown written");
    }
    if let Some(path) = &args.markdown {
        let peers = PeerTables {
            results: peer_results.as_ref(),
            costs: peer_costs.as_ref(),
        };
        let mut md = markdown(&info, &method, &results, &peers, overhead.as_ref())?;
        // The Kubernetes agent's section (podshaper-bench-k8s) is another bench's: keep it.
        let old = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(i) = old.find("<!-- bench-k8s -->") {
            md = format!("{}\n\n{}", md.trim_end(), &old[i..]);
        }
        std::fs::write(path, md).with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The peer-rule cases this run measures: podshaper's only.
fn peer_matrix(args: &Args) -> Vec<peers::PeerCase> {
    if args.no_peers || !args.shaper.contains(&Shaper::Podshaper) {
        return Vec::new();
    }
    let mut cases = peers::cases(args.quick);
    cases.retain(|c| args.filter.is_empty() || args.filter.iter().any(|f| c.label().contains(f.as_str())));
    cases
}

/// The peer-rule rows, then (unless --no-overhead or interrupted) the lookup's cost rows.
fn run_peers(
    pair: &NetnsPair,
    dp: &mut TempDatapath,
    remote: Option<&TempDatapath>,
    cases: &[peers::PeerCase],
    args: &Args,
    secs: u32,
) -> Result<(Table, Option<Table>)> {
    pair.add_second_b()
        .context("B's second address, the rule's peer")?;
    let mut results = peers::table();
    for (i, case) in cases.iter().enumerate() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprint!("[peers {}/{}] {} ... ", i + 1, cases.len(), case.label());
        let t0 = Instant::now();
        match peers::run(pair, dp, remote, case, secs) {
            Ok((row, note)) => {
                eprintln!("{note} [{:.1} s]", t0.elapsed().as_secs_f64());
                results.push(row);
            }
            Err(e) => eprintln!("failed: {e:#}"),
        }
        thread::sleep(Duration::from_millis(200));
    }
    if args.no_overhead {
        return Ok((results, None));
    }
    let mut costs = peers::cost_table();
    for entries in peers::COST_ENTRIES {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprint!("[peer cost] {entries} entries ... ");
        match peers::cost(pair, dp, entries, secs) {
            Ok(row) => {
                eprintln!("egress {} ingress {}", row[1], row[2]);
                costs.push(row);
            }
            Err(e) => eprintln!("failed: {e:#}"),
        }
    }
    Ok((results, Some(costs)))
}

fn matrix(args: &Args) -> Vec<Case> {
    let (tcp_targets, udp_targets, flows, udp_flows): (&[u64], &[u64], &[u32], &[u32]) = if args.quick {
        (&[100 * M], &[100 * M], &[1, 8], &[1])
    } else {
        (
            &[10 * M, 100 * M, G, 5 * G],
            &[10 * M, 100 * M, G],
            &[1, 8, 32],
            &[1, 8, 32],
        )
    };
    let mut cases = Vec::new();
    // Both shapers of one configuration on adjacent rows, to read them side by side; ingress
    // TCP up to 1G also from a sender on another node and from one without podshaper (TBF
    // does not care where the sender is: one row).
    let mut push = |dir, cc: Option<&'static str>, flows, target| {
        for &shaper in &args.shaper {
            let senders: &[Sender] = match (shaper, dir, cc) {
                // Two sender nodes split the flows in half: 8 and 32.
                (Shaper::Podshaper, Dir::Ingress, Some(_)) if target <= G && flows >= 8 => &[
                    Sender::ThisNode,
                    Sender::OtherNode,
                    Sender::Service,
                    Sender::NoPodshaper,
                    Sender::TwoNodes,
                ],
                (Shaper::Podshaper, Dir::Ingress, Some(_)) if target <= G => &[
                    Sender::ThisNode,
                    Sender::OtherNode,
                    Sender::Service,
                    Sender::NoPodshaper,
                ],
                _ => &[Sender::ThisNode],
            };
            for &sender in senders {
                cases.push(Case {
                    shaper,
                    dir,
                    sender,
                    cc,
                    flows,
                    target,
                });
            }
        }
    };
    for &target in tcp_targets {
        for dir in [Dir::Egress, Dir::Ingress] {
            for cc in ["cubic", "bbr"] {
                for &f in flows {
                    push(dir, Some(cc), f, target);
                }
            }
            if udp_targets.contains(&target) {
                for &f in udp_flows {
                    push(dir, None, f, target);
                }
            }
        }
    }
    cases.retain(|c| args.filter.is_empty() || args.filter.iter().any(|f| c.label().contains(f.as_str())));
    cases
}

/// What one case measured.
struct Measured {
    report: IperfReport,
    /// Highest 100 ms rate over the mean rate of the receiver's IP counter, after the first
    /// second.
    peak_over_mean: Option<f64>,
    /// Jain's index of the two senders' steady rates, for two sender nodes.
    jain: Option<f64>,
}

/// The datapaths of the other nodes, where a case needs them.
struct Remotes<'a> {
    one: Option<&'a TempDatapath>,
    two: Option<&'a TempDatapath>,
    /// The Service address in B, DNAT'ed to the pod.
    service: Option<std::net::Ipv4Addr>,
}

/// Runs one case in a fresh cgroup; returns what it measured and a note on what the shaper did.
fn run_case(
    pair: &NetnsPair,
    datapath: Option<&mut TempDatapath>,
    remotes: &Remotes,
    case: &Case,
    secs: u32,
    tbf_burst: u64,
) -> Result<(Measured, String)> {
    let limit = Some(case.target);
    let traffic = match case.cc {
        Some(cc) => Traffic::Tcp {
            congestion: Some(cc.to_string()),
        },
        None => Traffic::Udp {
            rate: 2 * case.target,
            len: UDP_LEN,
        },
    };
    let client = ClientOptions {
        traffic,
        flows: case.flows,
        secs,
        reverse: case.dir == Dir::Ingress,
        // TBF queues up to its burst: at 10M the results wait behind a minute of data.
        grace: Duration::from_secs(180),
        ..ClientOptions::new(NetnsPair::B_V4.into())
    };
    match case.shaper {
        Shaper::TbfCni => {
            let cg = Cgroup::new("bench")?;
            let _tbf = Tbf::add(pair, limit, limit, tbf_burst).context("bandwidth plugin ADD")?;
            let m = measure(pair, &cg, None, &client, case.dir)?;
            Ok((m, String::new()))
        }
        Shaper::Podshaper => {
            let Some(dp) = datapath else {
                bail!("datapath not loaded")
            };
            let cg = dp.pod("bench")?;
            let on = |node: Option<&TempDatapath>, label: &str| match node {
                Some(n) => Ok(Some(n.pod(label)?)),
                None => bail!("the node of {label} is not loaded"),
            };
            let (peer, peer2) = match case.sender {
                Sender::ThisNode => (Some(dp.pod("bench-peer")?), None),
                Sender::OtherNode | Sender::Service => (on(remotes.one, "bench-remote")?, None),
                Sender::NoPodshaper => (None, None),
                Sender::TwoNodes => (
                    on(remotes.one, "bench-remote")?,
                    on(remotes.two, "bench-remote2")?,
                ),
            };
            dp.set(&cg.dir()?, Limits::from_bps(limit, limit)?)
                .context("set limits")?;
            let report = match (&peer2, case.sender, remotes.service) {
                (Some(second), _, _) => measure_two(pair, &cg, [peer.as_ref(), Some(second)], &client),
                (None, Sender::Service, Some(vip)) => {
                    let Some(peer) = &peer else {
                        bail!("no cgroup for the Service's client")
                    };
                    measure_upload(pair, &cg, peer, vip, &client)
                }
                (None, Sender::Service, None) => bail!("no Service address"),
                (None, _, _) => measure(pair, &cg, peer.as_ref(), &client, case.dir),
            };
            let note = match dp.state(cg.id()) {
                Ok(Some(s)) => {
                    let d = if case.dir == Dir::Egress { 0 } else { 1 };
                    format!(
                        " (drops {} marks {} adjusts {} unpaced flows {})",
                        s.stats.drops[d], s.stats.marks[d], s.stats.adjusts, s.stats.unpaced_flows
                    )
                }
                _ => String::new(),
            };
            dp.remove(cg.id()).context("remove limits")?;
            Ok((report?, note))
        }
    }
}

/// One iperf3 test: the server in B (in cgroup `server`, if given), the client in A inside
/// `cg`; the receiving namespace's IP counter is sampled every 100 ms meanwhile.
fn measure(
    pair: &NetnsPair,
    cg: &Cgroup,
    server: Option<&Cgroup>,
    client: &ClientOptions,
    dir: Dir,
) -> Result<Measured> {
    let receiver = if dir == Dir::Egress { pair.b() } else { pair.a() };
    measure_between((pair.b(), server), (pair.a(), Some(cg)), receiver, client)
}

/// Like [`measure`] for an ingress case the other way round: the server in A inside `cg`, the
/// client in B inside `client_cg` uploading to `to` (a Service address) with `client`'s
/// traffic, flows and duration.
fn measure_upload(
    pair: &NetnsPair,
    cg: &Cgroup,
    client_cg: &Cgroup,
    to: std::net::Ipv4Addr,
    client: &ClientOptions,
) -> Result<Measured> {
    let opts = ClientOptions {
        server: to.into(),
        reverse: false,
        ..client.clone()
    };
    measure_between((pair.a(), Some(cg)), (pair.b(), Some(client_cg)), pair.a(), &opts)
}

/// One iperf3 test between a server and a client, each in a namespace and maybe a cgroup;
/// `receiver`'s IP counter is sampled every 100 ms meanwhile.
fn measure_between(
    (server_ns, server_cg): (&Netns, Option<&Cgroup>),
    (client_ns, client_cg): (&Netns, Option<&Cgroup>),
    receiver: &Netns,
    client: &ClientOptions,
) -> Result<Measured> {
    let _server = IperfServer::start(server_ns, server_cg, &ServerOptions::default())?;
    let sampler = InOctetsSampler::start(receiver, Duration::from_millis(100))?;
    let t0 = Instant::now();
    let report = run_client(client_ns, client_cg, client);
    let samples = sampler.finish()?;
    Ok(Measured {
        report: report?,
        peak_over_mean: peak_over_mean(&samples, t0, client.secs),
        jain: None,
    })
}

/// The receiver counter's highest 100 ms rate over its mean after the first second, for a test
/// started at `t0`: the client connects within a few ms of it; its last interval ends at
/// t0 + secs.
fn peak_over_mean(samples: &[sampler::Sample], t0: Instant, secs: u32) -> Option<f64> {
    let from = t0 + Duration::from_secs_f64(SKIP_SECS + 0.1);
    sampler::peak_and_mean(samples, from, t0 + Duration::from_secs(secs.into()))
        .filter(|(_, mean)| *mean > 0.0)
        .map(|(peak, mean)| peak / mean)
}

/// Like [`measure`] for a download from two senders, each with half the flows, each in its
/// own cgroup (`servers`, on two nodes) and on its own port: one report of their sums, and
/// Jain's index of their steady rates.
fn measure_two(
    pair: &NetnsPair,
    cg: &Cgroup,
    servers: [Option<&Cgroup>; 2],
    client: &ClientOptions,
) -> Result<Measured> {
    let ports = [client.port, client.port + 1];
    let _servers = servers
        .iter()
        .zip(ports)
        .map(|(server, port)| {
            IperfServer::start(
                pair.b(),
                *server,
                &ServerOptions {
                    port,
                    ..ServerOptions::default()
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sampler = InOctetsSampler::start(pair.a(), Duration::from_millis(100))?;
    let t0 = Instant::now();
    let clients: Vec<_> = ports
        .iter()
        .map(|&port| {
            let opts = ClientOptions {
                port,
                flows: client.flows / 2,
                ..client.clone()
            };
            (Some(cg), opts)
        })
        .collect();
    let reports = run_clients(pair.a(), &clients);
    let samples = sampler.finish()?;
    let [a, b]: [IperfReport; 2] = reports?
        .try_into()
        .map_err(|_| anyhow::anyhow!("two reports expected"))?;
    let jain = match [a.mean_after_bps(SKIP_SECS), b.mean_after_bps(SKIP_SECS)] {
        [Some(x), Some(y)] => jain(&[x, y]),
        _ => None,
    };
    Ok(Measured {
        report: sum_reports(a, &b),
        peak_over_mean: peak_over_mean(&samples, t0, client.secs),
        jain,
    })
}

/// Jain's fairness index of some rates: 1 when equal, 1/n when one takes all.
fn jain(rates: &[f64]) -> Option<f64> {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    (sum > 0.0).then(|| sum * sum / (rates.len() as f64 * squares))
}

/// Two reports of one test run side by side as one: totals added, intervals added pairwise.
fn sum_reports(mut a: IperfReport, b: &IperfReport) -> IperfReport {
    a.received_bps += b.received_bps;
    a.sent_bps += b.sent_bps;
    a.sent_bytes += b.sent_bytes;
    a.received_bytes += b.received_bytes;
    a.retransmits = a.retransmits.zip(b.retransmits).map(|(x, y)| x + y);
    for (i, j) in a.intervals.iter_mut().zip(&b.intervals) {
        i.bits_per_second += j.bits_per_second;
    }
    a.intervals.truncate(b.intervals.len());
    a
}

fn l3(report: &IperfReport) -> L3 {
    match report.protocol {
        Protocol::Tcp => L3::TCP_V4,
        Protocol::Udp => L3::udp_v4(UDP_LEN),
    }
}

fn row_head(case: &Case) -> Vec<String> {
    vec![
        case.shaper.name().into(),
        case.dir.name().into(),
        case.sender.name(case.shaper, case.dir).into(),
        case.proto().into(),
        case.cc.unwrap_or("-").into(),
        case.flows.to_string(),
        human_bps(case.target as f64),
    ]
}

fn row(case: &Case, m: &Measured) -> Vec<String> {
    let r = &m.report;
    let t = case.target as f64;
    let conv = l3(r);
    let ratio = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}", conv.l3_bps(v) / t));
    let mut row = row_head(case);
    row.push(ratio(Some(r.received_bps)));
    row.push(format!("{:.2}", r.received_bps / t));
    row.push(ratio(r.mean_after_bps(SKIP_SECS)));
    // The steady rate (the application's, in L3 bytes) times the receiver IP counter's peak
    // 100 ms over its mean: the counter sees bursts as they arrive, whatever the reads.
    let worst = r
        .mean_after_bps(SKIP_SECS)
        .zip(m.peak_over_mean)
        .map(|(steady, p)| conv.l3_bps(steady) * p / t);
    row.push(worst.map_or("-".into(), |w| format!("{w:.2}")));
    row.push(match (r.retransmits, r.lost_percent()) {
        (Some(n), _) => n.to_string(),
        (None, Some(p)) => format!("{p:.1}%"),
        _ => "-".into(),
    });
    row.push(m.jain.map_or("-".into(), |j| format!("{j:.3}")));
    row
}

/// Throughput with podshaper attached but not limiting, against no program at all, and the
/// kernel's ns per program run. Stats are on only in a separate run: timing costs too.
fn overhead(pair: &NetnsPair, dp: &mut TempDatapath, args: &Args, secs: u32) -> Result<Table> {
    let mut t = Table::new([
        "direction",
        "flows",
        "no program Gbit/s",
        "podshaper Gbit/s",
        "ratio",
        "no program CPU ms/GB",
        "podshaper CPU ms/GB",
        "CPU ratio",
        "programs' CPU share",
        "egress ns/run",
        "ingress ns/run",
        "sock_ops ns/run",
        "node sock_ops ns/run",
    ]);
    // The node-level program (on the node's cgroup, always attached) runs for the pod's
    // sockets and for the peer's, which is on the same node here: its cost counts too.
    let node = dp.node().path().to_path_buf();
    let programs = |cg: &Cgroup| -> Result<Vec<ProgStats>> {
        let mut all = bpf_stats::cgroup_programs(cg.path())?;
        all.extend(
            bpf_stats::cgroup_programs(&node)?
                .into_iter()
                .filter(|p| p.name == "ps_node_ops"),
        );
        Ok(all)
    };
    let flows: &[u32] = if args.quick { &[1] } else { &[1, 8] };
    for dir in [Dir::Egress, Dir::Ingress] {
        for &f in flows {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(t);
            }
            eprint!("[overhead] {} x{f} ... ", dir.name());
            let client = ClientOptions {
                traffic: Traffic::Tcp {
                    congestion: Some("cubic".into()),
                },
                flows: f,
                secs,
                reverse: dir == Dir::Ingress,
                // podshaper sets SO_MAX_PACING_RATE, which turns on TCP's internal pacing: the
                // baseline gets it too, so that only the programs differ.
                pacing: Some(BASELINE_PACING),
                ..ClientOptions::new(NetnsPair::B_V4.into())
            };
            let limits = Limits::from_bps(Some(HIGH_LIMIT), Some(HIGH_LIMIT))?;
            // Alternating runs, median of each: a shared machine drifts by tens of percent.
            let (mut base, mut shaped) = (Vec::new(), Vec::new());
            let peer = dp.pod("bench-peer")?;
            for _ in 0..OVERHEAD_RUNS {
                // The baseline is off the node: no program at all on its path.
                let cg = Cgroup::new("bench-base")?;
                base.push(costed(pair, &cg, None, &client, dir)?);
                let cg = dp.pod("bench-high")?;
                dp.set(&cg.dir()?, limits)?;
                let r = costed(pair, &cg, Some(&peer), &client, dir);
                dp.remove(cg.id())?;
                shaped.push(r?);
            }
            let median_of =
                |v: &[Cost], f: fn(&Cost) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
            let (base_bps, shaped_bps) = (median_of(&base, |c| c.bps), median_of(&shaped, |c| c.bps));
            let (base_cpu, shaped_cpu) = (
                median_of(&base, |c| c.ms_per_gb),
                median_of(&shaped, |c| c.ms_per_gb),
            );
            let (egress, ingress, sockops, node_ops, share) = {
                let cg = dp.pod("bench-stats")?;
                dp.set(&cg.dir()?, limits)?;
                let r = (|| -> Result<_> {
                    let _stats = bpf_stats::enable_stats()?;
                    let before = programs(&cg)?;
                    let busy = costed(pair, &cg, Some(&peer), &client, dir)?.busy;
                    let after = programs(&cg)?;
                    let per_run = |name: &str| ns_per_run(&before, &after, name);
                    // Time inside the programs over all busy CPU time of the run.
                    let in_programs: u64 = after
                        .iter()
                        .map(|a| {
                            let b = before.iter().find(|b| b.id == a.id).map_or(0, |b| b.run_time_ns);
                            a.run_time_ns.saturating_sub(b)
                        })
                        .sum();
                    let share = format!(
                        "{:.2} %",
                        100.0 * in_programs as f64 / busy.as_nanos().max(1) as f64
                    );
                    Ok((
                        per_run("ps_egress"),
                        per_run("ps_ingress"),
                        per_run("ps_sockops"),
                        per_run("ps_node_ops"),
                        share,
                    ))
                })();
                dp.remove(cg.id())?;
                r?
            };
            eprintln!(
                "{:.2} vs {:.2} Gbit/s, {base_cpu:.0} vs {shaped_cpu:.0} CPU ms/GB, programs {share}",
                base_bps / 1e9,
                shaped_bps / 1e9
            );
            t.push([
                dir.name().to_string(),
                f.to_string(),
                format!("{:.2}", base_bps / 1e9),
                format!("{:.2}", shaped_bps / 1e9),
                format!("{:.2}", shaped_bps / base_bps),
                format!("{base_cpu:.0}"),
                format!("{shaped_cpu:.0}"),
                format!("{:.2}", shaped_cpu / base_cpu),
                share,
                egress,
                ingress,
                sockops,
                node_ops,
            ]);
        }
    }
    Ok(t)
}

/// Throughput of one overhead run, the machine's busy CPU time during it and that time per GB
/// it moved.
struct Cost {
    bps: f64,
    busy: Duration,
    ms_per_gb: f64,
}

fn costed(
    pair: &NetnsPair,
    cg: &Cgroup,
    server: Option<&Cgroup>,
    client: &ClientOptions,
    dir: Dir,
) -> Result<Cost> {
    let before = cpu::busy()?;
    let report = measure(pair, cg, server, client, dir)?.report;
    let busy = cpu::busy()? - before;
    Ok(Cost {
        bps: report.received_bps,
        busy,
        ms_per_gb: busy.as_secs_f64() * 1e3 / (report.received_bytes.max(1) as f64 / 1e9),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

// `name` is the program's name as bpftool shows it.
fn ns_per_run(before: &[ProgStats], after: &[ProgStats], name: &str) -> String {
    let Some(a) = after.iter().find(|p| p.name == name) else {
        return "-".into();
    };
    let b = before.iter().find(|p| p.id == a.id).cloned().unwrap_or_default();
    a.ns_per_run_since(&b).map_or("-".into(), |ns| {
        format!("{ns:.0} ({} runs)", a.run_cnt - b.run_cnt)
    })
}

/// Where and when the bench ran.
struct RunInfo {
    command: String,
    revision: String,
    kernel: String,
    cpus: String,
    date: String,
}

impl RunInfo {
    fn collect() -> Result<Self> {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").context("read kernel release")?;
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let n = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_default();
        // The source tree this binary was built from, if it is a git checkout.
        let revision = std::process::Command::new("git")
            .args([
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "describe",
                "--always",
                "--dirty",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(Self {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            revision,
            kernel: format!("{} (uname -r)", kernel.trim()),
            cpus: format!("{n} x {model}"),
            date,
        })
    }

    fn lines(&self) -> Vec<String> {
        vec![
            format!("command: {}", self.command),
            format!("podshaper: git {}", self.revision),
            format!("kernel: {}", self.kernel),
            format!("CPUs: {}", self.cpus),
            format!("date: {}", self.date),
        ]
    }
}

/// How the numbers were made and what they count, one line each.
fn method(args: &Args, secs: u32) -> Vec<String> {
    let ecn = if args.ecn {
        "; ECN asked for by A (net.ipv4.tcp_ecn=1) and accepted by B"
    } else {
        "; no ECN (Linux's default: accepted, never asked for)"
    };
    vec![
        format!(
            "lab: namespaces A (the pod) and B (its peer, the node side) joined by a veth pair, MTU 1500, \
             IPv4; per case a fresh cgroup, iperf3 -c in A inside it against a one-off iperf3 -s in B; \
             {secs} s per case, 100 ms report intervals{ecn}"
        ),
        "podshaper: the podshaper-ebpf datapath (private pins, its node-level program on a cgroup \
         subtree standing for the node), egress and ingress limit = target on the case's cgroup in \
         that subtree"
            .into(),
        "sender (ingress): \"this node\" = iperf3 -s in a cgroup of the pod's node; \"other node\" = in \
         a cgroup of a second node (a second datapath on a subtree of its own: its node-level \
         program never sees the pod's sockets, the rate option alone joins them); \"other node, via \
         Service\" = the other way round: iperf3 -s in the pod, iperf3 -c in the second node's \
         cgroup uploading to a Service address DNAT'ed to the pod in B (iptables nat OUTPUT, as \
         kube-proxy does), its columns from the client's report; \"no podshaper\" \
         = in a cgroup outside both nodes (only the receiver's policer acts); \"two nodes\" = half \
         the flows from each of two other nodes (two iperf3 pairs on two ports), rates summed, Jain's \
         index of the two senders' steady rates in the last column"
            .into(),
        format!(
            "tbf-cni: the bandwidth CNI plugin run as a container runtime runs it (host veth in B, pod \
             interface in A), ingressRate = egressRate = target, burst {} bits (containerd passes 2^32-1); \
             TBF counts L2 bytes and its bucket starts full",
            args.tbf_burst
        ),
        "achieved: L3 bytes/s at the receiver over the whole test (IP header + payload of every \
         segment, from goodput: TCP x1500/1448, UDP x1428/1400); goodput: payload only; steady: \
         mean L3 rate after the first second; worst100ms: steady x the highest 100 ms rate over the \
         mean rate of the receiving namespace's IP counter (IpExt InOctets, sampled every 100 ms \
         from a thread in that namespace) after the first second: it sees bursts as they arrive, \
         not as iperf3 reads them; for podshaper ingress it also counts what the policer then drops"
            .into(),
        "egress = the pod sends, ingress = the pod receives (iperf3 -R); UDP: 1400-byte datagrams \
         offered at 2x target in total, the last column is the share of sent bytes that never arrived"
            .into(),
        "anchor: the overhead table's \"no program\" column is the unshaped throughput of the same lab \
         in the same run"
            .into(),
    ]
}

/// The whole of docs/benchmarks.md: `make bench` regenerates it.
/// The peer-rule tables of a run, where it measured them.
struct PeerTables<'a> {
    results: Option<&'a Table>,
    costs: Option<&'a Table>,
}

fn markdown(
    info: &RunInfo,
    method: &[String],
    results: &Table,
    peers: &PeerTables,
    overhead: Option<&Table>,
) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "<!-- Written by podshaper-bench --markdown: regenerate with `make bench` as root, do not edit. -->\n"
    )?;
    writeln!(
        md,
        "podshaper against TBF as Kubernetes sets it up (the bandwidth CNI plugin with containerd's \
         burst), each holding one pod to a limit, on the same machine in the same run. The bench is \
         `podshaper-testbed/src/bin/podshaper-bench/`; `make bench` (as root) runs the full matrix \
         (about 20 minutes), `BENCH_ARGS=--quick` a small one.\n"
    )?;
    writeln!(md, "## Run\n")?;
    for line in info.lines() {
        writeln!(md, "- {line}")?;
    }
    writeln!(md, "\n## Method\n")?;
    for line in method {
        writeln!(md, "- {line}")?;
    }
    writeln!(md, "\n## Reading the tables\n")?;
    writeln!(
        md,
        "- A limit holds when achieved/target and worst100ms/target are close to 1. Below 1 the pod \
         gets less than it is allowed; above 1 the limit leaks. worst100ms comes from the \
         receiving namespace's IP counter, not from iperf3's intervals: iperf3 reads up to 128 KB at \
         a time, 100 ms of traffic at 10M, so its intervals at low rates show reads, not arrivals.\n\
         - tbf-cni's achieved/target is far above 1 at low rates because containerd's burst gives the \
         TBF a 512 MiB bucket (193 MB at 10M, where the plugin's arithmetic wraps), and a new bucket \
         starts full: the first few hundred megabytes pass at line rate. steady/target shows the \
         shaped rate once the bucket is empty; UDP at 2x target drains it by only 1x target, too \
         slowly to empty it within a case below 1G, so it passes unshaped. The same burst sizes \
         TBF's queue (rate x 25 ms + burst), so at low rates packets wait for seconds: at 10M with 32 flows iperf3's final \
         exchange waits behind tens of seconds of queued data.\n\
         - podshaper holds no queue: TCP is paced, other traffic is policed, so UDP's loss is the \
         share offered above the limit. See [how it works](how-it-works.md).\n"
    )?;
    writeln!(md, "## Results\n")?;
    writeln!(md, "{}", results.to_markdown())?;
    if let Some(t) = peers.results {
        writeln!(md, "## Peer rules\n")?;
        writeln!(
            md,
            "Limits between pods ([policy.md](policy.md)), podshaper only (TBF cannot tell one peer \
             from another). Per peer: a rule at the target covers B's second address; the pod runs \
             the case's flows to it and one flow to B's first address at the same time, which no \
             rule names. steady/target and retransmits are the capped flows'; the unlimited \
             peer's column is the other flow's steady rate, which should stay far above the \
             target. Shared, 2 pods: one shared rule at the target over two pods, each running \
             the case's flows to the rule's peer; steady/target is their sum, retransmits both \
             pods', Jain's index their two steady rates. Ingress rows: B sends (iperf3 -R) from \
             a cgroup on the pod's node, or on a second node whose only link to the pod's is the \
             rate option. Targets as for the per-pod rows: steady/target in [0.97, 1.01] egress, \
             [0.95, 1.02] ingress, retransmits at most 20.\n"
        )?;
        writeln!(md, "{}", t.to_markdown())?;
    }
    if let Some(t) = peers.costs {
        writeln!(md, "## Peer lookup cost\n")?;
        writeln!(
            md,
            "The kernel's bpf_stats (run_time_ns / run_cnt) of the pod's cgroup programs for one \
             TCP flow to a rule's peer each way, with that many /32 blocks in each of an egress \
             and an ingress rule bound to the pod (the peer among them, the rest in \
             198.19.0.0/16), rates far above what the lab carries so that nothing is shaped; 0 = \
             no rule, the pod's own limit at the same high rate. A run counts every packet the \
             program sees: data (GSO batches, so one run is many segments) and ACKs.\n"
        )?;
        writeln!(md, "{}", t.to_markdown())?;
    }
    if let Some(t) = overhead {
        writeln!(md, "## Overhead\n")?;
        writeln!(
            md,
            "TCP cubic between the namespaces with podshaper attached and limiting at {} both ways \
             (nothing is shaped) against the same cgroup without programs, median of \
             {OVERHEAD_RUNS} alternating runs each. Both sides pace at {} (iperf3 --fq-rate): \
             podshaper's SO_MAX_PACING_RATE turns on TCP's internal pacing, so the baseline has \
             it too and only the programs differ. Throughput on this small VM swings by tens of \
             percent between runs, so the cost is also given as the machine's busy CPU time \
             (/proc/stat: user, system, irq, softirq of all CPUs) per GB received: the CPU ratio \
             is what podshaper adds per byte. ns/run is the kernel's bpf_stats (run_time_ns / \
             run_cnt) of each program (peer sock_ops: the node-level program on the cgroup v2 \
             root, which runs for the same sockets while an ingress limit exists), and the \
             programs' CPU share their summed run time over the busy CPU time of the same run; \
             both come from a separate run because timing every run costs too.\n",
            human_bps(HIGH_LIMIT as f64),
            human_bps(BASELINE_PACING as f64)
        )?;
        writeln!(md, "{}", t.to_markdown())?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_sizes() {
        let quick = Args::parse_from(["podshaper-bench", "--quick"]);
        // 2 directions x (2 cc x 2 flow counts + 1 UDP) x 2 shapers, and podshaper's ingress
        // TCP again from another node, through a Service and from one without podshaper (2 cc
        // x 2 flows x 3). Two sender nodes at 8 flows: 2 more.
        assert_eq!(matrix(&quick).len(), 34);
        let full = Args::parse_from(["podshaper-bench"]);
        // 2 shapers x 2 directions x (4 targets x 2 cc x 3 flows + 3 targets x 3 flows), and
        // the three other senders of podshaper's ingress TCP up to 1G (3 targets x 2 cc x 3 x
        // 3). Two sender nodes at 8 and 32 flows up to 1G: 3 targets x 2 cc x 2.
        assert_eq!(matrix(&full).len(), 198);
        assert_eq!(
            matrix(&full)
                .iter()
                .filter(|c| c.sender == Sender::OtherNode)
                .count(),
            18
        );
        let one = Args::parse_from(["podshaper-bench", "--shaper", "tbf-cni"]);
        assert!(matrix(&one).iter().all(|c| c.shaper == Shaper::TbfCni));
        let some = Args::parse_from(["podshaper-bench", "--filter", "ingress udp - x32"]);
        // Both shapers at 10M, 100M and 1G.
        assert_eq!(matrix(&some).len(), 6);
        // Any of several patterns: podshaper's three senders and TBF's one, at 1G.
        let several = Args::parse_from([
            "podshaper-bench",
            "--filter",
            "ingress tcp cubic x8 1G,ingress from-other-node tcp cubic x8 1G,from-no-podshaper tcp cubic x8 1G",
        ]);
        assert_eq!(matrix(&several).len(), 4);
    }
}
