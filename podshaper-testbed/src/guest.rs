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

use crate::{io_err, run, run_with_input, unique_name, Error};

/// Printed by the guest's init after the job, with its exit status: the harness reads the
/// status from it, and its absence says the guest died (panic, timeout) before the job ended.
const EXIT_MARK: &str = "PODSHAPER-GUEST-EXIT";
/// Memory of a guest: enough for the job and the test binaries in the initramfs.
const MEMORY_MB: u32 = 2048;

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
    files: Vec<PathBuf>,
    modules: Vec<String>,
}

impl Guest {
    pub fn new(kernel: Kernel, timeout: Duration) -> Self {
        Self {
            kernel,
            timeout,
            files: Vec::new(),
            modules: Vec::new(),
        }
    }

    /// Host files to copy into the guest at the same paths; executables bring the shared
    /// libraries `ldd` names, and lose their debug info on the way (a debug test binary is
    /// 130 MB, and the initramfs lives in the guest's memory).
    pub fn with_files(mut self, files: impl IntoIterator<Item = PathBuf>) -> Self {
        self.files.extend(files);
        self
    }

    /// Kernel modules (by name: "veth") the guest's init loads, in this order, before the
    /// job: the cloud kernels build veth, sch_htb and the like as modules.
    pub fn with_modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
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
        for d in ["bin", "proc", "sys", "dev", "tmp", "run", "var"] {
            fs::create_dir_all(root.join(d)).map_err(|e| io_err("create", &root.join(d), e))?;
        }
        let busybox = Path::new("/bin/busybox");
        fs::copy(busybox, root.join("bin/busybox")).map_err(|e| io_err("copy", busybox, e))?;
        for f in &self.files {
            copy_with_libraries(f, &root)?;
        }
        let mods = root.join("modules");
        fs::create_dir_all(&mods).map_err(|e| io_err("create", &mods, e))?;
        for (i, name) in self.modules.iter().enumerate() {
            // Numbered, so that init loads them in the order given.
            module_into(
                &self.kernel.modules,
                name,
                &mods.join(format!("{i:02}-{name}.ko")),
            )?;
        }
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
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run 2>/dev/null
ip link set lo up
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
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

/// Copies `file` to the same path under `root`, with the shared libraries it needs.
fn copy_with_libraries(file: &Path, root: &Path) -> Result<(), Error> {
    let mut paths = vec![file.to_path_buf()];
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)";
    // a static or non-ELF file makes ldd fail: it brings nothing.
    if let Ok(out) = run(Command::new("ldd").arg(file)) {
        for line in out.lines() {
            let path = line
                .split("=>")
                .last()
                .unwrap_or(line)
                .split_whitespace()
                .next()
                .unwrap_or("");
            if path.starts_with('/') {
                paths.push(PathBuf::from(path));
            }
        }
    }
    for p in paths {
        let to = root.join(p.strip_prefix("/").unwrap_or(&p));
        if to.exists() {
            continue;
        }
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        }
        // strip drops debug info only (symbols stay for backtraces); what it cannot read
        // (scripts, data) is copied as it is.
        if run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(&p))
        .is_err()
        {
            fs::copy(&p, &to).map_err(|e| io_err("copy", &p, e))?;
        }
    }
    Ok(())
}

/// Writes module `name` of the kernel's module tree to `to`, uncompressed (6.12's are .xz,
/// which busybox's insmod does not read).
fn module_into(modules: &Path, name: &str, to: &Path) -> Result<(), Error> {
    let file = find_module(modules, name).ok_or_else(|| Error::Parse {
        what: format!("kernel modules under {}", modules.display()),
        why: format!("no module {name}"),
    })?;
    if file.extension().is_some_and(|e| e == "xz") {
        let out = fs::File::create(to).map_err(|e| io_err("create", to, e))?;
        let status = Command::new("xz")
            .arg("-dc")
            .arg(&file)
            .stdout(out)
            .status()
            .map_err(|e| io_err("run xz on", &file, e))?;
        if !status.success() {
            return Err(Error::Command {
                command: format!("xz -dc {}", file.display()),
                status,
                stderr: String::new(),
            });
        }
        return Ok(());
    }
    fs::copy(&file, to).map_err(|e| io_err("copy", &file, e))?;
    Ok(())
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let path = e.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else {
            let file = e.file_name().to_string_lossy().into_owned();
            if file == format!("{name}.ko") || file == format!("{name}.ko.xz") {
                return Some(path);
            }
        }
    }
    None
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).map_err(|e| io_err("write", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io_err("chmod", path, e))
}

/// An uncompressed newc archive of `root`, as the kernel unpacks an initramfs.
fn cpio(root: &Path, out: &Path) -> Result<(), Error> {
    let list = run(Command::new("find").arg(".").current_dir(root))?;
    run_with_input(
        Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet", "-F"])
            .arg(out)
            .current_dir(root),
        list.as_bytes(),
    )?;
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
