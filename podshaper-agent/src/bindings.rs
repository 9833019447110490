//! From BandwidthPolicies to what this node holds: one peer rule per policy rule the agent can
//! resolve on its own, and the rules each pod is bound to. Pure: reconcile.rs feeds it the
//! policies as the watch reports them and asks for each of its pods; tested here in
//! milliseconds.
//!
//! A rule's peers are its ipBlocks, plus, for podSelector / namespaceSelector peers, the
//! addresses the controller resolved into the policy's BandwidthPeerSet (the agent watches no
//! other node's pods). A rule with no peers covers all traffic that way (0.0.0.0/0 and ::/0).
//! A rule with selector peers whose set has not arrived yet is not applied (none of its peers:
//! never half a rule), and the agent says so.
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use kube::{
    core::{Selector, SelectorExt},
    ResourceExt,
};
use podshaper_api::{peers::MAX_NAME_LEN, Direction, IpBlock, PeerRule, Rate};

use crate::policy::{BandwidthPeerSet, BandwidthPeerSetSpec, BandwidthPolicy, Scope, MAX_RULES};

/// The prefix of the names of the rules the agent sets: rules without it (set with `podshaper
/// rule set` on the node) are never changed or removed by the agent.
pub const RULE_PREFIX: &str = "bwp:";

/// A policy or peer set, by namespace and name.
type Key = (String, String);

/// The policies the agent knows and the peer sets it watches, compiled to node rules.
#[derive(Debug, Default)]
pub struct Policies {
    /// This node's name: its part of a Shared policy's rates is the one named so.
    node: String,
    raw: BTreeMap<Key, BandwidthPolicy>,
    sets: BTreeMap<Key, BandwidthPeerSetSpec>,
    by_key: BTreeMap<Key, Compiled>,
}

#[derive(Clone, Debug)]
struct Compiled {
    /// None: the policy is invalid and binds nothing.
    selector: Option<Selector>,
    rules: Vec<PeerRule>,
    /// The policy's uid when some rule has selector peers or it is Shared: the peer set to
    /// watch.
    needs_set: Option<String>,
    /// A Shared policy with its set: what the node reports of it.
    shared: Option<SharedPolicy>,
}

/// A Shared policy's rules as this node holds them, for the agent's demand report: per
/// direction, in the policy's rule order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPolicy {
    pub key: Key,
    pub egress: Vec<SharedRule>,
    pub ingress: Vec<SharedRule>,
}

/// One rule of a Shared policy: its node rule's name, the policy's rate and this node's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRule {
    pub name: String,
    pub rate: u64,
    pub part: u64,
}

/// What compiling a policy found worth telling: why it binds nothing, or which of its rules
/// wait for the controller.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notes {
    pub invalid: Vec<String>,
    pub unresolved: Vec<String>,
}

/// The rules a pod is to be bound to, or why it cannot be.
#[derive(Debug, PartialEq, Eq)]
pub enum PodRules<'a> {
    Bound(Vec<&'a PeerRule>),
    /// More rules cover the pod in one direction than the datapath holds for a cgroup.
    TooMany(String),
}

impl Policies {
    /// No policies yet, for the agent of `node`.
    pub fn on_node(node: &str) -> Self {
        Self {
            node: node.into(),
            ..Self::default()
        }
    }

    /// The Shared policies with a peer set, as this node holds them.
    pub fn shared(&self) -> Vec<&SharedPolicy> {
        self.by_key.values().filter_map(|c| c.shared.as_ref()).collect()
    }

    /// Adds or replaces a policy; what the agent should say of it.
    pub fn apply(&mut self, policy: &BandwidthPolicy) -> Notes {
        let Some(key) = key_of(policy) else {
            return Notes::default();
        };
        self.raw.insert(key.clone(), policy.clone());
        self.compile(&key)
    }

    pub fn delete(&mut self, policy: &BandwidthPolicy) {
        if let Some(key) = key_of(policy) {
            self.raw.remove(&key);
            self.by_key.remove(&key);
        }
    }

    /// Replaces all policies with a fresh list; what to say of each.
    pub fn replace(&mut self, policies: Vec<BandwidthPolicy>) -> Vec<(BandwidthPolicy, Notes)> {
        self.raw = policies
            .into_iter()
            .filter_map(|p| Some((key_of(&p)?, p)))
            .collect();
        self.by_key.clear();
        self.compile_all()
    }

