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
//!
//! A call is either `echo`, answered with one JSON body, or `progress` ([`Call::Progress`]),
//! answered with an SSE stream of progress notifications and then the result; its latency runs
//! until the stream ends, and every event is checked (scenario 7a). [`hold`] opens idle
//! connections or idle standalone SSE streams for the memory scenarios (4 and 7b).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::{
    responder::{PRIMING, PROGRESS_TOOL},
    tls::ClientTls,
};

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
    /// Closed loop, each call on a connection of its own: connect, one call, close (as many
    /// MCP clients work). Timed from `connect()` until the answer is read; the close is not.
    ConnPerCall,
}

/// What each call asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub enum Call {
    /// tools/call `echo`: one `application/json` answer.
    #[default]
    Echo,
    /// tools/call `progress`: a `text/event-stream` answer of `steps` progress notifications and
    /// then the result, read to the end of the stream.
    Progress { steps: u64 },
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
    /// The call every request makes.
    #[serde(default)]
    pub call: Call,
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

/// A tools/call body with a unique id and a realistic small argument object; a `progress` call
/// asks for progress notifications with its id as the token, as MCP SDK clients do.
pub fn call_body(id: u64, call: Call) -> Bytes {
    Bytes::from(match call {
        Call::Echo => format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{TOOL}","arguments":{{"text":"benchmark payload {id}","repeat":1}}}}}}"#
        ),
        Call::Progress { steps } => format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{PROGRESS_TOOL}","arguments":{{"text":"benchmark payload {id}","steps":{steps}}},"_meta":{{"progressToken":{id}}}}}}}"#
        ),
    })
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
        Ok(self.connect_owned().await?.0)
    }

    /// [`Dialer::connect`], with the task that drives the connection: it ends when the
    /// connection is closed (the sender dropped, the server gone).
    pub async fn connect_owned(
        &self,
    ) -> Result<(SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>)> {
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

async fn handshake<IO>(
    io: TokioIo<IO>,
) -> Result<(SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .context("HTTP/1.1 handshake")?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

/// Send one call and check its answer (for `progress`, every event of the stream).
pub async fn call(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &str,
    id: u64,
    call: Call,
) -> Result<()> {
    sender.ready().await.context("connection closed")?;
    let req = http::Request::post(PATH)
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .body(Full::new(call_body(id, call)))?;
    let resp = sender.send_request(req).await.context("sending a call")?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    match call {
        Call::Echo => check_result(&body, id),
        Call::Progress { steps } => {
            if !content_type.starts_with("text/event-stream") {
                bail!("call {id}: the answer is {content_type:?}, not an SSE stream");
            }
            check_progress(&body, id, steps)
        }
    }
}

/// Connect, make one call, close: how long from `connect()` until the answer was read. The
/// connection is closed (FIN, as a client that is done closes it) before this returns, untimed,
/// so the next call does not overlap this one's teardown.
async fn call_on_own_connection(
    dialer: &Dialer,
    host: &str,
    id: u64,
    what: Call,
) -> Result<Duration> {
    let start = Instant::now();
    let (mut sender, conn) = dialer.connect_owned().await?;
    call(&mut sender, host, id, what).await?;
    let took = start.elapsed();
    drop(sender);
    // The connection task ends once hyper has shut the socket down.
    let _ = conn.await;
    Ok(took)
}

/// `data` is the JSON-RPC result for `id`.
fn check_result(data: &[u8], id: u64) -> Result<()> {
    let answer: serde_json::Value = serde_json::from_slice(data).context("answer is not JSON")?;
    if answer["id"].as_u64() != Some(id) || answer.get("result").is_none() {
        bail!("unexpected answer to call {id}: {answer}");
    }
    Ok(())
}

/// `body` is `steps` progress notifications for token `id`, in order, then the result for `id`.
fn check_progress(body: &[u8], id: u64, steps: u64) -> Result<()> {
    let events = sse_events(body)?;
    let Some((result, progress)) = events.split_last() else {
        bail!("call {id}: the SSE stream carried no event");
    };
    if progress.len() as u64 != steps {
        bail!(
            "call {id}: {} events before the last, not {steps} progress notifications",
            progress.len()
        );
    }
    for (i, data) in progress.iter().enumerate() {
        let n: serde_json::Value = serde_json::from_str(data)
            .with_context(|| format!("call {id}: event {i} is not JSON: {data:?}"))?;
        let p = &n["params"];
        if n["method"] != "notifications/progress"
            || p["progressToken"].as_u64() != Some(id)
            || p["progress"].as_u64() != Some(i as u64 + 1)
            || p["total"].as_u64() != Some(steps)
        {
            bail!(
                "call {id}: event {i} is not progress {} of {steps}: {data}",
                i + 1
            );
        }
    }
    check_result(result.as_bytes(), id)
}

/// The data of each event of an SSE stream (its `data` lines joined by `\n`); comments, other
/// fields and an unterminated last event are skipped, as an EventSource would.
pub fn sse_events(body: &[u8]) -> Result<Vec<String>> {
    let text = std::str::from_utf8(body).context("the SSE stream is not UTF-8")?;
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
    }
    Ok(events)
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
    let per_call = spec.shape == Shape::ConnPerCall;
    let mut senders = Vec::with_capacity(spec.conns);
    for _ in 0..spec.conns {
        senders.push(if per_call {
            None
        } else {
            Some(dialer.connect().await?)
        });
    }
    // Warm-up: every connection carries a few calls before the clock starts (each on a
    // connection of its own when that is the shape).
    let mut id_base = 1u64;
    for sender in &mut senders {
        for _ in 0..spec.warmup {
            match sender {
                Some(s) => call(s, &spec.host, id_base, spec.call).await?,
                None => {
                    call_on_own_connection(&dialer, &spec.host, id_base, spec.call).await?;
                }
            }
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
        let what = spec.call;
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
                Shape::Closed | Shape::ConnPerCall => None,
            };
            let offset = match shape {
                Shape::Open { rate } => Duration::from_secs_f64(i as f64 / rate),
                Shape::Closed | Shape::ConnPerCall => Duration::ZERO,
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
                let done = match &mut sender {
                    Some(s) => call(s, &host, first_id + k, what)
                        .await
                        .map(|()| sent.elapsed()),
                    None => call_on_own_connection(&dialer, &host, first_id + k, what).await,
                };
                match done {
                    Ok(took) => {
                        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
                        out.hist.saturating_record(ns.max(1));
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A broken connection would fail every later call at once; reopen it.
                        if sender.is_some() {
                            if let Ok(s) = dialer.connect().await {
                                sender = Some(s);
                            }
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
        call(&mut s, host, i as u64 + 1, Call::Echo).await?;
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

/// Streams [`hold_sse`] opens at a time.
const OPEN_AT_ONCE: usize = 64;
/// [`hold_sse`] gives up when one stream takes longer than this to open…
const OPEN_ONE: Duration = Duration::from_secs(10);
/// …or all of them longer than this.
const OPEN_DEADLINE: Duration = Duration::from_secs(120);

/// Open `streams` standalone SSE streams (GET with `Accept: text/event-stream`), one per
/// connection and [`OPEN_AT_ONCE`] at a time, each counted once its priming comment has
/// arrived; print `holding N` and hold them idle until stdin closes, then print
/// `released N, K ended early` (a stream that ended or failed while held was not held).
pub async fn hold_sse(target: SocketAddr, host: &str, streams: usize) -> Result<()> {
    let dialer = Dialer::new(target, None)?;
    let ended = Arc::new(AtomicUsize::new(0));
    let mut held = tokio::task::JoinSet::new();
    let mut opening = tokio::task::JoinSet::new();
    let deadline = tokio::time::Instant::now() + OPEN_DEADLINE;
    let (mut started, mut opened) = (0, 0);
    while opened < streams {
        while started < streams && opening.len() < OPEN_AT_ONCE {
            let (dialer, host) = (dialer.clone(), host.to_owned());
            opening.spawn(async move {
                tokio::time::timeout(OPEN_ONE, open_stream(&dialer, &host))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "no 200 text/event-stream with the priming comment within {OPEN_ONE:?}"
                        )
                    })?
            });
            started += 1;
        }
        let next = tokio::time::timeout_at(deadline, opening.join_next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{opened} of {streams} SSE streams opened in {OPEN_DEADLINE:?}: giving up"
                )
            })?;
        let (sender, mut body) = next
            .context("no stream is opening")?
            .context("opening task panicked")?
            .with_context(|| format!("opening SSE stream {}", opened + 1))?;
        opened += 1;
        let ended = ended.clone();
        held.spawn(async move {
            let _sender = sender;
            // Idle: whatever arrives (the end, an error, an event) means it was not.
            let _ = body.frame().await;
            ended.fetch_add(1, Ordering::Relaxed);
        });
    }
    println!("holding {streams}");
    let mut line = String::new();
    // Blocks until the orchestrator closes our stdin.
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
        .await
        .context("waiting for stdin")??;
    println!(
        "released {streams}, {} ended early",
        ended.load(Ordering::Relaxed)
    );
    held.abort_all();
    Ok(())
}

/// One standalone SSE stream, opened: 200 `text/event-stream` and the server's priming comment.
async fn open_stream(dialer: &Dialer, host: &str) -> Result<(SendRequest<Full<Bytes>>, Incoming)> {
    let mut sender = dialer.connect().await?;
    sender.ready().await.context("connection closed")?;
    let req = http::Request::get(PATH)
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await.context("sending the GET")?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if status != http::StatusCode::OK || !content_type.starts_with("text/event-stream") {
        bail!("the GET was answered HTTP {status} {content_type:?}, not an SSE stream");
    }
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !seen.ends_with(b"\n\n") {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    seen.extend_from_slice(data);
                }
            }
            Some(Err(e)) => return Err(e).context("reading the stream's first event"),
            None => bail!("the SSE stream ended before its first event"),
        }
    }
    if seen != PRIMING.as_bytes() {
        bail!(
            "the SSE stream began with {:?}, not the priming comment",
            String::from_utf8_lossy(&seen)
        );
    }
    Ok((sender, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responder::{progress_events, result_for};

    fn responder_stream(id: u64, steps: u64) -> Vec<u8> {
        let id = serde_json::json!(id);
        progress_events(&id, steps, &result_for(&id))
            .iter()
            .flat_map(|b| b.to_vec())
            .collect()
    }

    #[test]
    fn the_responders_progress_stream_passes_the_check() {
        check_progress(&responder_stream(7, 5), 7, 5).unwrap();
        check_progress(&responder_stream(7, 0), 7, 0).unwrap();
    }

    #[test]
    fn a_stream_missing_reordering_or_misattributing_events_fails() {
        let events = sse_events(&responder_stream(7, 3)).unwrap();
        let join = |evs: &[&String]| -> Vec<u8> {
            evs.iter()
                .flat_map(|e| format!("data: {e}\n\n").into_bytes())
                .collect()
        };
        let [a, b, c, r] = [&events[0], &events[1], &events[2], &events[3]];
        assert!(check_progress(&join(&[a, b, c, r]), 7, 3).is_ok());
        assert!(check_progress(&join(&[a, b, r]), 7, 3).is_err());
        assert!(check_progress(&join(&[b, a, c, r]), 7, 3).is_err());
        assert!(check_progress(&join(&[a, b, c]), 7, 3).is_err());
        assert!(check_progress(&join(&[a, b, c, r]), 8, 3).is_err());
        assert!(check_progress(&join(&[a, b, r, c]), 7, 3).is_err());
    }

    #[test]
    fn sse_events_reads_data_lines_and_skips_the_rest() {
        let body = b": comment\r\nevent: message\r\nid: 1\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n\ndata: x\n\ndata: unterminated";
        assert_eq!(sse_events(body).unwrap(), vec!["{\"a\":\n1}", "x"]);
        assert!(sse_events(b": only a comment\n\n").unwrap().is_empty());
    }
}
