//! The JSON-RPC client of the control socket, public so integration tests
//! can make raw calls.
//!
//! The protocol (see `banger_proto` for the wire types):
//!
//! 1. [`Client::connect`] opens the Unix socket; a missing socket or a refused
//!    connection means the daemon is not running, `EACCES` means the caller
//!    is neither root nor in the daemon's access group.
//! 2. [`Client::call`] takes a method type of `banger_proto::method`, writes
//!    one JSON-RPC request line with its params and reads one response line,
//!    decoded as its result; calls on one connection are answered in order.
//! 3. [`Client::watch`] calls `operation.watch` and turns the connection into
//!    a [`Watch`]: newline-delimited [`StreamFrame`]s (history first, then
//!    live) up to and including the terminal [`StreamFrame::Done`].
//! 4. [`Client::agent`] calls `vm.agent` and speaks the guest agent protocol
//!    on the same connection, relayed by the daemon.
//! 5. [`Client::call_streaming`] calls a method that streams after its answer
//!    (`vm.workspace.*`) and hands back the connection's two halves.

use std::path::{Path, PathBuf};

use banger_proto::method::{self, Method};
use banger_proto::{Request, Response, RpcError, StreamFrame};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("The banger daemon is not running (no socket at {})", socket.display())]
    DaemonNotRunning { socket: PathBuf },
    #[error("Permission denied on the daemon socket {}", socket.display())]
    PermissionDenied { socket: PathBuf },
    /// The daemon refused or failed the call; its message is kept verbatim.
    #[error("{0}")]
    Rpc(RpcError),
    #[error("Failed to talk to the daemon at {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon's answer did not follow the protocol.
    #[error("Unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::DaemonNotRunning { .. } => Some(
                "start it with `sudo bangerd` or `sudo systemctl start bangerd`".to_owned(),
            ),
            Self::PermissionDenied { .. } => Some(
                "run as root or join the daemon's access group (default `banger`): `sudo usermod -aG banger $USER`, then log in again".to_owned(),
            ),
            Self::Rpc(error) => error.hint().map(str::to_owned),
            Self::Io { .. } => Some(
                "the daemon may have stopped or restarted: `sudo systemctl status bangerd`, then run the command again".to_owned(),
            ),
            Self::Protocol(_) => Some(
                "the daemon and this CLI may be different versions: compare `banger --version` with `banger daemon status`, and restart bangerd after an upgrade".to_owned(),
            ),
        }
    }
}

/// One connection to the daemon.
pub struct Client {
    socket: PathBuf,
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    /// Connects to the daemon's control socket.
    pub async fn connect(socket: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::DaemonNotRunning {
                        socket: socket.to_owned(),
                    }
                }
                std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                    socket: socket.to_owned(),
                },
                _ => ClientError::Io {
                    socket: socket.to_owned(),
                    source: error,
                },
            })?;
        let (read, write) = stream.into_split();
        Ok(Self {
            socket: socket.to_owned(),
            lines: BufReader::new(read).lines(),
            write,
            next_id: 1,
        })
    }

    fn io_error(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Calls method `M` and decodes its result.
    pub async fn call<M: Method>(&mut self, params: M::Params) -> Result<M::Result, ClientError> {
        let params = serde_json::to_value(params)
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        let result = self.request(M::NAME, params).await?;
        serde_json::from_value(result).map_err(|error| {
            ClientError::Protocol(format!(
                "{} returned an unexpected result: {error}",
                M::NAME
            ))
        })
    }

    /// Sends one request and returns its result.
    async fn request(
        &mut self,
        method_name: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request::new(id, method_name, params))
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        line.push(b'\n');
        if let Err(error) = self.write.write_all(&line).await {
            return Err(self.io_error(error));
        }
        let answer = match self.lines.next_line().await {
            Ok(Some(answer)) => answer,
            Ok(None) => {
                return Err(ClientError::Protocol(
                    "the daemon closed the connection".to_owned(),
                ))
            }
            Err(error) => return Err(self.io_error(error)),
        };
        let response: Response = serde_json::from_str(&answer)
            .map_err(|error| ClientError::Protocol(format!("{error}: {answer}")))?;
        if let Some(error) = response.error {
            return Err(ClientError::Rpc(error));
        }
        // `Response::result` cannot tell `"result": null` from a missing
        // field; both mean a null result, valid for methods returning nothing.
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    }

    /// Turns this connection into the frame stream of `operation_id`.
    pub async fn watch(mut self, operation_id: &str) -> Result<Watch, ClientError> {
        self.call::<method::OperationWatch>(banger_proto::OperationRef {
            id: operation_id.to_owned(),
        })
        .await?;
        Ok(Watch {
            client: self,
            done: false,
        })
    }
}

