// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// Maps shared by the sock_ops and cgroup_skb objects. Both objects declare them identically and
// pin them by name, so the second object loaded reuses the first one's maps.
#ifndef PODSHAPER_MAPS_H
#define PODSHAPER_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "podshaper.h"
#include "controller.h"
#include "rate_option.h"

// cgroup id of the attach point -> struct ps_cgroup (config and controller state).
// Cgroup storage with a plain u64 key is shared by every program attached to the same cgroup
// (sock_ops, egress, ingress) and keyed by the ATTACH POINT, not by the child cgroup a packet
// comes from (kernel 5.9, 7d9c3427894f). The kernel creates the entry on the first attach and
// frees it on the last detach. Written: config by the daemon (BPF_F_LOCK), state by BPF. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_STORAGE);
	__type(key, __u64);
	__type(value, struct ps_cgroup);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_cgroups SEC(".maps");

// cgroup id of the attach point -> per-CPU struct ps_stats. Written by BPF, read (summed) by the
// daemon for status and metrics. Same lifetime as ps_cgroups. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE);
	__type(key, __u64);
	__type(value, struct ps_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_stats SEC(".maps");

// socket -> struct ps_flow. Created by the egress/ingress programs when a flow first moves data
// and by sock_ops when a TCP flow is established; freed with the socket. Read by both. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ps_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_flows SEC(".maps");

// 0 -> per-CPU struct ps_node_stats: the node's rate-option counters. Written by both sock_ops
// programs, summed by the daemon for status and metrics. Pinned; one entry.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ps_node_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_node SEC(".maps");

// (rule, address prefix) -> PS_PEER_IN or PS_PEER_OUT (an except inside a peer). Longest
// prefix wins, so an except carves its range out of the peer around it. Written by the daemon
// (a rule's peers), read by the cgroup_skb and sock_ops programs of cgroups bound to the rule.
// Pinned; holds what the rules hold, up to PS_MAX_PEER_PREFIXES.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PS_MAX_PEER_PREFIXES);
	__type(key, struct ps_peer_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_peers SEC(".maps");

// struct ps_class_key -> struct ps_cgroup (config and controller state of one peer class; its
// `peers` unused). The daemon creates and removes entries and writes their config
// (BPF_F_LOCK); the programs keep the state, as for a cgroup. Pinned; preallocated.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PS_MAX_CLASSES);
	__type(key, struct ps_class_key);
	__type(value, struct ps_cgroup);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_classes SEC(".maps");

// Rule id -> struct ps_rule (name, direction, rate, flags). Written and read by the daemon
// only: its record of the rules, so that a restarted daemon finds them. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PS_MAX_RULE_IDS);
	__type(key, __u32);
	__type(value, struct ps_rule);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_rules SEC(".maps");

#endif
