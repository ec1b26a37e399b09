//! `vm workspace prepare|export` and `vm create --workspace` end to end:
//! bangerd and the real CLI, fake-firecracker whose guest is a
//! `banger-agent` in host test mode, and real git repositories made here.
//! In that mode guest paths are host paths, so every workspace goes to a
//! `--dest` under the test's temp dir.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use banger_testkit::test_daemon::TestDaemon;
use sha2::{Digest, Sha256};

/// Every git the tests run: a fixed identity, no user or system config.
const GIT_ENV: [(&str, &str); 6] = [
    ("GIT_AUTHOR_NAME", "Host Person"),
    ("GIT_AUTHOR_EMAIL", "host@example.org"),
    ("GIT_COMMITTER_NAME", "Host Person"),
    ("GIT_COMMITTER_EMAIL", "host@example.org"),
    ("GIT_CONFIG_NOSYSTEM", "1"),
    ("GIT_CONFIG_GLOBAL", "/dev/null"),
];

fn git_output(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .envs(GIT_ENV)
        .output()
        .expect("git is needed")
}

/// `git ARGS` in `dir`; asserts success, returns stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = git_output(dir, args);
    assert!(
        output.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 git output")
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Bytes no text filter would leave alone.
fn binary_bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|index| {
            u8::try_from(index % 251)
                .unwrap()
                .wrapping_mul(seed)
                .wrapping_add(seed)
        })
        .chain([0, 255, 0, 13, 10])
        .collect()
}

fn init_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
}

fn daemon_with_vm(name: &str) -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", name, "--image", "image", "--kernel", "kernel",
    ]);
    daemon
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `sh -c SCRIPT` in the guest, in `dir`, with a guest git identity.
fn guest_sh(daemon: &TestDaemon, vm: &str, dir: &Path, script: &str) -> String {
    daemon.banger_ok(&[
        "vm",
        "run",
        "-w",
        s(dir),
        "-e",
        "GIT_AUTHOR_NAME=Guest Person",
        "-e",
        "GIT_AUTHOR_EMAIL=guest@example.org",
        "-e",
        "GIT_COMMITTER_NAME=Guest Person",
        "-e",
        "GIT_COMMITTER_EMAIL=guest@example.org",
        "-e",
        "GIT_CONFIG_GLOBAL=/dev/null",
        vm,
        "--",
        "sh",
        "-c",
        script,
    ])
}

/// One entry of a tree as git records it: `100644`/`100755` and the
/// content, or `120000` and the link target.
type Snapshot = BTreeMap<String, (u32, Vec<u8>)>;

/// Files and symlinks under `root` (not `.git`, not the `skip` paths).
fn snapshot(root: &Path, skip: &[&str]) -> Snapshot {
    fn walk(root: &Path, relative: &Path, skip: &[&str], out: &mut Snapshot) {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(relative))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        entries.sort();
        for name in entries {
            let path = relative.join(&name);
            let key = path.to_str().unwrap().to_owned();
            if key == ".git" || skip.contains(&key.as_str()) {
                continue;
            }
            let full = root.join(&path);
            let metadata = std::fs::symlink_metadata(&full).unwrap();
            if metadata.file_type().is_symlink() {
                let target = std::fs::read_link(&full).unwrap();
                out.insert(
                    key,
                    (0o120_000, target.to_str().unwrap().as_bytes().to_vec()),
                );
            } else if metadata.is_dir() {
                walk(root, &path, skip, out);
            } else {
                let mode = if metadata.permissions().mode() & 0o111 == 0 {
                    0o100_644
                } else {
                    0o100_755
                };
                out.insert(key, (mode, std::fs::read(&full).unwrap()));
            }
        }
    }
    let mut out = Snapshot::new();
    walk(root, Path::new(""), skip, &mut out);
    out
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Names in `dir` starting with `prefix`.
fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A repository with a bit of everything prepare has to carry: a submodule,
/// a symlink, an absolute symlink, an executable, a binary file, ignored
/// files, and uncommitted (staged, unstaged, deleted, untracked) changes.
fn rich_repo(work: &Path) -> PathBuf {
    let library = work.join("library");
    init_repo(&library);
    write(&library.join("lib.txt"), "library v1\n");
    git(&library, &["add", "."]);
    git(&library, &["commit", "-q", "-m", "library"]);

    let host = work.join("host");
    init_repo(&host);
    write(&host.join("README"), "top\n");
    write(&host.join("run.sh"), "#!/bin/sh\necho run\n");
    chmod(&host.join("run.sh"), 0o755);
    write(&host.join("data/blob.bin"), binary_bytes(7, 5000));
    write(&host.join("dir/staged.txt"), "before\n");
    write(&host.join("gone.txt"), "to be deleted\n");
    write(&host.join(".gitignore"), "*.log\nbuild/\n");
    std::os::unix::fs::symlink("README", host.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", host.join("absolute-link")).unwrap();
    git(&host, &["add", "."]);
    git(
        &host,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            s(&library),
            "sub",
        ],
    );
    git(&host, &["commit", "-q", "-m", "first"]);

    // The working state prepare must reproduce.
    write(&host.join("README"), "top, edited\n");
    write(&host.join("dir/staged.txt"), "after\n");
    git(&host, &["add", "dir/staged.txt"]);
    std::fs::remove_file(host.join("gone.txt")).unwrap();
    write(&host.join("new.txt"), "untracked\n");
    write(&host.join("debug.log"), "ignored\n");
    write(&host.join("build/out.o"), binary_bytes(3, 100));
    write(&host.join("sub/extra.txt"), "untracked in the submodule\n");
    host
}

