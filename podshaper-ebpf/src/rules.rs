//! Peer rules in the datapath (see `podshaper_api::peers`): each rule's peers as entries of the
//! `ps_peers` trie, its record in `ps_rules`, its classes in `ps_classes` (one per bound cgroup,
//! or one for the node when shared), and which rules each cgroup is bound to (`ps_peers` of
//! its `ps_cgroups` value). All of it is pinned: a restarted daemon, or none at all, leaves
//! every cap in force.
//!
//! Changes are ordered so that none opens a gap: a rule's new entries go in before its old ones
//! go out, a class exists before a cgroup points at it and goes after the cgroup stops, and a
//! change past a map's capacity is refused before anything is written.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsFd,
};

use aya::maps::MapData;
use ipnet::IpNet;
use podshaper_api::{
    peers::PeerRule,
    rate::{MAX_BPS, MIN_BPS},
    Direction, Rate,
};
use tracing::{info, instrument};

use crate::{
    abi::{
        self, Cgroup, ClassKey, PeerKey, Peers, Rule, MAX_CLASSES, MAX_PEER_PREFIXES, MAX_RULES,
        MAX_RULE_IDS, PEER_IN, PEER_OUT, PEER_V6, RULE_FLAG_SHARED, RULE_SHARED,
    },
    cgroup::CgroupDir,
    sys, Datapath, Error,
};

/// One rule as the datapath holds it.
#[derive(Clone, Debug)]
pub(crate) struct HeldRule {
    id: u32,
    dir: usize,
    rate: u64,
    shared: bool,
    entries: BTreeMap<PeerKey, u32>,
}

/// The rules on this node, by name.
#[derive(Debug, Default)]
pub(crate) struct Held(BTreeMap<String, HeldRule>);

/// A rule as `podshaper rule list` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleState {
    pub name: String,
    pub direction: Direction,
    pub rate: Rate,
    pub shared: bool,
    /// Entries in the node's peer table: CIDRs and excepts.
    pub prefixes: usize,
    /// Measured over the last epoch across the node, bits/s, for a shared rule.
    pub shared_bps: Option<u64>,
}

/// One peer class of a cgroup, as `status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassState {
    pub rule: String,
    pub direction: Direction,
    pub rate: Rate,
    pub shared: bool,
    /// Measured over the last epoch, bits/s of L3 traffic (for a shared rule: all its
    /// cgroups on this node).
    pub measured_bps: u64,
    /// TCP flows counted as active in the class.
    pub flows: u32,
}

fn direction(dir: usize) -> Direction {
    if dir == abi::INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

fn rate_of(bps: u64) -> Rate {
    // Every stored rate was a Rate; one out of bounds (written by hand) reads as the nearest.
    Rate::from_bps(bps.clamp(MIN_BPS, MAX_BPS)).unwrap_or(Rate::MIN)
}

/// The trie key of a prefix of a rule: IPv4 in the first 4 bytes, IPv6 with [`PEER_V6`] in
/// the rule field (the families never match each other), the prefix length counting the rule.
pub(crate) fn peer_key(rule: u32, net: &IpNet) -> PeerKey {
    let mut addr = [0u8; 16];
    let rule = match net.addr() {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            rule
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            rule | PEER_V6
        }
    };
    PeerKey {
        prefixlen: 32 + u32::from(net.prefix_len()),
        rule,
        addr,
    }
}

/// A rule as a cgroup's value names it: its id, with the shared bit for a shared rule's class.
fn bound_id(id: u32, shared: bool) -> u32 {
    id | if shared { RULE_SHARED } else { 0 }
}

fn map_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Map { what, source }
}

