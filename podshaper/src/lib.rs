//! The one podshaper binary: the daemon, the CLI that drives it, and the demo.
pub mod cli;
pub mod demo;
