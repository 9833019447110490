// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// The C/Rust ABI of the podshaper datapath: map values shared by the BPF programs and the
// daemon. src/abi.rs mirrors every struct here with #[repr(C)]; tests assert sizes and offsets.
// Bump PS_ABI_VERSION on any layout change: pins live under a per-version bpffs directory.
#ifndef PODSHAPER_H
#define PODSHAPER_H

#include <linux/types.h>

#define PS_ABI_VERSION 4

#define PS_EGRESS 0
#define PS_INGRESS 1

// Epochs over which a flow counts as active after it last moved data.
#define PS_FLOW_EPOCHS 4

// Limits set by the daemon for one cgroup, in bits per second of L3 traffic (IP header and
// payload, every GSO segment counted with its headers); 0 means no limit in that direction.
// The programs work in bytes: ps_rate() converts.
struct ps_config {
	__u64 rate[2];
	// Bumped by the daemon on every change; the programs reset their controllers when it moves.
	__u32 generation;
	__u32 flags;
};

// Controller state of one direction, written by the BPF programs under ps_cgroup.lock.
struct ps_dir_state {
	// Token bucket in bytes; negative is debt. Polices non-TCP, backstops TCP.
	__s64 tokens;
	__u64 refill_ns;
	// Measurement epoch: start and bytes passed in it.
	__u64 epoch_start_ns;
	__u64 epoch_bytes;
	// Per-flow share (L3 bytes/s) that sock_ops applies to each TCP flow of the cgroup.
	__u64 share;
	// Aggregate rate measured over the last full epoch (L3 bytes/s), for status.
	__u64 measured;
	__u32 epoch;
	// Correction the feedback learned, Q10 (1024 = the equal split): share = rate x gain / n.
	__u32 gain;
	// Distinct flows that moved data in each of the last PS_FLOW_EPOCHS epochs, the current
	// one at [epoch % PS_FLOW_EPOCHS]; n is their maximum. A flow paced at a small share may
	// send nothing for an epoch or two and still be busy.
	__u32 flows[PS_FLOW_EPOCHS];
};

// Capacities of the peer maps (maps.h). Not LRU: an evicted entry would lift a limit. The
// daemon refuses a rule or binding past them, whole, before it writes anything.
#define PS_MAX_PEER_PREFIXES 262144
#define PS_MAX_CLASSES 16384
#define PS_MAX_RULE_IDS 4096

// Peer rules a cgroup is bound to, per direction, at most this many each.
#define PS_MAX_RULES 4
// Set in a rule id of ps_peers.rule: the rule's class is shared by every cgroup bound to it on
// this node (owner 0 in ps_class_key), not one class per cgroup.
#define PS_RULE_SHARED 0x80000000U
// Rule ids run from 1; 0 ends a cgroup's list.
#define PS_RULE_ID_MASK 0x7fffffffU
// ps_peers map values: the address is one of the rule's peers, or inside one of its excepts.
#define PS_PEER_OUT 0
#define PS_PEER_IN 1

// The peer rules of one cgroup: which rules cap its traffic to or from their peers, beside the
// cgroup's own limit (ps_config.rate). Written by the daemon with the config (BPF_F_LOCK).
struct ps_peers {
	// The cgroup's id, the owner of its per-cgroup classes (the programs see the attach
	// point's storage but not its id).
	__u64 owner;
	// Rule ids (| PS_RULE_SHARED), 0-terminated.
	__u32 rule[2][PS_MAX_RULES];
};

// Per-cgroup value of ps_cgroups: the daemon's config and the programs' state. Its head (lock,
// generation_seen, config) keeps its layout in every ABI version: a newer daemon reads an older
// one's limits from it when it migrates the pinned state. ps_classes holds the same struct for
// each peer class; there `peers` is unused.
struct ps_cgroup {
	struct bpf_spin_lock lock;
	__u32 generation_seen;
	struct ps_config config;
	struct ps_dir_state dir[2];
	struct ps_peers peers;
};

// Key of ps_peers (an LPM trie): a rule and an address, prefixlen counting the rule's 32 bits
// too. IPv6 entries have PS_PEER_V6 in `rule`, IPv4 ones the address in addr[0..4] and zeros
// after: the families never match each other (an IPv6 ::/0 covers no IPv4 peer), and an
// IPv4-mapped IPv6 peer (::ffff:a.b.c.d, a dual-stack socket's) is looked up as IPv4. Value:
// PS_PEER_IN or PS_PEER_OUT.
#define PS_PEER_V6 0x80000000U
struct ps_peer_key {
	__u32 prefixlen;
	__u32 rule;
	__u8 addr[16];
};

