//! Compiles the BPF programs (bpf/*.bpf.c) with clang into $OUT_DIR, and a host probe that
//! prints the C layout of podshaper.h so the Rust mirrors can be checked against it.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const OBJECTS: &[&str] = &["sock_ops", "cgroup_skb"];

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("run {cmd:?} (is clang installed? `make deps`)"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn main() -> Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = match env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        other => bail!("unsupported target arch {other}"),
    };
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    for f in ["bpf/podshaper.h", "bpf/maps.h", "bpf/abi_probe.c"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    for name in OBJECTS {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        run(Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", &multiarch])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.bpf.o"))))?;
    }
    let probe = out.join("abi_probe");
    run(Command::new(&clang)
        .args(["-O0", &multiarch, "bpf/abi_probe.c", "-o"])
        .arg(&probe))?;
    let layout = run(&mut Command::new(&probe))?;
    std::fs::write(out.join("abi_layout.rs"), layout)?;
    Ok(())
}
