//! Commands that work inside a running guest through its agent, relayed by
//! the daemon (`vm.agent`): `vm run`, `vm cp`, `vm authsync`, `vm ssh`,
//! `vm stats`, and `ssh-config`; and `vm logs`, the guest's console log
//! (`vm.logs`, no agent needed).
//!
//! Host files are read and written here, by the calling user's own process,
//! never by the daemon.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use banger_agent_proto::client::{AgentClient, ExecSession};
use banger_proto::agent::{AuthSyncRequest, ExecRequest, WindowSize};
use banger_proto::{method, Vm, VmRef};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::args::{AuthsyncArgs, CpArgs, RunArgs, SshArgs};
use crate::client::Client;
use crate::error::{hinted, Exit, Hint as _};
use crate::printer::Printer;

/// A failure of the agent of VM `vm`.
pub(crate) fn agent_error(
    vm: &str,
    error: banger_agent_proto::client::ClientError,
) -> anyhow::Error {
    anyhow::Error::new(error).context(format!("VM `{vm}`"))
}

async fn connect(socket: &Path, vm: &str) -> anyhow::Result<AgentClient> {
    Ok(Client::connect(socket).await?.agent(vm).await?)
}

// ---- vm run ----

pub async fn run(socket: &Path, args: RunArgs) -> anyhow::Result<()> {
    let agent = connect(socket, &args.name.vm).await?;
    let tty = args.tty && std::io::stdin().is_terminal();
    let request = ExecRequest {
        argv: args.command,
        env: args.env,
        cwd: args.workdir,
        user: args.user,
        pty: tty.then(terminal_size),
    };
    let session = agent
        .exec(request)
        .await
        .map_err(|error| agent_error(&args.name.vm, error))?;
    let forward_stdin = args.interactive || tty || !std::io::stdin().is_terminal();
    let raw_mode = if tty { RawMode::enter() } else { None };
    let status = drive(session, forward_stdin, tty).await;
    drop(raw_mode);
    let status = status.map_err(|error| agent_error(&args.name.vm, error))?;
    match u8::try_from(status.shell_code()) {
        Ok(0) => Ok(()),
        code => Err(Exit(code.unwrap_or(255)).into()),
    }
}

