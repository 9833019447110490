//! The agent against a real control plane: etcd and kube-apiserver built from their Go modules
//! (scripts/k8s-bins.sh, cached in /var/cache/podshaper), the chart's manifests applied to it,
//! and `podshaper agent` running as the chart's ServiceAccount, with exactly its RBAC. No
//! kubelet runs here: the testbed's `Kubelet` creates pods bound to the node, their cgroups
//! where a kubelet puts them, and their status.
//!
//! Needs Go (the first run builds the control plane, ~6 minutes) and, for all but the chart
//! and admission-policy tests, root (BPF, cgroups, network namespaces): without root those say
//! so and pass, except under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The guard serialises whole tests (each has its own runtime), so holding it across awaits is
// the point.
#![allow(clippy::await_holding_lock)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use kube::Api;
use podshaper_api::Limits;
use podshaper_testbed::{
    k8s::{AgentProcess, CgroupDriver, Cluster, ControllerProcess, Kubelet, QosClass, RunningPod},
    run_client, unique_name, ClientOptions, IperfServer, NetnsPair, ServerOptions, Traffic, L3,
};

const M: u64 = 1_000_000;
const EGRESS: &str = "kubernetes.io/egress-bandwidth";
const INGRESS: &str = "kubernetes.io/ingress-bandwidth";
const NODE: &str = "node-a";
const NS: &str = "shop";

fn privileged() -> Option<MutexGuard<'static, ()>> {
    if !podshaper_testbed::root_or_skip("BPF, cgroups, network namespaces; and Go for the control plane") {
        return None;
    }
    Some(serial())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The plain manifests, as a user would `kubectl apply` them.
fn manifests() -> String {
    std::fs::read_to_string(repo().join("deploy/manifests/podshaper.yaml")).expect("deploy/manifests")
}

async fn cluster() -> Cluster {
    Cluster::start(&manifests(), NS)
        .await
        .expect("control plane with podshaper's manifests")
}

/// The capabilities the chart grants the agent container (its securityContext's `add`).
fn chart_capabilities() -> Vec<String> {
    let m = manifests();
    let caps: Vec<String> = m
        .lines()
        .skip_while(|l| l.trim() != "add:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect();
    assert!(
        caps.contains(&"BPF".to_string()),
        "no capabilities found in the manifests: {caps:?}"
    );
    caps
}

/// The agent with the chart's ServiceAccount and only the chart's capabilities.
fn agent(cluster: &Cluster, own_pod: Option<&str>) -> AgentProcess {
    agent_with(cluster, own_pod, &[])
}

fn agent_with(cluster: &Cluster, own_pod: Option<&str>, args: &[&str]) -> AgentProcess {
    agent_on(cluster, NODE, own_pod, args)
}

/// The agent of `node`, as [`agent`] makes it, with `args` last on its command line.
fn agent_on(cluster: &Cluster, node: &str, own_pod: Option<&str>, args: &[&str]) -> AgentProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_podshaper"));
    let caps = chart_capabilities();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    AgentProcess::start(bin, node, &cluster.agent_kubeconfig, own_pod, &caps, args).expect("agent")
}

fn kubelet(cluster: &Cluster, driver: CgroupDriver, prefix: &str) -> Kubelet {
    cluster.kubelet(NODE, driver, prefix).unwrap()
}

/// Asserts that pod `name` of NS gets `want` within `within`; returns how long it took.
fn wait_limits(agent: &AgentProcess, name: &str, want: Option<Limits>, within: Duration) -> Duration {
    agent.wait_limits(NS, name, want, within).unwrap()
}

fn limits(agent: &AgentProcess, name: &str) -> Option<Limits> {
    agent.limits(NS, name).unwrap()
}

/// Limits of egress and ingress in bits/s, as the agent reports them for a limited pod.
fn lim(egress: Option<u64>, ingress: Option<u64>) -> Option<Limits> {
    Some(Limits::from_bps(egress, ingress).unwrap())
}

/// iperf3 from the pod (namespace A, in its cgroup) to B for `secs`; the L3 rate after the
/// first second.
fn pod_rate(pair: &NetnsPair, pod: &RunningPod, secs: u32, reverse: bool) -> f64 {
    let _server = IperfServer::start(pair.b(), None, &ServerOptions::default()).expect("iperf3 server");
    let opts = ClientOptions {
        traffic: Traffic::Tcp {
            congestion: Some("cubic".into()),
        },
        secs,
        reverse,
        ..ClientOptions::new(IpAddr::V4(NetnsPair::B_V4))
    };
    let r = run_client(pair.a(), Some(&pod.cgroup), &opts).expect("iperf3");
    L3::TCP_V4.l3_bps(r.mean_after_bps(1.0).expect("intervals"))
}

