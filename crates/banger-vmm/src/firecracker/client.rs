//! A typed client for Firecracker's HTTP API on its Unix socket.
//!
//! Each call:
//!
//! 1. checks that any id going into the URL path is a plain token, and
//!    encodes the body as JSON;
//! 2. opens a new connection to the API socket and performs an HTTP/1.1
//!    handshake (Firecracker serves one request at a time, so a connection
//!    per call costs nothing and leaves no state behind);
//! 3. sends the request and reads the whole response, all within the
//!    client's per-request timeout;
//! 4. maps the status: `2xx` is success (`204` for PUTs), `4xx`/`5xx` carry
//!    the swagger `Error` body whose `fault_message` becomes
//!    [`ClientError::Refused`].

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::models::{
    ActionType, BootSource, Drive, ErrorResponse, InstanceActionInfo, InstanceInfo, Logger,
    MachineConfiguration, Metrics, NetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm,
    VmState, Vsock,
};

/// Firecracker's answers are small; anything bigger is not Firecracker.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Invalid Firecracker resource id {id:?} (use ASCII letters, digits, '_' and '-')")]
    InvalidResourceId { id: String },
    #[error("Could not encode the body of {method} {path}")]
    EncodeBody {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Could not connect to the Firecracker API socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not start an HTTP connection on {}", socket.display())]
    Handshake {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("Could not send {method} {path} to Firecracker")]
    SendRequest {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Could not read Firecracker's response to {method} {path}")]
    ReadResponse {
        method: Method,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Firecracker did not answer {method} {path} within {timeout:?}")]
    TimedOut {
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("Firecracker refused {method} {path}: {fault_message}")]
    Refused {
        method: Method,
        path: String,
        status: StatusCode,
        /// The `fault_message` of the error body, or the raw body when it
        /// had none.
        fault_message: String,
    },
    #[error("Firecracker answered {method} {path} with unexpected status {status}")]
    UnexpectedStatus {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("Could not decode Firecracker's response to {method} {path}")]
    DecodeResponse {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("The Firecracker API socket {} did not accept connections within {timeout:?}", socket.display())]
    SocketNotReady {
        socket: PathBuf,
        timeout: Duration,
        /// The error of the last connection attempt, if the socket existed.
        #[source]
        last_error: Option<io::Error>,
    },
}

/// Client for one Firecracker process's API socket. Cheap to create; holds no
/// connection.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
}

impl FirecrackerClient {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A client with the default per-request timeout.
    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Sets the per-request timeout (connect, send and read together).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `PUT /machine-config`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_machine_config(
        &self,
        config: &MachineConfiguration,
    ) -> Result<(), ClientError> {
        self.put("/machine-config".to_owned(), config).await
    }

    /// `PUT /boot-source`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_boot_source(&self, boot_source: &BootSource) -> Result<(), ClientError> {
        self.put("/boot-source".to_owned(), boot_source).await
    }

    /// `PUT /drives/{drive_id}`, with the id taken from the body.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ClientError> {
        let id = checked_resource_id(&drive.drive_id)?;
        self.put(format!("/drives/{id}"), drive).await
    }

    /// `PUT /logger`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ClientError> {
        self.put("/logger".to_owned(), logger).await
    }

    /// `PUT /metrics`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), ClientError> {
        self.put("/metrics".to_owned(), metrics).await
    }

    /// `PUT /network-interfaces/{iface_id}`, with the id taken from the body.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_network_interface(
        &self,
        interface: &NetworkInterface,
    ) -> Result<(), ClientError> {
        let id = checked_resource_id(&interface.iface_id)?;
        self.put(format!("/network-interfaces/{id}"), interface)
            .await
    }

    /// `PUT /vsock`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), ClientError> {
        self.put("/vsock".to_owned(), vsock).await
    }

    /// `PUT /actions` with the given action.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn create_sync_action(&self, action_type: ActionType) -> Result<(), ClientError> {
        self.put("/actions".to_owned(), &InstanceActionInfo { action_type })
            .await
    }

    /// `PUT /actions` `InstanceStart`: boots the guest.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn instance_start(&self) -> Result<(), ClientError> {
        self.create_sync_action(ActionType::InstanceStart).await
    }

    /// `PUT /actions` `SendCtrlAltDel`: asks the guest to shut down (x86
    /// only; Firecracker exits when the guest resets).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn send_ctrl_alt_del(&self) -> Result<(), ClientError> {
        self.create_sync_action(ActionType::SendCtrlAltDel).await
    }

    /// `PUT /actions` `FlushMetrics`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn flush_metrics(&self) -> Result<(), ClientError> {
        self.create_sync_action(ActionType::FlushMetrics).await
    }

    /// `PATCH /vm`: pauses or resumes the vCPUs (post-boot only).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn patch_vm(&self, state: VmState) -> Result<(), ClientError> {
        self.send(Method::PATCH, "/vm".to_owned(), &Vm { state })
            .await
    }

    /// `PUT /snapshot/create` (only while paused).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ClientError> {
        self.put("/snapshot/create".to_owned(), params).await
    }

    /// `PUT /snapshot/load` (only on a fresh process).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ClientError> {
        self.put("/snapshot/load".to_owned(), params).await
    }

    /// `GET /`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn describe_instance(&self) -> Result<InstanceInfo, ClientError> {
        self.get("/".to_owned()).await
    }

    async fn put<T: Serialize>(&self, path: String, body: &T) -> Result<(), ClientError> {
        self.send(Method::PUT, path, body).await
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: String,
        body: &T,
    ) -> Result<(), ClientError> {
        let body = match serde_json::to_vec(body) {
            Ok(body) => body,
            Err(source) => {
                return Err(ClientError::EncodeBody {
                    method,
                    path,
                    source,
                })
            }
        };
        self.call(method, path, Some(body)).await.map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, path: String) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path.clone(), None).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::DecodeResponse {
            method: Method::GET,
            path,
            source,
        })
    }

    /// Runs one exchange under the timeout and maps the status.
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let exchange = self.exchange(&method, &path, body);
        let (status, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::TimedOut {
                    method,
                    path,
                    timeout: self.timeout,
                })
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        if status.is_client_error() || status.is_server_error() {
            let fault_message = serde_json::from_slice::<ErrorResponse>(&body)
                .ok()
                .and_then(|error| error.fault_message)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Refused {
                method,
                path,
                status,
                fault_message,
            });
        }
        Err(ClientError::UnexpectedStatus {
            method,
            path,
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Handshake {
                socket: self.socket.clone(),
                source,
            })?;
        // The connection future drives the socket; it must run while we send
        // and read, and is dropped (closing the socket) when we are done or
        // time out.
        let _connection = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));

        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("method, a checked path and static headers always form a valid request");

        let response =
            sender
                .send_request(request)
                .await
                .map_err(|source| ClientError::SendRequest {
                    method: method.clone(),
                    path: path.to_owned(),
                    source,
                })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|source| ClientError::ReadResponse {
                method: method.clone(),
                path: path.to_owned(),
                source,
            })?
            .to_bytes();
        Ok((status, body))
    }
}

