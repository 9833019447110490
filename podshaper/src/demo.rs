//! `podshaper demo`: the shaper at work on this machine, no cluster. Two "pods" (network
//! namespaces joined by a veth pair, each with its own cgroup), iperf3 between them, and a
//! private daemon state (its own bpffs directory) driven through the same requests the CLI
//! sends. Everything is removed at the end, also on Ctrl-C.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use podshaper_api::{
    human_bps,
    proto::{Change, Request, Response},
    Rate,
};
use podshaper_daemon::State;
use podshaper_lab::{
    run_client, Cgroup, ClientOptions, IperfReport, IperfServer, NetnsPair, ServerOptions, Table, Traffic, L3,
};

/// Options of the demo.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of traffic per phase.
    #[arg(long, default_value_t = 4)]
    secs: u32,
    /// Also write the throughput chart as SVG to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

struct Phase {
    name: &'static str,
    limit: String,
    report: IperfReport,
}

// Removes the demo's private pins however the demo ends.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = podshaper_ebpf::reset(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Runs the demo.
pub fn run(args: Args) -> Result<()> {
    if euid() != 0 {
        bail!("the demo needs root: it loads BPF programs and makes cgroups and network namespaces (run `make demo` as root)");
    }
    if which("iperf3").is_none() {
        bail!("the demo needs iperf3: run `make deps` (or apt-get install iperf3)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install signal handler")?;
    }
    let pair = NetnsPair::new().context("create network namespaces")?;
    let pod = Cgroup::new("demo-pod").context("create the pod's cgroup")?;
    let peer = Cgroup::new("demo-peer").context("create the peer's cgroup")?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/podshaper-demo-{}",
        std::process::id()
    )));
    let mut state = State::open(&pins.0, true, None).context("load the datapath")?;
    let secs = args.secs.max(2);
    let to: IpAddr = IpAddr::V4(NetnsPair::B_V4);
    let cgroup = pod.path().to_path_buf();
    println!(
        "podshaper demo: pod {} (198.18.0.1) <-> peer (198.18.0.2), iperf3, {secs} s per phase",
        cgroup.display()
    );
    println!("rates are L3 (IP header + payload), measured by the receiver\n");

    let mut limit = |egress: Change, ingress: Change| -> Result<()> {
        match state.handle(Request::Limit {
            cgroup: cgroup.clone(),
            egress,
            ingress,
            name: Some("demo/pod".into()),
            rules: None,
        }) {
            Response::Error { message } => bail!("{message}"),
            _ => Ok(()),
        }
    };
    let rate = |s: &str| Rate::parse_quantity(s).map(Change::Set);
    let run_phase = |reverse: bool,
                     secs: u32,
                     change: Option<(&mut dyn FnMut() -> Result<()>, u64)>|
     -> Result<IperfReport> {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let _server = IperfServer::start(
            pair.b(),
            Some(&peer),
            &ServerOptions {
                interval: 0.25,
                ..Default::default()
            },
        )?;
        let opts = ClientOptions {
            traffic: Traffic::Tcp { congestion: None },
            secs,
            reverse,
            interval: 0.25,
            ..ClientOptions::new(to)
        };
        let report = thread::scope(|s| {
            let client = s.spawn(|| run_client(pair.a(), Some(&pod), &opts));
            if let Some((apply, after_ms)) = change {
                thread::sleep(Duration::from_millis(after_ms));
                apply()?;
            }
            client
                .join()
                .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))?
                .map_err(anyhow::Error::from)
        })?;
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(report)
    };

    let mut phases = Vec::new();
    phases.push(Phase {
        name: "pod sends, no limit",
        limit: "-".into(),
        report: run_phase(false, secs, None)?,
    });
    limit(rate("50M")?, Change::Keep)?;
    phases.push(Phase {
        name: "pod sends, egress 50M",
        limit: "50M".into(),
        report: run_phase(false, secs, None)?,
    });
    limit(Change::Unlimited, rate("30M")?)?;
    phases.push(Phase {
        name: "pod receives, ingress 30M",
        limit: "30M".into(),
        report: run_phase(true, secs, None)?,
    });
    limit(rate("50M")?, Change::Unlimited)?;
    let mut raise = || limit(rate("150M")?, Change::Keep);
    let live = run_phase(false, secs * 2, Some((&mut raise, u64::from(secs) * 1000)))?;
    phases.push(Phase {
        name: "pod sends, 50M -> 150M live",
        limit: "50M>150M".into(),
        report: live,
    });

    let mut table = Table::new([
        "phase",
        "limit",
        "achieved (L3)",
        "retransmits",
        "throughput over time",
    ]);
    for p in &phases {
        let l3 = L3::TCP_V4.l3_bps(p.report.mean_after_bps(0.5).unwrap_or(p.report.received_bps));
        table.push([
            p.name.to_string(),
            p.limit.clone(),
            human_bps(l3),
            p.report
                .retransmits
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            sparkline(&p.report),
        ]);
    }
    println!("{}", table.to_text());
    println!("The last phase, one bar per 250 ms (the limit rose from 50M to 150M after {secs} s, traffic never stopped):");
    println!("{}", chart(&phases[3].report, 8));
    if let Some(svg) = args.svg {
        std::fs::write(&svg, svg_chart(&phases)).with_context(|| format!("write {}", svg.display()))?;
        println!("chart written to {}", svg.display());
    }
    println!("cleaning up: cgroups, namespaces and pins are removed");
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| p.is_file())
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn sparkline(r: &IperfReport) -> String {
    let max = r.full_intervals().map(|i| i.bits_per_second).fold(0.0, f64::max);
    r.full_intervals()
        .map(|i| {
            let level = if max > 0.0 {
                (i.bits_per_second / max * 7.0).round() as usize
            } else {
                0
            };
            BARS[level.min(7)]
        })
        .collect()
}

