//! A client for QEMU's machine protocol (QMP) on its Unix socket.
//!
//! Each operation opens its own connection (QEMU serves one QMP client per
//! socket at a time, so holding none between calls leaves the socket free
//! for the next daemon instance or a human with `socat`):
//!
//! 1. Connect and read the greeting, `{"QMP": {"version": ..., ...}}`.
//! 2. Send `{"execute": "qmp_capabilities", "id": 1}` and wait for its
//!    `return`: QEMU accepts no other command before it.
//! 3. Send each command with the next numeric `id`, then read messages
//!    until the one carrying that `id`: `return` is success, `error` (with
//!    `class` and `desc`) is [`QmpError::Refused`].
//! 4. Asynchronous events (`{"event": "SHUTDOWN", ...}`) may arrive at any
//!    point, also between a command and its reply (`system_powerdown`'s
//!    `POWERDOWN` usually comes first). They are kept in
//!    [`QmpConnection::events`] and never taken for a reply.
//! 5. Every step runs under the client's timeout; messages are one JSON
//!    object per line, at most [`MAX_MESSAGE_BYTES`] long.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// QMP messages are small; a longer line is not QEMU talking.
pub const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Could not connect to the QMP socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not send {command} to QEMU")]
    SendCommand {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("Could not read from the QMP socket {}", socket.display())]
    ReadMessage {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QEMU closed the QMP connection {}", socket.display())]
    ConnectionClosed { socket: PathBuf },
    #[error("QEMU sent a QMP message longer than {limit} bytes")]
    MessageTooLong { limit: u64 },
    #[error("QEMU sent a QMP message that is not a JSON object: {line}")]
    DecodeMessage {
        line: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("QEMU did not greet with a QMP banner but with {message}")]
    UnexpectedGreeting { message: Value },
    #[error("QEMU refused {command}: {description}")]
    Refused {
        command: String,
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        description: String,
    },
    #[error("QEMU answered {command} with an unexpected message {message}")]
    UnexpectedReply { command: String, message: Value },
    #[error("Could not decode QEMU's answer to {command}")]
    DecodeReply {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QEMU did not answer {step} within {timeout:?}")]
    TimedOut { step: String, timeout: Duration },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `POWERDOWN`, `STOP`, `RESUME`.
    pub name: String,
    /// The event's `data` member, `Null` when it has none.
    pub data: Value,
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the guest's vCPUs are running.
    pub running: bool,
    /// QEMU's run state: `prelaunch` (started with `-S`, never run),
    /// `running`, `paused`, `shutdown`, `guest-panicked`, ...
    pub status: String,
}

/// Client for one QEMU process's QMP socket. Cheap to create; holds no
/// connection.
#[derive(Debug, Clone)]
pub struct QmpClient {
    socket: PathBuf,
    timeout: Duration,
}

impl QmpClient {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Sets the timeout of each step (connecting with the handshake, and
    /// each command).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Steps 1 and 2: a connection ready for commands.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn connect(&self) -> Result<QmpConnection, QmpError> {
        let timeout = self.timeout;
        let handshake = async {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| QmpError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
            let (reader, writer) = stream.into_split();
            let mut connection = QmpConnection {
                socket: self.socket.clone(),
                reader: BufReader::new(reader),
                writer,
                timeout,
                next_id: 1,
                events: Vec::new(),
            };
            let greeting = connection.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::UnexpectedGreeting { message: greeting });
            }
            connection.execute_untimed("qmp_capabilities", None).await?;
            Ok(connection)
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| QmpError::TimedOut {
                step: "the QMP handshake".to_owned(),
                timeout,
            })?
    }

    /// `query-status` on a new connection.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.connect().await?.query_status().await
    }

    /// `cont`: runs the vCPUs of a guest started with `-S` (or paused).
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.connect().await?.execute("cont", None).await.map(drop)
    }

    /// `stop`: pauses the vCPUs.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.connect().await?.execute("stop", None).await.map(drop)
    }

    /// `system_powerdown`: presses the guest's ACPI power button. Returns
    /// as soon as QEMU has injected the event; the guest decides what to
    /// do with it.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.connect()
            .await?
            .execute("system_powerdown", None)
            .await
            .map(drop)
    }

    /// `quit`: QEMU exits at once (the guest is not asked).
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn quit(&self) -> Result<(), QmpError> {
        self.connect().await?.execute("quit", None).await.map(drop)
    }
}

