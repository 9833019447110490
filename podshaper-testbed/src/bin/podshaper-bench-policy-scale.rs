//! `make bench-policy-scale`: BandwidthPolicies at the size this machine allows, against a real
//! control plane. Makes `--pods` pod objects over `--nodes` nodes (one of them this machine's,
//! with real cgroups and a real agent), `--policies` policies whose peers are pods by selector
//! across namespaces, and the controller; then measures what the issue asks: the controller's
//! and the agent's memory, the time from a policy or a peer's label change to enforcement on
//! the node, and what the agent and the controller read and write during label churn. Needs
//! root.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use podshaper_agent::policy::{BandwidthPeerSet, BandwidthPolicy, BandwidthPolicySpec};
use podshaper_testbed::{
    k8s::{AgentProcess, CgroupDriver, Cluster, ControllerProcess, RunningPod},
    report::{as_root, percentile, Section},
    Table,
};

/// Where in the Markdown file this bench's section starts; what is before it is kept.
const MARKER: &str = "<!-- bench-policy-scale -->";
/// This machine's node: its pods get cgroups and its agent runs.
const NODE: &str = "node-000";
const NAMESPACES: u32 = 10;
const APPS: u32 = 50;
/// Requests in flight while filling the apiserver.
const IN_FLIGHT: usize = 64;

#[derive(Parser, Debug)]
#[command(about = "BandwidthPolicies at scale against a real kube-apiserver (root)")]
struct Args {
    /// The podshaper binary (agent and controller).
    #[arg(long, default_value = "target/release/podshaper")]
    podshaper: PathBuf,
    /// Pod objects in the cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: u32,
    /// Nodes they are spread over (one is this machine's).
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Policies, each selecting one app in one namespace, its peers the next app everywhere.
    #[arg(long, default_value_t = 20)]
    policies: u32,
    /// Peer label changes timed one at a time.
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Label changes of the churn phase (all at once, as fast as the API takes them).
    #[arg(long, default_value_t = 1_000)]
    churn: u32,
    /// Write the results into this Markdown file, replacing what follows its marker.
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

/// Pod `i`: its namespace, app and node. Apps and namespaces change every 100 pods and nodes
/// every pod, so each node runs pods of every app.
fn layout(i: u32, nodes: u32) -> (String, u32, String) {
    let block = i / 100;
    (
        format!("ns-{}", block % NAMESPACES),
        block % APPS,
        format!("node-{:03}", i % nodes),
    )
}

/// An address in 198.18.0.0/15 for pod `i`.
fn address(i: u32) -> String {
    let n = 256 + i;
    format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 255, n & 255)
}

