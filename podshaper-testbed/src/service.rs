//! A Service stand-in on a [`NetnsPair`]: an address that clients in namespace B reach the pod
//! in A through, DNAT'ed as kube-proxy does. The route sends it out of B's veth (the socket
//! picks its route before the DNAT) and iptables' nat OUTPUT rewrites it to A's address, so
//! the client's socket has the Service address as its peer, never the pod's.
use std::net::Ipv4Addr;

use crate::{Error, NetnsPair};

/// The Service address of the tests and bench, in the benchmarking range.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 10);

/// Routes [`SERVICE_V4`] out of B's veth and DNATs it to A's address for TCP, in namespace B
/// (gone with it). Needs iptables (`make deps`).
pub fn add(pair: &NetnsPair) -> Result<Ipv4Addr, Error> {
    let vip = SERVICE_V4;
    let b = pair.b();
    b.ip(&["route", "add", &format!("{vip}/32"), "dev", pair.veth_b()])?;
    b.run(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            &vip.to_string(),
            "-p",
            "tcp",
            "-j",
            "DNAT",
            "--to-destination",
            &NetnsPair::A_V4.to_string(),
        ],
    )?;
    Ok(vip)
}
