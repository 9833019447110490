// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// The bench's stand-in for an EDT shaper of the kind Cilium's bandwidth manager runs: a tc
// egress program gives each packet an earliest departure time (skb->tstamp) so that the
// device's packets leave at the configured rate, and the fq qdisc holds each packet until its
// time. One aggregate: everything leaving the device. Packets due further ahead than the drop
// horizon are dropped, which is what bounds the queue.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#define NSEC_PER_SEC 1000000000ULL

struct edt {
	// L3-and-up bytes per second; 0 passes everything (not configured yet).
	__u64 bytes_per_sec;
	// How far ahead a departure may be scheduled before the packet is dropped, in ns.
	__u64 horizon_ns;
	// Departure time of the last packet scheduled.
	__u64 t_last;
	// Packets dropped at the horizon.
	__u64 drops;
};

// edt_state[0]: the shaper's rate and horizon, written by the bench (bpftool map update on
// the pin) before traffic; t_last and drops written by edt_egress, drops read by the bench.
// Pinned by the bench's loader (bpftool prog load ... pinmaps).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct edt);
} edt_state SEC(".maps");

// Hook: tc egress (clsact, direct action) of the device whose traffic is shaped; fq must be
// its root qdisc. Returns TC_ACT_OK, or TC_ACT_SHOT past the horizon.
SEC("tc")
int edt_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct edt *e = bpf_map_lookup_elem(&edt_state, &zero);
	__u64 now, t, next;

	if (!e || !e->bytes_per_sec)
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	t = skb->tstamp > now ? skb->tstamp : now;
	// The bench's guests have one CPU: no lock around t_last.
	next = e->t_last + (__u64)skb->len * NSEC_PER_SEC / e->bytes_per_sec;
	if (next <= t) {
		e->t_last = t;
		return TC_ACT_OK;
	}
	if (next - now >= e->horizon_ns) {
		__sync_fetch_and_add(&e->drops, 1);
		return TC_ACT_SHOT;
	}
	e->t_last = next;
	skb->tstamp = next;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
