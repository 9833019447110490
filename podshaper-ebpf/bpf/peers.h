// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// Peer classes: a cgroup's traffic to or from the peers of a rule it is bound to is capped by
// that rule's class, beside the cgroup's own limit (docs/policy.md). Used by both objects.
#ifndef PODSHAPER_PEERS_H
#define PODSHAPER_PEERS_H

#include <bpf/bpf_endian.h>
#include "maps.h"

// Bits of the rule id and the address in a full-length ps_peers lookup.
#define PS_PEER_KEY_BITS (32 + 128)

// A peer's address as ps_peers keys it: IPv4 in a[0] with zeros after, IPv6 in all four words
// with family PS_PEER_V6. The family is a bit to OR into the key, not a flag to branch on: a
// branch would keep the verifier from merging the IPv4 and IPv6 paths, which doubled the states
// of the peer loop and took ps_egress past the 1M-instruction budget.
struct ps_addr {
	__u32 a[4];
	__u32 family;
};

// Sets `addr` from 16 bytes of IPv6 address, an IPv4-mapped one (::ffff:a.b.c.d) as IPv4.
static __always_inline void ps_addr_of6(struct ps_addr *addr, const __u32 *w)
{
	if (!w[0] && !w[1] && w[2] == bpf_htonl(0xffff)) {
		addr->a[0] = w[3];
		addr->a[1] = 0;
		addr->a[2] = 0;
		addr->a[3] = 0;
		addr->family = 0;
		return;
	}
	addr->a[0] = w[0];
	addr->a[1] = w[1];
	addr->a[2] = w[2];
	addr->a[3] = w[3];
	addr->family = PS_PEER_V6;
}

// Sets `addr` to an IPv4 address.
static __always_inline void ps_addr_of4(struct ps_addr *addr, __u32 ip)
{
	addr->a[0] = ip;
	addr->a[1] = 0;
	addr->a[2] = 0;
	addr->a[3] = 0;
	addr->family = 0;
}

// Whether `addr` is one of the rule's peers and in none of its excepts.
static __always_inline int ps_is_peer(__u32 rule, const struct ps_addr *addr)
{
	struct ps_peer_key k = {
		.prefixlen = PS_PEER_KEY_BITS,
		.rule = (rule & PS_RULE_ID_MASK) | addr->family,
	};
	__u32 *v;

	__builtin_memcpy(k.addr, addr->a, sizeof(k.addr));
	v = bpf_map_lookup_elem(&ps_peers, &k);
	return v && *v == PS_PEER_IN;
}

// The class of a rule the cgroup is bound to: its own, or the node's for a shared rule. NULL if
// the daemon has not created it (yet, or any more).
static __always_inline struct ps_cgroup *ps_class(const struct ps_cgroup *cg, __u32 rule)
{
	struct ps_class_key k = {
		.owner = (rule & PS_RULE_SHARED) ? 0 : READ_ONCE(cg->peers.owner),
		.rule = rule & PS_RULE_ID_MASK,
	};

	return bpf_map_lookup_elem(&ps_classes, &k);
}

// The share one limiter (a cgroup or a class) hands each of its flows in `dir`, L3 bytes/s;
// its limit until the controller set one; 0 if it has no limit that way.
static __always_inline __u64 ps_share_of(const struct ps_cgroup *c, int dir)
{
	__u64 rate = ps_rate(c, dir), share;

	if (!rate)
		return 0;
	share = READ_ONCE(c->dir[dir].share);
	return share ? share : rate;
}

// The lower of two shares, 0 meaning none.
static __always_inline __u64 ps_lower(__u64 a, __u64 b)
{
	return !a || (b && b < a) ? b : a;
}

// What a flow of the cgroup with the peer `addr` may send (egress) or be sent (ingress): the
// lowest share among the cgroup's own limit and the classes covering the peer; 0 = no limit.
// Lock-free reads: a share is one word, and a rule list torn by a concurrent update costs one
// packet's decision.
static __always_inline __u64 ps_flow_share(const struct ps_cgroup *cg, int dir,
                                           const struct ps_addr *addr)
{
	__u64 share = ps_share_of(cg, dir);

	for (int i = 0; i < PS_MAX_RULES; i++) {
		__u32 rule = READ_ONCE(cg->peers.rule[dir][i]);
		struct ps_cgroup *c;

		if (!rule)
			break;
		if (!ps_is_peer(rule, addr))
			continue;
		c = ps_class(cg, rule);
		if (c)
			share = ps_lower(share, ps_share_of(c, dir));
	}
	return share;
}

#endif
