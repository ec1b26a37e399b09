//! The HTTP/1.1 API server on the Unix socket, and what happens around each
//! request: delays, injected failures, the request log, and the process
//! effects of boot and reboot.
//!
//! Per request, in order:
//!
//! 1. Read the whole body.
//! 2. From here on the request is processed to the end even if the client
//!    hangs up, as by the real VMM. If a `FAKE_FIRECRACKER_DELAY` entry
//!    matches, sleep first: the request is held *before* it is processed.
//! 3. If a `FAKE_FIRECRACKER_FAIL` entry matches, answer 400
//!    `injected failure`; the request is not processed.
//! 4. Check the transport (payload size, `Content-Type`), parse into a
//!    [`VmmAction`](super::vmm::VmmAction), let the VMM apply it.
//! 5. Perform the action's effect (boot: console lines, crash timer, vsock
//!    bridge; reboot: exit timer).
//! 6. Append the request to the request log, then answer.

use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, SERVER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::models::Fault;
use super::router::{parse_request, RequestError};
use super::settings::Settings;
use super::vmm::{Boot, Effect, Vmm};
use super::{error_chain, vsock};

/// The real API server's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 51_200;
/// How long after `SendCtrlAltDel` the process exits, so that the 204
/// reaches the client first.
const CTRL_ALT_DEL_EXIT_DELAY: Duration = Duration::from_millis(100);
const INJECTED_FAILURE: &str = "injected failure";

/// Why the server stopped; decides the exit code and whether the API socket
/// is cleaned up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT (or the caller's shutdown future).
    Shutdown,
    /// The guest rebooted (`SendCtrlAltDel`).
    GuestReboot,
    /// `FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS` fired: a simulated crash.
    Crash,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Shutdown | Self::GuestReboot => 0,
            Self::Crash => 1,
        }
    }

    /// A crashed VMM leaves its API socket behind; a clean exit removes it.
    pub fn removes_api_socket(self) -> bool {
        self != Self::Crash
    }
}

/// What the server needs besides its socket and its VMM.
#[derive(Debug)]
pub struct ServerConfig {
    pub instance_id: String,
    pub settings: Settings,
    /// Opened by the caller so that an unwritable path fails at start-up.
    pub request_log: Option<RequestLog>,
    pub max_payload_size: usize,
}

/// The JSON-lines request log (`FAKE_FIRECRACKER_REQUEST_LOG`).
#[derive(Debug)]
pub struct RequestLog {
    file: File,
}

impl RequestLog {
    /// Opens (creating if needed) `path` for append.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }

    /// Appends one line with a single `write`: with `O_APPEND`, lines from
    /// several fake processes sharing the file do not interleave.
    fn record(&self, entry: &serde_json::Value) {
        let mut line = entry.to_string().into_bytes();
        line.push(b'\n');
        if let Err(error) = (&self.file).write_all(&line) {
            eprintln!("fake-firecracker: cannot write the request log: {error}");
        }
    }
}

struct Server {
    vmm: Mutex<Vmm>,
    config: ServerConfig,
    exit: mpsc::UnboundedSender<Exit>,
}

/// Serves the API on `listener` until `shutdown` completes or the guest
/// exits, one task per connection, keep-alive supported.
pub async fn run(
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
    vmm: Vmm,
    config: ServerConfig,
) -> Exit {
    let (exit_sender, mut exit_receiver) = mpsc::unbounded_channel();
    let server = Arc::new(Server {
        vmm: Mutex::new(vmm),
        config,
        exit: exit_sender,
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Exit::Shutdown,
            // Never `None`: `server` holds a sender for as long as we loop.
            Some(exit) = exit_receiver.recv() => return exit,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(Arc::clone(&server), stream));
                }
                Err(error) => eprintln!("fake-firecracker: accept failed: {error}"),
            },
        }
    }
}

async fn serve_connection(server: Arc<Server>, stream: UnixStream) {
    let service = service_fn(move |request| handle(Arc::clone(&server), request));
    // A client that hangs up mid-request is its own problem, not the VMM's.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    server: Arc<Server>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        // The client hung up before sending the whole request: like the
        // real server, process nothing.
        Err(_) => return Ok(response(StatusCode::BAD_REQUEST, None)),
    };
    // Processed in its own task: once the request is read, a client that
    // hangs up (a cancelled create) does not stop it, as with the real VMM.
    let processing = tokio::spawn(async move {
        if let Some(delay) = server.config.settings.delay(&method, &path) {
            tokio::time::sleep(delay).await;
        }
        let (status, answer) = server.respond(&method, &path, content_type.as_deref(), &body);
        if let Some(log) = &server.config.request_log {
            let logged_body = serde_json::from_slice::<serde_json::Value>(&body).ok();
            log.record(&serde_json::json!({
                "method": method.as_str(),
                "path": path,
                "body": logged_body,
                "status": status.as_u16(),
                "id": server.config.instance_id,
            }));
        }
        (status, answer)
    });
    let (status, answer) = processing.await.expect("request processing does not panic");
    Ok(response(status, answer.as_ref()))
}

