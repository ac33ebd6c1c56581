//! Real MCP wire captures, parsed and served again.
//!
//! A capture (`tests/fixtures/mcp-wire/*.txt`) is what an MCP client and server wrote to each
//! other on loopback, as read from the sockets. After a header of `#` comment lines, it is a
//! sequence of blocks, each a marker line then the bytes as read, then one `\n` that is not
//! part of the bytes:
//!
//! ```text
//! >>> conn N c2s        (client to server on TCP connection N)
//! <<< conn N s2c        (server to client on connection N)
//! ```
//!
//! [`Capture::parse`] joins the blocks of each connection and direction, and reads them as
//! HTTP/1.1: requests (method, target, headers, body with chunked coding removed) and their
//! responses (status, headers, body with chunked coding removed; for `text/event-stream`
//! bodies, every event with its exact bytes). The k-th response on a connection answers its
//! k-th request; exchanges are ordered by the block where their request starts.
//!
//! [`ReplayServer`] answers each incoming request with the captured response of the matching
//! captured request (same method, same path without its query, same JSON-RPC `method` and
//! `id`), headers and bytes as captured (session ids included, so a client that replays the
//! captured requests is served consistently). Framing is hyper's: `Content-Length` for whole
//! bodies, chunked for SSE streams, whose events are written one by one with their captured
//! bytes. Streams:
//! - a captured GET whose SSE answer starts with an `endpoint` event is a 2024-11-05 HTTP+SSE
//!   stream: the events that answer no request (the endpoint) are written when it opens; each
//!   later request whose JSON-RPC id a stream event answers gets its captured response (`202
//!   Accepted`) and, right after, those events on the open stream;
//! - any other GET with an SSE answer (a Streamable HTTP standalone stream) writes its captured
//!   events and is held open until a DELETE arrives (the session ends) or the server stops;
//! - SSE answers to POSTs write their events and end.
//!
//! A request that matches nothing gets `404` with a text body saying so. Everything received is
//! recorded ([`ReplayServer::requests`]). Hyper 1, HTTP/1.1, plain TCP, on its own tokio
//! runtime thread; stops on drop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{channel::Channel, combinators::BoxBody, BodyExt, Full};
use serde_json::Value;

use crate::peer::PeerRequest;
use crate::sse::{SseEvent, SseParser};
use crate::ServerThread;

// ---------------------------------------------------------------------------------------------
// The capture format.

/// Which way a block's bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

/// One block of a capture: bytes read on connection `conn` in direction `dir`.
#[derive(Debug, Clone)]
pub struct Block {
    pub conn: u32,
    pub dir: Dir,
    pub bytes: Vec<u8>,
}

/// A marker line (without its `\n`): `>>> conn N c2s` or `<<< conn N s2c`.
fn marker(line: &[u8]) -> Option<(u32, Dir)> {
    let line = std::str::from_utf8(line).ok()?;
    let (dir, rest) = if let Some(r) = line.strip_prefix(">>> conn ") {
        (Dir::ClientToServer, r.strip_suffix(" c2s")?)
    } else if let Some(r) = line.strip_prefix("<<< conn ") {
        (Dir::ServerToClient, r.strip_suffix(" s2c")?)
    } else {
        return None;
    };
    Some((rest.parse().ok()?, dir))
}

/// The header comments (without `# `) and the blocks of a capture.
pub fn parse_blocks(text: &[u8]) -> Result<(Vec<String>, Vec<Block>), String> {
    // Marker lines: (start of the line, end of the line including its `\n`, conn, dir).
    let mut markers = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let end = text[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |i| start + i + 1);
        let line = text[start..end]
            .strip_suffix(b"\n")
            .unwrap_or(&text[start..end]);
        if let Some((conn, dir)) = marker(line) {
            markers.push((start, end, conn, dir));
        }
        start = end;
    }
    let first = markers
        .first()
        .map(|m| m.0)
        .ok_or("no `>>> conn N c2s` / `<<< conn N s2c` block")?;
    let mut comments = Vec::new();
    for line in String::from_utf8_lossy(&text[..first]).lines() {
        if let Some(c) = line.strip_prefix('#') {
            comments.push(c.strip_prefix(' ').unwrap_or(c).to_string());
        } else if !line.trim().is_empty() {
            return Err(format!("text before the first block: {line:?}"));
        }
    }
    let mut blocks = Vec::with_capacity(markers.len());
    for (i, &(line_start, line_end, conn, dir)) in markers.iter().enumerate() {
        let next = markers.get(i + 1).map_or(text.len(), |m| m.0);
        let bytes = text[line_end..next].strip_suffix(b"\n").ok_or_else(|| {
            format!("the block at byte {line_start} does not end with the separating newline")
        })?;
        blocks.push(Block {
            conn,
            dir,
            bytes: bytes.to_vec(),
        });
    }
    Ok((comments, blocks))
}