/// Writes `bytes` (one short command line) with `fd` attached as
/// `SCM_RIGHTS`, in one `sendmsg`.
async fn send_with_fd(
    writer: &OwnedWriteHalf,
    bytes: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let stream: &tokio::net::UnixStream = writer.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let fds = [fd.as_raw_fd()];
            nix::sys::socket::sendmsg::<()>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(bytes)],
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(sent) if sent == bytes.len() => return Ok(()),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the command was sent in part",
                ))
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

/// A negotiated QMP connection (after step 2).
#[derive(Debug)]
pub struct QmpConnection {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
    events: Vec<QmpEvent>,
}

impl QmpConnection {
    /// Events received so far on this connection, oldest first.
    #[must_use]
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value (step 3).
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.execute_untimed(command, arguments))
            .await
            .map_err(|_| QmpError::TimedOut {
                step: command.to_owned(),
                timeout,
            })?
    }

    /// `query-status`.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value).map_err(|source| QmpError::DecodeReply {
            command: "query-status".to_owned(),
            source,
        })
    }

    /// `getfd`: hands QEMU the open file `fd` under `name` (the fd travels
    /// with the command as `SCM_RIGHTS`), for `migrate` and
    /// `migrate-incoming` to use as `fd:NAME`.
    ///
    /// # Errors
    /// See [`QmpError`].
    pub async fn pass_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        let timeout = self.timeout;
        let arguments = Some(json!({ "fdname": name }));
        tokio::time::timeout(timeout, self.execute_inner("getfd", arguments, Some(fd)))
            .await
            .map_err(|_| QmpError::TimedOut {
                step: "getfd".to_owned(),
                timeout,
            })?
            .map(drop)
    }

    async fn execute_untimed(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None).await
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"execute": command, "id": id});
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        let send_error = |source| QmpError::SendCommand {
            command: command.to_owned(),
            source,
        };
        match fd {
            Some(fd) => send_with_fd(&self.writer, line.as_bytes(), fd)
                .await
                .map_err(send_error)?,
            None => {
                self.writer
                    .write_all(line.as_bytes())
                    .await
                    .map_err(send_error)?;
                self.writer.flush().await.map_err(send_error)?;
            }
        }

        loop {
            let message = self.read_message().await?;
            if let Some(name) = message.get("event").and_then(Value::as_str) {
                self.events.push(QmpEvent {
                    name: name.to_owned(),
                    data: message.get("data").cloned().unwrap_or(Value::Null),
                });
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(QmpError::UnexpectedReply {
                    command: command.to_owned(),
                    message,
                });
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError::Refused {
                    command: command.to_owned(),
                    class: text("class"),
                    description: text("desc"),
                });
            }
            return Err(QmpError::UnexpectedReply {
                command: command.to_owned(),
                message,
            });
        }
    }

    /// One line, parsed as a JSON object.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_MESSAGE_BYTES)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| QmpError::ReadMessage {
                socket: self.socket.clone(),
                source,
            })?;
        if read == 0 {
            return Err(QmpError::ConnectionClosed {
                socket: self.socket.clone(),
            });
        }
        if line.last() != Some(&b'\n') {
            return if read as u64 >= MAX_MESSAGE_BYTES {
                Err(QmpError::MessageTooLong {
                    limit: MAX_MESSAGE_BYTES,
                })
            } else {
                Err(QmpError::ConnectionClosed {
                    socket: self.socket.clone(),
                })
            };
        }
        let text = String::from_utf8_lossy(&line);
        match serde_json::from_str::<Value>(text.trim_end()) {
            Ok(value) if value.is_object() => Ok(value),
            Ok(_) => Err(QmpError::DecodeMessage {
                line: text.trim_end().to_owned(),
                source: None,
            }),
            Err(source) => Err(QmpError::DecodeMessage {
                line: text.trim_end().to_owned(),
                source: Some(source),
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_server {
    //! An in-test stand-in for QEMU's QMP side: serves one scripted
    //! conversation per connection and records the commands it received.

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// What the fake sends in answer to one command: any number of raw
    /// lines (events, or deliberately broken replies), then, unless
    /// `reply` is `None`, the reply carrying the command's id.
    pub(crate) struct Answer {
        pub before: Vec<String>,
        pub reply: Option<Value>,
    }

    impl Answer {
        pub(crate) fn ok() -> Self {
            Self {
                before: Vec::new(),
                reply: Some(json!({"return": {}})),
            }
        }
    }

    pub(crate) type Script = dyn Fn(&str) -> Answer + Send + Sync;

    pub(crate) struct FakeQmp {
        pub commands: Arc<Mutex<Vec<Value>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeQmp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub(crate) fn greeting() -> String {
        json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}).to_string()
    }

    impl FakeQmp {
        pub(crate) fn start(
            socket: &Path,
            script: impl Fn(&str) -> Answer + Send + Sync + 'static,
        ) -> Self {
            let listener = UnixListener::bind(socket).unwrap();
            let commands = Arc::new(Mutex::new(Vec::new()));
            let script: Arc<Script> = Arc::new(script);
            let recorded = Arc::clone(&commands);
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (reader, mut writer) = stream.into_split();
                    let mut lines = BufReader::new(reader).lines();
                    if writer
                        .write_all(format!("{}\n", greeting()).as_bytes())
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    while let Ok(Some(line)) = lines.next_line().await {
                        let request: Value = serde_json::from_str(&line).unwrap();
                        recorded.lock().unwrap().push(request.clone());
                        let command = request["execute"].as_str().unwrap_or_default();
                        let answer = if command == "qmp_capabilities" {
                            Answer::ok()
                        } else {
                            script(command)
                        };
                        let mut out = String::new();
                        for line in answer.before {
                            out.push_str(&line);
                            out.push('\n');
                        }
                        if let Some(mut reply) = answer.reply {
                            if reply.get("id").is_none() {
                                reply["id"] = request["id"].clone();
                            }
                            out.push_str(&reply.to_string());
                            out.push('\n');
                        }
                        if writer.write_all(out.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Self { commands, task }
        }

        pub(crate) fn command_names(&self) -> Vec<String> {
            self.commands
                .lock()
                .unwrap()
                .iter()
                .map(|command| command["execute"].as_str().unwrap().to_owned())
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{greeting, Answer, FakeQmp};
    use super::*;
    use tokio::net::UnixListener;

    fn event(name: &str) -> String {
        json!({"event": name, "data": {"guest": true}, "timestamp": {"seconds": 1, "microseconds": 2}})
            .to_string()
    }

    #[tokio::test]
    async fn negotiates_then_runs_commands_skipping_interleaved_events() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let server = FakeQmp::start(&socket, |command| match command {
            "query-status" => Answer {
                before: vec![event("RESUME")],
                reply: Some(
                    json!({"return": {"status": "running", "singlestep": false, "running": true}}),
                ),
            },
            "system_powerdown" => Answer {
                before: vec![event("POWERDOWN"), event("SHUTDOWN")],
                reply: Some(json!({"return": {}})),
            },
            _ => Answer::ok(),
        });
        let client = QmpClient::new(&socket).with_timeout(Duration::from_secs(2));
        let mut connection = client.connect().await.unwrap();
        let status = connection.query_status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: true,
                status: "running".into()
            }
        );
        connection.execute("system_powerdown", None).await.unwrap();
        let names: Vec<_> = connection
            .events()
            .iter()
            .map(|event| event.name.as_str())
            .collect();
        assert_eq!(names, ["RESUME", "POWERDOWN", "SHUTDOWN"]);
        assert_eq!(connection.events()[0].data, json!({"guest": true}));

        let commands = server.commands.lock().unwrap().clone();
        assert_eq!(
            commands,
            vec![
                json!({"execute": "qmp_capabilities", "id": 1}),
                json!({"execute": "query-status", "id": 2}),
                json!({"execute": "system_powerdown", "id": 3}),
            ]
        );
    }

    #[tokio::test]
    async fn convenience_calls_use_a_connection_each() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let server = FakeQmp::start(&socket, |_| Answer::ok());
        let client = QmpClient::new(&socket).with_timeout(Duration::from_secs(2));
        client.cont().await.unwrap();
        client.system_powerdown().await.unwrap();
        client.quit().await.unwrap();
        assert_eq!(
            server.command_names(),
            [
                "qmp_capabilities",
                "cont",
                "qmp_capabilities",
                "system_powerdown",
                "qmp_capabilities",
                "quit"
            ]
        );
    }

    #[tokio::test]
    async fn error_replies_are_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let _server = FakeQmp::start(&socket, |_| Answer {
            before: vec![event("STOP")],
            reply: Some(
                json!({"error": {"class": "GenericError", "desc": "Expecting a running guest"}}),
            ),
        });
        let error = QmpClient::new(&socket).cont().await.unwrap_err();
        let QmpError::Refused { class, .. } = &error else {
            panic!("unexpected {error:?}");
        };
        assert_eq!(class, "GenericError");
        assert_eq!(
            error.to_string(),
            "QEMU refused cont: Expecting a running guest"
        );
    }

    #[tokio::test]
    async fn reply_with_another_id_is_unexpected() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let _server = FakeQmp::start(&socket, |_| Answer {
            before: Vec::new(),
            reply: Some(json!({"return": {}, "id": 99})),
        });
        let error = QmpClient::new(&socket).cont().await.unwrap_err();
        assert!(
            matches!(error, QmpError::UnexpectedReply { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn silence_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let _server = FakeQmp::start(&socket, |_| Answer {
            before: vec![event("POWERDOWN")],
            reply: None,
        });
        let client = QmpClient::new(&socket).with_timeout(Duration::from_millis(200));
        let error = client.system_powerdown().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "QEMU did not answer system_powerdown within 200ms"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_and_garbage_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            // First client: greeted, then hung up on.
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(format!("{}\n", greeting()).as_bytes())
                .await
                .unwrap();
            drop(stream);
            // Second client: not QMP at all.
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"HTTP/1.1 400 Bad\r\n").await.unwrap();
            // Third: JSON, but no banner.
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"{\"hello\": 1}\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let client = QmpClient::new(&socket).with_timeout(Duration::from_secs(2));
        let closed = client.connect().await.unwrap_err();
        // Depending on timing the hang-up is seen writing or reading.
        assert!(
            matches!(
                closed,
                QmpError::ConnectionClosed { .. } | QmpError::SendCommand { .. }
            ),
            "{closed:?}"
        );
        let garbage = client.connect().await.unwrap_err();
        assert!(
            matches!(garbage, QmpError::DecodeMessage { .. }),
            "{garbage:?}"
        );
        let no_banner = client.connect().await.unwrap_err();
        assert!(
            matches!(no_banner, QmpError::UnexpectedGreeting { .. }),
            "{no_banner:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let error = QmpClient::new("/nonexistent/qmp.sock")
            .connect()
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "Could not connect to the QMP socket /nonexistent/qmp.sock"
        );
    }
}
