//! sock_ops programs of the tests' own. The callback probe (bpf/cb_probe.bpf.c), standing in for
//! another tool's, asks for state callbacks on the connections it sees open and counts the
//! closes it is then told of: it checks that podshaper's programs add to a socket's callback
//! flags rather than replace them. The option forger (bpf/forge.bpf.c) writes rate options of
//! the test's choosing; the third party (bpf/third_party.bpf.c, on tc) moves them onto ACKs
//! outside the sender's window.
use std::{fs::File, os::fd::AsFd, path::Path};

use aya::{
    maps::Array,
    programs::{tc, CgroupAttachMode, SchedClassifier, SockOps, TcAttachType},
    Ebpf,
};

use crate::{Error, Netns};

static CB_PROBE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cb_probe.bpf.o"));

/// The probe, attached to one cgroup; detached when dropped.
pub struct CallbackProbe {
    ebpf: Ebpf,
}

fn bpf_err(what: String, e: impl std::fmt::Display) -> Error {
    Error::Io {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Loads the sock_ops program `name` of `ebpf` and attaches it to `cgroup` (a cgroup's programs
/// run before those of its ancestors). A bpf_link attach (what aya makes on this kernel) is
/// always multi: `Single` is the mode it takes. Detached when `ebpf` is dropped.
fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &Path) -> Result<(), Error> {
    let what = format!("attach {name} to {}", cgroup.display());
    let file = File::open(cgroup).map_err(|source| Error::Io {
        what: format!("open {}", cgroup.display()),
        source,
    })?;
    let prog: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or_else(|| bpf_err(what.clone(), format!("no program {name}")))?
        .try_into()
        .map_err(|e| bpf_err(what.clone(), e))?;
    prog.load().map_err(|e| bpf_err(what.clone(), e))?;
    prog.attach(file.as_fd(), CgroupAttachMode::Single)
        .map_err(|e| bpf_err(what, e))?;
    Ok(())
}

impl CallbackProbe {
    /// Loads the probe and attaches it to `cgroup`.
    pub fn attach(cgroup: &Path) -> Result<Self, Error> {
        let mut ebpf = Ebpf::load(CB_PROBE_OBJ).map_err(|e| bpf_err("load cb_probe.bpf.o".into(), e))?;
        attach(&mut ebpf, "cb_probe", cgroup)?;
        Ok(Self { ebpf })
    }

    /// Connections the probe was told closed.
    pub fn closes(&self) -> Result<u64, Error> {
        let map = self
            .ebpf
            .map("probe_closes")
            .ok_or_else(|| bpf_err("read probe_closes".into(), "no map"))?;
        let closes: Array<_, u64> =
            Array::try_from(map).map_err(|e| bpf_err("read probe_closes".into(), e))?;
        closes
            .get(&0, 0)
            .map_err(|e| bpf_err("read probe_closes".into(), e))
    }
}

static FORGE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forge.bpf.o"));

/// A forger of the rate option (bpf/forge.bpf.c): writes kind 253 with podshaper's ExID, of the
/// length and value the test chose, on the pure ACKs of a cgroup's sockets; detached when
/// dropped.
pub struct OptionForger {
    _ebpf: Ebpf,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ForgeCfg {
    len: u32,
    value: u32,
}

// SAFETY: two u32, no padding.
unsafe impl aya::Pod for ForgeCfg {}

impl OptionForger {
    /// Loads the forger, sets what it writes (`len` 4..8 bytes of option; `value`, the 32 bits
    /// after the ExID, of which `len - 4` bytes are written) and attaches it to `cgroup`.
    pub fn attach(cgroup: &Path, len: u32, value: u32) -> Result<Self, Error> {
        let mut ebpf = Ebpf::load(FORGE_OBJ).map_err(|e| bpf_err("load forge.bpf.o".into(), e))?;
        let mut cfg: Array<_, ForgeCfg> = Array::try_from(
            ebpf.map_mut("forge_cfg")
                .ok_or_else(|| bpf_err("set forge_cfg".into(), "no map"))?,
        )
        .map_err(|e| bpf_err("set forge_cfg".into(), e))?;
        cfg.set(0, ForgeCfg { len, value }, 0)
            .map_err(|e| bpf_err("set forge_cfg".into(), e))?;
        attach(&mut ebpf, "forge", cgroup)?;
        Ok(Self { _ebpf: ebpf })
    }
}

static THIRD_PARTY_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/third_party.bpf.o"));

/// A third party on the path (bpf/third_party.bpf.c): on an interface's egress, each pure ACK
/// carrying the rate option is preceded by a copy whose ACK number is 2^30 ahead (outside the
/// sender's window), option kept, and goes itself with the option turned into NOPs. A tcx link
/// (6.6 and later) goes when dropped; a clsact filter (before 6.6) stays until the interface
/// goes with its namespace, as the tests' do.
pub struct ThirdParty {
    ebpf: Ebpf,
}

impl ThirdParty {
    /// Loads the program and attaches it to the egress of `iface` in `ns`.
    pub fn attach(ns: &Netns, iface: &str) -> Result<Self, Error> {
        let what = format!("attach third_party to {iface} in {}", ns.name());
        let mut ebpf =
            Ebpf::load(THIRD_PARTY_OBJ).map_err(|e| bpf_err("load third_party.bpf.o".into(), e))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("third_party")
            .ok_or_else(|| bpf_err(what.clone(), "no program third_party"))?
            .try_into()
            .map_err(|e| bpf_err(what.clone(), e))?;
        prog.load().map_err(|e| bpf_err(what.clone(), e))?;
        // The interface's name and index are the namespace's: attach from a thread inside it.
        // The attachment (a tcx link, or a clsact filter before 6.6) stays with the interface.
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter()?;
                // Only netlink attachments (kernels before 6.6) need the qdisc; an existing
                // one is fine.
                let _ = tc::qdisc_add_clsact(iface);
                prog.attach(iface, TcAttachType::Egress)
                    .map_err(|e| bpf_err(what.clone(), e))
            })
            .join()
            .map_err(|_| bpf_err(what.clone(), "attach thread panicked"))?
        })?;
        Ok(Self { ebpf })
    }

    /// (Copies sent outside the window, real ACKs stripped of the option) so far.
    pub fn counts(&self) -> Result<(u64, u64), Error> {
        let map = self
            .ebpf
            .map("tp_counts")
            .ok_or_else(|| bpf_err("read tp_counts".into(), "no map"))?;
        let counts: Array<_, u64> = Array::try_from(map).map_err(|e| bpf_err("read tp_counts".into(), e))?;
        let get = |i| counts.get(&i, 0).map_err(|e| bpf_err("read tp_counts".into(), e));
        Ok((get(0)?, get(1)?))
    }
}
