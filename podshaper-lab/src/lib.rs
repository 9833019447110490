//! The lab `podshaper demo` and the privileged tests stand on: temporary cgroups, network
//! namespaces joined by a veth pair (two "pods"), iperf3 runs with parsed reports, and plain
//! tables. Product code ships it (the demo is a subcommand of the node binary), so it holds
//! nothing else: the test and bench harness (control plane, TBF, BPF statistics) lives in
//! podshaper-testbed. Needs root. Every object cleans up on drop (also when a test panics)
//! and carries a per-process unique name, `ps<pid>-<n>`, so labs can run in parallel.
pub mod cgroup;
pub mod iperf;
pub mod netns;
pub mod table;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

pub use cgroup::Cgroup;
pub use iperf::{
    run_client, run_clients, tcp_flows_at_once, ClientOptions, IperfReport, IperfServer, ServerOptions,
    Traffic, L3,
};
pub use netns::{command_in, spawn_in, Netns, NetnsPair};
pub use table::Table;

/// Errors of the labs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, process or syscall operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An external command (ip, tc, bpftool, a CNI plugin) exited with an error.
    #[error("{command}: {status}: {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// An external command did not finish in time.
    #[error("{command}: no result after {secs} s")]
    Timeout { command: String, secs: u64 },
    /// A tool's output was not what the lab expects.
    #[error("parse {what}: {why}")]
    Parse { what: String, why: String },
    /// iperf3 reported an error (connection refused, bad option, ...).
    #[error("iperf3: {0}")]
    Iperf(String),
    /// The podshaper datapath failed.
    #[error(transparent)]
    Datapath(#[from] podshaper_ebpf::Error),
}

/// Whether a privileged test may run: true as root. Otherwise it prints why the calling test
/// (named after its thread, as the test harness names it) is skipped, and under CI=true, where
/// a skip would hide a failure, it panics instead.
pub fn root_or_skip(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("a privileged test");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: privileged tests must run as root under CI"
    );
    eprintln!("SKIPPED {test}: needs root ({needs}); run `make test` as root");
    false
}

/// `ps<pid>-<n><suffix>`, unique in this process; at most 13 characters before the suffix,
/// so names with a 2-character suffix still fit the 15 characters of an interface name.
pub fn unique_name(suffix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (36 * 36 * 36);
    format!("ps{}-{}{suffix}", std::process::id(), base36(n))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8_lossy(&s).into_owned()
}

/// An `Io` error for `verb` on `path`.
pub fn io_err(verb: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what: format!("{verb} {}", path.display()),
        source,
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion; returns its stdout, or its stderr in the error.
pub fn run(cmd: &mut Command) -> Result<String, Error> {
    run_with_input(cmd, &[])
}

/// Runs a command with `input` on its stdin; returns its stdout, or its output in the error.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<String, Error> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            what: format!("run {what}"),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // Small inputs only (configs): they fit in the pipe, so writing first cannot deadlock.
        stdin.write_all(input).map_err(|source| Error::Io {
            what: format!("write stdin of {what}"),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Io {
        what: format!("wait for {what}"),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // CNI plugins report errors as JSON on stdout.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let output: Vec<&str> = [stderr.trim(), stdout.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        return Err(Error::Command {
            command: what,
            status: out.status,
            stderr: output.join(" "),
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_short() {
        let a = unique_name("");
        let b = unique_name("");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("ps{}-", std::process::id())));
        // Worst case: a 7-digit pid and a 3-digit counter.
        assert!("ps4194304-zzz".len() <= 13);
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36 * 36 * 36 - 1), "zzz");
    }

    #[test]
    fn failing_commands_carry_stderr() {
        let e = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("sh -c"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert_eq!(run(Command::new("sh").args(["-c", "echo hi"])).unwrap(), "hi\n");
    }
}
