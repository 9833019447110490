//! Service stand-ins on a [`NetnsPair`], DNAT'ed as kube-proxy does. [`add`]: an address that
//! clients in namespace B reach the pod in A through: the route sends it out of B's veth (the
//! socket picks its route before the DNAT) and iptables' nat OUTPUT rewrites it to A's address,
//! so the client's socket has the Service address as its peer, never the pod's. [`add_for_a`]:
//! an address that the pod in A reaches one of B's addresses through, translated on B's side
//! of the veth (the node, where kube-proxy's rules are), after the pod's hooks saw it.
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
    dnat(b, "OUTPUT", vip, NetnsPair::A_V4)?;
    Ok(vip)
}

/// Routes `vip` out of A's veth and DNATs it in B's nat PREROUTING to `backend` (one of B's
/// addresses) for TCP: A's socket and cgroup see only `vip`, as a pod's do with a ClusterIP.
/// Gone with the namespaces. Needs iptables (`make deps`).
pub fn add_for_a(pair: &NetnsPair, vip: Ipv4Addr, backend: Ipv4Addr) -> Result<(), Error> {
    // Via B, as a pod's default route goes via the node: B answers for the next hop.
    pair.a().ip(&[
        "route",
        "add",
        &format!("{vip}/32"),
        "via",
        &NetnsPair::B_V4.to_string(),
        "dev",
        pair.veth_a(),
    ])?;
    dnat(pair.b(), "PREROUTING", vip, backend)?;
    Ok(())
}

/// An iptables nat rule in `ns`'s `chain` rewriting TCP to `vip` to `to`, as kube-proxy's are.
fn dnat(ns: &crate::Netns, chain: &str, vip: Ipv4Addr, to: Ipv4Addr) -> Result<(), Error> {
    let (vip, to) = (vip.to_string(), to.to_string());
    let args = [
        "-t",
        "nat",
        "-A",
        chain,
        "-d",
        &vip,
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ];
    ns.run("iptables", &args)?;
    Ok(())
}
