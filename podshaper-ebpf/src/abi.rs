//! `#[repr(C)]` mirrors of the map values in `bpf/podshaper.h`. Only this crate reads or
//! writes map memory; the tests below compare every layout with what the C compiler says.

/// Version of the pinned-state layout; pins live under `<bpffs root>/v<ABI_VERSION>`.
pub const ABI_VERSION: u32 = 4;

/// `PS_FLOW_EPOCHS`: epochs over which a flow counts as active.
pub const FLOW_EPOCHS: usize = 4;

/// Index of the egress direction in the per-direction arrays.
pub const EGRESS: usize = 0;
/// Index of the ingress direction in the per-direction arrays.
pub const INGRESS: usize = 1;

/// `struct ps_config`: the limits the daemon sets (L3 bytes per second, 0 = none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub rate: [u64; 2],
    pub generation: u32,
    pub flags: u32,
}

/// `struct ps_dir_state`: one direction's controller state, written by BPF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DirState {
    pub tokens: i64,
    pub refill_ns: u64,
    pub epoch_start_ns: u64,
    pub epoch_bytes: u64,
    pub share: u64,
    pub measured: u64,
    pub epoch: u32,
    pub gain: u32,
    pub flows: [u32; FLOW_EPOCHS],
}

/// `PS_EPOCH_NS` (controller.h): how long the programs measure a rate over.
pub const EPOCH_NS: u64 = 50_000_000;

impl DirState {
    /// The rate measured at `now_ns` (CLOCK_MONOTONIC, the programs' clock), bits/s. The
    /// programs roll an epoch only when a packet comes, so `measured` keeps the last busy
    /// epoch's rate while nothing flows: past two epochs without a roll, the bytes of the
    /// unfinished one over the time since it began are the rate (falling to 0 when idle).
    pub fn measured_bps(&self, now_ns: u64) -> u64 {
        let age = now_ns.saturating_sub(self.epoch_start_ns);
        if age <= 2 * EPOCH_NS {
            return self.measured.saturating_mul(8);
        }
        let bps = u128::from(self.epoch_bytes) * 8 * 1_000_000_000 / u128::from(age);
        u64::try_from(bps).unwrap_or(u64::MAX)
    }

    /// The flows counted as active, as `ps_flows_active()` counts them.
    pub fn active_flows(&self) -> u32 {
        self.flows.iter().copied().max().unwrap_or(0)
    }
}

/// Bytes at the start of `struct ps_cgroup` that keep their layout across ABI versions (lock,
/// generation_seen, config): a newer daemon reads an older one's limits from them.
pub const CGROUP_HEAD: usize = 32;

/// `struct ps_cgroup`: value of `ps_cgroups`. `lock` is never touched from user space; the
/// kernel skips it on BPF_F_LOCK copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Cgroup {
    pub lock: u32,
    pub generation_seen: u32,
    pub config: Config,
    pub dir: [DirState; 2],
    pub peers: Peers,
}

/// `PS_MAX_RULES`: peer rules a cgroup may be bound to, per direction.
pub const MAX_RULES: usize = 4;
/// `PS_RULE_SHARED`: in a rule id bound to a cgroup, the rule's class is the node's, shared.
pub const RULE_SHARED: u32 = 0x8000_0000;
/// `PS_RULE_ID_MASK`: the largest rule id.
pub const RULE_ID_MAX: u32 = 0x7fff_ffff;
/// `PS_PEER_IN` / `PS_PEER_OUT`: values of `ps_peers`.
pub const PEER_IN: u32 = 1;
pub const PEER_OUT: u32 = 0;
/// `PS_PEER_V6`: in the rule field of a `ps_peers` key, the address is IPv6.
pub const PEER_V6: u32 = 0x8000_0000;
/// `PS_RULE_NAME_LEN`: room for a rule's name, its NUL included.
pub const RULE_NAME_LEN: usize = 112;
/// Capacities of the peer maps (`maps.h`).
pub const MAX_PEER_PREFIXES: usize = 262_144;
pub const MAX_CLASSES: usize = 16_384;
pub const MAX_RULE_IDS: usize = 4096;