/// Waits until `socket` accepts connections, for at most `timeout`: each
/// attempt after the first is woken by the socket's creation
/// ([`crate::socket_wait`]), not by a poll interval.
///
/// This only knows about the socket; [`super::Firecracker`] races it against
/// the process exiting so a Firecracker that dies at startup is reported at
/// once, with its console output.
///
/// # Errors
/// [`ClientError::SocketNotReady`] when the timeout passes first.
pub async fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<(), ClientError> {
    let mut last_error = None;
    let listening = crate::socket_wait::until_listening(socket, &mut last_error);
    if tokio::time::timeout(timeout, listening).await.is_ok() {
        return Ok(());
    }
    Err(ClientError::SocketNotReady {
        socket: socket.to_owned(),
        timeout,
        last_error,
    })
}

/// Ids go into the URL path; Firecracker itself only accepts alphanumerics
/// and `_`, so anything outside a plain token is refused before sending.
fn checked_resource_id(id: &str) -> Result<&str, ClientError> {
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if plain {
        Ok(id)
    } else {
        Err(ClientError::InvalidResourceId { id: id.to_owned() })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::models::{InstanceState, LogLevel};
    use crate::firecracker::test_server::{RecordedRequest, TestApiServer};
    use serde_json::json;

    fn client_for(server: &TestApiServer) -> FirecrackerClient {
        FirecrackerClient::new(server.socket()).with_timeout(Duration::from_secs(2))
    }

    #[tokio::test]
    async fn puts_send_exact_paths_and_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestApiServer::start(&dir.path().join("api.sock"));
        let client = client_for(&server);

        client
            .put_logger(&Logger {
                level: Some(LogLevel::Warning),
                log_path: Some("/run/vm/firecracker.log".into()),
                ..Logger::default()
            })
            .await
            .unwrap();
        client
            .put_metrics(&Metrics {
                metrics_path: "/run/vm/firecracker.metrics".into(),
                emit_id: None,
                properties: None,
            })
            .await
            .unwrap();
        client
            .put_machine_config(&MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 1024,
                smt: Some(false),
                track_dirty_pages: None,
                cpu_template: None,
                huge_pages: None,
            })
            .await
            .unwrap();
        client
            .put_boot_source(&BootSource {
                kernel_image_path: "/k/vmlinux".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            })
            .await
            .unwrap();
        client
            .put_drive(&Drive {
                drive_id: "rootfs".into(),
                is_root_device: true,
                is_read_only: Some(false),
                path_on_host: Some("/d/rootfs.ext4".into()),
                ..Drive::default()
            })
            .await
            .unwrap();
        client
            .put_network_interface(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap-banger0".into(),
                guest_mac: Some("06:00:ac:10:00:02".into()),
                ..NetworkInterface::default()
            })
            .await
            .unwrap();
        client
            .put_vsock(&Vsock {
                guest_cid: 3,
                uds_path: "/run/vm/vsock.sock".into(),
                vsock_id: None,
            })
            .await
            .unwrap();
        client.instance_start().await.unwrap();
        client.send_ctrl_alt_del().await.unwrap();
        client.flush_metrics().await.unwrap();

        let put = |path: &str, body: serde_json::Value| RecordedRequest {
            method: "PUT".into(),
            path: path.into(),
            content_type: Some("application/json".into()),
            body: Some(body),
        };
        assert_eq!(
            server.requests(),
            vec![
                put(
                    "/logger",
                    json!({"level": "Warning", "log_path": "/run/vm/firecracker.log"})
                ),
                put(
                    "/metrics",
                    json!({"metrics_path": "/run/vm/firecracker.metrics"})
                ),
                put(
                    "/machine-config",
                    json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false})
                ),
                put(
                    "/boot-source",
                    json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"})
                ),
                put(
                    "/drives/rootfs",
                    json!({
                        "drive_id": "rootfs",
                        "is_root_device": true,
                        "is_read_only": false,
                        "path_on_host": "/d/rootfs.ext4",
                    })
                ),
                put(
                    "/network-interfaces/eth0",
                    json!({
                        "iface_id": "eth0",
                        "host_dev_name": "tap-banger0",
                        "guest_mac": "06:00:ac:10:00:02",
                    })
                ),
                put(
                    "/vsock",
                    json!({"guest_cid": 3, "uds_path": "/run/vm/vsock.sock"})
                ),
                put("/actions", json!({"action_type": "InstanceStart"})),
                put("/actions", json!({"action_type": "SendCtrlAltDel"})),
                put("/actions", json!({"action_type": "FlushMetrics"})),
            ]
        );
    }

    #[tokio::test]
    async fn describe_instance_gets_root() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestApiServer::start(&dir.path().join("api.sock"));
        let info = client_for(&server).describe_instance().await.unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        assert_eq!(info.app_name, "Firecracker");
        assert_eq!(
            server.requests(),
            vec![RecordedRequest {
                method: "GET".into(),
                path: "/".into(),
                content_type: None,
                body: None,
            }]
        );
    }

    #[tokio::test]
    async fn fault_message_becomes_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestApiServer::start_with(&dir.path().join("api.sock"), |request| {
            if request.path == "/drives/rootfs" {
                (
                    StatusCode::BAD_REQUEST,
                    json!({"fault_message": "Unable to open the block device backing file"})
                        .to_string(),
                )
            } else {
                (StatusCode::NO_CONTENT, String::new())
            }
        });
        let error = client_for(&server)
            .put_drive(&Drive {
                drive_id: "rootfs".into(),
                is_root_device: true,
                is_read_only: Some(false),
                path_on_host: Some("/missing".into()),
                ..Drive::default()
            })
            .await
            .unwrap_err();
        match &error {
            ClientError::Refused {
                method,
                path,
                status,
                fault_message,
            } => {
                assert_eq!(method, Method::PUT);
                assert_eq!(path, "/drives/rootfs");
                assert_eq!(*status, StatusCode::BAD_REQUEST);
                assert_eq!(
                    fault_message,
                    "Unable to open the block device backing file"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(
            error.to_string(),
            "Firecracker refused PUT /drives/rootfs: Unable to open the block device backing file"
        );
    }

    #[tokio::test]
    async fn server_error_without_fault_message_keeps_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestApiServer::start_with(&dir.path().join("api.sock"), |_| {
            (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned())
        });
        let error = client_for(&server).instance_start().await.unwrap_err();
        assert_eq!(error.to_string(), "Firecracker refused PUT /actions: boom");
    }

    #[tokio::test]
    async fn unsafe_ids_are_refused_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestApiServer::start(&dir.path().join("api.sock"));
        let error = client_for(&server)
            .put_drive(&Drive {
                drive_id: "../actions".into(),
                ..Drive::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::InvalidResourceId { .. }),
            "{error:?}"
        );
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        // Accepts connections but never answers.
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let _silent = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.push(stream);
            }
        });
        let timeout = Duration::from_millis(200);
        let error = FirecrackerClient::new(&socket)
            .with_timeout(timeout)
            .instance_start()
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::TimedOut { timeout: t, .. } if t == timeout),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "Firecracker did not answer PUT /actions within 200ms"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = FirecrackerClient::new(dir.path().join("absent.sock"))
            .instance_start()
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn wait_for_socket_returns_once_the_socket_listens() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let later = socket.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            TestApiServer::start(&later)
        });
        wait_for_socket(&socket, Duration::from_secs(2))
            .await
            .unwrap();
        let _server = server.await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_socket_gives_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let error = wait_for_socket(&socket, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::SocketNotReady { .. }),
            "{error:?}"
        );
    }
}
