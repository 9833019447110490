//! The daemon's state: the datapath plus what it cannot keep itself (the last rate sample of
//! each cgroup). Every request maps to one method here; the socket layer only parses.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Instant,
};

use podshaper_api::{
    proto::{CgroupStatus, Change, DirectionStatus, NodeStatus, PeerStatus, Request, Response, RuleStatus},
    PeerRule, Rate,
};
use podshaper_ebpf::{
    abi::{EGRESS, INGRESS},
    cgroup::{self, CgroupDir},
    pins::Pins,
    CgroupState, Datapath, Limits,
};
use tracing::{info, instrument, warn};

use crate::Error;

struct Sample {
    at: Instant,
    bytes: [u64; 2],
    rate_bps: [u64; 2],
}

/// The datapath, the last rate sample and the name of each limited cgroup. Cgroup paths are
/// not kept: they are read back from the kernel by id, so they stay right across renames and
/// restarts. Names (the agent's namespace/pod) are not pinned: their owner sets them again.
///
/// After a reset there is no datapath: nothing is loaded or pinned until the next limit, so
/// a daemon that stops after a reset leaves nothing behind.
pub struct State {
    datapath: Option<Datapath>,
    root: PathBuf,
    peer_pacing: bool,
    mount: PathBuf,
    samples: HashMap<u64, Sample>,
    names: HashMap<u64, String>,
}

impl State {
    /// Loads the datapath under `root`, adopts what is pinned there and drops the state of
    /// cgroups that disappeared while no daemon ran. `cgroup_root` is where the cgroup v2
    /// hierarchy is (a container sees the host's at a bind mount); by default it is found in
    /// /proc/self/mountinfo.
    pub fn open(root: &Path, peer_pacing: bool, cgroup_root: Option<&Path>) -> Result<Self, Error> {
        let mount = match cgroup_root {
            Some(p) if cgroup::is_cgroup2(p) => p.to_path_buf(),
            Some(p) => return Err(Error::NotCgroup2(p.to_path_buf())),
            None => cgroup::cgroup2_mount()?,
        };
        let mut datapath = load(root, peer_pacing, &mount)?;
        let gone = datapath.collect_garbage(&mount)?;
        if !gone.is_empty() {
            info!(count = gone.len(), "removed state of cgroups that are gone");
        }
        let adopted = datapath.limited()?.len();
        info!(adopted, root = %root.display(), cgroup2 = %mount.display(), "datapath ready");
        Ok(Self {
            datapath: Some(datapath),
            root: root.to_path_buf(),
            peer_pacing,
            mount,
            samples: HashMap::new(),
            names: HashMap::new(),
        })
    }

    // The datapath, loaded again (pinning fresh maps) if a reset dropped it: for requests
    // that set limits.
    fn datapath_mut(&mut self) -> Result<&mut Datapath, Error> {
        let datapath = match self.datapath.take() {
            Some(d) => d,
            None => {
                info!(root = %self.root.display(), "loading the datapath again after a reset");
                load(&self.root, self.peer_pacing, &self.mount)?
            }
        };
        Ok(self.datapath.insert(datapath))
    }

