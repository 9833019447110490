//! The policy controller: one per cluster at a time (leader-elected on a Lease). It watches
//! BandwidthPolicies, pods, namespaces, Services and EndpointSlices, resolves each policy's
//! podSelector and namespaceSelector peers into addresses (the pods', and the ClusterIPs of the
//! Services in front of only such pods), publishes them in a BandwidthPeerSet per policy for
//! the agents, and writes each policy's status. It never touches a node: the agents enforce.
pub mod index;
pub mod lease;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tracing::{debug, info, warn};

use crate::policy::{BandwidthPeerSet, BandwidthPolicy, BandwidthPolicyStatus, POLICY_UID_LABEL};
use index::{Index, Key, PodInfo, SliceInfo};

/// How often what changed is published: changes within one period go out in one write per
/// policy, which bounds the writes a churning cluster causes (at most 10 per policy per
/// second, whatever the number of pods that changed).
const FLUSH_PERIOD: Duration = Duration::from_millis(100);
/// A failed write is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A policy's status is written again for a change of its counts alone (selectedPods,
/// enforcingNodes) at most this often: every agent watches the policies, so each status
/// write reaches every node, and pod churn changes the counts all the time. A change of the
/// condition, generation or summary is written at once.
const COUNTS_EVERY: Duration = Duration::from_secs(30);
/// The field manager of the controller's server-side applies.
const MANAGER: &str = "podshaper-controller";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The namespace of its Lease (the chart's).
    pub namespace: String,
    pub lease_name: String,
    /// This candidate's name in the Lease (its pod's name).
    pub identity: String,
}

/// Runs the controller until SIGTERM or SIGINT: waits for the lease, then reconciles while it
/// holds it. Losing the lease ends it with an error (the Deployment starts it again, to
/// campaign afresh).
pub async fn run(opts: Options) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;
    let shutdown = podshaper_daemon::shutdown_signal()?;
    tokio::pin!(shutdown);
    let elector = std::sync::Arc::new(lease::Elector::new(
        client.clone(),
        &opts.namespace,
        &opts.lease_name,
        &opts.identity,
    ));
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        held = elector.acquire() => held?,
    }
    // Renewed in a task of its own, so a long flush never delays a renewal; writes stop as
    // soon as it gives up.
    let leading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut keep = {
        let (elector, leading) = (elector.clone(), leading.clone());
        tokio::spawn(async move {
            let lost = elector.keep().await;
            leading.store(false, std::sync::atomic::Ordering::SeqCst);
            lost
        })
    };

    let mut policies = std::pin::pin!(watcher(
        Api::<BandwidthPolicy>::all(client.clone()),
        watcher::Config::default()
    )
    .default_backoff());
    let mut pods = std::pin::pin!(
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff()
    );
    let mut namespaces =
        std::pin::pin!(
            watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()).default_backoff()
        );
    let mut services =
        std::pin::pin!(
            watcher(Api::<Service>::all(client.clone()), watcher::Config::default()).default_backoff()
        );
    let mut slices = std::pin::pin!(watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
    )
    .default_backoff());
    let sets_config = watcher::Config::default().labels(POLICY_UID_LABEL);
    let mut sets =
        std::pin::pin!(watcher(Api::<BandwidthPeerSet>::all(client.clone()), sets_config).default_backoff());
    let mut controller = Controller::new(client, leading);
    let mut flush = tokio::time::interval(FLUSH_PERIOD);
    info!(identity = %opts.identity, "controller started");
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            lost = &mut keep => break match lost {
                Ok(lost) => lost.context("leadership lost"),
                Err(e) => Err(e).context("the lease renewal task"),
            },
            Some(e) = policies.next() => match e {
                Ok(e) => controller.on_policy(e),
                Err(e) => warn!(error = %e, "BandwidthPolicy watch"),
            },
            Some(e) = pods.next() => match e {
                Ok(e) => controller.on_pod(e),
                Err(e) => warn!(error = %e, "pod watch"),
            },
            Some(e) = namespaces.next() => match e {
                Ok(e) => controller.on_namespace(e),
                Err(e) => warn!(error = %e, "namespace watch"),
            },
            Some(e) = sets.next() => match e {
                Ok(e) => controller.on_peer_set(e),
                Err(e) => warn!(error = %e, "BandwidthPeerSet watch"),
            },
            Some(e) = services.next() => match e {
                Ok(e) => controller.on_service(e),
                Err(e) => warn!(error = %e, "Service watch"),
            },
            Some(e) = slices.next() => match e {
                Ok(e) => controller.on_slice(e),
                Err(e) => warn!(error = %e, "EndpointSlice watch"),
            },
            _ = flush.tick() => controller.flush().await,
        }
    };
    keep.abort();
    if let Err(e) = elector.release().await {
        debug!(error = %e, "release the lease");
    }
    info!("controller stopped");
    result
}