/// `struct ps_peers`: the rules a cgroup is bound to (ids, `| RULE_SHARED`, 0-terminated) and
/// its own id, the owner of its classes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub owner: u64,
    pub rule: [[u32; MAX_RULES]; 2],
}

/// `struct ps_peer_key`: key of the `ps_peers` LPM trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub prefixlen: u32,
    pub rule: u32,
    pub addr: [u8; 16],
}

/// `struct ps_class_key`: key of `ps_classes`; owner 0 for a shared rule's class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClassKey {
    pub owner: u64,
    pub rule: u32,
    pub pad: u32,
}

impl ClassKey {
    /// The class of rule `rule` owned by cgroup `owner` (0: the node's, for a shared rule).
    pub fn new(owner: u64, rule: u32) -> Self {
        Self { owner, rule, pad: 0 }
    }
}

/// `struct ps_rule`: value of `ps_rules`, the daemon's record of a rule.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub rate: u64,
    pub dir: u32,
    pub flags: u32,
    pub name: [u8; RULE_NAME_LEN],
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            rate: 0,
            dir: 0,
            flags: 0,
            name: [0; RULE_NAME_LEN],
        }
    }
}

/// `ps_rule.flags`: the rule's class is shared by the cgroups bound to it.
pub const RULE_FLAG_SHARED: u32 = 1;

/// `struct ps_stats`: one CPU's counters of one cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes: [u64; 2],
    pub packets: [u64; 2],
    pub drops: [u64; 2],
    pub marks: [u64; 2],
    /// Pacing-rate changes sock_ops made on the cgroup's sockets.
    pub adjusts: u64,
    /// Ingress TCP flows the policer dropped after their sender had time to pace at their rate
    /// option: senders without podshaper, or paths that strip TCP options.
    pub unpaced_flows: u64,
}

impl Stats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, o: &Stats) {
        for d in 0..2 {
            self.bytes[d] += o.bytes[d];
            self.packets[d] += o.packets[d];
            self.drops[d] += o.drops[d];
            self.marks[d] += o.marks[d];
        }
        self.adjusts += o.adjusts;
        self.unpaced_flows += o.unpaced_flows;
    }
}

/// `struct ps_flow`: per-socket state (only its size matters to user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Flow {
    pub applied: u64,
    pub egress: u64,
    pub remote: u64,
    pub remote_ns: u64,
    pub epoch: [u32; 2],
    pub clamp: u32,
    pub handled_una: u32,
    pub opt_pending: u32,
    pub opt_rcv_nxt: u32,
    pub opt_lapse: u32,
    pub opt_since: u32,
    pub rule_epoch: [[u32; MAX_RULES]; 2],
}

/// `struct ps_node_stats`: one CPU's rate-option counters of the node (see podshaper.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Receiver side: rate options written on pure ACKs.
    pub opt_written: u64,
    /// Receiver side: pure ACKs with no room left for the option (SACK blocks, other options).
    pub opt_no_room: u64,
    /// Receiver side: pure ACKs that already carried another writer's option of our kind and ExID.
    pub opt_exists: u64,
    /// Sender side: rate options taken.
    pub opt_taken: u64,
    /// Sender side: "no limit" options taken.
    pub opt_lifted: u64,
    /// Sender side: options of ours that were malformed, ignored.
    pub opt_malformed: u64,
    /// Sender side: options on an ACK outside snd_una..snd_nxt, ignored.
    pub opt_outside: u64,
}

