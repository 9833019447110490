//! The podshaper Kubernetes agent: the thesis's second client. It watches the pods of its
//! node and limits each one as its `kubernetes.io/{egress,ingress}-bandwidth` annotations and
//! the BandwidthPolicies that select it say, live. It runs the daemon in the same process (one container, one set of privileges, no
//! socket hop) and still serves the daemon's socket, so `podshaper status` works on the node.
pub mod annotations;
pub mod bindings;
pub mod controller;
mod decide;
pub mod metrics;
pub mod podcgroup;
pub mod policy;
mod reconcile;
pub mod share;
mod uninstall;

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{events::Reporter, watcher, WatchStreamExt},
    Api, Client,
};
use podshaper_api::Rate;
use tokio::sync::watch;
use tracing::{info, warn};

pub use reconcile::Settings;
pub use uninstall::signal_uninstall;

/// How long the BandwidthPolicy API must answer 404 before the agent takes it as not
/// installed (and so no policy to enforce).
const CRD_ABSENT_AFTER: Duration = Duration::from_secs(30);
/// How long a peer set watch may take to list before a change of the sets wanted replaces it.
const SETS_RELIST_AFTER: Duration = Duration::from_secs(10);

type PeerSetWatch =
    futures::stream::BoxStream<'static, Result<watcher::Event<policy::BandwidthPeerSet>, watcher::Error>>;

/// A watch of the peer sets of the policies with these uids.
fn peer_set_watch(client: &Client, uids: &BTreeSet<String>) -> PeerSetWatch {
    let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
    let selector = format!("{} in ({})", policy::POLICY_UID_LABEL, uids.join(","));
    let config = watcher::Config::default().labels(&selector);
    watcher(Api::<policy::BandwidthPeerSet>::all(client.clone()), config)
        .default_backoff()
        .boxed()
}

/// The next event of the peer set watch; never, while there is none.
async fn next_peer_set(
    watch: &mut Option<PeerSetWatch>,
) -> Result<watcher::Event<policy::BandwidthPeerSet>, watcher::Error> {
    match watch {
        Some(w) => match w.next().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The node whose pods are limited (spec.nodeName).
    pub node_name: String,
    /// The agent's own pod, where the uninstall hook's signal arrives.
    pub own_pod: Option<(String, String)>,
    pub metrics_addr: SocketAddr,
    pub max_rate: Option<Rate>,
    pub driver: podcgroup::Driver,
    pub daemon: podshaper_daemon::Options,
}

/// Runs the agent until SIGTERM or SIGINT. Limits stay in force when it stops, unless the
/// uninstall hook asked it to lift them.
pub async fn run(opts: Options) -> Result<()> {
    // The local API, for `podshaper status` on the node. Bound before anything else: a
    // second agent or daemon serving it would fight this one over the limits, and must not
    // touch the pinned state first.
    let server = podshaper_daemon::Server::bind(&opts.daemon.socket).await?;
    let state = opts.daemon.open().context("open the datapath")?;
    let client = Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;
    let metrics = Arc::new(metrics::Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let server = tokio::spawn(server.serve(state.clone(), stopped(stop_rx.clone())));
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| format!("listen on {} for metrics", opts.metrics_addr))?;
    let http = tokio::spawn(metrics::serve(listener, metrics.clone(), stopped(stop_rx)));

    let reporter = Reporter {
        controller: "podshaper".into(),
        instance: Some(opts.node_name.clone()),
    };
    let settings = Settings {
        node: opts.node_name.clone(),
        max_rate: opts.max_rate,
        driver: opts.driver,
        own_pod: opts.own_pod.clone(),
    };
    let mut reconciler =
        reconcile::Reconciler::new(state.clone(), client.clone(), reporter, metrics.clone(), settings);
    // Only this node's pods: the apiserver filters, so the agent's memory does not grow with
    // the cluster.
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let mut pods = std::pin::pin!(watcher(Api::<Pod>::all(client.clone()), config).default_backoff());

    // Every policy of the cluster: few and small next to pods; the agent keeps the rules of
    // those that select a pod of its node.
    let mut policies = std::pin::pin!(watcher(
        Api::<policy::BandwidthPolicy>::all(client.clone()),
        watcher::Config::default()
    )
    .default_backoff());
    // Only the peer sets of the policies selecting a pod here, by label: the apiserver sends
    // this node nothing of the others. Watched anew when that list changes.
    let mut peer_sets: Option<PeerSetWatch> = None;
    let mut watched_sets: Option<BTreeSet<String>> = None;
    let mut sets_watched_since = tokio::time::Instant::now();
    // When the policy list first answered 404 (the CRD not served) in a row.
    let mut not_served_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let shutdown = podshaper_daemon::shutdown_signal()?;
    tokio::pin!(shutdown);
    info!(node = %opts.node_name, metrics = %opts.metrics_addr, "agent started");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = pods.next() => match event {
                Some(Ok(event)) => reconciler.on_event(event),
                // The watcher retries with backoff; limits stay as they are meanwhile.
                Some(Err(e)) => warn!(error = %e, "pod watch"),
                None => break,
            },
            event = policies.next() => match event {
                Some(Ok(event)) => {
                    not_served_since = None;
                    reconciler.on_policy_event(event)
                }
                // Not served for a while: the CRD is not installed. A moment's 404 (an
                // apiserver starting) must not read as "no policies", which would lift them.
                Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))) if s.code == 404 => {
                    let since = *not_served_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= CRD_ABSENT_AFTER {
                        reconciler.no_policy_api()
                    } else {
                        warn!("the BandwidthPolicy API answers 404; bindings stay as they are")
                    }
                }
                // Bindings stay as they are meanwhile (fail-static).
                Some(Err(e)) => warn!(error = %e, "BandwidthPolicy watch"),
                None => break,
            },
            event = next_peer_set(&mut peer_sets) => match event {
                Ok(event) => reconciler.on_peer_set_event(event),
                Err(e) => warn!(error = %e, "BandwidthPeerSet watch"),
            },
            // The agent owns the daemon's periodic work too: one tick for both.
            _ = tick.tick() => reconciler.tick(),
        }
        // A new watch relists every set it needs: not while the last one is still listing
        // (unless that takes long), so quick changes cannot keep the sets from ever arriving.
        let wanted = reconciler.wanted_sets();
        let settled = !reconciler.listing_sets() || sets_watched_since.elapsed() >= SETS_RELIST_AFTER;
        if wanted.is_some() && wanted != watched_sets && settled {
            sets_watched_since = tokio::time::Instant::now();
            peer_sets = wanted
                .as_ref()
                .filter(|uids| !uids.is_empty())
                .map(|uids| peer_set_watch(&client, uids));
            if peer_sets.is_none() {
                reconciler.no_sets_needed();
            }
            watched_sets = wanted;
        }
    }
    let _ = stop_tx.send(true);
    if let Err(e) = server.await {
        warn!(error = %e, "local API");
    }
    if let Ok(Err(e)) = http.await {
        warn!(error = %e, "metrics server");
    }
    info!(lifted = reconciler.uninstalled(), "agent stopped");
    Ok(())
}
