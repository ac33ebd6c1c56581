//! Announcing pending approvals to a URL (`approvals.webhook_url`), signed.
//!
//! Every notice of the registry ([`super::Approvals::subscribe`]) is POSTed as JSON to the
//! configured `http` or `https` URL:
//!
//! - a call held for approval: `{"type":"approval.pending","approval":<Summary>}` (what
//!   `mcpwarden approvals list` shows of it: its id, caller, server, tool, argument keys…);
//! - its end, best effort: `{"type":"approval.closed","id":"<id>","outcome":"approved"}` (or
//!   `denied`, `timed_out`, `abandoned`). Deliveries run concurrently, so a receiver may see
//!   the `closed` of a short-lived approval before (or without) its `pending`.
//!
//! Each request carries
//!
//! - `content-type: application/json`;
//! - `x-mcpwarden-approval-id: <id>`;
//! - `x-mcpwarden-timestamp: <seconds since the Unix epoch>`, when the attempt was signed;
//! - `x-mcpwarden-signature: sha256=<hex>`, the lowercase hex HMAC-SHA256 under the shared
//!   secret of `<timestamp>.<id>.<body>`: the timestamp header's value, a dot, the id header's
//!   value, a dot and the body's bytes exactly as sent.
//!
//! A receiver recomputes the MAC over what it received and compares it in constant time,
//! and rejects a timestamp more than 5 minutes away from its own clock, in the past (a replay
//! of a recorded request, or a very late delivery) or in the future: [`verify`] does both.
//! Within those 5 minutes the same request may arrive more than once (a retry whose earlier
//! attempt did arrive): receivers should treat announcements as idempotent, by id.
//!
//! Delivery: a 2xx answer ends it; a connection error, no answer within 10 s, a 5xx or a 429
//! is retried after 0.5, 1, 2, 4 and 8 s (at most 6 attempts), each attempt signed afresh
//! with its own timestamp; any other answer (4xx, 3xx: redirects are not followed) gives up,
//! logged. A pending announcement is not (re)sent once its approval is no longer pending.
//! Each notice is delivered by its own task, at most 32 at a time; past that, notices are
//! dropped with a warning (the approvals themselves are unaffected: they are listed and
//! decided as ever). No proxy is used.
//!
//! An `https` receiver is verified against the host's trust store (rustls-native-certs:
//! /etc/ssl/certs, or `SSL_CERT_FILE` / `SSL_CERT_DIR`) plus the optional `ca_file` (PEM).
//!
//! The secret is read from `secret_file` once, at start (trailing whitespace and newlines
//! removed; a missing or empty file is an error). It is never logged: it is kept only as
//! ring's HMAC key, behind a `Debug` that prints nothing of it.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection, HttpConnector},
        Client,
    },
    rt::{TokioExecutor, TokioIo},
};
use ring::hmac;
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{broadcast, Semaphore},
};

use super::{Approvals, Notice};

/// `approvals.webhook_url` and its secret.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: http::Uri,
    /// A file holding the HMAC secret (never logged).
    pub secret_file: PathBuf,
    /// Extra trust roots (PEM) for an `https` receiver, besides the host's.
    pub ca_file: Option<PathBuf>,
}

/// The id of the approval announced.
pub const ID_HEADER: &str = "x-mcpwarden-approval-id";
/// When the attempt was signed, in seconds since the Unix epoch.
pub const TIMESTAMP_HEADER: &str = "x-mcpwarden-timestamp";
/// `sha256=<lowercase hex HMAC-SHA256(secret, timestamp "." id "." body)>`.
pub const SIGNATURE_HEADER: &str = "x-mcpwarden-signature";
/// How far a timestamp may be from the receiver's clock, either way.
pub const MAX_SKEW_S: u64 = 300;
/// Attempts per notice.
pub const MAX_ATTEMPTS: u32 = 6;
/// One attempt's bound: connecting, sending and receiving the status.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Notices being delivered at once; past it, new ones are dropped.
pub const MAX_IN_FLIGHT: usize = 32;
/// The wait before the first retry; doubled for each next one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How much of a receiver's answer is read (and thrown away) so its connection can be reused.
const MAX_ANSWER: usize = 64 * 1024;

/// Starts announcing `approvals`' notices to `settings.url`. The secret is read now: an
/// error names its file. The task ends when the registry is dropped.
pub fn spawn(approvals: Arc<Approvals>, settings: Settings) -> Result<tokio::task::JoinHandle<()>> {
    spawn_with(approvals, settings, FIRST_BACKOFF)
}

