//! Step 2 of the flow: accept redirected connections, recover where they were going and who made
//! them, and serve them over HTTP/1.1 or HTTP/2 — every MCP message goes through `mcp`
//! (understand) and `policy` (decide) and is audited before anything is forwarded to the original
//! destination.
//!
//! Connections to `https://` servers are TLS-terminated ([`tls`]): the ClientHello's SNI must be
//! a name configured for the destination, the client gets a leaf minted for it, and the request
//! goes on over a verified TLS connection of our own ([`upstream`]). A request whose Host names
//! another server than the SNI gets 421. `tls: passthrough` servers are forwarded untouched and
//! audited per connection.
//!
//! What is MCP: a POST to a configured endpoint path (query ignored, path normalised), or to the
//! POST endpoint an HTTP+SSE stream announced, must parse as JSON-RPC or it is refused; any other
//! request whose body is JSON-RPC is MCP too. Every request body is buffered (up to `max_body`),
//! decoded if compressed ([`encoding`]: forwarded decoded) and inspected before anything is
//! forwarded; requests without a body (GET streams, DELETE, OAuth metadata, health checks) are
//! audited as `non_mcp`. Upgrade and CONNECT are refused: they would open tunnels past the parser.
//!
//! On the way back ([`respond`]) every server message is read: JSON bodies whole, SSE streams
//! event by event. Sessions ([`session`]) tie together what arrives on different connections.

mod encoding;
mod respond;
mod session;
mod tls;
mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};

use arc_swap::ArcSwap;

use crate::{
    audit::{AuditLog, Event, PolicyRef, Record, Verdict, WorkerAudit},
    mcp::{self, Kind, Message, Parsed},
    policy::{
        bindings::{CallerFacts, Choice, PodFacts, Routing},
        Call, CallerScope, Decision, Engine, Outcome,
    },
    redirect::{resolve::Routes, Redirected},
};
use respond::{Batch, BatchElement, Exchange};
pub use session::ParamTable;
pub use session::Sessions;
use session::{Pending, Session, SessionKey};
use tls::Protocols;
pub use tls::{Leaves, Offer};
use upstream::{strip_hop_by_hop, Body, TlsKey, Upstream};
pub use upstream::{upstream_roots, TlsClient};

/// How long a client may take to send its ClientHello and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where accepted connections learn their original destination and caller. Implemented by
/// `redirect::Redirector` (the eBPF map); a connection without a record is refused.
pub trait OrigDst: Send + Sync + 'static {
    fn take(&self, peer: SocketAddr) -> Option<Redirected>;
}

impl OrigDst for crate::redirect::Redirector {
    fn take(&self, peer: SocketAddr) -> Option<Redirected> {
        crate::redirect::Redirector::take(self, peer)
    }
}

/// One configured MCP server as the interceptor needs it.
pub struct Server {
    pub name: String,
    /// Normalised endpoint path.
    pub path: String,
    /// `https://` servers.
    pub tls: Option<ServerTls>,
    /// `host:port` as configured, lower case: an origin an HTTP+SSE endpoint may name.
    pub origin: String,
    /// `Mcp-Param-*` designations learnt from this server's listings.
    pub params: Arc<ParamTable>,
}

/// How an `https://` server is reached.
pub struct ServerTls {
    /// The configured host, lower case: the SNI its clients send.
    pub host: String,
    /// Forward untouched instead of terminating.
    pub passthrough: bool,
    /// Verifies the server (system roots plus its `upstream_ca`).
    pub client: Arc<TlsClient>,
}

/// TLS termination: the minted leaves and what each server speaks.
pub struct Terminator {
    pub leaves: Leaves,
    protocols: Arc<Protocols>,
}

impl Terminator {
    pub fn new(leaves: Leaves) -> Terminator {
        Terminator {
            leaves,
            protocols: Arc::default(),
        }
    }

    /// Learn what each configured https origin at its resolved addresses speaks, and mint its
    /// leaf, before clients ask: their first handshakes then wait for neither.
    /// Returns how many origins were warmed.
    pub async fn prewarm(&self, servers: &[Server], routes: &Routes) -> usize {
        let mut origins = 0;
        for (dst, indices) in routes.table() {
            for s in indices.iter().filter_map(|&i| servers.get(i)) {
                let Some(tls) = s.tls.as_ref().filter(|t| !t.passthrough) else {
                    continue;
                };
                // Clients of a server configured by address send no SNI.
                let (sni, name) = match tls.host.parse::<std::net::IpAddr>() {
                    Ok(_) => (None, crate::ca::LeafName::Ip(dst.ip())),
                    Err(_) => (
                        Some(tls.host.as_str()),
                        crate::ca::LeafName::Dns(tls.host.clone()),
                    ),
                };
                tokio::join!(
                    self.protocols.learn(dst, sni, &tls.client),
                    self.leaves.warm(&name)
                );
                origins += 1;
            }
        }
        origins
    }
}

/// Everything shared by all connections.
pub struct Interceptor {
    pub servers: Vec<Server>,
    pub routes: Arc<Routes>,
    pub orig_dst: Arc<dyn OrigDst>,
    pub audit: Arc<AuditLog>,
    pub max_body: usize,
    /// Present when some server is `https://` and terminated.
    pub terminator: Option<Arc<Terminator>>,
    /// MCP sessions, shared by every worker.
    pub sessions: Arc<Sessions>,
    /// Which policy applies to which caller; swapped whole on reload.
    pub routing: Arc<ArcSwap<Routing>>,
    /// Pod metadata of callers, for bindings that select on it.
    pub pods: Arc<crate::identity::Pods>,
}

/// The policy chosen for one request.
struct Chosen {
    engine: Arc<Engine>,
    /// `/bindings/N` when a binding chose it.
    binding: Option<String>,
    /// Set when the caller's identity could not be resolved in time: every call is refused
    /// with this decision, and listings are emptied (`engine` then hides everything).
    unresolved: Option<Decision>,
}

/// Per accepted connection.
struct Conn {
    /// Unique within this agent's run: the `session` limit key of revisions without sessions.
    id: u64,
    shared: Arc<Interceptor>,
    redirected: Redirected,
    /// Indices into `shared.servers` configured at the original destination (for TLS: those
    /// whose name the SNI is).
    servers: Vec<usize>,
    /// The upstream pool of the worker serving this connection.
    upstream: Arc<Upstream>,
    /// The audit writer of that worker.
    audit: Arc<WorkerAudit>,
    /// Set on TLS-terminated connections.
    tls: Option<TlsSession>,
}

