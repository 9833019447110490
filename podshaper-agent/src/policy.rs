//! The `BandwidthPolicy` resource (group podshaper.io, v1alpha1): limits between pods, shaped
//! like NetworkPolicy. Its CRD is generated from these types (`podshaper crd`) and committed in
//! the chart; a test fails when the two differ. The schema rejects what it can at `kubectl
//! apply` time (rates, selector operators, CIDRs, sizes); [`BandwidthPolicySpec::check`] is the
//! same check in Rust, for the controller's Invalid condition on what the schema cannot see.
use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt};
use podshaper_api::{Direction, IpBlock, Rate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Rules per direction in one policy: as many as a pod may be bound to (the datapath's
/// PS_MAX_RULES), so that one policy alone always fits.
pub const MAX_RULES: usize = 4;
/// Peers in one rule.
pub const MAX_PEERS: usize = 32;
/// Excepts in one ipBlock.
pub const MAX_EXCEPTS: usize = 32;

/// Limits between the selected pods and their peers, or over all the selected pods together.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "podshaper.io",
    version = "v1alpha1",
    kind = "BandwidthPolicy",
    plural = "bandwidthpolicies",
    shortname = "bwp",
    namespaced,
    status = "BandwidthPolicyStatus",
    doc = "Caps on the traffic of the selected pods to or from their peers, per pod or shared by all of them (podshaper).",
    printcolumn = r#"{"name":"Rules","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.selectedPods"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthPolicySpec {
    /// The pods of this namespace the policy applies to; an empty selector selects all.
    #[schemars(schema_with = "selector_schema")]
    pub pod_selector: LabelSelector,
    /// PerPod: each selected pod gets each rule's rate. Shared: the selected pods together get
    /// it.
    #[serde(default)]
    pub scope: Scope,
    /// Caps on what the selected pods send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub egress: Vec<BandwidthRule>,
    /// Caps on what the selected pods receive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub ingress: Vec<BandwidthRule>,
}

/// Whether each selected pod gets the rate, or all of them together.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Scope {
    #[default]
    PerPod,
    Shared,
}

/// One cap: a rate, and the peers whose traffic it covers (none: all traffic that way).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthRule {
    /// Bits per second, as the bandwidth annotations write it: a quantity from 1k to 1P, e.g.
    /// 20M.
    #[schemars(schema_with = "rate_schema")]
    pub rate: String,
    /// The peers; none means all traffic in the rule's direction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub peers: Vec<Peer>,
}

/// A peer, as in NetworkPolicy: pods by label (in this namespace, or in the namespaces a
/// namespaceSelector picks), or a block of addresses; not both.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.ipBlock) != (has(self.podSelector) || has(self.namespaceSelector))",
        "message": "a peer is either an ipBlock or pods (podSelector, namespaceSelector)",
    }
]))]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "selector_schema")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "selector_schema")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<PeerIpBlock>,
}

/// A CIDR, less the CIDRs in except (each inside it), IPv4 or IPv6.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "isCIDR(self.cidr)", "message": "cidr must be a CIDR, e.g. 198.18.0.0/15 or 2001:2::/48"},
    {
        "rule": "!has(self.except) || self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength())",
        "message": "each except must be a CIDR strictly inside cidr",
    }
]))]
pub struct PeerIpBlock {
    #[schemars(length(max = 43))]
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 43)))]
    pub except: Vec<String>,
}

/// What the controller says of a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthPolicyStatus {
    /// The generation these fields describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted (True, or False with reason Invalid and a message saying why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The rules in short, e.g. "egress 20M to 1 peer".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Pods the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,
    /// Nodes whose agents enforce it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing_nodes: Option<i32>,
}

