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

// (address, port) of a socket in an ingress-limited cgroup -> struct ps_peer. Written by the
// ingress program (on SYNs and on each flow's first data of an epoch), read by sock_ops to pace
// senders on this node toward it: ingress shaped at the source instead of policed. LRU, 64k
// sockets; entries older than PS_PEER_TTL_NS are ignored. Pinned.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ps_peer_key);
	__type(value, struct ps_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ps_peers SEC(".maps");

#define PS_PEER_TTL_NS (1000ULL * 1000 * 1000)

// Length of a measurement epoch. Long enough to see a packet of every flow at the lowest
// per-flow share worth pacing, short enough that an idle flow's share returns within ~2 epochs.
#define PS_EPOCH_NS (50ULL * 1000 * 1000)
#define PS_NSEC 1000000000ULL
// Bytes in an epoch from which its measurement is taken at full weight (256 full packets).
#define PS_EPOCH_FULL (256ULL * 1514)
// Time over which the controller repays the bucket's debt.
#define PS_REPAY_NS (500ULL * 1000 * 1000)

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

#define PS_GAIN_ONE 1024

// The flows counted as active: the most seen in one epoch of the window.
static __always_inline __u32 ps_flows_active(const struct ps_dir_state *d)
{
	__u32 n = 0;

	for (int i = 0; i < PS_FLOW_EPOCHS; i++)
		if (d->flows[i] > n)
			n = d->flows[i];
	return n;
}

// Whether this epoch saw more flows than any other epoch of the window: flows joined.
static __always_inline int ps_flows_joined(const struct ps_dir_state *d)
{
	__u32 cur = d->flows[d->epoch % PS_FLOW_EPOCHS];

	for (int i = 0; i < PS_FLOW_EPOCHS; i++)
		if (i != d->epoch % PS_FLOW_EPOCHS && d->flows[i] >= cur)
			return 0;
	return 1;
}

// share = rate x gain / flows, flows being ps_flows_active(), at most
// 1.25x the limit for one flow (senders that pace below their cap, like bbr in its drain
// phases, still fill the limit; the feedback keeps the aggregate at it). Caller holds the lock.
static __always_inline void ps_set_share(struct ps_dir_state *d, __u64 rate)
{
	__u64 n = ps_flows_active(d);
	__u64 gain = d->gain ? d->gain : PS_GAIN_ONE;
	__u64 share;

	if (!n)
		n = 1;
	// rate < 2^47 (1 Pbit/s) and gain < 2^22: no overflow.
	share = rate * gain / PS_GAIN_ONE / n;
	if (share > rate + rate / 4)
		share = rate + rate / 4;
	d->share = share ? share : 1;
}

// Rolls the epoch of one direction if it is over and feeds the controller: the gain is scaled
// by target/measured, so flows that cannot use their share (idle or application-limited) leave
// it to the others, and overshoot (late pacing timers catch up) is pulled back. The target is
// the limit less what repays the bucket's debt within PS_REPAY_NS (at most a quarter of the
// limit): aiming at the limit alone would leave a start-up burst's debt in place for good,
// and the backstop would then fire on every later burst. Caller holds the lock.
static __always_inline void ps_roll_epoch(struct ps_dir_state *d, __u64 rate, __u64 now)
{
	__u64 elapsed = now - d->epoch_start_ns;
	__u64 measured, gain, max, n, target = rate;

	// Signed: `now` may lag the epoch start set by another CPU.
	if ((__s64)elapsed < (__s64)PS_EPOCH_NS)
		return;
	measured = d->epoch_bytes * PS_NSEC / elapsed;
	gain = d->gain ? d->gain : PS_GAIN_ONE;
	if (elapsed > 4 * PS_EPOCH_NS || !measured) {
		// The cgroup was quiet: restart from the equal split and forget the flows.
		gain = PS_GAIN_ONE;
		__builtin_memset(d->flows, 0, sizeof(d->flows));
	} else {
		// Q16; rate < 2^47, so target << 16 cannot overflow.
		__u64 factor, weight;

		if (d->tokens < 0) {
			__u64 repay = (__u64)-d->tokens * (PS_NSEC / PS_REPAY_NS);

			target -= repay < rate / 4 ? repay : rate / 4;
		}
		factor = (target << 16) / measured;
		if (factor > 2 << 16)
			factor = 2 << 16;
		// Flows that joined in this epoch sent their initial windows unpaced: that excess
		// says nothing about the share, and cutting it would starve the paced flows.
		if (factor < 1 << 16 && ps_flows_joined(d))
			factor = 1 << 16;
		// Take the whole correction when the epoch saw PS_EPOCH_FULL bytes, less (down to a
		// quarter) when it saw fewer: at low rates one epoch holds a few dozen packets
		// whose count jumps with the flows' phases, and a full step turns that noise into a
		// limit cycle. At high rates the count is exact and overshoot must go at once.
		weight = (d->epoch_bytes << 16) / PS_EPOCH_FULL;
		if (weight < 1 << 14)
			weight = 1 << 14;
		// Below the equal split (a start-up burst or unpaced packets pushed it there) the
		// way back up is taken at full weight: that is where paced flows belong.
		if (weight > 1 << 16 || (factor > 1 << 16 && gain < PS_GAIN_ONE))
			weight = 1 << 16;
		if (factor >= 1 << 16)
			factor = (1 << 16) + ((factor - (1 << 16)) * weight >> 16);
		else
			factor = (1 << 16) - (((1 << 16) - factor) * weight >> 16);
		// At most x1.25 up per epoch.
		if (factor > 5 << 14)
			factor = 5 << 14;
		gain = (gain * factor + (1 << 15)) >> 16;
	}
	n = ps_flows_active(d);
	max = PS_GAIN_ONE * (n ? n : 1);
	max += max / 4;
	if (gain > max)
		gain = max;
	if (gain < PS_GAIN_ONE / 4)
		gain = PS_GAIN_ONE / 4;
	d->gain = gain;
	d->measured = measured;
	d->epoch_bytes = 0;
	d->epoch_start_ns = now;
	d->epoch++;
	d->flows[d->epoch % PS_FLOW_EPOCHS] = 0;
	ps_set_share(d, rate);
}

#endif
