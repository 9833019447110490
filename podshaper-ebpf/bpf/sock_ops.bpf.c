// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// sock_ops program: paces each TCP flow of a limited cgroup at its share of the egress limit
// (SO_MAX_PACING_RATE; TCP paces internally without fq since 4.13). Ingress is policed by the
// cgroup_skb program; clamping the receive window was measured and made things worse on
// short paths (see docs/how-it-works.md).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define PS_SOL_SOCKET 1
#define PS_SO_MAX_PACING_RATE 47
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_UNLIMITED 0xffffffffU
// TCP header with the timestamp option, which Linux uses by default.
#define PS_TCP_HDR 32

// Only touch the socket when the target moved by more than 1/32: setsockopt is not free.
static __always_inline int ps_differs(__u64 a, __u64 b)
{
	__u64 diff = a > b ? a - b : b - a;

	return diff > (b >> 5);
}

// Whether the peer is this host's loopback or the socket's own address: such traffic stays on
// lo, which the cgroup_skb programs neither limit nor count, so it is not paced either.
static __always_inline int ps_local_peer(struct bpf_sock_ops *skops)
{
	__u32 r0, r1, r2, r3, l0, l1, l2, l3;

	if (skops->family == PS_AF_INET) {
		__u32 r = skops->remote_ip4;

		return (r & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       r == skops->local_ip4;
	}
	if (skops->family != PS_AF_INET6)
		return 0;
	// One plain load per context field: the verifier refuses loads through a ctx pointer
	// that was offset first, which is what clang makes of array compares.
	r0 = READ_ONCE(skops->remote_ip6[0]);
	r1 = READ_ONCE(skops->remote_ip6[1]);
	r2 = READ_ONCE(skops->remote_ip6[2]);
	r3 = READ_ONCE(skops->remote_ip6[3]);
	l0 = READ_ONCE(skops->local_ip6[0]);
	l1 = READ_ONCE(skops->local_ip6[1]);
	l2 = READ_ONCE(skops->local_ip6[2]);
	l3 = READ_ONCE(skops->local_ip6[3]);
	if (!r0 && !r1 && !r2 && r3 == bpf_htonl(1))
		return 1;
	if (!r0 && !r1 && r2 == bpf_htonl(0xffff) &&
	    (r3 & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000))
		return 1;
	return r0 == l0 && r1 == l1 && r2 == l2 && r3 == l3;
}

static __always_inline void ps_apply(struct bpf_sock_ops *skops, struct ps_cgroup *cg,
                                     struct ps_stats *st)
{
	struct bpf_sock *sk = skops->sk;
	struct ps_flow *fl;
	__u64 rate, share, mss, hdr, target;
	int val;

	if (!sk)
		return;
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!fl)
		return;
	mss = skops->mss_cache;
	hdr = (skops->family == PS_AF_INET6 ? 40 : 20) + PS_TCP_HDR;

	// Egress: pacing rate in payload bytes/s, converted from the L3 share.
	rate = ps_rate(cg, PS_EGRESS);
	target = PS_UNLIMITED;
	if (rate) {
		share = READ_ONCE(cg->dir[PS_EGRESS].share);
		if (!share || share > rate)
			share = rate;
		if (mss)
			share = share * mss / (mss + hdr);
		// SO_MAX_PACING_RATE is 32 bits (~34 Gbit/s); above that the bucket backstops.
		if (share < PS_UNLIMITED)
			target = share;
	}
	if (fl->applied[PS_EGRESS] != target &&
	    (target == PS_UNLIMITED || fl->applied[PS_EGRESS] == PS_UNLIMITED ||
	     !fl->applied[PS_EGRESS] || ps_differs(target, fl->applied[PS_EGRESS]))) {
		val = (int)target; // int-sized: an 8-byte optval is EINVAL
		if (!bpf_setsockopt(skops, PS_SOL_SOCKET, PS_SO_MAX_PACING_RATE, &val,
		                    sizeof(val))) {
			fl->applied[PS_EGRESS] = target;
			__sync_fetch_and_add(&st->adjusts[PS_EGRESS], 1);
		}
	}
}

// Hook: sockops (BPF_CGROUP_SOCK_OPS), attached with a bpf_link to each limited cgroup.
// Always returns 1 (the return value is ignored except for reply-carrying ops).
// Kernel 5.7 (links); SO_MAX_PACING_RATE from BPF since 4.13.
SEC("sockops")
int ps_sockops(struct bpf_sock_ops *skops)
{
	struct ps_cgroup *cg = bpf_get_local_storage(&ps_cgroups, 0);
	struct ps_stats *st = bpf_get_local_storage(&ps_stats, 0);

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (ps_local_peer(skops))
			break;
		// RTT callbacks re-apply the share on every ACK a sender gets.
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_RTT_CB_FLAG);
		ps_apply(skops, cg, st);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		ps_apply(skops, cg, st);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