/// A terminated TLS connection.
struct TlsSession {
    sni: Option<String>,
    h2: bool,
    /// The server whose trust roots verify the upstream.
    server: usize,
    client: Arc<TlsClient>,
}

/// A connection the accept loop has checked, on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    redirected: Redirected,
    servers: Vec<usize>,
}

/// The worker threads, each running a single-threaded runtime that serves its share of the
/// connections: a connection and its upstream exchanges stay on one thread, so a call costs no
/// cross-thread wake-up and touches no state shared with other cores. Dropping this stops the
/// workers: each drops its runtime, and with it every connection it serves.
struct Workers {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    /// Close every queue and wait for the workers: each then drops its connections and writes
    /// its deferred audit records before the process can exit. Dropping runtimes does not block
    /// on I/O, so this is quick.
    fn drop(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an interceptor worker panicked");
            }
        }
    }
}

impl Workers {
    fn start(shared: &Arc<Interceptor>, n: usize) -> std::io::Result<Workers> {
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("mcpwarden-w{i}"))
                    .spawn(move || runtime.block_on(worker(shared, rx)))?,
            );
            queues.push(tx);
        }
        Ok(Workers {
            queues,
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// Hand a connection to the next worker (round robin).
    fn dispatch(&self, accepted: Accepted) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len().max(1);
        if let Some(queue) = self.queues.get(i) {
            if queue.send(accepted).is_err() {
                tracing::error!(
                    worker = i,
                    "interceptor worker has stopped: connection dropped"
                );
            }
        }
    }
}

/// Numbers accepted connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// One worker: serve every connection it is handed until its queue closes.
async fn worker(
    shared: Arc<Interceptor>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
) {
    let upstream = Arc::new(Upstream::new());
    let audit = WorkerAudit::new(shared.audit.clone());
    while let Some(a) = queue.recv().await {
        let conn = Conn {
            id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            shared: shared.clone(),
            redirected: a.redirected,
            servers: a.servers,
            upstream: upstream.clone(),
            audit: audit.clone(),
            tls: None,
        };
        tokio::spawn(serve_connection(conn, a.stream, a.peer));
    }
}

/// Every branch's future is boxed: the task is allocated at the size of its largest possible
/// state, and a TLS handshake or an HTTP/2 connection is several KiB that a plaintext
/// connection (or an idle SSE stream on one) should not carry.
async fn serve_connection(conn: Conn, stream: std::net::TcpStream, peer: SocketAddr) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%peer, error = %e, "registering an accepted connection failed");
            return;
        }
    };
    let (plain, tls) = conn.schemes();
    if !tls {
        return Box::pin(serve_http(Arc::new(conn), stream, false, peer)).await;
    }
    if plain {
        // Names of both kinds share this address: the first byte tells TLS (a handshake
        // record, 0x16) from HTTP.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                return Box::pin(serve_http(Arc::new(conn), stream, false, peer)).await
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    match Box::pin(conn.terminate_or_pass(stream)).await {
        Next::Serve(conn, tls, h2) => Box::pin(serve_http(Arc::new(conn), tls, h2, peer)).await,
        Next::Pass(conn, stream, sni) => Box::pin(conn.pass_through(stream, sni)).await,
        Next::Done => {}
    }
}

/// What follows a ClientHello.
enum Next {
    /// Terminated: serve HTTP (h2 if true) on the TLS stream.
    Serve(Conn, Box<tokio_rustls::server::TlsStream<TcpStream>>, bool),
    /// `tls: passthrough`, for this SNI.
    Pass(Conn, TcpStream, Option<String>),
    /// Refused (and audited), or the client went away.
    Done,
}

/// A ClientHello, consumed from the socket or only peeked at (its bytes still in the socket,
/// `len` of them, so the connection can be passed through untouched).
enum Hello {
    Read(tokio_rustls::StartHandshake<TcpStream>),
    Peeked(rustls::server::Accepted, usize, TcpStream),
}

/// `fut`, or Err after [`HANDSHAKE_TIMEOUT`].
async fn in_time<T>(fut: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| format!("the TLS handshake did not complete within {HANDSHAKE_TIMEOUT:?}"))
}

/// Serve HTTP/1.1 (or h2, when ALPN chose it) on a client connection until it closes.
async fn serve_http<IO>(conn: Arc<Conn>, io: IO, h2: bool, peer: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let audit_conn = conn.clone();
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let result = if h2 {
        Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        )
        .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(io), service)
            .await
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() {
            // Bytes hyper could not read as HTTP (an h2c preface on HTTP/1.1, a malformed
            // head): nothing reached the service, nothing was forwarded; the caller is audited.
            let reason = if e.is_parse_version_h2() {
                "plaintext HTTP/2 (h2c prior knowledge) is refused: it would not be inspected"
                    .to_owned()
            } else {
                format!("malformed HTTP request: {e}")
            };
            let mut rec = caller_record(Event::Refused, &audit_conn.redirected);
            rec.decision = Some(Verdict::Deny);
            rec.reason = Some(reason);
            audit_conn.write_audit(&rec);
        }
        tracing::debug!(%peer, error = %e, "client connection ended");
    }
}