fn chart(r: &IperfReport, rows: usize) -> String {
    let values: Vec<f64> = r
        .full_intervals()
        .map(|i| L3::TCP_V4.l3_bps(i.bits_per_second))
        .collect();
    let max = values.iter().copied().fold(1.0, f64::max);
    let mut out = String::new();
    for row in (0..rows).rev() {
        let threshold = max * (row as f64 + 0.5) / rows as f64;
        let label = if row == rows - 1 {
            human_bps(max)
        } else {
            String::new()
        };
        out.push_str(&format!("{label:>9} |"));
        for v in &values {
            out.push(if *v >= threshold { '█' } else { ' ' });
        }
        out.push('\n');
    }
    out.push_str(&format!("{:>9} +{}\n", "0", "-".repeat(values.len())));
    out
}

fn svg_chart(phases: &[Phase]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 240.0;
    // The unlimited phase is off the scale of the others: clip it at twice the highest limit.
    let cap = 300e6;
    let points: Vec<(f64, String)> = phases
        .iter()
        .flat_map(|p| {
            p.report
                .full_intervals()
                .map(move |i| (L3::TCP_V4.l3_bps(i.bits_per_second), p.name.to_string()))
        })
        .collect();
    let n = points.len().max(1) as f64;
    let mut poly = String::new();
    for (k, (v, _)) in points.iter().enumerate() {
        let x = 40.0 + (W - 60.0) * k as f64 / n;
        let y = H - 30.0 - (H - 50.0) * v.min(cap) / cap;
        poly.push_str(&format!("{x:.1},{y:.1} "));
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"40\" y=\"14\">podshaper demo: L3 throughput per 250 ms, all phases (clipped at 300M)</text>\
         <line x1=\"40\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\
         <line x1=\"40\" y1=\"20\" x2=\"40\" y2=\"{b}\" stroke=\"black\"/>\
         <text x=\"2\" y=\"24\">300M</text><text x=\"20\" y=\"{b}\">0</text>\
         <polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{poly}\"/></svg>\n",
        b = H - 30.0,
        r = W - 20.0,
    )
}