/// The addresses of a BandwidthPolicy's pod peers (podSelector / namespaceSelector), as the
/// controller resolved them for the agents: one object per policy, in its namespace, named
/// after it and labelled podshaper.io/policy-uid with its uid, so that an agent watches only
/// those of the policies selecting pods of its node. Written by the controller alone.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "podshaper.io",
    version = "v1alpha1",
    kind = "BandwidthPeerSet",
    plural = "bandwidthpeersets",
    namespaced,
    status = "BandwidthPeerSetStatus",
    doc = "The resolved pod addresses of a BandwidthPolicy's peers, written by the podshaper controller for its agents (not for people to edit)."
)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthPeerSetSpec {
    /// The policy's uid: a set outlives no policy, and one of a deleted and re-created policy
    /// of the same name is not used.
    pub policy_uid: String,
    /// The policy generation the addresses were resolved for.
    pub policy_generation: i64,
    /// Per rule of the policy's egress, in order: the addresses of its pod peers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<ResolvedPeers>,
    /// The same for ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<ResolvedPeers>,
    /// For a Shared policy: each node's part of each rule's rate, split by the nodes' demand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub shares: Vec<NodeShare>,
}

/// One node's part of a Shared policy's rates.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct NodeShare {
    pub node: String,
    /// Bits/s per egress rule of the policy, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<u64>,
    /// Bits/s per ingress rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<u64>,
}

/// What the agents report of a Shared policy: each node's use of its part. Each agent writes
/// its own entry (server-side apply, its own field manager), at most once per 10 s.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct BandwidthPeerSetStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeDemand>,
}

/// One node's use of a Shared policy's rules.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct NodeDemand {
    pub node: String,
    /// Per egress rule of the policy, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<RuleDemand>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RuleDemand>,
}

/// A node's use of one rule: what it sent or received (bits/s, averaged), and whether that
/// filled its part (it would take more).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct RuleDemand {
    pub bps: u64,
    pub saturated: bool,
}

/// The addresses (IPv4 or IPv6, no prefix) of one rule's pod peers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ResolvedPeers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// The label on a peer set naming its policy's uid.
pub const POLICY_UID_LABEL: &str = "podshaper.io/policy-uid";

/// Operators a label selector's expressions may use, and CEL that holds them to it: the
/// apiserver stores any string there, and a typo would select nothing, silently.
const SELECTOR_RULES: &str = r#"[
    {
        "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
        "message": "matchExpressions operator must be In, NotIn, Exists or DoesNotExist"
    },
    {
        "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
        "message": "In and NotIn need values; Exists and DoesNotExist take none"
    }
]"#;

/// Bounds of a selector in a policy. The apiserver refuses CEL whose worst case it cannot
/// bound (each selector rule runs for every peer of every rule), and a policy needs no more.
const MAX_EXPRESSIONS: u64 = 8;
const MAX_VALUES: u64 = 16;
const MAX_LABELS: u64 = 16;
/// A label key: a DNS subdomain prefix (253), a slash and a name (63).
const MAX_KEY_LEN: u64 = 317;
const MAX_VALUE_LEN: u64 = 63;

fn with_selector_rules(mut schema: schemars::Schema) -> schemars::Schema {
    use serde_json::json;
    // A constant, checked by the crd tests: it parses.
    let rules: serde_json::Value = serde_json::from_str(SELECTOR_RULES).unwrap_or_default();
    schema.insert("x-kubernetes-validations".into(), rules);
    let props = schema.get_mut("properties").and_then(|p| p.as_object_mut());
    if let Some(props) = props {
        if let Some(exprs) = props.get_mut("matchExpressions").and_then(|e| e.as_object_mut()) {
            exprs.insert("maxItems".into(), json!(MAX_EXPRESSIONS));
            let fields = exprs
                .get_mut("items")
                .and_then(|i| i.get_mut("properties"))
                .and_then(|p| p.as_object_mut());
            if let Some(fields) = fields {
                for (name, bound) in [
                    ("key", json!({"maxLength": MAX_KEY_LEN})),
                    ("operator", json!({"maxLength": 16})),
                    ("values", json!({"maxItems": MAX_VALUES})),
                ] {
                    if let (Some(f), Some(b)) = (
                        fields.get_mut(name).and_then(|f| f.as_object_mut()),
                        bound.as_object(),
                    ) {
                        f.extend(b.clone());
                    }
                }
                if let Some(item) = fields
                    .get_mut("values")
                    .and_then(|v| v.get_mut("items"))
                    .and_then(|i| i.as_object_mut())
                {
                    item.insert("maxLength".into(), json!(MAX_VALUE_LEN));
                }
            }
        }
        if let Some(labels) = props.get_mut("matchLabels").and_then(|l| l.as_object_mut()) {
            labels.insert("maxProperties".into(), json!(MAX_LABELS));
            if let Some(v) = labels
                .get_mut("additionalProperties")
                .and_then(|v| v.as_object_mut())
            {
                v.insert("maxLength".into(), json!(MAX_VALUE_LEN));
            }
        }
    }
    schema
}

