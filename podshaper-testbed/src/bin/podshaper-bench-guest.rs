//! `make bench-guest`: podshaper beside an EDT + fq shaper of the kind Cilium's bandwidth
//! manager runs (bpf/edt.bpf.c on tc egress, fq as the root qdisc), on the same qemu guest,
//! because this host has no sch_fq and the guest kernels have it as a module. Egress TCP from a
//! "pod" namespace to its peer over veth, at 10M and 100M: goodput after the first second as L3
//! over the target, and retransmits. Guests run under software emulation here, so the figures
//! compare the two shapers with each other; they are not absolute.
//!
//! A second table has the guest's pod receiving (ingress, iperf3 -R) from the host, a second
//! kernel with a TCP stack of its own, over the guest's NIC: the host's sender paced by its own
//! podshaper node-level program (a datapath on a cgroup subtree of its own) at the rate option
//! the guest writes, the same sender on no podshaper node (only the guest's policer acts), and
//! TBF on the host's end of the link with no podshaper limit (where the bandwidth plugin puts
//! ingress TBF: the node side of the pod's link). Needs root.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use podshaper_testbed::{
    guest::{host_program, Guest, GuestNode, Kernel, TAP},
    Cgroup, ClientOptions, IperfReport, IperfServer, NetnsPair, ServerOptions, Table, TempDatapath, Traffic,
    L3,
};

static EDT_OBJ: &str = concat!(env!("OUT_DIR"), "/edt.bpf.o");
/// The host's binaries first, busybox's applets after.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How far ahead the EDT shaper schedules a packet before it drops it: Cilium's default.
const HORIZON_NS: u64 = 2_000_000_000;
const M: u64 = 1_000_000;
/// Where the EDT program and its map are pinned: a bpffs of its own under /run, because
/// `ip netns exec` mounts a fresh /sys (and so hides /sys/fs/bpf) for the tc it runs.
const PINS: &str = "/run/edt-bpf";

#[derive(Parser, Debug)]
#[command(about = "Compare podshaper with an EDT + fq shaper inside a qemu guest (root)")]
struct Args {
    /// Only the kernels of these series (e.g. 6.12); all of the lab by default.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Seconds per case.
    #[arg(long, default_value_t = 8)]
    secs: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        podshaper_testbed::root_or_skip("boots guests and loads BPF in them"),
        "make bench-guest needs root"
    );
    let podshaper = build_podshaper()?;
    let mut table = Table::new(["kernel", "shaper", "limit", "achieved / limit", "retransmits"]);
    let mut ingress = Table::new([
        "kernel (receiver)",
        "sender (host, 6.18)",
        "limit",
        "steady / limit",
        "retransmits",
    ]);
    // The host as a node: its node-level program paces the sockets of cgroups below it.
    let host = TempDatapath::load("bench-guest-host").context("load the host's datapath")?;
    for k in Kernel::all()? {
        if !args.kernels.is_empty() && !args.kernels.contains(&k.series) {
            continue;
        }
        eprintln!("bench-guest: {} ...", k.release);
        let files = [
            podshaper.clone(),
            PathBuf::from(EDT_OBJ),
            host_program("ip")?,
            host_program("tc")?,
            host_program("bpftool")?,
            host_program("iperf3")?,
        ];
        let mut node = Guest::new(k.clone(), Duration::from_secs(180))
            .with_files(files)
            // fq, clsact (sch_ingress) and the bpf classifier are modules of the cloud kernels.
            .with_modules(&["veth", "sch_fq", "sch_ingress", "cls_bpf"])
            .with_network()
            .boot()?;
        let o = node.run(&setup(&podshaper)?, Duration::from_secs(60))?;
        ensure!(o.status == 0, "set up the guest's pod: {}", o.output);
        for rate in [10 * M, 100 * M] {
            for shaper in ["podshaper", "EDT + fq"] {
                let job = if shaper == "podshaper" {
                    podshaper_case(&podshaper, rate, args.secs)?
                } else {
                    edt_case(rate, args.secs)?
                };
                let r = run_case(&mut node, &job, args.secs)?;
                let achieved = L3::TCP_V4.l3_bps(r.mean_after_bps(1.0).context("no intervals")?);
                table.push([
                    format!("Linux {}", k.release),
                    shaper.to_string(),
                    format!("{}M", rate / M),
                    format!("{:.3}", achieved / rate as f64),
                    r.retransmits.map_or("-".into(), |n| n.to_string()),
                ]);
            }
        }
        for rate in [10 * M, 100 * M] {
            for sender in Sender::ALL {
                let r = ingress_case(&mut node, &host, &podshaper, sender, rate, args.secs)?;
                let steady = L3::TCP_V4.l3_bps(r.mean_after_bps(1.0).context("no intervals")?);
                ingress.push([
                    format!("Linux {}", k.release),
                    sender.name().to_string(),
                    format!("{}M", rate / M),
                    format!("{:.3}", steady / rate as f64),
                    r.retransmits.map_or("-".into(), |n| n.to_string()),
                ]);
            }
        }
        node.shutdown()?;
    }
    println!("{}", table.to_text());
    println!(
        "Ingress: the guest's pod downloads from the host (cubic, one flow, {} s)\n",
        args.secs
    );
    println!("{}", ingress.to_text());
    Ok(())
}