impl Client {
    /// Calls a method after whose answer the connection carries a stream of
    /// its own (`vm.workspace.*`); returns the result and the connection,
    /// the reader keeping what it buffered past the answer.
    pub async fn call_streaming<M: Method>(
        mut self,
        params: M::Params,
    ) -> Result<(M::Result, BufReader<OwnedReadHalf>, OwnedWriteHalf), ClientError> {
        let result = self.call::<M>(params).await?;
        Ok((result, self.lines.into_inner(), self.write))
    }

    /// Turns this connection into a relay to VM `vm`'s guest agent and
    /// speaks the agent protocol over it (see `vm.agent`).
    pub async fn agent(
        mut self,
        vm: &str,
    ) -> Result<banger_agent_proto::client::AgentClient, ClientError> {
        self.call::<method::VmAgent>(banger_proto::VmRef { vm: vm.to_owned() })
            .await?;
        let socket = self.socket.clone();
        // Nothing follows the answer until the hello, but keep the buffer anyway.
        let stream = tokio::io::join(self.lines.into_inner(), self.write);
        banger_agent_proto::client::AgentClient::connect(stream)
            .await
            .map_err(|error| ClientError::Io {
                socket,
                source: std::io::Error::other(error.to_string()),
            })
    }
}

/// The frames of a watched operation; ends after `Done`.
pub struct Watch {
    client: Client,
    done: bool,
}

