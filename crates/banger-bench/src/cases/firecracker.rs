//! create → running with the real Firecracker binary
//! (`BANGER_BENCH_FIRECRACKER`), against the same work done by hand: spawn
//! Firecracker, send it the same API calls by plain HTTP over its Unix
//! socket, `InstanceStart` accepted.
//!
//! 1. A daemon with fake-firecracker and the same config logs the API calls
//!    banger makes for one create (`FAKE_FIRECRACKER_REQUEST_LOG`); that log
//!    is the baseline's script, so the baseline follows banger's calls as
//!    they are today, whatever they become.
//! 2. A daemon with the real binary creates VMs with `[agent] wait = false`
//!    (the guests of a machine whose KVM cannot boot them never answer), so
//!    create ends at `InstanceStart` accepted, where the baseline ends.
//! 3. The baseline: copy the root disk (not timed), then time spawn →
//!    socket up → the logged calls, with the VM's paths moved to its own
//!    folder → `InstanceStart` answered 204. It alternates with the creates.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::{folder, StageTimes};
use crate::daemon::{Daemon, DaemonSetup};
use crate::fixtures;
use crate::processes::{self, Spawned};
use crate::report::{Figure, Goal};
use crate::{Context, Outcome};

const CASE: &str = "firecracker";

pub fn firecracker(context: &Context) -> anyhow::Result<Outcome> {
    let Some(binary) = context.firecracker.clone() else {
        return Ok(Outcome::skipped(
            CASE,
            "BANGER_BENCH_FIRECRACKER is not set to a Firecracker binary",
        ));
    };
    if !binary.is_file() {
        return Ok(Outcome::skipped(
            CASE,
            format!("{} does not exist", binary.display()),
        ));
    }
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok(Outcome::skipped(
            CASE,
            format!("cannot open /dev/kvm read-write: {error}"),
        ));
    }
    let directory = folder(context, CASE)?;
    let image = directory.join("image.ext4");
    fixtures::make_ext4(&image, 64, None)?;

    // 1. banger's calls, as the fake logs them.
    let request_log = directory.join("requests.jsonl");
    let mut setup = DaemonSetup::fake(&context.bins, &directory.join("probe"), false);
    // Unjailed: the calls it logs are replayed outside any chroot.
    setup.config = setup.config.replace("jailed = true", "jailed = false");
    setup.env.push((
        "FAKE_FIRECRACKER_REQUEST_LOG".to_owned(),
        request_log.display().to_string(),
    ));
    let probe = Daemon::start(&context.bins, &directory.join("probe"), setup)?;
    probe.banger(&[
        "-q",
        "image",
        "import",
        "default",
        &image.display().to_string(),
    ])?;
    if let Err(error) = probe.banger(&["-q", "kernel", "import", "default", "--from-debian"]) {
        return Ok(Outcome::skipped(
            CASE,
            format!(
                "no Debian kernel to boot (`kernel import --from-debian`): {}",
                error.to_string().lines().next().unwrap_or_default()
            ),
        ));
    }
    let kernel = probe.json(&["kernel", "show", "default"])?;
    probe.banger(&["-q", "vm", "create", "probe"])?;
    let vm = probe.json(&["vm", "show", "probe"])?;
    let script = Script::from_log(&request_log, &vm)?;
    // The probe daemon stays up to the end: the baseline boots its kernel
    // files, which go with its state dir.
    probe.delete_all()?;

    // 2. The real binary behind banger.
    let mut setup = DaemonSetup::fake(&context.bins, &directory.join("real"), false);
    // Unjailed, like the raw sequence it is compared with.
    setup.config = setup
        .config
        .replace(
            &format!("binary = \"{}\"", context.bins.fake_firecracker.display()),
            &format!("binary = \"{}\"", binary.display()),
        )
        .replace("jailed = true", "jailed = false");
    let daemon = Daemon::start(&context.bins, &directory.join("real"), setup)?;
    daemon.banger(&[
        "-q",
        "image",
        "import",
        "default",
        &image.display().to_string(),
    ])?;
    let mut import = vec!["-q", "kernel", "import", "default"];
    let kernel_path = kernel["kernel_path"].as_str().unwrap_or_default();
    import.push(kernel_path);
    if let Some(initrd) = kernel["initrd_path"].as_str() {
        import.extend(["--initrd", initrd]);
    }
    if let Some(cmdline) = kernel["cmdline"].as_str() {
        import.extend(["--cmdline", cmdline]);
    }
    daemon.banger(&import)?;
    let stored_image = daemon.json(&["image", "show", "default"])?["path"]
        .as_str()
        .map(PathBuf::from)
        .context("image show printed no path")?;

    // 3. Alternate, after one untimed round of each.
    let baseline_root = directory.join("raw");
    if let Err(error) = script.run(&binary, &baseline_root.join("warmup"), &stored_image) {
        let reason = format!("{error:#}");
        if reason.contains("InstanceStart") {
            return Ok(Outcome::skipped(
                CASE,
                format!("Firecracker refuses to start a VM here: {reason}"),
            ));
        }
        return Err(error);
    }
    daemon.banger(&["-q", "vm", "create", "warmup"])?;
    daemon.banger(&["-q", "vm", "delete", "--force", "warmup"])?;
    let runs = context.pick(2, 20);
    let mut raw = Vec::new();
    let mut creates = Vec::new();
    let mut stages = StageTimes::default();
    for round in 0..runs {
        raw.push(script.run(
            &binary,
            &baseline_root.join(format!("r{round}")),
            &stored_image,
        )?);
        let name = format!("fc{round}");
        let (elapsed, events) = daemon.timed(&["vm", "create", &name, "--json"])?;
        creates.push(elapsed);
        stages.add(&events);
        daemon.banger(&["-q", "vm", "delete", "--force", &name])?;
    }
    Ok(Outcome {
        figures: vec![
            Figure::timed(
                "fc.raw",
                "baseline: spawn Firecracker → same API calls → InstanceStart",
                &raw,
            )
            .note(format!(
                "{} calls: {}",
                script.calls.len(),
                script.describe()
            )),
            Figure::timed("fc.create", "create → running [real Firecracker]", &creates)
                .against("fc.raw")
                .goal(Goal::RatioAtMost(1.2))
                .note(stages.describe()),
        ],
        skipped: Vec::new(),
    })
}

