//! A qemu guest with another kernel (Debian's 6.1 and 6.12, fetched by
//! scripts/guest-kernels.sh): boots an initramfs of the host's static busybox, mounts cgroup v2
//! alone (unified, as real clusters run it) and bpffs, and runs shell jobs sent over its serial
//! console, each job's output and exit status coming back the same way. With a network the
//! guest is a second node: a virtio NIC on a tap device inside a network namespace the guest
//! made, addressed from the benchmarking range, so traffic between it and the host crosses two
//! kernels and two TCP stacks.
//!
//! `/dev/kvm` here is a software nested hypervisor that cannot run stock kernels, so guests run
//! under software emulation (`-accel tcg`): boot takes ~5–10 s and figures taken inside are
//! relative, never absolute. `PODSHAPER_GUEST_ACCEL=kvm` uses KVM where it is real.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use base64::Engine;

use crate::{io_err, run, run_with_input, unique_name, Error, Netns};

/// Printed by the guest's init once it reads jobs from the console.
const READY_MARK: &str = "PODSHAPER-GUEST-READY";
/// How long the console may stay silent before the harness sends an empty line: under
/// emulation the guest's serial port sometimes sits on received bytes until more arrive
/// (seen on 6.1 and 6.12: a job sent whole never started until the next input).
const KICK: Duration = Duration::from_secs(1);
/// The shell's answer to the harness once it reads the console.
const PONG_MARK: &str = "PODSHAPER-GUEST-PONG";
/// How long to wait for that answer before asking again.
const PONG_WAIT: Duration = Duration::from_secs(2);
/// Printed before a job's output.
const BEGIN_MARK: &str = "PODSHAPER-GUEST-BEGIN";
/// Printed after a job, with its exit status: the harness reads the status from it, and its
/// absence says the guest died (panic, timeout) before the job ended.
const EXIT_MARK: &str = "PODSHAPER-GUEST-EXIT";
/// Memory of a guest: enough for the jobs and the test binaries in the initramfs.
const MEMORY_MB: u32 = 2048;
/// The tap device in the guest's network namespace: the host's end of its link.
pub const TAP: &str = "psguest0";
/// How long a guest gets to power off before it is killed.
const POWEROFF: Duration = Duration::from_secs(20);

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
    /// From sending the job (or, for [`Guest::run`], starting qemu) to its exit line.
    pub took: Duration,
}

/// What a guest is made of; [`Guest::boot`] starts it.
pub struct Guest {
    kernel: Kernel,
    timeout: Duration,
    files: Vec<PathBuf>,
    modules: Vec<String>,
    network: bool,
}

impl Guest {
    /// A guest of `kernel`; `timeout` bounds its boot and, for [`Guest::run`], its job.
    pub fn new(kernel: Kernel, timeout: Duration) -> Self {
        Self {
            kernel,
            timeout,
            files: Vec::new(),
            modules: Vec::new(),
            network: false,
        }
    }

    /// Host files to copy into the guest at the same paths; executables bring the shared
    /// libraries `ldd` names, and lose their debug info on the way (a debug test binary is
    /// 130 MB, and the initramfs lives in the guest's memory).
    /// Jobs must name them by path where busybox has an applet of the same name (`ip`): its sh
    /// runs its applets before looking at PATH.
    pub fn with_files(mut self, files: impl IntoIterator<Item = PathBuf>) -> Self {
        self.files.extend(files);
        self
    }

