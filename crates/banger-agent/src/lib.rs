//! `banger-agent`: the guest agent.
//!
//! - [`server`]: the agent's side of a connection; [`exec`] and [`system`]
//!   implement the operations (tar streams with `banger_agent_proto::files`);
//!   [`reaper`] collects children.
//! - The frame codec and flow control both sides share, and the host-side
//!   client, are `banger-agent-proto`; the frame types are in
//!   `banger_proto::agent`, the format in `docs/agent-protocol.md`.
//! - [`transport`]: the guest's vsock listener and virtio-serial port.
//! - [`init`]: PID 1 duties.
//! - [`journal`]: the log, to the console and, once it runs, the guest's journal.
//!
//! - [`network`]: the guest network from `banger.net=`.
//!
//! [`main`] runs the binary:
//! 1. As PID 1 in banger's initramfs: load modules, mount the root disk,
//!    switch to it and re-execute from there ([`init::switch_from_initramfs`]).
//! 2. As PID 1: mount, set the hostname, maybe hand PID 1 to the root's init
//!    ([`init::BootParameters::hand_off_target`]).
//! 3. Start the runtime and the reaper (all children as PID 1, own ones
//!    otherwise); when booted as init, apply `banger.net=`.
//! 4. Serve connections on the chosen transport until a host asks for
//!    shutdown (or, as PID 1, SIGTERM/SIGINT/SIGPWR arrives).
//! 5. As PID 1 power off; otherwise exit.

pub mod cli;
pub mod exec;
pub mod grow;
pub mod host_keys;
pub mod identity;
pub mod init;
pub mod journal;
pub mod network;
pub mod reaper;
pub mod server;
pub mod system;
pub mod transport;
pub mod users;
pub mod workdisk;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::UnixListener;

use crate::cli::{Args, Listen};
use crate::reaper::{ReapMode, Reaper};
use crate::server::{serve_connection, Agent};
use crate::system::SystemPaths;