fn assert_near(what: &str, got: f64, target: u64) {
    let ratio = got / target as f64;
    assert!(
        (0.75..=1.15).contains(&ratio),
        "{what}: {got:.0} bit/s is {ratio:.2} of {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_limit_a_pod_live_and_everything_goes_with_it() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let agent = agent(&cluster, None);
    // It really runs with the chart's capabilities only: no CAP_SYS_ADMIN (21), CAP_BPF (39).
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let eff = u64::from_str_radix(eff, 16).unwrap();
    assert!(eff & (1 << 21) == 0 && eff & (1 << 39) != 0, "CapEff {eff:#x}");
    let pair = NetnsPair::new().unwrap();

    let pod = kubelet
        .run_pod(NS, "web", QosClass::Burstable, &[(EGRESS, "20M")], "198.18.0.1")
        .await
        .unwrap();
    wait_limits(&agent, "web", lim(Some(20 * M), None), Duration::from_secs(5));
    assert_near("egress 20M", pod_rate(&pair, &pod, 4, false), 20 * M);
    let note = cluster
        .wait_event(NS, "web", "BandwidthLimited", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("egress limited to 20M"), "{note}");

    // A change applies live, within a second, in both directions.
    kubelet
        .annotate(NS, "web", &[(EGRESS, Some("50M")), (INGRESS, Some("30M"))])
        .await
        .unwrap();
    let took = wait_limits(
        &agent,
        "web",
        lim(Some(50 * M), Some(30 * M)),
        Duration::from_secs(1),
    );
    // The change is its own Event, with its own note (not a repeat of the first one).
    let start = Instant::now();
    while !cluster
        .events(NS, "web", "BandwidthLimited")
        .await
        .unwrap()
        .iter()
        .any(|n| n.contains("egress limited to 50M, ingress limited to 30M"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no Event for the change"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("annotation change enforced after {took:?}");
    assert_near("egress 50M", pod_rate(&pair, &pod, 4, false), 50 * M);
    assert_near("ingress 30M", pod_rate(&pair, &pod, 4, true), 30 * M);
    // Metrics carry the pod's namespace and name.
    let m = agent.metrics().unwrap();
    let line = format!(
        r#"podshaper_pod_limit_bits_per_second{{namespace="{NS}",pod="web",direction="egress"}} 50000000"#
    );
    assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");

    // No annotation, no limit.
    kubelet
        .annotate(NS, "web", &[(EGRESS, None), (INGRESS, None)])
        .await
        .unwrap();
    wait_limits(&agent, "web", None, Duration::from_secs(2));
    let unlimited = pod_rate(&pair, &pod, 3, false);
    assert!(
        unlimited > 200.0 * M as f64,
        "unlimited pod runs at only {unlimited:.0} bit/s"
    );

    // Deleting the pod (and its cgroup, as the kubelet does) leaves no link, program or pin.
    kubelet
        .annotate(NS, "web", &[(EGRESS, Some("10M"))])
        .await
        .unwrap();
    wait_limits(&agent, "web", lim(Some(10 * M), None), Duration::from_secs(2));
    let links = podshaper_ebpf::pins::Pins::new(agent.bpffs()).links();
    assert_eq!(
        std::fs::read_dir(&links).unwrap().count(),
        1,
        "one limited pod, one link dir"
    );
    // Terminating (its containers still run in the grace period), then the object gone while
    // the cgroup lingers: the limit holds until both are gone.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.admin.clone(), NS);
    pods.delete("web", &kube::api::DeleteParams::default().grace_period(30))
        .await
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(limits(&agent, "web"), lim(Some(10 * M), None), "terminating");
    pods.delete("web", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        agent.status().unwrap().len(),
        1,
        "object gone, cgroup still there"
    );
    drop(pod);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&links).unwrap().count() > 0 || !agent.status().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "state of the deleted pod is still there"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_annotation_changes_nothing_and_says_why() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Cgroupfs, "");
    // With an agent-wide maximum, to see a too-high limit cut to it.
    let agent = agent_with(&cluster, None, &["--max-rate", "1G"]);
    let a = kubelet
        .run_pod(NS, "a", QosClass::Guaranteed, &[(EGRESS, "10M")], "198.18.10.1")
        .await
        .unwrap();
    let b = kubelet
        .run_pod(NS, "b", QosClass::BestEffort, &[(INGRESS, "20M")], "198.18.10.2")
        .await
        .unwrap();
    wait_limits(&agent, "a", lim(Some(10 * M), None), Duration::from_secs(5));
    wait_limits(&agent, "b", lim(None, Some(20 * M)), Duration::from_secs(5));

    kubelet
        .annotate(NS, "a", &[(EGRESS, Some("10Zbit"))])
        .await
        .unwrap();
    let note = cluster
        .wait_event(NS, "a", "InvalidBandwidth", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("10Zbit") && note.contains("Accepted"), "{note}");
    assert_eq!(
        limits(&agent, "a"),
        lim(Some(10 * M), None),
        "a's limit must stay"
    );
    assert_eq!(
        limits(&agent, "b"),
        lim(None, Some(20 * M)),
        "b must not be touched"
    );
    let m = agent.metrics().unwrap();
    let line = format!(r#"podshaper_invalid_annotations_total{{namespace="{NS}",pod="a"}} 1"#);
    assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");

    // Fixed, it applies again.
    kubelet.annotate(NS, "a", &[(EGRESS, Some("15M"))]).await.unwrap();
    wait_limits(&agent, "a", lim(Some(15 * M), None), Duration::from_secs(2));

    // Above the agent's maximum: cut to it, said once (not again on unrelated updates).
    kubelet.annotate(NS, "a", &[(INGRESS, Some("2G"))]).await.unwrap();
    wait_limits(
        &agent,
        "a",
        lim(Some(15 * M), Some(1000 * M)),
        Duration::from_secs(2),
    );
    let note = cluster
        .wait_event(NS, "a", "BandwidthCapped", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("maximum of 1G"), "{note}");
    kubelet
        .annotate(NS, "a", &[("unrelated", Some("x"))])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A repeat would show as a second Event or as a series on the first (the recorder merges).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cluster.admin.clone(), NS);
    let capped: Vec<_> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BandwidthCapped"))
        .collect();
    assert_eq!(capped.len(), 1, "{capped:?}");
    assert!(capped[0].series.is_none(), "said again: {:?}", capped[0].series);
    kubelet.annotate(NS, "a", &[(INGRESS, None)]).await.unwrap();

    // Lifted behind the agent's back (the CLI on the node): the annotation wins within ~10 s.
    let out = Command::new(env!("CARGO_BIN_EXE_podshaper"))
        .arg("--socket")
        .arg(agent.socket())
        .args(["unlimit", "--cgroup"])
        .arg(b.cgroup.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(limits(&agent, "b"), None);
    wait_limits(&agent, "b", lim(None, Some(20 * M)), Duration::from_secs(15));

    // A pod whose cgroup never shows up: retried, then an Event; nobody else is touched.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.admin.clone(), NS);
    let ghost = kubelet
        .run_pod(NS, "ghost", QosClass::BestEffort, &[], "198.18.10.3")
        .await
        .unwrap();
    drop(ghost.cgroup);
    kubelet
        .annotate(NS, "ghost", &[(EGRESS, Some("5M"))])
        .await
        .unwrap();
    let note = cluster
        .wait_event(NS, "ghost", "CgroupNotFound", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(note.contains("cgroup"), "{note}");
    assert_eq!(limits(&agent, "b"), lim(None, Some(20 * M)));
    pods.delete("ghost", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    kubelet.delete_pod(a).await.unwrap();
    kubelet.delete_pod(b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_never_lapses_while_the_agent_restarts() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let mut agent = agent(&cluster, None);
    let pair = NetnsPair::new().unwrap();
    let pod = kubelet
        .run_pod(
            NS,
            "steady",
            QosClass::Guaranteed,
            &[(EGRESS, "20M")],
            "198.18.0.1",
        )
        .await
        .unwrap();
    wait_limits(&agent, "steady", lim(Some(20 * M), None), Duration::from_secs(5));

    let report = through_a_restart(&pair, &pod, &mut agent, IpAddr::V4(NetnsPair::B_V4), 20 * M);
    assert_near(
        "through the restart",
        L3::TCP_V4.l3_bps(report.mean_after_bps(1.0).unwrap()),
        20 * M,
    );
    wait_limits(&agent, "steady", lim(Some(20 * M), None), Duration::from_secs(2));

    // The annotation removed while no agent runs: the next agent lifts the limit.
    agent.kill();
    kubelet.annotate(NS, "steady", &[(EGRESS, None)]).await.unwrap();
    agent.restart().unwrap();
    assert!(
        agent.status().unwrap().is_empty(),
        "limit kept: {:?}",
        agent.status()
    );
    kubelet
        .annotate(NS, "steady", &[(EGRESS, Some("20M"))])
        .await
        .unwrap();
    wait_limits(&agent, "steady", lim(Some(20 * M), None), Duration::from_secs(2));

    // A pod deleted while no agent runs: the next agent's first list does not have it, so its
    // limit goes even though its cgroup is still there.
    agent.kill();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.admin.clone(), NS);
    pods.delete("steady", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(podshaper_ebpf::pins::Pins::new(agent.bpffs()).links())
            .unwrap()
            .count(),
        1
    );
    agent.restart().unwrap();
    assert!(
        agent.status().unwrap().is_empty(),
        "stale limit kept: {:?}",
        agent.status()
    );
    drop(pod);
}

/// 8 s of TCP from `pod` to `to`, with the agent killed after 2 s and started again 2 s
/// later; asserts that no half second of it, with the agent up, down and back, went above
/// `limit`. The report.
fn through_a_restart(
    pair: &NetnsPair,
    pod: &RunningPod,
    agent: &mut AgentProcess,
    to: IpAddr,
    limit: u64,
) -> podshaper_testbed::IperfReport {
    let _server = IperfServer::start(pair.b(), None, &ServerOptions::default()).unwrap();
    let opts = ClientOptions {
        secs: 8,
        interval: 0.5,
        ..ClientOptions::new(to)
    };
    let report = thread::scope(|s| {
        let traffic = s.spawn(|| run_client(pair.a(), Some(&pod.cgroup), &opts).unwrap());
        thread::sleep(Duration::from_secs(2));
        agent.kill();
        thread::sleep(Duration::from_secs(2));
        agent.restart().unwrap();
        traffic.join().unwrap()
    });
    let worst = L3::TCP_V4.l3_bps(report.worst_interval_bps(1.0).unwrap());
    assert!(
        worst < 1.3 * limit as f64,
        "a 0.5 s window reached {worst:.0} bit/s; intervals (Mbit/s): {:?}",
        report
            .intervals
            .iter()
            .map(|i| (i.end * 10.0).round() / 10.0)
            .zip(report.intervals.iter().map(|i| (i.bits_per_second / 1e6).round()))
            .collect::<Vec<_>>()
    );
    report
}

/// A node of the two-node lab on this machine: a kubelet and an agent of `name` on a cgroup
/// subtree of their own, so that the agent's node-level program never sees the other node's
/// sockets (only what crosses the wire joins them, as between two machines).
fn lab_node(cluster: &Cluster, name: &str) -> (Kubelet, AgentProcess) {
    let mount = podshaper_ebpf::cgroup::cgroup2_mount().unwrap();
    let prefix = unique_name(name);
    std::fs::create_dir(mount.join(&prefix)).unwrap();
    let kubelet = cluster.kubelet(name, CgroupDriver::Cgroupfs, &prefix).unwrap();
    let root = mount.join(&prefix);
    let root = root.to_str().unwrap();
    let agent = agent_on(
        cluster,
        name,
        None,
        &["--cgroup-root", root, "--cgroup-driver", "cgroupfs"],
    );
    (kubelet, agent)
}

/// L3 mean of the TCP report's intervals within from..to seconds.
fn l3_between(r: &podshaper_testbed::IperfReport, from: f64, to: f64) -> f64 {
    let bps = r
        .mean_between_bps(from, to)
        .unwrap_or_else(|| panic!("no interval within {from}..{to} s"));
    L3::TCP_V4.l3_bps(bps)
}

/// A counter of the agent's `podshaper_rate_options_total` for `event`.
fn rate_options(agent: &AgentProcess, event: &str) -> u64 {
    let m = agent.metrics().unwrap();
    let prefix = format!(r#"podshaper_rate_options_total{{event="{event}"}} "#);
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
        .parse()
        .unwrap()
}

// Two nodes under one control plane, each with its agent, its own cgroup subtree
// (--cgroup-root, where its kubelet puts pods), bpffs and node-level program: node B's agent
// never sees the pod of node A, only its rate option. A pod on A downloads from a pod on B, and
// an annotation change on A's pod reaches B's sender live, on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_annotation_paces_a_sender_on_another_node_live() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let (kubelet_a, agent_a) = lab_node(&cluster, "node-a");
    let (kubelet_b, agent_b) = lab_node(&cluster, "node-b");
    let pair = NetnsPair::new().unwrap();
    let web = kubelet_a
        .run_pod(NS, "web", QosClass::Burstable, &[(INGRESS, "30M")], "198.18.0.1")
        .await
        .unwrap();
    let files = kubelet_b
        .run_pod(NS, "files", QosClass::Burstable, &[], "198.18.0.2")
        .await
        .unwrap();
    wait_limits(&agent_a, "web", lim(None, Some(30 * M)), Duration::from_secs(5));
    assert_eq!(limits(&agent_b, "web"), None, "node B's agent limits A's pod");

    // The server runs in B's pod; the client in A's pod downloads from it.
    let _server =
        IperfServer::start(pair.b(), Some(&files.cgroup), &ServerOptions::default()).expect("iperf3 server");
    let opts = ClientOptions {
        traffic: Traffic::Tcp {
            congestion: Some("cubic".into()),
        },
        secs: 9,
        interval: 0.5,
        reverse: true,
        ..ClientOptions::new(IpAddr::V4(NetnsPair::B_V4))
    };
    let runtime = tokio::runtime::Handle::current();
    let r = thread::scope(|s| {
        let traffic = s.spawn(|| run_client(pair.a(), Some(&web.cgroup), &opts).expect("iperf3"));
        thread::sleep(Duration::from_secs(4));
        // This thread blocks a worker of the test's runtime; the other one serves the request.
        s.spawn(|| runtime.block_on(kubelet_a.annotate(NS, "web", &[(INGRESS, Some("60M"))])))
            .join()
            .unwrap()
            .unwrap();
        wait_limits(&agent_a, "web", lim(None, Some(60 * M)), Duration::from_secs(1));
        traffic.join().unwrap()
    });
    assert_near("ingress 30M from node B", l3_between(&r, 1.0, 4.0), 30 * M);
    assert_near(
        "ingress 60M from node B, after the change",
        l3_between(&r, 6.0, 9.0),
        60 * M,
    );
    let retransmits = r.retransmits.expect("TCP report has retransmits");
    assert!(
        retransmits <= 40,
        "{retransmits} retransmits: node B's sender was policed, not paced"
    );
    // The rate came in-band: A wrote it, B took it.
    assert!(
        rate_options(&agent_a, "written") > 0,
        "node A wrote no rate option"
    );
    assert!(rate_options(&agent_b, "taken") > 0, "node B took no rate option");
    assert_eq!(
        rate_options(&agent_a, "taken"),
        0,
        "node A paced a sender of its own"
    );
    // The flow was paced, so not counted as unpaced (a policed one is: privileged.rs).
    let unpaced =
        format!(r#"podshaper_pod_unpaced_flows_total{{namespace="{NS}",pod="web",direction="ingress"}} 0"#);
    let m = agent_a.metrics().unwrap();
    assert!(m.lines().any(|l| l == unpaced), "{unpaced} not in\n{m}");
    drop((web, files));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_of_110_pods_is_limited() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    // kind's layout: the kubelet's --cgroup-root nests every pod one level deeper.
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "podshaper-test-kubelet.slice");
    let agent = agent(&cluster, None);
    let mut pods = Vec::new();
    for i in 0..110u64 {
        let rate = format!("{}M", i + 1);
        let qos = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort][i as usize % 3];
        let name = format!("p{i}");
        pods.push(
            kubelet
                .run_pod(NS, &name, qos, &[(EGRESS, &rate)], "198.18.11.1")
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = agent.status().unwrap();
        let right = (0..110u64)
            .filter(|i| {
                let key = format!("{NS}/p{i}");
                status.iter().any(|c| {
                    c.name.as_deref() == Some(key.as_str())
                        && c.egress.limit.map(|r| r.bps()) == Some((i + 1) * M)
                })
            })
            .count();
        if right == 110 {
            break;
        }
        assert!(Instant::now() < deadline, "only {right} of 110 pods limited");
        thread::sleep(Duration::from_millis(200));
    }
    // The metrics snapshot is refreshed once a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !agent
        .metrics()
        .unwrap()
        .lines()
        .any(|l| l == "podshaper_pods_limited 110")
    {
        assert!(Instant::now() < deadline, "metrics do not count 110 limited pods");
        thread::sleep(Duration::from_millis(100));
    }
    for pod in pods {
        kubelet.delete_pod(pod).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uninstall_hook_lifts_every_limit() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    // The hook's objects are rendered only when helm can see a cluster: render them the way
    // `helm uninstall` does, against this apiserver.
    let bin = podshaper_testbed::k8s::bin_dir().unwrap();
    let admin_kubeconfig = cluster.cp.kubeconfig_admin().unwrap();
    let out = Command::new(bin.join("helm"))
        .args([
            "template",
            "podshaper",
            "deploy/helm/podshaper",
            "--namespace",
            "kube-system",
        ])
        .args(["--dry-run=server", "--show-only", "templates/uninstall-hook.yaml"])
        .env("KUBECONFIG", &admin_kubeconfig)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hook = String::from_utf8(out.stdout).unwrap();
    let (rbac, job) = hook.split_once("kind: Job").expect("the hook has a Job");
    let rbac = rbac.rsplit_once("---").map(|(r, _)| r).unwrap_or(rbac);
    assert!(job.contains("uninstall"), "{job}");
    cluster
        .cp
        .apply(&cluster.admin, rbac)
        .await
        .expect("apply the hook's RBAC");

    // The agent's own pod, as the DaemonSet would make it.
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let agent_pod = unique_name("agent");
    let agents = Kubelet::new(cluster.admin.clone(), NODE, CgroupDriver::Systemd, Path::new("")).unwrap();
    let me = agents
        .run_pod_labeled(
            "kube-system",
            &agent_pod,
            &[
                ("app.kubernetes.io/name", "podshaper"),
                ("app.kubernetes.io/instance", "podshaper"),
            ],
        )
        .await
        .unwrap();
    let agent = agent(&cluster, Some(&agent_pod));
    let pod = kubelet
        .run_pod(
            NS,
            "limited",
            QosClass::BestEffort,
            &[(EGRESS, "10M"), (INGRESS, "10M")],
            "198.18.10.9",
        )
        .await
        .unwrap();
    wait_limits(
        &agent,
        "limited",
        lim(Some(10 * M), Some(10 * M)),
        Duration::from_secs(5),
    );
    // A pod capped by a BandwidthPolicy too: the hook lifts policy rules as well.
    let capped = kubelet
        .run_labeled_pod_at(NS, "capped", &[("app", "batch")], "198.18.10.10")
        .await
        .unwrap();
    new_policy(
        &cluster,
        "cap",
        "podSelector: {matchLabels: {app: batch}}\negress: [{rate: 5M}]\n",
    )
    .await;
    let bound = ["bwp:shop/cap:egress0"];
    agent
        .wait_pod_rules(NS, "capped", &bound, Duration::from_secs(5))
        .unwrap();

    // What the hook Job runs, as the hook's ServiceAccount.
    let token = cluster
        .cp
        .token("kube-system", "podshaper-uninstall")
        .await
        .unwrap();
    let hook_kubeconfig = cluster.cp.kubeconfig(&token, "hook").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_podshaper"))
        .args(["uninstall", "--namespace", "kube-system", "--timeout", "20"])
        .args([
            "--selector",
            "app.kubernetes.io/name=podshaper,app.kubernetes.io/instance=podshaper",
        ])
        .env("KUBECONFIG", &hook_kubeconfig)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("did not confirm"),
        "uninstall: {stderr}"
    );
    assert!(
        agent.status().unwrap().is_empty(),
        "limits left after uninstall: {:?}",
        agent.status().unwrap()
    );
    assert!(agent.rules().unwrap().is_empty(), "{:?}", agent.rules());
    // Not a link, map or pin left on the node.
    let pins = std::fs::read_dir(podshaper_ebpf::pins::Pins::new(agent.bpffs()).versioned())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pins, 0, "pins left under {}", agent.bpffs().display());
    assert!(!agent.ready(), "an idle agent must not look ready");

    // Called off (the mark removed, say after a failed hook): limits come back.
    agents
        .annotate("kube-system", &agent_pod, &[("podshaper.io/uninstall", None)])
        .await
        .unwrap();
    wait_limits(
        &agent,
        "limited",
        lim(Some(10 * M), Some(10 * M)),
        Duration::from_secs(5),
    );
    agent
        .wait_pod_rules(NS, "capped", &bound, Duration::from_secs(5))
        .unwrap();
    assert!(agent.ready());
    kubelet.delete_pod(capped).await.unwrap();
    kubelet.delete_pod(pod).await.unwrap();
    agents.delete_pod(me).await.unwrap();
}

/// helm, built by scripts/k8s-bins.sh, run in the repository.
fn helm(args: &[&str]) -> String {
    let bin = podshaper_testbed::k8s::bin_dir().unwrap();
    let out = Command::new(bin.join("helm"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Takes the lock the traffic tests hold, without needing root: control-plane tests only
/// compete with them for the CPU.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn the_plain_manifests_are_the_charts_output_and_the_agent_role_is_least_privilege() {
    let _g = serial();
    helm(&["lint", "--strict", "deploy/helm/podshaper"]);
    let rendered = helm(&[
        "template",
        "podshaper",
        "deploy/helm/podshaper",
        "--namespace",
        "kube-system",
    ]);
    let committed = manifests();
    let body: String = committed
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        body == rendered,
        "deploy/manifests/podshaper.yaml is stale: regenerate it with the command in its header"
    );
    // Exactly: read pods, BandwidthPolicies and peer sets, report to peer sets' status, write
    // events. Nothing else, anywhere.
    let role = rendered
        .split("\n---\n")
        .find(|d| d.contains("kind: ClusterRole\n"))
        .expect("a ClusterRole");
    let rules: Vec<&str> = role
        .lines()
        .skip_while(|l| *l != "rules:")
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert_eq!(
        rules,
        [
            "rules:",
            "  - apiGroups: [\"\"]",
            "    resources: [pods]",
            "    verbs: [get, list, watch]",
            "  - apiGroups: [podshaper.io]",
            "    resources: [bandwidthpolicies, bandwidthpeersets]",
            "    verbs: [get, list, watch]",
            "  - apiGroups: [podshaper.io]",
            "    resources: [bandwidthpeersets/status]",
            "    verbs: [patch]",
            "  - apiGroups: [events.k8s.io]",
            "    resources: [events]",
            "    verbs: [create, patch]",
        ]
    );
    let kinds = |k: &str| rendered.lines().filter(|l| *l == format!("kind: {k}")).count();
    // The agent's, the controller's, and the read-only BandwidthPolicy viewer aggregated
    // into `view`: no role of the chart aggregates a write verb on policies into the built-in
    // roles.
    assert_eq!(kinds("ClusterRole"), 3);
    for doc in rendered.split("\n---\n").filter(|d| d.contains("aggregate-to-")) {
        assert!(
            !doc.contains("aggregate-to-edit") && !doc.contains("aggregate-to-admin"),
            "a chart role aggregates into edit or admin:\n{doc}"
        );
        let verbs: Vec<&str> = doc
            .lines()
            .filter(|l| l.trim_start().starts_with("verbs:"))
            .collect();
        assert_eq!(verbs, ["    verbs: [get, list, watch]"], "{doc}");
    }
    assert!(
        rendered.contains("kind: CustomResourceDefinition")
            && rendered.contains("helm.sh/resource-policy: keep"),
        "the chart ships the BandwidthPolicy CRD, kept on uninstall"
    );
    // The controller's: exactly its Lease, in the release's namespace.
    let role = rendered
        .split("\n---\n")
        .find(|d| d.contains("kind: Role\n"))
        .expect("the controller's Role");
    let rules: Vec<&str> = role.lines().skip_while(|l| *l != "rules:").collect();
    assert_eq!(
        rules,
        [
            "rules:",
            "  - apiGroups: [coordination.k8s.io]",
            "    resources: [leases]",
            "    verbs: [create]",
            "  - apiGroups: [coordination.k8s.io]",
            "    resources: [leases]",
            "    resourceNames: [podshaper-controller]",
            "    verbs: [get, update]",
        ]
    );
    assert_eq!(kinds("Role"), 1, "the agent needs no namespaced Role");
    // The controller's pods never carry the agents' selector labels (the uninstall hook finds
    // the agents by them).
    let deployment = rendered
        .split("\n---\n")
        .find(|d| d.contains("kind: Deployment\n"))
        .expect("the controller's Deployment");
    assert!(
        deployment.contains("app.kubernetes.io/name: podshaper-controller")
            && !deployment.contains("app.kubernetes.io/name: podshaper\n"),
        "{deployment}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policy_lets_only_allowed_users_set_limits_up_to_the_maximum() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams, PostParams};
    let _g = serial();
    let cluster = cluster().await;
    // The chart with a maximum: the policy is rendered from values, so render and apply it.
    let policy = helm(&[
        "template",
        "podshaper",
        "deploy/helm/podshaper",
        "--namespace",
        "kube-system",
        "--set",
        "admissionPolicy.maxRate=1G",
        "--show-only",
        "templates/admission-policy.yaml",
    ]);
    cluster.cp.apply(&cluster.admin, &policy).await.unwrap();
    // A developer who may manage pods, but is not among the allowed users or groups.
    let dev_rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: dev\n  namespace: {NS}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: dev\n  namespace: {NS}\n\
         rules:\n- apiGroups: [\"\", apps]\n  resources: [pods, deployments]\n  verbs: [get, create, update, patch]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: dev\n  namespace: {NS}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: dev}}\n\
         subjects: [{{kind: ServiceAccount, name: dev, namespace: {NS}}}]\n"
    );
    cluster.cp.apply(&cluster.admin, &dev_rbac).await.unwrap();
    let dev = cluster
        .cp
        .client(&cluster.cp.token(NS, "dev").await.unwrap())
        .await
        .unwrap();
    let dev_pods: Api<Pod> = Api::namespaced(dev.clone(), NS);
    let admin_pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), NS);
    let pod = |name: &str, annotations: &[(&str, &str)]| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        }))
        .unwrap()
    };
    let denied = |r: Result<Pod, kube::Error>| match r {
        Err(kube::Error::Api(e)) => e.message.contains("podshaper"),
        _ => false,
    };
    // The apiserver enforces a changed policy and a new Role a moment after they are stored.
    // Wait on what this test is about: the developer's RBAC with the policy's rule (a denial
    // that names podshaper, not RBAC's Forbidden), and the maximum, which only the re-applied
    // policy has (the chart's manifests already deny the developer). A server-side dry run
    // goes through admission and stores nothing.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let start = Instant::now();
    while !(denied(dev_pods.create(&dry_run, &pod("early", &[(EGRESS, "10M")])).await)
        && denied(
            admin_pods
                .create(&dry_run, &pod("early", &[(EGRESS, "2G")]))
                .await,
        ))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the policy with maxRate=1G is never enforced"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let annotate =
        |value: Option<&str>| Patch::Merge(serde_json::json!({"metadata": {"annotations": {EGRESS: value}}}));
    let pp = PatchParams::default();

    // A developer can run pods, not set or change their limits.
    dev_pods
        .create(&PostParams::default(), &pod("plain", &[]))
        .await
        .expect("a plain pod is fine");
    assert!(
        denied(dev_pods.patch("plain", &pp, &annotate(Some("1G"))).await),
        "dev set a limit"
    );
    admin_pods
        .patch("plain", &pp, &annotate(Some("10M")))
        .await
        .expect("admin may set a limit");
    assert!(
        denied(dev_pods.patch("plain", &pp, &annotate(Some("900M"))).await),
        "dev raised a limit"
    );
    assert!(
        denied(dev_pods.patch("plain", &pp, &annotate(None)).await),
        "dev removed a limit"
    );
    let label = Patch::Merge(serde_json::json!({"metadata": {"labels": {"tier": "web"}}}));
    dev_pods
        .patch("plain", &pp, &label)
        .await
        .expect("unrelated changes stay allowed");

    // Nobody goes above the maximum or writes a non-quantity, admin included.
    assert!(
        denied(admin_pods.patch("plain", &pp, &annotate(Some("2G"))).await),
        "2G > 1G"
    );
    assert!(
        denied(admin_pods.patch("plain", &pp, &annotate(Some("10Zbit"))).await),
        "not a quantity"
    );
    admin_pods
        .patch("plain", &pp, &annotate(Some("1G")))
        .await
        .expect("the maximum itself");

    // Workload templates are guarded too: controllers copy them into pods.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(dev, NS);
    let deploy: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {EGRESS: "1G"}},
                "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
            },
        },
    }))
    .unwrap();
    match deployments.create(&PostParams::default(), &deploy).await {
        Err(kube::Error::Api(e)) => assert!(e.message.contains("podshaper"), "{e:?}"),
        other => panic!("dev created an annotated Deployment: {other:?}"),
    }
}

