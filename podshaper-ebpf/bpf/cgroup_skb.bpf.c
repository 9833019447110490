// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// cgroup_skb programs: account every packet of a limited cgroup, count the TCP flows that move
// data (for sock_ops' per-flow share), police non-TCP traffic and backstop TCP.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "peers.h"

#define PS_LOOPBACK_IFINDEX 1
#define PS_SOCK_STREAM 1
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_IP_OFFSET_MASK 0x1fff

struct ps_pkt {
	__u32 hdrlen; // L3 + L4 header bytes of one segment
	__u32 wire; // L3 bytes on the wire, every GSO segment with its headers
	__u8 tcp;
	__u8 udp;
	__u8 syn;
	__u8 payload;
	__u8 ect;
	// The remote address (destination on egress, source on ingress); valid when has_addr.
	__u8 has_addr;
	struct ps_addr addr;
};

// Copies `len` bytes at `off` from the packet: straight from its linear part when they are
// there (always for the headers of local TCP and GRO packets), else through the helper.
static __always_inline int ps_load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= 64 && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline void ps_parse(struct __sk_buff *skb, struct ps_pkt *p, const int dir)
{
	__u32 l3 = 0, proto = 0;

	p->hdrlen = 0;
	p->tcp = 0;
	p->udp = 0;
	p->syn = 0;
	p->payload = 0;
	p->ect = 0;
	p->has_addr = 0;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (ps_load(skb, 0, &ip, sizeof(ip)))
			goto out;
		l3 = ip.ihl * 4;
		ps_addr_of4(&p->addr, dir == PS_EGRESS ? ip.daddr : ip.saddr);
		p->has_addr = 1;
		// Later fragments carry no L4 header.
		if (!(ip.frag_off & bpf_htons(PS_IP_OFFSET_MASK)))
			proto = ip.protocol;
		p->ect = ip.tos & 3;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (ps_load(skb, 0, &ip6, sizeof(ip6)))
			goto out;
		l3 = sizeof(ip6);
		proto = ip6.nexthdr; // extension headers: counted, not parsed
		ps_addr_of6(&p->addr, dir == PS_EGRESS ? ip6.daddr.in6_u.u6_addr32
		                                       : ip6.saddr.in6_u.u6_addr32);
		p->has_addr = 1;
		p->ect = (ip6.flow_lbl[0] >> 4) & 3;
	}
	p->hdrlen = l3;
	if (proto == IPPROTO_TCP) {
		struct tcphdr th;

		if (!ps_load(skb, l3, &th, sizeof(th))) {
			p->tcp = 1;
			p->syn = th.syn;
			p->hdrlen = l3 + th.doff * 4;
		}
	} else if (proto == IPPROTO_UDP) {
		p->udp = 1;
		p->hdrlen = l3 + 8;
	}
out:
	p->wire = skb->len;
	if (skb->len > p->hdrlen)
		p->payload = 1;
	if (skb->gso_segs > 1 && skb->gso_segs < 0xffff)
		p->wire += (skb->gso_segs - 1) * p->hdrlen;
}

// Both verdicts at once: the packet passes if both pass, with CN if either asks for it.
static __always_inline int ps_both(int a, int b)
{
	return (a & b & PS_VERDICT_PASS) | ((a | b) & PS_VERDICT_CN);
}

// What ps_police needs to know of a packet, packed into one scalar argument (a global
// function takes only the context and scalars on 5.10): its L3 bytes in the low 32 bits, then
// these flags.
#define PS_PK_INGRESS (1ULL << 32) // the direction: ingress when set
#define PS_PK_OWN (1ULL << 33) // the cgroup's own limit, else the class of the rule given
#define PS_PK_SLOT_SHIFT 34 // 2 bits: the class's slot in ps_peers.rule[dir]
#define PS_PK_TCP (1ULL << 36)
#define PS_PK_SYN (1ULL << 37)
#define PS_PK_CONTROL (1ULL << 38) // a TCP socket's segment without payload
#define PS_PK_FLOW (1ULL << 39) // a socket's data: counted in its flow's marks
#define PS_PK_ECT_SHIFT 40 // 2 bits: the packet's ECN field

// What ps_police returns beside the verdict (bits 0-1).
#define PS_POLICED_MARK 4 // set CE on the packet
#define PS_POLICED_UNPACED 8 // its flow now counts as unpaced

