//! What users read: `--help` of the main commands and the errors of a
//! representative set of mistakes, against a real daemon in a temp dir
//! (fake-firecracker), kept by `insta` snapshots so they do not drift.
//! Every error is one `error:` line (the cause) and one `hint:` line (what
//! to do). Review changes with `cargo insta review` (or rerun with
//! `INSTA_UPDATE=always` and read the diff of tests/snapshots).

use std::process::Command;

use banger_testkit::test_daemon::{binary, TestDaemon};

/// `banger ARGS` in the daemon's temp dir, as `$ banger ...`, its exit
/// code and stderr, with the temp dir written as `[DIR]`.
fn transcript(daemon: &TestDaemon, args: &[&str]) -> String {
    // `--socket` first: a CLI pointed elsewhere than the daemon.
    let mut command = if args.first() == Some(&"--socket") {
        let mut command = Command::new(binary("banger"));
        command.env("NO_COLOR", "1");
        command
    } else {
        daemon.command()
    };
    let output = command
        .current_dir(daemon.dir.path())
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "banger {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let dir = daemon.dir.path().display().to_string();
    format!(
        "$ banger {}\nexit {}\n{}",
        args.join(" ").replace(&dir, "[DIR]"),
        output.status.code().unwrap_or(-1),
        stderr.replace(&dir, "[DIR]")
    )
}

#[test]
fn error_texts_say_the_cause_and_what_to_do() {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "dev", "--image", "image", "--kernel", "kernel",
    ]);
    let dir = daemon.dir.path();
    std::fs::write(dir.join("banger.toml"), "image = \"image\"\nmemroy = 512\n").unwrap();
    let fixture = dir.join("fixture.ext4").display().to_string();
    let cases: &[&[&str]] = &[
        &["vm", "show", "nosuch"],
        &["vm", "start", "nosuch"],
        &["vm", "create", "Bad_Name"],
        &[
            "vm", "create", "x", "--image", "nosuch", "--kernel", "kernel",
        ],
        &[
            "vm", "create", "x", "--image", "image", "--kernel", "nosuch",
        ],
        &[
            "vm", "create", "dev", "--image", "image", "--kernel", "kernel",
        ],
        &["vm", "create", "x", "--project", "banger.toml"],
        &["vm", "create", "x", "--workspace-dest", "/srv"],
        &["vm", "set", "dev", "--vcpus", "2"],
        &["vm", "cp", "a", "b"],
        &["vm", "run", "nosuch", "--", "true"],
        &["vm", "logs", "nosuch"],
        &["image", "import", "image", &fixture],
        &["image", "import", "new", "/nonexistent/disk.ext4"],
        &["image", "rm", "nosuch"],
        &["kernel", "rm", "nosuch"],
        &["disk", "create", "d", "lots"],
        &["operation", "cancel", "nosuch"],
        &["--socket", "/nonexistent/bangerd.sock", "vm", "list"],
    ];
    let mut all = Vec::new();
    let mut unhinted = Vec::new();
    for args in cases {
        let text = transcript(&daemon, args);
        // Progress messages may come first; the error ends the output.
        let lines: Vec<&str> = text
            .lines()
            .skip(2)
            .skip_while(|line| !line.starts_with("error: "))
            .collect();
        assert!(!lines.is_empty(), "no error line:\n{text}");
        assert!(lines.len() <= 2, "more than a cause and a hint:\n{text}");
        if !lines.get(1).is_some_and(|line| line.starts_with("hint: ")) {
            unhinted.push(text.clone());
        }
        all.push(text);
    }
    insta::assert_snapshot!("errors", all.join("\n"));
    assert!(
        unhinted.is_empty(),
        "errors without a hint:\n{}",
        unhinted.join("\n")
    );
    daemon.banger_ok(&["vm", "delete", "--force", "dev"]);
}

#[test]
fn help_texts() {
    for args in [
        &["--help"][..],
        &["vm", "--help"],
        &["vm", "create", "--help"],
        &["vm", "ssh", "--help"],
        &["vm", "logs", "--help"],
        &["image", "--help"],
        &["kernel", "--help"],
    ] {
        let output = Command::new(binary("banger"))
            .args(args)
            .env_remove("BANGER_SOCKET")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}");
        let name = format!("help_{}", args[..args.len() - 1].join("_"))
            .trim_end_matches('_')
            .to_owned();
        insta::assert_snapshot!(name, String::from_utf8_lossy(&output.stdout));
    }
}
