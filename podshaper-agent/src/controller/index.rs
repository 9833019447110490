//! The controller's in-memory index: namespaces, pods, Services, EndpointSlices and policies as
//! the watches report them, and from them what to publish for each policy: the addresses of its
//! pod peers and of the Services in front of them (the BandwidthPeerSet agents read) and its
//! status. Pure: the controller's loop feeds it and writes what it answers; tested here in
//! milliseconds.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time},
    jiff::Timestamp,
};
use kube::{
    core::{Selector, SelectorExt},
    ResourceExt,
};

use podshaper_api::Direction;

use crate::{
    policy::{
        BandwidthPeerSetSpec, BandwidthPeerSetStatus, BandwidthPolicy, BandwidthPolicyStatus, NodeShare,
        ResolvedPeers, RuleDemand, Scope,
    },
    share,
};

/// A policy, by namespace and name.
pub type Key = (String, String);

/// What the controller needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    /// Its addresses (status.podIPs); none before the sandbox is up.
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// A hostNetwork pod has the node's addresses, shared by the node and every such pod on it:
    /// never a peer by selector (an ipBlock with the node's address is how to cap those).
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be another pod's.
    pub finished: bool,
    /// Creation time (seconds) and uid: of two live pods with one address (a reused address
    /// while the old pod terminates), the newer one has it.
    pub age: (i64, String),
}

impl PodInfo {
    /// The pod's namespace, name and what the index keeps of it.
    pub fn of(pod: &Pod) -> Option<(String, String, Self)> {
        let status = pod.status.as_ref();
        let spec = pod.spec.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        let info = Self {
            labels: pod.labels().clone(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            age: (
                pod.creation_timestamp().map_or(0, |t| t.0.as_second()),
                pod.uid().unwrap_or_default(),
            ),
        };
        Some((pod.namespace()?, pod.name_any(), info))
    }

    /// Whether its addresses are peers a selector may pick.
    fn addressable(&self) -> bool {
        !self.finished && !self.host_network
    }
}

/// The endpoints of one EndpointSlice: its Service, and each endpoint's pod (none for an
/// endpoint that is not a pod's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: String,
    pub pods: Vec<Option<Key>>,
}

impl SliceInfo {
    /// The slice's namespace, name and what the index keeps of it; none for a slice of no
    /// Service.
    pub fn of(slice: &EndpointSlice) -> Option<(String, String, Self)> {
        let service = slice.labels().get("kubernetes.io/service-name")?.clone();
        let namespace = slice.namespace()?;
        let pods = slice
            .endpoints
            .iter()
            .map(|e| {
                e.target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        Some((
                            r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                            r.name.clone()?,
                        ))
                    })
            })
            .collect();
        Some((namespace, slice.name_any(), Self { service, pods }))
    }
}

/// A Service's ClusterIPs (none for a headless or ExternalName one).
pub fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let spec = service.spec.as_ref();
    spec.and_then(|s| {
        s.cluster_ips
            .clone()
            .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
    })
    .into_iter()
    .flatten()
    .filter_map(|ip| ip.parse().ok())
    .collect()
}

/// The most addresses a policy's selector peers may resolve to, all rules together: a set
/// holds ~20 bytes of JSON per address, and an object stays well under etcd's 1.5 MiB; a
/// node's rule holds at most 65,536 blocks.
pub const MAX_RESOLVED: usize = 50_000;

/// A pod holding an address: its age (see [`PodInfo::age`]), namespace and name.
type Holder = ((i64, String), String, String);

/// The index.
#[derive(Debug, Default)]
pub struct Index {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: BTreeMap<String, BTreeMap<String, PodInfo>>,
    /// The addressable pods holding each address, oldest first: the last one owns it.
    holders: HashMap<IpAddr, BTreeSet<Holder>>,
    /// Services' ClusterIPs, by namespace and name.
    services: BTreeMap<Key, Vec<IpAddr>>,
    /// EndpointSlices, by namespace and name.
    slices: BTreeMap<Key, SliceInfo>,
    policies: BTreeMap<Key, BandwidthPolicy>,
    /// Each policy's selectors, parsed once: which pod changes can alter what it publishes.
    selectors: BTreeMap<Key, Selectors>,
}