fn status(dir: &Path) -> String {
    git(
        dir,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain=v1",
            "--untracked-files=all",
            "--ignore-submodules=none",
        ],
    )
}

#[test]
fn prepare_sends_the_working_tree_as_git_sees_it() {
    let daemon = daemon_with_vm("ws");
    let work = daemon.dir.path().join("prepare");
    let host = rich_repo(&work);
    let dest = work.join("guest/repo");

    let output = daemon.banger(&[
        "vm",
        "workspace",
        "prepare",
        "ws",
        s(&host),
        "--dest",
        s(&dest),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("✓ workspace"), "{stderr}");
    assert!(stderr.contains("files"), "{stderr}");

    // git in the guest (through the agent) sees what git on the host sees.
    let guest_status = guest_sh(
        &daemon,
        "ws",
        &dest,
        "git --no-optional-locks status --porcelain=v1 --untracked-files=all --ignore-submodules=none",
    );
    assert_eq!(guest_status, status(&host));
    assert!(guest_status.contains(" M README"), "{guest_status}");
    assert!(guest_status.contains("M  dir/staged.txt"), "{guest_status}");
    assert!(guest_status.contains(" D gone.txt"), "{guest_status}");
    assert!(guest_status.contains("?? new.txt"), "{guest_status}");
    // The submodule has untracked content.
    assert!(guest_status.contains(" M sub"), "{guest_status}");
    for args in [&["diff"][..], &["diff", "--cached"], &["rev-parse", "HEAD"]] {
        assert_eq!(git(&dest, args), git(&host, args), "git {args:?}");
    }

    // The files themselves, bit for bit, modes and links included.
    assert_eq!(
        snapshot(&dest, &[]),
        snapshot(&host, &["debug.log", "build"])
    );
    assert!(!dest.join("debug.log").exists());
    assert!(!dest.join("build").exists());
    assert_eq!(
        std::fs::metadata(dest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("README")
    );
    assert_eq!(
        std::fs::read_link(dest.join("absolute-link")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        std::fs::read(dest.join("data/blob.bin")).unwrap(),
        binary_bytes(7, 5000)
    );
    // The submodule as checked out: its .git file points into .git/modules.
    assert_eq!(
        std::fs::read_to_string(dest.join("sub/lib.txt")).unwrap(),
        "library v1\n"
    );
    assert!(dest.join("sub/.git").is_file());
    assert!(dest.join(".git/modules/sub").is_dir());
    assert_eq!(
        git(&dest.join("sub"), &["status", "--porcelain"]),
        "?? extra.txt\n"
    );

    // The base is recorded.
    assert_eq!(
        std::fs::read_to_string(dest.join(".git/banger-workspace-base")).unwrap(),
        git(&host, &["rev-parse", "HEAD"])
    );

    // Ignored files go too when asked.
    let again = work.join("guest/with-ignored");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "ws",
        s(&host),
        "--dest",
        s(&again),
        "--include-ignored",
    ]);
    assert_eq!(
        std::fs::read_to_string(again.join("debug.log")).unwrap(),
        "ignored\n"
    );
    assert_eq!(
        std::fs::read(again.join("build/out.o")).unwrap(),
        binary_bytes(3, 100)
    );
    assert_eq!(snapshot(&again, &[]), snapshot(&host, &[]));

    // PATH defaults to the current directory's top level.
    let from_cwd = work.join("guest/from-cwd");
    let output = daemon
        .command()
        .current_dir(host.join("dir"))
        .args(["vm", "workspace", "prepare", "ws", "--dest", s(&from_cwd)])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(snapshot(&from_cwd, &[]), snapshot(&dest, &[]));

    // Nothing was left on the host.
    assert_eq!(
        status(&host),
        git(
            &dest,
            &[
                "status",
                "--porcelain=v1",
                "--untracked-files=all",
                "--ignore-submodules=none"
            ]
        )
    );
    assert!(leftovers(&host, ".banger").is_empty());
    assert!(leftovers(&host.join(".git"), "banger").is_empty());
}

#[test]
fn prepare_refuses_to_replace_a_workspace_without_force() {
    let daemon = daemon_with_vm("again");
    let work = daemon.dir.path().join("refuse");
    let host = work.join("host");
    init_repo(&host);
    write(&host.join("file.txt"), "one\n");
    git(&host, &["add", "."]);
    git(&host, &["commit", "-q", "-m", "one"]);
    let dest = work.join("guest/repo");
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "vm",
            "workspace",
            "prepare",
            "again",
            s(&host),
            "--dest",
            s(&dest),
        ];
        args.extend_from_slice(extra);
        daemon.banger(&args)
    };
    assert!(prepare(&[]).status.success());
    write(&dest.join("work-in-the-guest.txt"), "precious\n");
    write(&host.join("file.txt"), "two\n");

    let output = prepare(&[]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("already has a workspace at"), "{error}");
    assert!(error.contains("--force"), "{error}");
    assert_eq!(
        std::fs::read_to_string(dest.join("work-in-the-guest.txt")).unwrap(),
        "precious\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("file.txt")).unwrap(),
        "one\n"
    );

    // Other files there are refused too.
    let other = work.join("guest/other");
    write(&other.join("x"), "x\n");
    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "prepare",
        "again",
        s(&host),
        "--dest",
        s(&other),
    ]);
    assert!(error.contains("already has files at"), "{error}");
    assert_eq!(std::fs::read_to_string(other.join("x")).unwrap(), "x\n");

    // --force replaces it: removed, then sent.
    assert!(prepare(&["--force"]).status.success());
    assert!(!dest.join("work-in-the-guest.txt").exists());
    assert_eq!(
        std::fs::read_to_string(dest.join("file.txt")).unwrap(),
        "two\n"
    );

    // An empty directory is not a workspace to protect.
    let empty = work.join("guest/empty");
    std::fs::create_dir_all(&empty).unwrap();
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "again",
        s(&host),
        "--dest",
        s(&empty),
    ]);
    assert!(empty.join(".git/banger-workspace-base").is_file());
}