/// Entry point of the `banger-agent` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let journal = journal::init();
    let booted_as_init = std::process::id() == 1 && args.listen_unix.is_none();
    let mut is_init = booted_as_init;
    if booted_as_init {
        let mut from_initramfs = args.from_initramfs;
        if init::is_initramfs() {
            match init::switch_from_initramfs() {
                Ok(copied) => {
                    from_initramfs = true;
                    if copied {
                        let error = init::exec_agent_copy();
                        tracing::error!(
                            "Failed to execute {}: {error}; going on without it",
                            init::AGENT_COPY
                        );
                    }
                }
                Err(error) => tracing::error!(
                    "{}; serving from the initramfs",
                    banger_proto::error_chain(&error)
                ),
            }
        }
        match init::set_up() {
            Ok(parameters) => {
                // The host only lengthens a grown disk; its file system
                // grows here, in the guest (read-only roots stay as they are).
                if !parameters.root.read_only {
                    grow::grow_and_log(Path::new("/"));
                }
                // Before the image's init, so its services see /root in place.
                match workdisk::mount() {
                    Ok(Some(device)) => {
                        tracing::info!(device = %device.display(), "work disk mounted on /root");
                        grow::grow_and_log(Path::new(workdisk::WORK_DISK_MOUNT));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::error!("{}", banger_proto::error_chain(&error)),
                }
                if let Some(init_path) = parameters.hand_off_target(from_initramfs, Path::exists) {
                    match init::hand_off(&init_path) {
                        Ok(()) => is_init = false,
                        Err(error) => tracing::error!("{}", banger_proto::error_chain(&error)),
                    }
                }
            }
            Err(error) => tracing::error!("{}", banger_proto::error_chain(&error)),
        }
    }
    let listen = if booted_as_init {
        args.listen_in(Path::new("/"), Duration::from_secs(3))
    } else {
        args.listen()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("Failed to start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let paths = SystemPaths {
        ssh_config_dir: args.ssh_config_dir.clone(),
        command_path: args
            .command_path
            .clone()
            .unwrap_or_else(|| exec::DEFAULT_PATH.to_owned()),
        ..SystemPaths::default()
    };
    let result = runtime.block_on(async {
        if booted_as_init {
            apply_network().await;
        }
        // The image's init was handed PID 1: its journald may come.
        if booted_as_init && !is_init {
            tokio::spawn(journal.attach_when_ready());
        }
        run(listen, args.announce_unix.clone(), paths, is_init).await
    });
    // Blocking tasks (a tar stream of a dead connection) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if is_init {
        if let Err(error) = &result {
            tracing::error!("{}", banger_proto::error_chain(error.as_ref()));
        }
        init::power_off();
    }
    if booted_as_init && result.is_ok() {
        // A host asked for shutdown and the image's init is PID 1.
        init::ask_init_to_power_off();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{}", banger_proto::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Applies `banger.net=`; failures go to the console, the agent serves anyway.
async fn apply_network() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match network::apply(
        &cmdline,
        Path::new("/sys/class/net"),
        Path::new("/etc/resolv.conf"),
    )
    .await
    {
        Ok(Some(applied)) => tracing::info!(
            interface = %applied.interface,
            address = %applied.network.address,
            "network configured"
        ),
        Ok(None) => {}
        Err(error) => tracing::error!("{}", banger_proto::error_chain(&error)),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Tells the host the agent serves (once, in the background; a host that
/// does not listen for it, or an old one, finds the agent by connecting).
fn announce(announce: impl FnOnce() -> std::io::Result<()> + Send + 'static) {
    tokio::task::spawn_blocking(move || match announce() {
        Ok(()) => tracing::info!("announced to the host"),
        Err(error) => tracing::debug!("could not announce to the host: {error}"),
    });
}

async fn run(
    listen: Listen,
    announce_unix: Option<std::path::PathBuf>,
    paths: SystemPaths,
    is_init: bool,
) -> Result<(), BoxError> {
    use banger_proto::agent::ANNOUNCE_VSOCK_PORT;
    let mode = if is_init {
        ReapMode::AllChildren
    } else {
        ReapMode::OwnChildren
    };
    let reaper = Reaper::start(mode)?;
    let agent = if matches!(listen, Listen::Unix(_)) {
        Agent::new(paths, is_init, reaper)
    } else {
        Agent::in_guest(paths, is_init, reaper)
    };
    let stop = {
        let agent = Arc::clone(&agent);
        async move {
            if is_init {
                use tokio::signal::unix::{signal, SignalKind};
                let mut terminate = signal(SignalKind::terminate())?;
                let mut interrupt = signal(SignalKind::interrupt())?;
                let mut power = signal(SignalKind::from_raw(libc::SIGPWR))?;
                tokio::select! {
                    () = agent.shutdown_requested() => {}
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                    _ = power.recv() => {}
                }
            } else {
                agent.shutdown_requested().await;
            }
            Ok::<(), std::io::Error>(())
        }
    };
    match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            tracing::info!(socket = %path.display(), "serving");
            if let Some(device) = announce_unix {
                announce(move || transport::announce_unix(&device, ANNOUNCE_VSOCK_PORT));
            }
            serve_unix(listener, agent, stop).await?;
        }
        Listen::Vsock(port) => {
            let listener = transport::VsockListener::bind(port)?;
            tracing::info!(port, "serving on vsock");
            announce(|| transport::announce_vsock(ANNOUNCE_VSOCK_PORT));
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    stopped = &mut stop => { stopped?; break; }
                    accepted = listener.accept() => match accepted {
                        Ok(stream) => spawn_vsock_connection(&agent, stream),
                        Err(error) => tracing::warn!("accept failed: {error}"),
                    },
                }
            }
        }
        Listen::Serial(path) => {
            tracing::info!(device = %path.display(), "serving on virtio-serial");
            tokio::pin!(stop);
            // Open across connections (see `transport::announce_serial`).
            let mut held: Option<std::os::fd::OwnedFd> = None;
            loop {
                let port_in_use = held.take();
                let connection = async {
                    // The announcement goes first: writing it waits until
                    // the host end is connected, so the host reads it the
                    // moment both are there, and the agent never serves a
                    // port nobody holds (its reads would end at once). No
                    // pause between connections: the announcement waits
                    // for the next host by itself.
                    let port = path.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        let fd = match port_in_use {
                            Some(fd) => fd,
                            None => transport::open_serial_port(&port)?,
                        };
                        transport::announce_serial(&fd)?;
                        Ok::<_, std::io::Error>(fd)
                    })
                    .await
                    .unwrap_or_else(|error| Err(std::io::Error::other(error)));
                    let served = opened.and_then(|fd| {
                        let stream = transport::FdStream::new(fd.try_clone()?)?;
                        Ok((fd, stream))
                    });
                    match served {
                        Ok((fd, stream)) => {
                            if let Err(error) = serve_connection(Arc::clone(&agent), stream).await {
                                tracing::warn!("{}", banger_proto::error_chain(&error));
                            }
                            tracing::info!("the host end of the port closed");
                            Some(fd)
                        }
                        Err(error) => {
                            tracing::warn!("open {} and announce failed: {error}", path.display());
                            // Only after an error: do not spin on a broken port.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            None
                        }
                    }
                };
                tokio::select! {
                    stopped = &mut stop => { stopped?; break; }
                    kept = connection => held = kept,
                }
            }
        }
    }
    // Let the shutdown answer reach the host before the process goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

fn spawn_connection<S>(agent: &Arc<Agent>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let agent = Arc::clone(agent);
    tokio::spawn(async move {
        if let Err(error) = serve_connection(agent, stream).await {
            tracing::warn!("{}", banger_proto::error_chain(&error));
        }
    });
}

/// A vsock connection; when it ends the agent announces itself again. After
/// a snapshot is loaded Firecracker resets the guest's vsock transport
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), which closes every connection
/// while the listener stays: the announcement tells the new host at once
/// that the agent serves.
fn spawn_vsock_connection(agent: &Arc<Agent>, stream: transport::FdStream) {
    use banger_proto::agent::ANNOUNCE_VSOCK_PORT;
    let agent = Arc::clone(agent);
    tokio::spawn(async move {
        if let Err(error) = serve_connection(agent, stream).await {
            tracing::warn!("{}", banger_proto::error_chain(&error));
        }
        announce(|| transport::announce_vsock(ANNOUNCE_VSOCK_PORT));
    });
}

/// Serves connections from `listener` until `stop` resolves (tests and
/// `--listen-unix`).
pub async fn serve_unix<F>(
    listener: UnixListener,
    agent: Arc<Agent>,
    stop: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    tokio::pin!(stop);
    loop {
        tokio::select! {
            stopped = &mut stop => return stopped,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(&agent, stream),
                Err(error) => tracing::warn!("accept failed: {error}"),
            },
        }
    }
}
