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

// socket -> struct ps_flow. Created by the egress/ingress programs when a TCP flow first moves
// data and by sock_ops when a flow is established; freed with the socket. Read by both. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ps_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_flows SEC(".maps");

// Length of a measurement epoch. Long enough to see a packet of every flow at the lowest
// per-flow share worth pacing, short enough that an idle flow's share returns within ~2 epochs.
#define PS_EPOCH_NS (50ULL * 1000 * 1000)
#define PS_NSEC 1000000000ULL

#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))

// The limit of one direction in L3 bytes per second (config holds bits/s); 0 = none.
static __always_inline __u64 ps_rate(const struct ps_cgroup *cg, int dir)
{
	__u64 bits = READ_ONCE(cg->config.rate[dir]);

	return bits && bits < 8 ? 1 : bits >> 3;
}

// rate (bytes/s) * ns / 1e9 without overflowing for rates up to 1 Pbit/s.
static __always_inline __u64 ps_bytes_in(__u64 rate, __u64 ns)
{
	if (rate < (1ULL << 33))
		return rate * ns / PS_NSEC;
	return (rate >> 20) * ns / (PS_NSEC >> 20);
}

// Rolls the epoch of one direction if it is over and feeds the share controller. Caller holds
// the lock. The controller scales the share by limit/measured, so flows that cannot use their
// share (idle or application-limited) leave it to the others, and overshoot is pulled back.
static __always_inline void ps_roll_epoch(struct ps_dir_state *d, __u64 rate, __u64 now)
{
	__u64 elapsed = now - d->epoch_start_ns;
	__u64 share, floor, measured, n;

	if (elapsed < PS_EPOCH_NS)
		return;
	n = d->flows_cur ? d->flows_cur : 1;
	measured = elapsed ? d->epoch_bytes * PS_NSEC / elapsed : 0;
	if (elapsed > 4 * PS_EPOCH_NS)
		measured = 0; // the cgroup was quiet: restart from the equal split
	share = d->share;
	floor = rate / (4 * n);
	if (!measured || !share) {
		share = rate / n;
	} else {
		// Q10 fixed point; rate < 2^47 for 1 Pbit/s, so rate << 10 cannot overflow.
		__u64 factor = (rate << 10) / measured;

		// At most x1.5 up per epoch; down as far as the measurement says.
		if (factor > 1536)
			factor = 1536;
		share = share * factor >> 10;
	}
	if (share < floor)
		share = floor;
	if (share > rate)
		share = rate;
	if (!share)
		share = 1;
	d->share = share;
	d->measured = measured;
	d->flows_prev = d->flows_cur;
	d->flows_cur = 0;
	d->epoch_bytes = 0;
	d->epoch_start_ns = now;
	d->epoch++;
}

#endif
