//! `make test-kernels`: the privileged test tier (podshaper/tests/privileged.rs) inside a qemu
//! guest of each kernel of the lab (Debian's 6.1 and 6.12; the host is the third), one guest at
//! a time, with cgroup v2 mounted alone. It builds the test binaries first, checks the lab
//! before it trusts it (the guest runs the kernel asked for, the binaries in it have the build
//! ids of the ones just built, no cgroup v1 is mounted, the guest reaches the host over its
//! NIC), then prints a table: kernel, passed, failed, skipped, time. Any failure, skip or broken
//! lab fails the run. Needs root.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use podshaper_testbed::{
    guest::{host_program, Guest, GuestNode, Kernel},
    ClientOptions, IperfReport, NetnsPair, ServerOptions, Table, Traffic, L3,
};

/// How long one kernel's tier may take: ~4 min measured under emulation, with room.
const TIER_TIMEOUT: Duration = Duration::from_secs(1800);
/// The host's binaries first, busybox's applets after.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a guest may take to boot (5–10 s measured).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Parser, Debug)]
#[command(about = "Run the privileged tests inside a qemu guest of each lab kernel (root)")]
struct Args {
    /// Only the kernels of these series (e.g. 6.1); all of the lab by default.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Only the tests whose names contain this (libtest's filter).
    filter: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        podshaper_testbed::root_or_skip("boots guests and loads BPF in them"),
        "make test-kernels needs root"
    );
    let built = build()?;
    let kernels: Vec<Kernel> = Kernel::all()?
        .into_iter()
        .filter(|k| args.kernels.is_empty() || args.kernels.contains(&k.series))
        .collect();
    ensure!(!kernels.is_empty(), "no lab kernel matches {:?}", args.kernels);

    let mut table = Table::new(["kernel", "lab carries", "passed", "failed", "skipped", "time"]);
    let mut broken = Vec::new();
    for k in &kernels {
        let started = Instant::now();
        eprintln!("test-kernels: {} ...", k.release);
        match tier(k, &built, args.filter.as_deref()) {
            Ok(r) => {
                table.push([
                    format!("Linux {}", k.release),
                    format!("{:.0} Mbit/s", r.carries / 1e6),
                    r.passed.len().to_string(),
                    r.failed.len().to_string(),
                    r.skipped.len().to_string(),
                    format!("{:.0} s", started.elapsed().as_secs_f64()),
                ]);
                if !r.failed.is_empty() || !r.skipped.is_empty() || r.status != 0 {
                    eprintln!("{}", r.failures);
                    broken.push(format!(
                        "{}: failed {:?}, skipped {:?}, exit status {}",
                        k.release, r.failed, r.skipped, r.status
                    ));
                }
            }
            Err(e) => {
                table.push([
                    format!("Linux {}", k.release),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("{:.0} s", started.elapsed().as_secs_f64()),
                ]);
                broken.push(format!("{}: {e:#}", k.release));
            }
        }
    }
    println!("{}", table.to_text());
    if !broken.is_empty() {
        bail!(
            "the privileged tier did not pass everywhere:\n{}",
            broken.join("\n")
        );
    }
    Ok(())
}

/// The binaries the guests run: the privileged test binary and the podshaper binary it runs
/// (at the path cargo baked into it, which is where the guest gets it too).
struct Built {
    tests: PathBuf,
    podshaper: PathBuf,
}