#[test]
fn a_directory_that_is_not_a_repository() {
    let daemon = daemon_with_vm("plain");
    let work = daemon.dir.path().join("plain");
    let source = work.join("notes");
    write(&source.join("a.txt"), "a\n");
    write(&source.join("deep/b.sh"), "#!/bin/sh\n");
    chmod(&source.join("deep/b.sh"), 0o750);
    let dest = work.join("guest/notes");

    let output = daemon.banger(&[
        "vm",
        "workspace",
        "prepare",
        "plain",
        s(&source),
        "--dest",
        s(&dest),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("is not in a git working tree"), "{error}");
    assert!(error.contains("--no-git"), "{error}");
    assert!(!dest.exists());

    // --no-git copies it as it is.
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "plain",
        s(&source),
        "--dest",
        s(&dest),
        "--no-git",
    ]);
    assert_eq!(snapshot(&dest, &[]), snapshot(&source, &[]));
    assert_eq!(
        std::fs::metadata(dest.join("deep/b.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    assert!(!dest.join(".git").exists());
    // ...and there is nothing to export from it.
    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "export",
        "plain",
        "--dest",
        s(&dest),
        "--patch",
        s(&work.join("p.patch")),
    ]);
    assert!(error.contains("has no workspace at"), "{error}");
    assert!(!work.join("p.patch").exists());
    assert!(leftovers(&work, ".p.patch").is_empty());

    // vm create --workspace refuses before making a VM.
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "never",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--workspace",
        s(&source),
    ]);
    assert!(error.contains("is not in a git working tree"), "{error}");
    let vms = daemon.banger_json(&["vm", "list"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
}

/// The guest's edits for the export tests: a commit, then every kind of
/// uncommitted change.
const GUEST_WORK: &str = r"set -e
echo 'committed in the guest' >> a.txt
git commit -q -am 'guest commit'
echo 'edited, unstaged' >> b.txt
echo 'edited, staged' >> s.txt && git add s.txt
git rm -q c.txt
mv d.txt renamed.txt
chmod +x script.sh
printf '\000\001\002\377binary\r\n' > new.bin
head -c 3000 data.bin > data.tmp && printf '\377\376' >> data.tmp && mv data.tmp data.bin
ln -s a.txt new-link
echo untracked > untracked.txt
echo ignored > noise.log
";

/// A committed repository for the export tests.
fn export_repo(work: &Path) -> PathBuf {
    let host = work.join("host");
    init_repo(&host);
    for name in ["a.txt", "b.txt", "c.txt", "s.txt"] {
        write(&host.join(name), format!("{name}\n"));
    }
    write(
        &host.join("d.txt"),
        "to be renamed, long enough to be seen as a rename\n".repeat(4),
    );
    write(&host.join("script.sh"), "#!/bin/sh\necho hi\n");
    write(&host.join("data.bin"), binary_bytes(11, 4000));
    write(&host.join(".gitignore"), "*.log\n");
    git(&host, &["add", "."]);
    git(&host, &["commit", "-q", "-m", "base"]);
    host
}

fn file_hash(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap())
}