fn spawn_with(
    approvals: Arc<Approvals>,
    settings: Settings,
    first_backoff: Duration,
) -> Result<tokio::task::JoinHandle<()>> {
    let secret = Secret::read(&settings.secret_file)?;
    let client = client(&settings)?;
    // Subscribed before returning: nothing held from now on is missed.
    let notices = approvals.subscribe();
    let shown = shown(&settings.url);
    tracing::info!(url = %shown, "announcing pending approvals to a webhook");
    let sender = Arc::new(Sender {
        // Weak: the task must not keep the registry (and so its notices) alive.
        approvals: Arc::downgrade(&approvals),
        client,
        url: settings.url,
        shown,
        secret,
        first_backoff,
    });
    Ok(tokio::spawn(sender.run(notices)))
}

/// The `x-mcpwarden-signature` value of a request: `sha256=` and the lowercase hex
/// HMAC-SHA256 under `secret` of `<timestamp>.<id>.<body>`.
pub fn signature(secret: &[u8], timestamp: u64, id: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    signed(&key, &timestamp.to_string(), id, body)
}

fn signed(key: &hmac::Key, timestamp: &str, id: &str, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex(ctx.sign().as_ref()))
}

/// What a receiver checks: the `x-mcpwarden-signature` header (`signature_header`) is the MAC
/// under `secret` of the timestamp header's value, the id header's value and the body as
/// received (compared in constant time), and the timestamp is at most [`MAX_SKEW_S`] (300 s)
/// from `now_unix`, in the past (replays) or the future. Err: why not.
pub fn verify(
    secret: &[u8],
    timestamp_header: &str,
    id: &str,
    body: &[u8],
    signature_header: &str,
    now_unix: u64,
) -> Result<(), String> {
    if timestamp_header.is_empty()
        || timestamp_header.len() > 20
        || !timestamp_header.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "{TIMESTAMP_HEADER} is not a number of seconds: {timestamp_header:?}"
        ));
    }
    let timestamp: u64 = timestamp_header
        .parse()
        .map_err(|e| format!("{TIMESTAMP_HEADER} {timestamp_header:?}: {e}"))?;
    let age = now_unix.saturating_sub(timestamp);
    if age > MAX_SKEW_S {
        return Err(format!(
            "{TIMESTAMP_HEADER} is {age} s old (more than {MAX_SKEW_S} s): a replay or a \
             late delivery"
        ));
    }
    let ahead = timestamp.saturating_sub(now_unix);
    if ahead > MAX_SKEW_S {
        return Err(format!(
            "{TIMESTAMP_HEADER} is {ahead} s in the future (more than {MAX_SKEW_S} s)"
        ));
    }
    let mac = signature_header
        .strip_prefix("sha256=")
        .and_then(unhex)
        .filter(|m| m.len() == 32)
        .ok_or_else(|| format!("{SIGNATURE_HEADER} is not sha256=<64 hex digits>"))?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut message = Vec::with_capacity(timestamp_header.len() + id.len() + 2 + body.len());
    message.extend_from_slice(timestamp_header.as_bytes());
    message.push(b'.');
    message.extend_from_slice(id.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    hmac::verify(&key, &message, &mac)
        .map_err(|_| format!("{SIGNATURE_HEADER} does not match the request"))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The URL as logged: scheme, host, port and path; no user information, no query.
fn shown(url: &Uri) -> String {
    format!(
        "{}://{}{}{}",
        url.scheme_str().unwrap_or("?"),
        url.host().unwrap_or("?"),
        url.port().map(|p| format!(":{p}")).unwrap_or_default(),
        url.path()
    )
}

/// The shared secret, as ring's key only; its `Debug` shows nothing of it.
struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    fn read(path: &Path) -> Result<Secret> {
        let mut bytes = std::fs::read(path).with_context(|| {
            format!(
                "{}: cannot read the approvals webhook's secret file",
                path.display()
            )
        })?;
        while bytes.last().is_some_and(u8::is_ascii_whitespace) {
            bytes.pop();
        }
        if bytes.is_empty() {
            anyhow::bail!(
                "{}: the approvals webhook's secret file is empty",
                path.display()
            );
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        bytes.fill(0);
        Ok(Secret(key))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTP client for `settings.url`: plain TCP for `http`, rustls (ring) for `https`.
fn client(settings: &Settings) -> Result<Client<Connector, Full<Bytes>>> {
    let url = &settings.url;
    if url.host().is_none_or(str::is_empty) {
        anyhow::bail!("approvals webhook URL {url}: no host");
    }
    let tls = match url.scheme_str() {
        Some("http") => {
            if settings.ca_file.is_some() {
                tracing::warn!(url = %shown(url), "the approvals webhook's ca_file is unused: its URL is not https");
            }
            None
        }
        Some("https") => Some(tls(settings.ca_file.as_deref())?),
        _ => anyhow::bail!("approvals webhook URL {}: not http or https", shown(url)),
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(Connector { http, tls }))
}

/// The host's trust roots and `ca_file`'s.
fn tls(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "reading a system trust root failed");
    }
    for c in native.certs {
        // Some system bundles carry certificates webpki cannot use; skip those.
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let found: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("{}: cannot read the approvals webhook's CA", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not a PEM certificate bundle", path.display()))?;
        if found.is_empty() {
            anyhow::bail!("{}: holds no PEM certificate", path.display());
        }
        for c in found {
            roots
                .add(c)
                .with_context(|| format!("{}: a certificate unusable as a CA", path.display()))?;
        }
    }
    if roots.is_empty() {
        anyhow::bail!(
            "no trust roots for the https approvals webhook: the host has none; set its ca_file"
        );
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS client versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// TCP to the URL's host and port, then TLS if the URL is `https` (verified as its host).
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri.clone());
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            match (uri.scheme_str(), tls) {
                (Some("http"), _) => Ok(TokioIo::new(Stream::Plain(tcp))),
                (Some("https"), Some(tls)) => {
                    let host = uri.host().unwrap_or_default();
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let name = ServerName::try_from(host.to_owned())
                        .map_err(|e| format!("{host}: not a TLS server name: {e}"))?;
                    let tls = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
                    Ok(TokioIo::new(Stream::Tls(Box::new(tls))))
                }
                _ => Err(format!("{}: not the webhook's scheme", shown(&uri)).into()),
            }
        })
    }
}

