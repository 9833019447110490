// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// A third party on the path, for the tests: on the receiver's side of the link, for each pure
// ACK (IPv4) that carries podshaper's rate option, it first sends a copy whose ACK number is
// TP_ACK_SHIFT ahead, beyond anything the sender has sent, option kept; then it lets the real
// ACK go with the option turned into NOPs. A sender's node that trusted options outside
// snd_una..snd_nxt would take the copy's rate; one that checks takes none.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "rate_option.h"

// How far the copy's ACK number is moved: a quarter of the sequence space, never in a window.
#define TP_ACK_SHIFT (1u << 30)
// skb->mark of the copy while it is sent, so that this program, run again on it, lets it pass.
#define TP_MARK 0x70737470
// The ACK flag alone: a pure ACK (with no payload, checked apart).
#define TP_FLAGS_ACK 0x10
// Offsets in the TCP header: flags byte, ACK number, checksum.
#define TP_TCP_FLAGS 13
#define TP_TCP_ACK 8
#define TP_TCP_CSUM 16
// Most option bytes a TCP header can carry (a data offset of 15 words).
#define TP_MAX_OPT_BYTES 40
#define TP_NOPS 0x01010101

// tp_counts[0]: copies sent outside the window; [1]: real ACKs whose option was turned into
// NOPs. Written by third_party, read by the test to see that the third party was at work.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} tp_counts SEC(".maps");

// Offset in the packet of our rate option in the options from `off` to `end`, or 0.
static __always_inline __u32 find_option(struct __sk_buff *skb, __u32 off, __u32 end)
{
	__u8 head[4];

	for (int i = 0; i < TP_MAX_OPT_BYTES; i++) {
		if (off + 1 > end || bpf_skb_load_bytes(skb, off, head, 1))
			return 0;
		if (head[0] == 0) // end of options
			return 0;
		if (head[0] == 1) { // NOP
			off++;
			continue;
		}
		if (off + 2 > end || bpf_skb_load_bytes(skb, off, head, 2) || head[1] < 2)
			return 0;
		if (head[0] == PS_OPT_KIND && head[1] == PS_OPT_LEN && off + PS_OPT_LEN <= end &&
		    !bpf_skb_load_bytes(skb, off, head, 4) &&
		    ((__u32)head[2] << 8 | head[3]) == PS_OPT_EXID)
			return off;
		off += head[1];
	}
	return 0;
}

static __always_inline int replace_word(struct __sk_buff *skb, __u32 l4, __u32 off, __be32 from,
                                        __be32 to)
{
	if (bpf_l4_csum_replace(skb, l4 + TP_TCP_CSUM, from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

static __always_inline void count(__u32 i)
{
	__u64 *n = bpf_map_lookup_elem(&tp_counts, &i);

	if (n)
		__sync_fetch_and_add(n, 1);
}

// Hook: tc egress (clsact or tcx) of the receiver's interface. Always lets packets pass.
SEC("classifier")
int third_party(struct __sk_buff *skb)
{
	__be32 ack, moved, opt[2];
	__u32 l4, end, off, mark;
	struct iphdr ip;
	__u8 doff_flags[2];

	if (skb->mark == TP_MARK || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP ||
	    ip.ihl < 5)
		return TC_ACT_OK;
	l4 = ETH_HLEN + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, l4 + TP_TCP_FLAGS - 1, doff_flags, 2) ||
	    doff_flags[1] != TP_FLAGS_ACK)
		return TC_ACT_OK;
	end = l4 + (doff_flags[0] >> 4) * 4;
	if (ETH_HLEN + bpf_ntohs(ip.tot_len) != end) // it carries data
		return TC_ACT_OK;
	off = find_option(skb, l4 + sizeof(struct tcphdr), end);
	// The checksum is patched a 32-bit word at a time: the option must start on one (it does,
	// after the kernel's own options, which are padded to words).
	if (!off || (off - l4) % 4)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, l4 + TP_TCP_ACK, &ack, sizeof(ack)) ||
	    bpf_skb_load_bytes(skb, off, opt, sizeof(opt)))
		return TC_ACT_OK;

	moved = bpf_htonl(bpf_ntohl(ack) + TP_ACK_SHIFT);
	// Any rewrite that fails half-way (checksum patched, bytes not) drops the packet: better
	// lost than wrong.
	if (replace_word(skb, l4, l4 + TP_TCP_ACK, ack, moved))
		return TC_ACT_SHOT;
	mark = skb->mark;
	skb->mark = TP_MARK;
	if (!bpf_clone_redirect(skb, skb->ifindex, 0))
		count(0);
	skb->mark = mark;
	if (replace_word(skb, l4, l4 + TP_TCP_ACK, moved, ack) ||
	    replace_word(skb, l4, off, opt[0], TP_NOPS) ||
	    replace_word(skb, l4, off + 4, opt[1], TP_NOPS))
		return TC_ACT_SHOT;
	count(1);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
