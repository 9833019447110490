// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// The rate option: a receiver tells its peer's sender, on its pure ACKs, the per-flow rate it
// may send at. Pure functions, no BPF helper: sock_ops.bpf.c includes it, and build.rs
// compiles it for the host (controller_host.c), where src/rate_option.rs tests it. The format
// is specified in docs/rate-option.md:
//
//   kind 253 | length 8 | ExID 0x5053 (16 bits) | version (4 bits) | rate (28 bits)
//
// all in network order. The rate is L3 bits/s in units of 1 kbit/s (rounded up, at least 1);
// PS_OPT_NONE says "no limit any more". Kind 253 with a 16-bit ExID is RFC 6994's shared
// experimental option; 0x5053 ("PS") is not registered with IANA.
#ifndef PODSHAPER_RATE_OPTION_H
#define PODSHAPER_RATE_OPTION_H

#include <linux/types.h>

#define PS_OPT_KIND 253
#define PS_OPT_LEN 8
#define PS_OPT_EXID 0x5053
#define PS_OPT_VERSION 1
// Low 28 bits of the value: the rate; high 4: the version.
#define PS_OPT_RATE_MASK 0x0fffffffU
// "No limit": the receiver's limit was lifted; the sender stops pacing the flow now.
#define PS_OPT_NONE PS_OPT_RATE_MASK
// Highest rate the option carries: 268 Gbit/s per flow, far above SO_MAX_PACING_RATE's 34.
#define PS_OPT_RATE_MAX (PS_OPT_RATE_MASK - 1)
#define PS_OPT_UNIT_BITS 1000ULL

// How long a sender keeps a rate after the last option that carried it: every pure ACK of
// the receiver carries one, so only ACKs without room (SACK recovery), ACKs riding on data,
// or a receiver whose node lost podshaper leave it standing that long.
#define PS_REMOTE_TTL_NS (1000ULL * 1000 * 1000)
// "No limit" options a receiver sends after its limit is lifted; PS_REMOTE_TTL_NS covers the
// case where all of them are lost.
#define PS_OPT_LAPSE_ACKS 4

// What a received option says.
#define PS_OPT_BAD 0
#define PS_OPT_RATE 1
#define PS_OPT_LIFTED 2

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

// The option's 32-bit value (host order) for a per-flow rate in L3 bytes/s.
static __always_inline __u32 ps_opt_encode(__u64 bytes_per_sec)
{
	// bytes/s < 2^47 (1 Pbit/s): x8 does not overflow.
	__u64 kbit = (bytes_per_sec * 8 + PS_OPT_UNIT_BITS - 1) / PS_OPT_UNIT_BITS;

	if (!kbit)
		kbit = 1;
	if (kbit > PS_OPT_RATE_MAX)
		kbit = PS_OPT_RATE_MAX;
	return ((__u32)PS_OPT_VERSION << 28) | (__u32)kbit;
}

// The option's value "no limit".
static __always_inline __u32 ps_opt_none(void)
{
	return ((__u32)PS_OPT_VERSION << 28) | PS_OPT_NONE;
}

// Reads a received value (host order): PS_OPT_RATE with *bytes_per_sec set, PS_OPT_LIFTED,
// or PS_OPT_BAD (another version, or a zero rate).
static __always_inline int ps_opt_decode(__u32 value, __u64 *bytes_per_sec)
{
	__u32 rate = value & PS_OPT_RATE_MASK;

	if (value >> 28 != PS_OPT_VERSION || !rate)
		return PS_OPT_BAD;
	if (rate == PS_OPT_NONE)
		return PS_OPT_LIFTED;
	*bytes_per_sec = (__u64)rate * PS_OPT_UNIT_BITS / 8;
	return PS_OPT_RATE;
}

// Whether an ACK acknowledges this connection's data: snd_una <= ack <= snd_nxt, in sequence
// space. The option is parsed before tcp_ack() validates the ACK, so a segment outside that
// window (a third party's, an old duplicate) must change nothing.
static __always_inline int ps_ack_in_window(__u32 ack, __u32 snd_una, __u32 snd_nxt)
{
	return (__s32)(ack - snd_una) >= 0 && (__s32)(snd_nxt - ack) >= 0;
}

#endif
