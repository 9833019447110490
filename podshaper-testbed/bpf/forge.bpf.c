// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// A forger of podshaper's rate option, for the tests: on each pure ACK of the sockets of the
// cgroup it is attached to, it writes kind 253 with podshaper's ExID and whatever length and
// value the test chose, so that a sender's node meets options that are malformed.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rate_option.h"

// The ACK flag alone: a pure ACK.
#define FORGE_TCPHDR_ACK 0x10

struct forge_cfg {
	// Option length to write (4..8): 8 is the real option's.
	__u32 len;
	// The 32-bit value after the ExID (host order; only its first len - 4 bytes are written).
	__u32 value;
};

// forge_cfg[0]: what to write. Written by the test before traffic, read by forge. Not pinned.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct forge_cfg);
} forge_cfg SEC(".maps");

// Hook: sockops, attached to a receiver's cgroup. Asks for the header-option callbacks when a
// connection is established and writes the forged option on pure ACKs. Always returns 1.
SEC("sockops")
int forge(struct bpf_sock_ops *skops)
{
	__u8 opt[PS_OPT_LEN] = {PS_OPT_KIND, 0, PS_OPT_EXID >> 8, PS_OPT_EXID & 0xff};
	struct forge_cfg *cfg;
	__u32 zero = 0, len;

	cfg = bpf_map_lookup_elem(&forge_cfg, &zero);
	if (!cfg)
		return 1;
	len = cfg->len;
	if (len < 4 || len > PS_OPT_LEN)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
		                                         BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if (!(skops->args[0] & BPF_WRITE_HDR_TCP_CURRENT_MSS) && !skops->skb_len &&
		    skops->skb_tcp_flags == FORGE_TCPHDR_ACK)
			bpf_reserve_hdr_opt(skops, len, 0);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		// Fails (-ENOSPC) where the length callback reserved nothing: data segments.
		opt[1] = len;
		opt[4] = cfg->value >> 24;
		opt[5] = cfg->value >> 16;
		opt[6] = cfg->value >> 8;
		opt[7] = cfg->value;
		bpf_store_hdr_opt(skops, opt, len, 0);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
