// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// A stand-in for another tool's sock_ops program (Cilium, a tracer), for the coexistence
// test: it asks for state callbacks on each connection it opens and counts the closes it then
// sees. If a later program replaces the socket's callback flags instead of adding to them,
// the closes are never reported.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// probe_closes[0]: STATE_CB callbacks into TCP_CLOSE. Written by cb_probe, read by the test.
// Not pinned; one entry.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} probe_closes SEC(".maps");

// Hook: sockops, attached to a cgroup below a limited one, so it runs before podshaper's
// programs on the same socket. Always returns 1.
SEC("sockops")
int cb_probe(struct bpf_sock_ops *skops)
{
	__u32 zero = 0;
	__u64 *closes;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
		                                         BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		// args[1] is the new state.
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		closes = bpf_map_lookup_elem(&probe_closes, &zero);
		if (closes)
			__sync_fetch_and_add(closes, 1);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
