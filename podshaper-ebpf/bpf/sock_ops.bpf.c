// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// sock_ops programs: pace each TCP flow of a limited cgroup at its share of the egress limit
// (SO_MAX_PACING_RATE; TCP paces internally without fq since 4.13), and have receivers tell
// their senders, wherever these run, what each flow may send: the rate option on pure ACKs
// (rate_option.h, docs/rate-option.md), which the sender's node-level program reads and paces
// to. Clamping the receive window instead was measured and made things worse (see
// docs/how-it-works.md).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <linux/tcp.h>
#include "peers.h"

#define PS_SOL_SOCKET 1
#define PS_SO_MAX_PACING_RATE 47
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_UNLIMITED 0xffffffffU
#define PS_SOL_TCP 6
#define PS_EEXIST 17
#define PS_ENOMSG 42
#define PS_TCP_BPF_SNDCWND_CLAMP 1002
// What TCP starts with (TCP_INFINITE_SSTHRESH): the clamp of a socket no longer paced.
#define PS_NO_CLAMP 0x7fffffff
// Fewest segments a paced flow may have in flight: one TSO packet of the kernel's minimum size
// (tcp_min_tso_segs). More makes packets of several flows arrive in clumps at low limits.
#define PS_MIN_CLAMP 2
// TCP header with the timestamp option, which Linux uses by default.
#define PS_TCP_HDR 32
// The ACK flag alone: a pure ACK (TCPHDR_ACK).
#define PS_TCPHDR_ACK 0x10

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

// The remote (r) and local (l) addresses of a socket, IPv4 ones v4-mapped.
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

// The remote address, as ps_peers keys it.
static __always_inline void ps_remote(struct bpf_sock_ops *skops, struct ps_addr *addr)
{
	struct ps_addrs a;

	if (skops->family == PS_AF_INET) {
		ps_addr_of4(addr, skops->remote_ip4);
		return;
	}
	ps_read_addrs(skops, &a);
	ps_addr_of6(addr, a.r);
}

// Whether the peer is this host's loopback or the socket's own address (v4-mapped IPv6
// included): such traffic stays on lo, which the cgroup_skb programs neither limit nor count,
// so it is neither paced nor told a rate.
static __always_inline int ps_local(struct bpf_sock_ops *skops)
{
	struct ps_addrs a;

	if (skops->family == PS_AF_INET) {
		__u32 r = skops->remote_ip4;

		return (r & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       r == skops->local_ip4;
	}
	if (skops->family != PS_AF_INET6)
		return 0;
	ps_read_addrs(skops, &a);
	if (!a.r[0] && !a.r[1] && a.r[2] == bpf_htonl(0xffff))
		return (a.r[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       (a.r[3] == a.l[3] && a.l[2] == bpf_htonl(0xffff));
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

// Paces the socket at the lowest of its own cgroup's egress share and those of the cgroup's peer
// classes covering its peer (cg: the cgroup's state, NULL in the node-level program) and the
// rate its peer's receiver asked for, while that is fresh.
// `force`: apply even if the cgroup's program already did for this snd_una (a new option).
// Returns whether the socket is paced.
static __always_inline int ps_apply(struct bpf_sock_ops *skops, struct ps_cgroup *cg,
                                    struct ps_stats *st, int force)
{
	struct bpf_sock *sk = skops->sk;
	struct ps_flow *fl;
	__u64 share, target;
	struct ps_addr addr;
	int val;

	if (!sk || ps_local(skops))
		return 0;
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!fl)
		return 0;
	// The socket's own cgroup program already applied the same minimum for this ACK (it runs
	// before the root's): the node-level program has nothing to add. A stale mark (that
	// program detached) stops matching at the next ACK, which moves snd_una.
	if (!cg && !force && fl->handled_una == skops->snd_una && fl->applied)
		return fl->applied != PS_UNLIMITED;
	if (cg) {
		ps_remote(skops, &addr);
		share = ps_flow_share(cg, PS_EGRESS, &addr);
		fl->egress = share ? ps_payload(skops, share) : 0;
	} else if (!force && fl->handled_una != skops->snd_una) {
		// The socket's cgroup program did not run for this ACK: it was detached (the limit
		// lifted), and the egress share it set goes with it. Without this, an established
		// flow stayed paced at the old limit until it ended.
		fl->egress = 0;
	}
	target = fl->egress ? fl->egress : PS_UNLIMITED;
	if (fl->remote && bpf_ktime_get_ns() - fl->remote_ns < PS_REMOTE_TTL_NS) {
		share = ps_payload(skops, fl->remote);
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
				__sync_fetch_and_add(&st->adjusts, 1);
		}
	}
	ps_clamp(skops, fl, target);
	if (cg)
		fl->handled_una = skops->snd_una;
	return target != PS_UNLIMITED;
}

static __always_inline struct ps_node_stats *ps_node_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ps_node, &zero);
}