impl Server {
    fn respond(
        &self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Option<serde_json::Value>) {
        if self.config.settings.fails(method, path) {
            return fault(INJECTED_FAILURE.to_owned());
        }
        if let Err(error) = check_transport(content_type, body, self.config.max_payload_size) {
            return fault(error_chain(&error));
        }
        let action = match parse_request(method, path, body) {
            Ok(action) => action,
            Err(error) => return fault(error_chain(&error)),
        };
        let outcome = self
            .vmm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(action);
        match outcome {
            Ok(outcome) => {
                if let Some(effect) = outcome.effect {
                    self.perform(effect);
                }
                match outcome.body {
                    Some(body) => (StatusCode::OK, Some(body)),
                    None => (StatusCode::NO_CONTENT, None),
                }
            }
            Err(error) => fault(error_chain(&error)),
        }
    }

    fn perform(&self, effect: Effect) {
        match effect {
            Effect::Booted(boot) => self.boot(boot),
            Effect::CtrlAltDel => self.exit_after(CTRL_ALT_DEL_EXIT_DELAY, Exit::GuestReboot),
        }
    }

    fn boot(&self, boot: Boot) {
        print_console(&boot, self.config.settings.console_text.as_deref());
        if let Some(delay) = self.config.settings.exit_after_boot {
            self.exit_after(delay, Exit::Crash);
        }
        if let Some(listener) = boot.vsock_listener {
            let mut agent: Option<PathBuf> = self.config.settings.vsock_agent.clone();
            if let Some(binary) = &self.config.settings.guest_agent_bin {
                agent = self.start_guest_agent(binary, &listener);
            }
            match UnixListener::from_std(listener) {
                Ok(listener) => {
                    tokio::spawn(vsock::serve(listener, agent));
                }
                Err(error) => eprintln!("fake-firecracker: cannot serve the vsock socket: {error}"),
            }
        }
    }

    /// Runs the guest's agent (`banger-agent --listen-unix`, announcing
    /// through [`vsock::guest_device_path`]) next to the
    /// vsock socket for as long as this VMM lives; when it exits (a host
    /// asked for shutdown) the "guest" powered off and so does the VMM.
    fn start_guest_agent(
        &self,
        binary: &std::path::Path,
        vsock: &std::os::unix::net::UnixListener,
    ) -> Option<PathBuf> {
        let address = vsock.local_addr().ok()?;
        let socket = address.as_pathname()?.with_extension("guest-agent.sock");
        let _ = std::fs::remove_file(&socket);
        // Bound before the agent starts, so its announcement finds it.
        let device = vsock::guest_device_path(&socket);
        let _ = std::fs::remove_file(&device);
        match std::os::unix::net::UnixListener::bind(&device) {
            Ok(listener) => {
                let served = listener
                    .set_nonblocking(true)
                    .and_then(|()| UnixListener::from_std(listener));
                match served {
                    Ok(listener) => {
                        tokio::spawn(vsock::serve_guest(
                            listener,
                            address.as_pathname()?.to_owned(),
                        ));
                    }
                    Err(error) => eprintln!(
                        "fake-firecracker: cannot serve {}: {error}",
                        device.display()
                    ),
                }
            }
            Err(error) => eprintln!(
                "fake-firecracker: cannot bind {}: {error}",
                device.display()
            ),
        }
        if let Some(fd) = std::env::var(super::settings::GUEST_LAUNCHER_FD_VAR)
            .ok()
            .and_then(|fd| fd.parse::<i32>().ok())
        {
            self.launch_guest_agent(fd, &socket);
            return Some(socket);
        }
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--announce-unix")
            .arg(&device)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        if let Some(dir) = &self.config.settings.guest_agent_ssh_dir {
            command.arg("--ssh-config-dir").arg(dir);
        }
        if let Some(path) = std::env::var_os(super::settings::GUEST_AGENT_COMMAND_PATH_VAR) {
            command.arg("--command-path").arg(path);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                eprintln!(
                    "fake-firecracker: cannot start the guest agent {}: {error}",
                    binary.display()
                );
                return None;
            }
        };
        let sender = self.exit.clone();
        let cleanup = socket.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = std::fs::remove_file(&cleanup);
            eprintln!("fake-firecracker: guest agent exited ({status:?}); powering off");
            let _ = sender.send(Exit::GuestReboot);
        });
        Some(socket)
    }

    /// Jailed: the agent is run by `fake-jailer`'s root launcher behind
    /// descriptor `fd` (see `banger_testkit::fake_jailer`), which is told
    /// the socket path and closes its end when the agent exits.
    #[allow(unsafe_code)]
    fn launch_guest_agent(&self, fd: i32, socket: &std::path::Path) {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: the descriptor was passed to this process by the fake
        // jailer for this use only; nothing else in it owns it.
        let mut launcher = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        let mut line = socket.as_os_str().to_string_lossy().into_owned();
        line.push('\n');
        if let Err(error) = launcher.write_all(line.as_bytes()) {
            eprintln!("fake-firecracker: cannot reach the guest launcher: {error}");
            return;
        }
        let sender = self.exit.clone();
        let cleanup = socket.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut launcher, &mut rest);
            let _ = std::fs::remove_file(&cleanup);
            eprintln!("fake-firecracker: guest agent exited; powering off");
            let _ = sender.send(Exit::GuestReboot);
        });
    }

    fn exit_after(&self, delay: Duration, exit: Exit) {
        let sender = self.exit.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // The server may already be stopping for another reason.
            let _ = sender.send(exit);
        });
    }
}

