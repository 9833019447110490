//! Raw map element syscalls for the cgroup storage maps. aya 0.14 only speaks the isolated
//! `{cgroup id, attach type}` key; podshaper uses the shared `u64` key (one value per cgroup for
//! all attach types, kernel 5.9), so these few calls are made directly, through the bare
//! bpf(2) call that the feature probes use too. So is the swap of a pinned link's program,
//! which aya 0.14 keeps to itself.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Copy the value under its `bpf_spin_lock`, skipping the lock itself.
pub(crate) const BPF_F_LOCK: u64 = 4;
/// Update only an existing element (cgroup storage cannot be created from user space).
pub(crate) const BPF_EXIST: u64 = 2;
pub(crate) const BPF_NOEXIST: u64 = 1;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes the link pinned at `path` run `prog` (BPF_LINK_UPDATE, kernel 5.7 for cgroup links):
/// the kernel swaps the program atomically, with no moment where neither runs. Fails with
/// ENOLINK when the link's cgroup is gone.
pub(crate) fn link_update(path: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let get = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: pathname points to a NUL-terminated string alive for the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &get)? };
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: no pointers in the attribute.
    unsafe { bpf(BPF_LINK_UPDATE, &update)? };
    Ok(())
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_op<K: Copy>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: &K,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: key and value point at buffers of the map's key and value sizes, which the
    // callers size from the same #[repr(C)] types the map was created with.
    unsafe { bpf(cmd, &attr) }?;
    Ok(())
}

/// Reads the value of `key` into `out`.
pub(crate) fn lookup(fd: BorrowedFd<'_>, key: u64, out: &mut [u8], flags: u64) -> io::Result<()> {
    elem_op(BPF_MAP_LOOKUP_ELEM, fd, &key, out.as_mut_ptr(), flags)
}

/// Writes `value` at `key`.
pub(crate) fn update(fd: BorrowedFd<'_>, key: u64, value: &[u8], flags: u64) -> io::Result<()> {
    elem_op(BPF_MAP_UPDATE_ELEM, fd, &key, value.as_ptr() as *mut u8, flags)
}

/// Lookup of a map keyed by a struct `K` with values of type `V`.
pub(crate) fn lookup_as<K: Copy, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    key: &K,
    flags: u64,
) -> io::Result<V> {
    let mut v = V::default();
    elem_op(BPF_MAP_LOOKUP_ELEM, fd, key, &mut v as *mut V as *mut u8, flags)?;
    Ok(v)
}

/// Update of a map keyed by a struct `K` with values of type `V`.
pub(crate) fn update_as<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    elem_op(BPF_MAP_UPDATE_ELEM, fd, key, value as *const V as *mut u8, flags)
}

/// Deletes `key`; a key that is not there is not an error.
pub(crate) fn delete_as<K: Copy>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    match elem_op(BPF_MAP_DELETE_ELEM, fd, key, std::ptr::null_mut(), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Every key of a map (BPF_MAP_GET_NEXT_KEY from none). A map changed meanwhile may yield a
/// key twice or miss one added during the walk; callers hold the only writer.
pub(crate) fn keys_as<K: Copy + Default>(fd: BorrowedFd<'_>) -> io::Result<Vec<K>> {
    #[repr(C)]
    struct NextAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut keys = Vec::new();
    let mut next = K::default();
    let mut prev: Option<K> = None;
    loop {
        let attr = NextAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: prev.as_ref().map_or(0, |k| k as *const K as u64),
            next_key: &mut next as *mut K as u64,
        };
        // SAFETY: key and next_key point at K-sized buffers, the map's key size.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &attr) } {
            Ok(_) => {
                keys.push(next);
                prev = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// Views a plain-old-data value as bytes.
pub(crate) fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] POD of integers (only the abi types are passed here).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Reads a plain-old-data value from the start of `bytes`, which must be at least its size.
pub(crate) fn from_bytes<T: Copy + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = std::mem::size_of::<T>().min(bytes.len());
    // SAFETY: T is a #[repr(C)] POD of integers: every bit pattern is valid; n is in bounds.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut v as *mut T as *mut u8, n) };
    v
}

/// bpf(2) with `attr`, a prefix of `union bpf_attr` for `cmd` (the kernel reads
/// `size_of::<T>()` bytes and takes the rest as zero); returns what the kernel returned, a
/// descriptor for commands that make one.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` does with it during the call.
pub(crate) unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is valid for reads of its size during the call; the caller answers for the
    // pointers it holds.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which the programs
/// stamp their epochs with.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer; CLOCK_MONOTONIC never
    // fails on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}
