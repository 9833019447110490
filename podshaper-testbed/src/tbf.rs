//! The baseline shaper: TBF exactly as Kubernetes gets it, set up by the real bandwidth CNI
//! plugin (containernetworking/plugins `plugins/meta/bandwidth`) with containerd's burst.
//!
//! The plugin shapes on the host side of the pod's veth: traffic to the pod (ingress) by a TBF
//! at the root of the host veth; traffic from the pod (egress) by redirecting the host veth's
//! ingress to an ifb device with a TBF at its root. It looks for the host veth in the network
//! namespace it runs in, so in a [`NetnsPair`] it runs inside B, with A as the pod.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;

use crate::{netns::NetnsPair, run_with_input, Error};

/// The burst containerd's CRI passes for `kubernetes.io/{ingress,egress}-bandwidth`: 2^32-1
/// bits (512 MiB), i.e. "no burst limit". The plugin accepts it (it refuses bursts of 4 GiB
/// and more). From 15.6 Mbit/s up the TBF bucket is the full 512 MiB; below, the bucket time
/// overflows the 32-bit psched ticks of the plugin's arithmetic and wraps (at 10 Mbit/s: 193 MB,
/// 155 s at the rate). Buckets start full, so a new limit lets that much through at line rate.
pub const CONTAINERD_BURST_BITS: u64 = u32::MAX as u64;

/// Where plugin binaries are looked for, in order (upstream's and Debian's locations).
pub const PLUGIN_DIRS: [&str; 2] = ["/opt/cni/bin", "/usr/lib/cni"];

/// Network name in the plugin's config; the ifb device name is a hash of it and the container id.
const NETWORK: &str = "podshaper-testbed";

/// Limits applied by the bandwidth CNI plugin to pod A of a pair; DEL on drop, then the
/// qdiscs the plugin leaves on the host veth are removed too.
#[derive(Debug)]
pub struct Tbf<'a> {
    pair: &'a NetnsPair,
    plugin: PathBuf,
    config: String,
    ifb: Option<String>,
}

impl<'a> Tbf<'a> {
    /// Runs the plugin's ADD for pod A of `pair`, limiting traffic to the pod (`ingress`) and
    /// from it (`egress`) to the given bits/s, each with a bucket of `burst_bits`.
    pub fn add(
        pair: &'a NetnsPair,
        ingress: Option<u64>,
        egress: Option<u64>,
        burst_bits: u64,
    ) -> Result<Self, Error> {
        let plugin = find_plugin("bandwidth")?;
        let mut bw = serde_json::Map::new();
        if let Some(rate) = ingress {
            bw.insert("ingressRate".into(), json!(rate));
            bw.insert("ingressBurst".into(), json!(burst_bits));
        }
        if let Some(rate) = egress {
            bw.insert("egressRate".into(), json!(rate));
            bw.insert("egressBurst".into(), json!(burst_bits));
        }
        let sandbox = pair.a().path();
        let config = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bandwidth",
            "runtimeConfig": { "bandwidth": bw },
            // What a main plugin (ptp, bridge) would have returned: the host veth without a
            // sandbox, the pod's interface with one.
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    { "name": pair.veth_b() },
                    { "name": pair.veth_a(), "sandbox": sandbox },
                ],
                "ips": [{ "address": format!("{}/24", NetnsPair::A_V4), "interface": 1 }],
            },
        })
        .to_string();
        let mut tbf = Self {
            pair,
            plugin,
            config,
            ifb: None,
        };
        let out = tbf.invoke("ADD")?;
        // The plugin adds the ifb it created to the result's interfaces.
        let result: serde_json::Value = serde_json::from_str(&out).map_err(|e| Error::Parse {
            what: "bandwidth plugin result".into(),
            why: e.to_string(),
        })?;
        tbf.ifb = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["name"].as_str())
            .find(|n| *n != pair.veth_a() && *n != pair.veth_b())
            .map(str::to_string);
        Ok(tbf)
    }

    /// The ifb device shaping egress, if egress is limited.
    pub fn ifb(&self) -> Option<&str> {
        self.ifb.as_deref()
    }

    /// `tc -s qdisc show` in the host namespace: what the plugin configured, with counters.
    pub fn show(&self) -> Result<String, Error> {
        self.pair.b().run("tc", &["-s", "qdisc", "show"])
    }

    fn invoke(&self, command: &str) -> Result<String, Error> {
        let dir = self.plugin.parent().unwrap_or(Path::new("/"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.pair.b().name()])
            .arg(&self.plugin)
            .env("CNI_COMMAND", command)
            // One pair is one pod: its namespace name is a unique container id.
            .env("CNI_CONTAINERID", self.pair.a().name())
            .env("CNI_NETNS", self.pair.a().path())
            .env("CNI_IFNAME", self.pair.veth_a())
            .env("CNI_PATH", dir);
        run_with_input(&mut cmd, self.config.as_bytes())
    }
}

impl Drop for Tbf<'_> {
    fn drop(&mut self) {
        // DEL removes only the ifb; on a node the host veth's qdiscs go with the veth.
        if let Err(e) = self.invoke("DEL") {
            tracing::warn!(error = %e, "bandwidth plugin DEL failed");
        }
        for parent in ["root", "ingress"] {
            let _ = self
                .pair
                .b()
                .run("tc", &["qdisc", "del", "dev", self.pair.veth_b(), parent]);
        }
    }
}

/// Path of a CNI plugin binary, from `PLUGIN_DIRS`.
pub fn find_plugin(name: &str) -> Result<PathBuf, Error> {
    PLUGIN_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Io {
            what: format!(
                "find CNI plugin {name} in {} (install containernetworking-plugins)",
                PLUGIN_DIRS.join(", ")
            ),
            source: std::io::ErrorKind::NotFound.into(),
        })
}