impl Held {
    /// Reads the rules a daemon pinned before: records from `ps_rules`, entries from
    /// `ps_peers`. Entries of no recorded rule (a crash between the two) are kept with no
    /// rule to own them and removed by the next change of the table.
    pub(crate) fn read(records: &MapData, peers: &MapData) -> Result<Self, Error> {
        let mut by_id = BTreeMap::new();
        for id in sys::keys_as::<u32>(records.fd().as_fd()).map_err(map_err("list ps_rules".into()))? {
            let r: Rule =
                sys::lookup_as(records.fd().as_fd(), &id, 0).map_err(map_err(format!("read rule {id}")))?;
            let len = r.name.iter().position(|&b| b == 0).unwrap_or(r.name.len());
            let name = String::from_utf8_lossy(&r.name[..len]).into_owned();
            by_id.insert(
                id,
                (
                    name,
                    HeldRule {
                        id,
                        dir: r.dir as usize,
                        rate: r.rate,
                        shared: r.flags & RULE_FLAG_SHARED != 0,
                        entries: BTreeMap::new(),
                    },
                ),
            );
        }
        for key in sys::keys_as::<PeerKey>(peers.fd().as_fd()).map_err(map_err("list ps_peers".into()))? {
            if let Some((_, held)) = by_id.get_mut(&(key.rule & !PEER_V6)) {
                let v: u32 =
                    sys::lookup_as(peers.fd().as_fd(), &key, 0).map_err(map_err("read ps_peers".into()))?;
                held.entries.insert(key, v);
            }
        }
        Ok(Self(by_id.into_values().collect()))
    }

    fn by_id(&self, id: u32) -> Option<(&String, &HeldRule)> {
        self.0.iter().find(|(_, h)| h.id == id)
    }
}

impl Datapath {
    /// Sets a peer rule (new, or changed in place: peers, rate, shared or not). Cgroups bound
    /// to it see the change live. A rule keeps its direction.
    #[instrument(skip_all, fields(rule = %rule.name))]
    pub fn set_rule(&mut self, rule: &PeerRule) -> Result<(), Error> {
        rule.validate()?;
        let dir = rule.direction.index();
        let old = self.rules.0.get(&rule.name).cloned();
        if let Some(old) = &old {
            if old.dir != dir {
                return Err(Error::RuleDirection {
                    name: rule.name.clone(),
                    was: direction(old.dir),
                    now: rule.direction,
                });
            }
        }
        let id = match &old {
            Some(h) => h.id,
            None => self.free_rule_id()?,
        };
        let entries: BTreeMap<PeerKey, u32> = rule
            .entries()
            .iter()
            .map(|(net, inside)| (peer_key(id, net), if *inside { PEER_IN } else { PEER_OUT }))
            .collect();
        let held_now: usize = self.rules.0.values().map(|h| h.entries.len()).sum();
        let wanted = held_now - old.as_ref().map_or(0, |h| h.entries.len()) + entries.len();
        if wanted > MAX_PEER_PREFIXES {
            return Err(Error::Capacity {
                what: "peer prefixes",
                wanted,
                capacity: MAX_PEER_PREFIXES,
            });
        }
        if rule.shared && !old.as_ref().is_some_and(|h| h.shared) && self.class_count()? + 1 > MAX_CLASSES {
            return Err(Error::Capacity {
                what: "peer classes",
                wanted: MAX_CLASSES + 1,
                capacity: MAX_CLASSES,
            });
        }

        // The record first: a daemon that stops half-way finds the rule again.
        let mut record = Rule {
            rate: rule.rate.bps(),
            dir: dir as u32,
            flags: if rule.shared { RULE_FLAG_SHARED } else { 0 },
            ..Rule::default()
        };
        record.name[..rule.name.len()].copy_from_slice(rule.name.as_bytes());
        sys::update_as(self.rule_records.fd().as_fd(), &id, &record, 0)
            .map_err(map_err(format!("record rule {}", rule.name)))?;
        let old_entries = old.as_ref().map(|h| h.entries.clone()).unwrap_or_default();
        for (key, value) in &entries {
            if old_entries.get(key) != Some(value) {
                sys::update_as(self.peers.fd().as_fd(), key, value, 0)
                    .map_err(map_err(format!("write a peer of rule {}", rule.name)))?;
            }
        }
        for key in old_entries.keys().filter(|k| !entries.contains_key(k)) {
            sys::delete_as(self.peers.fd().as_fd(), key)
                .map_err(map_err(format!("remove a peer of rule {}", rule.name)))?;
        }
        let held = HeldRule {
            id,
            dir,
            rate: rule.rate.bps(),
            shared: rule.shared,
            entries,
        };
        self.rules.0.insert(rule.name.clone(), held);

        if rule.shared {
            self.put_class(ClassKey::new(0, id), dir, rule.rate.bps())?;
        }
        for key in self
            .class_keys()?
            .into_iter()
            .filter(|k| k.rule == id && k.owner != 0)
        {
            self.put_class(key, dir, rule.rate.bps())?;
        }
        if let Some(old) = old.filter(|h| h.shared != rule.shared) {
            // The bound cgroups name the rule with its shared bit: point them at the right
            // class, then drop the one no longer used.
            for cg in self.bound_to(id)? {
                let value = self.read_cgroup(cg)?;
                let mut peers = value.peers;
                for r in peers.rule[dir]
                    .iter_mut()
                    .filter(|r| **r & abi::RULE_ID_MAX == id)
                {
                    *r = bound_id(id, rule.shared);
                }
                self.rebind(cg, peers)?;
            }
            if old.shared {
                self.delete_class(ClassKey::new(0, id))?;
            }
        }
        info!(
            id,
            direction = %rule.direction,
            rate = %rule.rate,
            shared = rule.shared,
            prefixes = self.rules.0[&rule.name].entries.len(),
            "rule set"
        );
        Ok(())
    }

