//! `podshaper demo` (being written).
use anyhow::Result;

/// Options of the demo.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs the demo.
pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("demo not written yet")
}