/// A watch's relist in progress: the keys it listed so far.
type Listing = Option<HashSet<Key>>;

/// The controller's state between events.
struct Controller {
    client: Client,
    /// Whether this process still holds the Lease: no write once it may not.
    leading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    index: Index,
    /// The peer sets as they are in the API (the controller's own writes come back here).
    sets: BTreeMap<Key, BandwidthPeerSet>,
    /// Policies (and peer sets) to publish at the next flush.
    dirty: BTreeSet<Key>,
    /// Policies to publish again later: writes that failed (after RETRY_AFTER), count
    /// changes held back (COUNTS_EVERY).
    later: BTreeMap<Key, tokio::time::Instant>,
    /// When each policy's status was last written.
    status_written: BTreeMap<Key, tokio::time::Instant>,
    listings: [Listing; WATCHES],
    /// Which watches listed once: nothing is published before all have, so a partial list
    /// never shrinks a set.
    listed: [bool; WATCHES],
}

const POLICIES: usize = 0;
const PODS: usize = 1;
const NAMESPACES: usize = 2;
const SETS: usize = 3;
const SERVICES: usize = 4;
const SLICES: usize = 5;
const WATCHES: usize = 6;

impl Controller {
    fn new(client: Client, leading: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self {
            client,
            leading,
            index: Index::default(),
            sets: BTreeMap::new(),
            dirty: BTreeSet::new(),
            later: BTreeMap::new(),
            status_written: BTreeMap::new(),
            listings: Default::default(),
            listed: [false; WATCHES],
        }
    }

    /// Every policy is to be published again: something any selector may read changed.
    fn all_dirty(&mut self) {
        self.dirty.extend(self.index.policy_keys());
    }

    /// The common steps of a watch event: tracks a relist, and at its end returns the keys
    /// it did not list (gone while the watch was down).
    fn track(&mut self, which: usize, event: &watcher::Event<impl Resource>, known: Vec<Key>) -> Vec<Key> {
        match event {
            watcher::Event::Init => self.listings[which] = Some(HashSet::new()),
            watcher::Event::InitApply(o) => {
                if let Some(l) = self.listings[which].as_mut() {
                    // Cluster-scoped objects (namespaces) are keyed with an empty namespace.
                    let meta = o.meta();
                    l.insert((
                        meta.namespace.clone().unwrap_or_default(),
                        meta.name.clone().unwrap_or_default(),
                    ));
                }
            }
            watcher::Event::InitDone => {
                self.listed[which] = true;
                if let Some(listed) = self.listings[which].take() {
                    return known.into_iter().filter(|k| !listed.contains(k)).collect();
                }
            }
            _ => {}
        }
        Vec::new()
    }

    fn on_policy(&mut self, event: watcher::Event<BandwidthPolicy>) {
        let gone = self.track(POLICIES, &event, self.index.policy_keys());
        for key in gone {
            self.index.delete_policy(&key);
            self.dirty.insert(key);
        }
        match event {
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                if let Some(key) = self.index.set_policy(p) {
                    self.dirty.insert(key);
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(ns) = p.namespace() {
                    let key = (ns, p.name_any());
                    self.index.delete_policy(&key);
                    self.status_written.remove(&key);
                    self.dirty.insert(key);
                }
            }
            _ => {}
        }
    }

    fn on_pod(&mut self, event: watcher::Event<Pod>) {
        let gone = self.track(PODS, &event, self.index.pod_keys());
        for (ns, name) in gone {
            self.pod_changed(&ns, &name, None);
        }
        match event {
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                if let Some((ns, name, info)) = PodInfo::of(&p) {
                    self.pod_changed(&ns, &name, Some(info));
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(ns) = p.namespace() {
                    self.pod_changed(&ns, &p.name_any(), None);
                }
            }
            _ => {}
        }
    }

