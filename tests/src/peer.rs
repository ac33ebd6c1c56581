//! `McpPeer`: a scriptable raw MCP server that speaks every MCP revision and transport on the
//! wire, including what no Rust SDK speaks (the 2024-11-05 HTTP+SSE transport, JSON-RPC
//! batches, SSE resumption, the 2026-07-28 stateless revision). Hand-made JSON-RPC on hyper 1
//! (HTTP/1.1, plain TCP, `TCP_NODELAY`), on its own tokio runtime thread; stops on drop.
//!
//! Paths (one server answers all of them at once):
//!
//! | path | what |
//! |---|---|
//! | `GET /sse` | 2024-11-05 HTTP+SSE stream; first event `endpoint` with `/messages/?session_id=<32 hex>` (Python SDK) |
//! | `GET /sse-ts` | the same with `/messages?sessionId=<32 hex>` (TypeScript SDK) |
//! | `GET /sse-foreign` | the endpoint is an absolute URL on another origin, `http://127.0.0.254:9/messages/?session_id=<hex>` |
//! | `POST /messages/?session_id=X`, `/messages?sessionId=X` | 202 `Accepted`; every message the server produces goes to session X's GET stream as `event: message`; unknown session → 404 |
//! | `/mcp` | Streamable HTTP (2025-03-26, 2025-06-18, 2025-11-25), requests answered with `text/event-stream` |
//! | `/mcp-json` | the same, requests answered with `application/json` |
//! | `/mcp26` | 2026-07-28 stateless: POST only, `Mcp-Method`/`Mcp-Name` checked, multi-round-trip `confirm_action` |
//!
//! Streamable HTTP: initialize creates a session (`Mcp-Session-Id`, echoed on later responses);
//! a request without the header is served too (stateless-style), one with an unknown session
//! gets 404; a bad `MCP-Protocol-Version` gets 400. Notifications and client responses → 202
//! with an empty body. A batch (JSON array) is answered with an array of the responses in
//! order (`/mcp-json`) or one SSE event per response (`/mcp`); a batch without requests → 202.
//! `GET` with `Mcp-Session-Id` → an idle standalone SSE stream (kept open); with a
//! `Last-Event-ID` of a `resumable` call → that call's events (ids continue the numbering),
//! then the stream ends. `DELETE` → 200 and the session is gone.
//!
//! SSE events are written like the Python SDK (`event: message\r\ndata: <json>\r\n\r\n`) except
//! in split mode ([`PeerOpts::split_sse`], or the `split_echo` tool), where the body is written
//! in 1–3 byte frames [`PeerOpts::split_delay`] apart (one event spans many TCP segments), with
//! LF line ends, notifications and server requests as bare `data:` events (no `event:` field,
//! as rmcp writes them) preceded by a `: comment` line, and responses with `event: message` and
//! the JSON split over two `data:` lines at a comma.
//!
//! Tools (tools/list, with the Python SDK's inputSchema style; paginated with `nextCursor` when
//! [`PeerOpts::page_size`] is set): `echo {text}`, `add {a, b}`, `start_security_scan
//! {cluster}`, `drop_cluster {cluster}`, `secret_dump {}`, `slow_echo {text}` (on SSE: 3
//! `notifications/progress` with `params._meta.progressToken` or `"p"`, then a server request
//! `{"id":"srv-1","method":"ping"}`, then the result, [`PeerOpts::slow_delay`] apart),
//! `resumable {text}` (on `/mcp`: a priming event `id: N` with empty data and a `retry: 100`
//! block, then the stream closes without the result, which a `GET` with `Last-Event-ID: N`
//! gets), `split_echo {text}` (one progress notification then the result, in split mode),
//! `confirm_action {action}` (on `/mcp26`: `input_required` first, complete once retried with
//! `inputResponses` and the `requestState`; elsewhere complete at once). Unlisted: `fail_rpc`
//! answers JSON-RPC error -32001 `boom`; any other name → an `isError` result `Unknown tool: X`.
//!
//! Everything received is recorded ([`McpPeer::requests`]); every tools/call executed,
//! batch elements included, is counted ([`McpPeer::calls`], [`McpPeer::tool_calls`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{channel::Channel, combinators::BoxBody, BodyExt, Full};
use serde_json::{json, Map, Value};

