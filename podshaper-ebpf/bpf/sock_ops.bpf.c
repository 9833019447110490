// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// sock_ops programs: pace each TCP flow of a limited cgroup at its share of the egress limit,
// and each flow on this node toward an ingress-limited socket at that socket's share of the
// ingress limit (SO_MAX_PACING_RATE; TCP paces internally without fq since 4.13). Clamping the
// receive window instead was measured and made things worse (see docs/how-it-works.md).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define PS_SOL_SOCKET 1
#define PS_SO_MAX_PACING_RATE 47
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_UNLIMITED 0xffffffffU
#define PS_SOL_TCP 6
#define PS_TCP_BPF_SNDCWND_CLAMP 1002
// What TCP starts with (TCP_INFINITE_SSTHRESH): the clamp of a socket no longer paced.
#define PS_NO_CLAMP 0x7fffffff
// Fewest segments a paced flow may have in flight: one TSO packet of the kernel's minimum size
// (tcp_min_tso_segs). More makes packets of several flows arrive in clumps at low limits.
#define PS_MIN_CLAMP 2
// TCP header with the timestamp option, which Linux uses by default.
#define PS_TCP_HDR 32

// Adds to the socket's callback flags: bpf_sock_ops_cb_flags_set() replaces them, and other
// sock_ops programs on the socket (Cilium, tracers) keep the callbacks they asked for.
static __always_inline void ps_want_callbacks(struct bpf_sock_ops *skops, int flags)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | flags);
}

// Only touch the socket when the target moved by more than 1/32: setsockopt is not free.
static __always_inline int ps_differs(__u64 a, __u64 b)
{
	__u64 diff = a > b ? a - b : b - a;

	return diff > (b >> 5);
}

// Whether the peer is this host's loopback or the socket's own address: such traffic stays on
// lo, which the cgroup_skb programs neither limit nor count, so it is not paced either.
struct ps_addrs {
	__u32 r[4];
	__u32 l[4];
};

// One plain load per context field: the verifier refuses loads through a ctx pointer that was
// offset first, which is what clang makes of array accesses in a loop or compare.
static __always_inline void ps_read_addrs(struct bpf_sock_ops *skops, struct ps_addrs *a)
{
	a->r[0] = READ_ONCE(skops->remote_ip6[0]);
	a->r[1] = READ_ONCE(skops->remote_ip6[1]);
	a->r[2] = READ_ONCE(skops->remote_ip6[2]);
	a->r[3] = READ_ONCE(skops->remote_ip6[3]);
	a->l[0] = READ_ONCE(skops->local_ip6[0]);
	a->l[1] = READ_ONCE(skops->local_ip6[1]);
	a->l[2] = READ_ONCE(skops->local_ip6[2]);
	a->l[3] = READ_ONCE(skops->local_ip6[3]);
}

