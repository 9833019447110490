//! The guest lab end to end: each guest kernel boots, runs a job with cgroup v2 and bpffs
//! mounted, and hands back its output and exit status; nothing is left behind.
use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use podshaper_testbed::guest::{Guest, Kernel};

/// One guest at a time: two emulated CPUs would share this machine's two, and the leftover
/// check counts every guest directory of the process.
fn one_at_a_time() -> Option<MutexGuard<'static, ()>> {
    static LOCK: Mutex<()> = Mutex::new(());
    if !podshaper_testbed::root_or_skip("installs qemu and fetches the guest kernels with apt") {
        return None;
    }
    Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

#[test]
fn each_guest_kernel_boots_and_runs_a_job() {
    let Some(_g) = one_at_a_time() else { return };
    let kernels = Kernel::all().expect("guest kernels (scripts/guest-kernels.sh)");
    let series: Vec<&str> = kernels.iter().map(|k| k.series.as_str()).collect();
    assert_eq!(series, ["6.1", "6.12"], "{kernels:?}");
    let leftovers = || {
        std::fs::read_dir(std::env::temp_dir())
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with("-guest"))
                    .count()
            })
            .unwrap_or(0)
    };
    let before = leftovers();
    for k in kernels {
        let guest = Guest::new(k.clone(), Duration::from_secs(120));
        let job = "uname -r\ngrep -E ' /sys/fs/(cgroup|bpf) ' /proc/mounts | cut -d' ' -f2,3\nexit 3\n";
        let o = guest.run(job).expect("guest run");
        eprintln!(
            "{} booted and ran the job in {:.1} s",
            k.release,
            o.took.as_secs_f64()
        );
        assert_eq!(o.status, 3, "{o:?}");
        let lines: Vec<&str> = o.output.lines().collect();
        assert_eq!(
            lines,
            [k.release.as_str(), "/sys/fs/cgroup cgroup2", "/sys/fs/bpf bpf"],
            "{o:?}"
        );
    }
    assert_eq!(leftovers(), before, "a guest left its directory behind");
}

// A guest whose kernel dies during the job is an error naming it, not a status, and leaves
// nothing behind either.
#[test]
fn a_guest_that_dies_is_an_error() {
    let Some(_g) = one_at_a_time() else { return };
    let kernel = Kernel::all().expect("guest kernels").remove(0);
    let err = Guest::new(kernel, Duration::from_secs(120))
        .run("echo c > /proc/sysrq-trigger\nsleep 60\n")
        .expect_err("a panicked guest");
    assert!(err.to_string().contains("died before the job ended"), "{err}");
}

// The privileged tier inside each guest: the test binary (PODSHAPER_PRIVILEGED_BIN, from
// `cargo test -p podshaper --test privileged --no-run`) and the podshaper binary
// (PODSHAPER_BIN) run there with iperf3, ip and bpftool copied from the host. Measured
// 2026-12-03, ~200 s per kernel: 15 of 18 pass on 6.1, 16 on 6.12. Failing: loopback > 500M
// (an absolute rate emulation does not carry), ingress UDP 0.78 of the limit on 6.1, and
// limit_changes_apply_live_to_established_flows at 1.42 (6.1) / 1.59 (6.12) of the limit
// before the change: an overshoot to explain (emulation or the older kernels).
#[test]
#[ignore = "traffic tests fail under emulation until their rates scale to what the lab carries"]
fn the_privileged_tier_passes_in_each_guest() {
    let Some(_g) = one_at_a_time() else { return };
    let bin = std::env::var("PODSHAPER_PRIVILEGED_BIN").expect("PODSHAPER_PRIVILEGED_BIN");
    let podshaper = std::env::var("PODSHAPER_BIN").expect("PODSHAPER_BIN");
    let which = |c: &str| {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .expect("sh");
        std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let mut failed = Vec::new();
    for k in Kernel::all().expect("kernels") {
        let files = [
            bin.clone().into(),
            podshaper.clone().into(),
            which("ip"),
            which("iperf3"),
            which("bpftool"),
        ];
        let guest = Guest::new(k.clone(), Duration::from_secs(1800))
            .with_files(files)
            .with_modules(&["veth"]);
        // Host binaries first on PATH, busybox's applets after.
        let job = format!("export PATH=/usr/sbin:/usr/bin:/sbin:/bin CI=true\n{bin} --test-threads=1\n");
        let o = guest.run(&job).expect("guest run");
        let summary: Vec<&str> = o
            .output
            .lines()
            .filter(|l| {
                l.starts_with("test ")
                    || l.starts_with("test result")
                    || l.contains("panicked")
                    || l.contains("expected")
            })
            .collect();
        eprintln!(
            "=== {} in {:.0} s\n{}",
            k.release,
            o.took.as_secs_f64(),
            summary.join("\n")
        );
        if o.status != 0 {
            failed.push(k.release);
        }
    }
    assert!(failed.is_empty(), "the privileged tier failed on {failed:?}");
}