/// How an [`McpPeer`] behaves beyond its defaults.
#[derive(Debug, Clone)]
pub struct PeerOpts {
    /// tools/list returns this many tools per page, with `nextCursor` (`None`: all at once).
    pub page_size: Option<usize>,
    /// Write every SSE stream (on `/mcp` and the legacy GET streams) in split mode.
    pub split_sse: bool,
    /// Pause after each 1–3 byte frame in split mode.
    pub split_delay: Duration,
    /// Pause between the events of `slow_echo`.
    pub slow_delay: Duration,
}

impl Default for PeerOpts {
    fn default() -> PeerOpts {
        PeerOpts {
            page_size: None,
            split_sse: false,
            split_delay: Duration::from_millis(2),
            slow_delay: Duration::from_millis(20),
        }
    }
}

/// One HTTP request as the peer received it.
#[derive(Debug, Clone)]
pub struct PeerRequest {
    /// Sequence number of the TCP connection it came on (from 0, in accept order).
    pub conn: u64,
    /// The client's address on that connection.
    pub peer: SocketAddr,
    pub method: String,
    /// Path and query, e.g. `/messages/?session_id=…`.
    pub path: String,
    /// Header names lower-case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body bytes (chunked coding removed).
    pub body: Vec<u8>,
}

impl PeerRequest {
    /// The request as received: `parts` and its whole `body`.
    pub fn new(conn: u64, peer: SocketAddr, parts: &http::request::Parts, body: &[u8]) -> Self {
        PeerRequest {
            conn,
            peer,
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The path without its query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }
}

/// The tools the peer lists, in tools/list order.
pub const PEER_TOOLS: [&str; 9] = [
    "echo",
    "add",
    "start_security_scan",
    "drop_cluster",
    "secret_dump",
    "slow_echo",
    "resumable",
    "split_echo",
    "confirm_action",
];

/// The 2024-11-05 HTTP+SSE GET paths and the endpoint each announces (`{id}`: the session).
const LEGACY_STREAMS: [(&str, &str); 3] = [
    ("/sse", "/messages/?session_id={id}"),
    ("/sse-ts", "/messages?sessionId={id}"),
    (
        "/sse-foreign",
        "http://127.0.0.254:9/messages/?session_id={id}",
    ),
];

/// Protocol versions accepted in `MCP-Protocol-Version`.
const VERSIONS: [&str; 5] = [
    "2024-11-05",
    "2025-03-26",
    "2025-06-18",
    "2025-11-25",
    "2026-07-28",
];

/// A raw MCP server for tests; see the module doc. Stops on drop.
pub struct McpPeer {
    addr: SocketAddr,
    state: Arc<State>,
    /// Stops the server when dropped.
    _server: crate::ServerThread,
}

impl McpPeer {
    /// Serve on `addr` (port 0 picks a free port) with default options.
    pub fn start(addr: SocketAddr) -> McpPeer {
        Self::start_with(addr, PeerOpts::default())
    }

