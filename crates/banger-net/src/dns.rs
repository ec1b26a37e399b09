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
//! 4. With a [`NamePolicy`] ([`DnsConfig::policy`], the VMs' egress
//!    policies), a forwarded name is first put to it for the query's
//!    source: a refused name gets NXDOMAIN without asking upstream; for a
//!    name whose addresses the source may only reach once resolved, the
//!    policy is told the answer's A records and TTLs before the answer
//!    goes out, so the guest's connection that follows finds them allowed.
//!
//! Limits ([`DnsLimits`]): a guest can flood the server, so what each source
//! address holds is bounded, and so is the total: open TCP connections
//! (over the limit a connection is closed as soon as it is accepted), and
//! queries being answered (over the limit a UDP query is dropped, a TCP
//! query answered REFUSED). A TCP client idle for
//! [`DnsLimits::tcp_idle_timeout`] is disconnected. Every query is answered
//! in its own task, so a slow upstream holds up no one else.
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

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The default DNS domain of VMs.
pub const DEFAULT_DOMAIN: &str = "banger";
/// TTL of answers for VM names: short, since VMs come and go.
pub const RECORD_TTL: u32 = 5;

/// How much one client (a source address) and all clients together may
/// hold of the server, so that one guest's flood leaves the others served
/// and the daemon's descriptors for its own sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsLimits {
    /// Open TCP connections from one address; more are closed at once.
    pub tcp_connections_per_source: usize,
    pub tcp_connections: usize,
    /// Queries being answered (forwards waiting on an upstream, mostly)
    /// for one address; more UDP queries are dropped, more TCP queries
    /// answered REFUSED.
    pub queries_per_source: usize,
    pub queries: usize,
    /// A TCP client idle (or slow to send a query or read an answer) this
    /// long is disconnected.
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            tcp_connections_per_source: 8,
            tcp_connections: 256,
            queries_per_source: 32,
            queries: 512,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

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

/// What a [`NamePolicy`] says about a name a source asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Forward as usual.
    Forward,
    /// Forward, and report the answer's addresses ([`NamePolicy::learned`]).
    Learn,
    /// Answer NXDOMAIN.
    Refuse,
}

/// Decides per source which forwarded names resolve (egress policies).
#[async_trait::async_trait]
pub trait NamePolicy: Send + Sync {
    fn verdict(&self, source: IpAddr, name: &str) -> NameVerdict;

    /// The A records (address, TTL) of an answer to a [`NameVerdict::Learn`]
    /// name; awaited before the answer is sent.
    async fn learned(&self, source: IpAddr, addresses: Vec<(Ipv4Addr, u32)>);
}

/// An optional [`NamePolicy`] (compared by identity).
#[derive(Clone, Default)]
pub struct PolicyHandle(pub Option<Arc<dyn NamePolicy>>);

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.0.is_some() {
            "Some(policy)"
        } else {
            "None"
        })
    }
}

impl PartialEq for PolicyHandle {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(left), Some(right)) => Arc::ptr_eq(left, right),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for PolicyHandle {}

/// How the server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Which forwarded names each source may resolve; all when unset.
    pub policy: PolicyHandle,
    /// Names under this domain are answered locally.
    pub domain: String,
    /// Where other names go (port 53 unless given).
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for each upstream.
    pub upstream_timeout: Duration,
    pub limits: DnsLimits,
}