/// Who sends to the guest's pod, and what limits it.
#[derive(Clone, Copy)]
enum Sender {
    /// A cgroup of the host's podshaper node: paced at the guest's rate option.
    Paced,
    /// A cgroup of no node: only the guest's policer acts.
    NoPodshaper,
    /// No podshaper limit in the guest; TBF at the root of the host's end of the link.
    Tbf,
}

impl Sender {
    const ALL: [Sender; 3] = [Sender::Paced, Sender::NoPodshaper, Sender::Tbf];

    fn name(self) -> &'static str {
        match self {
            Sender::Paced => "podshaper node (option)",
            Sender::NoPodshaper => "no podshaper (policer)",
            Sender::Tbf => "TBF on the host's end",
        }
    }
}

/// One ingress case: the host's iperf3 server in the sender's cgroup, in the namespace of the
/// host's end of the guest's link; the guest's pod (a cgroup of the guest's root namespace)
/// downloads from it.
fn ingress_case(
    node: &mut GuestNode,
    host: &TempDatapath,
    podshaper: &std::path::Path,
    sender: Sender,
    rate: u64,
    secs: u32,
) -> Result<IperfReport> {
    let ns = node.netns().context("the guest has no network")?;
    let cgroup = match sender {
        Sender::Paced => host.pod("guest-sender")?,
        Sender::NoPodshaper | Sender::Tbf => Cgroup::new("guest-sender")?,
    };
    let _server = IperfServer::start(ns, Some(&cgroup), &ServerOptions::default())?;
    let client = client_to(GuestNode::HOST_V4, secs, true);
    let ps = podshaper.display();
    let limit = match sender {
        Sender::Tbf => String::new(),
        _ => format!("{ps} limit --cgroup /sys/fs/cgroup/pod --ingress {rate} >/dev/null || exit 1\n"),
    };
    let job = format!(
        "export PATH={PATH} PODSHAPER_SOCKET=/run/ps.sock\n\
         {limit}\
         sh -c 'echo $$ > /sys/fs/cgroup/pod/cgroup.procs; exec iperf3 {client}' > /tmp/r.json\n\
         rc=$?\n\
         {ps} unlimit --cgroup /sys/fs/cgroup/pod >/dev/null 2>&1\n\
         cat /tmp/r.json\nexit $rc\n"
    );
    if let Sender::Tbf = sender {
        // 10 ms of the rate as the bucket (at least two full packets), 25 ms of queue.
        let burst = (rate / 8 / 100).max(3028);
        ns.run(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                TAP,
                "root",
                "tbf",
                "rate",
                &rate.to_string(),
                "burst",
                &burst.to_string(),
                "latency",
                "25ms",
            ],
        )?;
    }
    let r = run_case(node, &job, secs);
    if let Sender::Tbf = sender {
        let ns = node.netns().context("the guest has no network")?;
        ns.run("tc", &["qdisc", "del", "dev", TAP, "root"])?;
    }
    r
}

/// The pod's two namespaces (as the lab's, same addresses), the iperf3 server in B, the
/// pod's cgroup and the daemon.
fn setup(podshaper: &std::path::Path) -> Result<String> {
    let ip = host_program("ip")?;
    let (ip, ps) = (ip.display(), podshaper.display());
    let (a, b) = (NetnsPair::A_V4, NetnsPair::B_V4);
    let server = ServerOptions::default();
    Ok(format!(
        "export PATH={PATH}\n\
         {ip} netns add pa && {ip} netns add pb\n\
         {ip} link add va netns pa type veth peer name vb netns pb\n\
         {ip} -n pa addr add {a}/24 dev va && {ip} -n pb addr add {b}/24 dev vb\n\
         for n in pa pb; do {ip} -n $n link set lo up; done\n\
         {ip} -n pa link set va up && {ip} -n pb link set vb up\n\
         {ip} netns exec pb iperf3 -s -D -J -i {} -p {}\n\
         mkdir /sys/fs/cgroup/pod\n\
         PODSHAPER_SOCKET=/run/ps.sock {ps} daemon >/tmp/daemon.log 2>&1 &\n\
         for i in $(seq 50); do [ -S /run/ps.sock ] && break; sleep 0.2; done\n\
         [ -S /run/ps.sock ] || {{ cat /tmp/daemon.log; exit 1; }}\n",
        server.interval, server.port
    ))
}