/// One SSE event of a captured stream: its exact bytes (up to and including the blank line
/// that ends it) and what it says (`None`: a block with only comments).
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub raw: Vec<u8>,
    pub parsed: Option<SseEvent>,
}

impl RawEvent {
    /// The JSON-RPC message the event carries, if any.
    pub fn json(&self) -> Option<Value> {
        self.parsed.as_ref().and_then(SseEvent::json)
    }

    /// The id of the JSON-RPC response (not request or notification) the event carries.
    pub fn answers(&self) -> Option<Value> {
        let msg = self.json()?;
        let is_answer = msg.get("method").is_none()
            && (msg.get("result").is_some() || msg.get("error").is_some());
        is_answer.then(|| msg.get("id").cloned()).flatten()
    }
}

/// Split an SSE body into its events (their exact bytes). Lines end in CRLF, LF or CR; an
/// event ends at a blank line. Bytes after the last blank line (an unfinished event) are left
/// out.
pub fn split_events(body: &[u8]) -> Vec<RawEvent> {
    let mut out = Vec::new();
    let mut event_start = 0;
    let mut line_start = 0;
    let mut i = 0;
    while i < body.len() {
        let end_of_line = match body[i] {
            b'\r' if body.get(i + 1) == Some(&b'\n') => Some(i + 2),
            b'\r' | b'\n' => Some(i + 1),
            _ => None,
        };
        let Some(next) = end_of_line else {
            i += 1;
            continue;
        };
        if i == line_start {
            let raw = body[event_start..next].to_vec();
            let parsed = SseParser::new().push(&raw).into_iter().next();
            out.push(RawEvent { raw, parsed });
            event_start = next;
        }
        line_start = next;
        i = next;
    }
    out
}

/// A captured HTTP request.
#[derive(Debug, Clone)]
pub struct CapturedRequest {
    pub method: String,
    /// Path and query as sent, e.g. `/messages/?session_id=…`.
    pub target: String,
    /// As captured (names in their captured case), in order.
    pub headers: Vec<(String, String)>,
    /// Chunked coding removed.
    pub body: Vec<u8>,
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl CapturedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The target without its query.
    pub fn path(&self) -> &str {
        path_of(&self.target)
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The JSON-RPC `method` and `id` of the body (both `None` without a JSON-RPC body).
    pub fn rpc(&self) -> (Option<String>, Option<Value>) {
        rpc_key(&self.body)
    }

    /// `params.name` of a `tools/call`.
    pub fn tool(&self) -> Option<String> {
        let v = self.json()?;
        (v["method"] == "tools/call")
            .then(|| v["params"]["name"].as_str().map(str::to_owned))
            .flatten()
    }
}

fn path_of(target: &str) -> &str {
    target.split('?').next().unwrap_or_default()
}

/// The JSON-RPC `method` and `id` of a body.
fn rpc_key(body: &[u8]) -> (Option<String>, Option<Value>) {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => (
            m.get("method").and_then(Value::as_str).map(str::to_owned),
            m.get("id").cloned(),
        ),
        _ => (None, None),
    }
}

/// A captured HTTP response.
#[derive(Debug, Clone)]
pub struct CapturedResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Chunked coding removed; for a stream the capture ended in, what was captured.
    pub body: Vec<u8>,
    /// The body ended within the capture (final chunk, or all of `Content-Length`).
    pub complete: bool,
    /// For a `text/event-stream` body: its events.
    pub events: Option<Vec<RawEvent>>,
}

