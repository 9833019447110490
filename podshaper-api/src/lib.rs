//! Types shared by the podshaper CLI, the daemon and (later) the Kubernetes agent: rates and
//! the local API spoken over the daemon's Unix socket.
pub mod proto;
pub mod rate;

pub use rate::{Rate, RateError};