fn selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    with_selector_rules(generator.subschema_for::<LabelSelector>())
}

fn rate_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": 32,
        "x-kubernetes-validations": [{
            "rule": "isQuantity(self) && quantity(self).compareTo(quantity('1k')) >= 0 && quantity(self).compareTo(quantity('1P')) <= 0",
            "message": "rate must be a quantity of bits/s from 1k to 1P, e.g. 20M",
        }],
    })
}

/// The CRDs as YAML, with the chart's keep policy on BandwidthPolicy: `helm uninstall` leaves
/// that CRD (and so every policy) in place, as deleting a CRD deletes all of its objects. Peer
/// sets are the controller's cache, rebuilt from the policies: they go with the chart.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut policy = BandwidthPolicy::crd();
    policy
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("helm.sh/resource-policy".into(), "keep".into());
    let policy = serde_yaml_ng::to_string(&policy)?;
    let peer_set = serde_yaml_ng::to_string(&BandwidthPeerSet::crd())?;
    Ok(format!(
        "# Generated by `podshaper crd` from podshaper-agent/src/policy.rs: do not edit.\n{policy}---\n{peer_set}"
    ))
}

/// A policy's rule, checked: its direction, rate and address blocks (selector peers are
/// resolved to addresses elsewhere).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedRule {
    pub direction: Direction,
    /// Its place in the policy's list for that direction.
    pub index: usize,
    pub rate: Rate,
    /// No peers: all traffic that way.
    pub all: bool,
    pub blocks: Vec<IpBlock>,
    /// The rule's selector peers, by index in its peers.
    pub selector_peers: Vec<usize>,
}

impl BandwidthPolicySpec {
    /// The whole check, as the schema's CEL does it and more (a cidr's host bits, overlaps the
    /// datapath cannot hold): each rule checked, or every reason it is not. A policy with
    /// any reason is Invalid and changes nothing.
    pub fn check(&self) -> Result<Vec<CheckedRule>, Vec<String>> {
        let mut rules = Vec::new();
        let mut why = Vec::new();
        if self.egress.is_empty() && self.ingress.is_empty() {
            why.push("no rules: give egress or ingress at least one".to_string());
        }
        for (direction, list) in [
            (Direction::Egress, &self.egress),
            (Direction::Ingress, &self.ingress),
        ] {
            let dir = direction_name(direction);
            if list.len() > MAX_RULES {
                why.push(format!("{dir}: {} rules, at most {MAX_RULES}", list.len()));
            }
            for (i, rule) in list.iter().enumerate() {
                let at = format!("{dir}[{i}]");
                match check_rule(direction, i, rule, &at) {
                    Ok(r) => rules.push(r),
                    Err(mut w) => why.append(&mut w),
                }
            }
        }
        if let Err(w) = check_selector(&self.pod_selector, "podSelector") {
            why.push(w);
        }
        if why.is_empty() {
            Ok(rules)
        } else {
            Err(why)
        }
    }

    /// The rules in short, for `kubectl get`: "egress 20M to 1 peer, ingress 50M".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (dir, list) in [("egress", &self.egress), ("ingress", &self.ingress)] {
            for rule in list {
                parts.push(match rule.peers.len() {
                    0 => format!("{dir} {}", rule.rate),
                    1 => format!("{dir} {} to 1 peer", rule.rate),
                    n => format!("{dir} {} to {n} peers", rule.rate),
                });
            }
        }
        let mut s = parts.join(", ");
        if self.scope == Scope::Shared && !s.is_empty() {
            s.push_str(" (shared)");
        }
        s
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