#[test]
fn export_as_a_patch_applies_to_the_base() {
    let daemon = daemon_with_vm("patch");
    let work = daemon.dir.path().join("patch");
    let host = export_repo(&work);
    let base = git(&host, &["rev-parse", "HEAD"]).trim().to_owned();
    let dest = work.join("guest/repo");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "patch",
        s(&host),
        "--dest",
        s(&dest),
    ]);
    guest_sh(&daemon, "patch", &dest, GUEST_WORK);
    let guest_index = file_hash(&dest.join(".git/index"));
    let guest_head = git(&dest, &["rev-parse", "HEAD"]);

    let out = work.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let patch = out.join("work.patch");
    let output = daemon.banger(&[
        "vm",
        "workspace",
        "export",
        "patch",
        "--dest",
        s(&dest),
        "--patch",
        s(&patch),
    ]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&std::fs::read(&patch).unwrap()).into_owned();
    assert!(text.contains("GIT binary patch"), "{text}");
    assert!(text.contains("new mode 100755"), "{text}");
    assert!(text.contains("rename from d.txt"), "{text}");
    assert!(text.contains("deleted file mode"), "{text}");
    assert!(
        !text.contains("noise.log"),
        "ignored files are not exported"
    );
    assert_eq!(leftovers(&out, ""), vec!["work.patch".to_owned()]);

    // A fresh clone at the base, patched, is the guest's tree byte for byte.
    let clone = work.join("clone");
    git(&work, &["clone", "-q", s(&host), s(&clone)]);
    git(&clone, &["checkout", "-q", &base]);
    git(&clone, &["apply", "--check", s(&patch)]);
    git(&clone, &["apply", s(&patch)]);
    assert_eq!(snapshot(&clone, &[]), snapshot(&dest, &["noise.log"]));

    // The guest's repository is as it was: same index, HEAD, no leftovers.
    assert_eq!(file_hash(&dest.join(".git/index")), guest_index);
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]), guest_head);
    assert_eq!(git(&dest, &["for-each-ref", "refs/banger-export"]), "");
    assert!(leftovers(&dest.join(".git"), "banger-export").is_empty());

    // An existing file is not overwritten without --force.
    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "export",
        "patch",
        "--dest",
        s(&dest),
        "--patch",
        s(&patch),
    ]);
    assert!(error.contains("already exists"), "{error}");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "patch",
        "--dest",
        s(&dest),
        "--patch",
        s(&patch),
        "--force",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&patch).unwrap()),
        text
    );
}

/// What must not change in the host repository: index entries, status,
/// HEAD, the index file and every working-tree file.
fn host_state(host: &Path) -> (String, String, String, String, Snapshot) {
    (
        sha256(git(host, &["ls-files", "-s"]).as_bytes()),
        status(host),
        git(host, &["symbolic-ref", "HEAD"]),
        file_hash(&host.join(".git/index")),
        snapshot(host, &[]),
    )
}

/// The tree of `dir`'s working state, computed apart from banger.
fn working_tree_id(dir: &Path, scratch: &Path) -> String {
    let index = scratch.join("index");
    let _ = std::fs::remove_file(&index);
    std::fs::copy(dir.join(".git/index"), &index).unwrap();
    let run = |args: &[&str]| {
        let output = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .envs(GIT_ENV)
            .env("GIT_INDEX_FILE", &index)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    run(&["add", "-A"]);
    let tree = run(&["write-tree"]).trim().to_owned();
    std::fs::remove_file(&index).unwrap();
    tree
}

#[test]
fn export_as_a_branch_leaves_the_host_checkout_alone() {
    let daemon = daemon_with_vm("branch");
    let work = daemon.dir.path().join("branch");
    let host = export_repo(&work);
    let base = git(&host, &["rev-parse", "HEAD"]).trim().to_owned();
    let dest = work.join("guest/repo");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "branch",
        s(&host),
        "--dest",
        s(&dest),
    ]);
    guest_sh(&daemon, "branch", &dest, GUEST_WORK);
    let guest_index = file_hash(&dest.join(".git/index"));
    let guest_head = git(&dest, &["rev-parse", "HEAD"]).trim().to_owned();

    // The host goes on with its own uncommitted work meanwhile.
    write(&host.join("a.txt"), "host edit\n");
    write(&host.join("b.txt"), "host staged\n");
    git(&host, &["add", "b.txt"]);
    write(&host.join("host-only.txt"), "host untracked\n");
    let before = host_state(&host);

    let output = daemon.banger(&[
        "vm",
        "workspace",
        "export",
        "branch",
        "--dest",
        s(&dest),
        "--branch",
        "from-guest",
        s(&host),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(host_state(&host), before, "the host checkout changed");

    // The guest's commit, then one commit with everything uncommitted.
    let scratch = work.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_eq!(
        git(&host, &["rev-parse", "from-guest^{tree}"]).trim(),
        working_tree_id(&dest, &scratch)
    );
    assert_eq!(git(&host, &["rev-parse", "from-guest^"]).trim(), guest_head);
    assert_eq!(
        git(
            &host,
            &["rev-list", "--count", &format!("{base}..from-guest")]
        )
        .trim(),
        "2"
    );
    assert_eq!(
        git(&host, &["log", "-1", "--format=%s", "from-guest^"]).trim(),
        "guest commit"
    );
    // Checked out elsewhere, the branch is the guest's tree byte for byte.
    let checkout = work.join("checkout");
    git(
        &work,
        &["clone", "-q", "-b", "from-guest", s(&host), s(&checkout)],
    );
    assert_eq!(snapshot(&checkout, &[]), snapshot(&dest, &["noise.log"]));

    // The guest is untouched and nothing is left on either side.
    assert_eq!(file_hash(&dest.join(".git/index")), guest_index);
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]).trim(), guest_head);
    assert_eq!(git(&dest, &["for-each-ref", "refs/banger-export"]), "");
    assert!(leftovers(&dest.join(".git"), "banger-export").is_empty());
    assert!(leftovers(&host.join(".git"), "banger-export").is_empty());

    // An existing branch is refused without --force, replaced with it.
    let export = |extra: &[&str]| {
        let mut args = vec![
            "vm",
            "workspace",
            "export",
            "branch",
            "--dest",
            s(&dest),
            "--branch",
            "from-guest",
        ];
        args.extend_from_slice(extra);
        args.push(s(&host));
        daemon.banger(&args)
    };
    let output = export(&[]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("Branch `from-guest` already exists"),
        "{error}"
    );
    guest_sh(&daemon, "branch", &dest, "echo more >> untracked.txt");
    let output = export(&["--force"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        git(&host, &["rev-parse", "from-guest^{tree}"]).trim(),
        working_tree_id(&dest, &scratch)
    );
    assert_eq!(host_state(&host), before, "the host checkout changed");

    // The checked-out branch is never replaced.
    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "export",
        "branch",
        "--dest",
        s(&dest),
        "--branch",
        "main",
        "--force",
        s(&host),
    ]);
    assert!(error.contains("is checked out"), "{error}");
    assert_eq!(host_state(&host), before, "the host checkout changed");

    // A repository without the base commit is refused, not guessed at.
    let other = work.join("other");
    init_repo(&other);
    write(&other.join("x"), "x\n");
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "unrelated"]);
    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "export",
        "branch",
        "--dest",
        s(&dest),
        "--branch",
        "b",
        s(&other),
    ]);
    assert!(
        error.contains("does not have the workspace's base commit"),
        "{error}"
    );
    assert!(error.contains(&base), "{error}");
    assert_eq!(git(&other, &["branch", "--list", "b"]), "");
    assert!(leftovers(&dest.join(".git"), "banger-export").is_empty());
}