impl Watch {
    /// The next frame; `None` after the `Done` frame or when the daemon
    /// closed the stream. Cancel-safe, so it can sit in `tokio::select!`.
    pub async fn next(&mut self) -> Result<Option<StreamFrame>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let line = match self.client.lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(None),
            Err(error) => return Err(self.client.io_error(error)),
        };
        let frame: StreamFrame = serde_json::from_str(&line)
            .map_err(|error| ClientError::Protocol(format!("{error}: {line}")))?;
        self.done = matches!(frame, StreamFrame::Done { .. });
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::method::{NoParams, OperationStatus, VmList};
    use banger_proto::{
        ErrorKind, Operation, OperationRef, OperationState, StageEvent, StageStatus,
    };
    use tokio::net::UnixListener;

    /// A daemon stand-in answering each request line with the next canned line(s).
    async fn canned(answers: Vec<Vec<String>>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            for answer in answers {
                let _request = lines.next_line().await.unwrap().unwrap();
                for line in answer {
                    write.write_all(line.as_bytes()).await.unwrap();
                    write.write_all(b"\n").await.unwrap();
                }
            }
            // Closing here lets tests see end-of-stream.
        });
        (dir, socket)
    }

    #[tokio::test]
    async fn call_decodes_result_and_errors() {
        let error = RpcError::new(ErrorKind::NotFound, "No VM named `x`").with_hint("list them");
        let (_dir, socket) = canned(vec![
            vec![r#"{"jsonrpc":"2.0","result":[],"id":1}"#.to_owned()],
            vec![serde_json::to_string(&Response::failure(2.into(), error)).unwrap()],
        ])
        .await;
        let mut client = Client::connect(&socket).await.unwrap();
        let vms = client.call::<VmList>(NoParams).await.unwrap();
        assert_eq!(vms, []);
        let error = client.call::<VmList>(NoParams).await.unwrap_err();
        assert!(matches!(&error, ClientError::Rpc(rpc) if rpc.kind() == ErrorKind::NotFound));
        assert_eq!(error.to_string(), "No VM named `x`");
        assert_eq!(error.hint().as_deref(), Some("list them"));
    }

    #[tokio::test]
    async fn requests_carry_the_method_name_and_its_params() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (sent, received) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let _ = sent.send(lines.next_line().await.unwrap().unwrap());
            write
                .write_all(b"{\"jsonrpc\":\"2.0\",\"result\":[],\"id\":1}\n")
                .await
                .unwrap();
        });
        let mut client = Client::connect(&socket).await.unwrap();
        client.call::<VmList>(NoParams).await.unwrap();
        assert_eq!(
            received.await.unwrap(),
            r#"{"jsonrpc":"2.0","method":"vm.list","params":{},"id":1}"#
        );
    }

    #[tokio::test]
    async fn missing_socket_means_daemon_not_running() {
        let error = Client::connect(Path::new("/nonexistent/bangerd.sock"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "The banger daemon is not running (no socket at /nonexistent/bangerd.sock)"
        );
        assert!(error.hint().unwrap().contains("sudo bangerd"));
    }

    fn done_frame() -> StreamFrame {
        StreamFrame::Done {
            operation: Operation {
                id: "op".into(),
                kind: "vm.create".into(),
                vm_id: "3f2a".into(),
                vm_name: "dev-1".into(),
                subject: "vm dev-1".into(),
                state: OperationState::Succeeded,
                stages: Vec::new(),
                error: None,
                created_at: "2026-01-01T00:00:00Z".into(),
                finished_at: Some("2026-01-01T00:00:01Z".into()),
            },
            vm: None,
        }
    }

    #[tokio::test]
    async fn watch_yields_frames_then_ends_after_done() {
        let stage = StreamFrame::Stage(StageEvent {
            operation_id: "op".into(),
            stage: "boot".into(),
            status: StageStatus::Started,
            elapsed_ms: 0,
            elapsed_us: None,
            message: None,
            bytes: None,
            total: None,
        });
        // The stand-in keeps the connection open and even sends a stray line
        // after `Done`: the watch must stop at `Done` regardless.
        let (_dir, socket) = canned(vec![vec![
            r#"{"jsonrpc":"2.0","result":{"streaming":true},"id":1}"#.to_owned(),
            serde_json::to_string(&stage).unwrap(),
            serde_json::to_string(&done_frame()).unwrap(),
            serde_json::to_string(&stage).unwrap(),
        ]])
        .await;
        let client = Client::connect(&socket).await.unwrap();
        let mut watch = client.watch("op").await.unwrap();
        assert_eq!(watch.next().await.unwrap(), Some(stage));
        assert_eq!(watch.next().await.unwrap(), Some(done_frame()));
        assert_eq!(watch.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn watch_ends_when_the_daemon_closes() {
        let (_dir, socket) = canned(vec![vec![
            r#"{"jsonrpc":"2.0","result":{"streaming":true},"id":1}"#.to_owned(),
        ]])
        .await;
        let mut watch = Client::connect(&socket)
            .await
            .unwrap()
            .watch("op")
            .await
            .unwrap();
        assert_eq!(watch.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn watch_of_unknown_operation_is_an_rpc_error() {
        let error = RpcError::new(ErrorKind::NotFound, "No operation `op`");
        let (_dir, socket) = canned(vec![vec![serde_json::to_string(&Response::failure(
            1.into(),
            error,
        ))
        .unwrap()]])
        .await;
        let error = Client::connect(&socket)
            .await
            .unwrap()
            .watch("op")
            .await
            .err()
            .unwrap();
        assert!(matches!(&error, ClientError::Rpc(rpc) if rpc.kind() == ErrorKind::NotFound));
    }

    #[tokio::test]
    async fn garbage_answer_is_a_protocol_error() {
        let (_dir, socket) = canned(vec![vec!["not json".to_owned()]]).await;
        let error = Client::connect(&socket)
            .await
            .unwrap()
            .call::<VmList>(NoParams)
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Protocol(_)), "{error}");
    }

    #[tokio::test]
    async fn a_result_of_the_wrong_shape_is_a_protocol_error() {
        let (_dir, socket) = canned(vec![vec![
            r#"{"jsonrpc":"2.0","result":[1,2],"id":1}"#.to_owned()
        ]])
        .await;
        let error = Client::connect(&socket)
            .await
            .unwrap()
            .call::<OperationStatus>(OperationRef { id: "op".into() })
            .await
            .unwrap_err();
        assert!(
            error.to_string().starts_with(
                "Unexpected answer from the daemon: operation.status returned an unexpected result"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn refused_connection_means_daemon_not_running() {
        // A socket file nobody listens on: connect gets ECONNREFUSED.
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let error = Client::connect(&socket).await.err().unwrap();
        assert!(
            matches!(error, ClientError::DaemonNotRunning { .. }),
            "{error}"
        );
    }
}
