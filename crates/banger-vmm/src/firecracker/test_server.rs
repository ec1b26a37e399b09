//! An in-test stand-in for Firecracker's API: a hyper server on a Unix socket
//! that records every request and answers through a closure.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Option<serde_json::Value>,
}

type Responder = dyn Fn(&RecordedRequest) -> (StatusCode, String) + Send + Sync;

pub(crate) struct TestApiServer {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a healthy Firecracker answers: 204 to every PUT, instance info to
/// `GET /`.
pub(crate) fn default_response(request: &RecordedRequest) -> (StatusCode, String) {
    if request.method == "GET" && request.path == "/" {
        let info = json!({
            "app_name": "Firecracker",
            "id": "test-vm",
            "state": "Not started",
            "vmm_version": "1.17.0",
        });
        (StatusCode::OK, info.to_string())
    } else {
        (StatusCode::NO_CONTENT, String::new())
    }
}

impl TestApiServer {
    pub(crate) fn start(socket: &Path) -> Self {
        Self::start_with(socket, default_response)
    }

    pub(crate) fn start_with(
        socket: &Path,
        responder: impl Fn(&RecordedRequest) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> Self {
        let listener = UnixListener::bind(socket).expect("bind the test API socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let responder: Arc<Responder> = Arc::new(responder);
        let recorded = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = Arc::clone(&recorded);
                let responder = Arc::clone(&responder);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let recorded = Arc::clone(&recorded);
                        let responder = Arc::clone(&responder);
                        async move {
                            let request = record(request).await;
                            let (status, body) = responder(&request);
                            recorded.lock().unwrap().push(request);
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            socket: socket.to_owned(),
            requests,
            task,
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(request: Request<Incoming>) -> RecordedRequest {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .map(|value| value.to_str().unwrap().to_owned());
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&bytes).expect("request bodies are JSON"))
    };
    RecordedRequest {
        method,
        path,
        content_type,
        body,
    }
}