    /// Adds or replaces a peer set; what to say of its policy, if the agent has it. None
    /// too when only its status changed (the nodes' reports): nothing to do here.
    pub fn apply_set(&mut self, set: &BandwidthPeerSet) -> Option<(BandwidthPolicy, Notes)> {
        let key = (set.namespace()?, set.name_any());
        if self.sets.get(&key) == Some(&set.spec) {
            return None;
        }
        self.sets.insert(key.clone(), set.spec.clone());
        let policy = self.raw.get(&key)?.clone();
        Some((policy, self.compile(&key)))
    }

    pub fn delete_set(&mut self, set: &BandwidthPeerSet) -> Option<(BandwidthPolicy, Notes)> {
        let key = (set.namespace()?, set.name_any());
        self.sets.remove(&key);
        let policy = self.raw.get(&key)?.clone();
        Some((policy, self.compile(&key)))
    }

    /// Replaces all peer sets with a fresh list; what to say of each policy.
    pub fn replace_sets(&mut self, sets: Vec<BandwidthPeerSet>) -> Vec<(BandwidthPolicy, Notes)> {
        self.sets = sets
            .into_iter()
            .filter_map(|s| Some(((s.namespace()?, s.name_any()), s.spec)))
            .collect();
        self.compile_all()
    }

