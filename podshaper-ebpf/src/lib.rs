//! The podshaper datapath, the only crate that touches BPF: the programs (bpf/*.bpf.c), their
//! loader, the pinned state under bpffs and the typed view of the maps. Callers (the daemon,
//! tests) speak in cgroups and limits; nothing outside this crate sees a map or a file
//! descriptor.
pub mod abi;
pub mod cgroup;
mod controller;
mod datapath;
pub mod features;
pub mod pins;
mod rate_option;
mod rules;
mod sys;

pub use datapath::{reset, CgroupState, Datapath};
pub use podshaper_api::Limits;
pub use rules::{ClassState, RuleState};

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo): podshaper needs cgroup v2")]
    NoCgroup2,
    #[error("{}: not a cgroup v2 directory: {why}", path.display())]
    NotACgroup { path: std::path::PathBuf, why: String },
    #[error("{}: no such cgroup", .0.display())]
    NoSuchCgroup(std::path::PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned state at {} has ABI version {found}, newer than this podshaper's {ours}: run the newer podshaper, or `podshaper reset` to drop all limits",
        path.display()
    )]
    ForeignPins {
        path: std::path::PathBuf,
        found: u32,
        ours: u32,
    },
    #[error(
        "cannot migrate pinned state at {} (ABI version {found}): its ps_cgroups values are {size} bytes, less than the head every version keeps; `podshaper reset` drops all limits",
        path.display()
    )]
    Unmigratable {
        path: std::path::PathBuf,
        found: u32,
        size: usize,
    },
    #[error("load BPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what}: {source}")]
    Link {
        what: String,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("{}: refusing to limit the root cgroup (the whole host); limit a child cgroup", .0.display())]
    RootCgroup(std::path::PathBuf),
    #[error(
        "{}: not on bpffs: choose a directory under /sys/fs/bpf (mounted there when missing) or mount bpffs at it first",
        .0.display()
    )]
    NotBpffs(std::path::PathBuf),
    #[error("BPF object has no program {0}")]
    MissingProgram(String),
    #[error("{0}")]
    Kernel(String),
    #[error(transparent)]
    Rule(#[from] podshaper_api::peers::RuleError),
    #[error("no peer rule named {0:?} on this node (set it first: `podshaper rule set`)")]
    UnknownRule(String),
    #[error("rule {name} is {was}: a rule keeps its direction; remove it and set it again to make it {now}")]
    RuleDirection {
        name: String,
        was: podshaper_api::Direction,
        now: podshaper_api::Direction,
    },
    #[error("{what}: {wanted} would exceed this node's capacity of {capacity}; nothing was changed")]
    Capacity {
        what: &'static str,
        wanted: usize,
        capacity: usize,
    },
    #[error("a cgroup can be bound to at most {max} {direction} rules, not {count}; nothing was changed")]
    TooManyRules {
        direction: podshaper_api::Direction,
        count: usize,
        max: usize,
    },
}