    /// Puts a pod's new state (none: gone) in the index and marks the policies it may alter:
    /// a pod's change costs a check per policy, not a recomputation of every policy.
    fn pod_changed(&mut self, namespace: &str, name: &str, info: Option<PodInfo>) {
        let old = self.index.pod(namespace, name).cloned();
        let mut labels = Vec::new();
        let mut ips = Vec::new();
        for p in old.iter().chain(info.iter()) {
            labels.push(p.labels.clone());
            ips.extend(p.ips.iter().copied());
        }
        // An address it gives back is held twice before the change, one it takes after.
        let mut any = self.index.held_twice(&ips);
        let changed = match info {
            Some(info) => self.index.set_pod(namespace.to_string(), name.to_string(), info),
            None => self.index.delete_pod(namespace, name),
        };
        if !changed {
            return;
        }
        any |= self.index.held_twice(&ips);
        if any {
            self.all_dirty();
        } else {
            let refs: Vec<&BTreeMap<String, String>> = labels.iter().collect();
            let touched = self.index.touching(namespace, &refs);
            self.dirty.extend(touched);
        }
    }

    fn on_namespace(&mut self, event: watcher::Event<Namespace>) {
        let known = self
            .index
            .namespace_names()
            .into_iter()
            .map(|n| (String::new(), n))
            .collect();
        let gone = self.track(NAMESPACES, &event, known);
        let mut changed = false;
        for (_, name) in gone {
            changed |= self.index.delete_namespace(&name);
        }
        match event {
            watcher::Event::InitApply(n) | watcher::Event::Apply(n) => {
                changed |= self.index.set_namespace(n.name_any(), n.labels().clone());
            }
            watcher::Event::Delete(n) => changed |= self.index.delete_namespace(&n.name_any()),
            _ => {}
        }
        if changed {
            self.all_dirty();
        }
    }

