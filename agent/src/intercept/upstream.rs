//! The interceptor's own connections to original destinations: keep-alive pools per worker
//! (hyper-util's client), one per caller's network namespace, keyed by destination address for
//! plaintext, and by (namespace, destination, server name, server, protocol) for TLS. Every
//! upstream socket is created in the caller's namespace ([`Netns::connect`]): the pod's routes,
//! source address and NetworkPolicy apply, and the server sees the pod as its peer. When a
//! namespace is no longer served its pools go ([`Upstream::forget_netns`]).
//!
//! A request is sent to the address recovered from the redirect map, written in absolute form
//! (`http://ADDR/path`, by `forward`) only so that the pool can key on it; the client writes origin form on the
//! wire and leaves the Host header the client sent untouched (`set_host(false)`). Requests on one
//! client connection are served one at a time (HTTP/1.1), so they reach the server in the
//! client's order; idle client connections hold no upstream connection. The agent's cgroup is
//! exempt from redirection, so these connect()s reach the real servers. A connection that cannot
//! be made from the caller's namespace is an error (a 502 to the client), never a connection
//! from somewhere else.
//!
//! TLS: always to the original destination (never to what a Host header says), with the
//! client's SNI, verifying the server against the system roots plus the server's `upstream_ca`
//! — never the mcpwarden CA. A failed verification is an error, never bypassed. The protocol is
//! the one the client negotiated with us (h2 or HTTP/1.1), which we only offered because the
//! server speaks it.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::{
    client::ResolvesClientCert, pki_types::ServerName, ClientConfig, RootCertStore, SignatureScheme,
};
use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::netns::Netns;

pub type Body = BoxBody<Bytes, hyper::Error>;
/// Idle upstream connections are closed after this long (servers commonly time out at 60-120 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per destination.
const POOL_MAX_IDLE_PER_DST: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HTTP exchange with {dst}: {}", chain(source))]
    Http {
        dst: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error(
        "{dst} asks for a TLS client certificate, which mcpwarden cannot present for the workload \
         (mark this server `tls: passthrough` to forward it untouched, uninspected): {}",
        chain(source)
    )]
    ClientCertRequired {
        dst: String,
        source: hyper_util::client::legacy::Error,
    },
}

impl UpstreamError {
    /// Whether the request certainly never reached the server: the connection (TCP or TLS)
    /// could not be made. An error after a connection carried the
    /// request (a reset, a timeout) may have come after the server ran it.
    pub fn not_sent(&self) -> bool {
        match self {
            UpstreamError::Http { source, .. }
            | UpstreamError::ClientCertRequired { source, .. } => source.is_connect(),
        }
    }
}

/// An error and its sources, `a: b: c` (hyper-util's own Display says only "client error").
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Which TLS pool a request goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsKey {
    /// The caller's network namespace (cookie): connections are made from there.
    pub netns: u64,
    pub dst: SocketAddr,
    /// The client's SNI; None: the client dialled an address, so do we.
    pub sni: Option<String>,
    /// Index of the configured server (its trust roots).
    pub server: usize,
    pub h2: bool,
}

struct TlsPool {
    client: Client<TlsConnector, Body>,
    cert_requested: Arc<AtomicBool>,
}

/// A worker's upstream connection pools.
pub struct Upstream {
    /// Plaintext pools, per caller namespace (cookie).
    plain: Mutex<HashMap<u64, Client<NetnsConnector, Body>>>,
    tls: Mutex<HashMap<TlsKey, TlsPool>>,
    /// Answer bytes this worker holds buffered now (JSON answers read whole), over all its
    /// connections: bounded by `limits.max_buffered_answer_bytes_per_worker`.
    pub answers: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        Upstream {
            plain: Mutex::new(HashMap::new()),
            tls: Mutex::new(HashMap::new()),
            answers: Arc::default(),
        }
    }

    /// Namespace `cookie` is gone: drop its pools (their idle connections close).
    pub fn forget_netns(&self, cookie: u64) {
        let plain = self
            .plain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
        let tls: Vec<TlsPool> = {
            let mut pools = self.tls.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<TlsKey> = pools
                .keys()
                .filter(|k| k.netns == cookie)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| pools.remove(k)).collect()
        };
        drop((plain, tls));
    }

    /// Send `req` over TLS to `key.dst`, verified by `tls`. The request's URI must be absolute
    /// (`https://authority/path`): HTTP/1.1 writes it in origin form, h2 takes :authority from it.
    pub async fn send_tls(
        &self,
        netns: &Arc<Netns>,
        key: TlsKey,
        tls: &TlsClient,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let dst = key.dst;
        let (client, cert_requested) = {
            let mut pools = self.tls.lock().unwrap_or_else(|p| p.into_inner());
            let pool = pools.entry(key.clone()).or_insert_with(|| {
                let cert_requested = Arc::new(AtomicBool::new(false));
                let alpn: &[u8] = if key.h2 { b"h2" } else { b"http/1.1" };
                let connector = TlsConnector {
                    netns: netns.clone(),
                    dst,
                    name: server_name(key.sni.as_deref(), dst),
                    config: tls.config(alpn, cert_requested.clone()),
                };
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_max_idle_per_host(POOL_MAX_IDLE_PER_DST)
                    .http1_preserve_header_case(true)
                    .set_host(false)
                    .http2_only(key.h2);
                TlsPool {
                    client: builder.build(connector),
                    cert_requested,
                }
            });
            (pool.client.clone(), pool.cert_requested.clone())
        };
        client.request(req).await.map_err(|source| {
            let dst = dst.to_string();
            if cert_requested.load(Ordering::Relaxed) {
                UpstreamError::ClientCertRequired { dst, source }
            } else {
                UpstreamError::Http { dst, source }
            }
        })
    }

    /// Send `req` (absolute `http://DST/path` target, headers already cleaned) to the
    /// destination it names and return the response head with its body streaming.
    pub async fn send(
        &self,
        netns: &Arc<Netns>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let dst = authority_of(&req);
        let client = self
            .plain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(netns.cookie)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_max_idle_per_host(POOL_MAX_IDLE_PER_DST)
                    .http1_preserve_header_case(true)
                    .set_host(false)
                    .build(NetnsConnector {
                        netns: netns.clone(),
                    })
            })
            .clone();
        client
            .request(req)
            .await
            .map_err(|source| UpstreamError::Http { dst, source })
    }
}

