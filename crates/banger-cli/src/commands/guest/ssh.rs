//! `vm authsync`, `vm ssh`, `vm ssh-proxy` and `ssh-config`: banger's own
//! key pair installed in the guest, the guest's host keys pinned, and the
//! wait for its sshd to listen.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use banger_agent_proto::client::AgentClient;
use banger_proto::agent::AuthSyncRequest;
use banger_proto::{method, Vm, VmRef};

use super::{agent_error, connect};
use crate::args::{AuthsyncArgs, SshArgs};
use crate::client::Client;
use crate::error::{hinted, Hint as _};
use crate::printer::Printer;

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
            .context("Neither XDG_DATA_HOME nor HOME is set")
            .hint("set HOME to your home directory")?;
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
                .with_context(|| format!("Cannot create {}", self.dir.display()))
                .hint("check that your home directory is yours and writable")?;
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
                return Err(hinted(
                    anyhow::anyhow!("ssh-keygen failed ({status})"),
                    format!(
                        "its message is above; check that {} is yours and writable",
                        self.dir.display()
                    ),
                ));
            }
        }
        std::fs::read_to_string(&public)
            .map(|key| key.trim().to_owned())
            .with_context(|| format!("Cannot read {}", public.display()))
            .hint(format!(
                "remove {} to have banger make a new key pair",
                self.dir.display()
            ))
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
            return Err(hinted(
                anyhow::anyhow!(
                    "VM `{vm}` has no SSH host keys after {} s",
                    SSH_WAIT.as_secs()
                ),
                format!("is openssh-server installed in its image? `banger vm logs {vm}` shows its boot"),
            ));
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
        check_host_key(key).hint(
            "regenerate the guest's host keys: `banger vm run NAME -- sh -c 'rm -f /etc/ssh/ssh_host_* && ssh-keygen -A'`",
        )?;
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("Cannot read {}", path.display()))
                .hint("check that it is yours; banger rewrites it for each VM");
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
        .hint("check that it and its directory are yours and writable")
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
        return Err(hinted(
            anyhow::anyhow!("VM `{}` has no network interface", vm.name),
            "the daemon runs with `[network] enabled = false`; use `banger vm run` instead",
        ));
    };
    let mut stream = tokio::net::TcpStream::connect((network.ip.as_str(), port))
        .await
        .with_context(|| format!("Cannot reach {}:{port}", network.ip))
        .hint(format!(
            "`banger vm logs {}` shows whether sshd started",
            vm.name
        ))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
