//! The load generator: MCP Streamable HTTP `tools/call` requests with unique ids over keep-alive
//! HTTP/1.1 connections (hyper; over TLS when the spec says so, the handshake done before any
//! call is timed), latency recorded per call in an HDR histogram.
//!
//! Two shapes of load:
//! - closed loop: each connection sends its next call as soon as the previous answer is read
//!   (one connection → unloaded latency; many → saturation throughput);
//! - open loop: calls leave at a fixed total rate spread evenly over the connections, whatever
//!   the answers do. Latency is measured from the moment a call is sent; tokio's timer has
//!   millisecond granularity, so measuring from the scheduled instant would add timer lag to
//!   every sample. `late` counts calls that left more than one interval behind schedule: when it
//!   is not zero the path could not keep the rate and the figures say so.
//!
//! Every answer is checked (HTTP 200 and the JSON-RPC id echoed back): an error is counted, never
//! timed as a success.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::tls::ClientTls;

/// The tool every call names; the agent's bench policy allows it.
pub const TOOL: &str = "echo";
/// The endpoint path the responder serves and the agent is configured with.
pub const PATH: &str = "/mcp";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    Closed,
    /// Total calls per second over all connections.
    Open {
        rate: f64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// The Host header (the endpoint's authority, as a real client would send).
    pub host: String,
    pub conns: usize,
    pub shape: Shape,
    /// Calls per connection sent before measuring (connection set-up, caches, pools).
    pub warmup: u64,
    /// Stop after this many measured calls in total…
    pub max_calls: u64,
    /// …or after this long, whichever comes first.
    pub duration: Duration,
    /// Speak TLS (HTTP/1.1 inside) to the target.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// What one run measured. Latencies in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub calls: u64,
    pub errors: u64,
    pub late: u64,
    pub elapsed_s: f64,
    pub calls_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// A tools/call body with a unique id and a realistic small argument object.
pub fn call_body(id: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{TOOL}","arguments":{{"text":"benchmark payload {id}","repeat":1}}}}}}"#
    ))
}

/// Opens keep-alive HTTP/1.1 connections to one target, over TLS or not.
#[derive(Clone)]
pub struct Dialer {
    target: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    pub fn new(target: SocketAddr, tls: Option<&ClientTls>) -> Result<Dialer> {
        let tls = match tls {
            None => None,
            Some(t) => Some((
                tokio_rustls::TlsConnector::from(crate::tls::client_config(&t.ca_file)?),
                ServerName::try_from(t.sni.clone())
                    .with_context(|| format!("{:?} is not a server name", t.sni))?,
            )),
        };
        Ok(Dialer { target, tls })
    }

    /// Open one keep-alive HTTP/1.1 connection (TLS handshake included).
    pub async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let target = self.target;
        let stream = TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        match &self.tls {
            None => handshake(TokioIo::new(stream)).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), stream)
                    .await
                    .with_context(|| format!("TLS handshake with {target} for {name:?}"))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }
}

async fn handshake<IO>(io: TokioIo<IO>) -> Result<SendRequest<Full<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Send one call and check its answer.
pub async fn call(sender: &mut SendRequest<Full<Bytes>>, host: &str, id: u64) -> Result<()> {
    sender.ready().await.context("connection closed")?;
    let req = http::Request::post(PATH)
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .body(Full::new(call_body(id)))?;
    let resp = sender.send_request(req).await.context("sending a call")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).context("answer is not JSON")?;
    if answer["id"].as_u64() != Some(id) || answer.get("result").is_none() {
        bail!("unexpected answer to call {id}: {answer}");
    }
    Ok(())
}

struct ConnOutcome {
    hist: Histogram<u64>,
    errors: u64,
    late: u64,
    first_error: Option<String>,
}

/// Run `spec` on the current tokio runtime.
pub async fn run(spec: &LoadSpec) -> Result<LoadResult> {
    let dialer = Dialer::new(spec.target, spec.tls.as_ref())?;
    let mut senders = Vec::with_capacity(spec.conns);
    for _ in 0..spec.conns {
        senders.push(dialer.connect().await?);
    }
    // Warm-up: every connection carries a few calls before the clock starts.
    let mut id_base = 1u64;
    for sender in &mut senders {
        for _ in 0..spec.warmup {
            call(sender, &spec.host, id_base).await?;
            id_base += 1;
        }
    }
    let per_conn_max = spec.max_calls.div_ceil(spec.conns as u64).max(1);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut sender) in senders.into_iter().enumerate() {
        let host = spec.host.clone();
        let dialer = dialer.clone();
        let shape = spec.shape;
        let conns = spec.conns as f64;
        // Ids never repeat across connections or runs of one process.
        let first_id = id_base + (i as u64) * 1_000_000_000;
        tasks.spawn(async move {
            let mut out = ConnOutcome {
                hist: Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("histogram: {e}"))?,
                errors: 0,
                late: 0,
                first_error: None,
            };
            let interval = match shape {
                Shape::Open { rate } => Some(Duration::from_secs_f64(conns / rate)),
                Shape::Closed => None,
            };
            let offset = match shape {
                Shape::Open { rate } => Duration::from_secs_f64(i as f64 / rate),
                Shape::Closed => Duration::ZERO,
            };
            for k in 0..per_conn_max {
                if let Some(interval) = interval {
                    let due = start + offset + interval.mul_f64(k as f64);
                    if due >= deadline {
                        break;
                    }
                    let now = Instant::now();
                    if now < due {
                        tokio::time::sleep_until(due.into()).await;
                    } else if now > due + interval {
                        out.late += 1;
                    }
                } else if Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                match call(&mut sender, &host, first_id + k).await {
                    Ok(()) => {
                        let ns = sent.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                        out.hist.saturating_record(ns.max(1));
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A broken connection would fail every later call at once; reopen it.
                        if let Ok(s) = dialer.connect().await {
                            sender = s;
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    let (mut errors, mut late, mut first_error) = (0, 0, None);
    while let Some(joined) = tasks.join_next().await {
        let out = joined.context("load task panicked")??;
        hist.add(&out.hist)
            .map_err(|e| anyhow::anyhow!("merging histograms: {e}"))?;
        errors += out.errors;
        late += out.late;
        first_error = first_error.or(out.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        eprintln!("mcpwarden-bench: {errors} call(s) failed; first: {e}");
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(LoadResult {
        calls: hist.len(),
        errors,
        late,
        elapsed_s: elapsed,
        calls_per_s: hist.len() as f64 / elapsed,
        p50_us: us(hist.value_at_quantile(0.50)),
        p99_us: us(hist.value_at_quantile(0.99)),
        p999_us: us(hist.value_at_quantile(0.999)),
        max_us: us(hist.max()),
        mean_us: hist.mean() / 1000.0,
    })
}

/// Open `conns` connections, make one call on each, report, and hold them open until stdin
/// closes (the memory scenario measures the agent while they are open).
pub async fn hold(target: SocketAddr, host: &str, conns: usize) -> Result<()> {
    let dialer = Dialer::new(target, None)?;
    let mut senders = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s = dialer.connect().await?;
        call(&mut s, host, i as u64 + 1).await?;
        senders.push(s);
    }
    println!("holding {conns}");
    let mut line = String::new();
    // Blocks until the orchestrator closes our stdin.
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
        .await
        .context("waiting for stdin")??;
    drop(senders);
    Ok(())
}