/// The BandwidthPolicy CRD, as the manifests ship it: a good policy is stored and its status
/// written through the status subresource; the apiserver itself refuses a bad rate, a bad
/// selector operator, a peer that is both an ipBlock and pods, an except outside its block and
/// too many rules, each with the schema's message, and stores nothing of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_refuses_a_bad_bandwidth_policy_at_apply_time() {
    use kube::api::{Patch, PatchParams, PostParams};
    use podshaper_agent::policy::{BandwidthPolicy, BandwidthPolicySpec, BandwidthPolicyStatus};
    let _g = serial();
    let cluster = cluster().await;
    let api: Api<BandwidthPolicy> = Api::namespaced(cluster.admin.clone(), NS);
    let policy = |name: &str, spec: &str| {
        let spec: BandwidthPolicySpec = serde_yaml_ng::from_str(spec).expect("spec YAML");
        BandwidthPolicy::new(name, spec)
    };
    let good = policy(
        "batch-to-db",
        "podSelector: {matchLabels: {app: batch}}\n\
         egress:\n- rate: 20M\n  peers:\n  - podSelector: {matchLabels: {app: db}}\n  \
         - ipBlock: {cidr: 198.18.0.0/15, except: [198.18.1.0/24]}\n  - ipBlock: {cidr: '2001:2::/48'}\n\
         ingress:\n- rate: 1G\n",
    );
    let created = create_policy(&cluster, &good).await;
    assert_eq!(created.spec, good.spec, "the apiserver changed the spec");
    let status = BandwidthPolicyStatus {
        observed_generation: created.metadata.generation,
        summary: Some(created.spec.summary()),
        selected_pods: Some(0),
        ..BandwidthPolicyStatus::default()
    };
    let patched = api
        .patch_status(
            "batch-to-db",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .expect("status subresource");
    assert_eq!(patched.status, Some(status));

    for (name, spec, message) in [
        (
            "bad-rate",
            "podSelector: {}\negress: [{rate: 10Zbit}]",
            "rate must be a quantity of bits/s from 1k to 1P",
        ),
        (
            "too-fast",
            "podSelector: {}\negress: [{rate: 2P}]",
            "rate must be a quantity of bits/s from 1k to 1P",
        ),
        (
            "bad-operator",
            "podSelector: {matchExpressions: [{key: app, operator: Is, values: [db]}]}\negress: [{rate: 1M}]",
            "operator must be In, NotIn, Exists or DoesNotExist",
        ),
        (
            "both",
            "podSelector: {}\negress: [{rate: 1M, peers: [{podSelector: {}, ipBlock: {cidr: 198.18.0.0/24}}]}]",
            "a peer is either an ipBlock or pods",
        ),
        (
            "except-outside",
            "podSelector: {}\negress: [{rate: 1M, peers: [{ipBlock: {cidr: 198.18.0.0/24, except: [198.19.0.0/24]}}]}]",
            "each except must be a CIDR strictly inside cidr",
        ),
        (
            "not-a-cidr",
            "podSelector: {}\negress: [{rate: 1M, peers: [{ipBlock: {cidr: 198.18.0.300/24}}]}]",
            "cidr must be a CIDR",
        ),
        (
            "five-rules",
            "podSelector: {}\negress: [{rate: 1M}, {rate: 2M}, {rate: 3M}, {rate: 4M}, {rate: 5M}]",
            "Too many",
        ),
    ] {
        let err = api
            .create(&PostParams::default(), &policy(name, spec))
            .await
            .expect_err(name);
        let text = err.to_string();
        assert!(text.contains(message), "{name}: refused, but not with {message:?}: {text}");
        assert!(api.get_opt(name).await.unwrap().is_none(), "{name} was stored");
    }
    // What the schema cannot see, the Rust check does (the controller's Invalid condition).
    let host_bits = policy(
        "host-bits",
        "podSelector: {}\negress: [{rate: 1M, peers: [{ipBlock: {cidr: 198.18.0.1/24}}]}]",
    );
    let stored = api
        .create(&PostParams::default(), &host_bits)
        .await
        .expect("stored");
    let why = stored.spec.check().expect_err("host bits");
    assert!(why[0].contains("host bits set"), "{why:?}");
}

