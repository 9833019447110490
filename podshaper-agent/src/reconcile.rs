//! The agent's core: from the pods of this node and the BandwidthPolicies (as the watches
//! report them) to limits and peer rules in the datapath. One pod at a time, never touching a
//! pod whose annotations and policies did not change or are malformed; every outcome a user
//! should see becomes an Event on the pod. Synchronous: the datapath is in-process and answers
//! in microseconds; Events go out in tasks of their own.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
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
    PeerRule, Rate,
};
use podshaper_daemon::State;
use tracing::{debug, info, warn};

use crate::{
    annotations,
    bindings::{self, Notes, PodRules, Policies, SharedPolicy, RULE_PREFIX},
    decide::{self, Decision, InForce, Known, Wanted, REPORT_MISSING_AFTER},
    metrics::{Metrics, PodLabels, PodSample},
    podcgroup::{self, Driver, Qos},
    policy::{BandwidthPeerSet, BandwidthPolicy, NodeDemand, RuleDemand},
    share,
};

/// What the agent needs to know of a pod.
#[derive(Clone, Debug)]
struct PodView {
    namespace: String,
    name: String,
    uid: String,
    qos: Option<Qos>,
    phase: String,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
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
            labels: pod.labels().clone(),
            reference: pod.object_ref(&()),
        })
    }

    fn metric_labels(&self) -> PodLabels {
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
    /// The cgroup, limits and rules last applied (or found applied) for this pod.
    applied: Option<(PathBuf, Wanted)>,
    /// The last problem reported in an Event, so a pod is not told the same thing twice.
    reported: Option<String>,
    /// The last "cut to the maximum" warning, kept apart: the limit is in force all the same.
    capped: Option<String>,
    /// The last "too many policy rules" warning, kept apart too: the limits apply all the same.
    conflict: Option<String>,
    /// Cgroup lookups that failed in a row, and when to try again.
    missing: u32,
    /// Failed applies in a row (the datapath refused), for the retry backoff.
    failures: u32,
    retry_at: Option<Instant>,
}

impl Tracked {
    /// The pod finished (Succeeded or Failed): its cgroup is gone for good.
    fn finished(&self) -> bool {
        matches!(self.pod.phase.as_str(), "Succeeded" | "Failed")
    }
}

/// Settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name.
    pub node: String,
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
    pods_listed: bool,
    /// The BandwidthPolicies of the cluster and the peer sets this node needs, as last listed
    /// and watched.
    policies: Policies,
    /// Policies (peer sets) listed since their watch (re)started: they replace the known ones
    /// whole once the list is done, so a relist never leaves a moment with fewer than there are.
    policy_listing: Option<Vec<BandwidthPolicy>>,
    set_listing: Option<Vec<BandwidthPeerSet>>,
    /// Whether the policies, and then the peer sets they need, were listed once: until then
    /// bindings in force are left alone (a restarted agent must not lift a rule it has not
    /// read yet).
    policies_listed: bool,
    sets_listed: bool,
    /// What was said of each policy (namespace/name), so each thing is said once.
    policy_notes: HashMap<(String, String), Notes>,
    /// The agent's rules (named [`RULE_PREFIX`]…) as this process last set them on the node.
    rules_set: BTreeMap<String, PeerRule>,
    /// When to report this node's use of each Shared policy (namespace/name).
    reporters: HashMap<(String, String), share::Reporter>,
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
        let node = settings.node.clone();
        Self {
            state,
            cgroup_root,
            client,
            reporter,
            metrics,
            settings,
            pods: HashMap::new(),
            listing: None,
            pods_listed: false,
            policies: Policies::on_node(&node),
            policy_listing: None,
            set_listing: None,
            policies_listed: false,
            sets_listed: false,
            policy_notes: HashMap::new(),
            rules_set: BTreeMap::new(),
            reporters: HashMap::new(),
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
                self.pods_listed = true;
                self.listed();
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

    /// Handles one event of the BandwidthPolicy watch.
    pub fn on_policy_event(&mut self, event: watcher::Event<BandwidthPolicy>) {
        match event {
            watcher::Event::Init => self.policy_listing = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                if let Some(listing) = self.policy_listing.as_mut() {
                    listing.push(p);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.policy_listing.take() {
                    for (p, notes) in self.policies.replace(listed) {
                        self.tell(&p, notes);
                    }
                }
                let policies = &self.policies;
                self.policy_notes
                    .retain(|(ns, name), _| policies.contains(ns, name));
                self.policies_listed = true;
                info!(policies = self.policies.len(), "BandwidthPolicies listed");
                self.listed();
            }
            watcher::Event::Apply(p) => {
                let notes = self.policies.apply(&p);
                self.tell(&p, notes);
                self.sync_rules();
            }
            watcher::Event::Delete(p) => {
                self.policies.delete(&p);
                if let Some(ns) = p.namespace() {
                    self.policy_notes.remove(&(ns, p.name_any()));
                }
                self.sync_rules();
            }
        }
    }

    /// Handles one event of the watch of the peer sets this node needs.
    pub fn on_peer_set_event(&mut self, event: watcher::Event<BandwidthPeerSet>) {
        let told = match event {
            watcher::Event::Init => {
                self.set_listing = Some(Vec::new());
                return;
            }
            watcher::Event::InitApply(s) => {
                if let Some(listing) = self.set_listing.as_mut() {
                    listing.push(s);
                }
                return;
            }
            watcher::Event::InitDone => {
                let told = match self.set_listing.take() {
                    Some(listed) => self.policies.replace_sets(listed),
                    None => Vec::new(),
                };
                if !self.sets_listed {
                    self.sets_listed = true;
                    for (p, notes) in told {
                        self.tell(&p, notes);
                    }
                    return self.listed();
                }
                told
            }
            watcher::Event::Apply(s) => match self.policies.apply_set(&s) {
                Some(told) => vec![told],
                // Its status alone changed (another node's report): nothing to redo.
                None => return,
            },
            watcher::Event::Delete(s) => self.policies.delete_set(&s).into_iter().collect(),
        };
        for (p, notes) in told {
            self.tell(&p, notes);
        }
        self.sync_rules();
    }

    /// The peer sets this node needs (by policy uid), once pods and policies are listed: those
    /// of the policies with selector peers that select a pod here.
    pub fn wanted_sets(&self) -> Option<std::collections::BTreeSet<String>> {
        if !(self.pods_listed && self.policies_listed) {
            return None;
        }
        let pods = self
            .pods
            .values()
            .filter(|t| !t.finished())
            .map(|t| (t.pod.namespace.as_str(), &t.pod.labels));
        Some(self.policies.wanted_sets(pods))
    }

    /// Whether the peer set watch is listing.
    pub fn listing_sets(&self) -> bool {
        self.set_listing.is_some()
    }

    /// No peer set is needed (any more): the known ones are dropped and nothing waits for them.
    pub fn no_sets_needed(&mut self) {
        self.set_listing = None;
        for (p, notes) in self.policies.replace_sets(Vec::new()) {
            self.tell(&p, notes);
        }
        if !self.sets_listed {
            self.sets_listed = true;
            return self.listed();
        }
        self.sync_rules();
    }

    /// The BandwidthPolicy API is not served (the CRD is not installed): there are no
    /// policies, so none binds anything. The watch keeps trying, and lists them once it is.
    pub fn no_policy_api(&mut self) {
        if self.policies_listed {
            return;
        }
        warn!("the BandwidthPolicy API is not served (CRD not installed?): no policy applies until it is");
        self.policies.replace(Vec::new());
        self.policies_listed = true;
        self.listed();
    }

    /// Whether pods, policies and the peer sets they need were all listed: before that, the
    /// bindings in force are left as they are.
    fn bindings_known(&self) -> bool {
        self.pods_listed && self.policies_listed && self.sets_listed
    }

    /// Once pods, policies and peer sets are listed: what no agent saw happen is put right
    /// (stale limits, bindings and rules), and the agent is ready.
    fn listed(&mut self) {
        if !self.bindings_known() {
            return;
        }
        self.sync_rules();
        self.remove_stale();
        self.refresh_metrics();
        self.metrics.set_ready();
    }

    /// Logs what compiling a policy found, once per distinct finding.
    fn tell(&mut self, policy: &BandwidthPolicy, notes: Notes) {
        let Some(ns) = policy.namespace() else { return };
        let key = (ns, policy.name_any());
        if self.policy_notes.get(&key) == Some(&notes) {
            return;
        }
        let name = format!("{}/{}", key.0, key.1);
        if !notes.invalid.is_empty() {
            warn!(policy = %name, why = ?notes.invalid, "invalid BandwidthPolicy: it changes nothing");
        }
        if !notes.unresolved.is_empty() {
            warn!(policy = %name, rules = ?notes.unresolved, "BandwidthPolicy rules not applied");
        }
        self.policy_notes.insert(key, notes);
    }

    /// Puts the node's rules in line with the policies and this node's pods: sets the rules
    /// some pod here needs (new or changed ones first), binds every pod as its policies say,
    /// then removes the agent's rules no pod needs any more.
    fn sync_rules(&mut self) {
        if self.uninstalled || !self.bindings_known() {
            return;
        }
        let (wanted, to_set) = {
            let wanted = self.wanted_rules();
            let names: BTreeSet<String> = wanted.keys().map(|n| n.to_string()).collect();
            (names, self.not_set(wanted.into_values()))
        };
        self.set_rules(&to_set);
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.reconcile(&uid);
        }
        self.remove_unwanted_rules(&wanted);
    }

    /// The rules the pods of this node are to be bound to, by name.
    fn wanted_rules(&self) -> BTreeMap<&str, &PeerRule> {
        let mut wanted = BTreeMap::new();
        for t in self.pods.values().filter(|t| !t.finished()) {
            if let PodRules::Bound(rules) = self.policies.rules_for(&t.pod.namespace, &t.pod.labels) {
                for r in rules {
                    wanted.insert(r.name.as_str(), r);
                }
            }
        }
        wanted
    }

    /// Those of `rules` this process has not set as they are now, copied: what to set.
    fn not_set<'a>(&self, rules: impl IntoIterator<Item = &'a PeerRule>) -> Vec<PeerRule> {
        rules
            .into_iter()
            .filter(|r| self.rules_set.get(&r.name) != Some(*r))
            .cloned()
            .collect()
    }

    /// Sets `rules` on the node. A rule that cannot be set is logged; the pods bound to it
    /// fail their apply and say why.
    fn set_rules(&mut self, rules: &[PeerRule]) {
        for rule in rules {
            let set = self.daemon().set_rule(rule);
            match set {
                Ok(()) => {
                    info!(rule = %rule.name, rate = %rule.rate, direction = %rule.direction, "peer rule set");
                    self.rules_set.insert(rule.name.clone(), rule.clone());
                }
                Err(e) => warn!(rule = %rule.name, error = %e, "set peer rule"),
            }
        }
    }

    /// Removes the agent's rules on the node that are not in `wanted` (those of deleted
    /// policies, or of policies that select no pod here any more), also ones set before a
    /// restart. Rules set by hand (without the prefix) stay.
    fn remove_unwanted_rules(&mut self, wanted: &BTreeSet<String>) {
        let on_node = self.daemon().rules();
        let on_node = match on_node {
            Ok(rules) => rules,
            Err(e) => return warn!(error = %e, "list peer rules"),
        };
        let kept = self.rules_of_pods_in_conflict();
        for r in on_node {
            if !r.name.starts_with(RULE_PREFIX) || wanted.contains(&r.name) || kept.contains(&r.name) {
                continue;
            }
            let removed = self.daemon().remove_rule(&r.name);
            match removed {
                Ok(()) => {
                    info!(rule = %r.name, "peer rule removed: no pod here needs it");
                    self.rules_set.remove(&r.name);
                }
                Err(e) => warn!(rule = %r.name, error = %e, "remove peer rule"),
            }
        }
    }

    /// The rules bound now to the pods that more rules select than they hold: they keep them
    /// (nothing of a conflict is changed), so those rules stay on the node too.
    fn rules_of_pods_in_conflict(&self) -> HashSet<String> {
        let mut kept = HashSet::new();
        for t in self.pods.values().filter(|t| !t.finished()) {
            if !matches!(
                self.policies.rules_for(&t.pod.namespace, &t.pod.labels),
                PodRules::TooMany(_)
            ) {
                continue;
            }
            let dir = match &t.applied {
                Some((dir, _)) => Some(dir.clone()),
                None => podcgroup::find(&self.cgroup_root, &t.pod.uid, t.pod.qos, self.settings.driver),
            };
            if let Some(dir) = dir {
                kept.extend(self.in_force(&dir).rules);
            }
        }
        kept
    }

    fn forget(&mut self, uid: &str) {
        if let Some(t) = self.pods.remove(uid) {
            debug!(pod = %t.pod.key(), "pod object gone");
            self.metrics.forget(&t.pod.metric_labels());
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
            conflict: None,
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
                self.rules_set.clear();
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

    /// Brings one pod's limits and bindings in line with its annotations and policies:
    /// gathers what is known, lets `decide` choose, and carries it out.
    fn reconcile(&mut self, uid: &str) {
        if self.uninstalled {
            return;
        }
        let Some(t) = self.pods.get(uid) else { return };
        let pod = t.pod.clone();
        let parsed = annotations::parse(Some(&pod.annotations), self.settings.max_rate);
        // The rules to bind: none known before the policies are listed; with too many, the
        // bindings in force stay and the pod is told.
        // Names only here: this runs for every event of the pod (status updates included), and
        // a rule's peers may be tens of thousands of addresses.
        let (names, conflict): (Option<Vec<String>>, Option<String>) = if self.bindings_known() {
            match self.policies.rules_for(&pod.namespace, &pod.labels) {
                PodRules::Bound(rules) => (Some(bindings::names(&rules)), None),
                PodRules::TooMany(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        let decision = {
            let known = Known {
                parsed: &parsed,
                rules: names.as_deref(),
                applied: t
                    .applied
                    .as_ref()
                    .map(|(d, w)| (d.as_path(), w.clone(), d.is_dir())),
                had_problem: t.reported.is_some(),
                finished: t.finished(),
            };
            let (root, driver) = (&self.cgroup_root, self.settings.driver);
            decide::decide(&known, || podcgroup::find(root, &pod.uid, pod.qos, driver))
        };
        self.tell_conflict(uid, &pod, conflict);
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
                        .get_or_create(&pod.metric_labels())
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
            Decision::Apply { dir, wanted, capped } => {
                // A rule exists on the node before a cgroup is bound to it.
                let to_set = match self.policies.rules_for(&pod.namespace, &pod.labels) {
                    PodRules::Bound(rules) if wanted.rules.is_some() => self.not_set(rules),
                    _ => Vec::new(),
                };
                self.set_rules(&to_set);
                self.apply(uid, &pod, dir, wanted, capped)
            }
        }
    }

    /// Tells a pod, once, that more policy rules select it than it holds, and that this is
    /// over once it is.
    fn tell_conflict(&mut self, uid: &str, pod: &PodView, conflict: Option<String>) {
        let Some(t) = self.pods.get_mut(uid) else { return };
        if t.conflict == conflict {
            return;
        }
        t.conflict = conflict.clone();
        match conflict {
            Some(note) => {
                warn!(pod = %pod.key(), note, "BandwidthPolicy conflict");
                self.publish(
                    &pod.reference,
                    EventType::Warning,
                    "BandwidthPolicyConflict",
                    &note,
                );
            }
            None => info!(pod = %pod.key(), "BandwidthPolicy conflict over"),
        }
    }

    fn apply(&mut self, uid: &str, pod: &PodView, dir: PathBuf, wanted: Wanted, capped: Option<String>) {
        let before = self.in_force(&dir);
        let change = |r: Option<Rate>| r.map(Change::Set).unwrap_or(Change::Unlimited);
        let result = self.daemon().limit(
            &dir,
            change(wanted.limits.egress),
            change(wanted.limits.ingress),
            Some(pod.key()),
            wanted.rules.clone(),
        );
        match result {
            Ok(_) => {
                let Some(t) = self.pods.get_mut(uid) else { return };
                t.applied = (!wanted.is_none()).then(|| (dir.clone(), wanted.clone()));
                t.missing = 0;
                t.failures = 0;
                t.retry_at = None;
                t.reported = None;
                let (reports, capped) = decide::after_apply(&wanted, &before, capped, t.capped.as_deref());
                t.capped = capped;
                if !reports.is_empty() {
                    info!(pod = %pod.key(), cgroup = %dir.display(), limits = %wanted.limits, rules = ?wanted.rules, "applied");
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
            // Anything else (EPERM, a full map, a kernel refusing the programs, a rule that
            // could not be set) needs a fix on the node: say so, and retry with backoff.
            Err(e) => {
                self.metrics
                    .apply_errors
                    .get_or_create(&pod.metric_labels())
                    .inc();
                if let Some(t) = self.pods.get_mut(uid) {
                    t.failures += 1;
                }
                self.schedule_retry(uid);
                let rules = match &wanted.rules {
                    Some(r) if !r.is_empty() => format!(" with rules {}", r.join(", ")),
                    _ => String::new(),
                };
                let note = format!(
                    "applying {}{rules} to {} failed: {e}",
                    wanted.limits,
                    dir.display()
                );
                self.report(uid, &pod.reference, "LimitFailed", &note);
            }
        }
    }

    /// What the datapath has in force for `dir` now (nothing if it is not limited).
    fn in_force(&self, dir: &std::path::Path) -> InForce {
        let status = self.daemon().status(Some(dir));
        status
            .ok()
            .and_then(|cgroups| cgroups.first().map(in_force_of))
            .unwrap_or_default()
    }

    fn cgroup_missing(&mut self, uid: &str) {
        let Some(t) = self.pods.get_mut(uid) else { return };
        t.missing += 1;
        let (missing, pod) = (t.missing, t.pod.clone());
        self.metrics
            .cgroup_not_found
            .get_or_create(&pod.metric_labels())
            .inc();
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

    /// Removes limits and bindings of pod cgroups whose pod is not on this node any more, or
    /// no longer asks for any (deleted, unannotated or unselected while no agent ran). Cgroups
    /// that are not pods' (limited with the CLI) are left alone. Only once pods and policies
    /// are both listed.
    fn remove_stale(&mut self) {
        if !self.bindings_known() {
            return;
        }
        let known: HashSet<&str> = self.pods.keys().map(String::as_str).collect();
        let Ok(cgroups) = self.daemon().status(None) else {
            return;
        };
        // Pods that ask for nothing: no annotation and no policy rule (their annotations went,
        // or their policies, while no agent ran).
        let unannotated: HashSet<&str> = self
            .pods
            .iter()
            .filter(|(_, t)| {
                annotations::parse(Some(&t.pod.annotations), None).is_ok_and(|p| p.wanted.is_none())
                    && matches!(
                        self.policies.rules_for(&t.pod.namespace, &t.pod.labels),
                        PodRules::Bound(r) if r.is_empty()
                    )
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
                    info!(cgroup = %c.cgroup.display(), uid, "removed the limits of a pod that is gone or asks for none")
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
        // Every 10 s, also pods whose limits or bindings in force differ from what was applied
        // (a `podshaper reset`, `unlimit` or `rule remove` on the node): annotations and
        // policies win. One status of the whole node, matched by cgroup id (the directory's
        // inode), not a request per pod.
        if self.ticks.is_multiple_of(10) {
            let status = self.daemon().status(None);
            let in_force: HashMap<u64, InForce> = match status {
                Ok(cgroups) => cgroups.iter().map(|c| (c.id, in_force_of(c))).collect(),
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
                        decide::drifted(w, id.and_then(|id| in_force.get(&id)))
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
            // A rule removed by hand is set again before its pods are bound again.
            let rules = self.daemon().rules();
            if let Ok(rules) = rules {
                let on_node: HashSet<String> = rules.into_iter().map(|r| r.name).collect();
                self.rules_set.retain(|name, _| on_node.contains(name));
            }
        }
        for uid in due {
            if let Some(t) = self.pods.get_mut(&uid) {
                t.retry_at = None;
            }
            self.reconcile(&uid);
        }
        self.report_demand(now);
        // Rules no pod here needs since a pod's labels changed or it went.
        if self.ticks.is_multiple_of(10) && self.bindings_known() && !self.uninstalled {
            let wanted: BTreeSet<String> = self.wanted_rules().keys().map(|n| n.to_string()).collect();
            self.remove_unwanted_rules(&wanted);
        }
        self.refresh_metrics();
    }

    /// Reports this node's use of each Shared policy with a pod here to the policy's peer set,
    /// when a report is due (see [`share::Reporter`]): the controller splits the rate by it.
    fn report_demand(&mut self, now: Instant) {
        if self.uninstalled || !self.bindings_known() || self.policies.shared().is_empty() {
            self.reporters.clear();
            return;
        }
        let on_node = self.daemon().rules();
        let Ok(on_node) = on_node else { return };
        let used: HashMap<String, u64> = on_node
            .into_iter()
            .map(|r| (r.name, r.rate_bps.unwrap_or(0)))
            .collect();
        let policies: Vec<SharedPolicy> = self.policies.shared().into_iter().cloned().collect();
        let keys: HashSet<(String, String)> = policies.iter().map(|p| p.key.clone()).collect();
        self.reporters.retain(|k, _| keys.contains(k));
        for p in policies {
            let rules: Vec<&bindings::SharedRule> = p.egress.iter().chain(&p.ingress).collect();
            // Only a node with pods bound to the policy takes part.
            if !rules.iter().any(|r| used.contains_key(&r.name)) {
                continue;
            }
            let bps: Vec<u64> = rules
                .iter()
                .map(|r| used.get(&r.name).copied().unwrap_or(0))
                .collect();
            let parts: Vec<u64> = rules.iter().map(|r| r.part).collect();
            let rates: Vec<u64> = rules.iter().map(|r| r.rate).collect();
            let reporter = self.reporters.entry(p.key.clone()).or_default();
            let Some(mut demand) = reporter.sample(now, &bps, &parts, &rates) else {
                continue;
            };
            let ingress = demand.split_off(p.egress.len());
            self.send_demand(&p.key, demand, ingress);
        }
    }

    /// Writes this node's entry of a peer set's status (server-side apply under a field
    /// manager of its own, so nodes never overwrite each other), in a task of its own.
    fn send_demand(&self, key: &(String, String), egress: Vec<RuleDemand>, ingress: Vec<RuleDemand>) {
        let node = self.settings.node.clone();
        let (namespace, name) = key.clone();
        let status = NodeDemand {
            node: node.clone(),
            egress,
            ingress,
        };
        debug!(policy = %format!("{namespace}/{name}"), ?status, "report use of a Shared policy");
        let patch = serde_json::json!({
            "apiVersion": "podshaper.io/v1alpha1",
            "kind": "BandwidthPeerSet",
            "metadata": {"name": name, "namespace": namespace},
            "status": {"nodes": [status]},
        });
        let api: kube::Api<BandwidthPeerSet> = kube::Api::namespaced(self.client.clone(), &namespace);
        // A field manager name holds 128 bytes; a node name up to 253: a long one keeps its
        // head and a hash of the whole, so two nodes never share an entry.
        let manager = match format!("podshaper-agent/{node}") {
            m if m.len() <= 128 => m,
            m => format!("{}~{:016x}", &m[..100], bindings::fnv1a(node.as_bytes())),
        };
        tokio::spawn(async move {
            let params = kube::api::PatchParams::apply(&manager).force();
            if let Err(e) = api
                .patch_status(&name, &params, &kube::api::Patch::Apply(&patch))
                .await
            {
                warn!(error = %e, policy = %format!("{namespace}/{name}"), "report use of a Shared policy");
            }
        });
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

fn in_force_of(status: &CgroupStatus) -> InForce {
    let mut rules: Vec<String> = status.peers.iter().map(|p| p.rule.clone()).collect();
    rules.sort();
    InForce {
        limits: status.limits(),
        rules,
    }
}
