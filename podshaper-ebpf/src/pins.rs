//! Every bpffs path podshaper uses, in one place. Layout under the root (default
//! /sys/fs/bpf/podshaper):
//!
//! ```text
//! v4/maps/{ps_cgroups,ps_stats,ps_flows,ps_node,   maps, pinned by name by the loader
//!         ps_peers,ps_classes,ps_rules}
//! v4/links/<cgroup id>/{sockops,egress,ingress}   one bpf_link per hook per limited cgroup
//! v4/node                                        sock_ops on the node's cgroup root (sender
//!                                                pacing), unless --no-peer-pacing
//! ```
//!
//! `v4` is the ABI version: a daemon adopts pins of its own version, migrates older ones
//! (`Datapath::load`) and refuses newer ones.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{abi::ABI_VERSION, Error};

/// Where bpffs is mounted by convention (systemd, Kubernetes nodes): the one place podshaper
/// mounts it when it is missing.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Default bpffs directory of podshaper.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/podshaper";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The hooks attached to every limited cgroup, by pin name.
pub const LINKS: [&str; 3] = ["sockops", "egress", "ingress"];

/// Paths of one pinned-state tree.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
    version: u32,
}

impl Pins {
    /// Pins rooted at `root` (a directory on bpffs, created on demand).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            version: ABI_VERSION,
        }
    }

    /// The tree another ABI version keeps under the same root: what a migration reads.
    pub fn of_version(&self, version: u32) -> Self {
        Self {
            root: self.root.clone(),
            version,
        }
    }

    /// The ABI version of this tree.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of this ABI version's state.
    pub fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{}", self.version))
    }

    /// Directory of the pinned maps.
    pub fn maps(&self) -> PathBuf {
        self.versioned().join("maps")
    }

    /// Directory holding one sub-directory of links per limited cgroup.
    pub fn links(&self) -> PathBuf {
        self.versioned().join("links")
    }

    /// The node-level link that paces this node's senders at their receivers' rates.
    pub fn node_link(&self) -> PathBuf {
        self.versioned().join("node")
    }

    /// Directory of one cgroup's links.
    pub fn cgroup_links(&self, id: u64) -> PathBuf {
        self.links().join(id.to_string())
    }

    /// Staging directory for a cgroup's links while they are attached (bpffs refuses names
    /// with a dot, hence no dot-file).
    pub fn staging(&self, id: u64) -> PathBuf {
        self.links().join(format!("new-{id}"))
    }

    /// Makes sure the root is on bpffs and the directories exist. bpffs is mounted only at
    /// its standard place, /sys/fs/bpf, for a root under it (a host or container without
    /// one); anywhere else, mounting would hide whatever the directory held, so a root
    /// outside bpffs is refused. Returns the older ABI versions pinned beside, oldest first,
    /// for the caller to migrate; refuses state pinned by a newer version.
    pub fn prepare(&self) -> Result<Vec<u32>, Error> {
        let root = std::path::absolute(&self.root).map_err(|source| io_err("resolve", &self.root, source))?;
        // The deepest directory that exists tells the file system the root will be made on
        // (a container may have bpffs mounted at the root itself, and no right to mount).
        let on_bpffs = |root: &Path| root.ancestors().find(|p| p.is_dir()).is_some_and(is_bpffs);
        if !on_bpffs(&root) {
            let standard = Path::new(BPFFS_MOUNT);
            if root.starts_with(standard) {
                ensure_bpffs(standard)?;
            }
            if !on_bpffs(&root) {
                return Err(Error::NotBpffs(self.root.clone()));
            }
        }
        mkdir(&self.root)?;
        let mut older = Vec::new();
        for e in fs::read_dir(&self.root).map_err(|source| io_err("read", &self.root, source))? {
            let e = e.map_err(|source| io_err("read", &self.root, source))?;
            let name = e.file_name().to_string_lossy().into_owned();
            match name.strip_prefix('v').and_then(|v| v.parse::<u32>().ok()) {
                Some(v) if v > self.version => {
                    return Err(Error::ForeignPins {
                        path: e.path(),
                        found: v,
                        ours: self.version,
                    });
                }
                Some(v) if v < self.version => older.push(v),
                _ => {}
            }
        }
        older.sort_unstable();
        mkdir(&self.maps())?;
        mkdir(&self.links())?;
        // Links staged by a daemon that died mid-attach: unpinning them detaches them.
        let links = self.links();
        for e in fs::read_dir(&links)
            .map_err(|source| io_err("read", &links, source))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("new-") {
                remove_tree(&e.path())?;
            }
        }
        Ok(older)
    }

    /// Ids of the cgroups that have pinned links.
    pub fn pinned_cgroups(&self) -> Result<Vec<u64>, Error> {
        let dir = self.links();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io_err("read", &dir, source)),
        };
        let mut ids: Vec<u64> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

fn io_err(verb: &str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        what: format!("{verb} {}", path.display()),
        source,
    }
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| io_err("create", path, source))
}

/// Whether `path` is on bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs_type(path) == Some(BPF_FS_MAGIC)
}

fn statfs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Mounts bpffs at `dir` unless a bpffs is already there.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    if is_bpffs(dir) {
        return Ok(());
    }
    mkdir(dir)?;
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::Io {
        what: format!("mount bpffs at {}", dir.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io_err("mount bpffs at", dir, io::Error::last_os_error()));
    }
    Ok(())
}

/// Removes a pin or a tree of pins (a no-op if absent). Unpinning the last reference to a link
/// detaches it.
pub fn remove_tree(path: &Path) -> Result<(), Error> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_err("remove", path, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `--bpffs /var/lib/x/pins` once mounted bpffs over /var/lib/x, hiding what it held.
    #[test]
    fn a_root_outside_bpffs_is_refused_and_nothing_is_mounted() {
        let dir = std::env::temp_dir().join(format!("podshaper-not-bpffs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("kept"), "x").unwrap();
        let root = dir.join("pins");
        let err = Pins::new(&root).prepare().unwrap_err();
        assert!(matches!(&err, Error::NotBpffs(p) if *p == root), "{err:?}");
        assert!(err.to_string().contains("not on bpffs"), "{err}");
        assert!(!is_bpffs(&dir), "bpffs was mounted at {}", dir.display());
        assert!(dir.join("kept").exists(), "{} was hidden", dir.display());
        assert!(!root.exists(), "{} was created", root.display());
        fs::remove_dir_all(&dir).unwrap();
        // A relative root is taken from the working directory (the crate's, not bpffs).
        let err = Pins::new("podshaper-relative-pins").prepare().unwrap_err();
        assert!(matches!(&err, Error::NotBpffs(_)), "{err:?}");
        assert!(!Path::new("podshaper-relative-pins").exists());
    }
}