fn check_rule(
    direction: Direction,
    index: usize,
    rule: &BandwidthRule,
    at: &str,
) -> Result<CheckedRule, Vec<String>> {
    let mut why = Vec::new();
    let rate = Rate::parse_quantity(&rule.rate).map_err(|e| why.push(format!("{at}.rate: {e}")));
    if rule.peers.len() > MAX_PEERS {
        why.push(format!("{at}: {} peers, at most {MAX_PEERS}", rule.peers.len()));
    }
    let mut blocks = Vec::new();
    let mut selector_peers = Vec::new();
    for (j, peer) in rule.peers.iter().enumerate() {
        let at = format!("{at}.peers[{j}]");
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(b), None, None) => match check_block(b, &at) {
                Ok(b) => blocks.push(b),
                Err(w) => why.push(w),
            },
            (None, Some(_), _) | (None, None, Some(_)) => {
                for (sel, name) in [
                    (&peer.pod_selector, "podSelector"),
                    (&peer.namespace_selector, "namespaceSelector"),
                ] {
                    if let Some(sel) = sel {
                        if let Err(w) = check_selector(sel, &format!("{at}.{name}")) {
                            why.push(w);
                        }
                    }
                }
                selector_peers.push(j);
            }
            (None, None, None) => why.push(format!(
                "{at}: empty: give an ipBlock, or a podSelector or namespaceSelector"
            )),
            _ => why.push(format!(
                "{at}: an ipBlock and selectors at once: a peer is one or the other"
            )),
        }
    }
    match rate {
        Ok(rate) if why.is_empty() => Ok(CheckedRule {
            direction,
            index,
            rate,
            all: rule.peers.is_empty(),
            blocks,
            selector_peers,
        }),
        _ => Err(why),
    }
}

fn check_block(b: &PeerIpBlock, at: &str) -> Result<IpBlock, String> {
    let cidr: IpNet = b
        .cidr
        .parse()
        .map_err(|_| format!("{at}.ipBlock.cidr {:?}: not a CIDR", b.cidr))?;
    if cidr.trunc() != cidr {
        return Err(format!(
            "{at}.ipBlock.cidr {}: host bits set (did you mean {}?)",
            b.cidr,
            cidr.trunc()
        ));
    }
    if b.except.len() > MAX_EXCEPTS {
        return Err(format!(
            "{at}.ipBlock: {} excepts, at most {MAX_EXCEPTS}",
            b.except.len()
        ));
    }
    let mut except = Vec::new();
    for e in &b.except {
        let net: IpNet = e
            .parse()
            .map_err(|_| format!("{at}.ipBlock.except {e:?}: not a CIDR"))?;
        if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            return Err(format!("{at}.ipBlock.except {e}: not strictly inside {cidr}"));
        }
        except.push(net);
    }
    Ok(IpBlock { cidr, except })
}

fn check_selector(sel: &LabelSelector, at: &str) -> Result<(), String> {
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if values == 0 => {
                return Err(format!("{at}: {} {} needs values", e.key, e.operator))
            }
            "Exists" | "DoesNotExist" if values > 0 => {
                return Err(format!("{at}: {} {} takes no values", e.key, e.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "{at}: operator {other:?} of {}: must be In, NotIn, Exists or DoesNotExist",
                    e.key
                ))
            }
        }
    }
    let keys: BTreeSet<_> = sel.match_labels.iter().flatten().map(|(k, _)| k).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("{at}: an empty label key"));
    }
    Ok(())
}

