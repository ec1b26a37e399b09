//! Runs the built `banger` binary without a daemon: exit codes and the
//! one-line "not running" message.

use std::process::Command;

fn banger(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(args)
        .env_remove("BANGER_SOCKET")
        .env("NO_COLOR", "1")
        .output()
        .expect("run banger")
}

#[test]
fn missing_daemon_is_one_line_and_a_hint() {
    let output = banger(&["--socket", "/nonexistent/x.sock", "vm", "list"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr,
        "error: The banger daemon is not running (no socket at /nonexistent/x.sock)\n\
         hint: start it with `sudo bangerd` or `sudo systemctl start bangerd`\n"
    );
}

#[test]
fn socket_comes_from_the_environment() {
    let output = Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(["daemon", "status"])
        .env("BANGER_SOCKET", "/nonexistent/env.sock")
        .output()
        .expect("run banger");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("/nonexistent/env.sock"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let output = banger(&["vm", "set", "dev"]);
    assert_eq!(output.status.code(), Some(2));
    let output = banger(&["vm", "frobnicate"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn invalid_vm_name_is_refused_before_connecting() {
    let output = banger(&[
        "--socket",
        "/nonexistent/x.sock",
        "vm",
        "create",
        "Bad_Name",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("error: Name `Bad_Name` may only contain"),
        "{stderr}"
    );
}

#[test]
fn unknown_backend_is_a_usage_error_naming_it() {
    let output = banger(&[
        "--socket",
        "/nonexistent/x.sock",
        "vm",
        "create",
        "x",
        "--backend",
        "foo",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(
        errors,
        ["error: invalid value 'foo' for '--backend <BACKEND>': Unknown backend `foo`: use firecracker or qemu"],
        "{stderr}"
    );
}

#[test]
fn missing_import_file_is_named() {
    let output = banger(&[
        "--socket",
        "/nonexistent/x.sock",
        "image",
        "import",
        "base",
        "/nonexistent/base.ext4",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("/nonexistent/base.ext4"), "{stderr}");
}

#[test]
fn version_and_help_exit_0() {
    let output = banger(&["--version"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8(output.stdout)
        .unwrap()
        .starts_with("banger "));
    assert_eq!(banger(&["vm", "--help"]).status.code(), Some(0));
}