#[test]
fn an_unborn_branch_exports_everything() {
    let daemon = daemon_with_vm("fresh");
    let work = daemon.dir.path().join("fresh");
    let host = work.join("host");
    init_repo(&host);
    write(&host.join("start.txt"), "no commit yet\n");
    let dest = work.join("guest/repo");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "fresh",
        s(&host),
        "--dest",
        s(&dest),
    ]);
    assert_eq!(
        std::fs::read_to_string(dest.join(".git/banger-workspace-base")).unwrap(),
        "none\n"
    );
    guest_sh(
        &daemon,
        "fresh",
        &dest,
        "git add . && git commit -q -m first && echo more > more.txt",
    );

    let patch = work.join("all.patch");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "fresh",
        "--dest",
        s(&dest),
        "--patch",
        s(&patch),
    ]);
    let empty = work.join("empty");
    init_repo(&empty);
    git(&empty, &["apply", s(&patch)]);
    assert_eq!(snapshot(&empty, &[]), snapshot(&dest, &[]));

    // The whole history comes as a branch.
    let other = work.join("other");
    init_repo(&other);
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "fresh",
        "--dest",
        s(&dest),
        "--branch",
        "guest",
        s(&other),
    ]);
    assert_eq!(git(&other, &["rev-list", "--count", "guest"]).trim(), "2");
    let checkout = work.join("checkout");
    git(
        &work,
        &["clone", "-q", "-b", "guest", s(&other), s(&checkout)],
    );
    assert_eq!(snapshot(&checkout, &[]), snapshot(&dest, &[]));
}

#[test]
fn create_with_a_workspace_prepares_it_as_a_stage() {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    let work = daemon.dir.path().join("create");
    let host = export_repo(&work);
    write(&host.join("a.txt"), "uncommitted\n");
    let dest = work.join("guest/repo");
    let output = daemon.banger(&[
        "vm",
        "create",
        "withws",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--workspace",
        s(&host),
        "--workspace-dest",
        s(&dest),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let workspace_line = stderr
        .lines()
        .find(|line| line.contains("workspace"))
        .unwrap_or_else(|| panic!("no workspace stage: {stderr}"));
    assert!(
        workspace_line.contains('✓') && workspace_line.contains("files"),
        "{stderr}"
    );
    // The stage comes before the closing line.
    let closing = stderr.find("withws is running").expect("closing line");
    assert!(stderr.find(workspace_line).unwrap() < closing, "{stderr}");
    assert_eq!(status(&dest), status(&host));
    assert_eq!(
        std::fs::read_to_string(dest.join("a.txt")).unwrap(),
        "uncommitted\n"
    );

    // With --json the stage comes as stage events before the done frame.
    let dest = work.join("guest/json");
    let stdout = daemon.banger_ok(&[
        "vm",
        "create",
        "withjson",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--workspace",
        s(&host),
        "--workspace-dest",
        s(&dest),
        "--json",
    ]);
    let frames: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let finished = frames
        .iter()
        .position(|frame| frame["stage"] == "workspace" && frame["status"] == "finished")
        .unwrap_or_else(|| panic!("{stdout}"));
    let done = frames
        .iter()
        .position(|frame| frame["event"] == "done")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(finished < done, "{stdout}");
    assert!(dest.join(".git/banger-workspace-base").is_file());
}

/// A user that exists only for the test.
struct TemporaryUser {
    name: String,
}

impl Drop for TemporaryUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

#[test]
fn prepare_hands_the_copy_to_the_guest_user() {
    use std::os::unix::fs::MetadataExt;
    if !banger_testkit::test_daemon::require_root("prepare_hands_the_copy_to_the_guest_user") {
        return;
    }
    let daemon = daemon_with_vm("owner");
    let work = daemon.dir.path().join("owner");
    let host = export_repo(&work);
    let user = TemporaryUser {
        name: format!("bgw{}", std::process::id() % 100_000),
    };
    let home = work.join("home");
    let status = Command::new("useradd")
        .args(["-M", "-d"])
        .arg(&home)
        .arg(&user.name)
        .status()
        .unwrap();
    assert!(status.success());
    let uid = String::from_utf8(
        Command::new("id")
            .args(["-u", &user.name])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse::<u32>()
    .unwrap();
    // The user must be able to reach the destination's parents.
    let guest = work.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    for dir in [&work, &guest] {
        chmod(dir, 0o755);
    }
    let dest = guest.join("repo");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "owner",
        s(&host),
        "--dest",
        s(&dest),
        "-u",
        &user.name,
    ]);
    for path in [
        dest.clone(),
        dest.join("a.txt"),
        dest.join(".git"),
        dest.join(".git/banger-workspace-base"),
        dest.join(".git/index"),
    ] {
        assert_eq!(
            std::fs::metadata(&path).unwrap().uid(),
            uid,
            "{}",
            path.display()
        );
    }
    // Export runs git as that user, on the repository it owns.
    let patch = work.join("user.patch");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "owner",
        "--dest",
        s(&dest),
        "-u",
        &user.name,
        "--patch",
        s(&patch),
    ]);
    assert_eq!(std::fs::read(&patch).unwrap(), b"");

    let error = daemon.banger_err(&[
        "vm",
        "workspace",
        "prepare",
        "owner",
        s(&host),
        "--dest",
        s(&work.join("guest/x")),
        "-u",
        "no-such-user-xyz",
    ]);
    assert!(error.contains("has no user `no-such-user-xyz`"), "{error}");
}