/// A policy's podSelector and its selector peers (a namespaceSelector, if any, and a
/// podSelector, all pods if none).
#[derive(Debug, Default)]
struct Selectors {
    pods: Option<Selector>,
    peers: Vec<(Option<Selector>, Selector)>,
}

/// What to publish for a policy.
#[derive(Debug, PartialEq)]
pub struct Published {
    /// The addresses of its pod peers; none when it has no selector peer or is invalid.
    pub peer_set: Option<BandwidthPeerSetSpec>,
    /// Leave the set as it is (the selectors pick too many addresses: what is enforced stays,
    /// rather than lifting the cap or applying half of it).
    pub keep_set: bool,
    pub status: BandwidthPolicyStatus,
}

impl Index {
    /// Adds or changes a namespace; whether that changed anything.
    pub fn set_namespace(&mut self, name: String, labels: BTreeMap<String, String>) -> bool {
        self.namespaces.insert(name, labels.clone()) != Some(labels)
    }

    pub fn delete_namespace(&mut self, name: &str) -> bool {
        self.namespaces.remove(name).is_some()
    }

    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces.keys().cloned().collect()
    }

    /// Adds or changes a pod; whether anything a policy reads changed (a pod's status
    /// updates mostly change nothing here).
    pub fn set_pod(&mut self, namespace: String, name: String, info: PodInfo) -> bool {
        let old = self.pods.get(&namespace).and_then(|p| p.get(&name));
        if old == Some(&info) {
            return false;
        }
        self.delete_pod(&namespace, &name);
        if info.addressable() {
            for ip in &info.ips {
                self.holders.entry(*ip).or_default().insert((
                    info.age.clone(),
                    namespace.clone(),
                    name.clone(),
                ));
            }
        }
        self.pods.entry(namespace).or_default().insert(name, info);
        true
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> bool {
        let Some(ns) = self.pods.get_mut(namespace) else {
            return false;
        };
        let Some(old) = ns.remove(name) else {
            return false;
        };
        if ns.is_empty() {
            self.pods.remove(namespace);
        }
        for ip in &old.ips {
            if let Some(h) = self.holders.get_mut(ip) {
                h.remove(&(old.age.clone(), namespace.to_string(), name.to_string()));
                if h.is_empty() {
                    self.holders.remove(ip);
                }
            }
        }
        true
    }

    /// Adds or changes a Service's ClusterIPs; whether that changed anything.
    pub fn set_service(&mut self, key: Key, ips: Vec<IpAddr>) -> bool {
        self.services.insert(key, ips.clone()) != Some(ips)
    }

    pub fn delete_service(&mut self, key: &Key) -> bool {
        self.services.remove(key).is_some()
    }

    pub fn service_keys(&self) -> Vec<Key> {
        self.services.keys().cloned().collect()
    }

    pub fn set_slice(&mut self, key: Key, slice: SliceInfo) -> bool {
        self.slices.insert(key, slice.clone()) != Some(slice)
    }

    pub fn slice(&self, key: &Key) -> Option<&SliceInfo> {
        self.slices.get(key)
    }

    pub fn delete_slice(&mut self, key: &Key) -> bool {
        self.slices.remove(key).is_some()
    }

    pub fn slice_keys(&self) -> Vec<Key> {
        self.slices.keys().cloned().collect()
    }

    /// Every pod, by namespace and name.
    pub fn pod_keys(&self) -> Vec<Key> {
        self.pods
            .iter()
            .flat_map(|(ns, pods)| pods.keys().map(move |n| (ns.clone(), n.clone())))
            .collect()
    }

    pub fn set_policy(&mut self, policy: BandwidthPolicy) -> Option<Key> {
        let key = (policy.namespace()?, policy.name_any());
        let peers = policy
            .spec
            .egress
            .iter()
            .chain(&policy.spec.ingress)
            .flat_map(|r| &r.peers)
            .filter(|p| p.ip_block.is_none())
            .filter_map(|p| {
                let namespaces = match &p.namespace_selector {
                    Some(s) => Some(selector(s)?),
                    None => None,
                };
                let pods = match &p.pod_selector {
                    Some(s) => selector(s)?,
                    None => Selector::default(),
                };
                Some((namespaces, pods))
            })
            .collect();
        let selectors = Selectors {
            pods: selector(&policy.spec.pod_selector),
            peers,
        };
        self.selectors.insert(key.clone(), selectors);
        self.policies.insert(key.clone(), policy);
        Some(key)
    }

    pub fn delete_policy(&mut self, key: &Key) {
        self.policies.remove(key);
        self.selectors.remove(key);
    }

    /// What the index holds of a pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(namespace)?.get(name)
    }

    /// Whether one of `ips` is held by two pods: a change of one of them may move the address
    /// to or from the other, and so alter any policy.
    pub fn held_twice(&self, ips: &[IpAddr]) -> bool {
        ips.iter()
            .any(|ip| self.holders.get(ip).is_some_and(|h| h.len() > 1))
    }

    /// The policies whose publication a change of a pod of `namespace` may alter: those that
    /// select it or name it as a peer with any of `labels` (as it was, as it is).
    pub fn touching(&self, namespace: &str, labels: &[&BTreeMap<String, String>]) -> Vec<Key> {
        let ns_labels = self.namespaces.get(namespace);
        let any = |sel: &Selector| labels.iter().any(|l| sel.matches(l));
        self.selectors
            .iter()
            .filter(|((pns, _), s)| {
                let selected = pns == namespace && s.pods.as_ref().is_some_and(any);
                let peer = s.peers.iter().any(|(namespaces, pods)| {
                    let in_namespace = match namespaces {
                        None => pns == namespace,
                        Some(n) => ns_labels.is_some_and(|l| n.matches(l)),
                    };
                    in_namespace && any(pods)
                });
                selected || peer
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn policy(&self, key: &Key) -> Option<&BandwidthPolicy> {
        self.policies.get(key)
    }

    pub fn policy_keys(&self) -> Vec<Key> {
        self.policies.keys().cloned().collect()
    }

    /// What to publish for the policy `key`, if it exists; `now` stamps a condition that
    /// changes (one that does not keeps its time from `status`). `demand`: what the agents
    /// reported in its peer set, for a Shared policy's split.
    pub fn publish(
        &self,
        key: &Key,
        now: Timestamp,
        demand: Option<&BandwidthPeerSetStatus>,
    ) -> Option<Published> {
        let policy = self.policies.get(key)?;
        let (namespace, _) = key;
        let generation = policy.metadata.generation.unwrap_or(0);
        let checked = policy.spec.check();
        let selected: Vec<&PodInfo> = match selector(&policy.spec.pod_selector) {
            Some(sel) => self
                .pods
                .get(namespace)
                .into_iter()
                .flat_map(|p| p.values())
                .filter(|p| !p.finished && sel.matches(&p.labels))
                .collect(),
            None => Vec::new(),
        };
        let nodes: BTreeSet<&str> = selected.iter().filter_map(|p| p.node.as_deref()).collect();
        let has_selector_peers = policy
            .spec
            .egress
            .iter()
            .chain(&policy.spec.ingress)
            .flat_map(|r| &r.peers)
            .any(|p| p.ip_block.is_none());
        let shared = policy.spec.scope == Scope::Shared;
        let checked_reasons = checked.as_ref().err().cloned();
        let peer_set = match (checked, policy.uid()) {
            (Ok(rules), Some(uid)) if has_selector_peers || shared => Some(BandwidthPeerSetSpec {
                policy_uid: uid,
                policy_generation: generation,
                egress: policy
                    .spec
                    .egress
                    .iter()
                    .map(|r| self.resolve(namespace, &r.peers))
                    .collect(),
                ingress: policy
                    .spec
                    .ingress
                    .iter()
                    .map(|r| self.resolve(namespace, &r.peers))
                    .collect(),
                shares: if shared {
                    let rates = |d| {
                        rules
                            .iter()
                            .filter(|r| r.direction == d)
                            .map(|r| r.rate.bps())
                            .collect()
                    };
                    shares(
                        &nodes,
                        rates(Direction::Egress),
                        rates(Direction::Ingress),
                        demand,
                    )
                } else {
                    Vec::new()
                },
            }),
            _ => None,
        };
        // A set past what one object and a node's rule hold is refused whole, not cut.
        let addresses: usize = peer_set
            .iter()
            .flat_map(|s| s.egress.iter().chain(&s.ingress))
            .map(|r| r.addresses.len())
            .sum();
        // The count stays out of the message: a message that changed with every pod would be
        // a status write with every pod.
        let too_many = (addresses > MAX_RESOLVED).then(|| {
            format!(
                "its selectors pick more than the {MAX_RESOLVED} addresses a policy may resolve to; the peers in force are kept as they were (narrow the selectors, or use an ipBlock of the pod CIDR)"
            )
        });
        let keep_set = too_many.is_some();
        let peer_set = peer_set.filter(|_| !keep_set);
        let (accepted, reason, message) = match (&checked_reasons, too_many) {
            (None, Some(why)) => ("False", "TooManyPeers", why),
            (None, None) => ("True", "Accepted", String::new()),
            (Some(why), _) => (
                "False",
                "Invalid",
                format!("{}; it changes nothing", why.join("; ")),
            ),
        };
        let previous = policy
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"));
        let since = match previous {
            Some(c) if c.status == accepted && c.reason == reason => c.last_transition_time.clone(),
            _ => Time(now),
        };
        let status = BandwidthPolicyStatus {
            observed_generation: Some(generation),
            conditions: vec![Condition {
                type_: "Accepted".into(),
                status: accepted.into(),
                reason: reason.into(),
                message,
                observed_generation: Some(generation),
                last_transition_time: since,
            }],
            summary: Some(policy.spec.summary()),
            selected_pods: Some(i32::try_from(selected.len()).unwrap_or(i32::MAX)),
            enforcing_nodes: Some(i32::try_from(nodes.len()).unwrap_or(i32::MAX)),
        };
        Some(Published {
            peer_set,
            keep_set,
            status,
        })
    }

    /// The addresses of the pods the selector peers pick, as NetworkPolicy reads them: a
    /// podSelector alone picks pods of the policy's namespace; a namespaceSelector picks
    /// namespaces, and with a podSelector only those pods in them. And the ClusterIPs of the
    /// Services all of whose endpoints are such pods: a client's socket and its cgroup's hooks
    /// see the Service's address, the node translates it after them. Sorted.
    fn resolve(&self, namespace: &str, peers: &[crate::policy::Peer]) -> ResolvedPeers {
        let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
        let mut picked: BTreeSet<(&str, &str)> = BTreeSet::new();
        for peer in peers.iter().filter(|p| p.ip_block.is_none()) {
            let pods = match &peer.pod_selector {
                Some(s) => selector(s),
                None => Some(Selector::default()),
            };
            let Some(pods) = pods else { continue };
            let namespaces: Vec<&str> = match &peer.namespace_selector {
                None => vec![namespace],
                Some(s) => match selector(s) {
                    Some(sel) => self
                        .namespaces
                        .iter()
                        .filter(|(_, labels)| sel.matches(labels))
                        .map(|(n, _)| n.as_str())
                        .collect(),
                    None => Vec::new(),
                },
            };
            for ns in namespaces {
                for (name, pod) in self.pods.get(ns).into_iter().flatten() {
                    if !pod.addressable() || !pods.matches(&pod.labels) {
                        continue;
                    }
                    picked.insert((ns, name.as_str()));
                    for ip in &pod.ips {
                        if self.owner(ip) == Some((ns, name.as_str())) {
                            addresses.insert(*ip);
                        }
                    }
                }
            }
        }
        addresses.extend(self.services_of(&picked));
        ResolvedPeers {
            addresses: addresses.iter().map(IpAddr::to_string).collect(),
        }
    }

    /// The ClusterIPs of the Services with at least one endpoint, every endpoint a pod in
    /// `picked`. A Service with one endpoint elsewhere (or not a pod) is not: its address
    /// reaches pods no rule names as well.
    fn services_of(&self, picked: &BTreeSet<(&str, &str)>) -> Vec<IpAddr> {
        if picked.is_empty() {
            return Vec::new();
        }
        let mut endpoints: BTreeMap<(&str, &str), (usize, bool)> = BTreeMap::new();
        for ((ns, _), slice) in &self.slices {
            let e = endpoints
                .entry((ns.as_str(), slice.service.as_str()))
                .or_insert((0, true));
            for pod in &slice.pods {
                e.0 += 1;
                e.1 &= pod
                    .as_ref()
                    .is_some_and(|(pns, pname)| picked.contains(&(pns.as_str(), pname.as_str())));
            }
        }
        endpoints
            .into_iter()
            .filter(|(_, (count, all))| *count > 0 && *all)
            .filter_map(|((ns, name), _)| self.services.get(&(ns.to_string(), name.to_string())))
            .flatten()
            .copied()
            .collect()
    }

    /// The pod that has an address now: the newest live one holding it.
    fn owner(&self, ip: &IpAddr) -> Option<(&str, &str)> {
        self.holders
            .get(ip)
            .and_then(|h| h.last())
            .map(|(_, ns, name)| (ns.as_str(), name.as_str()))
    }
}

/// Each node's part of each rule's rate (`egress`, `ingress`: the rates in rule order), split
/// by what the nodes reported.
fn shares(
    nodes: &BTreeSet<&str>,
    egress: Vec<u64>,
    ingress: Vec<u64>,
    demand: Option<&BandwidthPeerSetStatus>,
) -> Vec<NodeShare> {
    let reported = |node: &str| demand.and_then(|d| d.nodes.iter().find(|n| n.node == node));
    let split_all =
        |rates: &[u64], pick: fn(&crate::policy::NodeDemand) -> &Vec<RuleDemand>| -> Vec<Vec<u64>> {
            rates
                .iter()
                .enumerate()
                .map(|(i, rate)| {
                    let demands: Vec<Option<RuleDemand>> = nodes
                        .iter()
                        .map(|n| reported(n).and_then(|r| pick(r).get(i).copied()))
                        .collect();
                    share::split(*rate, &demands)
                })
                .collect()
        };
    let e = split_all(&egress, |n| &n.egress);
    let i = split_all(&ingress, |n| &n.ingress);
    nodes
        .iter()
        .enumerate()
        .map(|(k, node)| NodeShare {
            node: node.to_string(),
            egress: e.iter().map(|parts| parts[k]).collect(),
            ingress: i.iter().map(|parts| parts[k]).collect(),
        })
        .collect()
}

/// A selector the policy check let through; none if it cannot be parsed (an Invalid policy).
fn selector(s: &LabelSelector) -> Option<Selector> {
    Selector::try_from(s.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(namespace: &str, name: &str, spec: &str) -> BandwidthPolicy {
        let mut p = crate::policy::test_policy(namespace, name, spec);
        p.metadata.generation = Some(3);
        p
    }

    /// A policy over every pod of shop, capping egress to its app=db pods.
    fn to_db(index: &mut Index) -> Key {
        index
            .set_policy(policy(
                "shop",
                "p",
                "podSelector: {}\negress: [{rate: 20M, peers: [{podSelector: {matchLabels: {app: db}}}]}]\n",
            ))
            .unwrap()
    }

    fn pod(labels: &[(&str, &str)], ips: &[&str], created: i64) -> PodInfo {
        PodInfo {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            node: Some(format!("node-{}", created % 2)),
            host_network: false,
            finished: false,
            age: (created, format!("uid-{created}")),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000).unwrap()
    }

    /// The egress addresses of rule `i` of the published peer set.
    fn egress(index: &Index, k: &Key, i: usize) -> Vec<String> {
        let published = index.publish(k, now(), None).unwrap();
        published.peer_set.expect("a peer set").egress[i]
            .addresses
            .clone()
    }

    fn cluster() -> Index {
        let mut index = Index::default();
        for (ns, team) in [("shop", "web"), ("data", "data"), ("other", "data")] {
            index.set_namespace(ns.into(), [("team".to_string(), team.to_string())].into());
        }
        index.set_pod(
            "shop".into(),
            "batch".into(),
            pod(&[("app", "batch")], &["198.18.1.1"], 1),
        );
        index.set_pod(
            "shop".into(),
            "db".into(),
            pod(&[("app", "db")], &["198.18.1.2", "2001:2::12"], 2),
        );
        index.set_pod(
            "shop".into(),
            "web".into(),
            pod(&[("app", "web")], &["198.18.1.3"], 3),
        );
        index.set_pod(
            "data".into(),
            "db".into(),
            pod(&[("app", "db")], &["198.18.2.2"], 4),
        );
        index.set_pod(
            "other".into(),
            "db".into(),
            pod(&[("app", "db")], &["198.18.3.2"], 5),
        );
        index
    }

    #[test]
    fn selectors_pick_peers_as_network_policy_does() {
        let mut index = cluster();
        let k = index
            .set_policy(policy(
                "shop",
                "p",
                "podSelector: {matchLabels: {app: batch}}\n\
                 egress:\n\
                 - {rate: 20M, peers: [{podSelector: {matchLabels: {app: db}}}]}\n\
                 - {rate: 20M, peers: [{namespaceSelector: {matchLabels: {team: data}}}]}\n\
                 - {rate: 20M, peers: [{namespaceSelector: {matchLabels: {team: data}}, podSelector: {matchLabels: {app: db}}}]}\n\
                 - {rate: 20M, peers: [{ipBlock: {cidr: 198.18.0.0/24}}]}\n",
            ))
            .unwrap();
        // podSelector alone: this namespace's db pod, both families.
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
        // namespaceSelector alone: every pod of those namespaces.
        assert_eq!(egress(&index, &k, 1), ["198.18.2.2", "198.18.3.2"]);
        assert_eq!(egress(&index, &k, 2), ["198.18.2.2", "198.18.3.2"]);
        // An ipBlock rule needs no addresses from the controller.
        assert!(egress(&index, &k, 3).is_empty());
        let p = index.publish(&k, now(), None).unwrap();
        assert_eq!(p.peer_set.as_ref().unwrap().policy_uid, "uid-p");
        assert_eq!(p.peer_set.as_ref().unwrap().policy_generation, 3);
        assert_eq!(p.status.selected_pods, Some(1));
        assert_eq!(p.status.enforcing_nodes, Some(1));
        assert_eq!(p.status.observed_generation, Some(3));
        assert_eq!(p.status.conditions[0].status, "True");
        assert_eq!(
            p.status.summary.as_deref(),
            Some("egress 20M to 1 peer, egress 20M to 1 peer, egress 20M to 1 peer, egress 20M to 1 peer")
        );
    }

    #[test]
    fn a_label_change_moves_a_pod_in_and_out_and_status_updates_change_nothing() {
        let mut index = cluster();
        let k = to_db(&mut index);
        assert!(!index.set_pod(
            "shop".into(),
            "web".into(),
            pod(&[("app", "web")], &["198.18.1.3"], 3)
        ));
        assert!(index.set_pod(
            "shop".into(),
            "web".into(),
            pod(&[("app", "db")], &["198.18.1.3"], 3)
        ));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "198.18.1.3", "2001:2::12"]);
        assert!(index.delete_pod("shop", "db"));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.3"]);
        assert_eq!(
            index.publish(&k, now(), None).unwrap().status.selected_pods,
            Some(2)
        );
    }

    #[test]
    fn a_pod_change_touches_only_the_policies_that_select_or_name_it() {
        let mut index = cluster();
        let db = to_db(&mut index);
        let batch = index
            .set_policy(policy(
                "data",
                "batch",
                "podSelector: {matchLabels: {app: batch}}\negress: [{rate: 1M, peers: [{namespaceSelector: {matchLabels: {team: web}}}]}]\n",
            ))
            .unwrap();
        let cidr = index
            .set_policy(policy(
                "shop",
                "cidr",
                "podSelector: {matchLabels: {app: none}}\negress: [{rate: 1M}]\n",
            ))
            .unwrap();
        let l = |v: &str| -> BTreeMap<String, String> { [("app".to_string(), v.to_string())].into() };
        let ip = |s: &str| -> Vec<IpAddr> { vec![s.parse().unwrap()] };
        // A shop pod: selected by p (podSelector {}), a peer of batch (team=web), not cidr's.
        let t = index.touching("shop", &[&l("web")]);
        assert_eq!(
            t,
            [db.clone(), batch.clone()]
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(!t.contains(&cidr));
        // An "other" namespace pod (team=data): nobody's.
        assert!(index.touching("other", &[&l("db")]).is_empty());
        // A data pod turning into batch: batch selects it now.
        assert_eq!(
            index.touching("data", &[&l("web"), &l("batch")]),
            std::slice::from_ref(&batch)
        );
        // Taking an address another pod holds: everyone may change.
        assert!(!index.held_twice(&ip("198.18.1.2")));
        index.set_pod(
            "other".into(),
            "new".into(),
            pod(&[("app", "x")], &["198.18.1.2"], 9),
        );
        assert!(index.held_twice(&ip("198.18.1.2")));
    }

    #[test]
    fn a_policy_resolving_to_too_many_addresses_is_refused_whole() {
        let mut index = cluster();
        let k = to_db(&mut index);
        for i in 0..MAX_RESOLVED as u32 {
            let ip = std::net::Ipv4Addr::from(0xc612_0000 + 0x1_0000 + i).to_string();
            index.set_pod(
                "shop".into(),
                format!("db-{i}"),
                pod(&[("app", "db")], &[&ip], 10 + i64::from(i)),
            );
        }
        let p = index.publish(&k, now(), None).unwrap();
        assert_eq!(p.peer_set, None);
        assert!(p.keep_set, "the set in force stays");
        let c = &p.status.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "TooManyPeers"));
        assert!(c.message.contains("50000 addresses"), "{}", c.message);
        // One pod more or less: the same condition (only the counts change, written at most
        // every 30 s).
        index.delete_pod("shop", "db-0");
        assert_eq!(
            index.publish(&k, now(), None).unwrap().status.conditions,
            p.status.conditions
        );
    }

    #[test]
    fn a_reused_address_belongs_to_the_pod_that_has_it_now() {
        let mut index = cluster();
        let k = to_db(&mut index);
        // The db pod terminates; a newer web pod got its address already: not a peer.
        index.set_pod(
            "shop".into(),
            "web-2".into(),
            pod(&[("app", "web")], &["198.18.1.2"], 9),
        );
        assert_eq!(egress(&index, &k, 0), ["2001:2::12"]);
        // The new pod goes: the address is the old pod's again while it still runs.
        index.delete_pod("shop", "web-2");
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
        // Finished, or hostNetwork (the node's address): never a peer.
        let mut done = pod(&[("app", "db")], &["198.18.1.2", "2001:2::12"], 2);
        done.finished = true;
        index.set_pod("shop".into(), "db".into(), done);
        assert!(egress(&index, &k, 0).is_empty());
        let mut host = pod(&[("app", "db")], &["198.18.9.9"], 7);
        host.host_network = true;
        index.set_pod("shop".into(), "host".into(), host);
        assert!(egress(&index, &k, 0).is_empty());
    }

    #[test]
    fn a_service_counts_when_all_its_endpoints_are_peers() {
        let mut index = cluster();
        let k = to_db(&mut index);
        let key = |n: &str| ("shop".to_string(), n.to_string());
        let slice = |pods: &[Option<&str>]| SliceInfo {
            service: "db".into(),
            pods: pods.iter().map(|p| p.map(key)).collect(),
        };
        index.set_service(key("db"), vec!["198.19.0.10".parse().unwrap()]);
        // No endpoint yet: not a peer.
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
        index.set_slice(key("db-1"), slice(&[Some("db")]));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "198.19.0.10", "2001:2::12"]);
        // Another slice of it reaches the web pod: the Service is not a peer any more.
        index.set_slice(key("db-2"), slice(&[Some("web")]));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
        // An endpoint that is not a pod: not either.
        index.set_slice(key("db-2"), slice(&[None]));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
        index.delete_slice(&key("db-2"));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "198.19.0.10", "2001:2::12"]);
        index.delete_service(&key("db"));
        assert_eq!(egress(&index, &k, 0), ["198.18.1.2", "2001:2::12"]);
    }

    #[test]
    fn a_shared_policy_is_split_among_the_nodes_of_its_pods_by_their_demand() {
        let mut index = cluster();
        let k = index
            .set_policy(policy(
                "shop",
                "total",
                "podSelector: {}\nscope: Shared\negress: [{rate: 30M}]\n",
            ))
            .unwrap();
        // Three pods of shop on node-1 and node-0: an even split before any report.
        let set = index
            .publish(&k, now(), None)
            .unwrap()
            .peer_set
            .expect("a set for Shared");
        let parts: Vec<(&str, &[u64])> = set
            .shares
            .iter()
            .map(|s| (s.node.as_str(), s.egress.as_slice()))
            .collect();
        assert_eq!(
            parts,
            [("node-0", &[15_000_000][..]), ("node-1", &[15_000_000][..])]
        );
        // node-0 idle, node-1 busy: node-1 gets all but node-0's floor.
        let demand = |node: &str, bps: u64, saturated: bool| crate::policy::NodeDemand {
            node: node.into(),
            egress: vec![RuleDemand { bps, saturated }],
            ingress: Vec::new(),
        };
        let status = BandwidthPeerSetStatus {
            nodes: vec![demand("node-0", 0, false), demand("node-1", 15_000_000, true)],
        };
        let set = index.publish(&k, now(), Some(&status)).unwrap().peer_set.unwrap();
        assert_eq!(set.shares[0].egress, [300_000]);
        assert_eq!(set.shares[1].egress, [29_700_000]);
    }

    #[test]
    fn an_invalid_policy_gets_the_reason_and_no_peer_set() {
        let mut index = cluster();
        let k = index
            .set_policy(policy(
                "shop",
                "bad",
                "podSelector: {}\negress: [{rate: 20M, peers: [{podSelector: {}}, {ipBlock: {cidr: 198.18.0.1/24}}]}]\n",
            ))
            .unwrap();
        let p = index.publish(&k, now(), None).unwrap();
        assert_eq!(p.peer_set, None);
        let c = &p.status.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Accepted", "False", "Invalid")
        );
        assert!(c.message.contains("host bits"), "{}", c.message);
        assert_eq!(c.last_transition_time, Time(now()));
        // Unchanged, it keeps its transition time.
        let mut stored = index.policy(&k).unwrap().clone();
        stored.status = Some(p.status.clone());
        index.set_policy(stored);
        let later = Timestamp::from_second(2_000).unwrap();
        let again = index.publish(&k, later, None).unwrap();
        assert_eq!(again.status, p.status);
        // A policy with only ipBlock or no peers needs no peer set.
        let k = index
            .set_policy(policy("shop", "cidr", "podSelector: {}\negress: [{rate: 20M}]\n"))
            .unwrap();
        assert_eq!(index.publish(&k, now(), None).unwrap().peer_set, None);
        index.delete_policy(&k);
        assert_eq!(index.publish(&k, now(), None), None);
    }
}