// Receiver side, BPF_SOCK_OPS_HDR_OPT_LEN_CB: reserves room for the rate option on a pure ACK
// and notes the value to write. cg is the socket's cgroup state in its own program, NULL in the
// node-level one, which only sends "no limit" for sockets whose cgroup program is gone. Only
// pure ACKs carry it: this callback also runs without a packet from tcp_current_mss(), where a
// reservation would shrink every data segment, and an option on a data segment would make it
// longer than the MSS.
static __always_inline void ps_opt_len(struct bpf_sock_ops *skops, struct ps_cgroup *cg)
{
	struct bpf_sock *sk = skops->sk;
	struct ps_node_stats *ns;
	struct ps_flow *fl;
	struct ps_addr addr;
	__u64 share;
	__u32 value;

	if (!sk || (skops->args[0] & BPF_WRITE_HDR_TCP_CURRENT_MSS) || skops->skb_len ||
	    skops->skb_tcp_flags != PS_TCPHDR_ACK)
		return;
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, cg ? BPF_SK_STORAGE_GET_F_CREATE : 0);
	if (!fl)
		return;
	if (cg) {
		fl->opt_rcv_nxt = skops->rcv_nxt;
		ps_remote(skops, &addr);
		share = ps_flow_share(cg, PS_INGRESS, &addr);
		if (share) {
			value = ps_opt_encode(share);
			fl->opt_lapse = PS_OPT_LAPSE_ACKS;
		} else if (fl->opt_lapse) {
			value = ps_opt_none();
			fl->opt_lapse--;
		} else {
			return;
		}
	} else {
		// The cgroup's program looked at this ACK, or nothing is left to lift.
		if (fl->opt_rcv_nxt == skops->rcv_nxt || !fl->opt_lapse)
			return;
		value = ps_opt_none();
		fl->opt_lapse--;
	}
	if (bpf_reserve_hdr_opt(skops, PS_OPT_LEN, 0)) {
		ns = ps_node_stats();
		if (ns)
			__sync_fetch_and_add(&ns->opt_no_room, 1);
		return;
	}
	fl->opt_pending = value;
	// The unpaced count's grace (ps_flow_unpaced) starts at the first rate and starts over
	// after "no limit".
	if (value == ps_opt_none()) {
		if (fl->opt_since != PS_OPT_SINCE_COUNTED)
			fl->opt_since = 0;
	} else if (!fl->opt_since) {
		fl->opt_since = READ_ONCE(cg->dir[PS_INGRESS].epoch) + 1;
	}
}

// Receiver side, BPF_SOCK_OPS_WRITE_HDR_OPT_CB: writes the option ps_opt_len() reserved room
// for. Either program may write it; the first clears it.
static __always_inline void ps_opt_write(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct ps_node_stats *ns;
	struct ps_flow *fl;
	__u8 opt[PS_OPT_LEN];
	__u32 value;
	long err;

	if (!sk)
		return;
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, 0);
	if (!fl || !fl->opt_pending)
		return;
	value = fl->opt_pending;
	fl->opt_pending = 0;
	opt[0] = PS_OPT_KIND;
	opt[1] = PS_OPT_LEN;
	opt[2] = PS_OPT_EXID >> 8;
	opt[3] = PS_OPT_EXID & 0xff;
	opt[4] = value >> 24;
	opt[5] = value >> 16;
	opt[6] = value >> 8;
	opt[7] = value;
	err = bpf_store_hdr_opt(skops, opt, sizeof(opt), 0);
	ns = ps_node_stats();
	if (!ns)
		return;
	if (!err)
		__sync_fetch_and_add(&ns->opt_written, 1);
	else if (err == -PS_EEXIST)
		__sync_fetch_and_add(&ns->opt_exists, 1);
	else
		__sync_fetch_and_add(&ns->opt_no_room, 1);
}