impl CapturedResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn is_sse(&self) -> bool {
        self.events.is_some()
    }

    /// The body as text (the captures are UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request and the response it got (`None`: the capture has none).
#[derive(Debug, Clone)]
pub struct CapturedExchange {
    /// The capture's connection number.
    pub conn: u32,
    pub request: CapturedRequest,
    pub response: Option<CapturedResponse>,
}

/// A parsed capture.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The header comment lines.
    pub comments: Vec<String>,
    /// In the order their requests were sent.
    pub exchanges: Vec<CapturedExchange>,
}

/// The bytes of one connection in one direction, and where each block of it starts.
#[derive(Default)]
struct Flow {
    bytes: Vec<u8>,
    /// (offset in `bytes`, index of the block in the capture)
    starts: Vec<(usize, usize)>,
}

impl Flow {
    /// The capture block that holds byte `offset`.
    fn block_at(&self, offset: usize) -> usize {
        self.starts
            .iter()
            .rev()
            .find(|(o, _)| *o <= offset)
            .map_or(0, |(_, b)| *b)
    }
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// A head (start line and headers) at `pos`: (start line, headers, where the body starts).
type Head = (String, Vec<(String, String)>, usize);

fn parse_head(bytes: &[u8], pos: usize) -> Result<Option<Head>, String> {
    let Some(len) = find(&bytes[pos..], b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&bytes[pos..pos + len])
        .map_err(|e| format!("head at byte {pos} is not UTF-8: {e}"))?;
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((start, headers, pos + len + 4)))
}

/// Decode a chunked body at `pos`: (data, end position, whether the last chunk was seen).
fn dechunk(bytes: &[u8], mut pos: usize) -> Result<(Vec<u8>, usize, bool), String> {
    let mut data = Vec::new();
    loop {
        let Some(i) = find(&bytes[pos..], b"\r\n") else {
            return Ok((data, bytes.len(), false));
        };
        let line = String::from_utf8_lossy(&bytes[pos..pos + i]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size line {line:?} at byte {pos}"))?;
        pos += i + 2;
        if size == 0 {
            // Trailers, then a blank line.
            loop {
                let Some(j) = find(&bytes[pos..], b"\r\n") else {
                    return Ok((data, bytes.len(), false));
                };
                pos += j + 2;
                if j == 0 {
                    return Ok((data, pos, true));
                }
            }
        }
        if bytes.len() < pos + size + 2 {
            data.extend_from_slice(&bytes[pos..(pos + size).min(bytes.len())]);
            return Ok((data, bytes.len(), false));
        }
        data.extend_from_slice(&bytes[pos..pos + size]);
        if &bytes[pos + size..pos + size + 2] != b"\r\n" {
            return Err(format!("chunk at byte {pos} not followed by CRLF"));
        }
        pos += size + 2;
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, String> {
    find_header(headers, "content-length")
        .map(|v| v.parse().map_err(|_| format!("bad content-length {v:?}")))
        .transpose()
}

/// The requests of a client-to-server flow, with the offset where each starts.
fn parse_requests(bytes: &[u8]) -> Result<Vec<(usize, CapturedRequest)>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (start, headers, body_at) = parse_head(bytes, pos)?
            .ok_or_else(|| format!("unfinished request head at byte {pos}"))?;
        let mut parts = start.split(' ');
        let (Some(method), Some(target), Some(_version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("bad request line {start:?}"));
        };
        let (body, end) = if is_chunked(&headers) {
            let (data, end, done) = dechunk(bytes, body_at)?;
            if !done {
                return Err(format!("unfinished chunked request body at byte {body_at}"));
            }
            (data, end)
        } else {
            let n = content_length(&headers)?.unwrap_or(0);
            if bytes.len() < body_at + n {
                return Err(format!("request body at byte {body_at} shorter than {n}"));
            }
            (bytes[body_at..body_at + n].to_vec(), body_at + n)
        };
        out.push((
            pos,
            CapturedRequest {
                method: method.to_string(),
                target: target.to_string(),
                headers,
                body,
            },
        ));
        pos = end;
    }
    Ok(out)
}

/// The responses of a server-to-client flow, given the methods of the requests they answer.
fn parse_responses(bytes: &[u8], methods: &[String]) -> Result<Vec<CapturedResponse>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (start, headers, body_at) = parse_head(bytes, pos)?
            .ok_or_else(|| format!("unfinished response head at byte {pos}"))?;
        let mut parts = start.splitn(3, ' ');
        let status: u16 = parts
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {start:?}"))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let head_only = methods.get(out.len()).is_some_and(|m| m == "HEAD")
            || (100..200).contains(&status)
            || matches!(status, 204 | 304);
        let (body, end, complete) = if head_only {
            (Vec::new(), body_at, true)
        } else if is_chunked(&headers) {
            dechunk(bytes, body_at)?
        } else if let Some(n) = content_length(&headers)? {
            let end = (body_at + n).min(bytes.len());
            (bytes[body_at..end].to_vec(), end, end == body_at + n)
        } else {
            (bytes[body_at..].to_vec(), bytes.len(), false)
        };
        let sse = find_header(&headers, "content-type")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"));
        out.push(CapturedResponse {
            status,
            reason,
            events: sse.then(|| split_events(&body)),
            headers,
            body,
            complete,
        });
        pos = end;
    }
    Ok(out)
}