    fn on_service(&mut self, event: watcher::Event<Service>) {
        let gone = self.track(SERVICES, &event, self.index.service_keys());
        let mut changed = false;
        for key in gone {
            changed |= self.index.delete_service(&key);
        }
        match event {
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                if let Some(ns) = s.namespace() {
                    changed |= self.index.set_service((ns, s.name_any()), index::cluster_ips(&s));
                }
            }
            watcher::Event::Delete(s) => {
                if let Some(ns) = s.namespace() {
                    changed |= self.index.delete_service(&(ns, s.name_any()));
                }
            }
            _ => {}
        }
        if changed {
            self.all_dirty();
        }
    }

    fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) {
        let gone = self.track(SLICES, &event, self.index.slice_keys());
        for key in gone {
            self.slice_changed(key, None);
        }
        match event {
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                if let Some((ns, name, info)) = SliceInfo::of(&s) {
                    self.slice_changed((ns, name), Some(info));
                }
            }
            watcher::Event::Delete(s) => {
                if let Some(ns) = s.namespace() {
                    self.slice_changed((ns, s.name_any()), None);
                }
            }
            _ => {}
        }
    }

    /// Puts a slice's new state (none: gone) in the index and marks the policies that pick
    /// one of its pods, before or after: only they can gain or lose its Service's address.
    fn slice_changed(&mut self, key: Key, info: Option<SliceInfo>) {
        let mut pods: Vec<Key> = self
            .index
            .slice(&key)
            .map(|s| s.pods.clone())
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        pods.extend(info.iter().flat_map(|s| s.pods.iter().flatten().cloned()));
        let changed = match info {
            Some(info) => self.index.set_slice(key, info),
            None => self.index.delete_slice(&key),
        };
        if !changed {
            return;
        }
        for (ns, name) in pods {
            let Some(labels) = self.index.pod(&ns, &name).map(|p| p.labels.clone()) else {
                continue;
            };
            let touched = self.index.touching(&ns, &[&labels]);
            self.dirty.extend(touched);
        }
    }

    fn on_peer_set(&mut self, event: watcher::Event<BandwidthPeerSet>) {
        let gone = self.track(SETS, &event, self.sets.keys().cloned().collect());
        for key in gone {
            // Deleted while the watch was down: published again if its policy wants one.
            self.sets.remove(&key);
            self.dirty.insert(key);
        }
        match event {
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                if let Some(ns) = s.namespace() {
                    let key = (ns, s.name_any());
                    // One the controller did not write as it is now (an older controller's, or
                    // edited by hand, or of a policy gone while no controller ran): looked at.
                    self.dirty.insert(key.clone());
                    self.sets.insert(key, s);
                }
            }
            watcher::Event::Delete(s) => {
                if let Some(ns) = s.namespace() {
                    let key = (ns, s.name_any());
                    self.sets.remove(&key);
                    self.dirty.insert(key);
                }
            }
            watcher::Event::InitDone => {
                let keys: Vec<Key> = self.sets.keys().cloned().collect();
                self.dirty.extend(keys);
            }
            watcher::Event::Init => {}
        }
    }

    /// Publishes every dirty policy: its peer set (created, changed or deleted) and its status,
    /// each written only when it differs from what the API has.
    async fn flush(&mut self) {
        if !self.listed.iter().all(|l| *l) || self.listings.iter().any(Option::is_some) {
            return;
        }
        let now = tokio::time::Instant::now();
        let due: Vec<Key> = self
            .later
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.later.remove(&key);
            self.dirty.insert(key);
        }
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            if !self.leading.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.publish(&key).await {
                warn!(policy = %format!("{}/{}", key.0, key.1), error = %e, "publish");
                self.later.insert(key, now + RETRY_AFTER);
            }
        }
    }

    async fn publish(&mut self, key: &Key) -> Result<()> {
        let (namespace, name) = key;
        let sets: Api<BandwidthPeerSet> = Api::namespaced(self.client.clone(), namespace);
        let demand = self.sets.get(key).and_then(|s| s.status.as_ref());
        let Some(published) = self.index.publish(key, Timestamp::now(), demand) else {
            // The policy is gone: so goes its set (its owner reference does that too where a
            // garbage collector runs).
            if self.sets.contains_key(key) {
                delete(&sets, name).await?;
                info!(policy = %format!("{namespace}/{name}"), "peer set deleted with its policy");
            }
            return Ok(());
        };
        let Some(policy) = self.index.policy(key).cloned() else {
            return Ok(());
        };
        match published.peer_set {
            _ if published.keep_set => {}
            Some(spec) => {
                let current = self.sets.get(key);
                if current.map(|s| &s.spec) != Some(&spec) {
                    let mut set = BandwidthPeerSet::new(name, spec);
                    set.metadata.namespace = Some(namespace.clone());
                    set.metadata.labels = Some(
                        [
                            (POLICY_UID_LABEL.to_string(), set.spec.policy_uid.clone()),
                            ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
                        ]
                        .into(),
                    );
                    set.metadata.owner_references = Some(vec![owner(&policy)]);
                    let count: usize = set
                        .spec
                        .egress
                        .iter()
                        .chain(&set.spec.ingress)
                        .map(|r| r.addresses.len())
                        .sum();
                    sets.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&set))
                        .await
                        .context("apply the peer set")?;
                    info!(policy = %format!("{namespace}/{name}"), addresses = count, "peer set published");
                }
            }
            None if self.sets.contains_key(key) => {
                delete(&sets, name).await?;
            }
            None => {}
        }
        if policy.status.as_ref() != Some(&published.status) {
            let current = policy.status.clone().unwrap_or_default();
            let counts_only = BandwidthPolicyStatus {
                selected_pods: current.selected_pods,
                enforcing_nodes: current.enforcing_nodes,
                ..published.status.clone()
            } == current;
            let last = self.status_written.get(key).copied();
            if let Some(last) = last.filter(|at| counts_only && at.elapsed() < COUNTS_EVERY) {
                self.later.entry(key.clone()).or_insert(last + COUNTS_EVERY);
                return Ok(());
            }
            let policies: Api<BandwidthPolicy> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({ "status": published.status });
            match policies
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.status_written
                        .insert(key.clone(), tokio::time::Instant::now());
                }
                // Deleted meanwhile: its Delete event follows.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e).context("write the status"),
            }
        }
        Ok(())
    }
}

async fn delete(sets: &Api<BandwidthPeerSet>, name: &str) -> Result<()> {
    match sets.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).context("delete the peer set"),
    }
}

/// The owner reference of a peer set: its policy, so a garbage collector deletes it with it.
fn owner(policy: &BandwidthPolicy) -> OwnerReference {
    OwnerReference {
        api_version: BandwidthPolicy::api_version(&()).into(),
        kind: BandwidthPolicy::kind(&()).into(),
        name: policy.name_any(),
        uid: policy.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}