/// Creates a BandwidthPolicy in NS as the admin. The CRD was just created with the manifests:
/// its API is served within moments.
async fn create_policy(
    cluster: &Cluster,
    policy: &podshaper_agent::policy::BandwidthPolicy,
) -> podshaper_agent::policy::BandwidthPolicy {
    let api: Api<podshaper_agent::policy::BandwidthPolicy> = Api::namespaced(cluster.admin.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&kube::api::PostParams::default(), policy).await {
            Ok(p) => return p,
            Err(kube::Error::Api(e)) if e.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("a good policy was refused: {e}"),
        }
    }
}

/// Creates the BandwidthPolicy `name` of NS from its spec in YAML.
async fn new_policy(cluster: &Cluster, name: &str, spec: &str) -> podshaper_agent::policy::BandwidthPolicy {
    create_policy(cluster, &bwp(name, spec)).await
}

/// A BandwidthPolicy named `name` from its spec in YAML.
fn bwp(name: &str, spec: &str) -> podshaper_agent::policy::BandwidthPolicy {
    let spec = serde_yaml_ng::from_str(spec).expect("spec YAML");
    podshaper_agent::policy::BandwidthPolicy::new(name, spec)
}

async fn delete_policy(cluster: &Cluster, name: &str) {
    let api: Api<podshaper_agent::policy::BandwidthPolicy> = Api::namespaced(cluster.admin.clone(), NS);
    api.delete(name, &kube::api::DeleteParams::default())
        .await
        .expect("delete policy");
}

