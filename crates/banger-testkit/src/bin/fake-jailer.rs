//! A stand-in for Firecracker's jailer used by banger's tests; see
//! `banger_testkit::fake_jailer` for what it does and where it differs.

use std::process::ExitCode;

fn main() -> ExitCode {
    banger_testkit::fake_jailer::main()
}
