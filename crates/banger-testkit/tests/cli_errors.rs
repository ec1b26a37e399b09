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
        without_durations(&stderr.replace(&dir, "[DIR]"))
    )
}

/// Stage lines (`  ✗ workspace (0.000s): ...`) with `[TIME]` for the duration.
fn without_durations(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            let stage = line.starts_with("  ✗ ") || line.starts_with("  ✓ ");
            match (stage, line.find(" ("), line.find("s)")) {
                (true, Some(open), Some(close)) if open < close => {
                    format!("{} ([TIME]){}", &line[..open], &line[close + 2..])
                }
                _ => line.to_owned(),
            }
        })
        .collect()
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
    daemon.banger_ok(&[
        "vm",
        "create",
        "off",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--no-start",
    ]);
    let dir = daemon.dir.path();
    std::fs::write(dir.join("banger.toml"), "image = \"image\"\nmemroy = 512\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image, not a kernel\n").unwrap();
    let fixture = dir.join("fixture.ext4").display().to_string();
    let notes = dir.join("notes.txt").display().to_string();
    let missing = dir.join("missing").display().to_string();
    let image = ["--image", "image", "--kernel", "kernel"];
    let create = |name: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["vm", "create", name];
        args.extend(image);
        args.extend(extra);
        args
    };
    let vcpus_0 = create("x", &["--vcpus", "0"]);
    let memory_1 = create("x", &["--memory", "1"]);
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
        // What a create or `vm set` asks for.
        &vcpus_0,
        &memory_1,
        &["vm", "create", "x", "--project", "nosuch.toml"],
        &["vm", "create", "x", "--from-snapshot", "nosuch"],
        &["vm", "set", "off", "--disk-size", "1M"],
        &["vm", "set", "off", "--disk-size", "lots"],
        // A VM's state.
        &["vm", "run", "off", "--", "true"],
        &["vm", "delete", "dev"],
        &["vm", "port", "dev", "add", "8080:80"],
        &["vm", "fork", "dev", "Bad_Name"],
        // The guest agent and host files.
        &["vm", "run", "dev", "--", "/nonexistent/command"],
        &["vm", "cp", "dev:/a", "off:/b"],
        &["vm", "cp", &missing, "dev:/root/"],
        &["vm", "cp", "dev:/", "out"],
        &["vm", "cp", "dev:/nonexistent", "out"],
        &["vm", "workspace", "prepare", "dev", &notes],
        &[
            "vm",
            "workspace",
            "prepare",
            "dev",
            ".",
            "--dest",
            "relative",
        ],
        // Images, kernels, disks, snapshots, the catalog.
        &["image", "import", "Bad/Name", &fixture],
        &["image", "import", "new", &notes],
        &["image", "rm", "image"],
        &["image", "pull", "nosuch"],
        &["kernel", "import", "k", &notes],
        &["disk", "create", "d", "1M"],
        &["disk", "create", "Bad_Name", "1G"],
        &["disk", "rm", "nosuch"],
        &["snapshot", "rm", "nosuch"],
        &["completions", "nosuch"],
    ];
    let mut all = Vec::new();
    let mut malformed = Vec::new();
    for args in cases {
        let text = transcript(&daemon, args);
        // Progress messages may come first; the error ends the output.
        let lines: Vec<&str> = text
            .lines()
            .skip(2)
            .skip_while(|line| !line.starts_with("error: "))
            .collect();
        // One `error:` line, then one `hint:` line.
        if lines.len() != 2 || !lines[1].starts_with("hint: ") {
            malformed.push(text.clone());
        }
        all.push(text);
    }
    insta::assert_snapshot!("errors", all.join("\n"));
    assert!(
        malformed.is_empty(),
        "errors that are not one cause and one hint:\n{}",
        malformed.join("\n")
    );
    daemon.banger_ok(&["vm", "delete", "--force", "dev"]);
    daemon.banger_ok(&["vm", "delete", "off"]);
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
