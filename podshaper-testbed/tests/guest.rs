//! The guest lab end to end: each guest kernel boots, runs a job with cgroup v2 and bpffs
//! mounted, and hands back its output and exit status; a guest with a network is a node the
//! host reaches; nothing is left behind. The privileged tier runs in guests through
//! `make test-kernels` (podshaper-test-kernels).
use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use podshaper_testbed::guest::{Guest, GuestNode, Kernel};

/// One guest at a time: two emulated CPUs would share this machine's two, and the leftover
/// check counts every guest directory of the process.
fn one_at_a_time() -> Option<MutexGuard<'static, ()>> {
    static LOCK: Mutex<()> = Mutex::new(());
    if !podshaper_testbed::root_or_skip("installs qemu and fetches the guest kernels with apt") {
        return None;
    }
    Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Guest directories in the temporary directory.
fn leftovers() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with("-guest"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn each_guest_kernel_boots_and_runs_a_job() {
    let Some(_g) = one_at_a_time() else { return };
    let kernels = Kernel::all().expect("guest kernels (scripts/guest-kernels.sh)");
    let series: Vec<&str> = kernels.iter().map(|k| k.series.as_str()).collect();
    assert_eq!(series, ["6.1", "6.12"], "{kernels:?}");
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
    assert!(err.to_string().contains("died before the job's end"), "{err}");
}

// A guest node: its NIC reaches the host's end of the tap both ways, over IPv4 and IPv6; jobs
// run one after another in the same guest (a file the first writes, the second reads); a job
// that outlives its timeout is an error; teardown leaves no namespace, tap or qemu behind.
#[test]
fn a_guest_node_reaches_the_host_and_goes_without_a_trace() {
    let Some(_g) = one_at_a_time() else { return };
    let kernel = Kernel::all().expect("guest kernels").remove(0);
    let namespaces = || {
        std::fs::read_dir(podshaper_testbed::netns::NETNS_RUN_DIR)
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = (namespaces(), leftovers());
    // A host file under the temporary directory (where a CI clone's binaries are) is at the
    // same path in the guest.
    let file = std::env::temp_dir().join(format!("podshaper-guest-file-{}", std::process::id()));
    std::fs::write(&file, "from the host\n").expect("write a host file");
    let mut node = Guest::new(kernel, Duration::from_secs(120))
        .with_files([file.clone()])
        .with_network()
        .boot()
        .expect("boot a guest node");
    let o = node
        .run(
            &format!(
                "echo first > /tmp/mark\nping -c 1 -W 5 {}\nping -c 1 -W 5 {}\n",
                GuestNode::HOST_V4,
                GuestNode::HOST_V6
            ),
            Duration::from_secs(60),
        )
        .expect("ping the host");
    assert_eq!(o.status, 0, "the guest does not reach the host: {o:?}");
    let ns = node.netns().expect("a node with a network has a namespace");
    for addr in [GuestNode::GUEST_V4.to_string(), GuestNode::GUEST_V6.to_string()] {
        ns.run("busybox", &["ping", "-c", "1", "-W", "5", &addr])
            .unwrap_or_else(|e| panic!("the host does not reach the guest at {addr}: {e}"));
    }
    let o = node
        .run(
            &format!("cat /tmp/mark {}\n", file.display()),
            Duration::from_secs(30),
        )
        .expect("second job");
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        (o.status, o.output.as_str()),
        (0, "first\nfrom the host\n"),
        "{o:?}"
    );
    let err = node
        .run("sleep 30\n", Duration::from_secs(2))
        .expect_err("a job past its timeout");
    assert!(err.to_string().contains("no result after 2 s"), "{err}");
    drop(node);
    assert_eq!(
        (namespaces(), leftovers()),
        before,
        "the guest's network namespace or directory was left behind"
    );
}
