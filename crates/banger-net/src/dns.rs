//! The DNS server for VM names.
//!
//! It answers `<vm-name>.<domain>` (domain `banger` by default) from a shared
//! map the daemon updates as VMs come and go, and forwards every other name to
//! upstream resolvers (the host's, from `/etc/resolv.conf`, unless
//! configured). Per query:
//!
//! 1. A query that is not exactly one question gets FORMERR (by hickory).
//! 2. A name inside the domain is answered here, authoritatively: `A` for a
//!    known single-label VM name (TTL [`RECORD_TTL`]), an empty NOERROR for
//!    other types of a known name and for the domain apex, NXDOMAIN for
//!    anything else in the domain. It is never forwarded.
//! 3. Any other name is sent over UDP to each upstream in turn (over TCP when
//!    the UDP answer is truncated), waiting at most
//!    [`DnsConfig::upstream_timeout`] for each; the first answer is relayed
//!    with the client's id. No answer from any upstream gives SERVFAIL.
//!
//! The server takes its sockets and its shutdown signal from outside
//! ([`run`]), so tests start it on an ephemeral loopback port;
//! [`DnsServer::bind`] is the convenience the daemon uses.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use hickory_proto::op::{Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The default DNS domain of VMs.
pub const DEFAULT_DOMAIN: &str = "banger";
/// TTL of answers for VM names: short, since VMs come and go.
pub const RECORD_TTL: u32 = 5;
/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// VM name → address, shared between the daemon and the server.
#[derive(Clone, Debug, Default)]
pub struct DnsRecords {
    names: Arc<RwLock<HashMap<String, Ipv4Addr>>>,
}

impl DnsRecords {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `name` (a VM name, without the domain).
    pub fn insert(&self, name: &str, address: Ipv4Addr) {
        self.write().insert(name.to_ascii_lowercase(), address);
    }

    pub fn remove(&self, name: &str) -> Option<Ipv4Addr> {
        self.write().remove(&name.to_ascii_lowercase())
    }

    /// Replaces every record (reconciliation at start).
    pub fn replace_all(&self, records: impl IntoIterator<Item = (String, Ipv4Addr)>) {
        *self.write() = records
            .into_iter()
            .map(|(name, address)| (name.to_ascii_lowercase(), address))
            .collect();
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&name.to_ascii_lowercase())
            .copied()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Ipv4Addr>> {
        self.names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How the server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Names under this domain are answered locally.
    pub domain: String,
    /// Where other names go (port 53 unless given).
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for each upstream.
    pub upstream_timeout: Duration,
}

impl DnsConfig {
    /// The default domain, forwarding to `upstreams`.
    #[must_use]
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_owned(),
            upstreams,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("Failed to read {path}")]
    ReadResolvConf {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Failed to bind the DNS server to {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("Invalid DNS domain `{domain}`")]
    InvalidDomain { domain: String },
    #[error("The DNS server failed")]
    Serve {
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("The DNS server task panicked")]
    Panicked,
}

/// Nameserver addresses from resolv.conf text, in order.
#[must_use]
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                // Drop an IPv6 zone (`fe80::1%eth0`): not representable here.
                .and_then(|address| address.split('%').next())
                .and_then(|address| address.parse().ok())
        })
        .collect()
}

/// Upstreams from a resolv.conf file (port 53), leaving out `exclude` (the
/// server's own address, which would loop).
///
/// # Errors
/// The file cannot be read.
pub fn upstreams_from_resolv_conf(
    path: &Path,
    exclude: &[IpAddr],
) -> Result<Vec<SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ReadResolvConf {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_resolv_conf(&text)
        .into_iter()
        .filter(|address| !exclude.contains(address))
        .map(|address| SocketAddr::new(address, 53))
        .collect())
}

/// What to do with one question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// An `A` record.
    Address(Ipv4Addr),
    /// The name exists here but has no record of this type.
    NoData,
    NxDomain,
    /// Not our domain.
    Forward,
}

