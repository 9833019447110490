//! cgroup v2: where the hierarchy is mounted, how a user's path names a cgroup, and its id.
//! Never assumes /sys/fs/cgroup: hybrid hosts mount v2 elsewhere (e.g. /sys/fs/cgroup/unified).
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::Error;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Returns the mount point of the cgroup v2 hierarchy, read from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
        what: "read /proc/self/mountinfo".into(),
        source,
    })?;
    parse_cgroup2_mount(&info).ok_or(Error::NoCgroup2)
}

/// Finds the first cgroup2 mount point in the text of a mountinfo file.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount)))
    })
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory, resolved and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    /// Absolute path of the directory.
    pub path: PathBuf,
    /// The kernel's cgroup id: the directory's inode number on cgroup2.
    pub id: u64,
}

/// Resolves what a user wrote (`/sys/fs/cgroup/unified/x`, `/x` or `x`) to a cgroup v2
/// directory: a path inside the cgroup2 mount is taken as is, anything else is relative to it.
pub fn resolve(user: &Path, mount: &Path) -> Result<CgroupDir, Error> {
    let path = if user.starts_with(mount) {
        user.to_path_buf()
    } else {
        mount.join(user.strip_prefix("/").unwrap_or(user))
    };
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::NotACgroup {
            path,
            why: "'..' is not allowed".into(),
        });
    }
    let meta = fs::metadata(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoSuchCgroup(path.clone()),
        _ => Error::NotACgroup {
            path: path.clone(),
            why: e.to_string(),
        },
    })?;
    if !meta.is_dir() {
        return Err(Error::NotACgroup {
            path,
            why: "not a directory".into(),
        });
    }
    if !is_cgroup2(&path) {
        return Err(Error::NotACgroup {
            path,
            why: "not on a cgroup2 file system".into(),
        });
    }
    Ok(CgroupDir { id: meta.ino(), path })
}

/// Whether `path` lies on a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; c is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The path of the cgroup with this id, or `None` if no such cgroup exists (any more).
///
/// Opens the cgroup by its kernfs file handle (the id), as systemd and bpftool do, and reads
/// the path back from /proc/self/fd. Needs CAP_DAC_READ_SEARCH.
pub fn path_of(mount: &Path, id: u64) -> Result<Option<PathBuf>, Error> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    // struct file_handle with an 8-byte f_handle: the kernfs node id.
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: [u8; 8],
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let dir = fs::File::open(mount).map_err(|source| Error::Io {
        what: format!("open {}", mount.display()),
        source,
    })?;
    let mut h = Handle {
        bytes: 8,
        kind: FILEID_KERNFS,
        id: id.to_ne_bytes(),
    };
    // SAFETY: h is a valid file_handle with 8 bytes of handle; the fd is owned below.
    let fd = unsafe {
        libc::open_by_handle_at(
            dir.as_raw_fd(),
            (&mut h as *mut Handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESTALE) | Some(libc::ENOENT) => Ok(None),
            _ => Err(Error::Io {
                what: format!("open cgroup {id} by handle"),
                source: e,
            }),
        };
    }
    // SAFETY: fd was just returned by open_by_handle_at and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let path = fs::read_link(&link).map_err(|source| Error::Io {
        what: format!("read {link}"),
        source,
    })?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_mount() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount_with_optional_fields_and_escapes() {
        let info = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup")));
        let info = "29 23 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn no_cgroup2_mount() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), None);
    }

    #[test]
    fn path_of_a_missing_id_is_none() {
        let Some(mount) = cgroup2_mount().ok() else {
            return;
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // open_by_handle_at needs CAP_DAC_READ_SEARCH; the privileged tests cover it
        }
        assert_eq!(path_of(&mount, u64::MAX - 1).unwrap(), None);
        let root = fs::metadata(&mount).unwrap().ino();
        assert_eq!(path_of(&mount, root).unwrap(), Some(mount.clone()));
    }

    #[test]
    fn rejects_missing_and_non_cgroup_paths() {
        let tmp = std::env::temp_dir();
        let err = resolve(Path::new("/definitely/not/here"), &tmp).unwrap_err();
        assert!(matches!(err, Error::NoSuchCgroup(_)), "{err:?}");
        assert!(err.to_string().contains("not/here: no such cgroup"), "{err}");
        let err = resolve(Path::new("a/../b"), &tmp).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        // A plain directory outside cgroup2 is refused.
        let err = resolve(&tmp, &tmp).unwrap_err();
        assert!(err.to_string().contains("cgroup2"), "{err}");
    }
}