    /// Serve on `addr` with `opts`.
    pub fn start_with(addr: SocketAddr, opts: PeerOpts) -> McpPeer {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("McpPeer bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::new(opts, addr));
        let st = state.clone();
        let server = crate::ServerThread::spawn(format!("mcp-peer-{addr}"), move |rx| {
            serve(listener, st, rx)
        });
        McpPeer {
            addr,
            state,
            _server: server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`, e.g. `url("/mcp")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every HTTP request received, in order of arrival of their complete bodies.
    pub fn requests(&self) -> Vec<PeerRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many tools/call of `tool` were executed (batch elements and both rounds of a
    /// multi-round-trip call included).
    pub fn calls(&self, tool: &str) -> u64 {
        self.state
            .tool_calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == tool)
            .count() as u64
    }

    /// Every tools/call executed: (tool name, arguments), in order.
    pub fn tool_calls(&self) -> Vec<(String, Value)> {
        self.state.tool_calls.lock().unwrap().clone()
    }

    /// Assert that no call of `tool` was executed.
    pub fn assert_not_reached(&self, tool: &str) {
        assert_eq!(
            self.calls(tool),
            0,
            "{tool} reached the peer; requests: {:#?}",
            self.requests()
        );
    }

    /// The JSON-RPC messages received by POST (batch elements one by one), in order.
    pub fn messages(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for r in self.requests() {
            match r.json() {
                Some(Value::Array(items)) => out.extend(items),
                Some(v @ Value::Object(_)) => out.push(v),
                _ => {}
            }
        }
        out
    }
}

type Resp = http::Response<BoxBody<Bytes, Infallible>>;

/// The write side of an SSE response body.
struct SseWriter {
    tx: http_body_util::channel::Sender<Bytes, Infallible>,
    split: bool,
    split_delay: Duration,
}

impl SseWriter {
    /// Write `bytes` (in 1–3 byte frames in split mode). False once the client is gone.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        if !self.split {
            return self
                .tx
                .send_data(Bytes::copy_from_slice(bytes))
                .await
                .is_ok();
        }
        let mut pos = 0;
        let mut n = 0;
        while pos < bytes.len() {
            let len = (n % 3 + 1).min(bytes.len() - pos);
            n += 1;
            if self
                .tx
                .send_data(Bytes::copy_from_slice(&bytes[pos..pos + len]))
                .await
                .is_err()
            {
                return false;
            }
            pos += len;
            tokio::time::sleep(self.split_delay).await;
        }
        true
    }

    /// Write one message as an event in this writer's style.
    async fn message(&mut self, msg: &Value) -> bool {
        let ev = format_event(msg, self.split, None);
        self.write(ev.as_bytes()).await
    }
}

/// One SSE event carrying `msg`: Python style (`event: message`, CRLF), or split style (LF;
/// a notification or server request as a bare `data:` event after a comment line; a response
/// with `event: message` and its JSON over two `data:` lines). `id` adds an `id:` field.
fn format_event(msg: &Value, split: bool, id: Option<u64>) -> String {
    let json = msg.to_string();
    let id_line = |nl: &str| id.map(|n| format!("id: {n}{nl}")).unwrap_or_default();
    if !split {
        return format!("{}event: message\r\ndata: {json}\r\n\r\n", id_line("\r\n"));
    }
    if msg.get("method").is_some() {
        return format!("{}: mcp-peer split mode\ndata: {json}\n\n", id_line("\n"));
    }
    match top_level_comma(&json) {
        Some(i) => format!(
            "{}event: message\ndata: {}\ndata: {}\n\n",
            id_line("\n"),
            &json[..=i],
            &json[i + 1..]
        ),
        None => format!("{}event: message\ndata: {json}\n\n", id_line("\n")),
    }
}

/// Index of the first comma outside a JSON string.
fn top_level_comma(json: &str) -> Option<usize> {
    let (mut in_str, mut escaped) = (false, false);
    for (i, c) in json.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            ',' if !in_str => return Some(i),
            _ => {}
        }
    }
    None
}

/// A stored `resumable` call: its messages are sent to whoever resumes after `event id`.
struct Parked {
    messages: Vec<Value>,
}

struct State {
    opts: PeerOpts,
    addr: SocketAddr,
    requests: Mutex<Vec<PeerRequest>>,
    tool_calls: Mutex<Vec<(String, Value)>>,
    /// 2024-11-05 sessions: session id → its GET stream.
    legacy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<SseWriter>>>>,
    /// Streamable HTTP sessions: session id → negotiated protocol version.
    sessions: Mutex<HashMap<String, String>>,
    /// Idle standalone GET streams, kept open until the peer stops.
    idle: Mutex<Vec<http_body_util::channel::Sender<Bytes, Infallible>>>,
    /// `resumable` calls by the id of their priming event.
    parked: Mutex<HashMap<u64, Parked>>,
    /// 2026-07-28 `confirm_action`: requestState → action.
    pending_input: Mutex<HashMap<String, String>>,
    event_ids: AtomicU64,
    nonce: AtomicU64,
    conns: AtomicU64,
}

impl State {
    fn new(opts: PeerOpts, addr: SocketAddr) -> State {
        State {
            opts,
            addr,
            requests: Mutex::default(),
            tool_calls: Mutex::default(),
            legacy: Mutex::default(),
            sessions: Mutex::default(),
            idle: Mutex::default(),
            parked: Mutex::default(),
            pending_input: Mutex::default(),
            event_ids: AtomicU64::new(0),
            nonce: AtomicU64::new(0),
            conns: AtomicU64::new(0),
        }
    }

    /// 32 fresh hex digits.
    fn hex_id(&self) -> String {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        crate::sha256_hex(format!("{}-{}-{n}-{t}", std::process::id(), self.addr).as_bytes())[..32]
            .to_string()
    }

