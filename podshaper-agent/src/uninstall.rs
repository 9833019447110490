//! The other end of the uninstall signal, run by the chart's pre-delete hook: mark every agent
//! pod, then wait until each one says (with an Event) that it lifted its node's limits.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    api::{ListParams, Patch, PatchParams},
    Api, Client, ResourceExt,
};
use tracing::{info, warn};

use crate::annotations::UNINSTALL;

/// Asks the agent pods matching `selector` in `namespace` to lift every limit, and waits up
/// to `timeout` for them to confirm. An agent that does not answer (its node is down) is
/// reported, not waited for: its limits go with the node's next reboot or `podshaper reset`.
pub async fn signal_uninstall(namespace: &str, selector: &str, timeout: Duration) -> Result<Vec<String>> {
    let client = Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let events: Api<Event> = Api::namespaced(client, namespace);
    let agents = pods
        .list(&ListParams::default().labels(selector))
        .await
        .with_context(|| format!("list agent pods in {namespace} with {selector}"))?;
    let mut waiting = BTreeSet::new();
    let patch = serde_json::json!({ "metadata": { "annotations": { UNINSTALL: "true" } } });
    for pod in agents {
        let name = pod.name_any();
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("annotate agent pod {namespace}/{name}"))?;
        waiting.insert(name);
    }
    info!(agents = waiting.len(), "asked the agents to lift every limit");
    let deadline = Instant::now() + timeout;
    while !waiting.is_empty() && Instant::now() < deadline {
        let list = events.list(&ListParams::default()).await.context("list events")?;
        for e in list.items {
            let regarding = e.regarding.as_ref().and_then(|r| r.name.clone());
            if e.reason.as_deref() == Some("LimitsLifted") {
                if let Some(name) = regarding {
                    waiting.remove(&name);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for name in &waiting {
        warn!(pod = %name, "agent did not confirm; its node keeps its limits until `podshaper reset` runs there");
    }
    Ok(waiting.into_iter().collect())
}
