//! TLS for the bench (rustls, ring provider): the responder's server config, the clients' config
//! (load generator and handshake timer), the PEM files nginx reads, and the `handshake`
//! subcommand, which times fresh TCP + TLS handshakes one at a time.
//!
//! Every client offers ALPN `http/1.1` only and never resumes a session: the latency scenario
//! compares HTTP/1.1 on every route (nginx speaks HTTP/1.1 to its upstream), and every timed
//! handshake is a full one (certificate, signature, key exchange), the cost a minted leaf adds to.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::probe::close_rst;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rustls::{
    client::Resumption, crypto::CryptoProvider, ClientConfig, ClientConnection, RootCertStore,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Write a certificate chain (PEM) and its key (PKCS#8 PEM) for nginx and the responder.
pub fn write_cert_files(
    chain: &[CertificateDer<'_>],
    key: &PrivateKeyDer<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<()> {
    let certs: String = chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect();
    std::fs::write(cert_path, certs).with_context(|| format!("writing {}", cert_path.display()))?;
    let key = pem::encode(&pem::Pem::new("PRIVATE KEY", key.secret_der().to_vec()));
    std::fs::write(key_path, key).with_context(|| format!("writing {}", key_path.display()))?;
    Ok(())
}

/// The responder's server config: the certificate in `cert` (chain PEM) and `key`, offering
/// h2 and http/1.1 like a real MCP server behind TLS.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the responder's certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting only the CA certificates in `ca_file`, offering http/1.1, with
/// session resumption off (every handshake is a full one).
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?
    {
        roots
            .add(cert.with_context(|| format!("reading {}", ca_file.display()))?)
            .with_context(|| format!("a CA certificate in {}", ca_file.display()))?;
    }
    if roots.is_empty() {
        bail!("no CA certificate in {}", ca_file.display());
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// How a load generator or handshake timer reaches a TLS server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientTls {
    /// SNI, and the name the certificate must be valid for.
    pub sni: String,
    /// The only CA trusted: the bench CA (direct, nginx) or the agent's (mcpwarden), so a
    /// handshake that succeeds proves which of them answered.
    pub ca_file: PathBuf,
}

/// One handshake target: where to connect and which name to ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub target: SocketAddr,
    pub sni: String,
}

/// `handshake --spec JSON`: `rounds` times, one fresh handshake per step in order; the first
/// `warmup` rounds are not measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandshakeSpec {
    pub steps: Vec<Step>,
    pub ca_file: PathBuf,
    pub rounds: u64,
    pub warmup: u64,
}

/// Latencies in microseconds, from connect() to the client's handshake completing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandshakeResult {
    pub handshakes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
    /// Each measured handshake in order (only for runs of at most [`MAX_EACH`]).
    pub each_us: Vec<f64>,
}

/// Runs longer than this report percentiles only.
pub const MAX_EACH: u64 = 1_000;

/// One handshake: connect, handshake (timed); then a clean close (not timed): close_notify,
/// and wait for the server to close, so that it has finished with this connection (read the
/// client's Finished, sent its tickets, torn down) before the next one starts.
fn handshake_once(config: &Arc<ClientConfig>, step: &Step) -> Result<Duration> {
    let name = ServerName::try_from(step.sni.clone())
        .with_context(|| format!("{:?} is not a server name", step.sni))?;
    let started = Instant::now();
    let mut sock =
        TcpStream::connect(step.target).with_context(|| format!("connect {}", step.target))?;
    sock.set_nodelay(true)?;
    let mut conn = ClientConnection::new(config.clone(), name)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .with_context(|| format!("TLS handshake with {} for {}", step.target, step.sni))?;
    }
    // The client's Finished is queued, not yet sent: a client sends it before using the
    // connection.
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    let took = started.elapsed();
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    // The server's tickets, its close_notify, then EOF (or an error: either way it is done).
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let _ = sock.flush();
    close_rst(sock);
    Ok(took)
}

pub fn handshakes(spec: &HandshakeSpec) -> Result<HandshakeResult> {
    let config = client_config(&spec.ca_file)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    let measured = spec.rounds.saturating_sub(spec.warmup) * spec.steps.len() as u64;
    let mut each = Vec::new();
    for round in 0..spec.rounds {
        for step in &spec.steps {
            let took = handshake_once(&config, step)?;
            if round >= spec.warmup {
                let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
                hist.saturating_record(ns.max(1));
                if measured <= MAX_EACH {
                    each.push(ns as f64 / 1000.0);
                }
            }
        }
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(HandshakeResult {
        handshakes: hist.len(),
        p50_us: us(hist.value_at_quantile(0.5)),
        p99_us: us(hist.value_at_quantile(0.99)),
        mean_us: hist.mean() / 1000.0,
        max_us: us(hist.max()),
        each_us: each,
    })
}