impl DnsConfig {
    /// The default domain, forwarding to `upstreams`.
    #[must_use]
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            policy: PolicyHandle::default(),
            domain: DEFAULT_DOMAIN.to_owned(),
            upstreams,
            upstream_timeout: Duration::from_secs(2),
            limits: DnsLimits::default(),
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

/// Counts what each source (and everyone together) holds: TCP connections,
/// or queries being answered.
struct Limiter {
    per_source: usize,
    total: usize,
    held: std::sync::Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One unit of a [`Limiter`], returned on drop.
struct Permit {
    limiter: Arc<Limiter>,
    source: IpAddr,
}

impl Limiter {
    fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source,
            total,
            held: std::sync::Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A permit for `source`, or `None` when it or everyone holds the most
    /// allowed.
    fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<Permit> {
        let mut held = self.lock();
        let (total, sources) = &mut *held;
        let mine = sources.entry(source).or_insert(0);
        if *mine >= self.per_source || *total >= self.total {
            if *mine == 0 {
                sources.remove(&source);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Permit {
            limiter: Arc::clone(self),
            source,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut held = self.limiter.lock();
        let (total, sources) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(mine) = sources.get_mut(&self.source) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// Answers one query at a time; shared by the UDP and TCP paths.
struct Responder {
    policy: PolicyHandle,
    domain: String,
    records: DnsRecords,
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
}

/// A response to `request` with its id, opcode, RD flag and question.
fn response_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code)
        .add_queries(request.queries().to_vec());
    response
}

impl Responder {
    /// The answer to the query in `bytes`; `None` for bytes too short to
    /// carry even an id to answer to.
    async fn respond(&self, bytes: &[u8], source: IpAddr) -> Option<Message> {
        let request = match Message::from_vec(bytes) {
            Ok(request) => request,
            Err(_) => {
                let header = bytes.get(..12)?;
                let mut response = Message::new();
                response
                    .set_id(u16::from_be_bytes([header[0], header[1]]))
                    .set_message_type(MessageType::Response)
                    .set_response_code(ResponseCode::FormErr);
                return Some(response);
            }
        };
        if request.message_type() != MessageType::Query
            || request.op_code() != OpCode::Query
            || request.queries().len() != 1
        {
            return Some(response_to(&request, ResponseCode::FormErr));
        }
        let query = &request.queries()[0];
        let answer = local_answer(
            &query.name().to_ascii(),
            query.query_type(),
            &self.domain,
            &self.records,
        );
        Some(match answer {
            LocalAnswer::Address(address) => {
                let mut response = response_to(&request, ResponseCode::NoError);
                response.set_authoritative(true);
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    RECORD_TTL,
                    RData::A(A(address)),
                ));
                response
            }
            LocalAnswer::NoData => {
                let mut response = response_to(&request, ResponseCode::NoError);
                response.set_authoritative(true);
                response
            }
            LocalAnswer::NxDomain => {
                let mut response = response_to(&request, ResponseCode::NXDomain);
                response.set_authoritative(true);
                response
            }
            LocalAnswer::Forward => {
                let verdict = self
                    .policy
                    .0
                    .as_ref()
                    .map_or(NameVerdict::Forward, |policy| {
                        policy.verdict(source, &query.name().to_ascii())
                    });
                if verdict == NameVerdict::Refuse {
                    return Some(response_to(&request, ResponseCode::NXDomain));
                }
                let upstream = self.forward(&request).await;
                if let (NameVerdict::Learn, Some(policy), Some(upstream)) =
                    (verdict, &self.policy.0, &upstream)
                {
                    let addresses: Vec<(Ipv4Addr, u32)> = upstream
                        .answers()
                        .iter()
                        .filter_map(|record| match record.data() {
                            RData::A(A(address)) => Some((*address, record.ttl())),
                            _ => None,
                        })
                        .collect();
                    if !addresses.is_empty() {
                        policy.learned(source, addresses).await;
                    }
                }
                self.relay(&request, upstream)
            }
        })
    }

    /// The response to `request` from the upstream's answer (SERVFAIL
    /// without one).
    fn relay(&self, request: &Message, upstream: Option<Message>) -> Message {
        match upstream {
            Some(mut upstream) => {
                let mut response = response_to(request, upstream.response_code());
                response
                    .set_authoritative(upstream.authoritative())
                    .set_authentic_data(upstream.authentic_data());
                response.add_answers(upstream.take_answers());
                response.add_name_servers(upstream.take_name_servers());
                response.add_additionals(upstream.take_additionals());
                response
            }
            None => response_to(request, ResponseCode::ServFail),
        }
    }

    /// The first upstream answer, or `None`.
    async fn forward(&self, request: &Message) -> Option<Message> {
        let mut message = Message::new();
        message
            .set_id(request.id())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(request.recursion_desired())
            .add_queries(request.queries().to_vec());
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

/// `response` encoded for UDP: cut down to the header and question, with
/// TC set, when it is larger than the client can take.
fn encode_for_udp(mut response: Message, max_payload: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= max_payload {
        return Some(bytes);
    }
    response.take_answers();
    response.take_name_servers();
    response.take_additionals();
    response.set_truncated(true);
    response.to_vec().ok()
}

/// How large a UDP answer the client of `query` takes: 512 bytes, or what
/// its EDNS record says (at most [`MAX_UDP_PAYLOAD`]).
fn udp_payload_limit(query: &[u8]) -> usize {
    Message::from_vec(query)
        .ok()
        .and_then(|message| message.extensions().as_ref().map(|edns| edns.max_payload()))
        .map_or(512, |size| usize::from(size).clamp(512, MAX_UDP_PAYLOAD))
}

/// The largest UDP answer sent.
const MAX_UDP_PAYLOAD: usize = 4096;

/// How long to back off after `accept` fails (out of descriptors, say),
/// so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One UDP socket's queries, each answered in its own task while the
/// source and everyone together are under their limits; queries over the
/// limit are dropped (clients retry).
async fn serve_udp(socket: Arc<UdpSocket>, responder: Arc<Responder>, queries: Arc<Limiter>) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut buffer = vec![0_u8; MAX_UDP_PAYLOAD];
    loop {
        while tasks.try_join_next().is_some() {}
        let (length, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let Some(permit) = queries.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "DNS query dropped: too many in flight");
            continue;
        };
        let query = buffer[..length].to_vec();
        let socket = Arc::clone(&socket);
        let responder = Arc::clone(&responder);
        tasks.spawn(async move {
            let _permit = permit;
            let Some(response) = responder.respond(&query, peer.ip()).await else {
                return;
            };
            if let Some(bytes) = encode_for_udp(response, udp_payload_limit(&query)) {
                let _ = socket.send_to(&bytes, peer).await;
            }
        });
    }
}

/// Accepts TCP clients while the source and everyone together hold fewer
/// connections than allowed; a client over the limit is closed at once.
async fn serve_tcp(
    listener: TcpListener,
    responder: Arc<Responder>,
    connections: Arc<Limiter>,
    queries: Arc<Limiter>,
    idle_timeout: Duration,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "DNS TCP accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(permit) = connections.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "DNS TCP connection refused: too many open");
            drop(stream);
            continue;
        };
        let responder = Arc::clone(&responder);
        let queries = Arc::clone(&queries);
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(error) =
                serve_tcp_client(stream, peer.ip(), &responder, &queries, idle_timeout).await
            {
                tracing::debug!(%peer, %error, "DNS TCP client done");
            }
        });
    }
}

