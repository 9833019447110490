//! What the datapath needs of the kernel, probed rather than read off the version number:
//! distro kernels backport features and leave others out. The daemon probes before it loads
//! anything and refuses to start with a message naming what is missing. The table in
//! docs/kernel-requirements.md lists the same features.
use std::os::fd::{FromRawFd, OwnedFd};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::{sys, Error};

/// One kernel feature the datapath uses.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// What it is, as the kernel names it.
    pub name: &'static str,
    /// The mainline release that brought it.
    pub since: &'static str,
    check: Check,
}

#[derive(Clone, Copy, Debug)]
enum Check {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Cgroup storage keyed by the cgroup id alone, one value for all attach types.
    SharedCgroupStorage,
    /// `BPF_LINK_CREATE`, which cgroup programs attach with (links are what is pinned).
    LinkCreate,
}

const fn program(name: &'static str, since: &'static str, t: ProgramType) -> Feature {
    Feature {
        name,
        since,
        check: Check::Program(t),
    }
}

const fn map(name: &'static str, since: &'static str, t: MapType) -> Feature {
    Feature {
        name,
        since,
        check: Check::Map(t),
    }
}

const fn helper(name: &'static str, since: &'static str, t: ProgramType, h: BpfHelper) -> Feature {
    Feature {
        name,
        since,
        check: Check::Helper(t, h),
    }
}

/// Everything sock_ops.bpf.c and cgroup_skb.bpf.c use, in the order a kernel gained them.
pub const FEATURES: &[Feature] = &[
    map("map type per-CPU array", "4.6", MapType::PerCpuArray),
    program("program type cgroup_skb", "4.10", ProgramType::CgroupSkb),
    program("program type sock_ops", "4.13", ProgramType::SockOps),
    helper(
        "bpf_setsockopt in sock_ops",
        "4.13",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_setsockopt,
    ),
    helper(
        "bpf_sock_ops_cb_flags_set in sock_ops",
        "4.16",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
    ),
    map("map type cgroup storage", "4.19", MapType::CgroupStorage),
    map(
        "map type per-CPU cgroup storage",
        "4.20",
        MapType::PerCpuCgroupStorage,
    ),
    helper(
        "bpf_spin_lock in cgroup_skb",
        "5.1",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_spin_lock,
    ),
    helper(
        "bpf_sk_fullsock in cgroup_skb",
        "5.1",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_sk_fullsock,
    ),
    helper(
        "bpf_skb_ecn_set_ce in cgroup_skb",
        "5.1",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_skb_ecn_set_ce,
    ),
    map("map type socket storage", "5.2", MapType::SkStorage),
    helper(
        "bpf_sk_storage_get in cgroup_skb",
        "5.2",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_sk_storage_get,
    ),
    helper(
        "bpf_sk_storage_get in sock_ops",
        "5.3",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sk_storage_get,
    ),
    Feature {
        name: "bpf_link for cgroup programs (BPF_LINK_CREATE)",
        since: "5.7",
        check: Check::LinkCreate,
    },
    Feature {
        name: "shared cgroup storage (a u64 cgroup id key)",
        since: "5.9",
        check: Check::SharedCgroupStorage,
    },
    helper(
        "bpf_reserve_hdr_opt in sock_ops (TCP header options)",
        "5.10",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_reserve_hdr_opt,
    ),
    helper(
        "bpf_store_hdr_opt in sock_ops",
        "5.10",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_store_hdr_opt,
    ),
    helper(
        "bpf_load_hdr_opt in sock_ops",
        "5.10",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_load_hdr_opt,
    ),
];

/// Probes this kernel for every feature; the error names each one missing.
pub fn check() -> Result<(), Error> {
    check_with(probe)
}

/// [`check`] with the answers of `probe` (tests fake it).
pub fn check_with(probe: impl Fn(&Feature) -> Result<bool, String>) -> Result<(), Error> {
    let mut missing = Vec::new();
    for f in FEATURES {
        match probe(f) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{} (Linux {})", f.name, f.since)),
            Err(e) => return Err(Error::Kernel(format!("probe for {}: {e}", f.name))),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Err(Error::Kernel(format!(
        "this kernel ({}) lacks what podshaper needs: {}; see docs/kernel-requirements.md",
        release.trim(),
        missing.join(", ")
    )))
}

/// Asks the kernel whether it has `feature`, without loading or attaching anything that stays.
pub fn probe(feature: &Feature) -> Result<bool, String> {
    match feature.check {
        Check::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
        Check::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
        Check::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
        Check::SharedCgroupStorage => shared_cgroup_storage(),
        Check::LinkCreate => link_create(),
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_CGROUP_STORAGE: u32 = 19;

/// A cgroup storage map with an 8-byte key can be created only where the key may be the
/// cgroup id alone (5.9); older kernels take only `{cgroup id, attach type}`.
fn shared_cgroup_storage() -> Result<bool, String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_CGROUP_STORAGE,
        key_size: 8,
        value_size: 8,
        max_entries: 0,
        map_flags: 0,
    };
    // SAFETY: the attribute holds no pointers.
    match unsafe { sys::bpf(BPF_MAP_CREATE, &attr) } {
        Ok(fd) => {
            // SAFETY: the kernel just made this descriptor for us; dropping it closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(true)
        }
        Err(e) => refused(e),
    }
}

/// A failed probe syscall: no for EINVAL and the like, an error when the caller may not ask.
fn refused(e: std::io::Error) -> Result<bool, String> {
    match e.raw_os_error() {
        Some(libc::EPERM) => Err(format!("{e} (needs CAP_BPF)")),
        _ => Ok(false),
    }
}

/// A kernel that knows `BPF_LINK_CREATE` rejects a program fd of -1 with EBADF; one that does
/// not rejects the command itself with EINVAL. Nothing is created either way.
fn link_create() -> Result<bool, String> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: i32,
        target_fd: i32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreate {
        prog_fd: -1,
        target_fd: -1,
        attach_type: 0,
        flags: 0,
    };
    // SAFETY: the attribute holds no pointers.
    match unsafe { sys::bpf(BPF_LINK_CREATE, &attr) } {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Ok(fd) => {
            // SAFETY: as above; no kernel makes a link of fd -1, but one that did made it ours.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(true)
        }
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_every_missing_feature_and_its_release() {
        let err = check_with(|f| Ok(!f.name.contains("socket storage") && f.since != "5.9"))
            .expect_err("two features missing");
        let msg = err.to_string();
        assert!(msg.contains("map type socket storage (Linux 5.2)"), "{msg}");
        assert!(
            msg.contains("shared cgroup storage (a u64 cgroup id key) (Linux 5.9)"),
            "{msg}"
        );
        assert!(!msg.contains("sock_ops (Linux"), "{msg}");
        assert!(msg.contains("docs/kernel-requirements.md"), "{msg}");
        assert!(check_with(|_| Ok(true)).is_ok());
    }

    #[test]
    fn a_probe_that_cannot_answer_is_an_error_of_its_own() {
        let err = check_with(|f| {
            if f.name.contains("per-CPU array") {
                Err("Operation not permitted".into())
            } else {
                Ok(true)
            }
        })
        .expect_err("the probe failed");
        assert_eq!(
            err.to_string(),
            "probe for map type per-CPU array: Operation not permitted"
        );
    }
}