    fn sse_writer(&self, split: bool) -> (SseWriter, Channel<Bytes, Infallible>) {
        let (tx, body) = Channel::new(16);
        (
            SseWriter {
                tx,
                split,
                split_delay: self.opts.split_delay,
            },
            body,
        )
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

fn full(status: StatusCode, content_type: Option<&str>, body: impl Into<Bytes>) -> Resp {
    let mut b = http::Response::builder().status(status);
    if let Some(ct) = content_type {
        b = b.header(http::header::CONTENT_TYPE, ct);
    }
    b.body(Full::new(body.into()).boxed()).unwrap()
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    full(status, Some("application/json"), v.to_string())
}

fn sse_resp(body: Channel<Bytes, Infallible>, content_type: &str) -> Resp {
    http::Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CACHE_CONTROL, "no-cache, no-transform")
        .header("x-accel-buffering", "no")
        .body(body.boxed())
        .unwrap()
}

fn with_session(mut r: Resp, session: Option<&str>) -> Resp {
    if let Some(s) = session {
        r.headers_mut()
            .insert("mcp-session-id", s.parse().expect("session id header"));
    }
    r
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
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
    state
        .requests
        .lock()
        .unwrap()
        .push(PeerRequest::new(conn, peer, &parts, &body));
    let query = parts.uri.query().unwrap_or("");
    match parts.uri.path() {
        p if LEGACY_STREAMS.iter().any(|(s, _)| *s == p) => {
            if parts.method != Method::GET {
                return full(StatusCode::METHOD_NOT_ALLOWED, None, "Method Not Allowed");
            }
            legacy_get(&state, p)
        }
        "/messages/" | "/messages" => {
            if parts.method != Method::POST {
                return full(StatusCode::METHOD_NOT_ALLOWED, None, "Method Not Allowed");
            }
            legacy_post(&state, query, &body)
        }
        "/mcp" => streamable(&state, &parts.method, &parts.headers, &body, true).await,
        "/mcp-json" => streamable(&state, &parts.method, &parts.headers, &body, false).await,
        "/mcp26" => stateless(&state, &parts.method, &parts.headers, &body),
        _ => full(StatusCode::NOT_FOUND, Some("text/plain"), "Not Found"),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC methods, common to every transport.

/// Which transport a message came on (what can be sent back changes with it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// 2024-11-05: everything goes to the session's GET stream.
    Legacy,
    /// Streamable HTTP, SSE responses.
    Sse,
    /// Streamable HTTP, JSON responses (no notifications or server requests).
    Json,
    /// 2026-07-28.
    Stateless,
}

/// What a request produces.
struct Reply {
    /// Notifications and server requests sent before the response (SSE transports only).
    before: Vec<Value>,
    response: Value,
    /// Pause before each message after the first.
    delay: Duration,
    /// Write this response's stream in split mode.
    split: bool,
    /// Close the SSE stream after priming; the messages go to a resuming GET.
    resumable: bool,
}

impl Reply {
    fn of(response: Value) -> Reply {
        Reply {
            before: Vec::new(),
            response,
            delay: Duration::ZERO,
            split: false,
            resumable: false,
        }
    }
}

fn is_request(msg: &Value) -> bool {
    msg.get("method").is_some() && msg.get("id").is_some()
}

fn text_result(text: &str, is_error: bool) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": is_error})
}

fn schema(title: &str, props: &[(&str, &str)]) -> Value {
    let mut properties = Map::new();
    for (name, ty) in props {
        let mut t = name.chars();
        let cap: String = t
            .next()
            .map(|c| c.to_uppercase().chain(t).collect())
            .unwrap_or_default();
        properties.insert(name.to_string(), json!({"title": cap, "type": ty}));
    }
    let required: Vec<&str> = props.iter().map(|(n, _)| *n).collect();
    json!({"properties": properties, "required": required, "type": "object", "title": format!("{title}Arguments")})
}

fn tool_list() -> Vec<Value> {
    let s = |name: &str, desc: &str, props: &[(&str, &str)]| json!({"name": name, "description": desc, "inputSchema": schema(name, props)});
    vec![
        s("echo", "Echo the text back", &[("text", "string")]),
        s(
            "add",
            "Add two numbers",
            &[("a", "integer"), ("b", "integer")],
        ),
        s(
            "start_security_scan",
            "Start a security scan of a cluster",
            &[("cluster", "string")],
        ),
        s("drop_cluster", "Delete a cluster", &[("cluster", "string")]),
        s("secret_dump", "Print the secrets", &[]),
        s(
            "slow_echo",
            "Echo after progress notifications and a ping",
            &[("text", "string")],
        ),
        s(
            "resumable",
            "Echo on a resumed stream",
            &[("text", "string")],
        ),
        s(
            "split_echo",
            "Echo in tiny SSE pieces",
            &[("text", "string")],
        ),
        s(
            "confirm_action",
            "Ask the user before acting",
            &[("action", "string")],
        ),
    ]
}

/// Opaque cursor for tools/list offset `n`.
fn cursor_for(n: usize) -> String {
    format!("{:016x}", (n as u64) ^ 0x6d63_7065_6572_2d63)
}

fn offset_of(cursor: &str) -> Option<usize> {
    let v = u64::from_str_radix(cursor, 16).ok()? ^ 0x6d63_7065_6572_2d63;
    usize::try_from(v).ok()
}

fn progress(token: &Value, k: u64, total: u64) -> Value {
    json!({"jsonrpc": "2.0", "method": "notifications/progress",
        "params": {"progressToken": token, "progress": k, "total": total, "message": format!("step {k}")}})
}

/// Answer one request.
fn answer(state: &State, msg: &Value, transport: Transport) -> Reply {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    match method {
        "initialize" => {
            let version = params
                .get("protocolVersion")
                .cloned()
                .unwrap_or_else(|| json!("2025-03-26"));
            Reply::of(ok(json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "mcp-peer", "version": "0.1.0"},
            })))
        }
        "ping" => Reply::of(ok(json!({}))),
        "server/discover" => Reply::of(ok(json!({
            "supportedVersions": VERSIONS,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "mcp-peer", "version": "0.1.0"},
        }))),
        "tools/list" => {
            let tools = tool_list();
            let Some(page) = state.opts.page_size else {
                return Reply::of(ok(json!({"tools": tools})));
            };
            let start = match params.get("cursor") {
                None | Some(Value::Null) => Some(0),
                Some(Value::String(c)) => offset_of(c).filter(|&o| o < tools.len()),
                Some(_) => None,
            };
            let Some(start) = start else {
                return Reply::of(rpc_error(&id, -32602, "Invalid cursor"));
            };
            let end = (start + page.max(1)).min(tools.len());
            let mut result = json!({"tools": tools[start..end]});
            if end < tools.len() {
                result["nextCursor"] = json!(cursor_for(end));
            }
            Reply::of(ok(result))
        }
        "tools/call" => call_tool(state, &id, &params, transport),
        _ => Reply::of(rpc_error(&id, -32601, "Method not found")),
    }
}