// Runs one limiter over a packet: the cgroup's own limit, or the class of `rule` (key `owner`,
// `rule`) when PS_PK_OWN is clear. Refill, epoch, flow count, verdict and debit. Returns the
// verdict with PS_POLICED_* bits.
//
// A global function: the verifier checks it once, alone, and its callers as if it were a
// helper with an unknown result. As a static function it was checked again for every call
// site and every verdict the earlier limiters could return, which took ps_egress past the
// verifier's 1M-instruction budget with four peer classes (inlined, ps_ingress already).
__noinline int ps_police(struct __sk_buff *skb, __u64 owner, __u32 rule, __u64 pk, __u64 now)
{
	const int dir = (pk & PS_PK_INGRESS) ? PS_INGRESS : PS_EGRESS;
	const int own = !!(pk & PS_PK_OWN), slot = (pk >> PS_PK_SLOT_SHIFT) & (PS_MAX_RULES - 1);
	const int tcp = !!(pk & PS_PK_TCP), syn = !!(pk & PS_PK_SYN);
	const int control = !!(pk & PS_PK_CONTROL), ect = (pk >> PS_PK_ECT_SHIFT) & 3;
	const __u32 wire = (__u32)pk;
	struct ps_flow *fl = NULL;
	struct ps_dir_state *d;
	struct ps_cgroup *c;
	__u32 *flow_epoch;
	int verdict, m = 0, out = 0;
	__u64 rate, depth;

	if (own) {
		c = bpf_get_local_storage(&ps_cgroups, 0);
	} else {
		struct ps_class_key k = {.owner = owner, .rule = rule & PS_RULE_ID_MASK};

		c = bpf_map_lookup_elem(&ps_classes, &k);
		if (!c)
			return PS_PASS;
	}
	rate = ps_rate(c, dir);
	if (!rate)
		return PS_PASS;
	d = &c->dir[dir];

	// A control segment needs no verdict (see below): it is debited without the lock, which
	// halves the locking of a bulk transfer (one ACK for every data packet or two). A debit
	// lost to a concurrent refill is a few dozen bytes. Ingress SYNs take the locked path: they
	// count a flow.
	if (control && !(dir == PS_INGRESS && syn) && READ_ONCE(d->refill_ns) &&
	    READ_ONCE(c->generation_seen) == READ_ONCE(c->config.generation)) {
		if (READ_ONCE(d->tokens) > -(__s64)(2 * ps_depth(d, rate))) {
			__sync_fetch_and_add(&d->tokens, -(__s64)wire);
			__sync_fetch_and_add(&d->epoch_bytes, wire);
		}
		return PS_PASS;
	}

	// The socket's flow state, which ps_handle created for a data packet.
	if ((pk & PS_PK_FLOW) && skb->sk) {
		struct bpf_sock *sk = bpf_sk_fullsock(skb->sk);

		if (sk)
			fl = bpf_sk_storage_get(&ps_flows, sk, 0, 0);
	}
	flow_epoch = !fl ? NULL : own ? &fl->epoch[dir] : &fl->rule_epoch[dir][slot];

	bpf_spin_lock(&c->lock);
	if (c->generation_seen != c->config.generation) {
		c->generation_seen = c->config.generation;
		ps_restart(&c->dir[0]);
		ps_restart(&c->dir[1]);
	}
	ps_refill(d, rate, now);
	ps_roll_epoch(d, rate, now);

	if ((dir == PS_INGRESS && syn) || (flow_epoch && *flow_epoch != d->epoch + 1)) {
		if (flow_epoch && !syn)
			*flow_epoch = d->epoch + 1;
		ps_flow_joins(d, rate);
	}
	// The share goes out on the flows' next pure ACKs (the rate option, sock_ops).
	if (dir == PS_INGRESS && tcp)
		ps_brake(d, rate);
	depth = ps_depth(d, rate);
	verdict = ps_judge(d->tokens, depth, tcp, dir, ect, &m);
	if (m)
		out |= PS_POLICED_MARK;
	if (verdict & PS_VERDICT_PASS) {
		d->tokens -= wire;
		d->epoch_bytes += wire;
	} else if (dir == PS_INGRESS && tcp && fl && own) {
		if (ps_flow_unpaced(&fl->opt_since, d->epoch))
			out |= PS_POLICED_UNPACED;
	} else if (control) {
		// Never drop a TCP socket's control segments: ACKs clock the data flowing the other
		// way, and a pod uploading at 15 Gbit/s with a 1M ingress limit stalled for a
		// second and lost thousands of segments when its ACKs were policed. Past the floor
		// they pass without a debit, so that such a flow leaves no debt to repay for
		// minutes after.
		verdict = PS_PASS;
	}
	bpf_spin_unlock(&c->lock);
	return verdict | out;
}

