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
#include "maps.h"

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

static __always_inline void ps_parse(struct __sk_buff *skb, struct ps_pkt *p)
{
	__u32 l3 = 0, proto = 0;

	p->hdrlen = 0;
	p->tcp = 0;
	p->udp = 0;
	p->syn = 0;
	p->payload = 0;
	p->ect = 0;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (ps_load(skb, 0, &ip, sizeof(ip)))
			goto out;
		l3 = ip.ihl * 4;
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

static __always_inline int ps_handle(struct __sk_buff *skb, const int dir)
{
	struct ps_cgroup *cg = bpf_get_local_storage(&ps_cgroups, 0);
	struct ps_stats *st = bpf_get_local_storage(&ps_stats, 0);
	struct ps_flow *fl = NULL;
	struct ps_dir_state *d;
	struct ps_pkt p;
	__u64 rate, now, depth;
	int verdict = PS_PASS, mark = 0, control = 0, unpaced = 0;

	// Loopback (127.0.0.0/8, ::1, the pod's own addresses) stays free and uncounted.
	if (skb->ifindex == PS_LOOPBACK_IFINDEX)
		return PS_PASS;
	ps_parse(skb, &p);

	rate = ps_rate(cg, dir);
	if (!rate)
		goto count;

	// TCP and UDP sockets that move data count as flows: TCP for its share, both for the
	// depth of the bucket.
	if ((p.tcp || p.udp) && p.payload && skb->sk) {
		struct bpf_sock *sk = bpf_sk_fullsock(skb->sk);

		if (sk)
			fl = bpf_sk_storage_get(&ps_flows, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	} else if (p.tcp && skb->sk) {
		struct bpf_sock *sk = bpf_sk_fullsock(skb->sk);

		// A TCP socket's segment without payload: an ACK, SYN, FIN or RST. Raw sockets
		// sending TCP headers are not TCP sockets and get no such pass.
		control = sk && sk->type == PS_SOCK_STREAM;
	}
	now = bpf_ktime_get_ns();
	d = &cg->dir[dir];

	// A control segment needs no verdict (see below): it is debited without the lock, which
	// halves the locking of a bulk transfer (one ACK for every data packet or two). A debit
	// lost to a concurrent refill is a few dozen bytes. Ingress SYNs take the locked path: they
	// count a flow.
	if (control && !(dir == PS_INGRESS && p.syn) && READ_ONCE(d->refill_ns) &&
	    READ_ONCE(cg->generation_seen) == READ_ONCE(cg->config.generation)) {
		if (READ_ONCE(d->tokens) > -(__s64)(2 * ps_depth(d, rate))) {
			__sync_fetch_and_add(&d->tokens, -(__s64)p.wire);
			__sync_fetch_and_add(&d->epoch_bytes, p.wire);
		}
		goto count;
	}

	bpf_spin_lock(&cg->lock);
	if (cg->generation_seen != cg->config.generation) {
		cg->generation_seen = cg->config.generation;
		ps_restart(&cg->dir[0]);
		ps_restart(&cg->dir[1]);
	}
	ps_refill(d, rate, now);
	ps_roll_epoch(d, rate, now);

	if ((dir == PS_INGRESS && p.syn) || (fl && fl->epoch[dir] != d->epoch + 1)) {
		if (fl && !p.syn)
			fl->epoch[dir] = d->epoch + 1;
		ps_flow_joins(d, rate);
	}
	// The share goes out on the flows' next pure ACKs (the rate option, sock_ops).
	if (dir == PS_INGRESS && p.tcp)
		ps_brake(d, rate);
	depth = ps_depth(d, rate);
	verdict = ps_judge(d->tokens, depth, p.tcp, dir, p.ect, &mark);
	if (verdict & PS_VERDICT_PASS) {
		d->tokens -= p.wire;
		d->epoch_bytes += p.wire;
	} else if (dir == PS_INGRESS && p.tcp && fl) {
		unpaced = ps_flow_unpaced(&fl->opt_since, d->epoch);
	} else if (control) {
		// Never drop a TCP socket's control segments: ACKs clock the data flowing the other
		// way, and a pod uploading at 15 Gbit/s with a 1M ingress limit stalled for a
		// second and lost thousands of segments when its ACKs were policed. Past the floor
		// they pass without a debit, so that such a flow leaves no debt to repay for
		// minutes after.
		verdict = PS_PASS;
	}
	bpf_spin_unlock(&cg->lock);

	if (mark && bpf_skb_ecn_set_ce(skb))
		__sync_fetch_and_add(&st->marks[dir], 1);
	if (verdict == PS_PASS_CN)
		__sync_fetch_and_add(&st->marks[dir], 1);
	if (unpaced)
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