// Key of ps_classes: a peer class is a rule's state for one cgroup (owner = its id) or, for a
// shared rule, for all of them on the node (owner 0).
struct ps_class_key {
	__u64 owner;
	__u32 rule;
	__u32 pad;
};

// A peer rule's settings, value of ps_rules (key: rule id). Only the daemon reads and writes
// it: what it needs to find its rules again after a restart.
#define PS_RULE_NAME_LEN 112
struct ps_rule {
	// Limit in bits/s of L3 traffic to or from the rule's peers.
	__u64 rate;
	__u32 dir;
	__u32 flags;
	char name[PS_RULE_NAME_LEN];
};

// Per-CPU counters of one cgroup, value of ps_stats. Summed over CPUs by the daemon.
struct ps_stats {
	__u64 bytes[2];
	__u64 packets[2];
	// Packets dropped by the policer.
	__u64 drops[2];
	// Congestion signals: CN on egress (pass or drop), CE marks on ingress.
	__u64 marks[2];
	// Pacing-rate changes sock_ops made on the cgroup's sockets.
	__u64 adjusts;
	// Ingress TCP flows the policer dropped PS_UNPACED_EPOCHS or more after their first rate
	// option: their sender does not pace (no podshaper on its node, or a path that strips TCP
	// options). Each flow once. (Until ABI v3's later builds, adjusts[2]: same layout.)
	__u64 unpaced_flows;
};

// Per-socket state of ps_flows (socket local storage).
struct ps_flow {
	// Pacing rate last set on the socket (payload bytes/s); 0 until the first set.
	__u64 applied;
	// Egress target of the socket's own cgroup (payload bytes/s); 0 = none. Written by the
	// cgroup's sock_ops program, read by the node-level one so both apply the same minimum.
	__u64 egress;
	// Sender side: the per-flow rate the peer's receiver asked for in its last rate option
	// (L3 bytes/s; 0 = none), and when that option arrived. It lapses PS_REMOTE_TTL_NS after.
	__u64 remote;
	__u64 remote_ns;
	// Epoch (+1) in which the flow was last counted as active, per direction.
	__u32 epoch[2];
	// Congestion window clamp last set on the socket (segments); 0 = never set.
	__u32 clamp;
	// snd_una when the socket's own cgroup program last applied: lets the node-level program,
	// which runs after it for the same callback, skip the work.
	__u32 handled_una;
	// Receiver side: the option value reserved on the pure ACK being built (0 = none), for
	// WRITE_HDR_OPT_CB to store.
	__u32 opt_pending;
	// Receiver side: rcv_nxt of the pure ACK the cgroup's own program last looked at, so the
	// node-level program (which runs after it) leaves that ACK alone.
	__u32 opt_rcv_nxt;
	// Receiver side: "no limit" options still to send once the limit is lifted.
	__u32 opt_lapse;
	// Receiver side: the cgroup's ingress epoch (+1) when the flow's first rate option was
	// reserved, 0 before; PS_OPT_SINCE_COUNTED once the flow was counted as unpaced. Written
	// by sock_ops (first option) and the ingress program (counted).
	__u32 opt_since;
	// Epoch (+1) of each peer class (by its slot in ps_peers.rule) in which the flow was last
	// counted as active there, per direction.
	__u32 rule_epoch[2][PS_MAX_RULES];
};

// Per-CPU counters of the rate option on this node, value of ps_node (one entry). Written by
// both sock_ops programs, summed by the daemon for status and metrics.
struct ps_node_stats {
	// Receiver side: options written, and pure ACKs that could not carry one: no room left
	// (-ENOSPC: SACK blocks and timestamps filled the 40 bytes) or another writer's option of
	// the same kind and ExID already there (-EEXIST).
	__u64 opt_written;
	__u64 opt_no_room;
	__u64 opt_exists;
	// Sender side: rate options taken, "no limit" options taken, options of ours that were
	// malformed (length, version, zero rate) and options on an ACK outside snd_una..snd_nxt
	// (not an ACK of this connection's data: ignored).
	__u64 opt_taken;
	__u64 opt_lifted;
	__u64 opt_malformed;
	__u64 opt_outside;
};

#endif
