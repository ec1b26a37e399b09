//! `banger-bench`, the benchmark suite. See `banger_bench::main`.

fn main() -> std::process::ExitCode {
    banger_bench::main()
}