static __always_inline int ps_handle(struct __sk_buff *skb, const int dir)
{
	struct ps_cgroup *cg = bpf_get_local_storage(&ps_cgroups, 0);
	struct ps_stats *st = bpf_get_local_storage(&ps_stats, 0);
	int verdict = PS_PASS, policed = 0;
	struct ps_pkt p;
	__u64 pk, now, rate;
	__u32 rules;

	// Loopback (127.0.0.0/8, ::1, the pod's own addresses) stays free and uncounted.
	if (skb->ifindex == PS_LOOPBACK_IFINDEX)
		return PS_PASS;
	ps_parse(skb, &p, dir);

	rate = ps_rate(cg, dir);
	rules = READ_ONCE(cg->peers.rule[dir][0]);
	if (!rate && !rules)
		goto count;

	pk = p.wire | (dir == PS_INGRESS ? PS_PK_INGRESS : 0) |
	     ((__u64)(p.ect & 3) << PS_PK_ECT_SHIFT);
	if (p.tcp)
		pk |= PS_PK_TCP | (p.syn ? PS_PK_SYN : 0);
	// TCP and UDP sockets that move data count as flows: TCP for its share, both for the
	// depth of the bucket.
	if ((p.tcp || p.udp) && p.payload && skb->sk) {
		struct bpf_sock *sk = bpf_sk_fullsock(skb->sk);

		if (sk && bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE))
			pk |= PS_PK_FLOW;
	} else if (p.tcp && skb->sk) {
		struct bpf_sock *sk = bpf_sk_fullsock(skb->sk);

		// A TCP socket's segment without payload: an ACK, SYN, FIN or RST. Raw sockets
		// sending TCP headers are not TCP sockets and get no such pass.
		if (sk && sk->type == PS_SOCK_STREAM)
			pk |= PS_PK_CONTROL;
	}
	now = bpf_ktime_get_ns();

	// The peer classes first: the packet goes through each class that covers its peer, then
	// through the cgroup's own limit. A packet one of them drops still debited those before
	// it: at most one packet's worth per drop.
	if (rules && p.has_addr) {
		__u64 owner = READ_ONCE(cg->peers.owner);

		for (int i = 0; i < PS_MAX_RULES; i++) {
			__u32 rule = READ_ONCE(cg->peers.rule[dir][i]);
			int r;

			if (!rule)
				break;
			if (!ps_is_peer(rule, &p.addr))
				continue;
			r = ps_police(skb, (rule & PS_RULE_SHARED) ? 0 : owner, rule,
			              pk | ((__u64)i << PS_PK_SLOT_SHIFT), now);
			policed |= r;
			verdict = ps_both(verdict, r & PS_PASS_CN);
			if (!(verdict & PS_VERDICT_PASS))
				goto judged;
		}
	}
	// A cgroup with rules and no limit of its own that way has nothing more to run.
	if (rate) {
		int r = ps_police(skb, 0, 0, pk | PS_PK_OWN, now);

		policed |= r;
		verdict = ps_both(verdict, r & PS_PASS_CN);
	}
judged:
	// The verifier sees ps_police's result as any number: the mask bounds the verdict for it,
	// as 6.1's cannot follow ps_both's bits; the empty asm keeps clang, which can, from
	// dropping the mask. Ingress has no congestion-notification verdicts: ps_judge never
	// gives one there.
	asm volatile("" : "+r"(verdict));
	verdict &= dir == PS_INGRESS ? PS_VERDICT_PASS : PS_PASS_CN;
	if ((policed & PS_POLICED_MARK) && bpf_skb_ecn_set_ce(skb))
		__sync_fetch_and_add(&st->marks[dir], 1);
	if (verdict == PS_PASS_CN)
		__sync_fetch_and_add(&st->marks[dir], 1);
	if (policed & PS_POLICED_UNPACED)
		__sync_fetch_and_add(&st->unpaced_flows, 1);
	if (!(verdict & PS_VERDICT_PASS)) {
		__sync_fetch_and_add(&st->drops[dir], 1);
		return verdict;
	}
count:
	__sync_fetch_and_add(&st->bytes[dir], p.wire);
	__sync_fetch_and_add(&st->packets[dir], 1);
	return verdict;
}

// Hook: cgroup_skb/egress (BPF_CGROUP_INET_EGRESS), attached with a bpf_link to each limited
// cgroup. Returns PS_PASS, PS_PASS_CN, PS_DROP_CN. Kernel 5.7 (links), 5.9 (shared storage).
SEC("cgroup_skb/egress")
int ps_egress(struct __sk_buff *skb)
{
	return ps_handle(skb, PS_EGRESS);
}

// Hook: cgroup_skb/ingress (BPF_CGROUP_INET_INGRESS). Returns PS_PASS (maybe CE-marked) or
// PS_DROP. Kernel 5.7.
SEC("cgroup_skb/ingress")
int ps_ingress(struct __sk_buff *skb)
{
	return ps_handle(skb, PS_INGRESS);
}

char _license[] SEC("license") = "GPL";