    /// Removes a peer rule: unbinds it from every cgroup (detaching those left with nothing),
    /// then removes its classes, peers and record. Returns whether it existed.
    #[instrument(skip(self))]
    pub fn remove_rule(&mut self, name: &str) -> Result<bool, Error> {
        let Some(held) = self.rules.0.get(name).cloned() else {
            return Ok(false);
        };
        for cg in self.bound_to(held.id)? {
            let value = self.read_cgroup(cg)?;
            let mut peers = value.peers;
            for list in peers.rule.iter_mut() {
                let kept: Vec<u32> = list
                    .iter()
                    .copied()
                    .filter(|r| *r != 0 && *r & abi::RULE_ID_MAX != held.id)
                    .collect();
                *list = [0; MAX_RULES];
                list[..kept.len()].copy_from_slice(&kept);
            }
            self.rebind(cg, peers)?;
        }
        for key in self.class_keys()?.into_iter().filter(|k| k.rule == held.id) {
            self.delete_class(key)?;
        }
        for key in held.entries.keys() {
            sys::delete_as(self.peers.fd().as_fd(), key)
                .map_err(map_err(format!("remove a peer of rule {name}")))?;
        }
        sys::delete_as(self.rule_records.fd().as_fd(), &held.id)
            .map_err(map_err(format!("remove rule {name}")))?;
        self.rules.0.remove(name);
        info!(id = held.id, "rule removed");
        Ok(true)
    }

    /// Binds a cgroup to exactly these rules (by name; none unbinds it from all), attaching
    /// the programs if it has none and detaching them if it is left with no limit and no rule.
    /// Refused whole if a name is unknown or a direction gets more than [`MAX_RULES`].
    #[instrument(skip_all, fields(cgroup = %cg.path.display()))]
    pub fn bind(&mut self, cg: &CgroupDir, names: &[String]) -> Result<(), Error> {
        let mut lists: [Vec<u32>; 2] = Default::default();
        for name in names.iter().collect::<BTreeSet<_>>() {
            let held = self
                .rules
                .0
                .get(name)
                .ok_or_else(|| Error::UnknownRule(name.clone()))?;
            lists[held.dir].push(bound_id(held.id, held.shared));
        }
        let mut peers = Peers::default();
        for (dir, list) in lists.iter().enumerate() {
            if list.len() > MAX_RULES {
                return Err(Error::TooManyRules {
                    direction: direction(dir),
                    count: list.len(),
                    max: MAX_RULES,
                });
            }
            peers.rule[dir][..list.len()].copy_from_slice(list);
        }
        self.write(cg, None, Some(peers))
    }