    /// Kernel modules (by name: "veth") the guest's init loads, in this order, before the
    /// first job: the cloud kernels build veth, sch_htb and the like as modules.
    pub fn with_modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Gives the guest a NIC on a tap device in a network namespace of its own (see
    /// [`GuestNode::HOST_V4`] and [`GuestNode::GUEST_V4`]).
    pub fn with_network(mut self) -> Self {
        self.network = true;
        self
    }

    /// Boots the guest, runs `job` (a busybox sh script) and powers it off.
    pub fn run(&self, job: &str) -> Result<Outcome, Error> {
        let started = Instant::now();
        let mut node = self.boot()?;
        let mut outcome = node.run(job, self.timeout)?;
        node.shutdown()?;
        outcome.took = started.elapsed();
        Ok(outcome)
    }

    /// Boots the guest and waits until it takes jobs. Everything it made (its directory, its
    /// network namespace and tap, the qemu process) goes when the node is dropped.
    pub fn boot(&self) -> Result<GuestNode, Error> {
        let dir = std::env::temp_dir().join(unique_name("-guest"));
        // Owned from here, so that a failure below still removes what was made.
        let mut node = GuestNode {
            release: self.kernel.release.clone(),
            dir,
            netns: None,
            qemu: None,
            stdin: None,
            lines: None,
            console: String::new(),
        };
        self.image(&node.dir)?;
        let mut cmd = if self.network {
            let ns = Netns::new()?;
            ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            ns.ip(&["addr", "add", &format!("{}/24", GuestNode::HOST_V4), "dev", TAP])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", GuestNode::HOST_V6),
                "dev",
                TAP,
                "nodad",
            ])?;
            ns.ip(&["link", "set", TAP, "up"])?;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name(), "qemu-system-x86_64"]);
            // No vhost-net here; romfile= skips the PXE ROM the NIC does not need.
            cmd.args([
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
            node.netns = Some(ns);
            cmd
        } else {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-net", "none"]);
            cmd
        };
        let accel = std::env::var("PODSHAPER_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into());
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
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(node.dir.join("initrd.cpio"))
            // panic=-1: a panic exits qemu (with -no-reboot) instead of hanging to the timeout.
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| Error::Io {
            what: "run qemu-system-x86_64 (scripts/deps.sh guest installs it)".into(),
            source: e,
        })?;
        node.stdin = child.stdin.take();
        let stdout = child.stdout.take();
        node.qemu = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Some(out) = stdout else { return };
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        node.lines = Some(rx);
        let started = Instant::now();
        node.wait_for(READY_MARK, self.timeout, started, "boot")?;
        // What is sent right after the mark can be lost while the console's reader starts:
        // ask until the shell answers.
        loop {
            node.send(&format!("echo {PONG_MARK}\n"))?;
            match node.wait_for(PONG_MARK, PONG_WAIT, Instant::now(), "the shell's answer") {
                Ok(_) => return Ok(node),
                Err(Error::Timeout { .. }) if started.elapsed() < self.timeout => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The guest's root file system under `dir/root`, archived as `dir/initrd.cpio`.
    fn image(&self, dir: &Path) -> Result<(), Error> {
        let root = dir.join("root");
        for d in ["bin", "proc", "sys", "dev", "tmp", "run", "var", "etc"] {
            fs::create_dir_all(root.join(d)).map_err(|e| io_err("create", &root.join(d), e))?;
        }
        let busybox = Path::new("/bin/busybox");
        fs::copy(busybox, root.join("bin/busybox")).map_err(|e| io_err("copy", busybox, e))?;
        for f in &self.files {
            copy_with_libraries(f, &root)?;
        }
        let mods = root.join("modules");
        fs::create_dir_all(&mods).map_err(|e| io_err("create", &mods, e))?;
        let mut names: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        if self.network {
            // The NIC is a virtio PCI device: its bus driver, then its driver.
            names.extend(["virtio_pci", "virtio_net"]);
        }
        let mut ordered = Vec::new();
        for name in names {
            with_dependencies(&self.kernel.modules, name, &mut ordered)?;
        }
        for (i, (name, bytes)) in ordered.iter().enumerate() {
            // Numbered, so that init loads them in dependency order.
            let to = mods.join(format!("{i:02}-{name}.ko"));
            fs::write(&to, bytes).map_err(|e| io_err("write", &to, e))?;
        }
        if self.network {
            let net = format!("{}/24 {}/64\n", GuestNode::GUEST_V4, GuestNode::GUEST_V6);
            write_file(&root.join("etc/guest-net"), &net, 0o644)?;
        }
        write_file(&root.join("init"), &init_script(), 0o755)?;
        cpio(&root, &dir.join("initrd.cpio"))
    }
}

/// A running guest that takes jobs, one at a time. Dropping it kills qemu and removes its
/// directory, network namespace and tap; [`GuestNode::shutdown`] powers it off first.
pub struct GuestNode {
    release: String,
    dir: PathBuf,
    netns: Option<Netns>,
    qemu: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Option<mpsc::Receiver<String>>,
    /// What the console printed before the guest died, for the error.
    console: String,
}

impl GuestNode {
    /// The host's end of the guest's link (on the tap, in [`GuestNode::netns`]).
    pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    /// The guest's address on its NIC.
    pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0x1, 0, 0, 0, 1);
    pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0x1, 0, 0, 0, 2);

    /// `uname -r` of the kernel the guest booted.
    pub fn release(&self) -> &str {
        &self.release
    }

    /// The network namespace holding the host's end of the guest's link, if it has one: run
    /// the host side of a test there (`command_in`, `Netns::run`).
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    /// Runs `job` (a busybox sh script, in a child shell with stdin from /dev/null) and
    /// returns its output and status; fails if the guest dies or the job outlives `timeout`.
    /// A job past its timeout runs on (it cannot be interrupted over the console): drop the
    /// node then rather than send it another job.
    pub fn run(&mut self, job: &str, timeout: Duration) -> Result<Outcome, Error> {
        let started = Instant::now();
        // The job travels as base64 lines appended to a file, so that nothing in it is taken
        // by the console's line discipline and no line outgrows it (here-documents hang busybox
        // sh reading from a pipe).
        let encoded = base64::engine::general_purpose::STANDARD.encode(job);
        let mut text = String::from(": > /tmp/job.b64\n");
        for chunk in encoded.as_bytes().chunks(76) {
            text.push_str(&format!(
                "echo {} >> /tmp/job.b64\n",
                String::from_utf8_lossy(chunk)
            ));
        }
        text.push_str(&format!(
            "base64 -d /tmp/job.b64 > /tmp/job.sh; echo {BEGIN_MARK}; sh /tmp/job.sh </dev/null 2>&1; echo \"{EXIT_MARK} $?\"\n"
        ));
        self.send(&text)?;
        self.wait_for(BEGIN_MARK, timeout, started, "the job's start")?;
        let output = self.wait_for(EXIT_MARK, timeout, started, "the job's end")?;
        let (output, status) = output.ok_or_else(|| Error::Parse {
            what: format!("the console of guest {}", self.release),
            why: format!("{EXIT_MARK} without a status"),
        })?;
        Ok(Outcome {
            status,
            output,
            took: started.elapsed(),
        })
    }

    /// Powers the guest off and waits for qemu to exit.
    pub fn shutdown(mut self) -> Result<(), Error> {
        let deadline = Instant::now() + POWEROFF;
        // Asked again each second: the console may sit on the first request (see KICK).
        loop {
            let _ = self.send("poweroff -f\n");
            let q = self.qemu.as_mut().ok_or_else(|| Error::Parse {
                what: format!("guest {}", self.release),
                why: "no qemu process".into(),
            })?;
            let kicked = Instant::now();
            while kicked.elapsed() < KICK {
                match q.try_wait() {
                    Ok(Some(_)) => {
                        self.qemu = None;
                        return Ok(());
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
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    command: format!("poweroff of guest {}", self.release),
                    secs: POWEROFF.as_secs(),
                });
            }
        }
    }

    fn send(&mut self, text: &str) -> Result<(), Error> {
        let stdin = self.stdin.as_mut().ok_or_else(|| Error::Parse {
            what: format!("guest {}", self.release),
            why: "its console is closed".into(),
        })?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| Error::Io {
                what: format!("write to the console of guest {}", self.release),
                source: e,
            })
    }

    /// Reads console lines until one starts with `mark`; returns the lines before it and the
    /// number after the mark, if any. An exited guest or `timeout` after `since` is an error,
    /// with what the console printed.
    fn wait_for(
        &mut self,
        mark: &str,
        timeout: Duration,
        since: Instant,
        what: &str,
    ) -> Result<Option<(String, i32)>, Error> {
        let deadline = since + timeout;
        let mut before = String::new();
        let lines = self.lines.as_ref().ok_or_else(|| Error::Parse {
            what: format!("guest {}", self.release),
            why: "its console is closed".into(),
        })?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(KICK)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(mark) {
                        return Ok(rest.trim().parse().ok().map(|status| (before, status)));
                    }
                    before.push_str(&line);
                    before.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left > KICK => {
                    // An empty line for the shell, which is a no-op to it.
                    if let Some(stdin) = self.stdin.as_mut() {
                        let _ = stdin.write_all(b"\n").and_then(|()| stdin.flush());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        command: format!("{what} in guest {}", self.release),
                        secs: timeout.as_secs(),
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.console.push_str(&before);
                    return Err(Error::Parse {
                        what: format!("the console of guest {}", self.release),
                        why: format!("the guest died before {what}:\n{}", self.console),
                    });
                }
            }
        }
    }
}