/// Pumps stdin, stdout and stderr, forwards Ctrl-C (without a tty) and
/// window size changes (with one), and returns the exit status.
async fn drive(
    session: ExecSession,
    forward_stdin: bool,
    tty: bool,
) -> Result<banger_proto::agent::ExitStatus, banger_agent_proto::client::ClientError> {
    let ExecSession {
        mut stdin,
        mut stdout,
        mut stderr,
        control,
        exit,
    } = session;
    let input = tokio::spawn(async move {
        if forward_stdin {
            // A blocking thread: tokio's stdin cannot be cancelled, and the
            // command may end while we wait for input.
            let (chunks, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
            std::thread::spawn(move || {
                use std::io::Read;
                let mut input = std::io::stdin().lock();
                let mut buffer = vec![0_u8; 64 * 1024];
                loop {
                    match input.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => {
                            if chunks
                                .blocking_send(Bytes::copy_from_slice(&buffer[..read]))
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            });
            while let Some(chunk) = receiver.recv().await {
                if stdin.write(chunk).await.is_err() {
                    return;
                }
            }
        }
        stdin.close();
    });
    let output = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = stdout.recv().await {
            if out.write_all(&chunk).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let errors = tokio::spawn(async move {
        let mut err = tokio::io::stderr();
        while let Some(chunk) = stderr.recv().await {
            if err.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut interrupt), Ok(mut resize), Ok(mut terminate), Ok(mut hangup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::window_change()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => { let _ = control.signal(libc::SIGINT); }
                Some(()) = terminate.recv() => { let _ = control.signal(libc::SIGTERM); }
                Some(()) = hangup.recv() => { let _ = control.signal(libc::SIGHUP); }
                Some(()) = resize.recv(), if tty => { let size = terminal_size(); let _ = control.resize(size.rows, size.cols); }
                else => break,
            }
        }
    });
    let status = exit.wait().await;
    signals.abort();
    input.abort();
    let _ = output.await;
    let _ = errors.await;
    status
}

fn terminal_size() -> WindowSize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` into the pointer, which is valid.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &raw mut size) } == 0;
    if ok && size.ws_row > 0 && size.ws_col > 0 {
        WindowSize {
            rows: size.ws_row,
            cols: size.ws_col,
        }
    } else {
        WindowSize { rows: 24, cols: 80 }
    }
}

/// The local terminal in raw mode, restored on drop.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

// ---- vm cp ----

/// One side of `vm cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Host(PathBuf),
    Guest { vm: String, path: String },
}

/// `NAME:/path` is in a VM; anything else (write `./a:b` for a host path
/// with a colon) is on the host.
fn parse_location(text: &str) -> Location {
    if let Some((vm, path)) = text.split_once(':') {
        if !vm.is_empty() && !vm.contains('/') && !path.is_empty() {
            return Location::Guest {
                vm: vm.to_owned(),
                path: path.to_owned(),
            };
        }
    }
    Location::Host(PathBuf::from(text))
}

pub async fn cp(socket: &Path, printer: Printer, args: CpArgs) -> anyhow::Result<()> {
    match (
        parse_location(&args.source),
        parse_location(&args.destination),
    ) {
        (Location::Host(source), Location::Guest { vm, path }) => {
            let agent = connect(socket, &vm).await?;
            let entries = copy_in(&agent, &vm, &source, &path).await?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "source": source,
                    "destination": path,
                    "entries": entries,
                }));
            } else {
                printer.message(&format!("Copied {entries} entries to {vm}:{path}"));
            }
            Ok(())
        }
        (Location::Guest { vm, path }, Location::Host(destination)) => {
            let agent = connect(socket, &vm).await?;
            let options = CopyOutOptions {
                follow_links: args.dereference,
                unpack: unpack_options(args.archive),
            };
            copy_out(&agent, &vm, &path, &destination, options).await?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "source": path,
                    "destination": destination,
                }));
            } else {
                printer.message(&format!("Copied {vm}:{path} to {}", destination.display()));
            }
            Ok(())
        }
        (Location::Host(_), Location::Host(_)) => {
            Err(anyhow::anyhow!("Neither side of `vm cp` is in a VM"))
                .hint("write one side as NAME:/path, e.g. `banger vm cp ./src devbox:/root/`")
        }
        (Location::Guest { .. }, Location::Guest { .. }) => {
            bail!("`vm cp` copies between the host and a VM, not between two VMs")
        }
    }
}

fn last_component(path: &str) -> Option<String> {
    Path::new(path.trim_end_matches('/'))
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
}

/// Whether `path` is a directory in the guest.
async fn guest_is_dir(agent: &AgentClient, vm: &str, path: &str) -> anyhow::Result<bool> {
    let probe = agent
        .exec(ExecRequest {
            argv: vec!["test".into(), "-d".into(), path.into()],
            ..ExecRequest::default()
        })
        .await
        .map_err(|error| agent_error(vm, error))?
        .output()
        .await
        .map_err(|error| agent_error(vm, error))?;
    Ok(probe.status.code == Some(0))
}

/// Copies a host file or tree into the guest: into `dest` when it is a
/// directory there, else as `dest` (the source renamed).
async fn copy_in(agent: &AgentClient, vm: &str, source: &Path, dest: &str) -> anyhow::Result<u64> {
    let metadata = std::fs::symlink_metadata(source)
        .with_context(|| format!("Cannot read {}", source.display()))?;
    let source_name = source
        .canonicalize()
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .with_context(|| format!("{} has no name to copy as", source.display()))?;
    let (dest_dir, name) = if guest_is_dir(agent, vm, dest).await? {
        (dest.to_owned(), source_name)
    } else {
        let parent = Path::new(dest.trim_end_matches('/'))
            .parent()
            .map_or_else(|| "/".to_owned(), |parent| parent.display().to_string());
        let name =
            last_component(dest).with_context(|| format!("Invalid destination path `{dest}`"))?;
        (
            if parent.is_empty() {
                ".".into()
            } else {
                parent
            },
            name,
        )
    };
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let source = source.to_owned();
    let packer = tokio::task::spawn_blocking(move || {
        let writer = tokio_util::io::SyncIoBridge::new(writer);
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        let result = if metadata.is_dir() {
            builder.append_dir_all(&name, &source)
        } else {
            builder.append_path_with_name(&source, &name)
        };
        result
            .and_then(|()| builder.finish())
            .with_context(|| format!("Cannot pack {}", source.display()))
    });
    let copied = agent.copy_in(&dest_dir, reader).await;
    let packed = packer.await.context("Packing task failed")?;
    match (copied, packed) {
        (Ok(entries), Ok(())) => Ok(entries),
        (Err(error), _) => Err(agent_error(vm, error)),
        (Ok(_), Err(error)) => Err(error),
    }
}