/// The agent's rules on the node (those of policies), by name.
fn policy_rules(agent: &AgentProcess) -> Vec<String> {
    let mut names: Vec<String> = agent
        .rules()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .filter(|n| n.starts_with("bwp:"))
        .collect();
    names.sort();
    names
}

/// TCP flows at once from `pod` (namespace A) to each address in B; their L3 rates after
/// the first second.
fn flows_from(pair: &NetnsPair, pods: &[(&RunningPod, IpAddr)], reverse: bool, secs: u32) -> Vec<f64> {
    let flows: Vec<_> = pods.iter().map(|(p, to)| (Some(&p.cgroup), *to)).collect();
    podshaper_testbed::tcp_flows_at_once(pair.a(), pair.b(), None, &flows, reverse, secs)
        .expect("iperf3 flows")
        .iter()
        .zip(pods)
        .map(|(r, (_, to))| {
            let l3 = if to.is_ipv6() { L3::TCP_V6 } else { L3::TCP_V4 };
            l3.l3_bps(r.mean_after_bps(1.0).expect("intervals"))
        })
        .collect()
}

/// Prints and checks a capped flow (near `rate`) beside a free one (over 3x `rate`).
fn assert_capped_beside_free(capped_what: &str, capped: f64, rate: u64, free_what: &str, free: f64) {
    eprintln!(
        "{capped_what} {:.3} of {} Mbit/s; {free_what} {:.0} Mbit/s at the same time",
        capped / rate as f64,
        rate / M,
        free / 1e6
    );
    assert_near(capped_what, capped, rate);
    assert!(free > 3.0 * rate as f64, "{free_what}: {:.1} Mbit/s", free / 1e6);
}