/// A connection to the receiver.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One notice to deliver.
struct Delivery {
    id: String,
    /// `approval.pending`: not sent once the approval is no longer pending.
    pending: bool,
    body: Bytes,
}

impl Delivery {
    fn of(notice: &Notice) -> serde_json::Result<Delivery> {
        Ok(match notice {
            Notice::Pending(summary) => Delivery {
                id: summary.id.clone(),
                pending: true,
                body: serde_json::to_vec(&serde_json::json!({
                    "type": "approval.pending",
                    "approval": &**summary,
                }))?
                .into(),
            },
            Notice::Closed { id, outcome } => Delivery {
                id: id.clone(),
                pending: false,
                body: serde_json::to_vec(&serde_json::json!({
                    "type": "approval.closed",
                    "id": id,
                    "outcome": outcome,
                }))?
                .into(),
            },
        })
    }

    fn kind(&self) -> &'static str {
        if self.pending {
            "approval.pending"
        } else {
            "approval.closed"
        }
    }
}

/// How one attempt went.
enum Attempt {
    Delivered(StatusCode),
    /// Not to be retried.
    Refused(String),
    Retry(String),
}

struct Sender {
    approvals: Weak<Approvals>,
    client: Client<Connector, Full<Bytes>>,
    url: Uri,
    /// `url` as logged.
    shown: String,
    secret: Secret,
    first_backoff: Duration,
}