    /// The rules on this node.
    pub fn rule_states(&self) -> Vec<RuleState> {
        let now = sys::monotonic_ns();
        self.rules
            .0
            .iter()
            .map(|(name, h)| RuleState {
                name: name.clone(),
                direction: direction(h.dir),
                rate: rate_of(h.rate),
                shared: h.shared,
                prefixes: h.entries.len(),
                shared_bps: h.shared.then(|| {
                    self.read_class(ClassKey::new(0, h.id))
                        .map_or(0, |c| c.dir[h.dir].measured_bps(now))
                }),
            })
            .collect()
    }

    /// The names of the rules a cgroup's value binds it to, with their classes' state.
    pub(crate) fn classes_of(&self, peers: &Peers) -> Vec<ClassState> {
        let now = sys::monotonic_ns();
        let mut out = Vec::new();
        for (dir, list) in peers.rule.iter().enumerate() {
            for &r in list.iter().take_while(|r| **r != 0) {
                let id = r & abi::RULE_ID_MAX;
                let Some((name, h)) = self.rules.by_id(id) else {
                    continue;
                };
                let owner = if r & RULE_SHARED != 0 { 0 } else { peers.owner };
                let class = self.read_class(ClassKey::new(owner, id));
                out.push(ClassState {
                    rule: name.clone(),
                    direction: direction(dir),
                    rate: rate_of(h.rate),
                    shared: h.shared,
                    measured_bps: class.as_ref().map_or(0, |c| c.dir[dir].measured_bps(now)),
                    flows: class.as_ref().map_or(0, |c| c.dir[dir].active_flows()),
                });
            }
        }
        out
    }

    // Creates the per-cgroup classes `new` names that `old` did not, refusing the change
    // whole when the class map cannot hold them. Shared classes exist with their rule.
    pub(crate) fn add_classes(&mut self, old: &Peers, new: &Peers) -> Result<(), Error> {
        let missing: Vec<(usize, u32)> = own_rules(new)
            .filter(|(dir, id)| !own_rules(old).any(|(d, i)| d == *dir && i == *id))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let wanted = self.class_count()? + missing.len();
        if wanted > MAX_CLASSES {
            return Err(Error::Capacity {
                what: "peer classes",
                wanted,
                capacity: MAX_CLASSES,
            });
        }
        for (dir, id) in missing {
            let rate = self.rules.by_id(id).map_or(0, |(_, h)| h.rate);
            self.put_class(ClassKey::new(new.owner, id), dir, rate)?;
        }
        Ok(())
    }

    // Removes the per-cgroup classes `old` named that `new` does not.
    pub(crate) fn drop_classes(&mut self, owner: u64, old: &Peers, new: &Peers) -> Result<(), Error> {
        for (dir, id) in own_rules(old) {
            if !own_rules(new).any(|(d, i)| d == dir && i == id) {
                self.delete_class(ClassKey::new(owner, id))?;
            }
        }
        Ok(())
    }

    // Removes every class a cgroup owns (it is detached or gone).
    pub(crate) fn drop_owned_classes(&mut self, owner: u64) -> Result<(), Error> {
        for key in self.class_keys()?.into_iter().filter(|k| k.owner == owner) {
            self.delete_class(key)?;
        }
        Ok(())
    }

    fn rebind(&mut self, id: u64, peers: Peers) -> Result<(), Error> {
        let path = crate::cgroup::path_of(&self.mount, id)?;
        match path {
            Some(path) => self.write(&CgroupDir { path, id }, None, Some(peers)),
            // Gone: its links and classes go.
            None => self.remove(id),
        }
    }

