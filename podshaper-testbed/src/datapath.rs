//! A podshaper datapath loaded against a private bpffs directory, for tests and benches that
//! must not touch the node's real state. Everything it pinned is removed on drop.
use std::{
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use podshaper_ebpf::{pins::Pins, Datapath};

use crate::{unique_name, Error};

/// Parent of the private pin directories (the usual bpffs mount).
pub const BPFFS: &str = "/sys/fs/bpf";

/// A [`Datapath`] pinned under `/sys/fs/bpf/<label>-ps<pid>-<n>`; `reset` on drop detaches
/// every link and unpins the maps.
pub struct TempDatapath {
    datapath: Datapath,
    root: PathBuf,
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
        match Datapath::load(pins, podshaper_ebpf::cgroup::cgroup2_mount()?) {
            Ok(datapath) => Ok(Self { datapath, root }),
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