/// (VmRSS) of a process, in KiB.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// Bytes a process received and sent on its open TCP connections (to the apiserver: TLS,
/// HTTP/2 framing and all), as `ss -tinp` counts them per socket.
fn socket_bytes(pid: u32) -> Result<(u64, u64)> {
    let out = std::process::Command::new("ss").args(["-tinpH"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let owner = format!("pid={pid},");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or(0)
    };
    let (mut rx, mut tx) = (0, 0);
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if !line.contains(&owner) {
            continue;
        }
        if let Some(info) = lines.next() {
            rx += field(info, "bytes_received:");
            tx += field(info, "bytes_sent:");
        }
    }
    Ok((rx, tx))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn run(args: &Args) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifests = std::fs::read_to_string(repo.join("deploy/manifests/podshaper.yaml"))?;
    let bin =
        std::fs::canonicalize(&args.podshaper).with_context(|| format!("{}", args.podshaper.display()))?;
    eprintln!("starting etcd and kube-apiserver");
    let cluster = Cluster::start(&manifests, "ns-0").await?;
    for n in 1..NAMESPACES {
        cluster.cp.namespace(&format!("ns-{n}")).await?;
    }
    let kubelet = cluster.kubelet(NODE, CgroupDriver::Systemd, "")?;
    let mut local: Vec<RunningPod> = Vec::new();
    let result = measure(args, &cluster, &kubelet, &bin, &mut local).await;
    for pod in local {
        let _ = kubelet.delete_pod(pod).await;
    }
    let (table, lines) = result?;
    println!("{}", table.to_text());
    for l in &lines {
        println!("- {l}");
    }
    if let Some(path) = &args.markdown {
        SECTION.write(path, &table, &lines)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Creates pod `i` on another node: the object and its Running status, no cgroup.
async fn remote_pod(client: &Client, i: u32, nodes: u32) -> Result<()> {
    let (ns, app, node) = layout(i, nodes);
    let name = format!("p-{i}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": format!("app-{app}")}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let ip = address(i);
    let status = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Merge-patches the remote pods `which` with `patch`, IN_FLIGHT at a time.
async fn patch_pods(admin: &Client, which: &[u32], nodes: u32, patch: &serde_json::Value) -> Result<()> {
    stream::iter(which.iter().copied())
        .map(|i| {
            let admin = admin.clone();
            async move {
                let (ns, _, _) = layout(i, nodes);
                Api::<Pod>::namespaced(admin, &ns)
                    .patch(&format!("p-{i}"), &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The rules of the agent's node: name -> peer-table entries.
fn rules(agent: &AgentProcess) -> Result<BTreeMap<String, usize>> {
    Ok(agent.rules()?.into_iter().map(|r| (r.name, r.prefixes)).collect())
}

async fn measure(
    args: &Args,
    cluster: &Cluster,
    kubelet: &podshaper_testbed::k8s::Kubelet,
    bin: &Path,
    local: &mut Vec<RunningPod>,
) -> Result<(Table, Vec<String>)> {
    let mut table = Table::new(["measure", "value"]);
    let admin = cluster.admin.clone();
    let agent = AgentProcess::start(bin, NODE, &cluster.agent_kubeconfig, None, &[], &[])?;
    let mut controller = ControllerProcess::start(bin, &cluster.controller_kubeconfig, "controller-0")?;
    controller.wait_leader(&admin, Duration::from_secs(30)).await?;
    let controller_pid = controller.pid().context("controller not running")?;
    let agent_pid = agent.pid().context("agent not running")?;

    // 1. The pods.
    let start = Instant::now();
    for i in (0..args.pods).filter(|i| i % args.nodes == 0) {
        let (ns, app, _) = layout(i, args.nodes);
        let app = format!("app-{app}");
        local.push(
            kubelet
                .run_labeled_pod_at(&ns, &format!("p-{i}"), &[("app", &app)], &address(i))
                .await?,
        );
    }
    stream::iter((0..args.pods).filter(|i| i % args.nodes != 0))
        .map(|i| remote_pod(&admin, i, args.nodes))
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let filled = start.elapsed();
    eprintln!("{} pods in {filled:?}", args.pods);
    tokio::time::sleep(Duration::from_secs(3)).await;
    table.push([
        "pods in the cluster / on this node / nodes".to_string(),
        format!("{} / {} / {}", args.pods, local.len(), args.nodes),
    ]);

    // 2. The policies: each selects app-k in ns-(k mod 10), peers app-(k+1) in every namespace.
    // Policy k needs pods of app-k+1 as peers: apps change every 100 pods.
    let apps = (args.pods / 100).clamp(2, APPS);
    let policies = args.policies.min(apps - 1);
    let start = Instant::now();
    for k in 0..policies {
        let spec: BandwidthPolicySpec = serde_yaml_ng::from_str(&format!(
            "podSelector: {{matchLabels: {{app: app-{k}}}}}\n\
             egress: [{{rate: 20M, peers: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: app-{}}}}}}}]}}]\n",
            k + 1
        ))?;
        let policy = BandwidthPolicy::new(&format!("p{k}"), spec);
        Api::<BandwidthPolicy>::namespaced(admin.clone(), &format!("ns-{}", k % NAMESPACES))
            .create(&PostParams::default(), &policy)
            .await?;
    }
    // Each policy selects pods of its app in its namespace; this node runs such pods for
    // every policy.
    let expected: Vec<String> = (0..policies)
        .map(|k| format!("bwp:ns-{}/p{k}:egress0", k % NAMESPACES))
        .collect();
    loop {
        let on_node = rules(&agent)?;
        if expected.iter().all(|r| on_node.get(r).is_some_and(|n| *n > 0)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("not all policies enforced after 120 s: {on_node:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let enforced = start.elapsed();
    let on_node = rules(&agent)?;
    let peers = on_node.get(&expected[0]).copied().unwrap_or(0);
    table.push([
        format!("{policies} policies created -> all enforced on this node"),
        ms(enforced),
    ]);
    table.push(["peer addresses per policy".into(), peers.to_string()]);
    let sets: Api<BandwidthPeerSet> = Api::all(admin.clone());
    let set_bytes: usize = sets
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|s| serde_json::to_vec(s).map_or(0, |v| v.len()))
        .sum::<usize>()
        / policies.max(1) as usize;
    table.push([
        "BandwidthPeerSet size (JSON)".into(),
        format!("{set_bytes} bytes"),
    ]);
    table.push(["controller RSS".into(), mib(rss(controller_pid)?)]);
    table.push(["agent RSS".into(), mib(rss(agent_pid)?)]);

    // 3. A peer's label change -> enforced on this node, one at a time: a remote pod of app-1
    // (a peer of policy 0) leaves the app and comes back.
    let rule = &expected[0];
    let peer = (0..args.pods)
        .find(|i| i % args.nodes != 0 && layout(*i, args.nodes).1 == 1)
        .context("no remote app-1 pod")?;
    let (peer_ns, _, _) = layout(peer, args.nodes);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &peer_ns);
    let mut took = Vec::new();
    for c in 0..args.changes {
        let (app, want) = if c % 2 == 0 {
            ("other", peers - 1)
        } else {
            ("app-1", peers)
        };
        let patch = serde_json::json!({"metadata": {"labels": {"app": app}}});
        let start = Instant::now();
        pods.patch(
            &format!("p-{peer}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        while rules(&agent)?.get(rule).copied() != Some(want) {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("label change {c} not enforced in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(start.elapsed());
    }
    took.sort();
    table.push([
        format!("peer label change -> enforced (p50 / p99 of {})", took.len()),
        format!("{} / {}", ms(percentile(&took, 0.5)), ms(percentile(&took, 0.99))),
    ]);

    // 4. Churn: label changes of remote pods of apps that are some policy's peers, all at
    // once; what the agent and the controller read and wrote meanwhile.
    let (agent_r0, agent_w0) = socket_bytes(agent_pid)?;
    let (ctl_r0, ctl_w0) = socket_bytes(controller_pid)?;
    let start = Instant::now();
    let churned: Vec<u32> = (0..args.pods)
        .filter(|i| i % args.nodes != 0 && (1..=policies).contains(&layout(*i, args.nodes).1))
        .take(args.churn as usize)
        .collect();
    let touch = serde_json::json!({"metadata": {"labels": {"churn": "1"}, "annotations": {"x": "y"}}});
    patch_pods(&admin, &churned, args.nodes, &touch).await?;
    // Peers leaving their app: the sets change.
    let leave = serde_json::json!({"metadata": {"labels": {"app": "gone"}}});
    patch_pods(&admin, &churned[..churned.len() / 10], args.nodes, &leave).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secs = start.elapsed().as_secs_f64();
    let (agent_r1, agent_w1) = socket_bytes(agent_pid)?;
    let (ctl_r1, ctl_w1) = socket_bytes(controller_pid)?;
    let moved = churned.len() / 10;
    table.push([
        format!(
            "churn: {} pod updates ({} that change sets) in {secs:.1} s: agent received / sent",
            churned.len() + moved,
            moved
        ),
        format!(
            "{} / {} KiB",
            agent_r1.saturating_sub(agent_r0) / 1024,
            agent_w1.saturating_sub(agent_w0) / 1024
        ),
    ]);
    table.push([
        "churn: controller received / sent".into(),
        format!(
            "{} / {} KiB",
            ctl_r1.saturating_sub(ctl_r0) / 1024,
            ctl_w1.saturating_sub(ctl_w0) / 1024
        ),
    ]);
    table.push(["controller RSS after churn".into(), mib(rss(controller_pid)?)]);
    table.push(["agent RSS after churn".into(), mib(rss(agent_pid)?)]);
    let lines = vec![
        format!(
            "{} pod objects over {} nodes and {NAMESPACES} namespaces, {APPS} apps; {policies} policies, policy k selecting app-k in ns-(k mod 10) with the pods of app-(k+1) in every namespace as peers; filling the apiserver took {:.0} s",
            args.pods,
            args.nodes,
            filled.as_secs_f64()
        ),
        format!("one real agent (node {NODE}, its {} pods with cgroups) and the controller, both `podshaper` release builds with the chart's ServiceAccounts; kube-apiserver v1.34.4 and etcd on loopback", local.len()),
        "received/sent: bytes on the process's TCP connections to the apiserver (TLS and HTTP/2 included), summed over its sockets from `ss -tinp` before and after".into(),
    ];
    controller.stop();
    drop(agent);
    Ok((table, lines))
}

const SECTION: Section = Section {
    marker: MARKER,
    heading: "Measured",
    target: "make bench-policy-scale",
    writer: "podshaper-bench-policy-scale",
};
