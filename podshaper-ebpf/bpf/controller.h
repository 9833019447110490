// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// The shaping arithmetic of one direction of a cgroup: token bucket, flow count, per-flow
// share and its feedback controller, and the verdict by debt. Pure functions of struct
// ps_dir_state and the clock, no BPF helper: the programs include it through maps.h, and
// build.rs compiles it for the host too (controller_host.c), where src/controller.rs tests
// it with scripted epochs. Callers hold the cgroup's lock unless a function says otherwise.
#ifndef PODSHAPER_CONTROLLER_H
#define PODSHAPER_CONTROLLER_H

#include "podshaper.h"

// A full packet at MTU 1500, as the bucket counts packets (Ethernet frame without FCS).
#define PS_FULL_PACKET 1514
// A TCP initial window: ten full segments (RFC 6928, the kernel's default).
#define PS_IW_BYTES (10 * PS_FULL_PACKET)
// The bucket's cap: 5 ms at the limit (rate / 200), at least 3 full packets, and 2 per active
// flow.
#define PS_BUCKET_PER_SEC 200
#define PS_BUCKET_MIN_PACKETS 3
#define PS_BUCKET_PACKETS_PER_FLOW 2
// The depth (debt where TCP is signalled, and UDP dropped; twice it, TCP dropped): 20 ms at
// the limit (rate / 50), at least 64 KB, plus initial windows up to half a second.
#define PS_DEPTH_PER_SEC 50
#define PS_DEPTH_MIN (64 * 1024)
#define PS_IW_ALLOWANCE_PER_SEC 2
// Fixed point of the controller's factors: 1 << 16 is x1.
#define PS_Q16_ONE (1U << 16)
// Least weight a thin epoch's correction gets: a quarter.
#define PS_WEIGHT_MIN (PS_Q16_ONE / 4)
// Most the gain may grow in one epoch: x1.25.
#define PS_STEP_UP_MAX (PS_Q16_ONE + PS_Q16_ONE / 4)
// At most 1.25x the limit, for one flow's share and for the aggregate gain.
#define PS_SHARE_MAX(rate) ((rate) + (rate) / 4)

// Epochs (of PS_EPOCH_NS, 50 ms: 150-200 ms) a flow's sender has, from the first rate option,
// to pace at it: its initial window and what it sent before that ACK arrived may still meet
// the policer.
#define PS_UNPACED_EPOCHS 4
// ps_flow.opt_since of a flow already counted as unpaced.
#define PS_OPT_SINCE_COUNTED 0xffffffffU

// Verdict bits of cgroup_skb programs: bit 0 passes the packet, bit 1 asks for congestion
// notification (egress only, kernel 5.3, 5cf1e914: a local TCP sender enters CWR; a UDP sender
// sees ENOBUFS on drop).
#define PS_VERDICT_PASS 1
#define PS_VERDICT_CN 2
#define PS_DROP 0
#define PS_PASS PS_VERDICT_PASS
#define PS_DROP_CN PS_VERDICT_CN
#define PS_PASS_CN (PS_VERDICT_PASS | PS_VERDICT_CN)

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

// Length of a measurement epoch. Long enough to see a packet of every flow at the lowest
// per-flow share worth pacing, short enough that an idle flow's share returns within ~2 epochs.
#define PS_EPOCH_NS (50ULL * 1000 * 1000)
#define PS_NSEC 1000000000ULL
// Bytes in an epoch from which its measurement is taken at full weight (256 full packets).
#define PS_EPOCH_FULL (256ULL * PS_FULL_PACKET)
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

// The gain's unit (Q10): 1024 is the equal split.
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
	if (share > PS_SHARE_MAX(rate))
		share = PS_SHARE_MAX(rate);
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
		if (factor > 2 * PS_Q16_ONE)
			factor = 2 * PS_Q16_ONE;
		// Flows that joined in this epoch sent their initial windows unpaced: that excess
		// says nothing about the share, and cutting it would starve the paced flows.
		if (factor < PS_Q16_ONE && ps_flows_joined(d))
			factor = PS_Q16_ONE;
		// Take the whole correction when the epoch saw PS_EPOCH_FULL bytes, less (down to a
		// quarter) when it saw fewer: at low rates one epoch holds a few dozen packets
		// whose count jumps with the flows' phases, and a full step turns that noise into a
		// limit cycle. At high rates the count is exact and overshoot must go at once.
		weight = (d->epoch_bytes << 16) / PS_EPOCH_FULL;
		if (weight < PS_WEIGHT_MIN)
			weight = PS_WEIGHT_MIN;
		// Below the equal split (a start-up burst or unpaced packets pushed it there) the
		// way back up is taken at full weight: that is where paced flows belong.
		if (weight > PS_Q16_ONE || (factor > PS_Q16_ONE && gain < PS_GAIN_ONE))
			weight = PS_Q16_ONE;
#ifdef PS_HOST_UNDAMPED
		// Host tests only: the controller without damping, to show the limit cycle it
		// avoids.
		weight = PS_Q16_ONE;
#endif
		if (factor >= PS_Q16_ONE)
			factor = PS_Q16_ONE + ((factor - PS_Q16_ONE) * weight >> 16);
		else
			factor = PS_Q16_ONE - ((PS_Q16_ONE - factor) * weight >> 16);
		if (factor > PS_STEP_UP_MAX)
			factor = PS_STEP_UP_MAX;
		gain = (gain * factor + PS_Q16_ONE / 2) >> 16;
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

static __always_inline __u64 ps_max(__u64 a, __u64 b)
{
	return a > b ? a : b;
}

static __always_inline __u64 ps_min(__u64 a, __u64 b)
{
	return a < b ? a : b;
}