impl Drop for GuestNode {
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        // qemu is gone, so its tap goes with the namespace (dropped after this).
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The guest's /init: mounts what podshaper needs (cgroup v2 alone, bpffs; /tmp and /run stay
/// on the writable initramfs, where files copied under /tmp live), loads the
/// modules, brings up the NIC if the guest has one, then reads jobs from the console with
/// echo off (the harness sends each with its marks).
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
ln -s /run /var/run 2>/dev/null
ip link set lo up
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
if [ -s /etc/guest-net ]; then
  read v4 v6 < /etc/guest-net
  # No duplicate address detection: the link has two ends, both ours.
  echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
  ip link set eth0 up
  ip addr add "$v4" dev eth0
  ip addr add "$v6" dev eth0
fi
stty -echo
echo {READY_MARK}
# Through a pipe, so that sh is not interactive: no prompt, no line editing, no echo.
cat | sh
"#
    )
}
/// Where `program` is on this host's PATH, to copy it into a guest ([`Guest::with_files`]).
pub fn host_program(program: &str) -> Result<PathBuf, Error> {
    let out =
        run(Command::new("sh").args(["-c", &format!("command -v {program}")])).map_err(|_| Error::Parse {
            what: format!("the host's {program}"),
            why: "not installed (make deps installs it)".into(),
        })?;
    Ok(PathBuf::from(out.trim()))
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

/// Appends module `name` of the kernel's module tree to `out` after the modules it depends on
/// (its `depends=` field), each once, uncompressed (6.12's are .xz, which busybox's insmod does
/// not read). A module built into the kernel (modules.builtin) brings nothing: 6.12 builds
/// virtio in, 6.1 has it as a module.
fn with_dependencies(modules: &Path, name: &str, out: &mut Vec<(String, Vec<u8>)>) -> Result<(), Error> {
    if out.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let Some(file) = find_module(modules, name) else {
        let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
        if builtin
            .lines()
            .any(|l| l.rsplit('/').next() == Some(&format!("{name}.ko")))
        {
            return Ok(());
        }
        return Err(Error::Parse {
            what: format!("kernel modules under {}", modules.display()),
            why: format!("no module {name}, loadable or built in"),
        });
    };
    let bytes = if file.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(&file)
            .output()
            .map_err(|e| io_err("run xz on", &file, e))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("xz -dc {}", file.display()),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        out.stdout
    } else {
        fs::read(&file).map_err(|e| io_err("read", &file, e))?
    };
    for dep in depends(&bytes) {
        with_dependencies(modules, &dep, out)?;
    }
    out.push((name.to_string(), bytes));
    Ok(())
}

/// The `depends=a,b` field of a module's .modinfo, a NUL-terminated string in the file.
fn depends(module: &[u8]) -> Vec<String> {
    const FIELD: &[u8] = b"\0depends=";
    let Some(at) = module.windows(FIELD.len()).position(|w| w == FIELD) else {
        return Vec::new();
    };
    let rest = &module[at + FIELD.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
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
    fn a_modules_dependencies_come_from_its_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0";
        assert_eq!(depends(module), ["virtio_ring", "virtio", "net_failover"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(depends(b"\0name=veth\0").is_empty());
    }
}