/// The destination an absolute request URI names (for error messages).
fn authority_of(req: &Request<Body>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default()
}

/// The name to verify the server as: the client's SNI, else the destination's address (and then
/// no SNI is sent, as the client sent none).
fn server_name(sni: Option<&str>, dst: SocketAddr) -> ServerName<'static> {
    sni.and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or(ServerName::IpAddress(dst.ip().into()))
}

/// How the interceptor verifies one configured server: system roots plus its `upstream_ca`,
/// never the mcpwarden CA.
pub struct TlsClient {
    base: Arc<ClientConfig>,
}

impl TlsClient {
    pub fn new(
        provider: Arc<rustls::crypto::CryptoProvider>,
        roots: Arc<RootCertStore>,
    ) -> anyhow::Result<TlsClient> {
        let base = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS client versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient {
            base: Arc::new(base),
        })
    }

    /// The config for one pool: its ALPN, and a flag raised if the server asks for a client
    /// certificate.
    fn config(&self, alpn: &[u8], cert_requested: Arc<AtomicBool>) -> Arc<ClientConfig> {
        let mut c = (*self.base).clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        c.client_auth_cert_resolver = Arc::new(NoClientCert(cert_requested));
        Arc::new(c)
    }

    /// Handshake with the server offering h2 and http/1.1; its choice.
    pub async fn probe_alpn(
        &self,
        netns: &Netns,
        dst: SocketAddr,
        sni: Option<&str>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut c = (*self.base).clone();
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = netns.connect(dst).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(c))
            .connect(server_name(sni, dst), tcp)
            .await?;
        Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    }
}

/// The trust roots for one server: the system's (rustls-native-certs: /etc/ssl/certs, or
/// SSL_CERT_FILE / SSL_CERT_DIR) and `extra` (PEM), minus every mcpwarden CA certificate — a
/// host that trusts our CA must not let us trust our own leaves upstream.
pub fn upstream_roots(
    ours: &[CertificateDer<'static>],
    extra: Option<&std::path::Path>,
) -> anyhow::Result<RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "reading a system trust root failed");
    }
    let mut certs: Vec<CertificateDer<'static>> = native.certs;
    if let Some(path) = extra {
        let found: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("{}: cannot read upstream_ca", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not a PEM certificate bundle", path.display()))?;
        if found.is_empty() {
            anyhow::bail!("{}: upstream_ca holds no PEM certificate", path.display());
        }
        certs.extend(found);
    }
    for c in certs.into_iter().filter(|c| !ours.contains(c)) {
        // Some system bundles carry certificates webpki cannot use; skip those.
        let _ = roots.add(c);
    }
    Ok(roots)
}

/// Never presents a certificate; notes that the server asked for one.
#[derive(Debug)]
struct NoClientCert(Arc<AtomicBool>);

impl ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Connects a plaintext pool's connections: TCP to the destination the (absolute) request URI
/// names, from the pool's namespace.
#[derive(Clone)]
struct NetnsConnector {
    netns: Arc<Netns>,
}

impl tower_service::Service<Uri> for NetnsConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let netns = self.netns.clone();
        Box::pin(async move {
            // `forward` writes the destination address as the authority.
            let dst: SocketAddr = uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default()
                .parse()
                .map_err(|e| format!("upstream {uri} is not an address: {e}"))?;
            let tcp = netns.connect(dst).await?;
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Connects one TLS pool's connections: TCP to `dst` from the pool's namespace, then the
/// handshake as `name`.
#[derive(Clone)]
struct TlsConnector {
    netns: Arc<Netns>,
    dst: SocketAddr,
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = this.netns.connect(this.dst).await?;
            let tls = tokio_rustls::TlsConnector::from(this.config)
                .connect(this.name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {}: {e}", this.dst))?;
            Ok(TokioIo::new(TlsConn(tls)))
        })
    }
}

/// A client TLS stream hyper-util's pool can use (it reports h2 when ALPN chose it).
pub struct TlsConn(tokio_rustls::client::TlsStream<TcpStream>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.0.get_ref().1.alpn_protocol() == Some(b"h2") {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`. Everything
/// else — Host included — passes through untouched.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers_only(
    ) -> Result<(), http::header::InvalidHeaderValue> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse()?);
        h.insert(header::CONNECTION, "keep-alive, x-private".parse()?);
        h.insert("x-private", "1".parse()?);
        h.insert("keep-alive", "timeout=5".parse()?);
        h.insert(header::TRANSFER_ENCODING, "chunked".parse()?);
        h.insert("mcp-session-id", "abc".parse()?);
        h.insert(header::AUTHORIZATION, "Bearer t".parse()?);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "host", "mcp-session-id"]);
        Ok(())
    }
}