/// How `vm cp` brings a guest file or tree to the host.
#[derive(Debug, Clone, Copy)]
struct CopyOutOptions {
    /// `-L`: the guest follows symlinks.
    follow_links: bool,
    unpack: banger_agent_proto::files::UnpackOptions,
}

/// The calling process's umask (from `/proc/self/status`; 022 if unknown).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("Umask:")
                    .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
            })
        })
        .unwrap_or(0o022)
}

/// What the guest's files become on the host: links as they are, no
/// set-id or sticky bits; the caller's umask applied and the caller owning
/// them, unless `archive` (`-a`: modes as they are, and owners when root).
fn unpack_options(archive: bool) -> banger_agent_proto::files::UnpackOptions {
    let mut options = banger_agent_proto::files::UnpackOptions::copy_out(current_umask());
    if archive {
        options.mode_mask = 0o777;
        options.preserve_owners = nix::unistd::geteuid().is_root();
    }
    options
}

/// Copies a guest file or tree to the host: into `destination` when it is a
/// directory, else as `destination`. The guest's tar is unpacked by
/// `files::unpack_with` into a staging directory beside the destination
/// (nothing written through a link, see its module), then renamed into place.
async fn copy_out(
    agent: &AgentClient,
    vm: &str,
    path: &str,
    destination: &Path,
    options: CopyOutOptions,
) -> anyhow::Result<()> {
    let name = last_component(path).with_context(|| format!("Invalid guest path `{path}`"))?;
    let stream = agent
        .copy_out_with(path, options.follow_links)
        .await
        .map_err(|error| agent_error(vm, error))?;
    let into_dir = destination.is_dir();
    let staging_parent = if into_dir {
        destination.to_owned()
    } else {
        match destination.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        }
    };
    let staging = tempfile_dir(&staging_parent)?;
    let staging_path = staging.clone();
    let unpacked = tokio::task::spawn_blocking(move || {
        let reader = tokio_util::io::SyncIoBridge::new(stream);
        banger_agent_proto::files::unpack_with(reader, &staging_path, &options.unpack)
    })
    .await
    .context("Unpacking task failed");
    let result = match unpacked {
        Ok(Ok(_)) => {
            let unpacked = staging.join(&name);
            let target = if into_dir {
                destination.join(&name)
            } else {
                destination.to_owned()
            };
            std::fs::rename(&unpacked, &target)
                .with_context(|| format!("Cannot move the copy to {}", target.display()))
        }
        Ok(Err(error)) => {
            Err(anyhow::Error::new(error).context(format!("Copy from VM `{vm}` failed")))
        }
        Err(error) => Err(error),
    };
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// A fresh hidden directory in `parent`, so the final rename stays on one filesystem.
fn tempfile_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    for attempt in 0..100_u32 {
        let path = parent.join(format!(
            ".banger-cp-{}-{attempt}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("Cannot create a staging directory in {}", parent.display())
                })
            }
        }
    }
    bail!("Cannot create a staging directory")
}

// ---- authsync, ssh ----

/// banger's own SSH key pair and known_hosts, per host user.
struct ManagedSsh {
    dir: PathBuf,
}

impl ManagedSsh {
    fn locate() -> anyhow::Result<Self> {
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share"))
            })
            .context("Neither XDG_DATA_HOME nor HOME is set")?;
        Ok(Self {
            dir: data.join("banger").join("ssh"),
        })
    }

    fn key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Makes the key pair with `ssh-keygen` if it does not exist yet.
    fn ensure_key(&self) -> anyhow::Result<String> {
        let public = self.dir.join("id_ed25519.pub");
        if !public.exists() {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("Cannot create {}", self.dir.display()))?;
            let _ = std::fs::set_permissions(
                &self.dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            );
            let status = std::process::Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "banger-managed",
                    "-f",
                ])
                .arg(self.key())
                .status()
                .context("Cannot run ssh-keygen")
                .hint("install the OpenSSH client (apt install openssh-client)")?;
            if !status.success() {
                bail!("ssh-keygen failed ({status})");
            }
        }
        std::fs::read_to_string(&public)
            .map(|key| key.trim().to_owned())
            .with_context(|| format!("Cannot read {}", public.display()))
    }
}