impl Capture {
    /// Parse a capture file's bytes.
    pub fn parse(text: &[u8]) -> Result<Capture, String> {
        let (comments, blocks) = parse_blocks(text)?;
        let mut flows: HashMap<(u32, Dir), Flow> = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            let f = flows.entry((b.conn, b.dir)).or_default();
            f.starts.push((f.bytes.len(), i));
            f.bytes.extend_from_slice(&b.bytes);
        }
        let mut conns: Vec<u32> = flows.keys().map(|(c, _)| *c).collect();
        conns.sort_unstable();
        conns.dedup();
        let mut exchanges = Vec::new();
        for conn in conns {
            let c2s = flows
                .remove(&(conn, Dir::ClientToServer))
                .unwrap_or_default();
            let s2c = flows
                .remove(&(conn, Dir::ServerToClient))
                .unwrap_or_default();
            let requests =
                parse_requests(&c2s.bytes).map_err(|e| format!("conn {conn} c2s: {e}"))?;
            let methods: Vec<String> = requests.iter().map(|(_, r)| r.method.clone()).collect();
            let mut responses = parse_responses(&s2c.bytes, &methods)
                .map_err(|e| format!("conn {conn} s2c: {e}"))?
                .into_iter();
            if responses.len() > requests.len() {
                return Err(format!(
                    "conn {conn}: {} responses to {} requests",
                    responses.len(),
                    requests.len()
                ));
            }
            for (offset, request) in requests {
                exchanges.push((
                    c2s.block_at(offset),
                    CapturedExchange {
                        conn,
                        request,
                        response: responses.next(),
                    },
                ));
            }
        }
        exchanges.sort_by_key(|(block, _)| *block);
        Ok(Capture {
            comments,
            exchanges: exchanges.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// Read and parse a capture file; panics with the reason.
    pub fn load(path: &Path) -> Capture {
        let text =
            std::fs::read(path).unwrap_or_else(|e| panic!("read capture {}: {e}", path.display()));
        Capture::parse(&text).unwrap_or_else(|e| panic!("capture {}: {e}", path.display()))
    }

    /// The 2024-11-05 HTTP+SSE stream: the GET whose SSE answer starts with `endpoint`.
    pub fn legacy_stream(&self) -> Option<&CapturedExchange> {
        self.exchanges.iter().find(|e| {
            e.request.method == "GET"
                && e.response
                    .as_ref()
                    .and_then(|r| r.events.as_ref())
                    .and_then(|evs| evs.first())
                    .and_then(|ev| ev.parsed.as_ref())
                    .is_some_and(|ev| ev.event.as_deref() == Some("endpoint"))
        })
    }

    /// The `endpoint` event's data (the POST URI) of the HTTP+SSE stream.
    pub fn legacy_endpoint(&self) -> Option<String> {
        let events = self.legacy_stream()?.response.as_ref()?.events.as_ref()?;
        events.first()?.parsed.as_ref()?.data.clone()
    }

    /// The events of the HTTP+SSE stream that answer the JSON-RPC request `id`.
    pub fn stream_answers(&self, id: &Value) -> Vec<&RawEvent> {
        self.legacy_stream()
            .and_then(|e| e.response.as_ref())
            .and_then(|r| r.events.as_ref())
            .map(|evs| {
                evs.iter()
                    .filter(|ev| ev.answers().as_ref() == Some(id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The exchanges whose request has this method, path (without query) and JSON-RPC body
    /// `method` and `id`.
    pub fn matching(
        &self,
        method: &str,
        path: &str,
        rpc: &(Option<String>, Option<Value>),
    ) -> Vec<usize> {
        self.exchanges
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.request.method == method && e.request.path() == path && &e.request.rpc() == rpc
            })
            .map(|(i, _)| i)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

type Resp = http::Response<BoxBody<Bytes, Infallible>>;
type StreamTx = http_body_util::channel::Sender<Bytes, Infallible>;

struct State {
    capture: Capture,
    /// How many times each exchange was served.
    served: Mutex<Vec<u32>>,
    requests: Mutex<Vec<PeerRequest>>,
    /// The open HTTP+SSE stream.
    legacy: Arc<tokio::sync::Mutex<Option<StreamTx>>>,
    /// Standalone GET streams held open until a DELETE.
    held: Mutex<Vec<StreamTx>>,
    conns: AtomicU64,
}

/// Serves a [`Capture`] again; see the module doc. Stops on drop.
pub struct ReplayServer {
    addr: SocketAddr,
    state: Arc<State>,
    /// Stops the server when dropped.
    _server: crate::ServerThread,
}

impl ReplayServer {
    /// Serve `capture` on `addr` (port 0 picks a free port).
    pub fn start(addr: SocketAddr, capture: Capture) -> ReplayServer {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("ReplayServer bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            served: Mutex::new(vec![0; capture.exchanges.len()]),
            capture,
            requests: Mutex::default(),
            legacy: Arc::default(),
            held: Mutex::default(),
            conns: AtomicU64::new(0),
        });
        let st = state.clone();
        let server =
            ServerThread::spawn(format!("replay-{addr}"), move |rx| serve(listener, st, rx));
        ReplayServer {
            addr,
            state,
            _server: server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn capture(&self) -> &Capture {
        &self.state.capture
    }

    /// Every HTTP request received, in order of arrival of their complete bodies.
    pub fn requests(&self) -> Vec<PeerRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The `params.name` of every `tools/call` received, in order.
    pub fn tool_calls(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| r.json())
            .filter(|v| v["method"] == "tools/call")
            .filter_map(|v| v["params"]["name"].as_str().map(str::to_owned))
            .collect()
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let conn = state.conns.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, conn, peer, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    conns.abort_all();
}

/// The captured head, without what hyper frames itself.
fn head(r: &CapturedResponse) -> http::response::Builder {
    let mut b = http::Response::builder().status(r.status);
    for (k, v) in &r.headers {
        let framing = ["transfer-encoding", "content-length", "connection"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h));
        if !framing {
            b = b.header(k.as_str(), v.as_str());
        }
    }
    b
}

/// Write `events` to a stream, in order, each in one frame. False once the client is gone.
async fn write_events(tx: &mut StreamTx, events: &[RawEvent]) -> bool {
    for ev in events {
        if tx.send_data(Bytes::copy_from_slice(&ev.raw)).await.is_err() {
            return false;
        }
    }
    true
}

async fn handle(
    state: Arc<State>,
    conn: u64,
    peer: SocketAddr,
    req: http::Request<hyper::body::Incoming>,
) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    state
        .requests
        .lock()
        .unwrap()
        .push(PeerRequest::new(conn, peer, &parts, &body));
    let rpc = rpc_key(&body);
    let method = parts.method.as_str();
    let candidates = state.capture.matching(method, path_of(&target), &rpc);
    // The first exchange not served yet, else the first one.
    let chosen = {
        let mut served = state.served.lock().unwrap();
        let i = candidates
            .iter()
            .copied()
            .find(|&i| served[i] == 0)
            .or(candidates.first().copied());
        if let Some(i) = i {
            served[i] += 1;
        }
        i
    };
    let Some(index) = chosen else {
        let text = format!(
            "replay: no captured exchange matches {method} {} with JSON-RPC method {:?} id {:?}",
            path_of(&target),
            rpc.0,
            rpc.1
        );
        return http::Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(text)).boxed())
            .unwrap();
    };
    let exchange = &state.capture.exchanges[index];
    let Some(captured) = &exchange.response else {
        return http::Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .header("content-type", "text/plain")
            .body(
                Full::new(Bytes::from_static(
                    b"replay: the capture has no response to this request",
                ))
                .boxed(),
            )
            .unwrap();
    };
    if method == "DELETE" {
        // The session ends: so do its standalone streams.
        state.held.lock().unwrap().clear();
    }
    let is_legacy_stream = state
        .capture
        .legacy_stream()
        .is_some_and(|l| std::ptr::eq(l, exchange));
    if let Some(events) = &captured.events {
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
        let resp = head(captured).body(body.boxed()).unwrap();
        if is_legacy_stream {
            // What answers no request (the endpoint) now; the answers when their POSTs come.
            let first: Vec<RawEvent> = events
                .iter()
                .filter(|e| e.answers().is_none())
                .cloned()
                .collect();
            let legacy = state.legacy.clone();
            tokio::spawn(async move {
                let mut slot = legacy.lock().await;
                if write_events(&mut tx, &first).await {
                    *slot = Some(tx);
                }
            });
        } else if method == "GET" {
            let events = events.clone();
            let state = state.clone();
            tokio::spawn(async move {
                if write_events(&mut tx, &events).await {
                    state.held.lock().unwrap().push(tx);
                }
            });
        } else {
            let events = events.clone();
            tokio::spawn(async move {
                write_events(&mut tx, &events).await;
            });
        }
        return resp;
    }
    // Answers on the HTTP+SSE stream, written once this response is on its way.
    if let Some(id) = &rpc.1 {
        let answers: Vec<RawEvent> = state
            .capture
            .stream_answers(id)
            .into_iter()
            .cloned()
            .collect();
        if !answers.is_empty() {
            let legacy = state.legacy.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut slot = legacy.lock().await;
                if let Some(tx) = slot.as_mut() {
                    if !write_events(tx, &answers).await {
                        *slot = None;
                    }
                }
            });
        }
    }
    head(captured)
        .body(Full::new(Bytes::from(captured.body.clone())).boxed())
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small capture in the file format, with its two stream events.
    fn capture() -> (String, &'static str, &'static str) {
        let ev1 = "event: endpoint\r\ndata: /m?session_id=a\r\n\r\n";
        let ev2 = "event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\n\r\n";
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#;
        let text = [
            "# demo\n# second line\n\n".to_string(),
            ">>> conn 1 c2s\nGET /sse HTTP/1.1\r\nHost: h\r\n\r\n\n".into(),
            "<<< conn 1 s2c\nHTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n\n".into(),
            format!("<<< conn 1 s2c\n{:x}\r\n{ev1}\r\n\n", ev1.len()),
            format!(">>> conn 2 c2s\nPOST /m?session_id=a HTTP/1.1\r\nContent-Length: {}\r\n\r\n\n", body.len()),
            format!(">>> conn 2 c2s\n{body}\n"),
            "<<< conn 2 s2c\nHTTP/1.1 202 Accepted\r\ncontent-length: 8\r\n\r\nAccepted\n".into(),
            format!("<<< conn 1 s2c\n{:x}\r\n{ev2}\r\n\n", ev2.len()),
        ]
        .concat();
        (text, ev1, ev2)
    }

    #[test]
    fn blocks_requests_responses_and_events() {
        let (text, ev1, ev2) = capture();
        let (comments, blocks) = parse_blocks(text.as_bytes()).unwrap();
        assert_eq!(comments, ["demo", "second line"]);
        assert_eq!(blocks.len(), 7);
        assert_eq!(blocks[4].bytes, br#"{"jsonrpc":"2.0","id":1,"method":"x"}"#);
        let c = Capture::parse(text.as_bytes()).unwrap();
        assert_eq!(c.exchanges.len(), 2);
        let get = &c.exchanges[0];
        assert_eq!((get.request.method.as_str(), get.conn), ("GET", 1));
        let stream = get.response.as_ref().unwrap();
        assert!(!stream.complete, "the stream never ended");
        let events = stream.events.as_ref().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].raw, ev1.as_bytes());
        assert_eq!(events[1].raw, ev2.as_bytes());
        assert_eq!(c.legacy_endpoint().as_deref(), Some("/m?session_id=a"));
        let post = &c.exchanges[1];
        assert_eq!(post.request.path(), "/m");
        assert_eq!(
            post.request.rpc(),
            (Some("x".to_string()), Some(Value::from(1)))
        );
        let accepted = post.response.as_ref().unwrap();
        assert_eq!(
            (accepted.status, accepted.body_text().as_str()),
            (202, "Accepted")
        );
        assert!(accepted.complete);
        assert_eq!(c.stream_answers(&Value::from(1)).len(), 1);
        assert_eq!(
            c.matching("POST", "/m", &(Some("x".into()), Some(Value::from(1)))),
            [1]
        );
    }

    /// The real captures of `tests/fixtures/mcp-wire` parse whole: every request has its
    /// response, every body is what its framing says.
    #[test]
    fn the_fixture_captures_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mcp-wire");
        let expect = [
            ("py-2024-11-05-sse.txt", 7),
            ("py-2025-11-25-streamable.txt", 8),
            ("py-2025-11-25-streamable-json.txt", 8),
            ("py-2026-07-28.txt", 4),
        ];
        for (file, n) in expect {
            let c = Capture::load(&dir.join(file));
            assert_eq!(c.exchanges.len(), n, "{file}: {c:#?}");
            for e in &c.exchanges {
                let r = e
                    .response
                    .as_ref()
                    .unwrap_or_else(|| panic!("{file}: {e:?}"));
                if e.request.method == "POST" {
                    assert!(e.request.json().is_some(), "{file}: {e:?}");
                    assert!(r.complete, "{file}: {e:?}");
                }
                if r.status == 200 && !r.is_sse() && !r.body.is_empty() {
                    serde_json::from_slice::<Value>(&r.body)
                        .unwrap_or_else(|err| panic!("{file}: {err}: {e:?}"));
                }
                for ev in r.events.iter().flatten() {
                    assert!(ev.parsed.is_some(), "{file}: {ev:?}");
                }
            }
            let legacy = file.contains("2024-11-05");
            assert_eq!(c.legacy_stream().is_some(), legacy, "{file}");
            if legacy {
                assert_eq!(
                    c.legacy_endpoint().as_deref(),
                    Some("/messages/?session_id=c66df44842c3482fbb1fa396e623ba2a")
                );
                for id in 1..=5 {
                    assert_eq!(c.stream_answers(&Value::from(id)).len(), 1, "id {id}");
                }
            }
        }
    }

    #[test]
    fn events_split_on_any_line_end() {
        let evs = split_events(b"data: a\n\n: c\r\rdata: b\r\n\r\ndata: unfinished\n");
        let raws: Vec<&[u8]> = evs.iter().map(|e| e.raw.as_slice()).collect();
        assert_eq!(
            raws,
            [
                &b"data: a\n\n"[..],
                &b": c\r\r"[..],
                &b"data: b\r\n\r\n"[..]
            ]
        );
        assert!(evs[1].parsed.is_none(), "a comment is not an event");
        assert_eq!(evs[2].parsed.as_ref().unwrap().data.as_deref(), Some("b"));
    }

    #[test]
    fn chunked_bodies() {
        let (d, end, done) = dechunk(b"3\r\nabc\r\n0\r\n\r\nX", 0).unwrap();
        assert_eq!((d.as_slice(), end, done), (&b"abc"[..], 13, true));
        let (d, _, done) = dechunk(b"3\r\nabc\r\n5\r\nde", 0).unwrap();
        assert_eq!((d.as_slice(), done), (&b"abcde"[..], false));
    }
}