/// The client as the lab runs it (cubic, one flow), from namespace A.
fn client(secs: u32) -> String {
    client_to(NetnsPair::B_V4, secs, false)
}

/// iperf3's arguments for one cubic flow to `server` for `secs` (`reverse`: it sends to us).
fn client_to(server: std::net::Ipv4Addr, secs: u32, reverse: bool) -> String {
    ClientOptions {
        traffic: Traffic::Tcp {
            congestion: Some("cubic".into()),
        },
        secs,
        reverse,
        ..ClientOptions::new(server.into())
    }
    .args()
    .iter()
    .map(|a| a.to_string_lossy().into_owned())
    .collect::<Vec<_>>()
    .join(" ")
}

/// Limits the pod's cgroup, runs the client in it, lifts the limit.
fn podshaper_case(podshaper: &std::path::Path, rate: u64, secs: u32) -> Result<String> {
    let ip = host_program("ip")?;
    let (ip, ps) = (ip.display(), podshaper.display());
    Ok(format!(
        "export PATH={PATH} PODSHAPER_SOCKET=/run/ps.sock\n\
         {ps} limit --cgroup /sys/fs/cgroup/pod --egress {rate} >/dev/null || exit 1\n\
         sh -c 'echo $$ > /sys/fs/cgroup/pod/cgroup.procs; exec {ip} netns exec pa iperf3 {}' > /tmp/r.json\n\
         rc=$?\n\
         {ps} unlimit --cgroup /sys/fs/cgroup/pod >/dev/null\n\
         cat /tmp/r.json\nexit $rc\n",
        client(secs)
    ))
}

/// Loads the EDT program, puts fq and it on the pod's veth, sets the rate, runs the client
/// (in no limited cgroup), takes all of it off again.
fn edt_case(rate: u64, secs: u32) -> Result<String> {
    let (ip, tc, bpftool) = (host_program("ip")?, host_program("tc")?, host_program("bpftool")?);
    let (ip, tc, bpftool) = (ip.display(), tc.display(), bpftool.display());
    // struct edt { bytes_per_sec, horizon_ns, t_last, drops }, little-endian u64s.
    let value: Vec<String> = [rate / 8, HORIZON_NS, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!(
        "export PATH={PATH}\n\
         mkdir -p {PINS} && {{ grep -q ' {PINS} ' /proc/mounts || mount -t bpf bpf {PINS}; }}\n\
         rm -rf {PINS}/edt {PINS}/edt_maps\n\
         {bpftool} prog load {EDT_OBJ} {PINS}/edt type classifier pinmaps {PINS}/edt_maps || exit 1\n\
         {bpftool} map update pinned {PINS}/edt_maps/edt_state key hex 00 00 00 00 value hex {} || exit 1\n\
         {ip} netns exec pa {tc} qdisc replace dev va root fq || exit 1\n\
         {ip} netns exec pa {tc} qdisc add dev va clsact || exit 1\n\
         {ip} netns exec pa {tc} filter add dev va egress bpf da pinned {PINS}/edt || exit 1\n\
         {ip} netns exec pa iperf3 {} > /tmp/r.json\n\
         rc=$?\n\
         {ip} netns exec pa {tc} qdisc del dev va clsact\n\
         {ip} netns exec pa {tc} qdisc del dev va root\n\
         rm -rf {PINS}/edt {PINS}/edt_maps\n\
         cat /tmp/r.json\nexit $rc\n",
        value.join(" "),
        client(secs)
    ))
}

fn run_case(node: &mut GuestNode, job: &str, secs: u32) -> Result<IperfReport> {
    let o = node.run(job, Duration::from_secs(u64::from(secs) + 60))?;
    ensure!(o.status == 0, "case failed: {}", o.output);
    let json = &o.output[o.output.find('{').context("no iperf3 JSON")?..];
    Ok(IperfReport::parse(json)?)
}

/// Builds the podshaper binary (the dev profile: what is measured is its BPF programs).
fn build_podshaper() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(&cargo)
        .args(["build", "--locked", "-p", "podshaper", "--bin", "podshaper"])
        .current_dir(&workspace)
        .status()
        .context("run cargo")?;
    ensure!(status.success(), "cargo build -p podshaper failed");
    Ok(workspace.join("target/debug/podshaper").canonicalize()?)
}
