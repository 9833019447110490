//! From BandwidthPolicies to what this node holds: one peer rule per policy rule the agent can
//! resolve on its own, and the rules each pod is bound to. Pure: reconcile.rs feeds it the
//! policies as the watch reports them and asks for each of its pods; tested here in
//! milliseconds.
//!
//! The agent resolves what it can see without watching other nodes' pods: a rule whose peers
//! are all ipBlocks, and a rule with no peers (all traffic that way: 0.0.0.0/0 and ::/0). A
//! rule with podSelector or namespaceSelector peers needs those pods' addresses, which the
//! controller will resolve (docs/policy.md); until then such a rule is not applied, and the
//! agent says so once per policy generation.
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use kube::{
    core::{Selector, SelectorExt},
    ResourceExt,
};
use podshaper_api::{peers::MAX_NAME_LEN, Direction, IpBlock, PeerRule};

use crate::policy::{BandwidthPolicy, Scope, MAX_RULES};

/// The prefix of the names of the rules the agent sets: rules without it (set with `podshaper
/// rule set` on the node) are never changed or removed by the agent.
pub const RULE_PREFIX: &str = "bwp:";

/// The policies the agent knows, compiled to node rules.
#[derive(Debug, Default)]
pub struct Policies {
    by_key: BTreeMap<(String, String), Compiled>,
}

#[derive(Debug)]
struct Compiled {
    /// None: the policy is invalid and binds nothing.
    selector: Option<Selector>,
    rules: Vec<PeerRule>,
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
    /// Adds or replaces a policy; what the agent should say of it.
    pub fn apply(&mut self, policy: &BandwidthPolicy) -> Notes {
        let (Some(namespace), name) = (policy.namespace(), policy.name_any()) else {
            return Notes::default();
        };
        let (compiled, notes) = compile(&namespace, &name, policy);
        self.by_key.insert((namespace, name), compiled);
        notes
    }

    pub fn delete(&mut self, policy: &BandwidthPolicy) {
        if let Some(namespace) = policy.namespace() {
            self.by_key.remove(&(namespace, policy.name_any()));
        }
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.by_key
            .contains_key(&(namespace.to_string(), name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The rules of every valid policy of `namespace` whose podSelector matches `labels`,
    /// sorted by name; refused when more than a cgroup holds cover the pod in one direction
    /// (binding some of them would half apply the policies).
    pub fn rules_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodRules<'_> {
        let mut rules: Vec<&PeerRule> = self
            .by_key
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter(|(_, c)| c.selector.as_ref().is_some_and(|s| s.matches(labels)))
            .flat_map(|(_, c)| &c.rules)
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

fn compile(namespace: &str, name: &str, policy: &BandwidthPolicy) -> (Compiled, Notes) {
    let mut notes = Notes::default();
    let invalid = |notes: Notes| {
        let compiled = Compiled {
            selector: None,
            rules: Vec::new(),
        };
        (compiled, notes)
    };
    let checked = match policy.spec.check() {
        Ok(rules) => rules,
        Err(why) => {
            return invalid(Notes {
                invalid: why,
                ..notes
            })
        }
    };
    // check() holds the selector to the operators Selector parses.
    let selector = match Selector::try_from(policy.spec.pod_selector.clone()) {
        Ok(s) => s,
        Err(e) => {
            return invalid(Notes {
                invalid: vec![format!("podSelector: {e}")],
                ..notes
            })
        }
    };
    let shared = policy.spec.scope == Scope::Shared;
    let mut rules = Vec::new();
    for rule in checked {
        let at = format!("{}[{}]", rule.direction, rule.index);
        if !rule.selector_peers.is_empty() {
            notes.unresolved.push(format!(
                "{at}: podSelector/namespaceSelector peers need the podshaper controller, not applied yet"
            ));
            continue;
        }
        let peers = if rule.all {
            ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .map(IpBlock::of)
                .collect()
        } else {
            rule.blocks
        };
        rules.push(PeerRule {
            name: rule_name(namespace, name, rule.direction, rule.index),
            direction: rule.direction,
            rate: rule.rate,
            shared,
            peers,
        });
    }
    let compiled = Compiled {
        selector: Some(selector),
        rules,
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
fn fnv1a(bytes: &[u8]) -> u64 {
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
    use crate::policy::BandwidthPolicySpec;

    fn policy(namespace: &str, name: &str, spec: &str) -> BandwidthPolicy {
        let spec: BandwidthPolicySpec = serde_yaml_ng::from_str(spec).unwrap();
        let mut p = BandwidthPolicy::new(name, spec);
        p.metadata.namespace = Some(namespace.into());
        p
    }

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
