//! Prometheus metrics and the health endpoints, on one plain-HTTP port.
//!
//! Per-pod figures (limit, rate, bytes, drops, marks) come from the datapath's counters: the
//! agent stores a snapshot once a second and the collector encodes it at scrape time, so a
//! scrape never touches BPF maps. Error counters are ordinary counters.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use podshaper_api::proto::{CgroupStatus, DirectionStatus, NodeStatus};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge},
    registry::Registry,
};

/// Labels of a per-pod error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

/// One limited pod, as last sampled.
#[derive(Clone, Debug)]
pub struct PodSample {
    pub namespace: String,
    pub pod: String,
    pub status: CgroupStatus,
}

#[derive(Debug, Default)]
struct Pods(Mutex<Vec<PodSample>>);

type Field = (
    &'static str,
    &'static str,
    fn(&DirectionStatus) -> Option<u64>,
    bool,
);

// name, help, value, is a counter
const FIELDS: [Field; 6] = [
    (
        "podshaper_pod_limit_bits_per_second",
        "Limit of the pod (L3 bits/s)",
        |d| d.limit.map(|r| r.bps()),
        false,
    ),
    (
        "podshaper_pod_rate_bits_per_second",
        "Rate over the last second (L3 bits/s)",
        |d| Some(d.rate_bps),
        false,
    ),
    (
        "podshaper_pod_bytes",
        "L3 bytes since the pod was limited",
        |d| Some(d.bytes),
        true,
    ),
    (
        "podshaper_pod_drops",
        "Packets dropped by the policer",
        |d| Some(d.drops),
        true,
    ),
    (
        "podshaper_pod_marks",
        "Congestion signals: CN on egress, ECN CE on ingress",
        |d| Some(d.marks),
        true,
    ),
    (
        "podshaper_pod_unpaced_flows",
        "Ingress TCP flows dropped after their sender had time to pace at the rate option: \
         senders without podshaper, or paths that strip TCP options",
        |d| d.unpaced_flows,
        true,
    ),
];

impl Collector for Pods {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.0.lock().map_err(|_| std::fmt::Error)?;
        for (name, help, value, counter) in FIELDS {
            let kind = if counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0i64).metric_type()
            };
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for p in pods.iter() {
                for (direction, d) in [("egress", &p.status.egress), ("ingress", &p.status.ingress)] {
                    let Some(v) = value(d) else { continue };
                    let labels = [
                        ("namespace", p.namespace.as_str()),
                        ("pod", p.pod.as_str()),
                        ("direction", direction),
                    ];
                    let m = family.encode_family(&labels)?;
                    if counter {
                        ConstCounter::new(v).encode(m)?;
                    } else {
                        ConstGauge::new(v as i64).encode(m)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The node's rate-option counters, as last sampled (docs/rate-option.md).
#[derive(Debug, Default)]
struct Node(Mutex<Option<NodeStatus>>);

/// A rate-option event: its label and its counter.
type OptionEvent = (&'static str, fn(&NodeStatus) -> u64);

const OPTION_EVENTS: [OptionEvent; 7] = [
    ("written", |n| n.options_written),
    ("no_room", |n| n.options_no_room),
    ("exists", |n| n.options_exists),
    ("taken", |n| n.options_taken),
    ("lifted", |n| n.options_lifted),
    ("malformed", |n| n.options_malformed),
    ("outside_window", |n| n.options_outside),
];

impl Collector for Node {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = self.0.lock().map_err(|_| std::fmt::Error)?;
        let Some(n) = node.as_ref() else { return Ok(()) };
        let mut family = encoder.encode_descriptor(
            "podshaper_rate_options",
            "Rate options on this node: written by limited receivers (or not: no_room, exists), taken by senders (taken, lifted) or ignored (malformed, outside_window)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (event, value) in OPTION_EVENTS {
            ConstCounter::new(value(n)).encode(family.encode_family(&[("event", event)])?)?;
        }
        Ok(())
    }
}

/// Everything the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pods: Arc<Pods>,
    node: Arc<Node>,
    /// Malformed bandwidth annotations seen, per pod.
    pub invalid_annotations: Family<PodLabels, Counter>,
    /// Attempts to find a pod's cgroup that failed, per pod.
    pub cgroup_not_found: Family<PodLabels, Counter>,
    /// Limits the daemon refused or failed to apply, per pod.
    pub apply_errors: Family<PodLabels, Counter>,
    /// Pods with a limit in force on this node.
    pub pods_limited: Gauge,
    ready: AtomicBool,
    /// Limits lifted by the uninstall hook: alive, not limiting.
    idle: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let pods = Arc::new(Pods::default());
        let node = Arc::new(Node::default());
        let invalid_annotations = Family::<PodLabels, Counter>::default();
        let cgroup_not_found = Family::<PodLabels, Counter>::default();
        let apply_errors = Family::<PodLabels, Counter>::default();
        let pods_limited = Gauge::default();
        registry.register(
            "podshaper_invalid_annotations",
            "Malformed bandwidth annotations seen (the pod's limit was left as it was)",
            invalid_annotations.clone(),
        );
        registry.register(
            "podshaper_cgroup_not_found",
            "Failed lookups of a pod's cgroup (retried with backoff)",
            cgroup_not_found.clone(),
        );
        registry.register(
            "podshaper_apply_errors",
            "Limits the datapath refused",
            apply_errors.clone(),
        );
        registry.register(
            "podshaper_pods_limited",
            "Pods with a limit in force on this node",
            pods_limited.clone(),
        );
        registry.register_collector(Box::new(pods.clone()));
        registry.register_collector(Box::new(node.clone()));
        Self {
            registry,
            pods,
            node,
            invalid_annotations,
            cgroup_not_found,
            apply_errors,
            pods_limited,
            ready: AtomicBool::new(false),
            idle: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Replaces the per-pod snapshot.
    pub fn set_pods(&self, pods: Vec<PodSample>) {
        self.pods_limited.set(pods.len() as i64);
        if let Ok(mut p) = self.pods.0.lock() {
            *p = pods;
        }
    }

    /// Replaces the node's rate-option snapshot (none while no datapath is loaded).
    pub fn set_node(&self, node: Option<NodeStatus>) {
        if let Ok(mut n) = self.node.0.lock() {
            *n = node;
        }
    }

    /// Forgets the error counters of a deleted pod so the series end with it.
    pub fn forget(&self, labels: &PodLabels) {
        self.invalid_annotations.remove(labels);
        self.cgroup_not_found.remove(labels);
        self.apply_errors.remove(labels);
    }

    /// Marks the agent ready: the first full list of pods has been reconciled.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Marks the agent idle (limits lifted for an uninstall): /readyz then says so.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Serves /metrics, /healthz and /readyz on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        // Alive while the runtime answers; the watch loop restarts itself on API errors.
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "encode metrics".into(),
        ),
    }
}

async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.idle.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "idle: every limit lifted for an uninstall",
        )
    } else if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "reconciling the pods of this node",
        )
    }
}