fn call_tool(state: &State, id: &Value, params: &Value, transport: Transport) -> Reply {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let args = params
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| json!({}));
    state
        .tool_calls
        .lock()
        .unwrap()
        .push((name.clone(), args.clone()));
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    let str_arg = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let need = |k: &str| {
        str_arg(k).ok_or_else(|| text_result(&format!("missing string argument `{k}`"), true))
    };
    let text = |r: Result<String, Value>| match r {
        Ok(t) => ok(text_result(&t, false)),
        Err(e) => ok(e),
    };
    let sse = matches!(transport, Transport::Sse | Transport::Legacy);
    match name.as_str() {
        "echo" => Reply::of(text(need("text"))),
        "add" => {
            let sum = match (args.get("a"), args.get("b")) {
                (Some(Value::Number(a)), Some(Value::Number(b))) => {
                    match (a.as_i64(), b.as_i64()) {
                        (Some(a), Some(b)) => Ok((a + b).to_string()),
                        _ => Ok(
                            (a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN))
                                .to_string(),
                        ),
                    }
                }
                _ => Err(text_result("missing number arguments `a` and `b`", true)),
            };
            Reply::of(text(sum))
        }
        "start_security_scan" => Reply::of(text(
            need("cluster").map(|c| format!("scan started on {c}")),
        )),
        "drop_cluster" => Reply::of(text(
            need("cluster").map(|c| format!("dropped cluster {c}")),
        )),
        "secret_dump" => Reply::of(text(Ok("SECRET_TOKEN=do-not-leak-3141592653".into()))),
        "slow_echo" => {
            let mut r = Reply::of(text(need("text")));
            if sse {
                let token = params
                    .pointer("/_meta/progressToken")
                    .cloned()
                    .unwrap_or_else(|| json!("p"));
                r.before = (1..=3).map(|k| progress(&token, k, 3)).collect();
                r.before
                    .push(json!({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"}));
                r.delay = state.opts.slow_delay;
            }
            r
        }
        "resumable" => {
            let mut r = Reply::of(text(need("text")));
            r.resumable = transport == Transport::Sse;
            r
        }
        "split_echo" => {
            let mut r = Reply::of(text(need("text")));
            if sse {
                let token = params
                    .pointer("/_meta/progressToken")
                    .cloned()
                    .unwrap_or_else(|| json!("p"));
                r.before = vec![progress(&token, 1, 1)];
                r.split = true;
            }
            r
        }
        "confirm_action" => {
            let action = match need("action") {
                Ok(a) => a,
                Err(e) => return Reply::of(ok(e)),
            };
            if transport != Transport::Stateless {
                return Reply::of(text(Ok(format!("confirmed {action}"))));
            }
            Reply::of(confirm_2026(state, id, params, &action))
        }
        "fail_rpc" => Reply::of(rpc_error(id, -32001, "boom")),
        other => Reply::of(ok(text_result(&format!("Unknown tool: {other}"), true))),
    }
}

/// 2026-07-28 multi-round-trip: ask first; complete once retried with the answer.
fn confirm_2026(state: &State, id: &Value, params: &Value, action: &str) -> Value {
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    if let Some(rs) = params.get("requestState") {
        let rs = rs.as_str().unwrap_or_default();
        let Some(asked) = state.pending_input.lock().unwrap().remove(rs) else {
            return rpc_error(id, -32602, "Unknown requestState");
        };
        let answer = params.pointer("/inputResponses/confirm");
        let yes = answer.and_then(|a| a.pointer("/content/ok")) == Some(&json!(true))
            && answer
                .and_then(|a| a.get("action"))
                .is_none_or(|a| a == "accept");
        let text = if yes {
            format!("confirmed {asked}")
        } else {
            format!("not confirmed: {asked}")
        };
        return ok(text_result(&text, false));
    }
    let rs = format!("rs-{}", state.hex_id());
    state
        .pending_input
        .lock()
        .unwrap()
        .insert(rs.clone(), action.to_string());
    ok(json!({
        "resultType": "input_required",
        "inputRequests": {"confirm": {"method": "elicitation/create", "params": {
            "message": "Really?",
            "requestedSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        }}},
        "requestState": rs,
    }))
}

/// The messages of a POST body: one object, or a batch (array). `None`: not JSON-RPC.
fn parse_messages(body: &[u8]) -> Option<(Vec<Value>, bool)> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            Some((items, true))
        }
        v @ Value::Object(_) => Some((vec![v], false)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// 2024-11-05 HTTP+SSE.

fn legacy_get(state: &Arc<State>, path: &str) -> Resp {
    let template = LEGACY_STREAMS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, t)| *t)
        .unwrap_or_default();
    let session = state.hex_id();
    let endpoint = template.replace("{id}", &session);
    let (writer, body) = state.sse_writer(state.opts.split_sse);
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    state
        .legacy
        .lock()
        .unwrap()
        .insert(session.clone(), writer.clone());
    let split = state.opts.split_sse;
    tokio::spawn(async move {
        let ev = if split {
            format!("event: endpoint\ndata: {endpoint}\n\n")
        } else {
            format!("event: endpoint\r\ndata: {endpoint}\r\n\r\n")
        };
        writer.lock().await.write(ev.as_bytes()).await;
    });
    let mut r = sse_resp(body, "text/event-stream; charset=utf-8");
    r.headers_mut()
        .insert(http::header::CACHE_CONTROL, "no-store".parse().unwrap());
    r
}

fn legacy_post(state: &Arc<State>, query: &str, body: &[u8]) -> Resp {
    let session = query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "session_id" || k == "sessionId").then(|| v.to_string())
    });
    let Some(session) = session else {
        return full(
            StatusCode::BAD_REQUEST,
            Some("text/plain"),
            "session_id is required",
        );
    };
    let Some(writer) = state.legacy.lock().unwrap().get(&session).cloned() else {
        return full(
            StatusCode::NOT_FOUND,
            Some("text/plain"),
            "Could not find session",
        );
    };
    let Some((messages, _)) = parse_messages(body) else {
        return full(
            StatusCode::BAD_REQUEST,
            Some("text/plain"),
            "Could not parse message",
        );
    };
    let replies: Vec<Reply> = messages
        .iter()
        .filter(|m| is_request(m))
        .map(|m| answer(state, m, Transport::Legacy))
        .collect();
    if !replies.is_empty() {
        let state = state.clone();
        tokio::spawn(async move {
            for reply in replies {
                let mut w = writer.lock().await;
                let split = w.split;
                w.split = split || reply.split;
                let alive = write_reply(&mut w, &reply).await;
                w.split = split;
                if !alive {
                    state.legacy.lock().unwrap().remove(&session);
                    return;
                }
            }
        });
    }
    full(StatusCode::ACCEPTED, None, "Accepted")
}