/// A BandwidthPolicy through the agent, end to end with real traffic: an ipBlock rule (with an
/// except, IPv4 and IPv6) caps the selected pod's traffic to those peers while its traffic to
/// the except runs free at the same time; a peer-less ingress rule caps all it receives; a pod the policy does
/// not select, and an invalid policy, change nothing; a label change moves the pod out of the
/// policy and back in, live; the binding holds through an agent restart; deleting the policy
/// lifts everything it set and leaves no rule, binding or link behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_policy_caps_ip_block_peers_live_and_its_deletion_lifts_everything() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let mut agent = agent(&cluster, None);
    let pair = NetnsPair::new().unwrap();
    pair.add_second_b().unwrap();
    let (b, b2) = (IpAddr::V4(NetnsPair::B_V4), IpAddr::V4(NetnsPair::B2_V4));
    let pod = kubelet
        .run_pod_labeled(NS, "batch", &[("app", "batch")])
        .await
        .unwrap();
    let _web = kubelet
        .run_pod_labeled(NS, "web", &[("app", "web")])
        .await
        .unwrap();
    new_policy(
        &cluster,
        "batch-cap",
        "podSelector: {matchLabels: {app: batch}}\n\
             egress:\n- rate: 20M\n  peers:\n  - ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.2/32]}\n  \
             - ipBlock: {cidr: '2001:2::/64', except: ['2001:2::2/128']}\n\
             ingress:\n- rate: 30M\n",
    )
    .await;
    let bound = ["bwp:shop/batch-cap:egress0", "bwp:shop/batch-cap:ingress0"];
    let took = agent
        .wait_pod_rules(NS, "batch", &bound, Duration::from_secs(5))
        .unwrap();
    eprintln!("policy enforced {took:?} after its creation returned");
    assert_eq!(agent.pod_rules(NS, "web").unwrap(), Vec::<String>::new());
    assert_eq!(policy_rules(&agent), bound);
    let note = cluster
        .wait_event(NS, "batch", "PeerRulesBound", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains(bound[0]), "{note}");

    // At once: to .3 (in the block) capped, to .2 (its except) free.
    let rates = flows_from(&pair, &[(&pod, b2), (&pod, b)], false, 4);
    assert_capped_beside_free(
        "egress to the ipBlock",
        rates[0],
        20 * M,
        "to its except",
        rates[1],
    );
    // IPv6 the same: ::3 in 2001:2::/64, ::2 its except.
    let (b6, b26) = (IpAddr::V6(NetnsPair::B_V6), IpAddr::V6(NetnsPair::B2_V6));
    let rates = flows_from(&pair, &[(&pod, b26), (&pod, b6)], false, 4);
    assert_capped_beside_free(
        "egress to the IPv6 ipBlock",
        rates[0],
        20 * M,
        "to its except",
        rates[1],
    );
    // No peers: all it receives.
    let ingress = pod_rate(&pair, &pod, 4, true);
    eprintln!("ingress, no peers: {:.3} of 30M", ingress / (30 * M) as f64);
    assert_near("ingress, all peers", ingress, 30 * M);

    // An invalid policy selecting the same pod (host bits: the schema lets them through)
    // binds nothing and changes nothing.
    new_policy(
        &cluster,
        "bad",
        "podSelector: {}\negress: [{rate: 1M, peers: [{ipBlock: {cidr: 198.18.0.1/24}}]}]",
    )
    .await;
    thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), bound);
    assert_eq!(policy_rules(&agent), bound);

    // Out of the policy by a label change, live, and back in.
    kubelet
        .label(NS, "batch", &[("app", Some("other"))])
        .await
        .unwrap();
    let took = agent
        .wait_pod_rules(NS, "batch", &[], Duration::from_secs(2))
        .unwrap();
    eprintln!("label change released the pod after {took:?}");
    let released = flows_from(&pair, &[(&pod, b2)], false, 3)[0];
    assert!(
        released > 3.0 * 20.0 * M as f64,
        "released, the flow ran at {:.1} Mbit/s",
        released / 1e6
    );
    kubelet
        .label(NS, "batch", &[("app", Some("batch"))])
        .await
        .unwrap();
    agent
        .wait_pod_rules(NS, "batch", &bound, Duration::from_secs(2))
        .unwrap();

    // Fail-static: the cap holds while no agent runs, and the next agent keeps it from its
    // first moment (it leaves bindings alone until it has listed the policies).
    through_a_restart(&pair, &pod, &mut agent, b2, 20 * M);
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), bound);

    // Deleting the policies lifts everything they set: no binding, no rule, no link.
    delete_policy(&cluster, "batch-cap").await;
    delete_policy(&cluster, "bad").await;
    let took = agent
        .wait_pod_rules(NS, "batch", &[], Duration::from_secs(2))
        .unwrap();
    eprintln!("policy deletion lifted after {took:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    let links = podshaper_ebpf::pins::Pins::new(agent.bpffs()).links();
    while !policy_rules(&agent).is_empty()
        || !agent.status().unwrap().is_empty()
        || std::fs::read_dir(&links).unwrap().count() > 0
    {
        assert!(
            Instant::now() < deadline,
            "left behind: rules {:?}, cgroups {:?}",
            policy_rules(&agent),
            agent.status().unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let note = cluster
        .wait_event(NS, "batch", "PeerRulesLifted", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("no BandwidthPolicy rule"), "{note}");
}

/// A Shared BandwidthPolicy over two pods of one node: their sum holds the rate (each pod
/// alone would get it with PerPod), and a pod it does not select is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_bandwidth_policy_holds_the_sum_of_its_pods_on_a_node() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let agent = agent(&cluster, None);
    let pair = NetnsPair::new().unwrap();
    let b = IpAddr::V4(NetnsPair::B_V4);
    let one = kubelet
        .run_pod_labeled(NS, "batch-1", &[("app", "batch")])
        .await
        .unwrap();
    let two = kubelet
        .run_pod_labeled(NS, "batch-2", &[("app", "batch")])
        .await
        .unwrap();
    new_policy(
        &cluster,
        "batch-total",
        "podSelector: {matchLabels: {app: batch}}\nscope: Shared\negress: [{rate: 30M}]\n",
    )
    .await;
    let bound = ["bwp:shop/batch-total:egress0"];
    for pod in ["batch-1", "batch-2"] {
        agent
            .wait_pod_rules(NS, pod, &bound, Duration::from_secs(5))
            .unwrap();
    }
    let rules = agent.rules().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r.name == bound[0] && r.shared && r.cgroups == 2),
        "{rules:?}"
    );
    let rates = flows_from(&pair, &[(&one, b), (&two, b)], false, 5);
    let sum: f64 = rates.iter().sum();
    eprintln!(
        "shared 30M over two pods: {:.1} + {:.1} Mbit/s, sum {:.3} of the rate",
        rates[0] / 1e6,
        rates[1] / 1e6,
        sum / (30 * M) as f64
    );
    assert_near("the two pods' sum", sum, 30 * M);
    for (i, r) in rates.iter().enumerate() {
        assert!(
            *r > 0.2 * 30.0 * M as f64,
            "pod {i} starved: {:.1} Mbit/s",
            r / 1e6
        );
    }
}

/// The controller as the chart runs it (its ServiceAccount, no privileges), once it leads.
async fn controller(cluster: &Cluster, identity: &str) -> ControllerProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_podshaper"));
    let mut c = ControllerProcess::start(bin, &cluster.controller_kubeconfig, identity).expect("controller");
    c.wait_leader(&cluster.admin, Duration::from_secs(20))
        .await
        .expect("leader");
    c
}