    /// The uids of the valid policies with selector peers that select one of `pods`
    /// (namespace, labels): the peer sets this node needs, and no others.
    pub fn wanted_sets<'a>(
        &self,
        pods: impl Iterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    ) -> BTreeSet<String> {
        let mut wanted = BTreeSet::new();
        for (namespace, labels) in pods {
            for c in self.in_namespace(namespace) {
                if let (Some(uid), Some(sel)) = (&c.needs_set, &c.selector) {
                    if sel.matches(labels) {
                        wanted.insert(uid.clone());
                    }
                }
            }
        }
        wanted
    }

    fn in_namespace<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Compiled> + 'a {
        let namespace = namespace.to_string();
        self.by_key
            .range((namespace.clone(), String::new())..)
            .take_while(move |((ns, _), _)| *ns == namespace)
            .map(|(_, c)| c)
    }

    fn compile(&mut self, key: &Key) -> Notes {
        let Some(policy) = self.raw.get(key) else {
            return Notes::default();
        };
        let set = self.sets.get(key);
        // A set resolved for another generation of the policy (the controller has not caught
        // up with an edit yet, or is down): what is in force stays, rather than mixing the new
        // spec's rules with the old set's addresses and parts.
        let stale = set.is_some_and(|s| {
            policy.uid().as_deref() == Some(s.policy_uid.as_str())
                && Some(s.policy_generation) != policy.metadata.generation
        });
        if let (true, Some(previous)) = (stale, self.by_key.get(key)) {
            if previous.needs_set.is_some() {
                return Notes {
                    invalid: Vec::new(),
                    unresolved: vec![format!(
                        "generation {}: waiting for the controller to resolve it; the rules of the one before stay in force",
                        policy.metadata.generation.unwrap_or(0)
                    )],
                };
            }
        }
        let (compiled, notes) = compile(key, policy, set, &self.node);
        self.by_key.insert(key.clone(), compiled);
        notes
    }

    fn compile_all(&mut self) -> Vec<(BandwidthPolicy, Notes)> {
        let keys: Vec<Key> = self.raw.keys().cloned().collect();
        keys.iter()
            .filter_map(|k| {
                let notes = self.compile(k);
                Some((self.raw.get(k)?.clone(), notes))
            })
            .collect()
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.raw.contains_key(&(namespace.to_string(), name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The rules of every valid policy of `namespace` whose podSelector matches `labels`,
    /// sorted by name; refused when more than a cgroup holds cover the pod in one direction
    /// (binding some of them would half apply the policies).
    pub fn rules_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodRules<'_> {
        let mut rules: Vec<&PeerRule> = self
            .in_namespace(namespace)
            .filter(|c| c.selector.as_ref().is_some_and(|s| s.matches(labels)))
            .flat_map(|c| &c.rules)
            .collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        for direction in [Direction::Egress, Direction::Ingress] {
            let names: Vec<&str> = rules
                .iter()
                .filter(|r| r.direction == direction)
                .map(|r| r.name.as_str())
                .collect();
            if names.len() > MAX_RULES {
                return PodRules::TooMany(format!(
                    "{} {direction} rules of BandwidthPolicies select this pod, a pod holds at most {MAX_RULES} per direction: \
                     none of them is changed on it until some are removed ({})",
                    names.len(),
                    names.join(", ")
                ));
            }
        }
        PodRules::Bound(rules)
    }
}

fn key_of(policy: &BandwidthPolicy) -> Option<Key> {
    Some((policy.namespace()?, policy.name_any()))
}

fn compile(
    key: &Key,
    policy: &BandwidthPolicy,
    set: Option<&BandwidthPeerSetSpec>,
    node: &str,
) -> (Compiled, Notes) {
    let (namespace, name) = (key.0.as_str(), key.1.as_str());
    let mut notes = Notes::default();
    let invalid = |why: Vec<String>| {
        let compiled = Compiled {
            selector: None,
            rules: Vec::new(),
            needs_set: None,
            shared: None,
        };
        let notes = Notes {
            invalid: why,
            unresolved: Vec::new(),
        };
        (compiled, notes)
    };
    let checked = match policy.spec.check() {
        Ok(rules) => rules,
        Err(why) => return invalid(why),
    };
    // check() holds the selector to the operators Selector parses.
    let selector = match Selector::try_from(policy.spec.pod_selector.clone()) {
        Ok(s) => s,
        Err(e) => return invalid(vec![format!("podSelector: {e}")]),
    };
    let uid = policy.uid();
    // A set is this policy's only if it names its uid (not one of a deleted namesake).
    let set = set.filter(|s| uid.as_deref() == Some(s.policy_uid.as_str()));
    let shared = policy.spec.scope == Scope::Shared;
    // This node's part of each rule's rate, once the controller split it (never more than
    // the rate); a node the split left out (its pods are new to the controller) has the
    // least part until the next split, so the parts never sum past the rate.
    let shares = set.map(|s| s.shares.as_slice()).unwrap_or_default();
    let share = shares.iter().find(|n| n.node == node);
    let part = |direction: Direction, index: usize, rate: Rate| {
        let bps = match share {
            Some(s) => *match direction {
                Direction::Egress => s.egress.get(index)?,
                Direction::Ingress => s.ingress.get(index)?,
            },
            None if !shares.is_empty() => crate::share::least_part(rate.bps()),
            None => return None,
        };
        // The datapath's least rate, 1k, is also the least part.
        Rate::from_bps(bps.clamp(1_000, rate.bps().max(1_000))).ok()
    };
    let mut needs_set = shared;
    let mut report = SharedPolicy {
        key: key.clone(),
        egress: Vec::new(),
        ingress: Vec::new(),
    };
    let mut rules = Vec::new();
    for rule in checked {
        let rate = match part(rule.direction, rule.index, rule.rate) {
            Some(p) if shared => p,
            _ => rule.rate,
        };
        if shared {
            let list = match rule.direction {
                Direction::Egress => &mut report.egress,
                Direction::Ingress => &mut report.ingress,
            };
            list.push(SharedRule {
                name: rule_name(namespace, name, rule.direction, rule.index),
                rate: rule.rate.bps(),
                part: rate.bps(),
            });
        }
        let at = format!("{}[{}]", rule.direction, rule.index);
        let mut blocks = rule.blocks;
        if !rule.selector_peers.is_empty() {
            needs_set = true;
            let resolved = set.and_then(|s| {
                let list = match rule.direction {
                    Direction::Egress => &s.egress,
                    Direction::Ingress => &s.ingress,
                };
                list.get(rule.index)
            });
            let Some(resolved) = resolved else {
                notes.unresolved.push(format!(
                    "{at}: waiting for the controller to resolve its podSelector/namespaceSelector peers"
                ));
                continue;
            };
            // The controller writes plain addresses; one that does not parse is skipped (a
            // newer controller's format), the rest apply.
            blocks.extend(
                resolved
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                    .map(|ip| IpBlock::of(IpNet::from(ip))),
            );
            if blocks.is_empty() {
                // No peer at all right now (no pod matches): nothing to cap.
                continue;
            }
        } else if rule.all {
            blocks = ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .map(IpBlock::of)
                .collect();
        }
        rules.push(PeerRule {
            name: rule_name(namespace, name, rule.direction, rule.index),
            direction: rule.direction,
            rate,
            shared,
            peers: blocks,
        });
    }
    let compiled = Compiled {
        selector: Some(selector),
        rules,
        needs_set: uid.filter(|_| needs_set),
        shared: (shared && set.is_some()).then_some(report),
    };
    (compiled, notes)
}

/// The node rule of a policy's rule: `bwp:<namespace>/<name>:<direction><index>`, unique on
/// the node and readable in `podshaper rule list`. A name too long for the datapath keeps its
/// head and gets a hash of the whole, so it stays unique and the same across restarts.
pub fn rule_name(namespace: &str, name: &str, direction: Direction, index: usize) -> String {
    let tail = format!(":{direction}{index}");
    let full = format!("{RULE_PREFIX}{namespace}/{name}{tail}");
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    let hash = format!("~{:016x}", fnv1a(format!("{namespace}/{name}").as_bytes()));
    let room = MAX_NAME_LEN - RULE_PREFIX.len() - hash.len() - tail.len();
    let head: String = format!("{namespace}/{name}").chars().take(room).collect();
    format!("{RULE_PREFIX}{head}{hash}{tail}")
}

/// FNV-1a, 64 bits: written out because the names it makes are pinned in the kernel across
/// agent upgrades, and std's hashers promise no stable output.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The names of rules, sorted and deduplicated: what a pod's cgroup is bound to.
pub fn names(rules: &[&PeerRule]) -> Vec<String> {
    let set: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    set.into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::test_policy as policy;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn bound<'a>(p: &'a Policies, ns: &str, kv: &[(&str, &str)]) -> Vec<&'a PeerRule> {
        match p.rules_for(ns, &labels(kv)) {
            PodRules::Bound(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ip_block_and_peerless_rules_bind_the_selected_pods_of_the_namespace_only() {
        let mut p = Policies::default();
        let notes = p.apply(&policy(
            "shop",
            "batch",
            "podSelector: {matchLabels: {app: batch}}\n\
             egress:\n- rate: 20M\n  peers:\n  - ipBlock: {cidr: 198.18.0.0/15, except: [198.18.1.0/24]}\n  - ipBlock: {cidr: '2001:2::/48'}\n\
             ingress:\n- rate: 1G\n",
        ));
        assert_eq!(notes, Notes::default());
        let rules = bound(&p, "shop", &[("app", "batch"), ("tier", "x")]);
        assert_eq!(
            names(&rules),
            ["bwp:shop/batch:egress0", "bwp:shop/batch:ingress0"]
        );
        let egress = rules[0];
        assert_eq!(egress.direction, Direction::Egress);
        assert_eq!(egress.rate.to_string(), "20M");
        assert!(!egress.shared);
        assert_eq!(egress.peers.len(), 2);
        assert_eq!(egress.peers[0].except.len(), 1);
        // No peers: all traffic that way, both families.
        let all: Vec<String> = rules[1].peers.iter().map(|b| b.cidr.to_string()).collect();
        assert_eq!(all, ["0.0.0.0/0", "::/0"]);
        for r in &rules {
            r.validate().unwrap();
        }
        // Another label, another namespace: nothing (tenancy: a policy binds only its own
        // namespace's pods).
        assert!(bound(&p, "shop", &[("app", "web")]).is_empty());
        assert!(bound(&p, "other", &[("app", "batch")]).is_empty());
        assert!(bound(&p, "sho", &[("app", "batch")]).is_empty());
    }

    #[test]
    fn selector_peers_wait_for_the_controller_and_the_rest_applies() {
        let mut p = Policies::default();
        let notes = p.apply(&policy(
            "shop",
            "db",
            "podSelector: {}\nscope: Shared\n\
             egress:\n- rate: 20M\n  peers: [{podSelector: {matchLabels: {app: db}}}]\n\
             - rate: 50M\n  peers: [{ipBlock: {cidr: 198.18.0.0/24}}]\n",
        ));
        assert!(notes.invalid.is_empty());
        assert_eq!(notes.unresolved.len(), 1);
        assert!(notes.unresolved[0].starts_with("egress[0]"), "{notes:?}");
        let rules = bound(&p, "shop", &[]);
        assert_eq!(names(&rules), ["bwp:shop/db:egress1"]);
        assert!(rules[0].shared, "scope Shared");
        // The node needs the set of this policy, for its pods it selects.
        let labels = labels(&[]);
        let wanted = p.wanted_sets([("shop", &labels)].into_iter());
        assert_eq!(wanted.into_iter().collect::<Vec<_>>(), ["uid-db"]);
        assert!(p.wanted_sets([("other", &labels)].into_iter()).is_empty());

        // A set of a deleted namesake (another uid) is not used.
        let (_, notes) = p
            .apply_set(&peer_set("shop", "db", "uid-old", &["198.18.5.5"]))
            .unwrap();
        assert_eq!(notes.unresolved.len(), 1);
        // Its own: the rule applies with those addresses, as host prefixes.
        let (_, notes) = p
            .apply_set(&peer_set("shop", "db", "uid-db", &["198.18.5.5", "2001:2::5"]))
            .unwrap();
        assert_eq!(notes, Notes::default());
        let rules = bound(&p, "shop", &[]);
        assert_eq!(names(&rules), ["bwp:shop/db:egress0", "bwp:shop/db:egress1"]);
        let peers: Vec<String> = rules[0].peers.iter().map(|b| b.cidr.to_string()).collect();
        assert_eq!(peers, ["198.18.5.5/32", "2001:2::5/128"]);
        rules[0].validate().unwrap();
        // No pod matches its peers right now: nothing to cap, no rule.
        p.apply_set(&peer_set("shop", "db", "uid-db", &[]));
        assert_eq!(names(&bound(&p, "shop", &[])), ["bwp:shop/db:egress1"]);
        // A relist without it: waiting again.
        let told = p.replace_sets(Vec::new());
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].1.unresolved.len(), 1);
    }

    fn peer_set(ns: &str, name: &str, uid: &str, addresses: &[&str]) -> BandwidthPeerSet {
        let spec = BandwidthPeerSetSpec {
            policy_uid: uid.into(),
            policy_generation: 1,
            egress: vec![crate::policy::ResolvedPeers {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
            }],
            ingress: Vec::new(),
            shares: Vec::new(),
        };
        let mut set = BandwidthPeerSet::new(name, spec);
        set.metadata.namespace = Some(ns.into());
        set
    }

    #[test]
    fn a_shared_policy_holds_this_nodes_part_once_the_controller_split_it() {
        let mut p = Policies::on_node("node-a");
        p.apply(&policy(
            "shop",
            "total",
            "podSelector: {}\nscope: Shared\negress: [{rate: 30M}]\n",
        ));
        // Applied at the whole rate before any split, and the node watches the set.
        assert_eq!(bound(&p, "shop", &[])[0].rate.to_string(), "30M");
        let labels = labels(&[]);
        assert_eq!(p.wanted_sets([("shop", &labels)].into_iter()).len(), 1);
        assert!(p.shared().is_empty(), "nothing to report to without a set");
        let mut set = peer_set("shop", "total", "uid-total", &[]);
        set.spec.egress.clear();
        set.spec.shares = vec![
            crate::policy::NodeShare {
                node: "node-b".into(),
                egress: vec![20_000_000],
                ingress: Vec::new(),
            },
            crate::policy::NodeShare {
                node: "node-a".into(),
                egress: vec![10_000_000],
                ingress: Vec::new(),
            },
        ];
        p.apply_set(&set);
        let rules = bound(&p, "shop", &[]);
        assert_eq!(rules[0].rate.to_string(), "10M");
        assert!(rules[0].shared);
        let shared = p.shared();
        assert_eq!(shared.len(), 1);
        assert_eq!(
            shared[0].egress,
            [SharedRule {
                name: "bwp:shop/total:egress0".into(),
                rate: 30_000_000,
                part: 10_000_000
            }]
        );
    }

    #[test]
    fn a_set_of_another_generation_keeps_what_is_in_force() {
        let mut p = Policies::on_node("node-a");
        let mut v1 = policy(
            "shop",
            "db",
            "podSelector: {}\negress: [{rate: 20M, peers: [{podSelector: {matchLabels: {app: db}}}]}]\n",
        );
        v1.metadata.generation = Some(1);
        p.apply(&v1);
        p.apply_set(&peer_set("shop", "db", "uid-db", &["198.18.5.5"]));
        assert_eq!(bound(&p, "shop", &[])[0].rate.to_string(), "20M");
        // Edited to 10M to other peers: until the controller resolves generation 2, the
        // generation-1 rule stays, not the new rate over the old peers.
        let mut v2 = policy(
            "shop",
            "db",
            "podSelector: {}\negress: [{rate: 10M, peers: [{podSelector: {matchLabels: {app: cache}}}]}]\n",
        );
        v2.metadata.generation = Some(2);
        let notes = p.apply(&v2);
        assert!(notes.unresolved[0].contains("generation 2"), "{notes:?}");
        assert_eq!(bound(&p, "shop", &[])[0].rate.to_string(), "20M");
        let mut set = peer_set("shop", "db", "uid-db", &["198.18.6.6"]);
        set.spec.policy_generation = 2;
        p.apply_set(&set);
        let rules = bound(&p, "shop", &[]);
        assert_eq!(rules[0].rate.to_string(), "10M");
        assert_eq!(rules[0].peers[0].cidr.to_string(), "198.18.6.6/32");
    }

    #[test]
    fn a_nodes_part_never_exceeds_the_rate_and_a_node_left_out_gets_the_least() {
        let shared = "podSelector: {}\nscope: Shared\negress: [{rate: 30M}]\n";
        let mut set = peer_set("shop", "total", "uid-total", &[]);
        set.spec.egress.clear();
        set.spec.shares = vec![crate::policy::NodeShare {
            node: "node-b".into(),
            egress: vec![90_000_000],
            ingress: Vec::new(),
        }];
        for (node, want) in [("node-b", "30M"), ("node-a", "300k")] {
            let mut p = Policies::on_node(node);
            p.apply(&policy("shop", "total", shared));
            p.apply_set(&set);
            assert_eq!(bound(&p, "shop", &[])[0].rate.to_string(), want, "{node}");
        }
    }

    #[test]
    fn an_invalid_policy_binds_nothing_and_says_why() {
        let mut p = Policies::default();
        let notes = p.apply(&policy(
            "shop",
            "bad",
            "podSelector: {}\negress:\n- rate: 20M\n  peers: [{ipBlock: {cidr: 198.18.0.1/24}}]\n",
        ));
        assert_eq!(notes.invalid.len(), 1);
        assert!(notes.invalid[0].contains("host bits"), "{notes:?}");
        assert!(bound(&p, "shop", &[]).is_empty());
        // Fixed: it binds; deleted: it is gone.
        let good = policy(
            "shop",
            "bad",
            "podSelector: {}\negress:\n- rate: 20M\n  peers: [{ipBlock: {cidr: 198.18.0.0/24}}]\n",
        );
        assert_eq!(p.apply(&good), Notes::default());
        assert_eq!(bound(&p, "shop", &[]).len(), 1);
        p.delete(&good);
        assert!(p.is_empty());
        assert!(bound(&p, "shop", &[]).is_empty());
    }

    #[test]
    fn more_rules_than_a_pod_holds_are_refused_whole() {
        let mut p = Policies::default();
        let spec = "podSelector: {}\negress: [{rate: 1M}, {rate: 2M}, {rate: 3M}]\n";
        p.apply(&policy("shop", "a", spec));
        assert_eq!(bound(&p, "shop", &[]).len(), 3);
        p.apply(&policy(
            "shop",
            "b",
            "podSelector: {matchLabels: {app: x}}\negress: [{rate: 1M}, {rate: 2M}]\n",
        ));
        assert_eq!(bound(&p, "shop", &[]).len(), 3, "b does not select it");
        let PodRules::TooMany(why) = p.rules_for("shop", &labels(&[("app", "x")])) else {
            panic!("5 egress rules bound")
        };
        assert!(
            why.contains("5 egress rules") && why.contains("bwp:shop/b:egress1"),
            "{why}"
        );
    }

    #[test]
    fn long_names_are_cut_with_a_stable_hash() {
        let short = rule_name("shop", "batch", Direction::Ingress, 3);
        assert_eq!(short, "bwp:shop/batch:ingress3");
        let long_name = "n".repeat(253);
        let a = rule_name("shop", &long_name, Direction::Egress, 0);
        let b = rule_name("shop", &format!("{}m", "n".repeat(252)), Direction::Egress, 0);
        assert_eq!(a.len(), MAX_NAME_LEN);
        assert_ne!(a, b, "different policies, different names");
        assert!(a.starts_with("bwp:shop/nnn") && a.ends_with(":egress0"), "{a}");
        assert_eq!(a, rule_name("shop", &long_name, Direction::Egress, 0));
        // The hash is FNV-1a's published vectors: a change would rename every rule on upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
