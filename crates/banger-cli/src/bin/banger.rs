//! `banger`, the CLI. See `banger_cli::main`.

fn main() -> std::process::ExitCode {
    banger_cli::main()
}
