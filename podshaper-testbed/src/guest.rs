//! A qemu guest with another kernel (Debian's 6.1 and 6.12, fetched by
//! scripts/guest-kernels.sh): boots an initramfs of the host's static busybox, mounts cgroup v2
//! alone (unified, as real clusters run it) and bpffs, runs one shell job and powers off. The
//! job's output and exit status come back over the serial console.
//!
//! `/dev/kvm` here is a software nested hypervisor that cannot run stock kernels, so guests run
//! under software emulation (`-accel tcg`): boot takes ~10 s and figures taken inside are
//! relative, never absolute. `PODSHAPER_GUEST_ACCEL=kvm` uses KVM where it is real.
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{io_err, run, unique_name, Error};

/// Printed by the guest's init after the job, with its exit status: the harness reads the
/// status from it, and its absence says the guest died (panic, timeout) before the job ended.
const EXIT_MARK: &str = "PODSHAPER-GUEST-EXIT";
/// Memory of a guest: enough for the job and the test binaries in the initramfs.
const MEMORY_MB: u32 = 1024;

/// A kernel of the guest lab, as scripts/guest-kernels.sh caches it.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The series, e.g. "6.1".
    pub series: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    /// The cached kernels, fetching them first if needed (needs root the first time: apt).
    pub fn all() -> Result<Vec<Self>, Error> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-kernels.sh");
        let out = run(&mut Command::new(&script))?;
        let dir = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        let mut kernels = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| io_err("read", &dir, e))?.flatten() {
            let path = e.path();
            let Ok(release) = fs::read_to_string(path.join("release")) else {
                continue;
            };
            kernels.push(Self {
                series: e.file_name().to_string_lossy().into_owned(),
                release: release.trim().to_string(),
                vmlinuz: path.join("vmlinuz"),
                modules: path.join("modules"),
            });
        }
        kernels.sort_by(|a, b| a.release.cmp(&b.release));
        Ok(kernels)
    }
}

/// What a guest's job printed and how it ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The job's exit status.
    pub status: i32,
    /// What the job wrote to stdout and stderr.
    pub output: String,
    /// From starting qemu to its exit.
    pub took: Duration,
}

/// One guest run: the initramfs is built in a private directory, removed when done (also on
/// failure); qemu is killed if it outlives `timeout`.
pub struct Guest {
    kernel: Kernel,
    timeout: Duration,
}

impl Guest {
    pub fn new(kernel: Kernel, timeout: Duration) -> Self {
        Self { kernel, timeout }
    }

    /// Boots the guest, runs `job` (a busybox sh script) and returns its outcome.
    pub fn run(&self, job: &str) -> Result<Outcome, Error> {
        let dir = std::env::temp_dir().join(unique_name("-guest"));
        let result = self.run_in(&dir, job);
        let _ = fs::remove_dir_all(&dir);
        result
    }

    fn run_in(&self, dir: &Path, job: &str) -> Result<Outcome, Error> {
        let root = dir.join("root");
        for d in ["bin", "proc", "sys", "dev", "tmp", "run"] {
            fs::create_dir_all(root.join(d)).map_err(|e| io_err("create", &root.join(d), e))?;
        }
        let busybox = Path::new("/bin/busybox");
        fs::copy(busybox, root.join("bin/busybox")).map_err(|e| io_err("copy", busybox, e))?;
        write_file(&root.join("init"), &init_script(), 0o755)?;
        write_file(&root.join("job.sh"), job, 0o755)?;
        let initrd = dir.join("initrd.cpio");
        cpio(&root, &initrd)?;

        let accel = std::env::var("PODSHAPER_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-accel", &accel, "-cpu", "max", "-smp", "1"])
            .args(["-m", &MEMORY_MB.to_string()])
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .args(["-net", "none"])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            // panic=-1: a panic exits qemu (with -no-reboot) instead of hanging to the timeout.
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| Error::Io {
            what: "run qemu-system-x86_64 (scripts/deps.sh guest installs it)".into(),
            source: e,
        })?;
        let mut stdout = child.stdout.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = out.read_to_string(&mut s);
            }
            s
        });
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        command: format!("guest {} ({})", self.kernel.series, self.kernel.release),
                        secs: self.timeout.as_secs(),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    return Err(Error::Io {
                        what: "wait for qemu".into(),
                        source: e,
                    })
                }
            }
        }
        let took = started.elapsed();
        let console = reader.join().unwrap_or_default().replace('\r', "");
        parse_console(&console, took).ok_or_else(|| Error::Parse {
            what: format!("the console of guest {}", self.kernel.release),
            why: format!("no {EXIT_MARK} line: the guest died before the job ended:\n{console}"),
        })
    }
}

/// The guest's /init: mounts what podshaper needs (cgroup v2 alone, bpffs), runs the job with
/// its output between two marks, prints its status and powers off.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
echo PODSHAPER-GUEST-BEGIN
sh /job.sh </dev/null 2>&1
echo "{EXIT_MARK} $?"
poweroff -f
"#
    )
}

/// The job's output and status from the console text.
fn parse_console(console: &str, took: Duration) -> Option<Outcome> {
    let body = console.split_once("PODSHAPER-GUEST-BEGIN\n")?.1;
    let (output, rest) = body.rsplit_once(&format!("{EXIT_MARK} "))?;
    let status = rest.lines().next()?.trim().parse().ok()?;
    Some(Outcome {
        status,
        output: output.to_string(),
        took,
    })
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).map_err(|e| io_err("write", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io_err("chmod", path, e))
}

/// An uncompressed newc archive of `root`, as the kernel unpacks an initramfs.
fn cpio(root: &Path, out: &Path) -> Result<(), Error> {
    let list = run(Command::new("find").arg(".").current_dir(root))?;
    let file = fs::File::create(out).map_err(|e| io_err("create", out, e))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Io {
            what: "run cpio (scripts/deps.sh guest installs it)".into(),
            source: e,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(list.as_bytes())
            .map_err(|e| io_err("write to cpio for", root, e))?;
    }
    let o = child
        .wait_with_output()
        .map_err(|e| io_err("wait for cpio on", root, e))?;
    if !o.status.success() {
        return Err(Error::Command {
            command: "cpio -o -H newc".into(),
            status: o.status,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_gives_the_jobs_output_and_status() {
        let console = "[    0.1] boot noise\nPODSHAPER-GUEST-BEGIN\n6.1.0-57-cloud-amd64\nhello\nPODSHAPER-GUEST-EXIT 3\n[ 1.2] reboot: Power down\n";
        let o = parse_console(console, Duration::from_secs(1)).unwrap();
        assert_eq!(o.status, 3);
        assert_eq!(o.output, "6.1.0-57-cloud-amd64\nhello\n");
        // A guest that died before the job ended has no exit line.
        assert!(parse_console("PODSHAPER-GUEST-BEGIN\nKernel panic\n", Duration::ZERO).is_none());
        assert!(parse_console("Kernel panic - not syncing\n", Duration::ZERO).is_none());
    }
}