/// Decides how to answer `name` (any case, with or without the trailing
/// dot) of type `record_type` for `domain`.
#[must_use]
pub fn local_answer(
    name: &str,
    record_type: RecordType,
    domain: &str,
    records: &DnsRecords,
) -> LocalAnswer {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if name == domain {
        return LocalAnswer::NoData;
    }
    let Some(label) = name
        .strip_suffix(&domain)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return LocalAnswer::Forward;
    };
    match records.get(label) {
        Some(address) if !label.contains('.') => {
            if record_type == RecordType::A {
                LocalAnswer::Address(address)
            } else {
                LocalAnswer::NoData
            }
        }
        _ => LocalAnswer::NxDomain,
    }
}

struct Handler {
    domain: String,
    records: DnsRecords,
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
}

#[async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let info = match request.request_info() {
            Ok(info)
                if request.op_code() == OpCode::Query
                    && request.message_type() == MessageType::Query =>
            {
                info
            }
            _ => {
                let response = builder.error_msg(request.header(), ResponseCode::FormErr);
                return send(&mut response_handle, response).await;
            }
        };
        let query = info.query.original();
        let answer = local_answer(
            &query.name().to_ascii(),
            query.query_type(),
            &self.domain,
            &self.records,
        );
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(true);
        match answer {
            LocalAnswer::Address(address) => {
                header.set_authoritative(true);
                let record =
                    Record::from_rdata(query.name().clone(), RECORD_TTL, RData::A(A(address)));
                let answers = [record];
                let response = builder.build(header, answers.iter(), [], [], []);
                send(&mut response_handle, response).await
            }
            LocalAnswer::NoData | LocalAnswer::NxDomain => {
                header.set_authoritative(true);
                if answer == LocalAnswer::NxDomain {
                    header.set_response_code(ResponseCode::NXDomain);
                }
                send(&mut response_handle, builder.build_no_records(header)).await
            }
            LocalAnswer::Forward => match self.forward(request).await {
                Some(upstream) => {
                    let mut header = *upstream.header();
                    header.set_id(request.id());
                    let response = builder.build(
                        header,
                        upstream.answers(),
                        upstream.name_servers(),
                        [],
                        upstream.additionals(),
                    );
                    send(&mut response_handle, response).await
                }
                None => {
                    let response = builder.error_msg(request.header(), ResponseCode::ServFail);
                    send(&mut response_handle, response).await
                }
            },
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "failed to send DNS response");
            let mut header = Header::new();
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        }
    }
}

impl Handler {
    /// The first upstream answer, or `None`.
    async fn forward(&self, request: &Request) -> Option<Message> {
        let query = request.request_info().ok()?.query.original().clone();
        let mut message = Message::new();
        message
            .set_id(request.id())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(request.recursion_desired())
            .add_query(query);
        let bytes = message.to_vec().ok()?;
        for upstream in &self.upstreams {
            let exchanged =
                tokio::time::timeout(self.upstream_timeout, exchange(*upstream, &bytes)).await;
            match exchanged {
                Ok(Ok(response)) if response.id() == request.id() => return Some(response),
                Ok(Ok(_)) => tracing::debug!(%upstream, "upstream answered with a wrong id"),
                Ok(Err(error)) => tracing::debug!(%upstream, %error, "upstream failed"),
                Err(_) => tracing::debug!(%upstream, "upstream timed out"),
            }
        }
        None
    }
}

/// One query to one upstream: UDP, then TCP if the answer was truncated.
async fn exchange(upstream: SocketAddr, query: &[u8]) -> io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    // connect() makes the kernel drop datagrams from anyone but upstream.
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0_u8; 4096];
    let length = socket.recv(&mut buffer).await?;
    let response = Message::from_vec(&buffer[..length]).map_err(io::Error::other)?;
    if !response.truncated() {
        return Ok(response);
    }
    let mut stream = TcpStream::connect(upstream).await?;
    let length = u16::try_from(query.len()).map_err(io::Error::other)?;
    let mut framed = length.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let length = stream.read_u16().await?;
    let mut buffer = vec![0_u8; usize::from(length)];
    stream.read_exact(&mut buffer).await?;
    Message::from_vec(&buffer).map_err(io::Error::other)
}

