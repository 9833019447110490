//! `make bench-k8s`: the agent against a real control plane (see podshaper-testbed's k8s
//! module). Prints how long an annotation change takes to be enforced (p50/p99 over many
//! changes), the agent's memory and CPU with a full node of limited pods, and how long a
//! restarted agent takes to reconcile them. Needs root.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use podshaper_api::Limits;
use podshaper_testbed::{
    k8s::{AgentProcess, CgroupDriver, Cluster, QosClass, RunningPod},
    report::{as_root, percentile, Section},
    Table,
};

const NS: &str = "bench";
const NODE: &str = "bench-node";
const EGRESS: &str = "kubernetes.io/egress-bandwidth";
const M: u64 = 1_000_000;
/// Where in docs/benchmarks.md this bench's section starts; `make bench` keeps what follows.
const MARKER: &str = "<!-- bench-k8s -->";

#[derive(Parser, Debug)]
#[command(about = "Benchmark the podshaper agent against a real kube-apiserver (root)")]
struct Args {
    /// The podshaper binary to run as the agent.
    #[arg(long, default_value = "target/release/podshaper")]
    agent: PathBuf,
    /// Annotation changes to time.
    #[arg(long, default_value_t = 60)]
    changes: u32,
    /// Pods on the node (the kubelet's default maximum is 110).
    #[arg(long, default_value_t = 110)]
    pods: u32,
    /// Seconds over which the agent's CPU use is measured with all pods limited.
    #[arg(long, default_value_t = 30)]
    cpu_secs: u64,
    /// Write the results into this Markdown file, replacing its bench-k8s section.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    as_root(
        "the agent loads BPF programs and the bench makes cgroups",
        run(&args),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("parse /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

async fn run(args: &Args) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifests = std::fs::read_to_string(repo.join("deploy/manifests/podshaper.yaml"))?;
    let agent_bin =
        std::fs::canonicalize(&args.agent).with_context(|| format!("{}", args.agent.display()))?;
    eprintln!("starting etcd and kube-apiserver");
    let cluster = Cluster::start(&manifests, NS).await?;
    let kubelet = cluster.kubelet(NODE, CgroupDriver::Systemd, "")?;
    let mut agent = AgentProcess::start(&agent_bin, NODE, &cluster.agent_kubeconfig, None, &[], &[])?;
    let mut pods: Vec<RunningPod> = Vec::new();
    let result = measure(args, &cluster, &kubelet, &mut agent, &mut pods).await;
    for pod in pods {
        let _ = kubelet.delete_pod(pod).await;
    }
    let (table, lines) = result?;
    println!("{}", table.to_text());
    if let Some(path) = &args.markdown {
        SECTION.write(path, &table, &lines)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn measure(
    args: &Args,
    cluster: &Cluster,
    kubelet: &podshaper_testbed::k8s::Kubelet,
    agent: &mut AgentProcess,
    pods: &mut Vec<RunningPod>,
) -> Result<(Table, Vec<String>)> {
    let mut table = Table::new(["measure", "value", "target"]);
    // 1. Annotation change -> enforced, on one pod, one change at a time.
    pods.push(
        kubelet
            .run_pod(NS, "probe", QosClass::Burstable, &[(EGRESS, "10M")], "198.18.9.1")
            .await?,
    );
    agent.wait_limits(
        NS,
        "probe",
        Some(Limits::from_bps(Some(10 * M), None)?),
        Duration::from_secs(10),
    )?;
    let mut took = Vec::new();
    for i in 0..args.changes {
        let rate = u64::from(11 + i % 80);
        let t0 = Instant::now();
        kubelet
            .annotate(NS, "probe", &[(EGRESS, Some(&format!("{rate}M")))])
            .await?;
        agent.wait_limits(
            NS,
            "probe",
            Some(Limits::from_bps(Some(rate * M), None)?),
            Duration::from_secs(10),
        )?;
        took.push(t0.elapsed());
    }
    took.sort();
    table.push([
        "annotation change -> enforced, p50".into(),
        ms(percentile(&took, 0.5)),
        String::new(),
    ]);
    table.push([
        "annotation change -> enforced, p99".into(),
        ms(percentile(&took, 0.99)),
        "< 1 s".into(),
    ]);
    table.push([
        "annotation change -> enforced, max".into(),
        ms(*took.last().context("no changes")?),
        String::new(),
    ]);

    // 2. A full node.
    for i in 1..args.pods {
        let qos = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort][i as usize % 3];
        let rate = format!("{}M", 1 + i);
        pods.push(
            kubelet
                .run_pod(NS, &format!("p{i}"), qos, &[(EGRESS, &rate)], "198.18.9.2")
                .await?,
        );
    }
    let all_limited = |agent: &AgentProcess| -> Result<bool> {
        let named = agent
            .status()?
            .iter()
            .filter(|c| c.name.is_some() && c.egress.limit.is_some())
            .count();
        Ok(named == args.pods as usize)
    };
    let t0 = Instant::now();
    while !all_limited(agent)? {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("not all {} pods limited after 60 s", args.pods);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = agent.pid().context("agent not running")?;
    let cpu0 = cpu_time(pid)?;
    let wall0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.cpu_secs)).await;
    let cpu = (cpu_time(pid)? - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
    let (rss, hwm) = memory(pid)?;
    let pods_label = format!("{} limited pods", args.pods);
    table.push([
        format!("agent RSS, {pods_label}"),
        format!("{:.1} MiB", rss as f64 / 1024.0),
        "<= 30 MiB".into(),
    ]);
    table.push([
        format!("agent peak RSS (VmHWM), {pods_label}"),
        format!("{:.1} MiB", hwm as f64 / 1024.0),
        String::new(),
    ]);
    table.push([
        format!("agent CPU, {pods_label}, idle, {} s", args.cpu_secs),
        format!("{:.2} % of a core", cpu * 100.0),
        String::new(),
    ]);

    // 3. Restart: time to ready, and until every pod is named (reconciled) again. Limits
    // stay in force all along (pinned); this is how long the agent is blind to changes.
    agent.kill();
    let t0 = Instant::now();
    let ready = agent.restart()?;
    while !all_limited(agent)? {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("not all pods reconciled 60 s after the restart");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let reconciled = t0.elapsed();
    table.push([
        format!("restart -> /readyz, {pods_label}"),
        ms(ready),
        String::new(),
    ]);
    table.push([
        format!("restart -> all {pods_label} reconciled"),
        ms(reconciled),
        String::new(),
    ]);
    let (rss, _) = memory(agent.pid().context("agent not running")?)?;
    table.push([
        format!("agent RSS after restart, {pods_label}"),
        format!("{:.1} MiB", rss as f64 / 1024.0),
        "<= 30 MiB".into(),
    ]);
    let _ = cluster;
    let lines = vec![
        format!("changes timed: {} on one pod, from the PATCH to the new limit in the datapath (read through the agent's socket every 2 ms)", took.len()),
        "the agent is `podshaper agent` as the chart runs it, with the chart's ServiceAccount and RBAC; kube-apiserver v1.34.4 and etcd on loopback; no kubelet (the harness plays it)".into(),
    ];
    Ok((table, lines))
}

const SECTION: Section = Section {
    marker: MARKER,
    heading: "Kubernetes agent",
    target: "make bench-k8s",
    writer: "podshaper-bench-k8s",
};