/// Builds the privileged tests and the podshaper binary, as `cargo test` would.
fn build() -> Result<Built> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(&cargo)
        .args([
            "test",
            "--locked",
            "-p",
            "podshaper",
            "--test",
            "privileged",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(&workspace)
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo")?;
    ensure!(out.status.success(), "cargo test --no-run failed");
    let (mut tests, mut podshaper) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kind = msg["target"]["kind"][0].as_str().unwrap_or_default();
        match (msg["target"]["name"].as_str(), kind) {
            (Some("privileged"), "test") => tests = Some(PathBuf::from(exe)),
            (Some("podshaper"), "bin") => podshaper = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    Ok(Built {
        tests: tests.context("cargo built no privileged test binary")?,
        podshaper: podshaper.context("cargo built no podshaper binary")?,
    })
}

/// What one kernel's tier did.
struct TierResult {
    /// What the lab carried (L3 bit/s of one TCP flow between two namespaces in the guest).
    carries: f64,
    passed: Vec<String>,
    failed: Vec<String>,
    skipped: Vec<String>,
    /// The test binary's exit status.
    status: i32,
    /// libtest's report of the failures, to print.
    failures: String,
}

/// Boots a guest of `kernel`, checks the lab, runs the tier.
fn tier(kernel: &Kernel, built: &Built, filter: Option<&str>) -> Result<TierResult> {
    // iptables loads its matches and targets with dlopen (no ldd shows them): the DNAT of the
    // tests' Service stand-in needs these.
    let xtables = PathBuf::from(format!("/usr/lib/{}-linux-gnu/xtables", std::env::consts::ARCH));
    let mut files = vec![
        built.tests.clone(),
        built.podshaper.clone(),
        host_program("ip")?,
        host_program("iperf3")?,
        host_program("bpftool")?,
        host_program("readelf")?,
        host_program("iptables")?,
    ];
    files.extend(["libxt_DNAT.so", "libxt_tcp.so", "libxt_standard.so"].map(|f| xtables.join(f)));
    let mut node = Guest::new(kernel.clone(), BOOT_TIMEOUT)
        .with_files(files)
        // nf_tables, its NAT and the xtables DNAT target iptables-nft uses for the tests' Service
        // stand-in; clsact and the bpf classifier for the tests' third party on tc before 6.6
        // (tcx needs neither).
        .with_modules(&[
            "veth",
            "sch_ingress",
            "cls_bpf",
            "nf_tables",
            "nft_chain_nat",
            "nft_nat",
            "nft_compat",
            "xt_nat",
        ])
        .with_network()
        .boot()?;
    check_lab(&mut node, kernel, built)?;
    let carries = capacity(&mut node)?;
    // The host's binaries first on PATH, busybox's applets after; CI=true turns a skip into a
    // failure; the tests scale to what the lab carries.
    let job = format!(
        "export PATH={PATH} CI=true PODSHAPER_LAB_BPS={carries:.0}\ncd /tmp\n{} --test-threads=1 {}\n",
        built.tests.display(),
        filter.unwrap_or_default()
    );
    let o = node.run(&job, TIER_TIMEOUT)?;
    node.shutdown()?;
    let mut r = TierResult {
        carries,
        passed: Vec::new(),
        failed: Vec::new(),
        skipped: Vec::new(),
        status: o.status,
        failures: String::new(),
    };
    for line in o.output.lines() {
        // "test name ... ok", "test name ... FAILED", "test name ... ignored, reason"
        let Some((name, verdict)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) else {
            continue;
        };
        match verdict.split(',').next().unwrap_or_default() {
            "ok" => r.passed.push(name.to_string()),
            "FAILED" => r.failed.push(name.to_string()),
            "ignored" => r.skipped.push(name.to_string()),
            _ => {}
        }
    }
    if let Some((_, failures)) = o.output.split_once("\nfailures:\n") {
        r.failures = failures.to_string();
    }
    if r.passed.is_empty() && r.failed.is_empty() {
        bail!("the tier ran no test (exit status {}):\n{}", o.status, o.output);
    }
    Ok(r)
}

/// Fails loudly unless the guest runs the kernel asked for, holds the binaries just built,
/// mounts cgroup v2 alone and reaches the host over its NIC: a broken lab must not pass.
fn check_lab(node: &mut GuestNode, kernel: &Kernel, built: &Built) -> Result<()> {
    let job = format!(
        "export PATH={PATH}\nuname -r\nreadelf -n {tests} | grep 'Build ID'\nreadelf -n {ps} | grep 'Build ID'\n\
         grep -c ' cgroup ' /proc/mounts\nping -c 1 -W 5 {host} >/dev/null && echo reached\n",
        tests = built.tests.display(),
        ps = built.podshaper.display(),
        host = GuestNode::HOST_V4,
    );
    let o = node.run(&job, Duration::from_secs(60))?;
    let lines: Vec<&str> = o.output.lines().map(str::trim).collect();
    let want = [
        kernel.release.clone(),
        build_id(&built.tests)?,
        build_id(&built.podshaper)?,
        "0".to_string(),
        "reached".to_string(),
    ];
    let what = [
        "kernel",
        "test binary's build id",
        "podshaper's build id",
        "cgroup v1 mounts",
        "the host over the guest's NIC",
    ];
    for (i, w) in want.iter().enumerate() {
        let got = lines.get(i).copied().unwrap_or("(nothing)");
        ensure!(
            got == w,
            "the lab is broken: {}: got {got:?}, expected {w:?}\n{}",
            what[i],
            o.output
        );
    }
    eprintln!(
        "test-kernels: lab checked: {}, build ids match, cgroup v2 alone, host reached",
        kernel.release
    );
    Ok(())
}

/// One unlimited TCP flow between two namespaces of the guest, as the privileged tests' lab
/// makes them (the same addresses): L3 bit/s after the first half second.
fn capacity(node: &mut GuestNode) -> Result<f64> {
    let (a, b) = (NetnsPair::A_V4, NetnsPair::B_V4);
    // busybox sh runs its own applets before PATH: the host's ip by its path.
    let ip = host_program("ip")?;
    let ip = ip.display();
    let server = ServerOptions::default();
    let (interval, port) = (server.interval, server.port);
    // The client as the tests run it, so that the report parses the same way.
    let client = ClientOptions {
        traffic: Traffic::Tcp {
            congestion: Some("cubic".into()),
        },
        secs: 2,
        ..ClientOptions::new(b.into())
    }
    .args()
    .iter()
    .map(|a| a.to_string_lossy().into_owned())
    .collect::<Vec<_>>()
    .join(" ");
    let job = format!(
        "export PATH={PATH}\n\
         {ip} netns add cap-a && {ip} netns add cap-b\n\
         {ip} link add cap0 netns cap-a type veth peer name cap1 netns cap-b\n\
         {ip} -n cap-a addr add {a}/24 dev cap0 && {ip} -n cap-b addr add {b}/24 dev cap1\n\
         for n in a b; do {ip} -n cap-$n link set lo up; done\n\
         {ip} -n cap-a link set cap0 up && {ip} -n cap-b link set cap1 up\n\
         {ip} netns exec cap-b iperf3 -s -1 -D -J -i {interval} -p {port} && sleep 1\n\
         {ip} netns exec cap-a iperf3 {client}; rc=$?\n\
         {ip} netns del cap-a; {ip} netns del cap-b\nexit $rc\n"
    );
    let o = node.run(&job, Duration::from_secs(60))?;
    ensure!(o.status == 0, "measure the lab: {}", o.output);
    let json = &o.output[o.output.find('{').context("no iperf3 JSON")?..];
    let r = IperfReport::parse(json)?;
    let bps = L3::TCP_V4.l3_bps(r.mean_after_bps(0.5).context("no iperf3 intervals")?);
    eprintln!("test-kernels: the lab carries {:.0} Mbit/s", bps / 1e6);
    Ok(bps)
}

/// `Build ID: <hex>` as readelf prints it for `file`.
fn build_id(file: &Path) -> Result<String> {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .context("run readelf")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Build ID:"))
        .map(str::to_string)
        .with_context(|| format!("{} has no build id", file.display()))
}