// Debt past which TCP is signalled (egress CN) and UDP dropped; twice it, TCP dropped. 20 ms
// at the limit, at least 64 KB, plus every active flow's initial window up to half a second of
// the limit: the kernel does not pace a flow's first ten segments, so flows that start
// together arrive as one burst. Signalling or dropping that would only slow or repeat it; the
// controller repays the debt.
static __always_inline __u64 ps_depth(const struct ps_dir_state *d, __u64 rate)
{
	return ps_max(rate / PS_DEPTH_PER_SEC, PS_DEPTH_MIN) +
	       ps_min((__u64)PS_IW_BYTES * ps_flows_active(d), rate / PS_IW_ALLOWANCE_PER_SEC);
}

// The bucket's cap before the flows are known: 5 ms at the limit, at least 3 full packets.
// Needs no lock.
static __always_inline __u64 ps_bucket_base(__u64 rate)
{
	return ps_max(rate / PS_BUCKET_PER_SEC, PS_BUCKET_MIN_PACKETS * PS_FULL_PACKET);
}

// The bucket's cap: at least two packets per active flow, so that flows whose packets arrive
// together (timers firing at once) are not starved.
static __always_inline __u64 ps_bucket_cap(const struct ps_dir_state *d, __u64 rate)
{
	return ps_max(ps_bucket_base(rate),
	              PS_BUCKET_PACKETS_PER_FLOW * PS_FULL_PACKET * (__u64)ps_flows_active(d));
}

// New limits: both directions' controllers restart at the equal split and the bucket refills
// to ps_bucket_base() at the next packet (ps_refill). The flow window is kept.
static __always_inline void ps_restart(struct ps_dir_state *d)
{
	d->share = 0;
	d->gain = 0;
	d->refill_ns = 0;
}

// Adds the tokens earned since the last refill (an idle second at most) and caps the bucket.
// A direction that never refilled, or restarted, starts full at ps_bucket_base().
static __always_inline void ps_refill(struct ps_dir_state *d, __u64 rate, __u64 now)
{
	__u64 elapsed, cap;

	if (!d->refill_ns) {
		d->tokens = ps_bucket_base(rate);
		d->refill_ns = now;
		d->epoch_start_ns = now;
		d->epoch_bytes = 0;
	}
	cap = ps_bucket_cap(d, rate);
	// `now` may be older than the last refill: another CPU read a later clock first.
	if ((__s64)(now - d->refill_ns) > 0) {
		elapsed = now - d->refill_ns;
		if (elapsed > PS_NSEC)
			elapsed = PS_NSEC;
		d->tokens += ps_bytes_in(rate, elapsed);
		d->refill_ns = now;
	}
	if (d->tokens > (__s64)cap)
		d->tokens = cap;
}

// A flow's first data in this epoch (or an ingress SYN): it counts as active, and a flow
// beyond the window's count shrinks everyone's share at once. The epoch controller hands
// unused share back later.
static __always_inline void ps_flow_joins(struct ps_dir_state *d, __u64 rate)
{
	__u32 n = ps_flows_active(d);

	if (++d->flows[d->epoch % PS_FLOW_EPOCHS] > n)
		ps_set_share(d, rate);
}

// Ingress brake: in debt with a gain above the equal split, the flows are using what idle
// flows left them all at once. Back to the equal split now rather than at the epoch's end,
// so senders re-pace at their next ACK before the policer drops whole GRO packets (dozens of
// segments each). Egress needs none: CN signals the sender without a loss. Returns whether it
// fired.
static __always_inline int ps_brake(struct ps_dir_state *d, __u64 rate)
{
	if (d->tokens >= 0 || d->gain <= PS_GAIN_ONE)
		return 0;
	d->gain = PS_GAIN_ONE;
	ps_set_share(d, rate);
	return 1;
}

// What the bucket's debt means for a packet (see "thresholds" in docs/how-it-works.md):
// non-TCP passes down to the depth and is dropped past it; TCP passes, egress with CN past the
// depth and dropped with CN past twice it, ingress dropped past twice it. `*mark`: an
// ECN-capable ingress TCP packet while in debt gets CE.
static __always_inline int ps_judge(__s64 tokens, __u64 depth, int tcp, int dir, int ect, int *mark)
{
	*mark = 0;
	if (!tcp)
		return tokens <= -(__s64)depth ? (dir == PS_EGRESS ? PS_DROP_CN : PS_DROP)
		                               : PS_PASS;
	if (dir == PS_EGRESS) {
		if (tokens <= -(__s64)(2 * depth))
			return PS_DROP_CN;
		return tokens <= -(__s64)depth ? PS_PASS_CN : PS_PASS;
	}
	if (tokens <= -(__s64)(2 * depth))
		return PS_DROP;
	*mark = tokens <= 0 && (ect == 1 || ect == 2);
	return PS_PASS;
}

// For an ingress TCP packet the policer drops: whether its flow now counts as unpaced, i.e.
// its first rate option went out at least PS_UNPACED_EPOCHS ago (a paced sender is not dropped
// after that) and it was not counted before. `*opt_since` is ps_flow.opt_since; `epoch` the
// direction's current epoch. Marks the flow counted. A `since` ahead of the epoch means the
// cgroup's state restarted (limit lifted and set again): the grace starts over.
static __always_inline int ps_flow_unpaced(__u32 *opt_since, __u32 epoch)
{
	__u32 since = *opt_since, age = epoch + 1 - since;

	if (!since || since == PS_OPT_SINCE_COUNTED)
		return 0;
	if (age >= 0x80000000U) {
		*opt_since = epoch + 1;
		return 0;
	}
	if (age < PS_UNPACED_EPOCHS)
		return 0;
	*opt_since = PS_OPT_SINCE_COUNTED;
	return 1;
}

#endif
