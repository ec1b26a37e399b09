//! The CLI's surface generated from its clap definitions: shell completions
//! that ask a real daemon for names, and manual pages.

use std::process::Command;

use banger_testkit::test_daemon::{binary, TestDaemon};

/// What bash's completion function would get back for `words`, with the
/// cursor on the last word, from a `banger` pointed at `socket`.
fn bash_candidates(socket: &std::path::Path, words: &[&str]) -> Vec<String> {
    let output = Command::new(binary("banger"))
        .arg("--")
        .args(words)
        .env("COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
        .env("_CLAP_COMPLETE_COMP_TYPE", "9")
        .env("_CLAP_COMPLETE_SPACE", "true")
        .env("_CLAP_IFS", "\n")
        .env("BANGER_SOCKET", socket)
        .output()
        .expect("run banger");
    assert!(
        output.status.success(),
        "completion failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .filter(|line| !line.is_empty())
        .collect()
}

/// The candidates that are not flags.
fn values(candidates: Vec<String>) -> Vec<String> {
    candidates
        .into_iter()
        .filter(|candidate| !candidate.starts_with('-'))
        .collect()
}

#[test]
fn names_complete_from_the_daemon() {
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm",
        "create",
        "devbox",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--no-start",
    ]);
    daemon.banger_ok(&["disk", "create", "scratch", "64M"]);
    let socket = &daemon.socket;

    assert_eq!(
        values(bash_candidates(socket, &["banger", "vm", "show", ""])),
        ["devbox"]
    );
    assert_eq!(
        values(bash_candidates(socket, &["banger", "vm", "delete", "de"])),
        ["devbox"]
    );
    assert_eq!(
        values(bash_candidates(
            socket,
            &["banger", "vm", "create", "x", "--image", ""]
        )),
        ["image"]
    );
    assert_eq!(
        values(bash_candidates(socket, &["banger", "kernel", "rm", ""])),
        ["kernel"]
    );
    assert!(
        values(bash_candidates(socket, &["banger", "disk", "rm", ""]))
            .contains(&"scratch".to_owned())
    );
    // Subcommands complete from the definitions themselves.
    let top = values(bash_candidates(socket, &["banger", "vm", "cr"]));
    assert_eq!(top, ["create"]);
}

#[test]
fn completion_without_a_daemon_offers_nothing_and_does_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    // No names; only what the definitions know (the flags) is offered.
    let candidates = bash_candidates(&socket, &["banger", "vm", "show", ""]);
    assert!(
        candidates
            .iter()
            .all(|candidate| candidate.starts_with("--")),
        "{candidates:?}"
    );
}

#[test]
fn completion_scripts_for_each_shell_register_banger() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(binary("banger"))
            .args(["completions", shell])
            .output()
            .expect("run banger");
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(
            script.contains("COMPLETE=")
                || script.contains("COMPLETE \"")
                || script.contains("COMPLETE="),
            "{shell} script does not call back into banger:\n{script}"
        );
    }
    let output = Command::new(binary("banger"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run banger");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("error: Unknown shell `tcsh`: use one of bash"),
        "{stderr}"
    );
}

#[test]
fn bash_accepts_the_completion_script() {
    let output = Command::new(binary("banger"))
        .args(["completions", "bash"])
        .output()
        .expect("run banger");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("banger.bash");
    std::fs::write(&script, output.stdout).unwrap();
    let status = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .expect("run bash");
    assert!(status.success());
}

#[test]
fn manual_pages_cover_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary("banger"))
        .arg("manual-pages")
        .arg(dir.path())
        .output()
        .expect("run banger");
    assert!(output.status.success());
    for page in [
        "banger.1",
        "banger-vm.1",
        "banger-vm-create.1",
        "banger-vm-cp.1",
        "banger-image-import.1",
        "banger-completions.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|error| panic!("{page}: {error}"));
        assert!(
            text.starts_with(".ie"),
            "{page} is not roff: {}",
            &text[..40]
        );
        assert!(text.contains(".SH NAME"), "{page}");
    }
    // Hidden commands get no page.
    assert!(!dir.path().join("banger-manual-pages.1").exists());
}