/// The calling user's public keys (`~/.ssh/*.pub`) plus banger's managed key.
fn public_keys(managed: &str) -> Vec<String> {
    let mut keys = vec![managed.to_owned()];
    if let Some(home) = std::env::var_os("HOME") {
        let dir = PathBuf::from(home).join(".ssh");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "pub"))
            .collect();
        files.sort();
        for file in files {
            if let Ok(text) = std::fs::read_to_string(&file) {
                for line in text.lines().map(str::trim) {
                    if !line.is_empty()
                        && !line.starts_with('#')
                        && !keys.iter().any(|key| key == line)
                    {
                        keys.push(line.to_owned());
                    }
                }
            }
        }
    }
    keys
}

fn git_config(key: &str) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["config", "--global", "--get", key])
        .output()
        .ok()?;
    let value = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !value.is_empty()).then_some(value)
}

/// Installs the keys and git identity for `user` in the guest; returns the key count.
async fn push_auth(agent: &AgentClient, vm: &str, user: &str) -> anyhow::Result<usize> {
    let managed = ManagedSsh::locate()?.ensure_key()?;
    let keys = public_keys(&managed);
    let count = keys.len();
    agent
        .authsync(AuthSyncRequest {
            user: user.to_owned(),
            authorized_keys: keys,
            git_name: git_config("user.name"),
            git_email: git_config("user.email"),
        })
        .await
        .map_err(|error| agent_error(vm, error))?;
    Ok(count)
}

pub async fn authsync(socket: &Path, printer: Printer, args: AuthsyncArgs) -> anyhow::Result<()> {
    let agent = connect(socket, &args.name.vm).await?;
    let count = push_auth(&agent, &args.name.vm, &args.user).await?;
    if args.json.json {
        printer.json(&serde_json::json!({
            "vm": args.name.vm,
            "user": args.user,
            "keys": count,
        }));
        return Ok(());
    }
    printer.message(&format!(
        "Installed {count} public key(s) and your git identity for {} in {}",
        args.user, args.name.vm
    ));
    Ok(())
}

