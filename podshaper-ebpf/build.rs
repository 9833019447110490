//! Compiles the BPF programs (bpf/*.bpf.c) with clang into $OUT_DIR, a host probe that
//! prints the C layout of podshaper.h so the Rust mirrors can be checked against it, and the
//! controller's arithmetic (bpf/controller.h) for the host, twice (as is and undamped), as
//! static libraries that only the unit tests link (src/controller.rs).
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
    // The whole directory: cargo rescans it, so a new header is never missed.
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    for name in OBJECTS {
        let src = format!("bpf/{name}.bpf.c");
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

    // cc archives the objects; linking is left to the tests' #[link] attributes, so the
    // product never carries them.
    for (lib, undamped) in [("ps_controller", false), ("ps_controller_undamped", true)] {
        let dir = out.join(lib);
        std::fs::create_dir_all(&dir)?;
        let mut build = cc::Build::new();
        build
            .compiler(&clang)
            .file("bpf/controller_host.c")
            .include(format!("/usr/include/{arch}-linux-gnu"))
            .flag("-Wall")
            .flag("-Werror")
            .out_dir(&dir)
            .cargo_metadata(false);
        if undamped {
            build.define("PS_HOST_UNDAMPED", None);
        }
        build.try_compile(lib).with_context(|| format!("compile {lib}"))?;
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    Ok(())
}
