//! The test and bench harness of podshaper, on top of the lab (podshaper-lab, re-exported
//! here): a real Kubernetes control plane with a stand-in kubelet, TBF set up by the real
//! bandwidth CNI plugin, a Service stand-in (DNAT), a datapath pinned in a private bpffs directory, a sock_ops probe of
//! the tests' own, BPF run-time statistics and the machine's busy CPU time. Needs root. Never
//! a normal dependency of a shipped binary.
pub mod bpf_stats;
pub mod cpu;
pub mod datapath;
pub mod guest;
pub mod k8s;
pub mod probe;
pub mod report;
pub mod sampler;
pub mod service;
pub mod tbf;

pub use datapath::TempDatapath;
pub use podshaper_lab::{
    cgroup, command_in, io_err, iperf, netns, root_or_skip, run, run_client, run_clients, run_with_input,
    spawn_in, table, tcp_flows_at_once, unique_name, Cgroup, ClientOptions, Error, IperfReport, IperfServer,
    Netns, NetnsPair, ServerOptions, Table, Traffic, L3,
};
pub use tbf::Tbf;