    /// Answers one request of the local API: the socket server's one entry. Errors become
    /// `Response::Error`; a failed request changes nothing.
    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Limit {
                cgroup,
                egress,
                ingress,
                name,
                rules,
            } => self
                .limit(&cgroup, egress, ingress, name, rules)
                .map(|status| Response::Ok { status }),
            Request::SetRule { rule } => self.set_rule(&rule).map(|()| Response::Ok { status: None }),
            Request::RemoveRule { name } => self.remove_rule(&name).map(|()| Response::Ok { status: None }),
            Request::Rules => self.rules().map(|rules| Response::Rules { rules }),
            Request::Unlimit { cgroup } => self.unlimit(&cgroup).map(|()| Response::Ok { status: None }),
            Request::Status { cgroup } => self.status(cgroup.as_deref()).and_then(|cgroups| {
                Ok(Response::Status {
                    cgroups,
                    node: self.node_status()?,
                })
            }),
            Request::Reset => self.reset().map(|()| Response::Ok { status: None }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    fn resolve(&self, user: &Path) -> Result<CgroupDir, Error> {
        Ok(cgroup::resolve(user, &self.mount)?)
    }

    /// Sets or changes the limits of the cgroup at `user` (absolute, or relative to the
    /// cgroup v2 mount) and, when `rules` is given, the peer rules it is bound to, live, and
    /// names it (the agent's namespace/pod). Returns its status, none when it ends up with no
    /// limit and no rule.
    #[instrument(skip_all, fields(cgroup = %user.display()))]
    pub fn limit(
        &mut self,
        user: &Path,
        egress: Change,
        ingress: Change,
        name: Option<String>,
        rules: Option<Vec<String>>,
    ) -> Result<Option<CgroupStatus>, Error> {
        let cg = self.resolve(user)?;
        let current = match &self.datapath {
            Some(d) => d.state(cg.id)?.map(|s| s.limits).unwrap_or_default(),
            None => Limits::default(),
        };
        let apply = |c: Change, cur: Option<Rate>| match c {
            Change::Keep => cur,
            Change::Unlimited => None,
            Change::Set(r) => Some(r),
        };
        let limits = Limits {
            egress: apply(egress, current.egress),
            ingress: apply(ingress, current.ingress),
        };
        let no_rules = rules.as_ref().is_none_or(|r| r.is_empty());
        if limits.is_none() && no_rules && self.datapath.is_none() {
            // Nothing is limited after a reset: no need to load anything to lift a limit.
            return Ok(None);
        }
        let fresh = self.datapath.is_none();
        let datapath = self.datapath_mut()?;
        // Rules first: an unknown rule name refuses the request before the limits change.
        let set = match &rules {
            Some(names) => datapath.bind(&cg, names),
            None => Ok(()),
        };
        let status = match set
            .and_then(|()| datapath.set(&cg, limits))
            .and_then(|()| datapath.state(cg.id))
        {
            Ok(status) => status,
            Err(e) => {
                if fresh {
                    // Loaded for this request only: leave nothing pinned, as before it.
                    self.datapath = None;
                    if let Err(e) = podshaper_ebpf::reset(&self.root) {
                        warn!(error = %e, "remove the state loaded for a failed limit");
                    }
                }
                return Err(e.into());
            }
        };
        if status.is_none() {
            self.forget(cg.id);
        } else if let Some(name) = name {
            self.names.insert(cg.id, name);
        }
        info!(?limits, ?rules, "limits set");
        Ok(status.map(|s| self.describe(&s)))
    }

    /// Sets a peer rule, or changes it in place.
    #[instrument(skip_all, fields(rule = %rule.name))]
    pub fn set_rule(&mut self, rule: &PeerRule) -> Result<(), Error> {
        // The datapath checks the rule before it writes anything, and logs it.
        Ok(self.datapath_mut()?.set_rule(rule)?)
    }

    /// Removes a peer rule from the node and every cgroup bound to it. Removing a rule that
    /// is not there is not an error: what the caller wants holds.
    #[instrument(skip(self))]
    pub fn remove_rule(&mut self, name: &str) -> Result<(), Error> {
        if let Some(d) = self.datapath.as_mut() {
            if d.remove_rule(name)? {
                info!("rule removed");
            }
        }
        Ok(())
    }

    /// The peer rules on the node.
    pub fn rules(&self) -> Result<Vec<RuleStatus>, Error> {
        let Some(datapath) = &self.datapath else {
            return Ok(Vec::new());
        };
        let mut bound: HashMap<String, usize> = HashMap::new();
        for id in datapath.limited()? {
            if let Some(s) = datapath.state(id)? {
                for p in s.peers {
                    *bound.entry(p.rule).or_default() += 1;
                }
            }
        }
        Ok(datapath
            .rule_states()
            .into_iter()
            .map(|r| RuleStatus {
                cgroups: bound.get(&r.name).copied().unwrap_or(0),
                name: r.name,
                direction: r.direction,
                limit: r.rate,
                shared: r.shared,
                prefixes: r.prefixes,
                rate_bps: r.shared_bps,
            })
            .collect())
    }

    /// Lifts both limits of a cgroup and detaches the programs from it.
    #[instrument(skip_all, fields(cgroup = %user.display()))]
    pub fn unlimit(&mut self, user: &Path) -> Result<(), Error> {
        let cg = self.resolve(user)?;
        if let Some(d) = self.datapath.as_mut() {
            d.remove(cg.id)?;
        }
        self.forget(cg.id);
        info!("limits removed");
        Ok(())
    }

    /// The limited cgroups (or only `only`), with their limits, rates and counters.
    pub fn status(&self, only: Option<&Path>) -> Result<Vec<CgroupStatus>, Error> {
        let only = only.map(|p| self.resolve(p)).transpose()?;
        let mut cgroups = Vec::new();
        let Some(datapath) = &self.datapath else {
            return Ok(cgroups);
        };
        for id in datapath.limited()? {
            if only.as_ref().is_some_and(|c| c.id != id) {
                continue;
            }
            if let Some(s) = datapath.state(id)? {
                cgroups.push(self.describe(&s));
            }
        }
        Ok(cgroups)
    }

    /// The node's rate-option counters; none while no datapath is loaded (after a reset).
    pub fn node_status(&self) -> Result<Option<NodeStatus>, Error> {
        let Some(datapath) = &self.datapath else {
            return Ok(None);
        };
        let n = datapath.node_stats()?;
        Ok(Some(NodeStatus {
            options_written: n.opt_written,
            options_no_room: n.opt_no_room,
            options_exists: n.opt_exists,
            options_taken: n.opt_taken,
            options_lifted: n.opt_lifted,
            options_malformed: n.opt_malformed,
            options_outside: n.opt_outside,
        }))
    }

    /// Lifts every limit and removes all pinned state; nothing stays loaded until the next
    /// limit.
    pub fn reset(&mut self) -> Result<(), Error> {
        // Unpin everything (links first, which detaches the programs), then close the loaded
        // programs and maps: nothing of ours stays in the kernel. The next limit loads and
        // pins afresh.
        // The datapath goes first, whatever the unpinning does: if it fails half way, the next
        // limit loads and adopts what is left, rather than writing to maps no longer pinned.
        self.datapath = None;
        self.samples.clear();
        self.names.clear();
        podshaper_ebpf::reset(&self.root)?;
        info!("all limits and pinned state removed");
        Ok(())
    }

    /// Samples the byte counters to compute the rates `status` shows, and removes the state
    /// of cgroups that were deleted. Called once a second.
    pub fn tick(&mut self) {
        let Some(datapath) = self.datapath.as_mut() else {
            return;
        };
        match datapath.collect_garbage(&self.mount) {
            Ok(gone) => {
                for id in gone {
                    info!(id, "cgroup is gone; removed its state");
                    self.samples.remove(&id);
                    self.names.remove(&id);
                }
            }
            Err(e) => warn!(error = %e, "collect state of removed cgroups"),
        }
        let now = Instant::now();
        let ids = match datapath.limited() {
            Ok(ids) => ids,
            Err(e) => return warn!(error = %e, "list limited cgroups"),
        };
        for id in ids {
            match datapath.state(id) {
                Ok(Some(s)) => {
                    let sample = self.samples.entry(id).or_insert(Sample {
                        at: now,
                        bytes: s.stats.bytes,
                        rate_bps: [0, 0],
                    });
                    let dt = now.duration_since(sample.at).as_secs_f64();
                    if dt >= 0.5 {
                        for d in [EGRESS, INGRESS] {
                            let delta = s.stats.bytes[d].saturating_sub(sample.bytes[d]);
                            sample.rate_bps[d] = (delta as f64 * 8.0 / dt) as u64;
                        }
                        sample.at = now;
                        sample.bytes = s.stats.bytes;
                    }
                }
                // Being torn down by the kernel: the next tick collects it.
                Ok(None) => {}
                Err(e) => warn!(id, error = %e, "read cgroup state"),
            }
        }
    }

    fn forget(&mut self, id: u64) {
        self.samples.remove(&id);
        self.names.remove(&id);
    }

    /// The bpffs directory of the pinned state.
    pub fn bpffs_root(&self) -> PathBuf {
        self.root.clone()
    }

    /// The cgroup v2 hierarchy this state works in.
    pub fn cgroup_mount(&self) -> &Path {
        &self.mount
    }

    fn describe(&self, s: &CgroupState) -> CgroupStatus {
        let rates = self.samples.get(&s.id).map(|x| x.rate_bps).unwrap_or([0, 0]);
        let dir = |d: usize, limit: Option<Rate>| DirectionStatus {
            limit,
            rate_bps: rates[d],
            bytes: s.stats.bytes[d],
            packets: s.stats.packets[d],
            drops: s.stats.drops[d],
            marks: s.stats.marks[d],
            flows: s.flows[d],
            unpaced_flows: (d == INGRESS).then_some(s.stats.unpaced_flows),
        };
        CgroupStatus {
            cgroup: cgroup::path_of(&self.mount, s.id)
                .ok()
                .flatten()
                .unwrap_or_else(|| PathBuf::from("?")),
            id: s.id,
            name: self.names.get(&s.id).cloned(),
            egress: dir(EGRESS, s.limits.egress),
            ingress: dir(INGRESS, s.limits.ingress),
            peers: s
                .peers
                .iter()
                .map(|c| PeerStatus {
                    rule: c.rule.clone(),
                    direction: c.direction,
                    limit: c.rate,
                    shared: c.shared,
                    rate_bps: c.measured_bps,
                    flows: c.flows,
                })
                .collect(),
        }
    }
}

fn load(root: &Path, peer_pacing: bool, mount: &Path) -> Result<Datapath, Error> {
    Ok(Datapath::load_with(
        Pins::new(root),
        mount.to_path_buf(),
        peer_pacing,
    )?)
}
