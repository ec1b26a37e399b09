//! Byte progress of long commands: image and kernel imports are operations
//! whose copy stages report bytes (rate-limited, the last count kept), `vm
//! create` reports the bytes of a copied root disk, `--json` streams every
//! event as a JSON line, and output that is not for a terminal carries no
//! bar control characters.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{make_ext4, write_fake_kernel, TestDaemon};
use serde_json::Value;

/// Writes `mib` MiB of bytes that are not zero at `offset_mib` into `path`.
fn fill(path: &std::path::Path, offset_mib: u64, mib: usize) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let data: Vec<u8> = (0..mib << 20)
        .map(|index| (index % 251) as u8 + 1)
        .collect();
    file.write_all_at(&data, offset_mib << 20).unwrap();
}

/// The `progress` events of `stage` in an event stream, as (bytes, total).
fn progress_of(lines: &[Value], stage: &str) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|line| line["event"] == "stage" && line["stage"] == stage)
        .filter(|line| line["status"] == "progress")
        .map(|line| {
            (
                line["bytes"].as_u64().expect("bytes"),
                line["total"].as_u64().expect("total"),
            )
        })
        .collect()
}

/// Bytes only grow, every event has the same total, and the last reaches it.
fn assert_reaches_total(progress: &[(u64, u64)], total: u64, what: &str) {
    assert!(!progress.is_empty(), "{what}: no progress events");
    assert!(
        progress.windows(2).all(|pair| pair[0].0 <= pair[1].0),
        "{what}: bytes went backwards: {progress:?}"
    );
    assert!(
        progress.iter().all(|&(_, each)| each == total),
        "{what}: {progress:?}"
    );
    assert_eq!(progress.last().unwrap().0, total, "{what}: {progress:?}");
}

