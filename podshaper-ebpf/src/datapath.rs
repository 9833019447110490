//! The loaded datapath: the BPF programs, the pinned maps and the per-cgroup links.
//! The daemon owns one `Datapath`; tests load their own against a private bpffs root.
use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapData,
    programs::{links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps},
    Ebpf, EbpfLoader,
};
use podshaper_api::{
    rate::{MAX_BPS, MIN_BPS},
    Limits, Rate,
};
use tracing::{debug, info, instrument};

use crate::{
    abi::{self, Cgroup, Config, NodeStats, Peers, Stats},
    cgroup::{self, CgroupDir},
    pins::{self, Pins},
    rules::ClassState,
    sys, Error,
};

static SOCK_OPS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_ops.bpf.o"));
static CGROUP_SKB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cgroup_skb.bpf.o"));

/// The limits pinned in a cgroup's config (bits/s, 0 = none). Every value was a [`Rate`] when
/// it was written; one out of its bounds (written by hand) reads as the nearest bound rather
/// than as no limit.
pub(crate) fn limits_of(c: &Config) -> Limits {
    let opt = |v: u64| (v != 0).then(|| Rate::from_bps(v.clamp(MIN_BPS, MAX_BPS)).ok())?;
    Limits {
        egress: opt(c.rate[abi::EGRESS]),
        ingress: opt(c.rate[abi::INGRESS]),
    }
}

/// What the datapath knows of one limited cgroup.
#[derive(Clone, Debug)]
pub struct CgroupState {
    pub id: u64,
    pub limits: Limits,
    /// Counters summed over CPUs.
    pub stats: Stats,
    /// TCP flows counted as active (data in one of the last four epochs), per direction.
    pub flows: [u32; 2],
    /// The peer rules the cgroup is bound to, with their classes' state.
    pub peers: Vec<ClassState>,
}

/// The loaded programs and pinned maps.
pub struct Datapath {
    pins: Pins,
    pub(crate) mount: PathBuf,
    peer_pacing: bool,
    sock_ops: Ebpf,
    cgroup_skb: Ebpf,
    pub(crate) cgroups: MapData,
    stats: MapData,
    node: MapData,
    pub(crate) peers: MapData,
    pub(crate) classes: MapData,
    pub(crate) rule_records: MapData,
    /// The rules in ps_rules and their ps_peers entries, by name: read back at load, kept in
    /// step with every change.
    pub(crate) rules: crate::rules::Held,
    ncpus: usize,
}

impl Datapath {
    /// Loads the programs, creating or adopting the pinned maps under `pins`, and attaches the
    /// node-level program (sender pacing, see [`Datapath::set_peer_pacing`]). `mount` is the
    /// node's cgroup root: the cgroup v2 hierarchy's root (in a container, the host's
    /// hierarchy at its bind mount, not the first cgroup2 mount the container sees), or a
    /// subtree standing in for a node in a lab.
    ///
    /// State pinned by an older ABI version is migrated (see [`Datapath::migrate`]); state of
    /// a newer one is refused.
    ///
    /// The kernel is probed first ([`crate::features`]): a kernel without what the programs
    /// use is refused with the list of what is missing (mainline 5.9 has it all).
    pub fn load(pins: Pins, mount: PathBuf) -> Result<Self, Error> {
        Self::load_with(pins, mount, true)
    }