/// The API calls banger made for one VM, up to `InstanceStart`.
struct Script {
    /// The VM's directory in the probe daemon: moved to the baseline's own.
    vm_dir: String,
    calls: Vec<(String, String, Option<Value>)>,
}

impl Script {
    fn from_log(log: &Path, vm: &Value) -> anyhow::Result<Self> {
        let id = vm["id"].as_str().context("vm show printed no id")?;
        let vm_dir = vm["dir"].as_str().context("vm show printed no dir")?;
        let text =
            std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
        let mut calls = Vec::new();
        for line in text.lines() {
            let request: Value = serde_json::from_str(line)?;
            if request["id"] != id {
                continue;
            }
            let method = request["method"].as_str().unwrap_or("PUT").to_owned();
            let path = request["path"].as_str().unwrap_or_default().to_owned();
            let body = Some(request["body"].clone()).filter(|body| !body.is_null());
            let start = path == "/actions" && request["body"]["action_type"] == "InstanceStart";
            calls.push((method, path, body));
            if start {
                return Ok(Self {
                    vm_dir: vm_dir.to_owned(),
                    calls,
                });
            }
        }
        bail!("fake-firecracker logged no InstanceStart for VM {id}")
    }

    fn describe(&self) -> String {
        let paths: Vec<&str> = self
            .calls
            .iter()
            .map(|(_, path, _)| path.as_str())
            .collect();
        paths.join(" ")
    }

    /// One timed baseline run in `directory`: the files the calls name are
    /// made first (a copy of `image` for the drives), then spawn → calls →
    /// `InstanceStart`. Firecracker is killed afterwards.
    fn run(&self, binary: &Path, directory: &Path, image: &Path) -> anyhow::Result<Duration> {
        processes::check_interrupt()?;
        std::fs::create_dir_all(directory)?;
        let moved = directory.display().to_string();
        let mut calls = Vec::new();
        for (method, path, body) in &self.calls {
            let body = body.as_ref().map(|body| {
                serde_json::to_string(body)
                    .unwrap_or_default()
                    .replace(&self.vm_dir, &moved)
            });
            if let Some(body) = &body {
                let value: Value = serde_json::from_str(body)?;
                for key in ["log_path", "metrics_path"] {
                    if let Some(file) = value[key].as_str() {
                        std::fs::File::create(file).with_context(|| format!("create {file}"))?;
                    }
                }
                if let Some(file) = value["path_on_host"].as_str() {
                    fixtures::run(
                        Command::new("cp")
                            .arg("--sparse=always")
                            .arg(image)
                            .arg(file),
                    )?;
                }
            }
            calls.push((method.as_str(), path.as_str(), body));
        }
        let socket = directory.join("firecracker.sock");
        let console = std::fs::File::create(directory.join("console.log"))?;
        let started = Instant::now();
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .args(["--id", "bench-baseline"])
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let mut process = Spawned::new(child);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            if let Some(status) = process.child().try_wait()? {
                bail!(
                    "Firecracker exited before its API socket was up ({status}): {}",
                    console_tail(directory)
                );
            }
            if started.elapsed() > Duration::from_secs(5) {
                bail!("Firecracker's API socket was not up within 5 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut api = Api::new(stream)?;
        for (method, path, body) in &calls {
            let (status, answer) = api.request(method, path, body.as_deref())?;
            if !(200..300).contains(&status) {
                let what = if path.ends_with("actions") {
                    "InstanceStart".to_owned()
                } else {
                    format!("{method} {path}")
                };
                bail!("{what} answered {status}: {}", answer.trim());
            }
        }
        let elapsed = started.elapsed();
        process.terminate(Duration::ZERO);
        fixtures::remove_tree(directory)?;
        Ok(elapsed)
    }
}

fn console_tail(directory: &Path) -> String {
    let text = std::fs::read_to_string(directory.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// HTTP/1.1 over one keep-alive Unix socket connection, as much as
/// Firecracker's API needs.
struct Api {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Api {
    fn new(stream: UnixStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let body = body.unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        self.writer.write_all(request.as_bytes())?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
        let mut length = 0;
        loop {
            let mut header = String::new();
            self.reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut answer = vec![0_u8; length];
        self.reader.read_exact(&mut answer)?;
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }
}
