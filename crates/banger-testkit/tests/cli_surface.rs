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
        stderr.starts_with("error: Unknown shell `tcsh`\nhint: use one of bash"),
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

/// Every leaf command of the clap tree, as its words (`vm workspace export`).
fn leaf_commands(
    command: &clap::Command,
    path: &mut Vec<String>,
    out: &mut Vec<(String, clap::Command)>,
) {
    let children: Vec<&clap::Command> = command
        .get_subcommands()
        .filter(|child| child.get_name() != "help")
        .collect();
    if children.is_empty() {
        out.push((path.join(" "), command.clone()));
    }
    for child in children {
        path.push(child.get_name().to_owned());
        leaf_commands(child, path, out);
        path.pop();
    }
}

/// Commands whose output is not a record or an event stream: the guest's
/// own bytes, an interactive session, or a file for a shell or `man`.
const NO_JSON: &[&str] = &[
    "vm run",
    "vm ssh",
    "vm ssh-proxy",
    "ssh-config",
    "completions",
    "manual-pages",
];

/// Long commands: daemon operations followed with stages and byte bars,
/// whose `--json` is the event stream as JSON lines, not one record.
const LONG: &[&str] = &[
    "vm create",
    "vm fork",
    "image import",
    "image pull",
    "kernel import",
    "kernel pull",
];

#[test]
fn every_read_and_long_command_has_json() {
    use clap::CommandFactory;
    let mut leaves = Vec::new();
    leaf_commands(
        &banger_cli::args::Cli::command(),
        &mut Vec::new(),
        &mut leaves,
    );
    assert!(leaves.len() > 30, "{}", leaves.len());
    let mut missing = Vec::new();
    for (path, command) in &leaves {
        let has_json = command
            .get_arguments()
            .any(|argument| argument.get_long() == Some("json"));
        if NO_JSON.contains(&path.as_str()) {
            assert!(!has_json, "`{path}` is listed without --json but has it");
        } else if !has_json {
            missing.push(path.clone());
        }
    }
    assert!(missing.is_empty(), "without --json: {missing:?}");
    for long in LONG {
        let (_, command) = leaves
            .iter()
            .find(|(path, _)| path == long)
            .unwrap_or_else(|| panic!("no command `{long}`"));
        let help = command
            .get_arguments()
            .find(|argument| argument.get_long() == Some("json"))
            .and_then(|argument| argument.get_help().map(ToString::to_string))
            .unwrap_or_default();
        assert!(
            help.contains("JSON lines"),
            "`{long} --json` is not described as an event stream: {help:?}"
        );
    }
    for exempt in NO_JSON {
        assert!(
            leaves.iter().any(|(path, _)| path == exempt),
            "no command `{exempt}`"
        );
    }
}