    /// [`Datapath::load`] with peer pacing on or off from the start (see
    /// [`Datapath::set_peer_pacing`]).
    pub fn load_with(pins: Pins, mount: PathBuf, peer_pacing: bool) -> Result<Self, Error> {
        crate::features::check()?;
        let older = pins.prepare()?;
        let maps_dir = pins.maps();
        let load = |obj: &'static str, bytes: &[u8]| {
            EbpfLoader::new()
                .default_map_pin_directory(&maps_dir)
                .load(bytes)
                .map_err(|source| Error::Load {
                    object: obj,
                    source: Box::new(source),
                })
        };
        let mut sock_ops = load("sock_ops.bpf.o", SOCK_OPS_OBJ)?;
        let mut cgroup_skb = load("cgroup_skb.bpf.o", CGROUP_SKB_OBJ)?;
        for name in ["ps_sockops", "ps_node_ops"] {
            program::<SockOps>(&mut sock_ops, name)?
                .load()
                .map_err(|e| prog_err(&format!("load {name}"), e))?;
        }
        for name in ["ps_egress", "ps_ingress"] {
            program::<CgroupSkb>(&mut cgroup_skb, name)?
                .load()
                .map_err(|e| prog_err(&format!("load {name}"), e))?;
        }
        let cgroups = open_pinned(&maps_dir.join("ps_cgroups"))?;
        let stats = open_pinned(&maps_dir.join("ps_stats"))?;
        let node = open_pinned(&maps_dir.join("ps_node"))?;
        let peers = open_pinned(&maps_dir.join("ps_peers"))?;
        let classes = open_pinned(&maps_dir.join("ps_classes"))?;
        let rule_records = open_pinned(&maps_dir.join("ps_rules"))?;
        let ncpus = aya::util::nr_cpus().map_err(|(what, source)| Error::Io {
            what: format!("read {what}"),
            source,
        })?;
        let mut datapath = Self {
            pins,
            mount,
            peer_pacing,
            sock_ops,
            cgroup_skb,
            cgroups,
            stats,
            node,
            rules: crate::rules::Held::read(&rule_records, &peers)?,
            peers,
            classes,
            rule_records,
            ncpus,
        };
        // This build's programs into the links an earlier daemon of this version pinned.
        datapath.refresh_links()?;
        // Before the migration: senders on this node stay paced while the old version's
        // node-level program goes.
        datapath.sync_node_link()?;
        for version in older {
            let old = datapath.pins.of_version(version);
            datapath.migrate(&old)?;
        }
        Ok(datapath)
    }

    /// Takes over the limits an older ABI version pinned under `old`: attaches this version's
    /// programs to each of its cgroups with the same limits, then unpins the old links (which
    /// detaches the old programs) and the old maps. Both versions hold the cgroup to the same
    /// limits in between, so no limit lapses. The limits are read from the head of the old
    /// `ps_cgroups` value (lock, generation_seen, config), which keeps its layout across
    /// versions; the rest is controller state, rebuilt from scratch.
    #[instrument(skip_all, fields(version = old.version()))]
    fn migrate(&mut self, old: &Pins) -> Result<(), Error> {
        let ids = old.pinned_cgroups()?;
        if !ids.is_empty() {
            let path = old.maps().join("ps_cgroups");
            let map = open_pinned(&path)?;
            let size = map
                .info()
                .map(|i| i.value_size() as usize)
                .map_err(|e| Error::Map {
                    what: format!("read map info of {}", path.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
            if size < abi::CGROUP_HEAD {
                // Not a layout this code knows: reading it would lift the limits it holds.
                return Err(Error::Unmigratable {
                    path: old.versioned(),
                    found: old.version(),
                    size,
                });
            }
            for id in ids {
                let mut buf = vec![0u8; size];
                let read = sys::lookup(map.fd().as_fd(), id, &mut buf, sys::BPF_F_LOCK);
                let head: Cgroup = sys::from_bytes(&buf[..abi::CGROUP_HEAD]);
                let limits = limits_of(&head.config);
                // A cgroup removed while no daemon ran has no storage left: just unpin.
                if let (Ok(()), Some(path)) = (read, cgroup::path_of(&self.mount, id)?) {
                    if !limits.is_none() {
                        self.set(&CgroupDir { path, id }, limits)?;
                        info!(id, ?limits, "migrated limits");
                    }
                }
                pins::remove_tree(&old.cgroup_links(id))?;
            }
        }
        pins::remove_tree(&old.versioned())
    }

    /// Whether this node's TCP senders are paced at the rates their receivers' rate options
    /// ask for (on by default): the node-level program on the node's cgroup root. Off, this
    /// node's senders ignore the option, and a limited receiver elsewhere (or here) can only
    /// police them. Receivers in limited cgroups write the option either way.
    pub fn set_peer_pacing(&mut self, on: bool) -> Result<(), Error> {
        self.peer_pacing = on;
        self.sync_node_link()
    }

    /// The node's rate-option counters, summed over CPUs.
    pub fn node_stats(&self) -> Result<NodeStats, Error> {
        // The array's u32 key 0: the kernel reads the first 4 bytes of a zero u64.
        let cpus = self
            .read_per_cpu::<NodeStats>(&self.node, 0)
            .map_err(|source| Error::Map {
                what: "read the node's option counters".into(),
                source,
            })?;
        let mut stats = NodeStats::default();
        cpus.iter().for_each(|c| stats.add(c));
        Ok(stats)
    }

    /// How many instructions the kernel's verifier went through for each program, by name
    /// (kernel 5.16+; empty before). The budget is 1M a program: this is how close to it a
    /// change took them.
    pub fn verifier_costs(&self) -> Vec<(&'static str, u32)> {
        let mut costs = Vec::new();
        for (obj, name) in [
            (&self.sock_ops, "ps_sockops"),
            (&self.sock_ops, "ps_node_ops"),
            (&self.cgroup_skb, "ps_egress"),
            (&self.cgroup_skb, "ps_ingress"),
        ] {
            let count = obj
                .program(name)
                .and_then(|p| p.info().ok())
                .and_then(|info| info.verified_instruction_count());
            if let Some(count) = count {
                costs.push((name, count));
            }
        }
        costs
    }

    /// The pinned-state tree this datapath uses.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Sets the limits of a cgroup, attaching the programs first if it has none. Applies live:
    /// established flows pick up the new share on their next ACK. The peer rules the cgroup
    /// is bound to stay; a cgroup left with neither is detached.
    #[instrument(skip_all, fields(cgroup = %cg.path.display()))]
    pub fn set(&mut self, cg: &CgroupDir, limits: Limits) -> Result<(), Error> {
        self.write(cg, Some(limits), None)
    }

    /// Writes a cgroup's limits and/or peer rules (None: keep what it has), attaching the
    /// programs first if it has none and detaching them if it is left with neither.
    pub(crate) fn write(
        &mut self,
        cg: &CgroupDir,
        limits: Option<Limits>,
        peers: Option<Peers>,
    ) -> Result<(), Error> {
        let dir = self.pins.cgroup_links(cg.id);
        let attached = dir.exists();
        let current = if attached {
            self.read_cgroup(cg.id)?
        } else {
            Cgroup::default()
        };
        let limits = limits.unwrap_or_else(|| limits_of(&current.config));
        let mut peers = peers.unwrap_or(current.peers);
        peers.owner = cg.id;
        if limits.is_none() && peers.rule.iter().all(|r| r[0] == 0) {
            return self.remove(cg.id);
        }
        if cg.path == self.mount {
            return Err(Error::RootCgroup(cg.path.clone()));
        }
        // Classes before the cgroup points at them: a full class map refuses the change whole.
        self.add_classes(&current.peers, &peers)?;
        let mut value = if attached {
            current
        } else {
            self.attach(cg, &dir)?;
            // The kernel may hand back storage of an earlier attach (shared cgroup storage
            // lives as long as the cgroup): start from zero state and counters.
            self.zero_stats(cg.id)?;
            Cgroup::default()
        };
        let (egress, ingress) = limits.bps();
        let rate = [egress.unwrap_or(0), ingress.unwrap_or(0)];
        if value.config.rate != rate || !attached {
            value.config.rate = rate;
            value.config.generation = value.config.generation.wrapping_add(1);
        }
        let old_peers = value.peers;
        value.peers = peers;
        sys::update(
            self.cgroups.fd().as_fd(),
            cg.id,
            sys::as_bytes(&value),
            sys::BPF_F_LOCK | sys::BPF_EXIST,
        )
        .map_err(|source| Error::Map {
            what: format!("write limits of cgroup {}", cg.id),
            source,
        })?;
        self.drop_classes(cg.id, &old_peers, &peers)?;
        debug!(?limits, generation = value.config.generation, "limits written");
        Ok(())
    }

    // Puts this build's programs into every link pinned under this version (the node-level one
    // and each limited cgroup's three). One ABI version means the same maps and layouts, so a
    // daemon of a newer build of it can swap the programs in place: BPF_LINK_UPDATE does it
    // atomically, and its fixes reach running limits instead of only new ones. Links of
    // cgroups that are gone (ENOLINK) are left for collect_garbage.
    fn refresh_links(&mut self) -> Result<(), Error> {
        let mut links = Vec::new();
        if self.pins.node_link().exists() {
            links.push((self.pins.node_link(), "ps_node_ops"));
        }
        for id in self.pins.pinned_cgroups()? {
            let dir = self.pins.cgroup_links(id);
            for (pin, name) in [
                ("sockops", "ps_sockops"),
                ("egress", "ps_egress"),
                ("ingress", "ps_ingress"),
            ] {
                links.push((dir.join(pin), name));
            }
        }
        for (path, name) in links {
            let fd = if name == "ps_egress" || name == "ps_ingress" {
                program::<CgroupSkb>(&mut self.cgroup_skb, name)?.fd()
            } else {
                program::<SockOps>(&mut self.sock_ops, name)?.fd()
            }
            .map_err(|e| prog_err(&format!("use program {name}"), e))?;
            match sys::link_update(&path, fd.as_fd()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                    debug!(link = %path.display(), "cgroup gone, link left for collection");
                }
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("put this build's {name} into {}", path.display()),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    // Attaches the node-level program to the node's cgroup root while peer pacing is on, and
    // detaches it when off. It is attached whether or not any cgroup here is limited: it
    // paces this node's senders toward limited receivers on any node.
    fn sync_node_link(&mut self) -> Result<(), Error> {
        let path = self.pins.node_link();
        match (self.peer_pacing, path.exists()) {
            (true, false) => {
                let root = File::open(&self.mount).map_err(|source| Error::Io {
                    what: format!("open {}", self.mount.display()),
                    source,
                })?;
                let what = format!("attach ps_node_ops to {}", self.mount.display());
                let p = program::<SockOps>(&mut self.sock_ops, "ps_node_ops")?;
                let id = p
                    .attach(root.as_fd(), CgroupAttachMode::Single)
                    .map_err(|e| prog_err(&what, e))?;
                let link: FdLink = p
                    .take_link(id)
                    .map_err(|e| prog_err(&what, e))?
                    .try_into()
                    .map_err(|e| Error::Link {
                        what: what.clone(),
                        source: Box::new(e),
                    })?;
                pin(link, &path)
            }
            (false, true) => pins::remove_tree(&path),
            _ => Ok(()),
        }
    }

    // Attaches the three programs with links pinned in a staging directory, renamed into
    // place once complete: a crash never leaves a half-attached cgroup behind a final name
    // (Pins::prepare removes stale staging directories).
    fn attach(&mut self, cg: &CgroupDir, dir: &Path) -> Result<(), Error> {
        let tmp = self.pins.staging(cg.id);
        pins::remove_tree(&tmp)?;
        fs::create_dir(&tmp).map_err(|source| Error::Io {
            what: format!("create {}", tmp.display()),
            source,
        })?;
        let result = self.attach_into(cg, &tmp).and_then(|()| {
            fs::rename(&tmp, dir).map_err(|source| Error::Io {
                what: format!("rename {} to {}", tmp.display(), dir.display()),
                source,
            })
        });
        if result.is_err() {
            // Unpinning the links detaches whatever was attached.
            let _ = pins::remove_tree(&tmp);
        }
        result
    }

    fn attach_into(&mut self, cg: &CgroupDir, tmp: &Path) -> Result<(), Error> {
        let file = File::open(&cg.path).map_err(|source| Error::Io {
            what: format!("open {}", cg.path.display()),
            source,
        })?;
        // bpf_link attaches are always multi: other owners' programs stay (aya maps the mode
        // to flags that BPF_LINK_CREATE rejects unless it is Single).
        let mode = CgroupAttachMode::Single;
        let ctx = |what: &str| format!("attach {what} to {}", cg.path.display());
        let p = program::<SockOps>(&mut self.sock_ops, "ps_sockops")?;
        let id = p
            .attach(file.as_fd(), mode)
            .map_err(|e| prog_err(&ctx("sockops"), e))?;
        let link: FdLink = p
            .take_link(id)
            .map_err(|e| prog_err(&ctx("sockops"), e))?
            .try_into()
            .map_err(|e| Error::Link {
                what: ctx("sockops"),
                source: Box::new(e),
            })?;
        pin(link, &tmp.join("sockops"))?;
        for (name, kind, pin_name) in [
            ("ps_egress", CgroupSkbAttachType::Egress, "egress"),
            ("ps_ingress", CgroupSkbAttachType::Ingress, "ingress"),
        ] {
            let p = program::<CgroupSkb>(&mut self.cgroup_skb, name)?;
            let id = p
                .attach(file.as_fd(), kind, mode)
                .map_err(|e| prog_err(&ctx(pin_name), e))?;
            let link: FdLink = p
                .take_link(id)
                .map_err(|e| prog_err(&ctx(pin_name), e))?
                .try_into()
                .map_err(|e| Error::Link {
                    what: ctx(pin_name),
                    source: Box::new(e),
                })?;
            pin(link, &tmp.join(pin_name))?;
        }
        Ok(())
    }

    /// Detaches everything podshaper attached to a cgroup (a no-op if nothing is), its peer
    /// classes included.
    #[instrument(skip(self))]
    pub fn remove(&mut self, id: u64) -> Result<(), Error> {
        pins::remove_tree(&self.pins.cgroup_links(id))?;
        self.drop_owned_classes(id)
    }

    /// Ids of the cgroups with pinned links.
    pub fn limited(&self) -> Result<Vec<u64>, Error> {
        self.pins.pinned_cgroups()
    }

    /// Reads config, state and counters of a limited cgroup. `Ok(None)` when it is not limited,
    /// or its links are pinned but the kernel has no storage for it (the cgroup was removed).
    pub fn state(&self, id: u64) -> Result<Option<CgroupState>, Error> {
        // The kernel keeps shared cgroup storage until the cgroup is released, also after
        // its programs were detached: only a pinned cgroup is limited.
        if !self.pins.cgroup_links(id).exists() {
            return Ok(None);
        }
        let value = match self.read_cgroup(id) {
            Ok(v) => v,
            Err(Error::Map { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut stats = Stats::default();
        if let Ok(cpus) = self.read_per_cpu::<Stats>(&self.stats, id) {
            cpus.iter().for_each(|c| stats.add(c));
        }
        Ok(Some(CgroupState {
            id,
            limits: limits_of(&value.config),
            stats,
            flows: [value.dir[0].active_flows(), value.dir[1].active_flows()],
            peers: self.classes_of(&value.peers),
        }))
    }

    fn zero_stats(&self, id: u64) -> Result<(), Error> {
        let zeros = vec![0u8; per_cpu_stride::<Stats>() * self.ncpus];
        sys::update(self.stats.fd().as_fd(), id, &zeros, sys::BPF_EXIST).map_err(|source| Error::Map {
            what: format!("reset counters of cgroup {id}"),
            source,
        })
    }

    /// One value per CPU of `key` in the per-CPU map `map`.
    pub(crate) fn read_per_cpu<T: Copy + Default>(&self, map: &MapData, key: u64) -> std::io::Result<Vec<T>> {
        let stride = per_cpu_stride::<T>();
        let mut buf = vec![0u8; stride * self.ncpus];
        sys::lookup(map.fd().as_fd(), key, &mut buf, 0)?;
        Ok(buf.chunks_exact(stride).map(sys::from_bytes::<T>).collect())
    }

    pub(crate) fn read_cgroup(&self, id: u64) -> Result<Cgroup, Error> {
        let mut buf = vec![0u8; std::mem::size_of::<Cgroup>()];
        sys::lookup(self.cgroups.fd().as_fd(), id, &mut buf, sys::BPF_F_LOCK).map_err(|source| {
            Error::Map {
                what: format!("read state of cgroup {id}"),
                source,
            }
        })?;
        Ok(sys::from_bytes(&buf))
    }

    /// Unpins the links of cgroups that no longer exist (the kernel detached their programs
    /// but a pinned link stays until unpinned); returns their ids.
    pub fn collect_garbage(&mut self, mount: &Path) -> Result<Vec<u64>, Error> {
        let mut gone = Vec::new();
        for id in self.limited()? {
            if cgroup::path_of(mount, id)?.is_none() {
                self.remove(id)?;
                gone.push(id);
            }
        }
        Ok(gone)
    }
}

// Per-CPU values are laid out at 8-byte strides.
fn per_cpu_stride<T>() -> usize {
    std::mem::size_of::<T>().div_ceil(8) * 8
}

fn program<'a, T>(obj: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = obj
        .program_mut(name)
        .ok_or_else(|| Error::MissingProgram(name.to_string()))?;
    p.try_into()
        .map_err(|e| prog_err(&format!("use program {name}"), e))
}

fn prog_err(what: &str, source: aya::programs::ProgramError) -> Error {
    Error::Program {
        what: what.to_string(),
        source: Box::new(source),
    }
}

fn open_pinned(path: &Path) -> Result<MapData, Error> {
    MapData::from_pin(path).map_err(|e| Error::Map {
        what: format!("open pinned map {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

fn pin(link: FdLink, path: &Path) -> Result<(), Error> {
    link.pin(path).map(drop).map_err(|e| Error::Io {
        what: format!("pin link at {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Removes every pin of every ABI version under `root`: what an uninstall runs. Links go
/// first, so programs detach before their maps are unpinned.
pub fn reset(root: &Path) -> Result<(), Error> {
    let pins = Pins::new(root);
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            pins::remove_tree(&e.path().join("links"))?;
        }
    }
    pins::remove_tree(pins.root())
}