/// How long `vm ssh` waits for a booting guest's host keys, and then for
/// its sshd to listen.
pub(crate) const SSH_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Waits (up to `timeout`, saying so once when it has to) until a TCP
/// socket in the guest listens on `port`, asking the guest agent, which
/// reads the guest's socket table: host keys exist before sshd listens.
/// Returns whether the port was seen listening: `false` when the agent
/// cannot answer (one from before the question existed), which is not
/// waited for.
pub(crate) async fn wait_listening(
    agent: &AgentClient,
    vm: &str,
    port: u16,
    timeout: std::time::Duration,
    quiet: bool,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    let mut told = false;
    loop {
        match agent.listening(port).await {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            // An agent that does not know the question refuses it or
            // hangs up.
            Err(
                error @ (banger_agent_proto::client::ClientError::Agent(_)
                | banger_agent_proto::client::ClientError::ConnectionClosed),
            ) => {
                if !quiet {
                    eprintln!(
                        "cannot ask {vm}'s agent whether port {port} listens ({}); not waiting",
                        banger_proto::sanitize::one_line(&error.to_string())
                    );
                }
                return Ok(false);
            }
            Err(error) => return Err(agent_error(vm, error)),
        }
        if std::time::Instant::now() >= deadline {
            return Err(hinted(
                anyhow::anyhow!(
                    "Nothing listens on port {port} in VM `{vm}` after {} s",
                    timeout.as_secs()
                ),
                "is sshd enabled in its image? `banger vm logs NAME` shows its boot",
            ));
        }
        if !told && !quiet {
            eprintln!(
                "waiting up to {} s for {vm} to listen on port {port}…",
                timeout.as_secs()
            );
        }
        told = true;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Pins the guest's host keys (learned through the agent) under `alias`.
async fn pin_host_keys(
    agent: &AgentClient,
    vm: &str,
    alias: &str,
    managed: &ManagedSsh,
) -> anyhow::Result<()> {
    // A guest that just booted may still be generating its host keys.
    let deadline = std::time::Instant::now() + SSH_WAIT;
    let mut told = false;
    let keys = loop {
        let keys = agent
            .host_keys()
            .await
            .map_err(|error| agent_error(vm, error))?;
        if !keys.is_empty() {
            break keys;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "VM `{vm}` has no SSH host keys after {} s (is openssh-server installed in its image?)",
                SSH_WAIT.as_secs()
            );
        }
        if !told {
            eprintln!("waiting for {vm} to generate its SSH host keys…");
            told = true;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    write_known_hosts(&managed.known_hosts(), alias, &keys).with_context(|| format!("VM `{vm}`"))
}

/// Algorithms a guest's host key may have.
const HOST_KEY_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "rsa-sha2-256",
    "rsa-sha2-512",
];

/// Checks a host key reported by a guest: a known algorithm and a key blob
/// that is plain base64 decoding to a key of that algorithm. Anything else
/// (a newline that would add a `@cert-authority` line, spaces, options)
/// is refused, since the guest chooses these bytes.
fn check_host_key(key: &banger_proto::agent::HostKey) -> anyhow::Result<()> {
    use base64::Engine as _;
    let algorithm = key.algorithm.as_str();
    if !HOST_KEY_ALGORITHMS.contains(&algorithm) {
        bail!(
            "Refused SSH host key: unknown algorithm `{}`",
            banger_proto::sanitize::one_line(&key.algorithm.chars().take(64).collect::<String>())
        );
    }
    let blob = key.key.as_bytes();
    if blob.is_empty()
        || blob.len() > 16 * 1024
        || !blob
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'='))
    {
        bail!("Refused SSH host key ({algorithm}): the key is not plain base64 on one line");
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| {
            anyhow::anyhow!("Refused SSH host key ({algorithm}): the key is not valid base64")
        })?;
    // The blob starts with its own algorithm name (an SSH string).
    let named = decoded
        .get(..4)
        .map(|length| u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize)
        .and_then(|length| decoded.get(4..4 + length));
    let expected: &[u8] = if algorithm.starts_with("rsa-sha2-") {
        b"ssh-rsa"
    } else {
        algorithm.as_bytes()
    };
    if named != Some(expected) {
        bail!("Refused SSH host key ({algorithm}): the key is of another type");
    }
    Ok(())
}

/// Replaces the lines of `alias` in the known_hosts file at `path` with
/// `keys`. Every key is checked first: one bad key leaves the file as it
/// was. The file is replaced through a temporary file beside it.
fn write_known_hosts(
    path: &Path,
    alias: &str,
    keys: &[banger_proto::agent::HostKey],
) -> anyhow::Result<()> {
    for key in keys {
        check_host_key(key)?;
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("Cannot read {}", path.display()));
        }
    };
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|line| line.split_whitespace().next() != Some(alias))
        .map(str::to_owned)
        .collect();
    for key in keys {
        lines.push(format!("{alias} {} {}", key.algorithm, key.key));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    let partial = path.with_extension(format!("banger-{}", std::process::id()));
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
        .with_context(|| format!("Cannot write {}", path.display()))
}

async fn vm_of(socket: &Path, reference: &str) -> anyhow::Result<Vm> {
    Ok(Client::connect(socket)
        .await?
        .call::<method::VmShow>(VmRef {
            vm: reference.to_owned(),
        })
        .await?)
}

/// Prepares everything `ssh` needs for `vm`: the key installed, the host
/// keys pinned under `NAME.banger`. Returns the VM and the alias.
async fn prepare_ssh(
    socket: &Path,
    reference: &str,
    user: &str,
    port: u16,
) -> anyhow::Result<(Vm, String, ManagedSsh)> {
    let vm = vm_of(socket, reference).await?;
    let agent = connect(socket, &vm.name).await?;
    push_auth(&agent, &vm.name, user).await?;
    let managed = ManagedSsh::locate()?;
    let alias = vm.network.as_ref().map_or_else(
        || format!("{}.banger", vm.name),
        |network| network.dns_name.clone(),
    );
    pin_host_keys(&agent, &vm.name, &alias, &managed).await?;
    wait_listening(&agent, &vm.name, port, SSH_WAIT, false).await?;
    Ok((vm, alias, managed))
}