// Sender side, BPF_SOCK_OPS_PARSE_HDR_OPT_CB (a segment carrying an option the kernel does not
// know): takes the rate of our option and re-paces the socket at once. Runs after the PAWS
// and sequence checks but before tcp_ack() validates the ACK, so an ACK outside
// snd_una..snd_nxt is ignored (counted); so is a malformed option (counted).
static __always_inline void ps_opt_parse(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct tcphdr *th = skops->skb_data;
	struct ps_node_stats *ns;
	struct ps_flow *fl;
	__u8 opt[PS_OPT_LEN] = {PS_OPT_KIND, 4, PS_OPT_EXID >> 8, PS_OPT_EXID & 0xff};
	__u64 rate = 0;
	__u32 value;
	long n;
	int what;

	if (!sk)
		return;
	// Search by kind and ExID; a match longer than our buffer is -ENOSPC.
	n = bpf_load_hdr_opt(skops, opt, sizeof(opt), 0);
	ns = ps_node_stats();
	if (n == -PS_ENOMSG || !ns)
		return; // someone else's option
	value = ((__u32)opt[4] << 24) | ((__u32)opt[5] << 16) | ((__u32)opt[6] << 8) | opt[7];
	what = n == PS_OPT_LEN ? ps_opt_decode(value, &rate) : PS_OPT_BAD;
	if (what == PS_OPT_BAD) {
		__sync_fetch_and_add(&ns->opt_malformed, 1);
		return;
	}
	if ((void *)(th + 1) > skops->skb_data_end || !th->ack ||
	    !ps_ack_in_window(bpf_ntohl(th->ack_seq), skops->snd_una, skops->snd_nxt)) {
		__sync_fetch_and_add(&ns->opt_outside, 1);
		return;
	}
	fl = bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!fl)
		return;
	if (what == PS_OPT_LIFTED) {
		__sync_fetch_and_add(&ns->opt_lifted, 1);
		if (!fl->remote)
			return;
		fl->remote = 0;
	} else {
		__sync_fetch_and_add(&ns->opt_taken, 1);
		fl->remote_ns = bpf_ktime_get_ns();
		if (fl->remote == rate)
			return;
		// RTT callbacks re-apply on later ACKs and let the rate lapse when options stop.
		if (!fl->remote)
			ps_want_callbacks(skops, BPF_SOCK_OPS_RTT_CB_FLAG);
		fl->remote = rate;
	}
	ps_apply(skops, NULL, NULL, 1);
}

// Hook: sockops (BPF_CGROUP_SOCK_OPS), attached with a bpf_link to each limited cgroup. Paces
// the cgroup's TCP flows at their egress share and writes the rate option on their pure ACKs
// while the cgroup has an ingress limit. Always returns 1 (the return value is ignored except
// for reply-carrying ops). Kernel 5.7 (links), 5.10 (header options).
SEC("sockops")
int ps_sockops(struct bpf_sock_ops *skops)
{
	struct ps_cgroup *cg;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (ps_local(skops))
			break;
		// RTT callbacks re-apply the share on every ACK a sender gets; the header-option
		// callbacks let a receiver write its rate, also when its ingress limit comes
		// later. A child socket inherits its listener's flags, but a listener opened before
		// the limit never got them: set them here, not in TCP_LISTEN_CB.
		ps_want_callbacks(skops,
		                  BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		// fall through: apply the share now
	case BPF_SOCK_OPS_RTT_CB:
		cg = bpf_get_local_storage(&ps_cgroups, 0);
		ps_apply(skops, cg, bpf_get_local_storage(&ps_stats, 0), 0);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		// Runs for every segment the socket sends: ps_opt_len() leaves all but pure ACKs
		// before it touches any state.
		cg = bpf_get_local_storage(&ps_cgroups, 0);
		ps_opt_len(skops, cg);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		ps_opt_write(skops);
		break;
	}
	return 1;
}

// Hook: sockops, attached with a bpf_link to the node's cgroup root (the cgroup v2 root, or
// --cgroup-root) for as long as the daemon runs, unless --no-peer-pacing. Sender side: asks
// every TCP connection of the node to show it options the kernel does not know, and paces a
// flow at the rate its receiver's option carries (the minimum with its own cgroup's egress
// share, which ps_sockops applies the same way through ps_flows); connections that never get
// one cost one callback at establishment. Receiver side: sends "no limit" for sockets whose
// cgroup program went away while their sender was paced. Always returns 1. Kernel 5.10.
SEC("sockops")
int ps_node_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!ps_local(skops))
			ps_want_callbacks(skops, BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		ps_opt_parse(skops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		ps_apply(skops, NULL, NULL, 0);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		ps_opt_len(skops, NULL);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		ps_opt_write(skops);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
