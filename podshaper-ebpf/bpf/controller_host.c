// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// Host build of controller.h and rate_option.h for src/controller.rs's and
// src/rate_option.rs's tests: one exported wrapper per function,
// so the tests run the very arithmetic the BPF programs run. build.rs compiles it twice: as is
// (psh_*) and with PS_HOST_UNDAMPED (psh_undamped_*), the controller without its damping.
#include <linux/bpf.h>
#include "controller.h"
#include "rate_option.h"

#ifdef PS_HOST_UNDAMPED
#define PSH(name) psh_undamped_##name
#else
#define PSH(name) psh_##name
#endif

void PSH(roll_epoch)(struct ps_dir_state *d, __u64 rate, __u64 now)
{
	ps_roll_epoch(d, rate, now);
}

void PSH(refill)(struct ps_dir_state *d, __u64 rate, __u64 now)
{
	ps_refill(d, rate, now);
}

void PSH(flow_joins)(struct ps_dir_state *d, __u64 rate)
{
	ps_flow_joins(d, rate);
}

void PSH(restart)(struct ps_dir_state *d)
{
	ps_restart(d);
}

int PSH(brake)(struct ps_dir_state *d, __u64 rate)
{
	return ps_brake(d, rate);
}

__u64 PSH(depth)(const struct ps_dir_state *d, __u64 rate)
{
	return ps_depth(d, rate);
}

__u64 PSH(bucket_cap)(const struct ps_dir_state *d, __u64 rate)
{
	return ps_bucket_cap(d, rate);
}

int PSH(judge)(__s64 tokens, __u64 depth, int tcp, int dir, int ect, int *mark)
{
	return ps_judge(tokens, depth, tcp, dir, ect, mark);
}

int PSH(flow_unpaced)(__u32 *opt_since, __u32 epoch)
{
	return ps_flow_unpaced(opt_since, epoch);
}

__u32 PSH(opt_encode)(__u64 bytes_per_sec)
{
	return ps_opt_encode(bytes_per_sec);
}

__u32 PSH(opt_none)(void)
{
	return ps_opt_none();
}

int PSH(opt_decode)(__u32 value, __u64 *bytes_per_sec)
{
	return ps_opt_decode(value, bytes_per_sec);
}

int PSH(ack_in_window)(__u32 ack, __u32 snd_una, __u32 snd_nxt)
{
	return ps_ack_in_window(ack, snd_una, snd_nxt);
}
