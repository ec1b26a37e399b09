//! A loopback HTTP/1.1 server for tests, with configurable misbehaviour.
//!
//! It binds `127.0.0.1:0`, serves each connection on its own thread with
//! `Connection: close`, and counts the body bytes it writes so resume tests
//! can check that only the rest was sent. It only ever listens on loopback.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a route answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// The whole body with a correct `Content-Length`.
    Correct,
    /// `Content-Length` of the whole body, then only `after` bytes, then close.
    Truncate { after: usize },
    /// Chunked encoding, `after` bytes, then close without the last chunk.
    DropMidStream { after: usize },
    /// `after` bytes, then nothing for `pause`, then close.
    Stall { after: usize, pause: Duration },
    /// Only this status, empty body.
    Status(u16),
}

#[derive(Clone)]
struct Route {
    body: Arc<Vec<u8>>,
    behaviour: Behaviour,
}

#[derive(Default)]
struct Shared {
    routes: Mutex<HashMap<String, Route>>,
    ranges: AtomicBool,
    body_bytes: AtomicU64,
    requests: Mutex<Vec<(String, Option<u64>)>>,
    stop: AtomicBool,
}

pub struct TestServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        shared.ranges.store(true, Ordering::SeqCst);
        let accept_shared = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let connection_shared = Arc::clone(&accept_shared);
                std::thread::spawn(move || serve(stream, &connection_shared));
            }
        });
        Self {
            address,
            shared,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> url::Url {
        url::Url::parse(&format!("http://{}{path}", self.address)).unwrap()
    }

    pub fn route(&self, path: &str, body: impl Into<Vec<u8>>, behaviour: Behaviour) {
        self.shared.routes.lock().unwrap().insert(
            path.to_owned(),
            Route {
                body: Arc::new(body.into()),
                behaviour,
            },
        );
    }

    pub fn set_behaviour(&self, path: &str, behaviour: Behaviour) {
        self.shared
            .routes
            .lock()
            .unwrap()
            .get_mut(path)
            .unwrap()
            .behaviour = behaviour;
    }

    pub fn set_ranges(&self, supported: bool) {
        self.shared.ranges.store(supported, Ordering::SeqCst);
    }

    /// Body bytes written so far, over all requests.
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }

    /// `(path, range start)` of every request so far.
    pub fn requests(&self) -> Vec<(String, Option<u64>)> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Stops listening; the port refuses connections afterwards.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the loop sees the flag.
        let _ = TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) if head.len() < 16 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let range_start = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("range"))
        .and_then(|(_, value)| value.trim().strip_prefix("bytes="))
        .and_then(|value| value.trim_end_matches('-').parse::<u64>().ok());
    shared
        .requests
        .lock()
        .unwrap()
        .push((path.clone(), range_start));
    let route = shared.routes.lock().unwrap().get(&path).cloned();
    let Some(route) = route else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    if let Behaviour::Status(code) = route.behaviour {
        let _ = write!(
            stream,
            "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let full = route.body.as_slice();
    let length = full.len() as u64;
    let (status, extra, body) = match range_start {
        Some(start) if shared.ranges.load(Ordering::SeqCst) => {
            if start >= length {
                let _ = write!(
                    stream,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{length}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
            (
                "206 Partial Content",
                format!("Content-Range: bytes {start}-{}/{length}\r\n", length - 1),
                &full[usize::try_from(start).unwrap()..],
            )
        }
        _ => ("200 OK", String::new(), full),
    };
    let send = |stream: &mut TcpStream, bytes: &[u8]| {
        if stream.write_all(bytes).is_ok() {
            shared
                .body_bytes
                .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        }
    };
    match route.behaviour {
        Behaviour::Correct | Behaviour::Status(_) => {
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            send(&mut stream, body);
        }
        Behaviour::Truncate { after } => {
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            send(&mut stream, &body[..after.min(body.len())]);
        }
        Behaviour::DropMidStream { after } => {
            let _ = write!(stream, "HTTP/1.1 {status}\r\n{extra}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
            let part = &body[..after.min(body.len())];
            let _ = write!(stream, "{:x}\r\n", part.len());
            send(&mut stream, part);
            let _ = stream.write_all(b"\r\n");
        }
        Behaviour::Stall { after, pause } => {
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            send(&mut stream, &body[..after.min(body.len())]);
            let _ = stream.flush();
            std::thread::sleep(pause);
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
