//! Types shared by the podshaper CLI, the daemon, the Kubernetes agent and the test harness:
//! rates, limits, and the local API spoken over the daemon's Unix socket.
pub mod limits;
pub mod peers;
pub mod proto;
pub mod rate;

pub use limits::Limits;
pub use peers::{Direction, IpBlock, PeerRule};
pub use rate::{human_bps, Rate, RateError};
