//! Kernel run-time statistics of BPF programs: what a program costs per run, measured by the
//! kernel around each invocation (bpf_stats, kernel 5.1; BPF_ENABLE_STATS, 5.8).
use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    process::Command,
};

use serde::Deserialize;

use crate::{run, Error};

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Keeps run-time statistics enabled while alive. Holders are counted by the kernel, so
/// concurrent users (and `kernel.bpf_stats_enabled`) do not switch each other off.
#[derive(Debug)]
pub struct StatsEnabled {
    _fd: OwnedFd,
}

/// Enables run-time statistics of all BPF programs until the guard drops. Timing every run
/// costs a few ns per run, so enable it only to measure.
pub fn enable_stats() -> Result<StatsEnabled, Error> {
    #[repr(C)]
    struct EnableStatsAttr {
        kind: u32,
    }
    let attr = EnableStatsAttr {
        kind: BPF_STATS_RUN_TIME,
    };
    // SAFETY: attr is valid for the call and its size is passed; the kernel zero-extends it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStatsAttr,
            std::mem::size_of::<EnableStatsAttr>(),
        )
    };
    if fd < 0 {
        return Err(Error::Io {
            what: "enable BPF run-time statistics".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a successful BPF_ENABLE_STATS returns a new fd that nothing else owns.
    Ok(StatsEnabled {
        _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
    })
}

/// Statistics of one program attached to a cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Kernel program id.
    pub id: u32,
    /// Program name (16 characters at most).
    pub name: String,
    /// bpftool's attach type, e.g. `cgroup_inet_egress`, `sock_ops`.
    pub attach_type: String,
    /// Total time spent in the program since load, while stats were on.
    pub run_time_ns: u64,
    /// Number of runs counted in `run_time_ns`.
    pub run_cnt: u64,
}

impl ProgStats {
    /// Mean ns per run between an earlier snapshot and this one.
    pub fn ns_per_run_since(&self, before: &ProgStats) -> Option<f64> {
        let runs = self.run_cnt.checked_sub(before.run_cnt).filter(|&r| r > 0)?;
        let ns = self.run_time_ns.saturating_sub(before.run_time_ns);
        Some(ns as f64 / runs as f64)
    }
}

#[derive(Deserialize)]
struct CgroupEntry {
    id: u32,
    #[serde(default)]
    attach_type: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct ProgEntry {
    #[serde(default)]
    run_time_ns: u64,
    #[serde(default)]
    run_cnt: u64,
}

/// Statistics of the programs attached directly to a cgroup, read with bpftool.
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<ProgStats>, Error> {
    let out = run(Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup))?;
    // bpftool prints nothing at all for a cgroup without programs.
    let entries: Vec<CgroupEntry> = if out.trim().is_empty() {
        Vec::new()
    } else {
        parse(&out)?
    };
    entries
        .into_iter()
        .map(|e| {
            let out = run(Command::new("bpftool").args(["-j", "prog", "show", "id", &e.id.to_string()]))?;
            let p: ProgEntry = parse(&out)?;
            Ok(ProgStats {
                id: e.id,
                name: e.name,
                attach_type: e.attach_type,
                run_time_ns: p.run_time_ns,
                run_cnt: p.run_cnt,
            })
        })
        .collect()
}

fn parse<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, Error> {
    serde_json::from_str(json).map_err(|e| Error::Parse {
        what: "bpftool JSON".into(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_per_run_needs_new_runs() {
        let before = ProgStats {
            run_time_ns: 1_000,
            run_cnt: 10,
            ..Default::default()
        };
        let after = ProgStats {
            run_time_ns: 3_000,
            run_cnt: 50,
            ..Default::default()
        };
        assert_eq!(after.ns_per_run_since(&before), Some(50.0));
        assert_eq!(before.ns_per_run_since(&before), None);
    }

    #[test]
    fn parses_bpftool_output() {
        let cg: Vec<CgroupEntry> = parse(
            r#"[{"id":42,"attach_type":"cgroup_inet_egress","attach_flags":"multi","name":"ps_egress"}]"#,
        )
        .unwrap();
        assert_eq!((cg[0].id, cg[0].name.as_str()), (42, "ps_egress"));
        let p: ProgEntry = parse(r#"{"id":42,"type":"cgroup_skb","run_time_ns":1234,"run_cnt":7}"#).unwrap();
        assert_eq!((p.run_time_ns, p.run_cnt), (1234, 7));
    }
}
