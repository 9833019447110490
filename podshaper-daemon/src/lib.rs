//! The podshaper node daemon: owns the datapath, serves the local API on a Unix socket and
//! keeps the per-cgroup view (paths, measured rates) that `status` shows. Limits live in
//! pinned BPF state, not here: the daemon can stop and start without lifting any of them.
//!
//! [`State`] is its typed API (limit, unlimit, status, reset, tick), with this crate's
//! [`Error`]: the socket server maps requests onto it, and the agent, which runs the daemon in
//! its own process, calls it directly. Whoever runs the daemon owns its periodic work: call
//! [`State::tick`] once a second ([`maintain`] does).
mod server;
mod state;

pub use server::{call, maintain, run, shutdown_signal, Options, Server};
pub use state::State;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] podshaper_ebpf::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a cgroup v2 mount (on hybrid hosts it is often /sys/fs/cgroup/unified)")]
    NotCgroup2(std::path::PathBuf),
    #[error("another daemon is serving {0}")]
    AlreadyRunning(std::path::PathBuf),
    #[error(transparent)]
    Rule(#[from] podshaper_api::peers::RuleError),
}

impl Error {
    /// Whether the request named a cgroup that does not exist (not yet, or not any more):
    /// worth trying again once it appears. Other errors need a fix first.
    pub fn is_no_such_cgroup(&self) -> bool {
        matches!(self, Self::Datapath(podshaper_ebpf::Error::NoSuchCgroup(_)))
    }
}
