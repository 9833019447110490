//! The agent's core: from the pods of this node (as the watch reports them) to limits in the
//! datapath. One pod at a time, never touching a pod whose annotations did not change or are
//! malformed; every outcome a user should see becomes an Event on the pod. Synchronous: the
//! datapath is in-process and answers in microseconds; Events go out in tasks of their own.
use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
    Resource, ResourceExt,
};
use podshaper_api::{
    proto::{CgroupStatus, Change},
    Limits, Rate,
};
use podshaper_daemon::State;
use tracing::{debug, info, warn};

use crate::{
    annotations,
    decide::{self, Decision, Known, REPORT_MISSING_AFTER},
    metrics::{Metrics, PodLabels, PodSample},
    podcgroup::{self, Driver, Qos},
};

/// What the agent needs to know of a pod.
#[derive(Clone, Debug)]
struct PodView {
    namespace: String,
    name: String,
    uid: String,
    qos: Option<Qos>,
    phase: String,
    annotations: std::collections::BTreeMap<String, String>,
    reference: ObjectReference,
}

impl PodView {
    fn of(pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref();
        Some(Self {
            namespace: pod.namespace()?,
            name: pod.name_any(),
            uid: pod.uid()?,
            qos: Qos::from_status(status.and_then(|s| s.qos_class.as_deref())),
            phase: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into()),
            annotations: pod.annotations().clone(),
            reference: pod.object_ref(&()),
        })
    }

    fn labels(&self) -> PodLabels {
        PodLabels {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod the agent tracks, and what it did for it.
#[derive(Debug)]
struct Tracked {
    pod: PodView,
    /// The cgroup and limits last applied (or found applied) for this pod.
    applied: Option<(PathBuf, Limits)>,
    /// The last problem reported in an Event, so a pod is not told the same thing twice.
    reported: Option<String>,
    /// The last "cut to the maximum" warning, kept apart: the limit is in force all the same.
    capped: Option<String>,
    /// Cgroup lookups that failed in a row, and when to try again.
    missing: u32,
    /// Failed applies in a row (the datapath refused), for the retry backoff.
    failures: u32,
    retry_at: Option<Instant>,
}

/// Settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_rate: Option<Rate>,
    pub driver: Driver,
    /// The agent's own pod (namespace, name): where the uninstall signal arrives.
    pub own_pod: Option<(String, String)>,
}

/// Turns watch events into datapath requests and Events.
pub struct Reconciler {
    state: Arc<Mutex<State>>,
    cgroup_root: PathBuf,
    client: kube::Client,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    settings: Settings,
    pods: HashMap<String, Tracked>,
    /// UIDs listed since the watch (re)started, to drop pods deleted while it was down.
    listing: Option<HashSet<String>>,
    uninstalled: bool,
    ticks: u64,
}

impl Reconciler {
    pub fn new(
        state: Arc<Mutex<State>>,
        client: kube::Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let cgroup_root = state
            .lock()
            .map(|s| s.cgroup_mount().to_path_buf())
            .unwrap_or_default();
        Self {
            state,
            cgroup_root,
            client,
            reporter,
            metrics,
            settings,
            pods: HashMap::new(),
            listing: None,
            uninstalled: false,
            ticks: 0,
        }
    }

    /// Whether the uninstall hook asked this agent to lift every limit (it then stays idle).
    pub fn uninstalled(&self) -> bool {
        self.uninstalled
    }

    /// The daemon, in this process. A panic while it was held leaves the lock poisoned but
    /// the state whole: each of its calls changes the kernel's maps first and its own view
    /// after, and the maps are the truth it reads back.
    fn daemon(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one event of the pod watch.
    pub fn on_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let Some(view) = PodView::of(&pod) else { return };
                if let Some(l) = self.listing.as_mut() {
                    l.insert(view.uid.clone());
                }
                self.upsert(view);
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    let gone: Vec<String> = self
                        .pods
                        .keys()
                        .filter(|u| !listed.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.forget(&uid);
                    }
                }
                self.remove_stale();
                self.refresh_metrics();
                self.metrics.set_ready();
            }
            // The pod object is gone. Its limit stays until its cgroup goes too (the daemon
            // collects state of removed cgroups): containers may still be stopping.
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.uid() {
                    self.forget(&uid);
                }
            }
        }
    }

    fn forget(&mut self, uid: &str) {
        if let Some(t) = self.pods.remove(uid) {
            debug!(pod = %t.pod.key(), "pod object gone");
            self.metrics.forget(&t.pod.labels());
        }
    }

    fn upsert(&mut self, view: PodView) {
        let own = self
            .settings
            .own_pod
            .as_ref()
            .is_some_and(|(ns, name)| *ns == view.namespace && *name == view.name);
        if own {
            let asked = annotations::uninstall_requested(Some(&view.annotations));
            if asked && !self.uninstalled {
                return self.lift_all(&view.reference);
            }
            if !asked && self.uninstalled {
                // The uninstall was called off (the hook failed and someone removed the mark).
                return self.resume(&view.reference);
            }
        }
        let uid = view.uid.clone();
        let t = self.pods.entry(uid.clone()).or_insert_with(|| Tracked {
            pod: view.clone(),
            applied: None,
            reported: None,
            capped: None,
            missing: 0,
            failures: 0,
            retry_at: None,
        });
        t.pod = view;
        // A change to the pod is news: look for its cgroup again right away.
        t.missing = 0;
        t.failures = 0;
        t.retry_at = None;
        self.reconcile(&uid);
    }

    /// Lifts every limit on the node: the chart is being uninstalled.
    fn lift_all(&mut self, own: &ObjectReference) {
        // The daemon's reset detaches and unpins everything and keeps nothing loaded: an
        // uninstalled node keeps no podshaper state at all.
        let reset = self.daemon().reset();
        match reset {
            Ok(()) => {
                info!("uninstall requested: lifted every limit on this node");
                self.uninstalled = true;
                self.metrics.set_idle(true);
                for t in self.pods.values_mut() {
                    t.applied = None;
                    t.retry_at = None;
                }
                self.refresh_metrics();
                self.publish(
                    own,
                    EventType::Normal,
                    "LimitsLifted",
                    "podshaper lifted every limit on this node",
                );
            }
            Err(e) => {
                warn!(error = %e, "uninstall requested, but lifting the limits failed");
                self.publish(own, EventType::Warning, "LiftFailed", &e.to_string());
            }
        }
    }

    /// Takes the limits up again after a called-off uninstall: every pod (the daemon pins
    /// fresh maps with the first limit).
    fn resume(&mut self, own: &ObjectReference) {
        self.uninstalled = false;
        self.metrics.set_idle(false);
        info!("uninstall called off: limiting pods again");
        self.publish(
            own,
            EventType::Normal,
            "LimitsResumed",
            "podshaper limits this node's pods again",
        );
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.reconcile(&uid);
        }
    }

    fn publish(&self, reference: &ObjectReference, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        // A recorder per Event: one kept across Events merges those with the same reason on the
        // same pod into a series that keeps the FIRST note ("limited to 20M" after a change to
        // 50M). The agent already says each thing once.
        // In a task of its own: a slow API server must not hold up the limits.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let (reference, reason) = (reference.clone(), reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(error = %e, reason, "publish event");
            }
        });
    }

    /// Brings one pod's limits in line with its annotations: gathers what is known, lets
    /// `decide` choose, and carries it out.
    fn reconcile(&mut self, uid: &str) {
        if self.uninstalled {
            return;
        }
        let Some(t) = self.pods.get(uid) else { return };
        let pod = t.pod.clone();
        let parsed = annotations::parse(Some(&pod.annotations), self.settings.max_rate);
        let decision = {
            let known = Known {
                parsed: &parsed,
                applied: t.applied.as_ref().map(|(d, w)| (d.as_path(), *w, d.is_dir())),
                had_problem: t.reported.is_some(),
                finished: matches!(pod.phase.as_str(), "Succeeded" | "Failed"),
            };
            let (root, driver) = (&self.cgroup_root, self.settings.driver);
            decide::decide(&known, || podcgroup::find(root, &pod.uid, pod.qos, driver))
        };
        match decision {
            Decision::Nothing { clear_problem } => {
                if clear_problem {
                    self.clear_problem(uid);
                }
            }
            Decision::ReportInvalid(note) => {
                if self.report(uid, &pod.reference, "InvalidBandwidth", &note) {
                    self.metrics
                        .invalid_annotations
                        .get_or_create(&pod.labels())
                        .inc();
                }
            }
            Decision::Forget => {
                if let Some(t) = self.pods.get_mut(uid) {
                    t.applied = None;
                    t.retry_at = None;
                }
            }
            Decision::WaitForCgroup => self.cgroup_missing(uid),
            Decision::Apply { dir, wanted, capped } => self.apply(uid, &pod, dir, wanted, capped),
        }
    }

    fn apply(&mut self, uid: &str, pod: &PodView, dir: PathBuf, wanted: Limits, capped: Option<String>) {
        let before = self.limits_in_force(&dir);
        let change = |r: Option<Rate>| r.map(Change::Set).unwrap_or(Change::Unlimited);
        let result = self.daemon().limit(
            &dir,
            change(wanted.egress),
            change(wanted.ingress),
            Some(pod.key()),
            // Peer rules come from BandwidthPolicy, not annotations: leave them as they are.
            None,
        );
        match result {
            Ok(_) => {
                let Some(t) = self.pods.get_mut(uid) else { return };
                t.applied = (!wanted.is_none()).then(|| (dir.clone(), wanted));
                t.missing = 0;
                t.failures = 0;
                t.retry_at = None;
                t.reported = None;
                let (reports, capped) = decide::after_apply(wanted, before, capped, t.capped.as_deref());
                t.capped = capped;
                if before != wanted {
                    info!(pod = %pod.key(), cgroup = %dir.display(), %wanted, "limits applied");
                }
                for r in reports {
                    let type_ = if r.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    };
                    self.publish(&pod.reference, type_, r.reason, &r.note);
                }
            }
            // The cgroup went between the lookup and the apply (a pod restarting its
            // sandbox): look it up again, as for one not found yet.
            Err(e) if e.is_no_such_cgroup() => {
                debug!(pod = %pod.key(), error = %e, "cgroup gone before the apply");
                if let Some(t) = self.pods.get_mut(uid) {
                    t.applied = None;
                }
                self.cgroup_missing(uid);
            }
            // Anything else (EPERM, a full map, a kernel refusing the programs) needs a fix
            // on the node: say so, and retry with backoff.
            Err(e) => {
                self.metrics.apply_errors.get_or_create(&pod.labels()).inc();
                if let Some(t) = self.pods.get_mut(uid) {
                    t.failures += 1;
                }
                self.schedule_retry(uid);
                let note = format!("applying {wanted} to {} failed: {e}", dir.display());
                self.report(uid, &pod.reference, "LimitFailed", &note);
            }
        }
    }

    /// The limits the datapath has for `dir` now (none if it is not limited).
    fn limits_in_force(&self, dir: &std::path::Path) -> Limits {
        let status = self.daemon().status(Some(dir));
        status
            .ok()
            .and_then(|cgroups| cgroups.first().map(CgroupStatus::limits))
            .unwrap_or_default()
    }

    fn cgroup_missing(&mut self, uid: &str) {
        let Some(t) = self.pods.get_mut(uid) else { return };
        t.missing += 1;
        let (missing, pod) = (t.missing, t.pod.clone());
        self.metrics.cgroup_not_found.get_or_create(&pod.labels()).inc();
        self.schedule_retry(uid);
        debug!(pod = %pod.key(), missing, "cgroup not found yet");
        if missing >= REPORT_MISSING_AFTER {
            let note = format!(
                "cannot find the pod's cgroup under {} (pod {}, QoS {:?}, driver {:?}); still retrying",
                self.cgroup_root.display(),
                pod.phase,
                pod.qos,
                self.settings.driver
            );
            self.report(uid, &pod.reference, "CgroupNotFound", &note);
        }
    }

    fn schedule_retry(&mut self, uid: &str) {
        if let Some(t) = self.pods.get_mut(uid) {
            t.retry_at = Some(Instant::now() + decide::retry_delay(t.missing, t.failures));
        }
    }

    /// A warning Event, once per distinct problem; whether this one was new.
    fn report(&mut self, uid: &str, reference: &ObjectReference, reason: &str, note: &str) -> bool {
        let Some(t) = self.pods.get_mut(uid) else {
            return false;
        };
        if t.reported.as_deref() == Some(note) {
            return false;
        }
        t.reported = Some(note.to_string());
        warn!(pod = %t.pod.key(), reason, note, "problem");
        self.publish(reference, EventType::Warning, reason, note);
        true
    }

    fn clear_problem(&mut self, uid: &str) {
        if let Some(t) = self.pods.get_mut(uid) {
            t.reported = None;
        }
    }

    /// Removes limits of pod cgroups whose pod is not on this node any more, or no longer asks
    /// for one (deleted or unannotated while no agent ran). Cgroups that are not pods'
    /// (limited with the CLI) are left alone.
    fn remove_stale(&mut self) {
        let known: HashSet<&str> = self.pods.keys().map(String::as_str).collect();
        let Ok(cgroups) = self.daemon().status(None) else {
            return;
        };
        // Pods that ask for no limit (their annotations went while no agent ran).
        let unannotated: HashSet<&str> = self
            .pods
            .iter()
            .filter(|(_, t)| {
                annotations::parse(Some(&t.pod.annotations), None).is_ok_and(|p| p.wanted.is_none())
            })
            .map(|(u, _)| u.as_str())
            .collect();
        for c in cgroups {
            let Some(uid) = podcgroup::pod_uid_of(&c.cgroup) else {
                continue;
            };
            if known.contains(uid.as_str()) && !unannotated.contains(uid.as_str()) {
                continue;
            }
            let unlimited = self.daemon().unlimit(&c.cgroup);
            match unlimited {
                Ok(()) => {
                    info!(cgroup = %c.cgroup.display(), uid, "removed the limit of a pod that is gone or asks for none")
                }
                Err(e) => warn!(cgroup = %c.cgroup.display(), error = %e, "remove stale limit"),
            }
        }
    }

    /// The agent's periodic work, once a second: ticks the daemon (rates, state of removed
    /// cgroups), retries pods whose cgroup was missing, and refreshes the metrics.
    pub fn tick(&mut self) {
        self.daemon().tick();
        let now = Instant::now();
        self.ticks += 1;
        let mut due: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, t)| t.retry_at.is_some_and(|at| at <= now))
            .map(|(u, _)| u.clone())
            .collect();
        // Every 10 s, also pods whose limits in force differ from what was applied (a
        // `podshaper reset` or `unlimit` on the node): the annotations win. One status of the
        // whole node, matched by cgroup id (the directory's inode), not a request per pod.
        if self.ticks.is_multiple_of(10) {
            let status = self.daemon().status(None);
            let in_force: HashMap<u64, Limits> = match status {
                Ok(cgroups) => cgroups.iter().map(|c| (c.id, c.limits())).collect(),
                Err(e) => {
                    warn!(error = %e, "read the limits in force");
                    HashMap::new()
                }
            };
            let drifted: Vec<String> = self
                .pods
                .iter()
                .filter(|(_, t)| {
                    t.applied.as_ref().is_some_and(|(dir, w)| {
                        let id = std::fs::metadata(dir).map(|m| m.ino()).ok();
                        decide::drifted(*w, id.and_then(|id| in_force.get(&id)).copied())
                    })
                })
                .map(|(u, _)| u.clone())
                .collect();
            for uid in drifted {
                if let Some(t) = self.pods.get_mut(&uid) {
                    t.applied = None;
                }
                due.push(uid);
            }
        }
        for uid in due {
            if let Some(t) = self.pods.get_mut(&uid) {
                t.retry_at = None;
            }
            self.reconcile(&uid);
        }
        self.refresh_metrics();
    }

    fn refresh_metrics(&self) {
        let (node, status) = {
            let daemon = self.daemon();
            (daemon.node_status(), daemon.status(None))
        };
        if let Ok(node) = node {
            self.metrics.set_node(node);
        }
        let Ok(cgroups) = status else { return };
        let samples = cgroups.into_iter().filter_map(sample).collect();
        self.metrics.set_pods(samples);
    }
}

// Only cgroups the agent named (namespace/name) are pods.
fn sample(status: CgroupStatus) -> Option<PodSample> {
    let (namespace, pod) = status.name.as_deref()?.split_once('/')?;
    let (namespace, pod) = (namespace.to_string(), pod.to_string());
    Some(PodSample {
        namespace,
        pod,
        status,
    })
}