#[cfg(test)]
mod tests {
    use podshaper_api::Rate;

    use super::*;

    #[test]
    fn per_pod_series_carry_namespace_pod_and_direction() {
        let m = Metrics::default();
        let mut status = CgroupStatus {
            cgroup: "/x".into(),
            id: 1,
            name: None,
            egress: DirectionStatus::default(),
            ingress: DirectionStatus::default(),
            peers: Vec::new(),
        };
        status.egress.limit = Some(Rate::parse_quantity("10M").unwrap());
        status.egress.bytes = 1234;
        status.ingress.unpaced_flows = Some(3);
        m.set_pods(vec![PodSample {
            namespace: "ns".into(),
            pod: "web".into(),
            status,
        }]);
        m.invalid_annotations
            .get_or_create(&PodLabels {
                namespace: "ns".into(),
                pod: "bad".into(),
            })
            .inc();
        let text = m.encode().unwrap();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        has(r#"podshaper_pod_limit_bits_per_second{namespace="ns",pod="web",direction="egress"} 10000000"#);
        has(r#"podshaper_pod_bytes_total{namespace="ns",pod="web",direction="egress"} 1234"#);
        has(r#"podshaper_invalid_annotations_total{namespace="ns",pod="bad"} 1"#);
        has(r#"podshaper_pod_unpaced_flows_total{namespace="ns",pod="web",direction="ingress"} 3"#);
        // Egress has no such count: no series.
        assert!(!text
            .contains(r#"podshaper_pod_unpaced_flows_total{namespace="ns",pod="web",direction="egress"}"#));
        has("podshaper_pods_limited 1");
        assert!(
            !text.contains("podshaper_rate_options"),
            "no datapath, no option series"
        );
        m.set_node(Some(NodeStatus {
            options_written: 7,
            options_malformed: 2,
            ..NodeStatus::default()
        }));
        let text = m.encode().unwrap();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        has(r#"podshaper_rate_options_total{event="written"} 7"#);
        has(r#"podshaper_rate_options_total{event="malformed"} 2"#);
        has(r#"podshaper_rate_options_total{event="taken"} 0"#);
        // No limit, no limit series.
        assert!(!text.contains(
            r#"podshaper_pod_limit_bits_per_second{namespace="ns",pod="web",direction="ingress"}"#
        ));
    }
}
