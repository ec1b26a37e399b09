//! `banger.toml` end to end: `vm create --workspace DIR` takes its defaults
//! from `DIR/banger.toml` (and `--project FILE` from FILE), flags win over
//! it, and a file with an unknown key is refused before there is a VM.
//! The guest is a `banger-agent` in host test mode, so the workspace's
//! guest directory is a host path under the test's temp dir.

use std::path::Path;
use std::process::Command;

use banger_testkit::test_daemon::TestDaemon;

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .envs([
            ("GIT_AUTHOR_NAME", "Host Person"),
            ("GIT_AUTHOR_EMAIL", "host@example.org"),
            ("GIT_COMMITTER_NAME", "Host Person"),
            ("GIT_COMMITTER_EMAIL", "host@example.org"),
            ("GIT_CONFIG_NOSYSTEM", "1"),
            ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ])
        .status()
        .expect("git is needed");
    assert!(status.success(), "git {args:?}");
}

#[test]
fn create_takes_defaults_from_the_project_file_and_flags_win() {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    let repo = daemon.dir.path().join("repo");
    let dest = daemon.dir.path().join("guest-repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(
        repo.join("banger.toml"),
        format!(
            "image = \"image\"\nkernel = \"kernel\"\nvcpus = 2\nmemory = 384\nworkspace_dest = \"{}\"\n",
            dest.display()
        ),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "init"]);

    // The file's image, kernel, vcpus and workspace; --memory wins.
    let repo_arg = repo.display().to_string();
    daemon.banger_ok(&[
        "vm",
        "create",
        "proj",
        "--workspace",
        &repo_arg,
        "--memory",
        "320",
    ]);
    let vm = daemon.vm("proj");
    assert_eq!(vm["image"], "image");
    assert_eq!(vm["kernel"], "kernel");
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["memory_mib"], 320);
    assert_eq!(
        std::fs::read_to_string(dest.join("hello.txt")).unwrap(),
        "hello\n"
    );

    // --project FILE with the workspace off: a plain VM from the file.
    let other = daemon.dir.path().join("other.toml");
    std::fs::write(
        &other,
        "image = \"image\"\nkernel = \"kernel\"\nmemory = 300\nworkspace = false\n",
    )
    .unwrap();
    let other_arg = other.display().to_string();
    daemon.banger_ok(&[
        "vm",
        "create",
        "plain",
        "--project",
        &other_arg,
        "--no-start",
    ]);
    let vm = daemon.vm("plain");
    assert_eq!(vm["memory_mib"], 300);
    assert_eq!(vm["state"], "stopped");

    // An unknown key: one line naming the key and the file, exit 2, no VM.
    std::fs::write(
        repo.join("banger.toml"),
        "image = \"image\"\nmemroy = 512\n",
    )
    .unwrap();
    let output = daemon.banger(&["vm", "create", "typo", "--workspace", &repo_arg]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "error: {}: unknown key `memroy`",
            repo.join("banger.toml").display()
        ),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("hint: a project file may set image, kernel,"),
        "{stderr}"
    );
    assert_eq!(lines.len(), 2, "{stderr}");
    let vms = daemon.banger_json(&["vm", "list"]);
    assert_eq!(vms.as_array().unwrap().len(), 2, "{vms}");

    daemon.banger_ok(&["vm", "delete", "--force", "proj"]);
    daemon.banger_ok(&["vm", "delete", "--force", "plain"]);
    daemon.assert_no_leaks();
}
