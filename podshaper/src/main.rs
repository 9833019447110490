//! The podshaper binary: see `podshaper --help`.
fn main() -> std::process::ExitCode {
    podshaper::cli::main()
}