    // Limited cgroups bound to rule `id`.
    fn bound_to(&self, id: u32) -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        for cg in self.limited()? {
            let Ok(value) = self.read_cgroup(cg) else { continue };
            if value
                .peers
                .rule
                .iter()
                .flatten()
                .any(|r| *r != 0 && *r & abi::RULE_ID_MAX == id)
            {
                out.push(cg);
            }
        }
        Ok(out)
    }

    fn free_rule_id(&self) -> Result<u32, Error> {
        if self.rules.0.len() >= MAX_RULE_IDS {
            return Err(Error::Capacity {
                what: "peer rules",
                wanted: MAX_RULE_IDS + 1,
                capacity: MAX_RULE_IDS,
            });
        }
        let used: BTreeSet<u32> = self.rules.0.values().map(|h| h.id).collect();
        Ok((1..).find(|i| !used.contains(i)).unwrap_or(1))
    }

    // Creates a class with `rate` in `dir`, or sets the rate of the one there. A new rate
    // restarts its controller (the generation moves); the same rate leaves it alone.
    fn put_class(&mut self, key: ClassKey, dir: usize, rate: u64) -> Result<(), Error> {
        let fd = self.classes.fd();
        let what = || format!("write peer class {}/{}", key.owner, key.rule);
        let mut value: Cgroup = match sys::lookup_as(fd.as_fd(), &key, sys::BPF_F_LOCK) {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut v = Cgroup::default();
                v.config.rate[dir] = rate;
                v.config.generation = 1;
                return sys::update_as(fd.as_fd(), &key, &v, sys::BPF_NOEXIST).map_err(map_err(what()));
            }
            Err(e) => return Err(map_err(what())(e)),
        };
        if value.config.rate[dir] == rate {
            return Ok(());
        }
        value.config.rate = [0, 0];
        value.config.rate[dir] = rate;
        value.config.generation = value.config.generation.wrapping_add(1);
        sys::update_as(fd.as_fd(), &key, &value, sys::BPF_F_LOCK | sys::BPF_EXIST).map_err(map_err(what()))
    }

    fn delete_class(&mut self, key: ClassKey) -> Result<(), Error> {
        sys::delete_as(self.classes.fd().as_fd(), &key)
            .map_err(map_err(format!("remove peer class {}/{}", key.owner, key.rule)))
    }

    fn read_class(&self, key: ClassKey) -> Option<Cgroup> {
        sys::lookup_as(self.classes.fd().as_fd(), &key, sys::BPF_F_LOCK).ok()
    }

    fn class_keys(&self) -> Result<Vec<ClassKey>, Error> {
        sys::keys_as(self.classes.fd().as_fd()).map_err(map_err("list ps_classes".into()))
    }

    /// Peer classes in the node's class map (per-cgroup and shared).
    pub fn class_count(&self) -> Result<usize, Error> {
        Ok(self.class_keys()?.len())
    }

    /// Entries in the node's peer table, read from the kernel (not from what the daemon
    /// believes it wrote).
    pub fn peer_entries(&self) -> Result<usize, Error> {
        Ok(sys::keys_as::<PeerKey>(self.peers.fd().as_fd())
            .map_err(map_err("list ps_peers".into()))?
            .len())
    }
}

// (direction, rule id) of the rules with a class of the cgroup's own.
fn own_rules(p: &Peers) -> impl Iterator<Item = (usize, u32)> + '_ {
    p.rule.iter().enumerate().flat_map(|(dir, list)| {
        list.iter()
            .take_while(|r| **r != 0)
            .filter(|r| **r & RULE_SHARED == 0)
            .map(move |r| (dir, *r))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_family_has_its_own_keys() {
        let k = peer_key(7, &"198.18.1.0/24".parse().unwrap());
        assert_eq!(k.prefixlen, 32 + 24);
        assert_eq!(k.rule, 7);
        assert_eq!(&k.addr[..4], &[198, 18, 1, 0]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        let k = peer_key(7, &"2001:2::/48".parse().unwrap());
        assert_eq!(k.prefixlen, 32 + 48);
        assert_eq!(k.rule, 7 | PEER_V6);
        assert_eq!(&k.addr[..6], &[0x20, 0x01, 0, 2, 0, 0]);
        // ::/0 is the whole IPv6 space, and IPv4 is not in it.
        let k = peer_key(7, &"::/0".parse().unwrap());
        assert_eq!((k.prefixlen, k.rule), (32, 7 | PEER_V6));
    }
}
