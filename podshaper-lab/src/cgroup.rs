//! Temporary cgroup v2 directories: created per test or bench case, emptied and removed on drop.
use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use podshaper_ebpf::cgroup::{self, CgroupDir};

use crate::{io_err, unique_name, Error};

/// How long drop waits for killed processes to leave the cgroup and for rmdir to succeed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// A child cgroup that exists for the life of this value. Drop kills what still runs in it
/// and removes the directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    mount: PathBuf,
    id: u64,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/ps<pid>-<n>-<label>`.
    pub fn new(label: &str) -> Result<Self, Error> {
        let mount = cgroup::cgroup2_mount()?;
        Self::create(&mount, mount.clone(), label)
    }

    /// Creates a child of `parent`, which must be a cgroup v2 directory.
    pub fn new_in(parent: &Path, label: &str) -> Result<Self, Error> {
        let mount = cgroup::cgroup2_mount()?;
        Self::create(parent, mount, label)
    }

    /// Creates the cgroup at exactly `path` (a pod's, where a kubelet would put it), with any
    /// missing parents. Drop removes the directory itself, not the parents.
    pub fn at(path: &Path) -> Result<Self, Error> {
        let mount = cgroup::cgroup2_mount()?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err("create cgroup", parent, e))?;
        }
        fs::create_dir(path).map_err(|e| io_err("create cgroup", path, e))?;
        let id = fs::metadata(path)
            .map_err(|e| io_err("stat cgroup", path, e))?
            .ino();
        Ok(Self {
            path: path.to_path_buf(),
            mount,
            id,
        })
    }

    fn create(parent: &Path, mount: PathBuf, label: &str) -> Result<Self, Error> {
        // Labels become directory names: keep them to a safe alphabet.
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = parent.join(format!("{}-{label}", unique_name("")));
        fs::create_dir(&path).map_err(|e| io_err("create cgroup", &path, e))?;
        let id = match fs::metadata(&path) {
            Ok(m) => m.ino(),
            Err(e) => {
                let _ = fs::remove_dir(&path);
                return Err(io_err("stat cgroup", &path, e));
            }
        };
        Ok(Self { path, mount, id })
    }

    /// Absolute path of the cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cgroup id (the directory's inode number).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The cgroup as the datapath names it, resolved against the cgroup2 mount.
    pub fn dir(&self) -> Result<CgroupDir, Error> {
        Ok(cgroup::resolve(&self.path, &self.mount)?)
    }

    /// Pids of the processes in the cgroup.
    pub fn procs(&self) -> Result<Vec<u32>, Error> {
        read_procs(&self.path)
    }

    /// Moves a running process into the cgroup (its existing children stay where they are).
    pub fn add(&self, pid: u32) -> Result<(), Error> {
        let file = self.path.join("cgroup.procs");
        fs::write(&file, pid.to_string()).map_err(|e| io_err("write", &file, e))
    }

    fn kill_all(&self) {
        let kill_file = self.path.join("cgroup.kill");
        // cgroup.kill (5.14) also catches processes forking while we kill.
        if kill_file.exists() && fs::write(&kill_file, "1").is_ok() {
            return;
        }
        for pid in read_procs(&self.path).unwrap_or_default() {
            // SAFETY: kill(2) with a pid read from cgroup.procs; a stale pid fails with ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    fn populated(&self) -> bool {
        let events = fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
        events.lines().any(|l| l == "populated 1")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        if self.populated() {
            self.kill_all();
            while self.populated() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // EBUSY while dying processes still hold it: retry until the deadline.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(path = %self.path.display(), error = %e, "cgroup still busy");
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "leaked temporary cgroup");
                    return;
                }
            }
        }
    }
}

fn read_procs(dir: &Path) -> Result<Vec<u32>, Error> {
    let file = dir.join("cgroup.procs");
    let text = fs::read_to_string(&file).map_err(|e| io_err("read", &file, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}
