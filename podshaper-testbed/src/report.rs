//! What the Kubernetes benches share: running as root, percentiles, and their section of a
//! Markdown file (what precedes the section's marker is kept, the rest rewritten).
use std::{fmt::Write as _, future::Future, path::Path, time::Duration};

use anyhow::{bail, Result};

use crate::Table;

/// Runs `bench` on a multi-threaded runtime, as root only (`what`: why root is needed).
pub fn as_root<F: Future<Output = Result<()>>>(what: &str, bench: F) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root: {what}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench)
}

/// The `p` percentile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A bench's section of a Markdown file.
pub struct Section<'a> {
    /// The HTML comment that starts it.
    pub marker: &'a str,
    pub heading: &'a str,
    /// The make target that regenerates it.
    pub target: &'a str,
    /// The binary that writes it.
    pub writer: &'a str,
}

impl Section<'_> {
    /// Replaces (or appends) the section in `path`: how it was run, `lines`, then `table`.
    pub fn write(&self, path: &Path, table: &Table, lines: &[String]) -> Result<()> {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let head = old.split(self.marker).next().unwrap_or_default().trim_end();
        let output = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let rev = output("git", &["rev-parse", "--short", "HEAD"]);
        let mut md = format!("{head}\n\n{}\n## {}\n\n", self.marker, self.heading);
        writeln!(
            md,
            "<!-- Written by {}: regenerate with `{}` as root. -->\n",
            self.writer, self.target
        )?;
        writeln!(md, "- run: `{}` as root on {rev}, {date}", self.target)?;
        for l in lines {
            writeln!(md, "- {l}")?;
        }
        writeln!(md, "\n{}", table.to_markdown())?;
        std::fs::write(path, md)?;
        Ok(())
    }
}