/// The guest goes when its VMM goes (and only then), however the VMM ends: a VMM killed
/// with SIGKILL (`vm delete --force`) runs no drop handler, so
/// `kill_on_drop` alone would leave the agent behind.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and touches no state shared with
    // the parent. The runtime is single-threaded, so the parent thread the
    // signal is tied to is the process's main thread, which lives as long as
    // the VMM.
    // Its own session too, like a guest, which no signal to the host
    // daemon's process group or session reaches.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Stand-in for the guest's serial console, which Firecracker wires to its
/// stdout, so that log capture can be tested.
fn print_console(boot: &Boot, extra: Option<&str>) {
    let mut stdout = std::io::stdout().lock();
    // Nobody reading the console must not break the VMM.
    let _ = writeln!(
        stdout,
        "fake-firecracker: booting kernel {} cmdline {}",
        boot.kernel_image_path,
        boot.boot_args.as_deref().unwrap_or("")
    );
    let _ = writeln!(stdout, "fake-firecracker: guest running");
    if let Some(extra) = extra {
        let _ = writeln!(stdout, "{extra}");
    }
    let _ = stdout.flush();
}

/// The payload limit and the media type the yaml says the API consumes.
fn check_transport(
    content_type: Option<&str>,
    body: &[u8],
    max_payload_size: usize,
) -> Result<(), RequestError> {
    if body.len() > max_payload_size {
        return Err(RequestError::PayloadTooLarge {
            size: body.len(),
            limit: max_payload_size,
        });
    }
    if let Some(content_type) = content_type.filter(|_| !body.is_empty()) {
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if !media_type.eq_ignore_ascii_case("application/json") {
            return Err(RequestError::UnsupportedContentType {
                content_type: content_type.to_owned(),
            });
        }
    }
    Ok(())
}

fn fault(message: String) -> (StatusCode, Option<serde_json::Value>) {
    let fault = Fault {
        fault_message: message,
    };
    let body = serde_json::to_value(fault).expect("Fault serializes");
    (StatusCode::BAD_REQUEST, Some(body))
}

fn response(status: StatusCode, body: Option<&serde_json::Value>) -> Response<Full<Bytes>> {
    let builder = Response::builder()
        .status(status)
        .header(SERVER, "Firecracker API");
    let response = match body {
        Some(body) => builder
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string()))),
        None => builder.body(Full::new(Bytes::new())),
    };
    response.expect("status and headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_checks() {
        assert!(check_transport(Some("application/json"), b"{}", 10).is_ok());
        assert!(check_transport(Some("application/json; charset=utf-8"), b"{}", 10).is_ok());
        assert!(check_transport(None, b"{}", 10).is_ok());
        assert!(check_transport(Some("text/xml"), b"", 10).is_ok());
        assert!(matches!(
            check_transport(Some("text/xml"), b"{}", 10),
            Err(RequestError::UnsupportedContentType { .. })
        ));
        assert!(matches!(
            check_transport(None, &[b' '; 11], 10),
            Err(RequestError::PayloadTooLarge {
                size: 11,
                limit: 10
            })
        ));
    }

    #[test]
    fn crash_keeps_the_socket_and_fails() {
        assert_eq!(Exit::Crash.code(), 1);
        assert!(!Exit::Crash.removes_api_socket());
        assert_eq!(Exit::GuestReboot.code(), 0);
        assert!(Exit::Shutdown.removes_api_socket());
    }
}
