//! A podshaper datapath loaded against a private bpffs directory and a cgroup subtree of its
//! own standing in for a node, for tests and benches that must not touch the node's real state.
//! Two of them are two nodes on one kernel: each node-level program sees only its subtree's
//! sockets. Everything it pinned is removed on drop.
use std::{
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use podshaper_ebpf::{pins::Pins, Datapath};

use crate::{unique_name, Cgroup, Error};

/// Parent of the private pin directories (the usual bpffs mount).
pub const BPFFS: &str = "/sys/fs/bpf";

/// A [`Datapath`] pinned under `/sys/fs/bpf/<label>-ps<pid>-<n>`, its node-level program on a
/// new cgroup (the "node"); `reset` on drop detaches every link and unpins the maps, then the
/// node's cgroup is removed (drop the pods made in it first).
pub struct TempDatapath {
    datapath: Datapath,
    root: PathBuf,
    node: Cgroup,
}

impl TempDatapath {
    /// Loads the programs with pins under a new private directory.
    pub fn load(label: &str) -> Result<Self, Error> {
        Self::load_version(label, podshaper_ebpf::abi::ABI_VERSION)
    }

    /// Loads the programs with pins under a new private directory, in the tree of ABI
    /// `version`: stands in for an older daemon's state in migration tests.
    pub fn load_version(label: &str, version: u32) -> Result<Self, Error> {
        let root = Path::new(BPFFS).join(format!("{label}-{}", unique_name("")));
        let pins = Pins::new(&root).of_version(version);
        let node = Cgroup::new(&format!("{label}-node"))?;
        match Datapath::load(pins, node.path().to_path_buf()) {
            Ok(datapath) => Ok(Self { datapath, root, node }),
            Err(e) => {
                // Load may have pinned maps before failing.
                let _ = podshaper_ebpf::reset(&root);
                Err(e.into())
            }
        }
    }

    /// The private pin directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node's cgroup: its node-level program sees the sockets of the cgroups below it.
    pub fn node(&self) -> &Cgroup {
        &self.node
    }

    /// A new cgroup on this node (a pod's).
    pub fn pod(&self, label: &str) -> Result<Cgroup, Error> {
        Cgroup::new_in(self.node.path(), label)
    }
}

impl Deref for TempDatapath {
    type Target = Datapath;

    fn deref(&self) -> &Datapath {
        &self.datapath
    }
}

impl DerefMut for TempDatapath {
    fn deref_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }
}

impl Drop for TempDatapath {
    fn drop(&mut self) {
        if let Err(e) = podshaper_ebpf::reset(&self.root) {
            tracing::warn!(root = %self.root.display(), error = %e, "leaked private bpffs pins");
        }
    }
}