pub async fn ssh(socket: &Path, args: SshArgs) -> anyhow::Result<()> {
    let (vm, alias, managed) = prepare_ssh(socket, &args.name.vm, &args.user, args.port).await?;
    let Some(network) = &vm.network else {
        return Err(hinted(
            anyhow::anyhow!("VM `{}` has no network interface", vm.name),
            "the daemon runs with `[network] enabled = false`; use `banger vm run` instead",
        ));
    };
    let mut command = std::process::Command::new("ssh");
    command
        .arg("-i")
        .arg(managed.key())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            managed.known_hosts().display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("HostKeyAlias={alias}"))
        .args(["-l", &args.user])
        .args(["-p", &args.port.to_string()])
        .arg(&network.ip);
    if !args.command.is_empty() {
        command.arg("--").args(&args.command);
    }
    use std::os::unix::process::CommandExt;
    let error = command.exec();
    Err(hinted(
        anyhow::Error::new(error).context("Cannot run ssh"),
        "install the OpenSSH client (apt install openssh-client)",
    ))
}

/// `ProxyCommand` of `ssh-config`: prepares keys for `host` (`NAME.banger`)
/// and pipes stdin/stdout to the VM's `port`.
pub async fn ssh_proxy(socket: &Path, host: &str, port: u16) -> anyhow::Result<()> {
    let name = host.split('.').next().unwrap_or(host);
    let user = std::env::var("BANGER_SSH_USER").unwrap_or_else(|_| "root".to_owned());
    let (vm, _, _) = prepare_ssh(socket, name, &user, port).await?;
    let Some(network) = &vm.network else {
        bail!("VM `{}` has no network interface", vm.name);
    };
    let mut stream = tokio::net::TcpStream::connect((network.ip.as_str(), port))
        .await
        .with_context(|| format!("Cannot reach {}:{port}", network.ip))?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut stdio).await;
    Ok(())
}

pub fn ssh_config(printer: Printer) -> anyhow::Result<()> {
    let managed = ManagedSsh::locate()?;
    let program = std::env::current_exe()
        .map_or_else(|_| "banger".to_owned(), |path| path.display().to_string());
    printer.data(&format!(
        "# banger VMs: add to ~/.ssh/config, then `ssh NAME.banger`.\n\
         Host *.banger\n    \
         User root\n    \
         IdentityFile {key}\n    \
         IdentitiesOnly yes\n    \
         UserKnownHostsFile {known_hosts}\n    \
         StrictHostKeyChecking yes\n    \
         ProxyCommand {program} vm ssh-proxy %h %p\n",
        key = managed.key().display(),
        known_hosts = managed.known_hosts().display(),
    ));
    Ok(())
}

// ---- logs ----

/// How `vm logs` prints the console's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Escape sequences and other control characters made visible.
    Text,
    Raw,
    /// `{"line": "..."}` per line.
    Json,
}

/// Turns console bytes into output, holding back what may continue in
/// the next chunk (a partial UTF-8 character or `\r`; a partial line for
/// JSON).
struct LogPrinter {
    format: LogFormat,
    pending: Vec<u8>,
}

impl LogPrinter {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.format == LogFormat::Raw {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        let ready = match self.format {
            LogFormat::Json => self
                .pending
                .iter()
                .rposition(|byte| *byte == b'\n')
                .map_or(0, |newline| newline + 1),
            _ => {
                let valid = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    Err(error) if error.error_len().is_none() => error.valid_up_to(),
                    Err(_) => self.pending.len(),
                };
                if self.pending[..valid].ends_with(b"\r") {
                    valid - 1
                } else {
                    valid
                }
            }
        };
        let chunk: Vec<u8> = self.pending.drain(..ready).collect();
        self.render(&chunk)
    }

    fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.render(&rest)
    }

    fn render(&self, bytes: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(bytes);
        match self.format {
            LogFormat::Raw => bytes.to_vec(),
            LogFormat::Text => banger_proto::sanitize::text(&text).into_bytes(),
            LogFormat::Json => {
                let mut out = Vec::new();
                for line in text.split_inclusive('\n') {
                    let line = line.strip_suffix('\n').unwrap_or(line);
                    let line = line.strip_suffix('\r').unwrap_or(line);
                    let object = serde_json::json!({ "line": line });
                    out.extend_from_slice(object.to_string().as_bytes());
                    out.push(b'\n');
                }
                out
            }
        }
    }
}

