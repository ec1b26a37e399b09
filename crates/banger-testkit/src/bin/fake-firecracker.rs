//! A stand-in for the Firecracker VMM used by banger's tests; see
//! `banger_testkit::fake_firecracker` for what it enforces and how to steer it.

use std::process::ExitCode;

fn main() -> ExitCode {
    banger_testkit::fake_firecracker::main()
}