/// Serves DNS on `udp` and `tcp` until `shutdown` completes.
///
/// # Errors
/// The domain is not a valid DNS name, or the server fails.
pub async fn run(
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
    records: DnsRecords,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    if Name::from_ascii(&config.domain).is_err() || config.domain.trim_end_matches('.').is_empty() {
        return Err(DnsError::InvalidDomain {
            domain: config.domain,
        });
    }
    let handler = Handler {
        domain: config.domain,
        records,
        upstreams: config.upstreams,
        upstream_timeout: config.upstream_timeout,
    };
    let mut server = ServerFuture::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT);
    tokio::select! {
        result = server.block_until_done() => result.map_err(|source| DnsError::Serve { source }),
        () = shutdown => server.shutdown_gracefully().await.map_err(|source| DnsError::Serve { source }),
    }
}

/// A running DNS server.
pub struct DnsServer {
    local_address: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), DnsError>>,
}

impl DnsServer {
    /// Binds UDP and TCP on `address` (port 0 picks a free port, the same
    /// for both) and serves in a background task.
    ///
    /// # Errors
    /// Either socket cannot be bound.
    pub async fn bind(
        address: SocketAddr,
        config: DnsConfig,
        records: DnsRecords,
    ) -> Result<Self, DnsError> {
        let udp = UdpSocket::bind(address)
            .await
            .map_err(|source| DnsError::Bind { address, source })?;
        let local_address = udp
            .local_addr()
            .map_err(|source| DnsError::Bind { address, source })?;
        let tcp = TcpListener::bind(local_address)
            .await
            .map_err(|source| DnsError::Bind {
                address: local_address,
                source,
            })?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(udp, tcp, config, records, async move {
            // A dropped sender stops the server too.
            let _ = stopped.await;
        }));
        Ok(Self {
            local_address,
            stop,
            task,
        })
    }

    #[must_use]
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// Stops serving and waits for the server to finish.
    ///
    /// # Errors
    /// The server had failed.
    pub async fn shutdown(self) -> Result<(), DnsError> {
        let _ = self.stop.send(());
        self.task.await.map_err(|_| DnsError::Panicked)?
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nnameserver 10.0.0.2\nsearch example.org\nnameserver fe80::1%eth0\n nameserver 1.1.1.1\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap(),
                "1.1.1.1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn local_answer_rules() {
        let records = DnsRecords::new();
        records.insert("Dev", Ipv4Addr::new(172, 30, 0, 5));
        let a = RecordType::A;
        assert_eq!(
            local_answer("dev.banger.", a, "banger", &records),
            LocalAnswer::Address(Ipv4Addr::new(172, 30, 0, 5))
        );
        assert_eq!(
            local_answer("DEV.Banger", a, "banger.", &records),
            LocalAnswer::Address(Ipv4Addr::new(172, 30, 0, 5))
        );
        assert_eq!(
            local_answer("dev.banger.", RecordType::AAAA, "banger", &records),
            LocalAnswer::NoData
        );
        assert_eq!(
            local_answer("banger.", a, "banger", &records),
            LocalAnswer::NoData
        );
        assert_eq!(
            local_answer("other.banger.", a, "banger", &records),
            LocalAnswer::NxDomain
        );
        assert_eq!(
            local_answer("x.dev.banger.", a, "banger", &records),
            LocalAnswer::NxDomain
        );
        assert_eq!(
            local_answer("devbanger.", a, "banger", &records),
            LocalAnswer::Forward
        );
        assert_eq!(
            local_answer("example.com.", a, "banger", &records),
            LocalAnswer::Forward
        );
        records.remove("dev");
        assert_eq!(
            local_answer("dev.banger.", a, "banger", &records),
            LocalAnswer::NxDomain
        );
    }

    /// A fake upstream: answers every A query with 192.0.2.77, counting them.
    async fn fake_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            let mut buffer = vec![0_u8; 4096];
            while let Ok((length, peer)) = socket.recv_from(&mut buffer).await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let mut response = Message::new();
                response
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(OpCode::Query)
                    .set_recursion_available(true)
                    .add_queries(query.queries().to_vec());
                let name = query.queries()[0].name().clone();
                response.add_answer(Record::from_rdata(
                    name,
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 77))),
                ));
                socket
                    .send_to(&response.to_vec().unwrap(), peer)
                    .await
                    .unwrap();
            }
        });
        (address, count)
    }

    async fn ask(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut message = Message::new();
        message
            .set_id(4242)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        socket
            .send_to(&message.to_vec().unwrap(), server)
            .await
            .unwrap();
        let mut buffer = vec![0_u8; 4096];
        let (length, _) =
            tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
                .await
                .expect("no DNS answer")
                .unwrap();
        let response = Message::from_vec(&buffer[..length]).unwrap();
        assert_eq!(response.id(), 4242);
        response
    }

    fn addresses(message: &Message) -> Vec<Ipv4Addr> {
        message
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(A(address)) => Some(*address),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn serves_vm_names_and_forwards_the_rest() {
        let (upstream, upstream_queries) = fake_upstream().await;
        let records = DnsRecords::new();
        records.insert("dev", Ipv4Addr::new(172, 30, 0, 5));
        let server = DnsServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            DnsConfig::new(vec![upstream]),
            records.clone(),
        )
        .await
        .unwrap();
        let address = server.local_address();

        let answer = ask(address, "dev.banger.", RecordType::A).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.authoritative());
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 5)]);

        let answer = ask(address, "nope.banger.", RecordType::A).await;
        assert_eq!(answer.response_code(), ResponseCode::NXDomain);
        assert!(answer.answers().is_empty());

        // The map is live: updates show without restarting the server.
        records.insert("later", Ipv4Addr::new(172, 30, 0, 9));
        let answer = ask(address, "later.banger.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 9)]);
        assert_eq!(
            upstream_queries.load(std::sync::atomic::Ordering::SeqCst),
            0
        );

        let answer = ask(address, "example.com.", RecordType::A).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 77)]);
        assert_eq!(
            upstream_queries.load(std::sync::atomic::Ordering::SeqCst),
            1
        );

        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn answers_over_tcp_too() {
        let records = DnsRecords::new();
        records.replace_all([("box".to_owned(), Ipv4Addr::new(172, 30, 0, 8))]);
        let server = DnsServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            DnsConfig::new(vec![]),
            records,
        )
        .await
        .unwrap();
        let mut message = Message::new();
        message
            .set_id(7)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .add_query(Query::query(
                Name::from_ascii("box.banger.").unwrap(),
                RecordType::A,
            ));
        let bytes = message.to_vec().unwrap();
        let mut stream = TcpStream::connect(server.local_address()).await.unwrap();
        stream
            .write_u16(u16::try_from(bytes.len()).unwrap())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        let length = tokio::time::timeout(Duration::from_secs(5), stream.read_u16())
            .await
            .expect("no DNS answer over TCP")
            .unwrap();
        let mut buffer = vec![0_u8; usize::from(length)];
        stream.read_exact(&mut buffer).await.unwrap();
        let answer = Message::from_vec(&buffer).unwrap();
        assert_eq!(answer.id(), 7);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 8)]);
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_upstreams_give_servfail() {
        // A bound socket nobody reads: the query times out.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = DnsConfig {
            upstream_timeout: Duration::from_millis(200),
            ..DnsConfig::new(vec![silent.local_addr().unwrap()])
        };
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), config, DnsRecords::new())
            .await
            .unwrap();
        let answer = ask(server.local_address(), "example.com.", RecordType::A).await;
        assert_eq!(answer.response_code(), ResponseCode::ServFail);
        server.shutdown().await.unwrap();
    }
}