/// A control connection spoken by hand, for the `vm.workspace.*` streams
/// (`banger_proto::workspace`): one request line, its answer, then frames.
struct RawConnection {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl RawConnection {
    /// Connects, calls `method` and returns the connection and the answer.
    fn call(socket: &Path, method: &str, params: &serde_json::Value) -> (Self, serde_json::Value) {
        use std::io::{BufRead, Write};
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(writer, "{request}").unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("answer");
        (
            Self { reader, writer },
            serde_json::from_str(&line).expect("JSON answer"),
        )
    }

    /// Sends one frame: `kind u8 | length u32 (big-endian) | payload`.
    fn send(&mut self, kind: u8, payload: &[u8]) {
        use std::io::Write;
        let mut frame = vec![kind];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(payload);
        self.writer.write_all(&frame).unwrap();
    }

    /// The next frame, or `None` when the daemon closed the connection.
    fn receive(&mut self) -> Option<(u8, Vec<u8>)> {
        use std::io::Read;
        let mut header = [0_u8; 5];
        self.reader.read_exact(&mut header).ok()?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let mut payload = vec![0_u8; length as usize];
        self.reader.read_exact(&mut payload).ok()?;
        Some((header[0], payload))
    }
}

const DATA: u8 = 1;
const ERROR: u8 = 3;

/// `vm.create` of `name` with a workspace at `dest`, on a raw connection;
/// returns the operation id.
fn create_with_workspace(daemon: &TestDaemon, name: &str, dest: &Path) -> String {
    let (_, answer) = RawConnection::call(
        &daemon.socket,
        "vm.create",
        &serde_json::json!({
            "name": name,
            "image": "image",
            "kernel": "kernel",
            "workspace": {"dest": s(dest), "base": "none"},
        }),
    );
    answer["result"]["operation_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned()
}

/// The start of a tar whose one file is far longer than what is sent.
fn unfinished_tar() -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path("big.bin").unwrap();
    header.set_size(1 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(&[7_u8; 1000]);
    bytes
}

fn operation(daemon: &TestDaemon, id: &str) -> serde_json::Value {
    daemon.banger_json(&["operation", "show", id])
}

/// Polls the operation until `done` says so (or panics after 20 s).
fn wait_for_operation(
    daemon: &TestDaemon,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let operation = operation(daemon, id);
        if done(&operation) {
            return operation;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "operation never {what}: {operation}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn has_stage(operation: &serde_json::Value, stage: &str, status: &str) -> bool {
    operation["stages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|event| event["stage"] == stage && event["status"] == status)
}

fn stage_names(operation: &serde_json::Value, status: &str) -> Vec<String> {
    operation["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["status"] == status)
        .map(|event| event["stage"].as_str().unwrap().to_owned())
        .collect()
}

fn daemon_with_fixtures() -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    daemon
}

#[test]
fn the_workspace_stage_is_a_stage_of_the_create_operation() {
    let daemon = daemon_with_fixtures();
    let work = daemon.dir.path().join("stage");
    let host = export_repo(&work);
    let dest = work.join("guest/repo");
    let stdout = daemon.banger_ok(&[
        "vm",
        "create",
        "staged",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--workspace",
        s(&host),
        "--workspace-dest",
        s(&dest),
        "--json",
    ]);
    let done: serde_json::Value = stdout
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|frame| frame["event"] == "done")
        .unwrap_or_else(|| panic!("{stdout}"));
    let id = done["operation"]["id"].as_str().unwrap();

    // `operation show` has it, where the daemon ran it: after the agent
    // answered, before the VM was ready.
    let operation = operation(&daemon, id);
    assert_eq!(
        stage_names(&operation, "finished"),
        [
            "resolve image",
            "clone root disk",
            "start vmm",
            "boot",
            "agent ready",
            "workspace",
            "ready"
        ],
        "{operation}"
    );
    let finished = operation["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["stage"] == "workspace" && event["status"] == "finished")
        .unwrap();
    assert!(
        finished["message"].as_str().unwrap().contains("files"),
        "{finished}"
    );
    let text = daemon.banger_ok(&["operation", "show", id]);
    assert!(text.contains("workspace"), "{text}");
    assert_eq!(status(&dest), status(&host));
    assert_eq!(
        std::fs::read_to_string(dest.join(".git/banger-workspace-base")).unwrap(),
        git(&host, &["rev-parse", "HEAD"])
    );
}

#[test]
fn cancelling_create_during_the_workspace_stage_leaves_no_vm() {
    let daemon = daemon_with_fixtures();
    let dest = daemon.dir.path().join("cancel/guest/repo");
    let id = create_with_workspace(&daemon, "stalled", &dest);

    // The upload starts, then stalls in the middle of a file.
    let (mut upload, answer) = RawConnection::call(
        &daemon.socket,
        "vm.workspace.upload",
        &serde_json::json!({"operation_id": id}),
    );
    assert_eq!(answer["result"]["operation_id"], id.as_str(), "{answer}");
    upload.send(DATA, &unfinished_tar());
    wait_for_operation(&daemon, &id, "started the workspace stage", |operation| {
        has_stage(operation, "workspace", "started")
    });
    let vms = daemon.banger_json(&["vm", "list"]);
    assert_eq!(vms[0]["name"], "stalled", "{vms}");
    assert_eq!(vms[0]["state"], "running", "{vms}");
    assert_eq!(daemon.vmm_pids().len(), 1);

    daemon.banger_ok(&["operation", "cancel", &id]);
    let operation = wait_for_operation(&daemon, &id, "ended", |operation| {
        operation["state"] != "running"
    });
    assert_eq!(operation["state"], "cancelled", "{operation}");
    assert!(has_stage(&operation, "workspace", "failed"), "{operation}");
    for stage in ["start vmm", "clone root disk"] {
        assert!(has_stage(&operation, stage, "rolled_back"), "{operation}");
    }
    assert!(!has_stage(&operation, "ready", "started"), "{operation}");

    // The uploader is told, and the daemon hangs up.
    let (kind, payload) = upload.receive().expect("a closing frame");
    assert_eq!(kind, ERROR);
    let error: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("cancelled"),
        "{error}"
    );
    assert!(upload.receive().is_none());

    // No row, no VM directory, no VMM process, nothing in tmp.
    assert_eq!(daemon.banger_json(&["vm", "list"]), serde_json::json!([]));
    daemon.assert_no_leaks();
}

#[test]
fn an_uploader_that_goes_away_fails_the_stage_and_rolls_back() {
    let daemon = daemon_with_fixtures();
    let dest = daemon.dir.path().join("gone/guest/repo");
    let id = create_with_workspace(&daemon, "orphan", &dest);
    let (mut upload, answer) = RawConnection::call(
        &daemon.socket,
        "vm.workspace.upload",
        &serde_json::json!({"operation_id": id}),
    );
    assert!(answer["result"].is_object(), "{answer}");
    upload.send(DATA, &unfinished_tar());
    drop(upload);

    let operation = wait_for_operation(&daemon, &id, "ended", |operation| {
        operation["state"] != "running"
    });
    assert_eq!(operation["state"], "failed", "{operation}");
    let error = operation["error"].as_str().unwrap();
    assert!(error.contains("the caller went away"), "{error}");
    assert!(
        has_stage(&operation, "start vmm", "rolled_back"),
        "{operation}"
    );
    let vm = daemon.vm("orphan");
    assert_eq!(vm["state"], "failed", "{vm}");
    assert_eq!(vm["pid"], serde_json::Value::Null, "{vm}");
    daemon.banger_ok(&["vm", "delete", "orphan"]);
    daemon.assert_no_leaks();
}

#[test]
fn uploads_are_refused_for_operations_that_do_not_wait_for_one() {
    let daemon = daemon_with_fixtures();
    let upload = |id: &str| {
        RawConnection::call(
            &daemon.socket,
            "vm.workspace.upload",
            &serde_json::json!({"operation_id": id}),
        )
    };
    let kind = |answer: &serde_json::Value| answer["error"]["data"]["kind"].clone();

    let (_, answer) = upload("no-such-operation");
    assert_eq!(kind(&answer), "not_found", "{answer}");

    // A create without a workspace takes no upload.
    daemon.banger_ok(&[
        "vm", "create", "plain", "--image", "image", "--kernel", "kernel",
    ]);
    let operations = daemon.banger_json(&["operation", "list"]);
    let plain = operations[0]["id"].as_str().unwrap().to_owned();
    let (_, answer) = upload(&plain);
    assert_eq!(kind(&answer), "not_found", "{answer}");

    // One upload per create.
    let dest = daemon.dir.path().join("once/guest/repo");
    let id = create_with_workspace(&daemon, "once", &dest);
    let (mut first, answer) = upload(&id);
    assert!(answer["result"].is_object(), "{answer}");
    let (_, answer) = upload(&id);
    assert_eq!(kind(&answer), "invalid_state", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already has its workspace upload"),
        "{answer}"
    );

    // A frame over its limit ends the stage (and the create).
    first.send(DATA, &[]);
    let mut oversized = vec![DATA];
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    use std::io::Write;
    first.writer.write_all(&oversized).unwrap();
    let operation = wait_for_operation(&daemon, &id, "ended", |operation| {
        operation["state"] != "running"
    });
    assert_eq!(operation["state"], "failed", "{operation}");
    assert!(
        operation["error"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{operation}"
    );
    daemon.banger_ok(&["vm", "delete", "once"]);
    daemon.banger_ok(&["vm", "delete", "plain", "--force"]);
    daemon.assert_no_leaks();
}

/// Where `upload_helper_run_as_another_user` finds its socket and operation.
const HELPER_SOCKET: &str = "BANGER_TEST_UPLOAD_SOCKET";
const HELPER_OPERATION: &str = "BANGER_TEST_UPLOAD_OPERATION";
const HELPER_MARK: &str = "upload-answer: ";

/// Does nothing in a normal run. `an_upload_from_another_user_is_refused`
/// runs this test binary again, as another user, with these variables set:
/// it then calls `vm.workspace.upload` from there and prints the answer.
#[test]
fn upload_helper_run_as_another_user() {
    let (Some(socket), Ok(operation)) = (
        std::env::var_os(HELPER_SOCKET),
        std::env::var(HELPER_OPERATION),
    ) else {
        return;
    };
    let (_, answer) = RawConnection::call(
        Path::new(&socket),
        "vm.workspace.upload",
        &serde_json::json!({"operation_id": operation}),
    );
    println!("{HELPER_MARK}{answer}");
}

#[test]
fn an_upload_from_another_user_is_refused() {
    if !banger_testkit::test_daemon::require_root("an_upload_from_another_user_is_refused") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    // Members of `nogroup` may use the daemon: uid 65534 gets past the
    // access check and reaches the upload's own.
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("{config}\n[access]\ngroup = \"nogroup\"\n"),
    )
    .unwrap();
    daemon.start();
    daemon.import_fixtures();
    let dest = daemon.dir.path().join("owner/guest/repo");
    let id = create_with_workspace(&daemon, "mine", &dest);

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "upload_helper_run_as_another_user",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_SOCKET, &daemon.socket)
        .env(HELPER_OPERATION, &id)
        .uid(65_534)
        .gid(65_534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = stdout
        .lines()
        .find_map(|line| line.split_once(HELPER_MARK).map(|(_, answer)| answer))
        .map(|line| serde_json::from_str(line).unwrap())
        .unwrap_or_else(|| {
            panic!(
                "the helper printed no answer: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(answer["error"]["data"]["kind"], "not_allowed", "{answer}");

    // The creator's own upload is still possible; hanging up fails the create.
    let (upload, answer) = RawConnection::call(
        &daemon.socket,
        "vm.workspace.upload",
        &serde_json::json!({"operation_id": id}),
    );
    assert!(answer["result"].is_object(), "{answer}");
    drop(upload);
    wait_for_operation(&daemon, &id, "ended", |operation| {
        operation["state"] != "running"
    });
    daemon.banger_ok(&["vm", "delete", "mine"]);
    daemon.assert_no_leaks();
}

/// A guest whose work holds a symlink chain (`d/up -> ..`, `e -> d/up/..`,
/// one that climbs out, and an absolute one): export carries the links as
/// links, and neither export nor applying its patch writes outside the
/// host's repository or the patch's directory.
#[test]
fn export_of_a_symlink_chain_writes_nothing_outside() {
    let daemon = daemon_with_vm("chain");
    let work = daemon.dir.path().join("chain");
    let host = export_repo(&work);
    let dest = work.join("guest/repo");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "prepare",
        "chain",
        s(&host),
        "--dest",
        s(&dest),
    ]);
    guest_sh(
        &daemon,
        "chain",
        &dest,
        "set -e\nmkdir d\nln -s .. d/up\nln -s d/up/.. e\nln -s ../../.. climb\n\
         ln -s /etc abs\necho inside > d/file\n",
    );
    let outside = work.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let outside_before = snapshot(&work, &["guest", "host", "outside", "out", "clone"]);

    let out = work.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let patch = out.join("chain.patch");
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "chain",
        "--dest",
        s(&dest),
        "--patch",
        s(&patch),
    ]);
    assert_eq!(leftovers(&out, ""), vec!["chain.patch".to_owned()]);
    let text = std::fs::read_to_string(&patch).unwrap();
    assert!(text.contains("new file mode 120000"), "{text}");

    let before = host_state(&host);
    daemon.banger_ok(&[
        "vm",
        "workspace",
        "export",
        "chain",
        "--dest",
        s(&dest),
        "--branch",
        "chain",
        s(&host),
    ]);
    assert_eq!(host_state(&host), before, "the host checkout changed");

    // Applying the patch makes links, and nothing through them.
    let clone = work.join("clone");
    git(&work, &["clone", "-q", s(&host), s(&clone)]);
    git(&clone, &["apply", s(&patch)]);
    assert_eq!(
        std::fs::read_link(clone.join("e")).unwrap(),
        Path::new("d/up/..")
    );
    assert_eq!(
        std::fs::read_link(clone.join("abs")).unwrap(),
        Path::new("/etc")
    );
    assert_eq!(leftovers(&outside, ""), Vec::<String>::new());
    assert_eq!(
        snapshot(&work, &["guest", "host", "outside", "out", "clone"]),
        outside_before
    );
}