/// A policy `namespace/name` (uid "uid-<name>") from its spec in YAML, for tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_policy(namespace: &str, name: &str, spec: &str) -> BandwidthPolicy {
    let spec: BandwidthPolicySpec = serde_yaml_ng::from_str(spec).unwrap();
    let mut p = BandwidthPolicy::new(name, spec);
    p.metadata.namespace = Some(namespace.into());
    p.metadata.uid = Some(format!("uid-{name}"));
    p.metadata.generation = Some(1);
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn spec(yaml: &str) -> BandwidthPolicySpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/helm/podshaper/templates/crds.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml().unwrap(),
            "{path} is stale: regenerate it with `podshaper crd > {path}`"
        );
    }

    #[test]
    fn the_crd_holds_its_validation_rules() {
        let crd = serde_json::to_string(&BandwidthPolicy::crd()).unwrap();
        for rule in [
            "isQuantity(self)",
            "isCIDR(self.cidr)",
            "has(self.ipBlock) != (has(self.podSelector) || has(self.namespaceSelector))",
            "e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist']",
            "\"maxItems\":4",
            "\"maxItems\":32",
            "\"jsonPath\":\".status.summary\"",
            "\"subresources\":{\"status\":{}}",
            "\"maxItems\":8",
            "\"maxProperties\":16",
            "\"maxLength\":317",
        ] {
            assert!(crd.contains(rule), "the CRD lacks {rule:?}");
        }
        let rules: serde_json::Value = serde_json::from_str(SELECTOR_RULES).unwrap();
        assert_eq!(rules.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn a_good_policy_checks_into_rules() {
        let s = spec(
            r#"
podSelector: {matchLabels: {app: batch}}
egress:
- rate: 20M
  peers:
  - podSelector: {matchLabels: {app: db}}
  - ipBlock: {cidr: 198.18.0.0/15, except: [198.18.1.0/24]}
ingress:
- rate: 50M
"#,
        );
        let rules = s.check().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].rate, Rate::from_bps(20_000_000).unwrap());
        assert_eq!(rules[0].selector_peers, vec![0]);
        assert_eq!(rules[0].blocks.len(), 1);
        assert!(!rules[0].all);
        assert!(rules[1].all);
        assert_eq!(rules[1].direction, Direction::Ingress);
        assert_eq!(s.summary(), "egress 20M to 2 peers, ingress 50M");
    }

    #[test]
    fn every_reason_a_policy_is_invalid_is_given() {
        let s = spec(
            r#"
podSelector: {}
egress:
- rate: 10Zbit
  peers:
  - ipBlock: {cidr: 198.18.0.1/15}
- rate: 1M
  peers:
  - ipBlock: {cidr: 198.18.0.0/24, except: [198.19.0.0/24]}
  - {}
  - podSelector: {matchExpressions: [{key: app, operator: Is, values: [db]}]}
    ipBlock: {cidr: 198.18.0.0/24}
"#,
        );
        let why = s.check().unwrap_err();
        let all = why.join("\n");
        for part in [
            "egress[0].rate",
            "host bits set",
            "not strictly inside",
            "egress[1].peers[1]: empty",
            "egress[1].peers[2]: an ipBlock and selectors at once",
        ] {
            assert!(all.contains(part), "{part:?} missing from:\n{all}");
        }
        assert!(spec("podSelector: {}").check().unwrap_err()[0].contains("no rules"));
    }

    #[test]
    fn selector_operators_are_checked() {
        let mut s = spec("podSelector: {}\negress: [{rate: 1M}]");
        s.pod_selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "Exists".into(),
            values: Some(vec!["x".into()]),
        }]);
        assert!(s.check().unwrap_err()[0].contains("takes no values"));
        s.pod_selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "In".into(),
            values: Some(vec!["db".into()]),
        }]);
        s.check().unwrap();
    }

    #[test]
    fn too_many_rules_or_peers_are_refused() {
        let rule = BandwidthRule {
            rate: "1M".into(),
            peers: vec![
                Peer {
                    ip_block: Some(PeerIpBlock {
                        cidr: "198.18.0.0/24".into(),
                        except: vec![],
                    }),
                    ..Peer::default()
                };
                MAX_PEERS + 1
            ],
        };
        let s = BandwidthPolicySpec {
            egress: vec![rule; MAX_RULES + 1],
            ..BandwidthPolicySpec::default()
        };
        let all = s.check().unwrap_err().join("\n");
        assert!(all.contains("5 rules, at most 4"), "{all}");
        assert!(all.contains("33 peers, at most 32"), "{all}");
    }

    #[test]
    fn the_summary_says_shared() {
        let s = spec(
            "podSelector: {}\nscope: Shared\negress: [{rate: 100M, peers: [{ipBlock: {cidr: 0.0.0.0/0}}]}]",
        );
        assert_eq!(s.summary(), "egress 100M to 1 peer (shared)");
    }
}