impl Sender {
    async fn run(self: Arc<Self>, mut notices: broadcast::Receiver<Notice>) {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let notice = match notices.recv().await {
                Ok(n) => n,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        url = %self.shown,
                        "approvals webhook fell behind: {missed} notices not announced"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let delivery = match Delivery::of(&notice) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "approvals webhook: a notice could not be encoded");
                    continue;
                }
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                tracing::warn!(
                    id = %delivery.id,
                    kind = delivery.kind(),
                    url = %self.shown,
                    "approvals webhook: {MAX_IN_FLIGHT} deliveries in flight; this one is dropped"
                );
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.deliver(delivery).await;
                drop(permit);
            });
        }
    }

    fn still_pending(&self, id: &str) -> bool {
        self.approvals
            .upgrade()
            .is_some_and(|a| a.get(id).is_some())
    }

    async fn deliver(&self, d: Delivery) {
        let mut backoff = self.first_backoff;
        for attempt in 1..=MAX_ATTEMPTS {
            if d.pending && !self.still_pending(&d.id) {
                tracing::debug!(id = %d.id, attempt, "approval no longer pending: not announced");
                return;
            }
            match self.attempt(&d).await {
                Attempt::Delivered(status) => {
                    tracing::debug!(id = %d.id, kind = d.kind(), attempt, %status, "approval announced");
                    return;
                }
                Attempt::Refused(why) => {
                    tracing::warn!(
                        id = %d.id,
                        kind = d.kind(),
                        url = %self.shown,
                        "approvals webhook refused the announcement ({why}); not retried"
                    );
                    return;
                }
                Attempt::Retry(why) if attempt == MAX_ATTEMPTS => {
                    tracing::warn!(
                        id = %d.id,
                        kind = d.kind(),
                        url = %self.shown,
                        "approvals webhook: giving up after {attempt} attempts ({why})"
                    );
                }
                Attempt::Retry(why) => {
                    tracing::debug!(
                        id = %d.id,
                        kind = d.kind(),
                        attempt,
                        url = %self.shown,
                        "approvals webhook attempt failed ({why}); retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    async fn attempt(&self, d: &Delivery) -> Attempt {
        let timestamp = unix_now().to_string();
        let signature = signed(&self.secret.0, &timestamp, &d.id, &d.body);
        let request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("mcpwarden/", env!("CARGO_PKG_VERSION")),
            )
            .header(ID_HEADER, d.id.as_str())
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(d.body.clone()));
        let request = match request {
            Ok(r) => r,
            Err(e) => return Attempt::Refused(format!("request not built: {e}")),
        };
        let response =
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Attempt::Retry(error_chain(&e)),
                Err(_) => return Attempt::Retry(format!("no answer in {ATTEMPT_TIMEOUT:?}")),
            };
        let status = response.status();
        // Read a little of the answer so the connection can be kept; what it says is unused.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            Limited::new(response.into_body(), MAX_ANSWER).collect(),
        )
        .await;
        if status.is_success() {
            Attempt::Delivered(status)
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Retry(format!("status {status}"))
        } else {
            Attempt::Refused(format!("status {status}"))
        }
    }
}