/// The operation's kept history (`operation show --json`) has the stage's
/// last count: a watcher that came late still sees what was moved.
fn assert_kept(daemon: &TestDaemon, lines: &[Value], stage: &str, total: u64) {
    let done = lines
        .iter()
        .find(|line| line["event"] == "done")
        .expect("a done frame");
    assert_eq!(done["operation"]["state"], "succeeded", "{done}");
    let id = done["operation"]["id"].as_str().unwrap();
    let operation = daemon.banger_json(&["operation", "show", id]);
    let kept: Vec<&Value> = operation["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["stage"] == stage && event["status"] == "progress")
        .collect();
    assert_eq!(kept.len(), 1, "{operation}");
    assert_eq!(kept[0]["bytes"].as_u64(), Some(total), "{operation}");
}

#[test]
fn imports_stream_byte_progress_reaching_the_total() {
    let daemon = TestDaemon::start_with(&[]);
    let image = daemon.dir.path().join("big.ext4");
    make_ext4(&image, 48);
    fill(&image, 8, 32);
    let image_bytes = std::fs::metadata(&image).unwrap().len();

    let started = Instant::now();
    let lines = daemon.banger_json_lines(&["image", "import", "big", image.to_str().unwrap()]);
    let elapsed = started.elapsed();
    let progress = progress_of(&lines, "copy image");
    assert_reaches_total(&progress, image_bytes, "image import");
    // At most ten live events a second (plus the one reaching the total and
    // the kept one), however many chunks were copied.
    let limit = 3 + usize::try_from(elapsed.as_millis() / 100).unwrap();
    assert!(
        progress.len() <= limit,
        "{} events in {elapsed:?}",
        progress.len()
    );
    // Stages in order, then the done frame, then the image as the last line.
    let stages: Vec<(&str, &str)> = lines
        .iter()
        .filter(|line| line["event"] == "stage" && line["status"] != "progress")
        .map(|line| {
            (
                line["stage"].as_str().unwrap(),
                line["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("copy image", "started"),
            ("copy image", "finished"),
            ("register image", "started"),
            ("register image", "finished"),
        ]
    );
    let image_record = lines.last().unwrap();
    assert_eq!(image_record["name"], "big", "{image_record}");
    assert_eq!(image_record["size_bytes"].as_u64(), Some(image_bytes));
    assert_kept(&daemon, &lines, "copy image", image_bytes);

    // A tarball: its bytes as they are read, then the build.
    let tree = daemon.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "from-tar\n").unwrap();
    let data = tree.join("data");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    fill(&data, 0, 4);
    let tarball = daemon.dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let tar_bytes = std::fs::metadata(&tarball).unwrap().len();
    let lines = daemon.banger_json_lines(&["image", "import", "tar", tarball.to_str().unwrap()]);
    assert_reaches_total(
        &progress_of(&lines, "unpack image"),
        tar_bytes,
        "tarball import",
    );
    assert!(lines
        .iter()
        .any(|line| line["stage"] == "build image" && line["status"] == "finished"));
    assert_kept(&daemon, &lines, "unpack image", tar_bytes);

    // A kernel and its initrd: one stage counting the bytes of both.
    let kernel = daemon.dir.path().join("vmlinux");
    write_fake_kernel(&kernel);
    let initrd = daemon.dir.path().join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(6 << 20)
        .unwrap();
    fill(&initrd, 0, 6);
    let total =
        std::fs::metadata(&kernel).unwrap().len() + std::fs::metadata(&initrd).unwrap().len();
    let lines = daemon.banger_json_lines(&[
        "kernel",
        "import",
        "k",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_reaches_total(&progress_of(&lines, "copy kernel"), total, "kernel import");
    assert_eq!(lines.last().unwrap()["name"], "k");
    assert_kept(&daemon, &lines, "copy kernel", total);
    let operations = daemon.banger_json(&["operation", "list"]);
    let kinds: Vec<&str> = operations
        .as_array()
        .unwrap()
        .iter()
        .map(|operation| operation["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"image.import") && kinds.contains(&"kernel.import"),
        "{kinds:?}"
    );
    daemon.assert_no_leaks();
}

#[test]
fn a_copied_root_disk_reports_its_bytes() {
    let mut daemon = TestDaemon::new(&[]);
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&daemon.config)
        .unwrap();
    writeln!(config, "\n[storage]\nclone = \"copy\"").unwrap();
    drop(config);
    daemon.start();
    daemon.import_fixtures();
    let lines = daemon.banger_json_lines(&[
        "vm",
        "create",
        "copied",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--no-start",
    ]);
    let progress = progress_of(&lines, "clone root disk");
    let total = progress.last().expect("the copy reported its bytes").1;
    assert!(total > 0);
    assert_reaches_total(&progress, total, "clone root disk");
    daemon.banger_ok(&["vm", "delete", "copied"]);
}

#[test]
fn a_cancelled_import_leaves_nothing() {
    let daemon = TestDaemon::start_with(&[]);
    // Large but sparse: quick to make, long to read and hash.
    let image = daemon.dir.path().join("huge.ext4");
    make_ext4(&image, 8192);
    let import = daemon
        .command()
        .args(["image", "import", "huge", image.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let running = daemon.banger_json(&["operation", "list"]);
        if let Some(operation) = running.as_array().unwrap().iter().find(|operation| {
            operation["kind"] == "image.import" && operation["state"] == "running"
        }) {
            break operation["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the import did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    daemon.banger_ok(&["operation", "cancel", &id]);
    let output = import.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    let operation = daemon.banger_json(&["operation", "show", &id]);
    assert_eq!(operation["state"], "cancelled", "{operation}");
    let images = daemon.banger_json(&["image", "list"]);
    assert_eq!(images.as_array().unwrap().len(), 0, "{images}");
    assert_eq!(
        std::fs::read_dir(daemon.state_dir.join("images"))
            .unwrap()
            .count(),
        0
    );
    daemon.assert_no_leaks();
}

#[test]
fn output_that_is_not_a_terminal_has_no_bar_control_characters() {
    let daemon = TestDaemon::start_with(&[]);
    let image = daemon.dir.path().join("plain.ext4");
    make_ext4(&image, 16);
    fill(&image, 2, 8);
    // stderr is a pipe here: plain lines.
    let output = daemon
        .command()
        .args(["image", "import", "plain", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("  ✓ copy image ("), "{stderr}");
    assert!(stderr.contains(", 16.00 MiB)"), "{stderr}");
    assert!(stderr.contains("imported image plain"), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
}

/// `banger ARGS` on a pseudo-terminal (`script`), with `env`; what the
/// terminal got. `None` without `script`.
fn on_a_terminal(daemon: &TestDaemon, args: &str, env: &[(&str, &str)]) -> Option<String> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is needed for a pseudo-terminal");
        return None;
    }
    let banger = banger_testkit::test_daemon::binary("banger");
    let mut command = Command::new("script");
    command
        .args(["-qec", &format!("{} {args}", banger.display()), "/dev/null"])
        .env("BANGER_SOCKET", &daemon.socket)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn terminals_get_bars_unless_no_progress_and_no_color_only_drops_colour() {
    let daemon = TestDaemon::start_with(&[]);
    let image = daemon.dir.path().join("tty.ext4");
    make_ext4(&image, 48);
    fill(&image, 8, 32);
    let path = image.to_str().unwrap();

    let Some(bars) = on_a_terminal(&daemon, &format!("image import a {path}"), &[]) else {
        return;
    };
    assert!(bars.contains("MiB/48.00 MiB"), "no byte bar: {bars:?}");
    assert!(bars.contains("ETA"), "{bars:?}");
    assert!(
        bars.contains("\x1b[36m"),
        "the bar is not coloured: {bars:?}"
    );

    let plain = on_a_terminal(
        &daemon,
        &format!("image import b {path}"),
        &[("NO_COLOR", "1")],
    )
    .unwrap();
    assert!(
        plain.contains("MiB/48.00 MiB"),
        "NO_COLOR dropped the bar: {plain:?}"
    );
    assert!(
        !plain.contains("\x1b[3"),
        "colour despite NO_COLOR: {plain:?}"
    );

    let quiet = on_a_terminal(
        &daemon,
        &format!("--no-progress image import c {path}"),
        &[],
    )
    .unwrap();
    assert!(quiet.contains("  ✓ copy image ("), "{quiet:?}");
    assert!(
        !quiet.contains("ETA") && !quiet.contains('\x1b'),
        "{quiet:?}"
    );
}

#[test]
fn pulls_stream_download_bytes_reaching_the_total() {
    use banger_testkit::test_daemon::{serve_directory, sha256_hex};
    let mut daemon = TestDaemon::new(&[]);
    let site = daemon.dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    let image = site.join("base.ext4");
    make_ext4(&image, 24);
    fill(&image, 4, 8);
    let size = std::fs::metadata(&image).unwrap().len();
    std::fs::write(
        site.join("catalog.toml"),
        format!(
            "[[images]]\nname = \"base\"\nversion = \"1\"\nurl = \"base.ext4\"\nsize = {size}\nsha256 = \"{}\"\n",
            sha256_hex(&image)
        ),
    )
    .unwrap();
    let port = serve_directory(&site);
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&daemon.config)
        .unwrap();
    writeln!(
        config,
        "\n[catalog]\nurl = \"http://127.0.0.1:{port}/catalog.toml\"\nallow_insecure_http = true"
    )
    .unwrap();
    drop(config);
    daemon.start();
    let lines = daemon.banger_json_lines(&["image", "pull", "base"]);
    assert_reaches_total(&progress_of(&lines, "pull image"), size, "image pull");
    assert_kept(&daemon, &lines, "pull image", size);
    daemon.assert_no_leaks();
}
