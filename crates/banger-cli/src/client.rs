//! The JSON-RPC client of the control socket (protocol: see `banger_proto`).

use std::path::{Path, PathBuf};

use banger_proto::{method, Request, Response, RpcError, StreamFrame};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("The banger daemon is not running (no socket at {})", socket.display())]
    DaemonNotRunning { socket: PathBuf },
    #[error("Permission denied on the daemon socket {}", socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error("{0}")]
    Rpc(RpcError),
    #[error("Failed to talk to the daemon at {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
            Self::Io { .. } | Self::Protocol(_) => None,
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

    /// Calls `method` and decodes its result.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &mut self,
        method_name: &str,
        params: P,
    ) -> Result<R, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let params = serde_json::to_value(params)
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
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
        let result = response
            .result
            .ok_or_else(|| ClientError::Protocol("response without result".to_owned()))?;
        serde_json::from_value(result).map_err(|error| ClientError::Protocol(error.to_string()))
    }

    /// Turns this connection into the frame stream of `operation_id`.
    pub async fn watch(mut self, operation_id: &str) -> Result<Watch, ClientError> {
        let _: serde_json::Value = self
            .call(
                method::OPERATION_WATCH,
                banger_proto::OperationRef {
                    id: operation_id.to_owned(),
                },
            )
            .await?;
        Ok(Watch { client: self })
    }
}

/// The frames of a watched operation; ends after `Done`.
pub struct Watch {
    client: Client,
}

impl Watch {
    /// The next frame, or `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<StreamFrame>, ClientError> {
        let line = match self.client.lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(None),
            Err(error) => return Err(self.client.io_error(error)),
        };
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|error| ClientError::Protocol(format!("{error}: {line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::{ErrorKind, StageEvent, StageStatus};
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
        });
        (dir, socket)
    }

    #[tokio::test]
    async fn call_decodes_result_and_errors() {
        let error = RpcError::new(ErrorKind::NotFound, "No VM named `x`").with_hint("list them");
        let (_dir, socket) = canned(vec![
            vec![r#"{"jsonrpc":"2.0","result":[1,2],"id":1}"#.to_owned()],
            vec![serde_json::to_string(&Response::failure(2.into(), error)).unwrap()],
        ])
        .await;
        let mut client = Client::connect(&socket).await.unwrap();
        let numbers: Vec<u32> = client.call("x", serde_json::json!({})).await.unwrap();
        assert_eq!(numbers, [1, 2]);
        let error = client
            .call::<_, serde_json::Value>("y", serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(matches!(&error, ClientError::Rpc(rpc) if rpc.kind() == ErrorKind::NotFound));
        assert_eq!(error.to_string(), "No VM named `x`");
        assert_eq!(error.hint().as_deref(), Some("list them"));
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

    #[tokio::test]
    async fn watch_yields_frames_until_the_stream_ends() {
        let stage = StreamFrame::Stage(StageEvent {
            operation_id: "op".into(),
            stage: "boot".into(),
            status: StageStatus::Started,
            elapsed_ms: 0,
            message: None,
        });
        let (_dir, socket) = canned(vec![vec![
            r#"{"jsonrpc":"2.0","result":{"streaming":true},"id":1}"#.to_owned(),
            serde_json::to_string(&stage).unwrap(),
        ]])
        .await;
        let client = Client::connect(&socket).await.unwrap();
        let mut watch = client.watch("op").await.unwrap();
        assert_eq!(watch.next().await.unwrap(), Some(stage));
        assert_eq!(watch.next().await.unwrap(), None);
    }
}