/// Waits until policy `name`'s status satisfies `ok`; the status then.
async fn wait_status(
    cluster: &Cluster,
    name: &str,
    within: Duration,
    ok: impl Fn(&podshaper_agent::policy::BandwidthPolicyStatus) -> bool,
) -> podshaper_agent::policy::BandwidthPolicyStatus {
    let api: Api<podshaper_agent::policy::BandwidthPolicy> = Api::namespaced(cluster.admin.clone(), NS);
    let start = Instant::now();
    loop {
        let status = api.get(name).await.unwrap().status.unwrap_or_default();
        if ok(&status) {
            return status;
        }
        assert!(start.elapsed() < within, "{name}: status {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agent's rule `name` holds `prefixes` peer-table entries.
fn wait_prefixes(agent: &AgentProcess, name: &str, prefixes: usize, within: Duration) -> Duration {
    podshaper_testbed::k8s::wait_for(&format!("{name}: entries"), &Some(prefixes), within, || {
        Ok(agent
            .rules()?
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.prefixes))
    })
    .unwrap()
}

/// Pods as peers, through the controller and the agent, with real traffic: pod A (app=batch)
/// capped to 20M towards pods labelled app=db and 30M from them, while its traffic to and from
/// app=web runs free at the same time; a label change on a peer pod moves it into the cap and
/// out again, live; the policy's status says Accepted, with its pods, nodes and summary; an
/// invalid policy gets an Invalid condition and changes nothing; deleting the policy lifts
/// everything and deletes its peer set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_policy_caps_traffic_to_pods_by_selector_live() {
    use podshaper_agent::policy::BandwidthPeerSet;
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let remote = cluster.kubelet("node-b", CgroupDriver::Systemd, "").unwrap();
    let agent = agent(&cluster, None);
    let _controller = controller(&cluster, "controller-0").await;
    let pair = NetnsPair::new().unwrap();
    pair.add_second_b().unwrap();
    let (web_ip, db_ip) = (IpAddr::V4(NetnsPair::B_V4), IpAddr::V4(NetnsPair::B2_V4));
    let pod = kubelet
        .run_labeled_pod_at(NS, "batch", &[("app", "batch")], "198.18.0.1")
        .await
        .unwrap();
    let _db = remote
        .run_labeled_pod_at(NS, "db", &[("app", "db")], &db_ip.to_string())
        .await
        .unwrap();
    let _web = remote
        .run_labeled_pod_at(NS, "web", &[("app", "web")], &web_ip.to_string())
        .await
        .unwrap();
    let created = new_policy(
        &cluster,
        "batch-to-db",
        "podSelector: {matchLabels: {app: batch}}\n\
             egress: [{rate: 20M, peers: [{podSelector: {matchLabels: {app: db}}}]}]\n\
             ingress: [{rate: 30M, peers: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    )
    .await;
    let bound = ["bwp:shop/batch-to-db:egress0", "bwp:shop/batch-to-db:ingress0"];
    let took = agent
        .wait_pod_rules(NS, "batch", &bound, Duration::from_secs(10))
        .unwrap();
    eprintln!("selector policy enforced {took:?} after its creation returned");
    let status = wait_status(&cluster, "batch-to-db", Duration::from_secs(5), |s| {
        s.observed_generation == created.metadata.generation
    })
    .await;
    let accepted = &status.conditions[0];
    assert_eq!(
        (accepted.type_.as_str(), accepted.status.as_str()),
        ("Accepted", "True")
    );
    assert_eq!(status.selected_pods, Some(1));
    assert_eq!(status.enforcing_nodes, Some(1));
    assert_eq!(
        status.summary.as_deref(),
        Some("egress 20M to 1 peer, ingress 30M to 1 peer")
    );
    let sets: Api<BandwidthPeerSet> = Api::namespaced(cluster.admin.clone(), NS);
    let set = sets.get("batch-to-db").await.unwrap();
    assert_eq!(set.spec.egress[0].addresses, [db_ip.to_string()]);

    // Both ways, the db flow capped and the web flow free at the same time.
    let out = flows_from(&pair, &[(&pod, db_ip), (&pod, web_ip)], false, 4);
    let inn = flows_from(&pair, &[(&pod, db_ip), (&pod, web_ip)], true, 4);
    assert_capped_beside_free("egress to app=db", out[0], 20 * M, "to app=web", out[1]);
    assert_capped_beside_free("ingress from app=db", inn[0], 30 * M, "from app=web", inn[1]);

    // The web pod labelled app=db joins the cap live, and leaves it when labelled back.
    remote.label(NS, "web", &[("app", Some("db"))]).await.unwrap();
    let took = wait_prefixes(&agent, bound[0], 2, Duration::from_secs(5));
    eprintln!("peer label change enforced after {took:?}");
    let joined = flows_from(&pair, &[(&pod, web_ip)], false, 3)[0];
    assert_near("egress to web, now app=db", joined, 20 * M);
    remote.label(NS, "web", &[("app", Some("web"))]).await.unwrap();
    wait_prefixes(&agent, bound[0], 1, Duration::from_secs(5));
    let left = flows_from(&pair, &[(&pod, web_ip)], false, 3)[0];
    assert!(left > 3.0 * 20.0 * M as f64, "released: {:.1} Mbit/s", left / 1e6);

    // Through Services, DNAT'ed on the node side after the pod's hooks saw the ClusterIP:
    // the db Service (its one endpoint the db pod) is a peer, the web Service is not.
    let (db_vip, web_vip) = (
        std::net::Ipv4Addr::new(198, 19, 255, 20),
        std::net::Ipv4Addr::new(198, 19, 255, 21),
    );
    for (name, vip, backend) in [
        ("db", db_vip, NetnsPair::B2_V4),
        ("web", web_vip, NetnsPair::B_V4),
    ] {
        service_with_endpoint(&cluster, name, vip, backend).await;
        podshaper_testbed::service::add_for_a(&pair, vip, backend).unwrap();
    }
    let took = wait_prefixes(&agent, bound[0], 2, Duration::from_secs(5));
    eprintln!("db Service address enforced {took:?} after its EndpointSlice was created");
    let rates = flows_from(
        &pair,
        &[(&pod, IpAddr::V4(db_vip)), (&pod, IpAddr::V4(web_vip))],
        false,
        4,
    );
    assert_capped_beside_free(
        "egress through the db Service",
        rates[0],
        20 * M,
        "through the web Service",
        rates[1],
    );

    // Invalid: the condition says why, nothing changes on the node.
    new_policy(
        &cluster,
        "bad",
        "podSelector: {}\negress: [{rate: 1M, peers: [{podSelector: {}}, {ipBlock: {cidr: 198.18.0.1/24}}]}]",
    )
    .await;
    let status = wait_status(&cluster, "bad", Duration::from_secs(5), |s| {
        s.conditions.iter().any(|c| c.type_ == "Accepted")
    })
    .await;
    let c = &status.conditions[0];
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
    assert!(c.message.contains("host bits"), "{}", c.message);
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), bound);
    assert_eq!(policy_rules(&agent), bound);
    assert!(
        sets.get_opt("bad").await.unwrap().is_none(),
        "an invalid policy got a peer set"
    );

    // Deleting the policy lifts everything and deletes its set (the controller does; no
    // garbage collector runs here).
    delete_policy(&cluster, "batch-to-db").await;
    delete_policy(&cluster, "bad").await;
    agent
        .wait_pod_rules(NS, "batch", &[], Duration::from_secs(5))
        .unwrap();
    let start = Instant::now();
    while sets.get_opt("batch-to-db").await.unwrap().is_some() || !policy_rules(&agent).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "peer set or rules left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.status().unwrap().is_empty(), "{:?}", agent.status());
}

/// One controller acts at a time, and a policy stays enforced while none does: with the leader
/// killed, the cap holds and a peer's label change waits; the standby takes the Lease once it
/// lapsed and catches up; a leader stopped cleanly hands over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_controller_fails_over_and_enforcement_never_depends_on_it() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let remote = cluster.kubelet("node-b", CgroupDriver::Systemd, "").unwrap();
    let agent = agent(&cluster, None);
    let mut first = controller(&cluster, "controller-0").await;
    let bin = Path::new(env!("CARGO_BIN_EXE_podshaper"));
    let mut second = ControllerProcess::start(bin, &cluster.controller_kubeconfig, "controller-1").unwrap();
    let _pod = kubelet
        .run_labeled_pod_at(NS, "batch", &[("app", "batch")], "198.18.0.1")
        .await
        .unwrap();
    let _db = remote
        .run_labeled_pod_at(NS, "db", &[("app", "db")], "198.18.0.3")
        .await
        .unwrap();
    let _web = remote
        .run_labeled_pod_at(NS, "web", &[("app", "web")], "198.18.0.2")
        .await
        .unwrap();
    new_policy(
        &cluster,
        "batch-to-db",
        "podSelector: {matchLabels: {app: batch}}\n\
             egress: [{rate: 20M, peers: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    )
    .await;
    let rule = "bwp:shop/batch-to-db:egress0";
    agent
        .wait_pod_rules(NS, "batch", &[rule], Duration::from_secs(10))
        .unwrap();
    wait_prefixes(&agent, rule, 1, Duration::from_secs(5));

    // The leader dies without a word: nothing on the node changes, a change waits.
    first.kill();
    remote.label(NS, "web", &[("app", Some("db"))]).await.unwrap();
    thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), [rule]);
    wait_prefixes(&agent, rule, 1, Duration::from_secs(1));
    // The standby takes over once the Lease lapsed (15 s unrenewed) and catches up.
    let took = second
        .wait_leader(&cluster.admin, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("standby took the lease {took:?} after the leader died (2 s of it before the wait)");
    let caught_up = wait_prefixes(&agent, rule, 2, Duration::from_secs(5));
    eprintln!("the new leader's set enforced {caught_up:?} after it took the lease");

    // A clean stop gives the Lease up: the other one leads within moments.
    first.restart().unwrap();
    thread::sleep(Duration::from_millis(500));
    second.stop();
    let took = first
        .wait_leader(&cluster.admin, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("handover after a clean stop: {took:?}");
    assert!(took < Duration::from_secs(5), "handover took {took:?}");
    remote.label(NS, "web", &[("app", Some("web"))]).await.unwrap();
    wait_prefixes(&agent, rule, 1, Duration::from_secs(5));
}

/// A Service `name` of NS at ClusterIP `vip` with one EndpointSlice whose one endpoint is pod
/// `name` at `backend` (no controller-manager runs here to make it).
async fn service_with_endpoint(
    cluster: &Cluster,
    name: &str,
    vip: std::net::Ipv4Addr,
    backend: std::net::Ipv4Addr,
) {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"clusterIP": vip.to_string(), "ports": [{"port": 5201, "protocol": "TCP"}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(cluster.admin.clone(), NS)
        .create(&kube::api::PostParams::default(), &service)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [backend.to_string()],
            "targetRef": {"kind": "Pod", "namespace": NS, "name": name},
        }],
        "ports": [{"port": 5201, "protocol": "TCP"}],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(cluster.admin.clone(), NS)
        .create(&kube::api::PostParams::default(), &slice)
        .await
        .unwrap();
}

