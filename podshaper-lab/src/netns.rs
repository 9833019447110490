//! Network namespaces: a single one, and the "two pods" lab of two namespaces joined by a veth
//! pair. Addresses come only from the benchmarking ranges (198.18.0.0/15, RFC 2544, and
//! 2001:2::/48, RFC 5180), so a lab never clashes with real networks. Everything is deleted on drop.
use std::{
    ffi::{CString, OsStr},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{cgroup::Cgroup, io_err, run, unique_name, Error};

/// Where `ip netns add` pins namespaces (what CNI_NETNS points at).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace (`ip netns add`), with its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `ps<pid>-<n>` and brings its loopback up.
    pub fn new() -> Result<Self, Error> {
        let ns = Self::add(unique_name(""))?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn add(name: String) -> Result<Self, Error> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self { name })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace, e.g. `/run/netns/ps123-4a`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n <ns> <args>` and fails on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Moves the calling thread (only it) into the namespace, for good: call it from a thread
    /// made for the purpose.
    pub fn enter(&self) -> Result<(), Error> {
        enter(&self.path())
    }

    /// Runs a program inside the namespace to completion; returns its stdout, fails on a
    /// non-zero exit with its stderr.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<String, Error> {
        run(&mut command_in(self, None, program, args)?)
    }
}

/// Moves the calling thread into the network namespace pinned at `path` (see [`Netns::enter`]).
pub fn enter(path: &Path) -> Result<(), Error> {
    let file = fs::File::open(path).map_err(|e| io_err("open", path, e))?;
    // SAFETY: setns on a namespace fd we hold; it moves only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err("setns", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive until they exit; the name goes now.
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(netns = %self.name, error = %e, "leaked network namespace");
        }
    }
}

/// A command that runs `program` inside `netns` (via `ip netns exec`) and, if given, inside
/// `cgroup`: the child joins the cgroup before exec, so the whole process tree is in it from
/// the first instruction. Stdio is left to the caller.
pub fn command_in<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    program: &str,
    args: &[S],
) -> Result<Command, Error> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns.name(), program]).args(args);
    if let Some(cg) = cgroup {
        let procs = cg.path().join("cgroup.procs");
        let c_path = CString::new(procs.as_os_str().as_bytes()).map_err(|_| Error::Parse {
            what: "cgroup path".into(),
            why: format!("{} contains a NUL byte", procs.display()),
        })?;
        // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on
        // memory allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(c_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    Ok(cmd)
}

/// Spawns `program` inside `netns` and, if given, inside `cgroup` (see [`command_in`]).
/// Stdin is null; stdout and stderr are inherited.
pub fn spawn_in<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    program: &str,
    args: &[S],
) -> Result<Child, Error> {
    command_in(netns, cgroup, program, args)?
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| Error::Io {
            what: format!("spawn {program} in netns {}", netns.name()),
            source,
        })
}

/// Two namespaces, A and B, joined by a veth pair: the "two pods" lab. A holds 198.18.0.1/24
/// and 2001:2::1/64, B holds .2 and ::2. In benches A is the pod and B its peer (the node
/// side, where the bandwidth CNI plugin puts its qdiscs).
#[derive(Debug)]
pub struct NetnsPair {
    // Field order is drop order: B goes first, then A, whose deletion removes the veth pair.
    b: Netns,
    a: Netns,
    veth_a: String,
    veth_b: String,
}

impl NetnsPair {
    /// IPv4 address of A.
    pub const A_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// IPv4 address of B.
    pub const B_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// IPv6 address of A.
    pub const A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 1);
    /// IPv6 address of B.
    pub const B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 2);
    /// B's second IPv4 address (after [`NetnsPair::add_second_b`]): a second peer, for rules
    /// that cover one of B's addresses and not the other.
    pub const B2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    /// B's second IPv6 address.
    pub const B2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 3);
    /// MTU of the veth pair (the kernel default).
    pub const MTU: u32 = 1500;

    /// Creates both namespaces, the veth pair and the addresses.
    pub fn new() -> Result<Self, Error> {
        let a = Netns::new()?;
        let b = Netns::new()?;
        // Interface names are per namespace, but unique names keep `ip link` output readable
        // and stay unique if a caller moves one end to the root namespace.
        let veth_a = format!("{}a", a.name());
        let veth_b = format!("{}b", a.name());
        let add = format!(
            "link add {veth_a} netns {} type veth peer name {veth_b} netns {}",
            a.name(),
            b.name()
        );
        run(Command::new("ip").args(add.split_whitespace()))?;
        let pair = Self { b, a, veth_a, veth_b };
        for (ns, dev, v4, v6) in [
            (&pair.a, &pair.veth_a, Self::A_V4, Self::A_V6),
            (&pair.b, &pair.veth_b, Self::B_V4, Self::B_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            // nodad: the address is usable at once instead of after duplicate detection.
            ns.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// Gives B its second addresses, [`NetnsPair::B2_V4`] and [`NetnsPair::B2_V6`].
    pub fn add_second_b(&self) -> Result<(), Error> {
        self.b
            .ip(&["addr", "add", &format!("{}/24", Self::B2_V4), "dev", &self.veth_b])?;
        self.b.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", Self::B2_V6),
            "dev",
            &self.veth_b,
            "nodad",
        ])?;
        Ok(())
    }

    /// Namespace A (the pod in benches).
    pub fn a(&self) -> &Netns {
        &self.a
    }

    /// Namespace B (the peer, or node side, in benches).
    pub fn b(&self) -> &Netns {
        &self.b
    }

    /// Name of the veth end in A.
    pub fn veth_a(&self) -> &str {
        &self.veth_a
    }

    /// Name of the veth end in B.
    pub fn veth_b(&self) -> &str {
        &self.veth_b
    }
}

/// Whether a TCP socket listens on `port` in the network namespace of process `pid`
/// (`/proc/<pid>/net/tcp*` shows that process's namespace).
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| tcp_table_listens(&t, port))
            .unwrap_or(false)
    })
}

// Lines look like "0: 00000000:1451 00000000:0000 0A ...": local address:port in hex, then
// the remote, then the state (0A is LISTEN).
fn tcp_table_listens(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        let p = local
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        p == Some(port) && state == Some("0A")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listening_port_in_proc_table() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
                 0: 00000000:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n   \
                 1: 0100007F:9C40 0100007F:1451 01 00000000:00000000 00:00000000 00000000\n";
        assert!(tcp_table_listens(t, 5201));
        // Port 40000 appears only as an established connection.
        assert!(!tcp_table_listens(t, 40000));
        assert!(!tcp_table_listens("header only\n", 5201));
    }
}
