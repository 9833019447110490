//! The podshaper node daemon: owns the datapath, serves the local API on a Unix socket and
//! keeps the per-cgroup view (paths, measured rates) that `status` shows. Limits live in
//! pinned BPF state, not here: the daemon can stop and start without lifting any of them.
mod server;
mod state;

pub use server::{call, run, serve, shutdown_signal, Options};
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
}
