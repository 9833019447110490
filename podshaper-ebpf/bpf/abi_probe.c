// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Copyright (c) 2026 The podshaper authors
//
// Host program run by build.rs: prints the C layout of podshaper.h as Rust constants, which
// src/abi.rs tests compare with the #[repr(C)] mirrors.
#include <stddef.h>
#include <stdio.h>
#include <linux/bpf.h>
#include "podshaper.h"
#include "controller.h"

#define SIZE(t) printf("pub const SIZE_%s: usize = %zu;\n", #t, sizeof(struct t))
#define OFF(t, f, n) printf("pub const OFF_%s_%s: usize = %zu;\n", #t, n, offsetof(struct t, f))

int main(void)
{
	printf("pub const ABI_VERSION: u32 = %d;\n", PS_ABI_VERSION);
	SIZE(ps_config);
	SIZE(ps_dir_state);
	SIZE(ps_cgroup);
	SIZE(ps_stats);
	SIZE(ps_flow);
	SIZE(ps_node_stats);
	SIZE(ps_peers);
	SIZE(ps_peer_key);
	SIZE(ps_class_key);
	SIZE(ps_rule);
	printf("pub const MAX_RULES: usize = %d;\n", PS_MAX_RULES);
	printf("pub const EPOCH_NS: u64 = %llu;\n", PS_EPOCH_NS);
	printf("pub const PEER_V6: u32 = %u;\n", PS_PEER_V6);
	printf("pub const MAX_PEER_PREFIXES: usize = %d;\n", PS_MAX_PEER_PREFIXES);
	printf("pub const MAX_CLASSES: usize = %d;\n", PS_MAX_CLASSES);
	printf("pub const MAX_RULE_IDS: usize = %d;\n", PS_MAX_RULE_IDS);
	printf("pub const RULE_NAME_LEN: usize = %d;\n", PS_RULE_NAME_LEN);
	OFF(ps_cgroup, peers, "peers");
	OFF(ps_flow, rule_epoch, "rule_epoch");
	OFF(ps_rule, name, "name");
	OFF(ps_flow, remote, "remote");
	OFF(ps_flow, opt_pending, "opt_pending");
	OFF(ps_node_stats, opt_outside, "opt_outside");
	OFF(ps_config, generation, "generation");
	OFF(ps_dir_state, share, "share");
	OFF(ps_dir_state, epoch, "epoch");
	OFF(ps_cgroup, config, "config");
	OFF(ps_cgroup, dir, "dir");
	OFF(ps_stats, marks, "marks");
	OFF(ps_stats, adjusts, "adjusts");
	OFF(ps_stats, unpaced_flows, "unpaced_flows");
	return 0;
}