// The peer's address and port as the ingress program of its cgroup keys it; v4-mapped IPv6
// peers are keyed as IPv4. Returns whether the peer is this host's loopback or the socket's own
// address: such traffic stays on lo, which the cgroup_skb programs neither limit nor count, so
// it is not paced either.
static __always_inline int ps_peer_of(struct bpf_sock_ops *skops, struct ps_peer_key *k)
{
	struct ps_addrs a;

	__builtin_memset(k, 0, sizeof(*k));
	k->port = bpf_ntohl(skops->remote_port);
	if (skops->family == PS_AF_INET) {
		__u32 r = skops->remote_ip4;

		k->family = PS_AF_INET;
		k->addr[0] = r;
		return (r & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       r == skops->local_ip4;
	}
	if (skops->family != PS_AF_INET6)
		return 0;
	ps_read_addrs(skops, &a);
	if (!a.r[0] && !a.r[1] && a.r[2] == bpf_htonl(0xffff)) {
		k->family = PS_AF_INET;
		k->addr[0] = a.r[3];
		return (a.r[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       (a.r[3] == a.l[3] && a.l[2] == bpf_htonl(0xffff));
	}
	k->family = PS_AF_INET6;
	k->addr[0] = a.r[0];
	k->addr[1] = a.r[1];
	k->addr[2] = a.r[2];
	k->addr[3] = a.r[3];
	if (!a.r[0] && !a.r[1] && !a.r[2] && a.r[3] == bpf_htonl(1))
		return 1;
	return a.r[0] == a.l[0] && a.r[1] == a.l[1] && a.r[2] == a.l[2] && a.r[3] == a.l[3];
}

// L3 bytes/s to the payload bytes/s that TCP paces, for this socket's segment size.
static __always_inline __u64 ps_payload(struct bpf_sock_ops *skops, __u64 l3)
{
	__u64 mss = skops->mss_cache;
	__u64 hdr = (skops->family == PS_AF_INET6 ? 40 : 20) + PS_TCP_HDR;

	return mss ? l3 * mss / (mss + hdr) : l3;
}

// Bounds what a paced flow has in flight to twice its share's bandwidth-delay product plus 2 ms
// of its share, at least PS_MIN_CLAMP segments. Pacing alone spaces TSO packets but does not
// size them: below 512 us of RTT (tcp_tso_rtt_log) the kernel builds 64 KB packets whatever
// the pacing rate, so a flow paced at 1 Mbit/s would send one every half second, and a few
// flows in phase overshoot the limit for a whole 100 ms. The clamp never limits the rate: at
// its floor the window still covers twice the round trip at the share. TCP_BPF_SNDCWND_CLAMP
// also sets ssthresh to the clamp, which leaves slow start early: harmless once paced.
static __always_inline void ps_clamp(struct bpf_sock_ops *skops, struct ps_flow *fl, __u64 rate)
{
	__u64 mss = skops->mss_cache, segs;
	int val;

	if (rate == PS_UNLIMITED) {
		if (!fl->clamp || fl->clamp == PS_NO_CLAMP)
			return;
		segs = PS_NO_CLAMP;
	} else {
		// srtt_us is the smoothed RTT in us, times 8.
		segs = rate * ((skops->srtt_us >> 2) + 2000) / 1000000 / (mss ? mss : 1448);
		if (segs < PS_MIN_CLAMP)
			segs = PS_MIN_CLAMP;
		if (segs > PS_NO_CLAMP)
			segs = PS_NO_CLAMP;
		if (fl->clamp && !ps_differs(segs, fl->clamp))
			return;
	}
	val = (int)segs;
	if (!bpf_setsockopt(skops, PS_SOL_TCP, PS_TCP_BPF_SNDCWND_CLAMP, &val, sizeof(val)))
		fl->clamp = segs;
}

// Paces the socket at the lower of its own cgroup's egress share (cg: the cgroup's state, NULL
// in the node-level program) and its peer's ingress share when the peer is on this node.
// Returns whether the socket is paced.
static __always_inline int ps_apply(struct bpf_sock_ops *skops, struct ps_cgroup *cg,
                                    struct ps_stats *st)
{
	struct bpf_sock *sk = skops->sk;
	struct ps_peer_key key;
	struct ps_peer *peer;
	struct ps_flow *fl;
	__u64 rate, share, target;
	int val;

	if (!sk || ps_peer_of(skops, &key))
		return 0;
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!fl)
		return 0;
	// The socket's own cgroup program already applied the same minimum for this ACK (it runs
	// before the root's): the node-level program has nothing to add. A stale mark (that
	// program detached) stops matching at the next ACK, which moves snd_una.
	if (!cg && fl->handled_una == skops->snd_una && fl->applied)
		return fl->applied != PS_UNLIMITED;
	if (cg) {
		rate = ps_rate(cg, PS_EGRESS);
		fl->egress = 0;
		if (rate) {
			share = READ_ONCE(cg->dir[PS_EGRESS].share);
			if (!share)
				share = rate;
			fl->egress = ps_payload(skops, share);
		}
	}
	target = fl->egress ? fl->egress : PS_UNLIMITED;
	peer = bpf_map_lookup_elem(&ps_peers, &key);
	if (peer && bpf_ktime_get_ns() - READ_ONCE(peer->updated_ns) < PS_PEER_TTL_NS) {
		share = ps_payload(skops, READ_ONCE(peer->share));
		if (share && share < target)
			target = share;
	}
	// SO_MAX_PACING_RATE is 32 bits (~34 Gbit/s); above that the bucket backstops.
	if (target > PS_UNLIMITED)
		target = PS_UNLIMITED;
	if (fl->applied != target && (target == PS_UNLIMITED || fl->applied == PS_UNLIMITED ||
	                              !fl->applied || ps_differs(target, fl->applied))) {
		val = (int)target; // int-sized: an 8-byte optval is EINVAL
		if (!bpf_setsockopt(skops, PS_SOL_SOCKET, PS_SO_MAX_PACING_RATE, &val,
		                    sizeof(val))) {
			fl->applied = target;
			if (st)
				__sync_fetch_and_add(&st->adjusts[PS_EGRESS], 1);
		}
	}
	ps_clamp(skops, fl, target);
	if (cg)
		fl->handled_una = skops->snd_una;
	return target != PS_UNLIMITED;
}

// Hook: sockops (BPF_CGROUP_SOCK_OPS), attached with a bpf_link to each limited cgroup.
// Always returns 1 (the return value is ignored except for reply-carrying ops).
// Kernel 5.7 (links); SO_MAX_PACING_RATE from BPF since 4.13.
SEC("sockops")
int ps_sockops(struct bpf_sock_ops *skops)
{
	struct ps_cgroup *cg = bpf_get_local_storage(&ps_cgroups, 0);
	struct ps_stats *st = bpf_get_local_storage(&ps_stats, 0);
	struct ps_peer_key key;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (ps_peer_of(skops, &key))
			break;
		// RTT callbacks re-apply the share on every ACK a sender gets.
		ps_want_callbacks(skops, BPF_SOCK_OPS_RTT_CB_FLAG);
		ps_apply(skops, cg, st);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		ps_apply(skops, cg, st);
		break;
	}
	return 1;
}

// Hook: sockops, attached with a bpf_link to the cgroup v2 root while some cgroup has an
// ingress limit. Paces senders on this node toward sockets of ingress-limited cgroups (found
// in ps_peers), so that ingress is shaped at the source without drops. Sockets of limited
// cgroups run ps_sockops too; both apply the same minimum through ps_flows. Always returns 1.
SEC("sockops")
int ps_peer_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		// Only flows toward a limited peer get RTT callbacks: the rest of the node pays
		// one hash lookup per connection.
		if (ps_apply(skops, NULL, NULL))
			ps_want_callbacks(skops, BPF_SOCK_OPS_RTT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		ps_apply(skops, NULL, NULL);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