/// Write a reply's messages, `delay` apart. False once the client is gone.
async fn write_reply(w: &mut SseWriter, reply: &Reply) -> bool {
    for (i, m) in reply.before.iter().chain([&reply.response]).enumerate() {
        if i > 0 && !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        if !w.message(m).await {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP (2025-03-26 / 2025-06-18 / 2025-11-25).

async fn streamable(
    state: &Arc<State>,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
    sse: bool,
) -> Resp {
    let session = header(headers, "mcp-session-id").map(str::to_string);
    if let Some(v) = header(headers, "mcp-protocol-version") {
        if !VERSIONS.contains(&v) {
            let e = rpc_error(
                &Value::Null,
                -32600,
                &format!("Unsupported protocol version: {v}"),
            );
            return json_resp(StatusCode::BAD_REQUEST, &e);
        }
    }
    let known = |s: &str| state.sessions.lock().unwrap().contains_key(s);
    match *method {
        Method::GET => {
            if let Some(last) = header(headers, "last-event-id") {
                let parked = last
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| Some((n, state.parked.lock().unwrap().remove(&n)?)));
                if let Some((n, parked)) = parked {
                    return resume(state, n, parked, session.as_deref());
                }
            }
            match session.as_deref() {
                None => json_resp(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(&Value::Null, -32600, "Missing Mcp-Session-Id"),
                ),
                Some(s) if !known(s) => session_not_found(),
                Some(s) => {
                    let (writer, body) = state.sse_writer(false);
                    state.idle.lock().unwrap().push(writer.tx);
                    with_session(sse_resp(body, "text/event-stream"), Some(s))
                }
            }
        }
        Method::DELETE => match session.as_deref() {
            None => json_resp(
                StatusCode::BAD_REQUEST,
                &rpc_error(&Value::Null, -32600, "Missing Mcp-Session-Id"),
            ),
            Some(s) => match state.sessions.lock().unwrap().remove(s) {
                Some(_) => with_session(full(StatusCode::OK, None, ""), Some(s)),
                None => session_not_found(),
            },
        },
        Method::POST => {
            if let Some(s) = session.as_deref() {
                if !known(s) {
                    return session_not_found();
                }
            }
            let Some((messages, batch)) = parse_messages(body) else {
                return json_resp(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(&Value::Null, -32700, "Parse error"),
                );
            };
            let transport = if sse { Transport::Sse } else { Transport::Json };
            let mut session = session;
            let mut replies = Vec::new();
            for m in messages.iter().filter(|m| is_request(m)) {
                let reply = answer(state, m, transport);
                if m["method"] == "initialize" && reply.response.get("result").is_some() {
                    let id = state.hex_id();
                    let version = reply.response["result"]["protocolVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    state.sessions.lock().unwrap().insert(id.clone(), version);
                    session = Some(id);
                }
                replies.push(reply);
            }
            let session = session.as_deref();
            if replies.is_empty() {
                return with_session(full(StatusCode::ACCEPTED, None, ""), session);
            }
            if !sse {
                let out: Vec<Value> = replies.into_iter().map(|r| r.response).collect();
                let v = if batch {
                    Value::Array(out)
                } else {
                    out[0].clone()
                };
                return with_session(json_resp(StatusCode::OK, &v), session);
            }
            let split = state.opts.split_sse || replies.iter().any(|r| r.split);
            let (mut writer, body) = state.sse_writer(split);
            let state = state.clone();
            tokio::spawn(async move {
                if !batch && replies[0].resumable {
                    let reply = replies.pop().unwrap();
                    let mut messages = reply.before;
                    messages.push(reply.response);
                    // The priming event's id, then one id per message for the resumed stream.
                    let reserve = 1 + messages.len() as u64;
                    let n = state.event_ids.fetch_add(reserve, Ordering::SeqCst) + 1;
                    state.parked.lock().unwrap().insert(n, Parked { messages });
                    let nl = if split { "\n" } else { "\r\n" };
                    let priming = format!("id: {n}{nl}data:{nl}{nl}retry: 100{nl}{nl}");
                    writer.write(priming.as_bytes()).await;
                    return; // dropping the writer ends the stream without the result
                }
                for reply in &replies {
                    if !write_reply(&mut writer, reply).await {
                        return;
                    }
                }
            });
            with_session(sse_resp(body, "text/event-stream"), session)
        }
        _ => full(StatusCode::METHOD_NOT_ALLOWED, None, "Method Not Allowed"),
    }
}

fn session_not_found() -> Resp {
    json_resp(
        StatusCode::NOT_FOUND,
        &rpc_error(&Value::Null, -32001, "Session not found"),
    )
}

/// A GET with the `Last-Event-ID` of a parked `resumable` call: its messages, with event ids
/// continuing from `n`, then the end of the stream.
fn resume(state: &Arc<State>, n: u64, parked: Parked, session: Option<&str>) -> Resp {
    let (mut writer, body) = state.sse_writer(state.opts.split_sse);
    let split = state.opts.split_sse;
    tokio::spawn(async move {
        // The ids after the priming event's were reserved when the call was parked.
        for (k, m) in parked.messages.iter().enumerate() {
            let ev = format_event(m, split, Some(n + 1 + k as u64));
            if !writer.write(ev.as_bytes()).await {
                return;
            }
        }
    });
    with_session(sse_resp(body, "text/event-stream"), session)
}

// ---------------------------------------------------------------------------------------------
// 2026-07-28 stateless.

/// `=?base64?…?=` decoded; anything else as is.
fn decode_header_value(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => String::from_utf8(base64_decode(b64)?).ok(),
        None => Some(v.to_string()),
    }
}

/// Standard base64 (padding optional).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn stateless(state: &Arc<State>, method: &Method, headers: &HeaderMap, body: &[u8]) -> Resp {
    if *method != Method::POST {
        let mut r = full(StatusCode::METHOD_NOT_ALLOWED, None, "Method Not Allowed");
        r.headers_mut()
            .insert(http::header::ALLOW, "POST".parse().unwrap());
        return r;
    }
    let msg = match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return json_resp(
                StatusCode::BAD_REQUEST,
                &rpc_error(
                    &Value::Null,
                    -32600,
                    "Invalid Request: one JSON-RPC object per POST",
                ),
            )
        }
        Err(_) => {
            return json_resp(
                StatusCode::BAD_REQUEST,
                &rpc_error(&Value::Null, -32700, "Parse error"),
            )
        }
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let Some(body_method) = msg.get("method").and_then(Value::as_str) else {
        return full(StatusCode::ACCEPTED, None, ""); // a client response
    };
    let mismatch = |what: &str| {
        json_resp(
            StatusCode::BAD_REQUEST,
            &rpc_error(
                &id,
                -32020,
                &format!("{what} header does not match the request body"),
            ),
        )
    };
    if header(headers, "mcp-method") != Some(body_method) {
        return mismatch("Mcp-Method");
    }
    if matches!(body_method, "tools/call" | "resources/read" | "prompts/get") {
        let key = if body_method == "resources/read" {
            "uri"
        } else {
            "name"
        };
        let want = msg
            .pointer(&format!("/params/{key}"))
            .and_then(Value::as_str);
        let got = header(headers, "mcp-name").and_then(decode_header_value);
        if want.is_none() || got.as_deref() != want {
            return mismatch("Mcp-Name");
        }
    }
    if msg.get("id").is_none() {
        return full(StatusCode::ACCEPTED, None, "");
    }
    if !matches!(
        body_method,
        "tools/list" | "tools/call" | "server/discover" | "ping"
    ) {
        return json_resp(
            StatusCode::NOT_FOUND,
            &rpc_error(&id, -32601, "Method not found"),
        );
    }
    let mut response = answer(state, &msg, Transport::Stateless).response;
    if let Some(result) = response.get_mut("result").and_then(Value::as_object_mut) {
        result
            .entry("resultType")
            .or_insert_with(|| json!("complete"));
        if body_method == "tools/list" {
            result.insert("ttlMs".into(), json!(300000));
            result.insert("cacheScope".into(), json!("public"));
        }
    }
    json_resp(StatusCode::OK, &response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_header_values() {
        assert_eq!(
            decode_header_value("=?base64?ZWNobw==?=").as_deref(),
            Some("echo")
        );
        assert_eq!(
            decode_header_value("=?base64?ZWNobw?=").as_deref(),
            Some("echo")
        );
        assert_eq!(
            decode_header_value("=?base64?w6l0w6k=?=").as_deref(),
            Some("été")
        );
        assert_eq!(decode_header_value("plain").as_deref(), Some("plain"));
        assert_eq!(decode_header_value("=?base64?@@@@?="), None);
    }

    #[test]
    fn split_events_parse_back() {
        let msg = json!({"jsonrpc": "2.0", "id": "a,b", "result": {"x": [1, 2]}});
        let ev = format_event(&msg, true, None);
        assert_eq!(ev.matches("data: ").count(), 2, "{ev}");
        let events = crate::sse::SseParser::new().push(ev.as_bytes());
        assert_eq!(events[0].json(), Some(msg));
        assert_eq!(offset_of(&cursor_for(7)), Some(7));
    }
}