pub async fn logs(
    socket: &Path,
    reference: &str,
    follow: bool,
    tail: Option<u64>,
    raw: bool,
    json: bool,
) -> anyhow::Result<()> {
    use banger_workspace::stream::{read_frame, Frame};
    use std::io::Write as _;
    let (_, mut reader, _write) = Client::connect(socket)
        .await?
        .call_streaming::<method::VmLogs>(banger_proto::vm::LogsParams {
            vm: reference.to_owned(),
            tail,
            follow,
        })
        .await?;
    let format = if raw {
        LogFormat::Raw
    } else if json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let mut printer = LogPrinter {
        format,
        pending: Vec::new(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut out = |bytes: &[u8]| -> anyhow::Result<()> {
        stdout.write_all(bytes)?;
        stdout.flush()?;
        Ok(())
    };
    loop {
        match read_frame(&mut reader).await {
            Ok(Some(Frame::Data(bytes))) => out(&printer.push(&bytes))?,
            Ok(Some(Frame::End(_))) => break,
            Ok(Some(Frame::Error(error))) => {
                out(&printer.finish())?;
                return Err(crate::client::ClientError::Rpc(error).into());
            }
            Ok(None) => {
                out(&printer.finish())?;
                bail!("The daemon closed the console log stream early");
            }
            Err(error) => {
                out(&printer.finish())?;
                return Err(
                    anyhow::Error::new(error).context("Reading the console log stream failed")
                );
            }
        }
    }
    out(&printer.finish())
}

/// An agent error of `vm logs --guest`, with a hint when the guest has no
/// `journalctl` to run.
fn journal_error(vm: &str, error: banger_agent_proto::client::ClientError) -> anyhow::Error {
    let missing = matches!(
        &error,
        banger_agent_proto::client::ClientError::Agent(refusal)
            if refusal.message.contains("journalctl") && refusal.message.contains("No such file")
    );
    let error = agent_error(vm, error);
    if missing {
        hinted(
            error.context("The guest has no journalctl"),
            "its init is not systemd; the agent logs to the console: `banger vm logs NAME`",
        )
    } else {
        error
    }
}

/// `vm logs --guest`: the guest's journal for this boot, read by running
/// `journalctl` in the guest through the agent (`--lines=N` for `--tail`,
/// `--follow` until Ctrl-C, which is passed on to it).
pub async fn guest_logs(
    socket: &Path,
    reference: &str,
    follow: bool,
    tail: Option<u64>,
    raw: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let agent = connect(socket, reference).await?;
    let mut argv: Vec<String> = ["journalctl", "--no-pager", "--boot", "--output=short-iso"]
        .map(str::to_owned)
        .to_vec();
    if let Some(lines) = tail {
        argv.push(format!("--lines={lines}"));
    }
    if follow {
        argv.push("--follow".to_owned());
    }
    let session = agent
        .exec(ExecRequest {
            argv,
            ..ExecRequest::default()
        })
        .await
        .map_err(|error| journal_error(reference, error))?;
    let ExecSession {
        mut stdin,
        mut stdout,
        mut stderr,
        control,
        exit,
    } = session;
    stdin.close();
    let format = if raw {
        LogFormat::Raw
    } else if json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let mut printer = LogPrinter {
        format,
        pending: Vec::new(),
    };
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => { let _ = control.signal(libc::SIGINT); }
                Some(()) = terminate.recv() => { let _ = control.signal(libc::SIGTERM); }
                else => break,
            }
        }
    });
    let errors = tokio::spawn(async move {
        let mut err = tokio::io::stderr();
        while let Some(chunk) = stderr.recv().await {
            let text = banger_proto::sanitize::text(&String::from_utf8_lossy(&chunk));
            if err.write_all(text.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stdout.recv().await {
        if out
            .write_all(&printer.push(&chunk))
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    let _ = out.write_all(&printer.finish()).and_then(|()| out.flush());
    let status = exit.wait().await;
    signals.abort();
    let _ = errors.await;
    let status = status.map_err(|error| journal_error(reference, error))?;
    match status.shell_code() {
        0 => Ok(()),
        // Ctrl-C while following is how one leaves.
        130 if follow => Ok(()),
        code => Err(Exit(u8::try_from(code).unwrap_or(255)).into()),
    }
}

// ---- stats ----

pub async fn stats(
    socket: &Path,
    printer: Printer,
    reference: &str,
    json: bool,
) -> anyhow::Result<()> {
    let stats = Client::connect(socket)
        .await?
        .call::<method::VmStats>(VmRef {
            vm: reference.to_owned(),
        })
        .await?;
    if json {
        printer.json(&stats);
        return Ok(());
    }
    let guest = &stats.guest;
    let mib = |bytes: u64| bytes / (1024 * 1024);
    printer.data(&format!(
        "vm         {}\nuptime     {:.0} s\nload       {:.2} {:.2} {:.2}\ncpus       {}\nmemory     {} MiB available of {} MiB\ndisk       {} MiB available of {} MiB\nvmm pid    {}\nvmm rss    {} MiB\nvmm cpu    {:.1} s ({} threads)",
        stats.vm.name,
        guest.uptime_seconds,
        guest.load_average[0],
        guest.load_average[1],
        guest.load_average[2],
        guest.cpu_count,
        mib(guest.memory_available_bytes),
        mib(guest.memory_total_bytes),
        mib(guest.disk_available_bytes),
        mib(guest.disk_total_bytes),
        stats.vmm.pid,
        mib(stats.vmm.rss_bytes),
        stats.vmm.cpu_seconds,
        stats.vmm.threads,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_name_a_vm_only_before_a_colon_without_slashes() {
        assert_eq!(
            parse_location("devbox:/root/x"),
            Location::Guest {
                vm: "devbox".into(),
                path: "/root/x".into()
            }
        );
        assert_eq!(parse_location("./a:b"), Location::Host("./a:b".into()));
        assert_eq!(parse_location("plain"), Location::Host("plain".into()));
        assert_eq!(parse_location(":x"), Location::Host(":x".into()));
    }

    #[test]
    fn last_component_ignores_trailing_slashes() {
        assert_eq!(last_component("/root/repo/").as_deref(), Some("repo"));
        assert_eq!(last_component("/"), None);
    }

    fn host_key(algorithm: &str, key: &str) -> banger_proto::agent::HostKey {
        banger_proto::agent::HostKey {
            algorithm: algorithm.into(),
            key: key.into(),
            path: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
        }
    }

    /// A real ed25519 public key blob.
    const ED25519: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn valid_host_keys_replace_the_alias_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(
            &path,
            "other.banger ssh-ed25519 AAAA\ndev.banger ssh-rsa OLD\n",
        )
        .unwrap();
        write_known_hosts(&path, "dev.banger", &[host_key("ssh-ed25519", ED25519)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("other.banger ssh-ed25519 AAAA\ndev.banger ssh-ed25519 {ED25519}\n")
        );
    }

    #[test]
    fn hostile_host_keys_are_refused_and_known_hosts_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let before = "other.banger ssh-ed25519 AAAA\n";
        std::fs::write(&path, before).unwrap();
        let hostile = [
            // A newline that would add a CA trusted for every VM.
            host_key(
                "ssh-ed25519",
                &format!("{ED25519}\n@cert-authority *.banger ssh-ed25519 {ED25519}"),
            ),
            host_key("ssh-ed25519\n@cert-authority", ED25519),
            host_key("ssh-dss", ED25519),
            host_key("ssh-ed25519", "not base64!"),
            host_key(
                "ssh-ed25519",
                "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJ",
            ),
            host_key("ssh-ed25519", &format!("{ED25519} comment")),
            // The blob names another algorithm.
            host_key("ecdsa-sha2-nistp256", ED25519),
            host_key("ssh-ed25519", ""),
        ];
        for key in hostile {
            let keys = [host_key("ssh-ed25519", ED25519), key.clone()];
            let error = write_known_hosts(&path, "dev.banger", &keys)
                .expect_err(&format!("{key:?} was accepted"));
            assert!(
                error.to_string().starts_with("Refused SSH host key"),
                "{error:#}"
            );
            assert!(!error.to_string().contains('\n'), "{error:#}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        }
    }
}