/// A Shared policy over pods on two nodes of the two-node lab: the controller splits
/// the rate between the nodes, their pods' sum holds it, and once one node's pod goes idle its
/// part moves to the busy node within a report period (10 s) or so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_bandwidth_policy_across_two_nodes_holds_the_sum_and_moves_an_idle_share() {
    use podshaper_agent::policy::BandwidthPeerSet;
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let (kubelet_a, agent_a) = lab_node(&cluster, "node-a");
    let (kubelet_b, agent_b) = lab_node(&cluster, "node-b");
    let _controller = controller(&cluster, "controller-0").await;
    let pair = NetnsPair::new().unwrap();
    let b = IpAddr::V4(NetnsPair::B_V4);
    let one = kubelet_a
        .run_labeled_pod_at(NS, "batch-a", &[("app", "batch")], "198.18.0.1")
        .await
        .unwrap();
    let two = kubelet_b
        .run_labeled_pod_at(NS, "batch-b", &[("app", "batch")], "198.18.0.1")
        .await
        .unwrap();
    new_policy(
        &cluster,
        "batch-total",
        "podSelector: {matchLabels: {app: batch}}\nscope: Shared\negress: [{rate: 30M}]\n",
    )
    .await;
    let rule = "bwp:shop/batch-total:egress0";
    let part = |agent: &AgentProcess| {
        agent
            .rules()
            .unwrap()
            .into_iter()
            .find(|r| r.name == rule)
            .map(|r| r.limit.bps())
    };
    let split = podshaper_testbed::k8s::wait_for(
        "the two nodes' parts",
        &(Some(15 * M), Some(15 * M)),
        Duration::from_secs(10),
        || Ok((part(&agent_a), part(&agent_b))),
    )
    .unwrap();
    eprintln!("split 15M + 15M {split:?} after the policy's creation");
    let rates = flows_from(&pair, &[(&one, b), (&two, b)], false, 5);
    let sum: f64 = rates.iter().sum();
    eprintln!(
        "two nodes: {:.1} + {:.1} Mbit/s, sum {:.3} of 30M",
        rates[0] / 1e6,
        rates[1] / 1e6,
        sum / (30 * M) as f64
    );
    assert_near("the sum over two nodes", sum, 30 * M);

    // node-b's pod goes idle: its part moves to node-a once node-b reported (at most once per
    // 10 s per node and policy).
    let idle_at = Instant::now();
    let _server = IperfServer::start(pair.b(), None, &ServerOptions::default()).unwrap();
    let opts = ClientOptions {
        secs: 20,
        interval: 1.0,
        ..ClientOptions::new(b)
    };
    let report = run_client(pair.a(), Some(&one.cgroup), &opts).unwrap();
    let per_second: Vec<f64> = (0..20)
        .map(|s| l3_between(&report, f64::from(s), f64::from(s + 1)) / 1e6)
        .collect();
    let moved = per_second.iter().position(|r| *r > 0.9 * 30.0);
    eprintln!(
        "alone, per second (Mbit/s): {:?}; over 27 from second {moved:?}",
        per_second.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    let last: f64 = per_second[per_second.len() - 4..].iter().sum::<f64>() / 4.0;
    assert_near("the busy node alone, at the end", last * 1e6, 30 * M);
    assert!(
        moved.is_some_and(|s| s <= 14),
        "the idle node's part did not move within 14 s: {per_second:?}"
    );
    let set = Api::<BandwidthPeerSet>::namespaced(cluster.admin.clone(), NS)
        .get("batch-total")
        .await
        .unwrap();
    eprintln!(
        "shares {:?}, reports {:?}, {:?} after node-b went idle",
        set.spec.shares,
        set.status.map(|s| s.nodes),
        idle_at.elapsed()
    );
    assert!(part(&agent_a).unwrap() >= 29 * M, "{:?}", part(&agent_a));
}

/// Tenancy: a BandwidthPolicy of namespace `shop` selecting every pod of its own namespace and
/// naming every pod of every namespace as its peers caps shop's pods only: a flow between two
/// pods of another namespace is never touched (no binding, full speed), while shop's pod is
/// capped towards the very same peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_never_changes_a_flow_with_no_endpoint_in_its_namespace() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    cluster.cp.namespace("other").await.unwrap();
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let remote = cluster.kubelet("node-b", CgroupDriver::Systemd, "").unwrap();
    let agent = agent(&cluster, None);
    let _controller = controller(&cluster, "controller-0").await;
    let pair = NetnsPair::new().unwrap();
    let server = IpAddr::V4(NetnsPair::B_V4);
    let ours = kubelet
        .run_labeled_pod_at(NS, "client", &[("app", "x")], "198.18.0.1")
        .await
        .unwrap();
    let theirs = kubelet
        .run_labeled_pod_at("other", "client", &[("app", "x")], "198.18.0.1")
        .await
        .unwrap();
    let _peer = remote
        .run_labeled_pod_at("other", "server", &[("app", "y")], &server.to_string())
        .await
        .unwrap();
    new_policy(
        &cluster,
        "everything",
        "podSelector: {}\negress: [{rate: 10M, peers: [{namespaceSelector: {}}]}]\n\
             ingress: [{rate: 10M}]\n",
    )
    .await;
    let bound = ["bwp:shop/everything:egress0", "bwp:shop/everything:ingress0"];
    agent
        .wait_pod_rules(NS, "client", &bound, Duration::from_secs(10))
        .unwrap();
    // Every pod's address: the server's, and the clients' one (both sit in the lab's A).
    wait_prefixes(&agent, bound[0], 2, Duration::from_secs(5));
    assert_eq!(agent.pod_rules("other", "client").unwrap(), Vec::<String>::new());
    let rates = flows_from(&pair, &[(&ours, server), (&theirs, server)], false, 4);
    assert_capped_beside_free(
        "shop's pod to another namespace's pod",
        rates[0],
        10 * M,
        "the other namespace's pod to the same peer",
        rates[1],
    );
    let back = flows_from(&pair, &[(&theirs, server)], true, 3)[0];
    assert!(
        back > 3.0 * 10.0 * M as f64,
        "other's download: {:.1} Mbit/s",
        back / 1e6
    );
}

/// More policy rules selecting a pod than it holds (4 a direction): it keeps the bindings it
/// has, nothing of them is lifted on the node, and it is told why; once the extra policy goes
/// the conflict is over and nothing changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_selected_by_more_rules_than_it_holds_keeps_what_it_has() {
    let Some(_g) = privileged() else { return };
    let cluster = cluster().await;
    let kubelet = kubelet(&cluster, CgroupDriver::Systemd, "");
    let agent = agent(&cluster, None);
    let _pod = kubelet
        .run_labeled_pod_at(NS, "batch", &[("app", "batch")], "198.18.0.1")
        .await
        .unwrap();
    new_policy(
        &cluster,
        "three",
        "podSelector: {matchLabels: {app: batch}}\negress: [{rate: 10M}, {rate: 20M}, {rate: 30M}]\n",
    )
    .await;
    let bound = [
        "bwp:shop/three:egress0",
        "bwp:shop/three:egress1",
        "bwp:shop/three:egress2",
    ];
    agent
        .wait_pod_rules(NS, "batch", &bound, Duration::from_secs(5))
        .unwrap();
    new_policy(
        &cluster,
        "two",
        "podSelector: {}\negress: [{rate: 1M}, {rate: 2M}]\n",
    )
    .await;
    let note = cluster
        .wait_event(NS, "batch", "BandwidthPolicyConflict", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(note.contains("5 egress rules"), "{note}");
    // Past a sweep of unneeded rules (every 10 s), the pod's rules and bindings are as before.
    thread::sleep(Duration::from_secs(11));
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), bound);
    assert_eq!(policy_rules(&agent), bound);
    delete_policy(&cluster, "two").await;
    thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.pod_rules(NS, "batch").unwrap(), bound);
}