/// Length-prefixed queries from one client, answered in order; the client
/// is dropped when it stays idle (or slow to send a whole query, or to
/// read an answer) for `idle_timeout`.
async fn serve_tcp_client(
    mut stream: TcpStream,
    source: IpAddr,
    responder: &Responder,
    queries: &Arc<Limiter>,
    idle_timeout: Duration,
) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "idle");
    loop {
        let length = tokio::time::timeout(idle_timeout, stream.read_u16())
            .await
            .map_err(|_| timed_out())??;
        let mut query = vec![0_u8; usize::from(length)];
        tokio::time::timeout(idle_timeout, stream.read_exact(&mut query))
            .await
            .map_err(|_| timed_out())??;
        let response = match queries.try_acquire(source) {
            Some(_permit) => responder.respond(&query, source).await,
            None => Message::from_vec(&query)
                .ok()
                .map(|request| response_to(&request, ResponseCode::Refused)),
        };
        let Some(bytes) = response.and_then(|response| response.to_vec().ok()) else {
            return Ok(());
        };
        let length = u16::try_from(bytes.len()).map_err(io::Error::other)?;
        let mut framed = length.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        tokio::time::timeout(idle_timeout, stream.write_all(&framed))
            .await
            .map_err(|_| timed_out())??;
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
/// The domain is not a valid DNS name.
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
    let limits = config.limits;
    let responder = Arc::new(Responder {
        policy: config.policy,
        domain: config.domain,
        records,
        upstreams: config.upstreams,
        upstream_timeout: config.upstream_timeout,
    });
    let queries = Limiter::new(limits.queries_per_source, limits.queries);
    let connections = Limiter::new(limits.tcp_connections_per_source, limits.tcp_connections);
    // Every task either loop spawned lives in the loop's JoinSet: when
    // `shutdown` wins, dropping the loops aborts them all.
    tokio::select! {
        () = serve_udp(Arc::new(udp), Arc::clone(&responder), Arc::clone(&queries)) => Ok(()),
        () = serve_tcp(tcp, responder, connections, queries, limits.tcp_idle_timeout) => Ok(()),
        () = shutdown => Ok(()),
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

    /// What a policy was told: the source and its answer's (address, TTL)s.
    type Learned = (IpAddr, Vec<(Ipv4Addr, u32)>);

    /// Refuses names starting with `blocked`, learns the rest.
    #[derive(Default)]
    struct LearningPolicy {
        learned: std::sync::Mutex<Vec<Learned>>,
    }

    #[async_trait::async_trait]
    impl NamePolicy for LearningPolicy {
        fn verdict(&self, _source: IpAddr, name: &str) -> NameVerdict {
            if name.starts_with("blocked") {
                NameVerdict::Refuse
            } else {
                NameVerdict::Learn
            }
        }

        async fn learned(&self, source: IpAddr, addresses: Vec<(Ipv4Addr, u32)>) {
            self.learned.lock().unwrap().push((source, addresses));
        }
    }

    #[tokio::test]
    async fn a_name_policy_refuses_without_asking_upstream_and_learns_answers() {
        let (upstream, upstream_queries) = fake_upstream().await;
        let policy = Arc::new(LearningPolicy::default());
        let mut config = DnsConfig::new(vec![upstream]);
        config.policy = PolicyHandle(Some(Arc::clone(&policy) as Arc<dyn NamePolicy>));
        let records = DnsRecords::new();
        records.insert("dev", Ipv4Addr::new(172, 30, 0, 5));
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), config, records)
            .await
            .unwrap();
        let address = server.local_address();

        let answer = ask(address, "blocked.example.", RecordType::A).await;
        assert_eq!(answer.response_code(), ResponseCode::NXDomain);
        assert_eq!(
            upstream_queries.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        let answer = ask(address, "allowed.example.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 77)]);
        // Learned before the answer went out.
        assert_eq!(
            *policy.learned.lock().unwrap(),
            [(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                vec![(Ipv4Addr::new(192, 0, 2, 77), 60)]
            )]
        );
        // VM names are the server's own: never put to the policy.
        let answer = ask(address, "dev.banger.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 5)]);
        assert_eq!(policy.learned.lock().unwrap().len(), 1);
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

    /// Asks `server` over TCP from `source`.
    async fn ask_tcp(source: Ipv4Addr, server: SocketAddr, name: &str) -> io::Result<Message> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        let mut stream = socket.connect(server).await?;
        let mut message = Message::new();
        message
            .set_id(7)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = message.to_vec().unwrap();
        stream
            .write_u16(u16::try_from(bytes.len()).unwrap())
            .await?;
        stream.write_all(&bytes).await?;
        let length = tokio::time::timeout(Duration::from_secs(5), stream.read_u16())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no DNS answer over TCP"))??;
        let mut buffer = vec![0_u8; usize::from(length)];
        stream.read_exact(&mut buffer).await?;
        Message::from_vec(&buffer).map_err(io::Error::other)
    }

    /// Whether the server closed `stream` (reading gives end of file).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0_u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(100), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_tcp_flood_from_one_source_leaves_others_served() {
        let records = DnsRecords::new();
        records.insert("box", Ipv4Addr::new(172, 30, 0, 8));
        let config = DnsConfig {
            limits: DnsLimits {
                tcp_connections_per_source: 4,
                tcp_connections: 64,
                tcp_idle_timeout: Duration::from_millis(1500),
                ..DnsLimits::default()
            },
            ..DnsConfig::new(vec![])
        };
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), config, records)
            .await
            .unwrap();
        let address = server.local_address();
        let flooder = Ipv4Addr::new(127, 0, 0, 2);
        let mut flood = Vec::new();
        for _ in 0..200 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind((flooder, 0).into()).unwrap();
            flood.push(socket.connect(address).await.unwrap());
        }
        // Let the server accept (and close) them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut open = 0;
        for stream in &mut flood {
            open += usize::from(!closed(stream).await);
        }
        assert_eq!(open, 4, "connections from one source are not bounded");

        // Another source resolves over TCP and UDP meanwhile.
        let answer = ask_tcp(Ipv4Addr::new(127, 0, 0, 3), address, "box.banger.")
            .await
            .unwrap();
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 8)]);
        let answer = ask(address, "box.banger.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 8)]);
        // The flooder itself is refused a fifth connection's answer...
        assert!(ask_tcp(flooder, address, "box.banger.").await.is_err());
        // ...until its idle connections time out.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        for stream in &mut flood {
            assert!(closed(stream).await, "an idle connection stayed open");
        }
        let answer = ask_tcp(flooder, address, "box.banger.").await.unwrap();
        assert_eq!(addresses(&answer), [Ipv4Addr::new(172, 30, 0, 8)]);
        server.shutdown().await.unwrap();
    }

    #[test]
    fn limiter_counts_per_source_and_in_total() {
        let limiter = Limiter::new(2, 3);
        let a: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let b: IpAddr = Ipv4Addr::new(10, 0, 0, 2).into();
        let first = limiter.try_acquire(a).unwrap();
        let _second = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "per source");
        let _third = limiter.try_acquire(b).unwrap();
        assert!(limiter.try_acquire(b).is_none(), "in total");
        drop(first);
        assert!(limiter.try_acquire(b).is_some());
        assert!(limiter.lock().1.len() <= 2);
    }

    #[tokio::test]
    async fn oversized_udp_answers_are_truncated() {
        let mut response = Message::new();
        response.set_id(1).set_message_type(MessageType::Response);
        for index in 0..100 {
            response.add_answer(Record::from_rdata(
                Name::from_ascii("many.example.").unwrap(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, index))),
            ));
        }
        let bytes = encode_for_udp(response, 512).unwrap();
        assert!(bytes.len() <= 512);
        let message = Message::from_vec(&bytes).unwrap();
        assert!(message.truncated());
        assert!(message.answers().is_empty());
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