impl Interceptor {
    /// Start `workers` worker threads; the future accepts on every listener (on the calling
    /// runtime) until it is dropped, and the workers stop with it: the future owns them, so
    /// dropping it joins them.
    pub fn serve(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        workers: usize,
    ) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let workers = Workers::start(&self, workers)?;
        Ok(async move { self.accept_loop(&listeners, &workers).await })
    }

    /// Accept on every listener (at most one IPv4 and one IPv6), check each connection, and hand
    /// it to a worker. The listeners are polled in turn, starting from a different one each
    /// time, so a flood on one does not starve the other.
    async fn accept_loop(&self, listeners: &[TcpListener], workers: &Workers) {
        let mut first = 0usize;
        loop {
            first = first.wrapping_add(1);
            let accepted = std::future::poll_fn(|cx| {
                let n = listeners.len();
                for k in 0..n {
                    if let Some(l) = listeners.get((first + k) % n) {
                        if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                            return std::task::Poll::Ready(r);
                        }
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(accepted) = self.accept(stream, peer) {
                        workers.dispatch(accepted);
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Check an accepted connection: None means it was refused (and audited).
    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let Some(redirected) = self.orig_dst.take(peer) else {
            tracing::warn!(%peer, "no redirect record for this connection: refusing it (the interceptor is not an open proxy)");
            let mut rec = Record::new(Event::Refused);
            rec.reason = Some(format!("no redirect record for connection from {peer}"));
            rec.decision = Some(Verdict::Deny);
            self.write_audit(&rec);
            return None;
        };
        let servers = self.routes.servers_for(redirected.orig_dst);
        if servers.is_empty() {
            tracing::warn!(dst = %redirected.orig_dst, "destination is no longer a configured endpoint: refusing the connection");
            let mut rec = caller_record(Event::Refused, &redirected);
            rec.reason = Some("destination is no longer a configured endpoint".into());
            rec.decision = Some(Verdict::Deny);
            self.write_audit(&rec);
            return None;
        }
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(stream) => Some(Accepted {
                stream,
                peer,
                redirected,
                servers,
            }),
            Err(e) => {
                tracing::error!(%peer, error = %e, "detaching an accepted connection failed");
                None
            }
        }
    }

    /// Best-effort write for records that gate nothing (refused connections, responses).
    fn write_audit(&self, rec: &Record) {
        if let Err(e) = self.audit.write(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }
}

fn caller_record(event: Event, r: &Redirected) -> Record {
    let mut rec = Record::new(event);
    rec.dst = Some(r.orig_dst.to_string());
    rec.pid = Some(r.caller.pid);
    rec.comm = Some(r.caller.comm.clone());
    rec.uid = Some(r.caller.uid);
    rec.cgroup = r.caller.cgroup.clone();
    rec.cgroup_id = Some(r.caller.cgroup_id);
    rec
}

/// What the policy said about one message.
struct Judged {
    msg: Message,
    decision: Option<Decision>,
}

impl Judged {
    fn refused(&self) -> bool {
        self.decision
            .as_ref()
            .is_some_and(|d| d.outcome != Outcome::Allow)
    }
}

impl Conn {
    fn server_at(&self, i: usize) -> Option<&Server> {
        self.shared.servers.get(i)
    }

    /// (any plaintext server, any https server) at this destination.
    fn schemes(&self) -> (bool, bool) {
        let tls = |i: &usize| self.server_at(*i).is_some_and(|s| s.tls.is_some());
        (
            self.servers.iter().any(|i| !tls(i)),
            self.servers.iter().any(tls),
        )
    }

    /// Read the ClientHello and either terminate (returning the connection narrowed to the
    /// servers the SNI names, the TLS stream and whether h2 was negotiated) or pass the
    /// connection through untouched (None, as for a refusal: it is done).
    async fn terminate_or_pass(mut self, stream: TcpStream) -> Next {
        let passthrough_here = self.servers.iter().any(|&i| {
            self.server_at(i)
                .and_then(|s| s.tls.as_ref())
                .is_some_and(|t| t.passthrough)
        });
        // Where something may be passed through, the hello is only peeked at: its bytes must
        // still be in the socket to forward them untouched.
        let hello = if passthrough_here {
            in_time(tls::peek_client_hello(&stream))
                .await
                .and_then(|r| r)
                .map(|(accepted, len)| Hello::Peeked(accepted, len, stream))
        } else {
            in_time(tls::read_client_hello(stream))
                .await
                .and_then(|r| r)
                .map(Hello::Read)
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                self.refuse_connection(None, format!("{e} (this endpoint is https)"));
                return Next::Done;
            }
        };
        let client_hello = match &hello {
            Hello::Read(start) => start.client_hello(),
            Hello::Peeked(accepted, _, _) => accepted.client_hello(),
        };
        let sni = client_hello.server_name().map(str::to_ascii_lowercase);
        let dst = self.redirected.orig_dst;
        // The servers this hello is for: those whose configured name is the SNI; without SNI
        // (the client dialled an address), every https server here.
        let candidates: Vec<usize> = self
            .servers
            .iter()
            .copied()
            .filter(|&i| {
                self.server_at(i)
                    .and_then(|s| s.tls.as_ref())
                    .is_some_and(|t| sni.as_deref().is_none_or(|n| t.host == n))
            })
            .collect();
        let Some(&first) = candidates.first() else {
            let name = sni.as_deref().unwrap_or_default();
            tracing::warn!(%dst, sni = name, "TLS for a name not configured at this destination: refused");
            self.refuse_connection(
                sni.clone(),
                format!(
                    "TLS server name {name:?} is not a configured endpoint name for {dst}: refused"
                ),
            );
            return Next::Done;
        };
        let Some(server_tls) = self.server_at(first).and_then(|s| s.tls.as_ref()) else {
            return Next::Done;
        };
        let (passthrough, client) = (server_tls.passthrough, server_tls.client.clone());
        self.servers = candidates;
        match hello {
            Hello::Peeked(_, _, stream) if passthrough => Next::Pass(self, stream, sni),
            Hello::Peeked(accepted, len, stream) => {
                match tls::resume_after_peek(stream, accepted, len).await {
                    Ok(start) => self.handshake(start, sni, first, client).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "client connection ended during the handshake");
                        Next::Done
                    }
                }
            }
            Hello::Read(start) => self.handshake(start, sni, first, client).await,
        }
    }

    /// Finish the client handshake with a minted leaf, offering what the server speaks.
    async fn handshake(
        mut self,
        start: tokio_rustls::StartHandshake<TcpStream>,
        sni: Option<String>,
        server: usize,
        client: Arc<TlsClient>,
    ) -> Next {
        let Some(terminator) = self.shared.terminator.clone() else {
            self.refuse_connection(sni, "TLS termination is not configured".into());
            return Next::Done;
        };
        let dst = self.redirected.orig_dst;
        let name = match &sni {
            Some(n) => crate::ca::LeafName::Dns(n.clone()),
            None => crate::ca::LeafName::Ip(dst.ip()),
        };
        // A first connection waits for the probe; mint meanwhile (the leaf is cached either way).
        let (offer, _) = tokio::join!(
            terminator.protocols.learn(dst, sni.as_deref(), &client),
            terminator.leaves.warm(&name)
        );
        let config = match terminator.leaves.config(&name, offer).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%name, error = format!("{e:#}"), "minting a leaf failed");
                self.refuse_connection(
                    sni,
                    format!("minting a certificate for {name} failed: {e:#}"),
                );
                return Next::Done;
            }
        };
        let handshake = in_time(start.into_stream(config))
            .await
            .and_then(|r| r.map_err(|e| e.to_string()));
        match handshake {
            Ok(tls) => {
                let h2 =
                    offer == Offer::H2AndHttp11 && tls.get_ref().1.alpn_protocol() == Some(tls::H2);
                self.tls = Some(TlsSession {
                    sni,
                    h2,
                    server,
                    client,
                });
                Next::Serve(self, Box::new(tls), h2)
            }
            Err(e) => {
                let hint = if e.contains("UnknownCA")
                    || e.contains("BadCertificate")
                    || e.contains("CertificateUnknown")
                {
                    ": the client does not trust the mcpwarden CA (see `mcpwarden ca show`)"
                } else {
                    ""
                };
                tracing::warn!(%dst, error = %e, "TLS handshake with the client failed{hint}");
                self.refuse_connection(
                    sni,
                    format!("TLS handshake with the client failed: {e}{hint}"),
                );
                Next::Done
            }
        }
    }

    /// `tls: passthrough`: audit the connection, then copy bytes both ways, uninspected.
    async fn pass_through(&self, mut stream: TcpStream, sni: Option<String>) {
        let dst = self.redirected.orig_dst;
        let mut rec = caller_record(Event::Passthrough, &self.redirected);
        rec.server = self
            .servers
            .first()
            .and_then(|&i| self.server_at(i))
            .map(|s| s.name.clone());
        rec.sni = sni;
        rec.tls = Some("passthrough");
        rec.decision = Some(Verdict::Allow);
        rec.reason = Some("tls: passthrough — forwarded untouched, not inspected".into());
        if self.audit.write(&rec).is_err() {
            tracing::error!("audit write failed: not passing the connection through");
            return;
        }
        let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await;
        let mut upstream = match connect {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::warn!(%dst, error = %e, "passthrough: the server could not be reached");
                return;
            }
            Err(_) => {
                tracing::warn!(%dst, "passthrough: connecting to the server timed out");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
            tracing::debug!(%dst, error = %e, "passthrough connection ended");
        }
    }

    /// Audit a connection refused before any HTTP was read (it is then closed).
    fn refuse_connection(&self, sni: Option<String>, reason: String) {
        let mut rec = caller_record(Event::Refused, &self.redirected);
        rec.sni = sni;
        rec.tls = Some("terminated");
        rec.decision = Some(Verdict::Deny);
        rec.reason = Some(reason);
        self.write_audit(&rec);
    }

    /// Best-effort immediate write for records that gate nothing but should not wait (refusals).
    fn write_audit(&self, rec: &Record) {
        if let Err(e) = self.audit.write(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    /// `response` records: carried by the worker's next write, at most a few ms later.
    fn write_audit_deferred(&self, rec: &Record) {
        if let Err(e) = self.audit.write_deferred(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    /// The configured server a request is for: the one whose endpoint path it names, else the
    /// only server at this destination. None when several servers share the destination and the
    /// path names none of them: no policy can be chosen for it.
    fn server(&self, path: &str) -> Option<&Server> {
        let here: Vec<&Server> = self
            .servers
            .iter()
            .filter_map(|&i| self.shared.servers.get(i))
            .collect();
        match here.iter().find(|s| mcp::is_endpoint_path(path, &s.path)) {
            Some(s) => Some(s),
            None if here.len() == 1 => here.first().copied(),
            // The POST endpoint of an HTTP+SSE session one of them announced.
            None => here
                .into_iter()
                .find(|s| self.legacy_session(s, path).is_some()),
        }
    }

    fn record(
        &self,
        event: Event,
        server: Option<&Server>,
        parts: &http::request::Parts,
    ) -> Record {
        let mut rec = caller_record(event, &self.redirected);
        rec.server = server.map(|s| s.name.clone());
        if let Some(t) = &self.tls {
            rec.sni = t.sni.clone();
            rec.tls = Some("terminated");
        }
        rec.http_version = Some(if parts.version == http::Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        });
        rec.http_method = Some(parts.method.to_string());
        rec.path = Some(parts.uri.path().to_owned());
        rec
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        let server = self.server(&path);

        if let Some(refusal) = self.misdirected(server, &parts) {
            return refusal;
        }
        let transfer_codings = parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| !t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if transfer_codings {
            return self.refuse_plain(
                server,
                &parts,
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not accepted: the body could not be inspected",
            );
        }
        if parts.method == Method::CONNECT || parts.headers.contains_key(header::UPGRADE) {
            return self.refuse_plain(
                server,
                &parts,
                StatusCode::FORBIDDEN,
                "Upgrade and CONNECT requests to an MCP endpoint are refused: they would open a tunnel past the policy",
            );
        }
        if parts.method != Method::POST && body.is_end_stream() {
            // No body to inspect: the SSE GET stream, DELETE, OAuth metadata, health checks.
            return self
                .forward_bodiless(server, parts, body.boxed(), started)
                .await;
        }
        // Every body is inspected, whatever the method: none reaches the server unread.
        let bytes = match Limited::new(body, self.shared.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let too_large = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                let (status, msg) = if too_large {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "request body exceeds the {} byte limit; it was not forwarded",
                            self.shared.max_body
                        ),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("reading the request body failed: {e}"),
                    )
                };
                let mut rec = self.record(Event::Refused, server, &parts);
                rec.decision = Some(Verdict::Deny);
                rec.reason = Some(msg.clone());
                self.write_audit(&rec);
                return json_response(status, mcp::error_response(None, -32600, &msg));
            }
        };
        // A compressed body is decoded, inspected, and forwarded decoded: the server reads
        // exactly what the policy read.
        let codings = encoding::codings(&parts.headers);
        let bytes = if codings.is_empty() {
            bytes
        } else {
            match encoding::decode(&bytes, &codings, self.shared.max_body) {
                Ok(decoded) => {
                    parts.headers.remove(header::CONTENT_ENCODING);
                    parts.headers.remove(header::CONTENT_LENGTH);
                    Bytes::from(decoded)
                }
                Err(e) => {
                    let status = match e {
                        encoding::DecodeError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        encoding::DecodeError::Corrupt(_) => StatusCode::BAD_REQUEST,
                        encoding::DecodeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    };
                    return self.refuse_plain(server, &parts, status, &e.to_string());
                }
            }
        };
        let must_be_mcp = parts.method == Method::POST
            && server.is_some_and(|s| {
                mcp::is_endpoint_path(&path, &s.path) || self.legacy_session(s, &path).is_some()
            });
        if !must_be_mcp && !mcp::looks_like_jsonrpc(&bytes) {
            return self
                .forward_non_mcp(server, parts, full(bytes), started)
                .await;
        }
        match server {
            Some(server) => self.handle_mcp(server, parts, bytes, started).await,
            None => {
                let msg = "this address serves several MCP endpoints and the request path names none of them: \
                           no policy applies, so it was not forwarded";
                let mut rec = self.record(Event::Refused, None, &parts);
                rec.decision = Some(Verdict::Deny);
                rec.reason = Some(msg.to_owned());
                self.write_audit(&rec);
                json_response(
                    StatusCode::BAD_REQUEST,
                    mcp::error_response(None, -32600, msg),
                )
            }
        }
    }

    /// On a terminated connection, a request must be for the server the TLS name was: Host (or
    /// :authority) naming another server is domain fronting, answered 421.
    fn misdirected(
        &self,
        server: Option<&Server>,
        parts: &http::request::Parts,
    ) -> Option<Response<Body>> {
        let tls = self.tls.as_ref()?;
        let authority = parts
            .uri
            .authority()
            .map(|a| a.host().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .map(|a| a.host().to_owned())
            });
        let host = authority.as_deref().map(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        });
        let expected = match &tls.sni {
            Some(n) => n.clone(),
            None => self.redirected.orig_dst.ip().to_string(),
        };
        if host.as_deref() == Some(expected.as_str()) {
            return None;
        }
        Some(self.refuse_plain(
            server,
            parts,
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this connection is for {expected} but the request names {}: send it on a connection to that server",
                host.as_deref().unwrap_or("no host")
            ),
        ))
    }

    /// Forward a request that carries no MCP message, audited before it goes.
    async fn forward_non_mcp(
        &self,
        server: Option<&Server>,
        parts: http::request::Parts,
        body: Body,
        started: Instant,
    ) -> Response<Body> {
        if let Err(refusal) =
            self.audit_before_forwarding(&self.record(Event::NonMcp, server, &parts), None)
        {
            return *refusal;
        }
        let rec = self.record(Event::Response, server, &parts);
        self.forward(rec, parts, body, started).await
    }

    /// Write a record that must reach the kernel before its request is forwarded; on failure the
    /// request is not forwarded and the client gets a 503 carrying a JSON-RPC error for `id`.
    fn audit_before_forwarding(
        &self,
        rec: &Record,
        id: Option<&serde_json::Value>,
    ) -> Result<(), Box<Response<Body>>> {
        self.audit.write(rec).map_err(|e| {
            tracing::error!(error = %e, "audit write failed: refusing to forward");
            Box::new(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                mcp::error_response(
                    id,
                    -32603,
                    "mcpwarden cannot write its audit log; the request was not forwarded",
                ),
            ))
        })
    }

    /// A request without a body. GET streams are read like any server message (a 2024-11-05
    /// HTTP+SSE stream, a Streamable HTTP standalone or resumed stream); DELETE ends a session.
    async fn forward_bodiless(
        &self,
        server: Option<&Server>,
        mut parts: http::request::Parts,
        body: Body,
        started: Instant,
    ) -> Response<Body> {
        let mut rec = self.record(Event::NonMcp, server, &parts);
        let session = server.and_then(|s| self.header_session(s, &parts.headers));
        if let Some(s) = &session {
            rec.transport = Some(respond::STREAMABLE);
            rec.revision = s.1.revision().or_else(|| mcp_header(&parts.headers));
        }
        if let Err(refusal) = self.audit_before_forwarding(&rec, None) {
            return *refusal;
        }
        let (Some(server), true) = (server, parts.method == Method::GET) else {
            if let (Some((key, s)), true) = (&session, parts.method == Method::DELETE) {
                self.shared.sessions.remove(key, Some(s));
                respond::close_session_calls(
                    s,
                    &self.audit,
                    None,
                    "the client ended the session (DELETE) before the result",
                );
            }
            let rec = self.record(Event::Response, server, &parts);
            return self.forward(rec, parts, body, started).await;
        };
        identity_encoding(&mut parts.headers);
        let mut base = self.record(Event::Response, Some(server), &parts);
        base.transport = rec.transport;
        base.revision = rec.revision.clone();
        // A stream's listings are filtered with the caller's policy (everything hidden when
        // the caller could not be identified).
        let engine = self.choose_policy(server).await.engine;
        let exchange = self.exchange(server, engine, &parts, base, session.map(|s| s.1), started);
        let exchange = Exchange {
            get_stream: true,
            ..exchange
        };
        match self.send(parts, body).await {
            // MCP answers a GET with an event stream (or 405); anything else (OAuth metadata, a
            // health check) carries no MCP message and is passed on as it is.
            Ok(resp) if respond::is_event_stream(resp.headers()) => {
                respond::respond(resp, exchange).await
            }
            Ok(resp) => {
                let mut rec = exchange.base;
                rec.ts = crate::audit::now();
                rec.status = Some(resp.status().as_u16());
                rec.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                self.write_audit_deferred(&rec);
                resp
            }
            Err((resp, reason, _)) => {
                let mut rec = exchange.base;
                rec.reason = Some(format!("upstream failed: {reason}"));
                self.write_audit_deferred(&rec);
                resp
            }
        }
    }

    /// The session an `Mcp-Session-Id` header names, if the server has confirmed it (a 2xx
    /// answer carrying it: see `respond`). Ids a client makes up create nothing, so the table
    /// cannot be flooded past the servers' own sessions.
    fn header_session(
        &self,
        server: &Server,
        headers: &http::HeaderMap,
    ) -> Option<(SessionKey, Arc<Session>)> {
        let id = headers.get("mcp-session-id")?.to_str().ok()?;
        let key = SessionKey {
            server: self.server_index(server)?,
            id: id.to_owned(),
        };
        let session = self.shared.sessions.get(&key)?;
        Some((key, session))
    }

    /// The HTTP+SSE session a POST's target names, if this agent saw it announced.
    fn legacy_session(&self, server: &Server, target: &str) -> Option<Arc<Session>> {
        if !self.shared.sessions.any_legacy() {
            return None;
        }
        let key = SessionKey {
            server: self.server_index(server)?,
            id: respond::legacy_session_id(target),
        };
        self.shared.sessions.get(&key).filter(|s| s.is_legacy())
    }

    fn server_index(&self, server: &Server) -> Option<usize> {
        self.shared
            .servers
            .iter()
            .position(|s| std::ptr::eq(s, server))
    }

    /// The origins an HTTP+SSE endpoint may name: every configured server's, this
    /// connection's destination (and SNI), and the origin the client addressed.
    fn origins(&self, parts: &http::request::Parts) -> Vec<String> {
        let mut origins: Vec<String> = self
            .shared
            .servers
            .iter()
            .map(|s| s.origin.clone())
            .collect();
        let dst = self.redirected.orig_dst;
        origins.push(dst.to_string().to_ascii_lowercase());
        if let Some(t) = self.tls.as_ref().and_then(|t| t.sni.as_ref()) {
            origins.push(format!("{t}:{}", dst.port()));
        }

        // The origin the client addressed (Host, or :authority), with its default port.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        if let Some(a) = authority.and_then(|a| a.parse::<http::uri::Authority>().ok()) {
            let port = a
                .port_u16()
                .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
            origins.push(format!("{}:{port}", a.host()).to_ascii_lowercase());
        }
        origins
    }

    fn exchange(
        &self,
        server: &Server,
        engine: Arc<Engine>,
        parts: &http::request::Parts,
        base: Record,
        session: Option<Arc<Session>>,
        started: Instant,
    ) -> Exchange {
        // Only a GET's stream can announce an HTTP+SSE endpoint, whose origin is checked.
        let origins = if parts.method == Method::GET {
            self.origins(parts)
        } else {
            Vec::new()
        };
        Exchange {
            base,
            calls: Vec::new(),
            batch: None,
            engine,
            params: server.params.clone(),
            session,
            sessions: self.shared.sessions.clone(),
            server: self.server_index(server).unwrap_or(usize::MAX),
            origins,
            started,
            max: self.shared.max_body.max(respond::MIN_RESPONSE_BOUND),
            audit: self.audit.clone(),
            get_stream: false,
        }
    }

    async fn handle_mcp(
        &self,
        server: &Server,
        mut parts: http::request::Parts,
        bytes: Bytes,
        started: Instant,
    ) -> Response<Body> {
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let legacy = self.legacy_session(server, &target);
        let header_session = self.header_session(server, &parts.headers);
        let session = match &legacy {
            Some(s) => Some(s.clone()),
            None => header_session.as_ref().map(|(_, s)| s.clone()),
        };
        let parsed = match mcp::parse_body(&bytes, &parts.headers) {
            Ok(p) => p,
            Err(e) => {
                let mut rec = self.record(Event::Refused, Some(server), &parts);
                rec.decision = Some(Verdict::Deny);
                rec.id = e.id.clone();
                rec.reason = Some(e.message.clone());
                rec.transport = Some(if legacy.is_some() {
                    respond::HTTP_SSE
                } else {
                    respond::STREAMABLE
                });
                self.write_audit(&rec);
                if let (Some(s), Some(_)) = (&legacy, &e.id) {
                    // An HTTP+SSE client reads answers on its stream only.
                    if s.inject(mcp::message_event(&e.response_body())) {
                        return accepted();
                    }
                }
                return json_response(e.status, e.response_body());
            }
        };
        if let Parsed::Single(m) = &parsed {
            if let Err(e) = self.check_param_headers(server, m, &parts.headers) {
                let mut rec = self.record(Event::Refused, Some(server), &parts);
                fill_message(&mut rec, m);
                rec.decision = Some(Verdict::Deny);
                rec.reason = Some(e.message.clone());
                self.write_audit(&rec);
                return json_response(e.status, e.response_body());
            }
        }
        let (batch, msgs) = match parsed {
            Parsed::Single(m) => (false, vec![m]),
            Parsed::Batch(ms) => (true, ms),
        };
        let transport = if legacy.is_some() {
            respond::HTTP_SSE
        } else if msgs.iter().any(|m| m.stateless_2026) {
            respond::STATELESS
        } else {
            respond::STREAMABLE
        };
        let session_revision = session.as_ref().and_then(|s| s.revision());
        let chosen = self.choose_policy(server).await;
        let caller = &self.redirected.caller;
        let grant = match self.shared.pods.get(caller.cgroup_id) {
            Some(pod) => format!("pod:{}", pod.uid),
            None => format!("cgroup:{}", caller.cgroup_id),
        };
        let process = format!("pid:{}", caller.pid);
        // Revisions without sessions count a `session` limit per connection.
        let session_key = match &header_session {
            Some((key, _)) => format!("session:{}", key.id),
            None => match &legacy {
                Some(_) => format!("session:{target}"),
                None => format!("connection:{}", self.id),
            },
        };
        let scope = CallerScope {
            grant: &grant,
            process: &process,
            session: &session_key,
        };
        let now = Instant::now();
        let judged: Vec<Judged> = msgs
            .into_iter()
            .map(|msg| {
                let decision = match (msg.is_tool_call(), &msg.tool, &chosen.unresolved) {
                    (true, Some(_), Some(refusal)) => Some(refusal.clone()),
                    (true, Some(tool), None) => Some(chosen.engine.decide_call(
                        &Call {
                            tool,
                            arguments: msg.arguments.as_ref(),
                        },
                        &scope,
                        now,
                    )),
                    _ => None,
                };
                Judged { msg, decision }
            })
            .collect();
        let stamp = |rec: &mut Record, msg: &Message| {
            rec.transport = Some(transport);
            rec.revision = msg
                .revision
                .clone()
                .or_else(|| session_revision.clone())
                .or_else(|| (transport == respond::STREAMABLE).then(|| "2025-03-26".to_owned()));
        };

        // Refused messages are answered by mcpwarden: in the POST's response, or on the
        // HTTP+SSE stream, where the client reads its answers.
        let mut elements = Vec::with_capacity(judged.len());
        let mut forwarded = Vec::new();
        let mut calls = Vec::new();
        let mut refused_any = false;
        for (index, j) in judged.iter().enumerate() {
            if j.refused() {
                refused_any = true;
                let mut rec = self.message_record(Event::Refused, server, &chosen, &parts, j);
                stamp(&mut rec, &j.msg);
                self.write_audit(&rec);
                elements.push(BatchElement::Refused(refusal(j)));
                continue;
            }
            let mut rec = self.message_record(Event::Request, server, &chosen, &parts, j);
            stamp(&mut rec, &j.msg);
            // Every decision record reaches the kernel before the request is forwarded.
            if let Err(refusal) = self.audit_before_forwarding(&rec, j.msg.id.as_ref()) {
                return *refusal;
            }
            if let (Some(cancelled), Some(s)) = (&j.msg.cancels, &session) {
                self.close_cancelled(s, cancelled);
            }
            elements.push(BatchElement::Forwarded(
                j.msg.id.clone().filter(|_| j.msg.kind == Kind::Request),
            ));
            forwarded.push(index);
            if let (Kind::Request, Some(id)) = (j.msg.kind, &j.msg.id) {
                let mut pending = self.record(Event::Response, Some(server), &parts);
                stamp(&mut pending, &j.msg);
                fill_message(&mut pending, &j.msg);
                calls.push((
                    id.clone(),
                    Pending::new(
                        pending,
                        started,
                        j.msg
                            .method
                            .as_deref()
                            .is_some_and(|m| mcp::is_method(m, "tools/list")),
                        j.decision.as_ref().and_then(|d| d.reservation.clone()),
                    ),
                ));
            }
        }

        if let Some(s) = &legacy {
            // HTTP+SSE: every answer goes on the stream; the POST itself only gets 202.
            for e in &elements {
                if let BatchElement::Refused(Some(answer)) = e {
                    if !s.inject(mcp::message_event(answer)) {
                        tracing::warn!("the HTTP+SSE stream of this session is gone or full: refusal answered in the POST body");
                        return json_response(StatusCode::OK, answer.clone());
                    }
                }
            }
            if forwarded.is_empty() {
                return accepted();
            }
        } else if forwarded.is_empty() {
            // Nothing forwarded: mcpwarden answers alone, with the bytes it wrote.
            let answers = Batch { elements };
            let mut refusals = answers.refusals().peekable();
            if refusals.peek().is_none() {
                return accepted();
            }
            let body = if batch {
                respond::json_array(refusals)
            } else {
                refusals.next().map(<[u8]>::to_vec).unwrap_or_default()
            };
            return json_response(StatusCode::OK, body);
        }

        // What goes on: the body as it came, or the batch without its refused elements.
        let body = if refused_any {
            match mcp::batch_subset(&bytes, &forwarded) {
                Some(b) => Bytes::from(b),
                None => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        mcp::error_response(
                            None,
                            mcp::INVALID_REQUEST,
                            "Invalid Request: the batch could not be split",
                        ),
                    )
                }
            }
        } else {
            bytes
        };
        if refused_any {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        identity_encoding(&mut parts.headers);
        let mut base = self.record(Event::Response, Some(server), &parts);
        base.transport = Some(transport);
        base.revision = session_revision;
        let batch = (batch && legacy.is_none() && refused_any).then_some(Batch { elements });
        // The session holds the calls too: HTTP+SSE answers come on the GET stream (possibly
        // before the POST's 202), Streamable HTTP ones may come on a resumed stream, and a
        // cancellation arrives in another POST.
        if let Some(s) = &session {
            for (id, p) in &calls {
                s.add_pending(id, p.clone());
            }
        }
        let exchange = Exchange {
            calls,
            batch,
            ..self.exchange(
                server,
                chosen.engine.clone(),
                &parts,
                base,
                session,
                started,
            )
        };
        match self.send(parts, full(body)).await {
            Ok(resp) => respond::respond(resp, exchange).await,
            Err((resp, reason, not_sent)) => {
                for (id, p) in exchange.calls {
                    if let Some(s) = &exchange.session {
                        s.take_pending(&id);
                    }
                    if !p.claim() {
                        continue;
                    }
                    let mut rec = p.rec.clone();
                    // The request never reached the server: the calls did not run.
                    if not_sent {
                        p.release_quota(&mut rec);
                    }
                    rec.ts = crate::audit::now();
                    rec.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                    rec.status = Some(resp.status().as_u16());
                    rec.reason = Some(format!(
                        "upstream failed (HTTP {} from mcpwarden): {reason}",
                        resp.status()
                    ));
                    self.write_audit_deferred(&rec);
                }
                resp
            }
        }
    }

    /// `Mcp-Param-*` headers of a call must mirror its arguments as the tool's listing
    /// designated. A call whose tool was never seen in a listing cannot be checked: it passes
    /// (the server still checks; the policy decides on the body either way).
    fn check_param_headers(
        &self,
        server: &Server,
        m: &Message,
        headers: &http::HeaderMap,
    ) -> Result<(), mcp::ParseError> {
        let Some(tool) = m.tool.as_deref().filter(|_| m.is_tool_call()) else {
            return Ok(());
        };
        match server.params.get(tool) {
            Some(d) => mcp::check_param_headers(&d, m, headers),
            None if mcp::has_param_headers(headers) => {
                tracing::debug!(
                    tool,
                    "Mcp-Param-* headers on a call whose tool's listing was not seen: not checked"
                );
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The client cancelled a call: its record is closed now (its answer, if any still
    /// comes, is no longer awaited).
    fn close_cancelled(&self, session: &Session, id: &serde_json::Value) {
        if let Some(p) = session.pending(id).filter(Pending::claim) {
            let mut rec = p.rec;
            rec.ts = crate::audit::now();
            rec.latency_ms = Some(p.started.elapsed().as_secs_f64() * 1000.0);
            rec.reason = Some("cancelled by the client (notifications/cancelled)".into());
            self.write_audit_deferred(&rec);
        }
    }

    fn message_record(
        &self,
        event: Event,
        server: &Server,
        chosen: &Chosen,
        parts: &http::request::Parts,
        j: &Judged,
    ) -> Record {
        let mut rec = self.record(event, Some(server), parts);
        fill_message(&mut rec, &j.msg);
        rec.decision = Some(Verdict::Allow);
        if let Some(d) = &j.decision {
            rec.decision = Some(verdict(d.outcome));
            rec.would = d.would.map(verdict);
            rec.rule = Some(d.rule.clone());
            rec.reason = d.reason.clone();
            rec.binding = chosen.binding.clone();
            if chosen.unresolved.is_none() {
                let src = chosen.engine.policy().source();
                rec.policy = Some(PolicyRef {
                    file: src.file.clone(),
                    sha256: src.sha256.clone(),
                });
            }
        }
        rec
    }

    /// The policy for this caller and server: the first matching binding, else the server's
    /// default. When a binding needs the caller's pod metadata and it is not known, waits for
    /// it up to `identity_wait_ms`, then refuses: never another policy in its place.
    async fn choose_policy(&self, server: &Server) -> Chosen {
        let index = self.server_index(server).unwrap_or(usize::MAX);
        let caller = &self.redirected.caller;
        let is_pod = caller
            .cgroup
            .as_deref()
            .is_some_and(crate::policy::bindings::is_pod_cgroup);
        let mut deadline = None;
        loop {
            let changed = self.shared.pods.changed();
            let routing = self.shared.routing.load();
            let pod = self.shared.pods.get(caller.cgroup_id);
            let facts = CallerFacts {
                uid: caller.uid,
                comm: &caller.comm,
                cgroup: caller.cgroup.as_deref(),
                pod: match (&pod, is_pod) {
                    (Some(p), _) => PodFacts::Known(p),
                    (None, true) => PodFacts::Pending,
                    (None, false) => PodFacts::NotAPod,
                },
            };
            let binding = match routing.choose(index, &server.name, &facts) {
                Choice::Engine { engine, binding } => {
                    return Chosen {
                        engine,
                        binding: binding.map(|b| format!("/bindings/{b}")),
                        unresolved: None,
                    }
                }
                Choice::Unresolved { binding } => binding,
            };
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + routing.identity_wait);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let pointer = format!("/bindings/{binding}");
                tracing::warn!(
                    cgroup = caller.cgroup.as_deref().unwrap_or(""),
                    binding = pointer,
                    "caller identity unresolved: its calls are refused"
                );
                return Chosen {
                    engine: UNRESOLVED.clone(),
                    binding: Some(pointer.clone()),
                    unresolved: Some(Decision {
                        outcome: Outcome::Deny,
                        rule: pointer,
                        reason: Some(format!(
                            "caller identity unresolved: binding {binding} selects on pod metadata, \
                             which was not known within {} ms",
                            routing.identity_wait.as_millis()
                        )),
                        would: None,
                        reservation: None,
                    }),
                };
            }
        }
    }

    fn refuse_plain(
        &self,
        server: Option<&Server>,
        parts: &http::request::Parts,
        status: StatusCode,
        reason: &str,
    ) -> Response<Body> {
        let mut rec = self.record(Event::Refused, server, parts);
        rec.decision = Some(Verdict::Deny);
        rec.reason = Some(reason.to_owned());
        rec.status = Some(status.as_u16());
        self.write_audit(&rec);
        let mut resp = Response::new(full(Bytes::from(format!("mcpwarden: {reason}\n"))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }

    /// Forward and write `rec` (with status and latency) once the response head arrives.
    async fn forward(
        &self,
        mut rec: Record,
        parts: http::request::Parts,
        body: Body,
        started: Instant,
    ) -> Response<Body> {
        let result = self.send(parts, body).await;
        rec.ts = crate::audit::now();
        rec.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match result {
            Ok(resp) => {
                rec.status = Some(resp.status().as_u16());
                self.write_audit_deferred(&rec);
                resp
            }
            Err((resp, reason, _)) => {
                rec.status = None;
                rec.reason = Some(format!(
                    "upstream failed (HTTP {} from mcpwarden): {reason}",
                    resp.status()
                ));
                self.write_audit_deferred(&rec);
                resp
            }
        }
    }

    /// Send to the original destination; Err carries the 502 to give the client and why.
    async fn send(
        &self,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Body>, (Response<Body>, String, bool)> {
        strip_hop_by_hop(&mut parts.headers);
        let dst = self.redirected.orig_dst;
        let result = match &self.tls {
            None => {
                // Always origin-form on the wire to the server; Host stays what the client sent.
                if let Some(pq) = parts.uri.path_and_query().cloned() {
                    if let Ok(uri) = http::Uri::builder().path_and_query(pq).build() {
                        parts.uri = uri;
                    }
                }
                parts.version = http::Version::HTTP_11;
                self.upstream
                    .send(dst, Request::from_parts(parts, body))
                    .await
            }
            Some(tls) => {
                // Same protocol both sides. h2 takes :authority from the URI (the client's own);
                // HTTP/1.1 writes origin form and keeps the client's Host.
                let authority = parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_else(|| match &tls.sni {
                        Some(n) => n.clone(),
                        None => dst.to_string(),
                    });
                let pq = parts
                    .uri
                    .path_and_query()
                    .map(|pq| pq.as_str())
                    .unwrap_or("/");
                match http::Uri::builder()
                    .scheme("https")
                    .authority(authority)
                    .path_and_query(pq)
                    .build()
                {
                    Ok(uri) => parts.uri = uri,
                    Err(e) => {
                        return Err((
                            plain_response(
                                StatusCode::BAD_REQUEST,
                                "mcpwarden: bad request target\n",
                            ),
                            format!("bad request target: {e}"),
                            true,
                        ))
                    }
                }
                parts.version = if tls.h2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                };
                let key = TlsKey {
                    dst,
                    sni: tls.sni.clone(),
                    server: tls.server,
                    h2: tls.h2,
                };
                self.upstream
                    .send_tls(key, &tls.client, Request::from_parts(parts, body))
                    .await
            }
        };
        match result {
            Ok(resp) => {
                let (mut head, body) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                Ok(Response::from_parts(head, body.boxed()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "forwarding failed");
                let resp = plain_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("mcpwarden: the MCP server could not be reached: {e}\n"),
                );
                Err((resp, e.to_string(), e.not_sent()))
            }
        }
    }
}

/// The audit verdict of a policy outcome.
fn verdict(outcome: Outcome) -> Verdict {
    match outcome {
        Outcome::Allow => Verdict::Allow,
        Outcome::Deny | Outcome::UnknownTool => Verdict::Deny,
        Outcome::ApprovalRequired => Verdict::RequireApproval,
    }
}

/// The policy applied to callers whose identity could not be resolved: every tool hidden.
static UNRESOLVED: std::sync::LazyLock<Arc<Engine>> =
    std::sync::LazyLock::new(|| Arc::new(Engine::new(crate::policy::Policy::hide_everything())));

/// mcpwarden's answer to a refused message (`None` for a notification: nothing to answer).
fn refusal(j: &Judged) -> Option<Vec<u8>> {
    let id = j.msg.id.as_ref()?;
    let body = match &j.decision {
        Some(d) if d.outcome == Outcome::UnknownTool => {
            mcp::unknown_tool_response(id, j.msg.tool.as_deref().unwrap_or(""))
        }
        Some(d) => mcp::denied_response(
            id,
            d.reason.as_deref().unwrap_or("denied"),
            j.msg.stateless_2026,
        ),
        None => return None,
    };
    Some(body)
}

/// 202 Accepted, as an HTTP+SSE server answers every POST.
fn accepted() -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(b"Accepted")));
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

/// The `MCP-Protocol-Version` header.
fn mcp_header(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(mcp::PROTOCOL_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Ask for an uncompressed answer: a compressed one could not be read.
fn identity_encoding(headers: &mut http::HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

fn fill_message(rec: &mut Record, msg: &Message) {
    rec.method = msg.method.clone();
    rec.id = msg.id.clone();
    rec.tool = msg.tool.clone();
    if msg.tool.is_some() {
        rec.arg_keys = Some(msg.arg_keys.clone());
        rec.args_sha256 = msg.args_sha256.clone();
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn plain_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(text.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