impl NodeStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, o: &NodeStats) {
        self.opt_written += o.opt_written;
        self.opt_no_room += o.opt_no_room;
        self.opt_exists += o.opt_exists;
        self.opt_taken += o.opt_taken;
        self.opt_lifted += o.opt_lifted;
        self.opt_malformed += o.opt_malformed;
        self.opt_outside += o.opt_outside;
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/abi_layout.rs"));
    }

    #[test]
    fn an_idle_class_measures_a_falling_rate_not_its_last_busy_epoch() {
        let d = DirState {
            epoch_start_ns: 1_000_000_000,
            epoch_bytes: 125_000,
            measured: 1_250_000,
            ..DirState::default()
        };
        // Within two epochs: the last epoch's rate (10 Mbit/s).
        assert_eq!(d.measured_bps(1_000_000_000 + EPOCH_NS), 10_000_000);
        // A second without a packet: 1 Mbit over a second.
        assert_eq!(d.measured_bps(2_000_000_000), 1_000_000);
        assert_eq!(d.measured_bps(11_000_000_000), 100_000);
    }

    #[test]
    fn layouts_match_podshaper_h() {
        assert_eq!(ABI_VERSION, c::ABI_VERSION);
        assert_eq!(size_of::<Config>(), c::SIZE_ps_config);
        assert_eq!(size_of::<DirState>(), c::SIZE_ps_dir_state);
        assert_eq!(size_of::<Cgroup>(), c::SIZE_ps_cgroup);
        assert_eq!(size_of::<Stats>(), c::SIZE_ps_stats);
        assert_eq!(size_of::<Flow>(), c::SIZE_ps_flow);
        assert_eq!(size_of::<NodeStats>(), c::SIZE_ps_node_stats);
        assert_eq!(offset_of!(Flow, remote), c::OFF_ps_flow_remote);
        assert_eq!(offset_of!(Flow, opt_pending), c::OFF_ps_flow_opt_pending);
        assert_eq!(
            offset_of!(NodeStats, opt_outside),
            c::OFF_ps_node_stats_opt_outside
        );
        assert_eq!(offset_of!(Config, generation), c::OFF_ps_config_generation);
        assert_eq!(offset_of!(DirState, share), c::OFF_ps_dir_state_share);
        assert_eq!(offset_of!(DirState, epoch), c::OFF_ps_dir_state_epoch);
        assert_eq!(offset_of!(Cgroup, config), c::OFF_ps_cgroup_config);
        assert_eq!(offset_of!(Cgroup, dir), c::OFF_ps_cgroup_dir);
        assert_eq!(offset_of!(Stats, marks), c::OFF_ps_stats_marks);
        assert_eq!(offset_of!(Stats, adjusts), c::OFF_ps_stats_adjusts);
        assert_eq!(offset_of!(Stats, unpaced_flows), c::OFF_ps_stats_unpaced_flows);
        assert_eq!(size_of::<Peers>(), c::SIZE_ps_peers);
        assert_eq!(size_of::<PeerKey>(), c::SIZE_ps_peer_key);
        assert_eq!(size_of::<ClassKey>(), c::SIZE_ps_class_key);
        assert_eq!(size_of::<Rule>(), c::SIZE_ps_rule);
        assert_eq!(MAX_RULES, c::MAX_RULES);
        assert_eq!(EPOCH_NS, c::EPOCH_NS);
        assert_eq!(RULE_NAME_LEN, c::RULE_NAME_LEN);
        assert_eq!(MAX_PEER_PREFIXES, c::MAX_PEER_PREFIXES);
        assert_eq!(MAX_CLASSES, c::MAX_CLASSES);
        assert_eq!(MAX_RULE_IDS, c::MAX_RULE_IDS);
        assert_eq!(PEER_V6, c::PEER_V6);
        assert_eq!(offset_of!(Cgroup, peers), c::OFF_ps_cgroup_peers);
        assert_eq!(offset_of!(Flow, rule_epoch), c::OFF_ps_flow_rule_epoch);
        assert_eq!(offset_of!(Rule, name), c::OFF_ps_rule_name);
    }

    // Migration reads an older version's limits from the head of its ps_cgroup value: that
    // head is frozen, whatever else changes.
    #[test]
    fn the_cgroup_head_is_frozen() {
        assert_eq!(offset_of!(Cgroup, config), 8);
        assert_eq!(offset_of!(Config, rate), 0);
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(offset_of!(Cgroup, config) + size_of::<Config>(), CGROUP_HEAD);
        assert!(offset_of!(Cgroup, dir) >= CGROUP_HEAD);
    }
}