/// An error and its sources, on one line (hyper's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Mutex,
        },
        time::Instant,
    };

    use http::{HeaderMap, Response};
    use hyper::body::Incoming;
    use serde_json::{json, Value};
    use tokio::net::TcpListener;

    use super::*;
    use crate::approvals::{CallerSummary, HoldRequest, Summary};

    const SECRET: &[u8] = b"s3cret-value";

    /// A file under the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "mcpwarden-webhook-test-{}-{name}",
                std::process::id()
            ));
            std::fs::write(&path, contents).expect("temp file written");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Got {
        headers: HeaderMap,
        body: Bytes,
        status: u16,
    }

    impl Got {
        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("no {name} header"))
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
    }

    /// The receiver's state: what it got, how many more POSTs it answers 500, and what it does
    /// on the first one, before answering.
    struct Receiver {
        got: Mutex<Vec<Got>>,
        failures: AtomicUsize,
        on_first: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    /// A receiver on loopback (TLS if `tls`) answering 500 to the first `failures` POSTs and
    /// 200 after.
    async fn receiver(
        tls: Option<tokio_rustls::TlsAcceptor>,
        failures: usize,
        on_first: Option<Box<dyn FnOnce() + Send>>,
    ) -> (SocketAddr, Arc<Receiver>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bound");
        let addr = listener.local_addr().expect("address");
        let r = Arc::new(Receiver {
            got: Mutex::default(),
            failures: AtomicUsize::new(failures),
            on_first: Mutex::new(on_first),
        });
        let state = r.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (r, tls) = (state.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(tcp).await {
                                serve(s, r).await;
                            }
                        }
                        None => serve(tcp, r).await,
                    }
                });
            }
        });
        (addr, r)
    }

    async fn serve<S>(io: S, r: Arc<Receiver>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let r = r.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if let Some(f) = r.on_first.lock().unwrap().take() {
                    f();
                }
                let fail = parts.method == http::Method::POST
                    && r.failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                let status = if fail { 500 } else { 200 };
                r.got.lock().unwrap().push(Got {
                    headers: parts.headers,
                    body,
                    status,
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"ok")))
                        .expect("response"),
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    /// What the receiver got once `enough` says so (else panics after 10 s).
    async fn wait_until(r: &Receiver, enough: impl Fn(&[Got]) -> bool) -> Vec<(u16, Value)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let got = r.got.lock().unwrap();
                if enough(&got) {
                    return got.iter().map(|g| (g.status, g.json())).collect();
                }
                assert!(
                    Instant::now() < deadline,
                    "the receiver got only {:?}",
                    got.iter().map(|g| (g.status, g.json())).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn of_type(got: &[Got], kind: &str) -> usize {
        got.iter().filter(|g| g.json()["type"] == kind).count()
    }

    fn hold_request() -> HoldRequest {
        HoldRequest {
            summary: Summary {
                caller: CallerSummary {
                    cgroup_id: 10,
                    comm: "agent".to_owned(),
                    ..CallerSummary::default()
                },
                server: "payments".to_owned(),
                tool: "pay".to_owned(),
                arg_keys: vec!["amount".to_owned()],
                ..Summary::default()
            },
            caller_key: "pod:a".to_owned(),
            caller_user: None,
            caller_in_pod: false,
            request_id: "1".to_owned(),
            session: "session:s".to_owned(),
            timeout: None,
        }
    }

    fn settings(url: String, secret: &TempFile, ca: Option<&TempFile>) -> Settings {
        Settings {
            url: url.parse().expect("a URL"),
            secret_file: secret.0.clone(),
            ca_file: ca.map(|c| c.0.clone()),
        }
    }

    #[tokio::test]
    async fn announces_pending_approvals_signed_and_retries_after_a_5xx() {
        let (addr, rx) = receiver(None, 1, None).await;
        let secret = TempFile::new("announces", b"s3cret-value\n");
        let approvals = Approvals::new(crate::approvals::Settings::default());
        let task = spawn_with(
            approvals.clone(),
            settings(format!("http://{addr}/hook"), &secret, None),
            Duration::from_millis(50),
        )
        .expect("spawned");

        let held = approvals.hold(hold_request()).expect("held");
        let id = held.id().to_owned();
        let got = wait_until(&rx, |g| g.len() >= 2).await;
        assert_eq!(got[0].0, 500);
        assert_eq!(got[1].0, 200);

        {
            let got = rx.got.lock().unwrap();
            for g in got.iter() {
                assert_eq!(g.header("content-type"), "application/json");
                assert_eq!(g.header(ID_HEADER), id);
                let ts = g.header(TIMESTAMP_HEADER);
                let sig = g.header(SIGNATURE_HEADER);
                let t: u64 = ts.parse().expect("a number");
                assert_eq!(sig, signature(SECRET, t, &id, &g.body));
                assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
                assert_eq!(sig, sig.to_ascii_lowercase());
                verify(SECRET, ts, &id, &g.body, sig, unix_now()).expect("verifies");
                verify(SECRET, ts, &id, &g.body, sig, t + 300).expect("300 s old verifies");

                let mut tampered = g.body.to_vec();
                let mid = tampered.len() / 2;
                tampered[mid] ^= 1;
                let e = verify(SECRET, ts, &id, &tampered, sig, t).expect_err("tampered body");
                assert!(e.contains("does not match"), "{e}");
                assert!(verify(SECRET, ts, "other-id", &g.body, sig, t).is_err());
                assert!(verify(SECRET, &(t + 1).to_string(), &id, &g.body, sig, t).is_err());
                // The file's trailing newline is not part of the secret.
                assert!(verify(b"s3cret-value\n", ts, &id, &g.body, sig, t).is_err());
                let e = verify(SECRET, ts, &id, &g.body, sig, t + 301).expect_err("301 s old");
                assert!(e.contains("301 s old"), "{e}");
                assert!(verify(SECRET, ts, &id, &g.body, sig, t - 301).is_err());
                assert!(verify(SECRET, ts, &id, &g.body, &sig[7..], t).is_err());

                let v = g.json();
                assert_eq!(v["type"], "approval.pending");
                assert_eq!(v["approval"]["id"], id.as_str());
                assert_eq!(v["approval"]["tool"], "pay");
                assert_eq!(v["approval"]["server"], "payments");
                assert_eq!(v["approval"]["arg_keys"], json!(["amount"]));
            }
        }

        // Its end is announced too.
        drop(held);
        let got = wait_until(&rx, |g| g.len() >= 3).await;
        assert_eq!(
            got[2].1,
            json!({"type": "approval.closed", "id": id, "outcome": "abandoned"})
        );
        {
            let got = rx.got.lock().unwrap();
            let g = &got[2];
            assert_eq!(g.header(ID_HEADER), id);
            let (ts, sig) = (g.header(TIMESTAMP_HEADER), g.header(SIGNATURE_HEADER));
            verify(SECRET, ts, &id, &g.body, sig, unix_now()).expect("verifies");
        }
        assert_eq!(got.len(), 3, "{got:?}");

        // The task ends with the registry.
        drop(approvals);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ended")
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_pending_announcement_is_not_retried_once_no_longer_pending() {
        let approvals = Approvals::new(crate::approvals::Settings::default());
        let held: Arc<Mutex<Option<crate::approvals::Held>>> = Arc::default();
        let taken = held.clone();
        // The receiver fails everything; on the first announcement, before answering, the
        // call's client goes (its approval is closed).
        let (addr, rx) = receiver(
            None,
            usize::MAX,
            Some(Box::new(move || drop(taken.lock().unwrap().take()))),
        )
        .await;
        let secret = TempFile::new("not-retried", b"s3cret-value");
        let _task = spawn_with(
            approvals.clone(),
            settings(format!("http://{addr}/"), &secret, None),
            Duration::from_millis(50),
        )
        .expect("spawned");
        {
            // Held under the lock: the receiver cannot look before the call is in place.
            let mut slot = held.lock().unwrap();
            *slot = Some(approvals.hold(hold_request()).expect("held"));
        }

        // The closed notice is retried (after 50 and 100 ms); the pending one, whose retry was
        // due 50 ms after its first attempt, is not.
        let got = wait_until(&rx, |g| of_type(g, "approval.closed") >= 3).await;
        let pending = got
            .iter()
            .filter(|(_, v)| v["type"] == "approval.pending")
            .count();
        assert_eq!(pending, 1, "{got:?}");
        assert_eq!(got[0].1["type"], "approval.pending");
        assert!(got.iter().all(|(status, _)| *status == 500));
        assert!(held.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn delivers_to_https_with_its_ca_file() {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.into())
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (addr, rx) = receiver(Some(acceptor), 0, None).await;
        let ca = TempFile::new("https-ca.pem", cert.pem().as_bytes());
        let secret = TempFile::new("https-secret", b"s3cret-value\r\n\t ");
        let approvals = Approvals::new(crate::approvals::Settings::default());
        let _task = spawn(
            approvals.clone(),
            settings(format!("https://{addr}/hook"), &secret, Some(&ca)),
        )
        .expect("spawned");
        let held = approvals.hold(hold_request()).expect("held");
        let got = wait_until(&rx, |g| !g.is_empty()).await;
        assert_eq!(got[0].0, 200);
        assert_eq!(got[0].1["approval"]["id"], held.id());
        let got = rx.got.lock().unwrap();
        let g = &got[0];
        verify(
            SECRET,
            g.header(TIMESTAMP_HEADER),
            held.id(),
            &g.body,
            g.header(SIGNATURE_HEADER),
            unix_now(),
        )
        .expect("verifies");
    }

    #[tokio::test]
    async fn spawn_fails_clearly_without_a_secret() {
        let approvals = Approvals::new(crate::approvals::Settings::default());
        let missing = std::env::temp_dir().join(format!(
            "mcpwarden-webhook-test-{}-missing",
            std::process::id()
        ));
        let e = spawn(
            approvals.clone(),
            Settings {
                url: "http://127.0.0.1:9/".parse().expect("URL"),
                secret_file: missing.clone(),
                ca_file: None,
            },
        )
        .expect_err("no secret file");
        let e = format!("{e:#}");
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(e.contains("secret file"), "{e}");

        let empty = TempFile::new("empty", b" \n\n");
        let e = spawn(
            approvals.clone(),
            settings("http://127.0.0.1:9/".to_owned(), &empty, None),
        )
        .expect_err("empty secret file");
        let e = format!("{e:#}");
        assert!(e.contains(&empty.0.display().to_string()), "{e}");
        assert!(e.contains("empty"), "{e}");

        let secret = TempFile::new("bad-scheme", b"s3cret-value");
        let e = spawn(
            approvals,
            settings("ftp://127.0.0.1/".to_owned(), &secret, None),
        )
        .expect_err("not http");
        assert!(format!("{e:#}").contains("not http or https"), "{e:#}");
    }

    #[test]
    fn the_secret_is_not_in_debug_output() {
        let file = TempFile::new("debug", b"s3cret-value\n");
        let secret = Secret::read(&file.0).expect("read");
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        // The secret read is the file's bytes without the newline.
        let sig = signature(SECRET, 1, "id", b"{}");
        assert_eq!(signed(&secret.0, "1", "id", b"{}"), sig);
        assert_ne!(signature(b"s3cret-value\n", 1, "id", b"{}"), sig);
    }
}
