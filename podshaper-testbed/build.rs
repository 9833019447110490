//! Compiles the tests' own BPF programs (bpf/*.bpf.c) with clang into $OUT_DIR.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const OBJECTS: &[&str] = &["cb_probe", "edt", "forge", "third_party"];

fn main() -> Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    println!("cargo:rerun-if-env-changed=CLANG");
    // The rate option's format (kind, length, ExID) comes from the datapath's own header.
    let datapath = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../podshaper-ebpf/bpf");
    println!(
        "cargo:rerun-if-changed={}",
        datapath.join("rate_option.h").display()
    );
    for name in OBJECTS {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{arch}-linux-gnu"))
            .arg("-I")
            .arg(&datapath)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.bpf.o")));
        let o = cmd
            .output()
            .with_context(|| format!("run {cmd:?} (is clang installed? `make deps`)"))?;
        if !o.status.success() {
            bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    Ok(())
}
