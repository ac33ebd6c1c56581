//! `mcp-client script FILE`: a raw HTTP/1.1 + SSE client driven by a JSON script, so a test
//! can speak any MCP transport byte for byte from a subprocess inside a cgroup; and
//! [`run_script`], which runs it from a test.
//!
//! FILE is `{"timeout_ms": N?, "steps": [STEP, ...]}`. Steps run in order; each prints one
//! JSON line to stdout (after the client's `pid=N` line) with `"step"` (its index) and `"op"`,
//! and on failure `"error": "..."` (the script goes on with the next step). Every step has a
//! deadline: its `"timeout_ms"`, else the script's, else 10 s. Nothing waits longer.
//!
//! Steps:
//! - `{"op":"request", "conn":"a"?, "url":"http://IP:PORT/path", "method":"POST"?,
//!   "headers":[["name","value"],...]?, "body":"..."?, "body_base64":"..."?, "chunks":[n,...]?,
//!   "delay_ms":n?, "max_events":n?, "until_id":ID?, "save_session":"NAME"?,
//!   "save_event_id":"NAME"?}`:
//!   one HTTP/1.1 request on the keep-alive connection named `conn` (opened on first use; no
//!   `conn`: a connection of its own, closed after). `method` defaults to POST. `body_base64`
//!   (standard Base64, padded or not) gives the body as bytes instead of `body`, for bodies
//!   that are not UTF-8 (compressed, UTF-16); it is not substituted. Headers are
//!   sent in the order given; added unless given: `Host` (the URL's authority), `accept`
//!   (`application/json, text/event-stream`, or `text/event-stream` for GET), `content-type:
//!   application/json` (when there is a body), `content-length` (when there is a body or the
//!   method is POST/PUT/PATCH, and no `transfer-encoding` is given). `chunks`: write the
//!   request bytes in pieces of these sizes (the rest in one last piece), `delay_ms` (default
//!   20) apart, with TCP_NODELAY, so headers or body span TCP segments.
//!   Output: `{"status":N, "headers":{lower-case name: value (repeats joined with ", ")}, ...}`
//!   then, for a `text/event-stream` response, `"events":[EVENT...], "ended":bool` (events are
//!   read until the body ends, `max_events` events were read, an event carries a JSON-RPC
//!   response whose id equals `until_id`, or the deadline: then `"timeout":true`); otherwise
//!   `"body":"...", "json":<the body parsed, or null>`. EVENT is `{"event","id","retry","data",
//!   "json"}` (absent fields null; `"comments":[...]` when the event had `:` lines). A
//!   connection that ends without a response gives `{"error":"...", "received":"..."}`.
//!   `save_session` stores the response's `mcp-session-id` for `$session:NAME`;
//!   `save_event_id` stores the last SSE event id seen for `$event_id:NAME`. A connection whose
//!   response was not read to its end (an SSE read stopped early), or that the server closes,
//!   is dropped: the next step with that name opens a new one.
//! - `{"op":"raw", "conn":"b"?, "addr":"IP:PORT", "bytes":"...", "responses":N}`: write the bytes
//!   as they are (several pipelined requests, say) and read N responses (SSE bodies to their
//!   end). Output `{"responses":[RESPONSE...]}` (each as in `request`), plus `"error"` if fewer
//!   came.
//! - `{"op":"sse_open", "stream":"s", "url":"...", "headers":[...]?}`: GET an SSE stream (the
//!   connect and request from the main thread), read the response head, then collect its
//!   events in a background thread. Output `{"status","headers"}`.
//! - `{"op":"sse_wait", "stream":"s", "until_id":ID?, "count":n?}`: wait until an event
//!   carries the JSON-RPC response with id `until_id`, or `count` events arrived since the last
//!   wait, or the stream ended, or the deadline (`"timeout":true`). Neither `until_id` nor
//!   `count`: just take what arrived so far. Output `{"events":[EVENT...], "ended":bool}`: all
//!   events collected since the last wait.
//! - `{"op":"sse_endpoint", "stream":"s"}`: wait for the 2024-11-05 `endpoint` event and store
//!   its URL, resolved against the stream's URL, for `"url":"$endpoint:s"`. Output
//!   `{"data":"<as sent>", "endpoint":"<resolved>"}`.
//! - `{"op":"sse_close", "stream":"s"}`: close the stream; output the events not yet waited for.
//! - `{"op":"close", "conn":"a"}`: close a connection.
//! - `{"op":"sleep", "ms":n}`.
//!
//! Any step may have `"save":{"NAME":"<JSON pointer into this step's output>"}`, e.g.
//! `{"rs":"/json/result/requestState"}`: the value found (a string as is, anything else as JSON
//! text) is stored for `$var:NAME`.
//!
//! Substitutions in `url`, `addr`, `body`, `bytes` and header names and values:
//! `$session:NAME`, `$event_id:NAME`, `$endpoint:NAME`, `$var:NAME` (an unknown name fails the
//! step).
//!
//! Connections are made from the main thread (whose comm is `mcp-client`); background threads
//! only read.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::client::{run_client, ClientRun};
use crate::sse::{SseEvent, SseParser};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// After an SSE read stops on `until_id`/`max_events`, how long to wait for the body's end
/// (so that a POST's SSE response that ends right after its result keeps the connection).
const LINGER: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Test side.

/// What a `script` run printed: one JSON value per step.
pub struct ScriptRun {
    pub run: ClientRun,
    pub steps: Vec<Value>,
}

impl ScriptRun {
    /// The output of step `i`.
    pub fn step(&self, i: usize) -> &Value {
        self.steps
            .get(i)
            .unwrap_or_else(|| panic!("no output for step {i}\n{}", self.run.describe()))
    }

    pub fn describe(&self) -> String {
        self.run.describe()
    }
}

/// Write `script` (`{"steps":[...]}`) to a temp file and run `bin script FILE` in the cgroup
/// `cgroup_dir` (or the test's own). Panics if the client fails or prints something else than
/// one JSON line per step.
pub fn run_script(
    bin: &str,
    cgroup_dir: Option<&Path>,
    script: &Value,
    timeout: Duration,
) -> ScriptRun {
    let dir = crate::TempDir::new("script");
    let file = dir.path().join("script.json");
    std::fs::write(&file, serde_json::to_vec_pretty(script).unwrap())
        .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let run = run_client(
        bin,
        cgroup_dir,
        &["script", file.to_str().unwrap()],
        timeout,
    );
    run.assert_success();
    let steps = run.json_lines();
    let want = script["steps"].as_array().map_or(0, Vec::len);
    assert_eq!(
        steps.len(),
        want,
        "one output line per step\n{}",
        run.describe()
    );
    ScriptRun { run, steps }
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// Run the script in `path`, printing one line per step. Err: the file is not a script.
pub fn run_file(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let script: Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let steps = script["steps"]
        .as_array()
        .ok_or_else(|| format!("{path}: no \"steps\" array"))?;
    let mut exec = Exec {
        conns: HashMap::new(),
        streams: HashMap::new(),
        vars: HashMap::new(),
        timeout: script["timeout_ms"]
            .as_u64()
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis),
    };
    for (i, step) in steps.iter().enumerate() {
        let op = step["op"].as_str().unwrap_or("").to_string();
        let mut out = match exec.step(step, &op) {
            Ok(Value::Object(m)) => m,
            Ok(other) => Map::from_iter([("value".to_string(), other)]),
            Err(e) => Map::from_iter([("error".to_string(), json!(e))]),
        };
        out.insert("step".into(), json!(i));
        out.insert("op".into(), json!(op));
        let out = Value::Object(out);
        if let Some(saves) = step["save"].as_object() {
            for (name, pointer) in saves {
                let found = pointer.as_str().and_then(|p| out.pointer(p));
                let v = match found {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => continue,
                };
                exec.vars.insert(format!("var:{name}"), v);
            }
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    for (_, s) in exec.streams.drain() {
        let _ = s.sock.shutdown(Shutdown::Both);
    }
    Ok(())
}

/// A keep-alive connection and the bytes read past the last response.
struct Conn {
    sock: TcpStream,
    addr: SocketAddr,
    pending: Vec<u8>,
}

/// What the SSE reader thread shares.
#[derive(Default)]
struct StreamState {
    /// Events not yet returned by a wait.
    events: Vec<SseEvent>,
    /// The data of the first `endpoint` event.
    endpoint: Option<String>,
    ended: bool,
    error: Option<String>,
}

struct SseStream {
    url: String,
    sock: TcpStream,
    shared: Arc<(Mutex<StreamState>, Condvar)>,
    reader: Option<JoinHandle<()>>,
}

struct Exec {
    conns: HashMap<String, Conn>,
    streams: HashMap<String, SseStream>,
    /// `session:NAME`, `event_id:NAME`, `endpoint:NAME`, `var:NAME` → value.
    vars: HashMap<String, String>,
    timeout: Duration,
}

/// `http://IP:PORT/path` → (address, authority, path).
fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs: {url}"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let addr = authority
        .parse()
        .map_err(|e| format!("URL authority {authority} is not IP:PORT: {e}"))?;
    Ok((addr, authority.to_string(), path))
}

fn str_field<'a>(step: &'a Value, key: &str) -> Result<&'a str, String> {
    step[key]
        .as_str()
        .ok_or_else(|| format!("step needs a string \"{key}\""))
}

/// A JSON-RPC response (not a request or notification) with this id.
fn is_response_to(msg: &Value, id: &Value) -> bool {
    msg.get("method").is_none()
        && msg.get("id") == Some(id)
        && (msg.get("result").is_some() || msg.get("error").is_some())
}

fn event_matches(ev: &SseEvent, until_id: Option<&Value>) -> bool {
    let (Some(id), Some(msg)) = (until_id, ev.json()) else {
        return false;
    };
    match &msg {
        Value::Array(items) => items.iter().any(|m| is_response_to(m, id)),
        m => is_response_to(m, id),
    }
}

impl Exec {
    fn step_timeout(&self, step: &Value) -> Duration {
        step["timeout_ms"]
            .as_u64()
            .map_or(self.timeout, Duration::from_millis)
    }

    fn step(&mut self, step: &Value, op: &str) -> Result<Value, String> {
        let deadline = Instant::now() + self.step_timeout(step);
        match op {
            "request" => self.request(step, deadline),
            "raw" => self.raw(step, deadline),
            "sse_open" => self.sse_open(step, deadline),
            "sse_wait" => self.sse_wait(step, deadline),
            "sse_endpoint" => self.sse_endpoint(step, deadline),
            "sse_close" => self.sse_close(step),
            "close" => {
                let name = str_field(step, "conn")?;
                match self.conns.remove(name) {
                    Some(c) => {
                        let _ = c.sock.shutdown(Shutdown::Both);
                        Ok(json!({"closed": true}))
                    }
                    None => Err(format!("no connection {name}")),
                }
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(step["ms"].as_u64().unwrap_or(0)));
                Ok(json!({}))
            }
            other => Err(format!("unknown op {other:?}")),
        }
    }

    /// Replace `$session:NAME`, `$event_id:NAME`, `$endpoint:NAME` and `$var:NAME`.
    fn subst(&self, s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let tail = &rest[i + 1..];
            let kind = ["session:", "event_id:", "endpoint:", "var:"]
                .into_iter()
                .find(|k| tail.starts_with(k));
            let Some(kind) = kind else {
                out.push('$');
                rest = tail;
                continue;
            };
            let name_len = tail[kind.len()..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || "_-.".contains(c)))
                .unwrap_or(tail.len() - kind.len());
            let key = &tail[..kind.len() + name_len];
            let v = self
                .vars
                .get(key)
                .ok_or_else(|| format!("nothing saved for ${key}"))?;
            out.push_str(v);
            rest = &tail[key.len()..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn headers(&self, step: &Value) -> Result<Vec<(String, String)>, String> {
        let Some(list) = step.get("headers") else {
            return Ok(Vec::new());
        };
        let list = list
            .as_array()
            .ok_or("\"headers\" must be a list of [name, value]")?;
        list.iter()
            .map(|h| match h.as_array().map(Vec::as_slice) {
                Some([Value::String(k), Value::String(v)]) => Ok((self.subst(k)?, self.subst(v)?)),
                _ => Err(format!("bad header {h}: want [name, value]")),
            })
            .collect()
    }

    /// The named connection to `addr`, opened if needed (with `None`, a fresh one).
    fn conn(
        &mut self,
        name: Option<&str>,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<Conn, String> {
        if let Some(c) = name.and_then(|n| self.conns.remove(n)) {
            if c.addr != addr {
                let n = name.unwrap_or_default();
                let e = format!("connection {n} goes to {}, not {addr}", c.addr);
                self.conns.insert(n.to_string(), c);
                return Err(e);
            }
            return Ok(c);
        }
        let sock = TcpStream::connect_timeout(&addr, remaining(deadline))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = sock.set_nodelay(true);
        Ok(Conn {
            sock,
            addr,
            pending: Vec::new(),
        })
    }

    fn request(&mut self, step: &Value, deadline: Instant) -> Result<Value, String> {
        let url = self.subst(str_field(step, "url")?)?;
        let (addr, authority, path) = parse_url(&url)?;
        let method = step["method"].as_str().unwrap_or("POST").to_string();
        let body = match step["body_base64"].as_str() {
            Some(b64) => base64_decode(b64).ok_or("\"body_base64\" is not valid Base64")?,
            None => self
                .subst(step["body"].as_str().unwrap_or(""))?
                .into_bytes(),
        };
        let headers = self.headers(step)?;
        let bytes = build_request(&method, &authority, &path, &headers, &body);
        let name = step["conn"].as_str();
        let mut conn = self.conn(name, addr, deadline)?;
        let chunks: Vec<usize> = step["chunks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_u64())
                    .map(|n| n as usize)
                    .collect()
            })
            .unwrap_or_default();
        let delay = Duration::from_millis(step["delay_ms"].as_u64().unwrap_or(20));
        write_pieces(&mut conn.sock, &bytes, &chunks, delay, deadline)?;
        let stop = Stop {
            max_events: step["max_events"].as_u64().map(|n| n as usize),
            until_id: step.get("until_id").cloned(),
        };
        let (out, keep) = read_response(&mut conn, &method, &stop, deadline);
        if let Some(n) = step["save_session"].as_str() {
            if let Some(s) = out["headers"]["mcp-session-id"].as_str() {
                self.vars.insert(format!("session:{n}"), s.to_string());
            }
        }
        if let Some(n) = step["save_event_id"].as_str() {
            let last = out["events"].as_array().and_then(|evs| {
                evs.iter()
                    .rev()
                    .find_map(|e| e["id"].as_str().filter(|s| !s.is_empty()))
            });
            if let Some(id) = last {
                self.vars.insert(format!("event_id:{n}"), id.to_string());
            }
        }
        if let (Some(n), true) = (name, keep) {
            self.conns.insert(n.to_string(), conn);
        }
        Ok(out)
    }

    fn raw(&mut self, step: &Value, deadline: Instant) -> Result<Value, String> {
        let addr: SocketAddr = self
            .subst(str_field(step, "addr")?)?
            .parse()
            .map_err(|e| format!("bad addr: {e}"))?;
        let bytes = self.subst(str_field(step, "bytes")?)?;
        let n = step["responses"].as_u64().unwrap_or(1) as usize;
        let name = step["conn"].as_str();
        let mut conn = self.conn(name, addr, deadline)?;
        write_pieces(
            &mut conn.sock,
            bytes.as_bytes(),
            &[],
            Duration::ZERO,
            deadline,
        )?;
        // A HEAD among the requests would need its method here; raw responses are read as
        // answers to non-HEAD requests.
        let mut responses = Vec::new();
        let mut keep = true;
        let mut out = json!({});
        for _ in 0..n {
            let (r, k) = read_response(&mut conn, "GET", &Stop::default(), deadline);
            keep = k;
            let failed = r.get("error").is_some();
            responses.push(r);
            if failed || !keep {
                break;
            }
        }
        if responses.len() < n || responses.iter().any(|r| r.get("error").is_some()) {
            out["error"] = json!(format!("{} of {n} responses", responses.len()));
        }
        out["responses"] = Value::Array(responses);
        if let (Some(name), true) = (name, keep) {
            self.conns.insert(name.to_string(), conn);
        }
        Ok(out)
    }

    fn sse_open(&mut self, step: &Value, deadline: Instant) -> Result<Value, String> {
        let name = str_field(step, "stream")?.to_string();
        let url = self.subst(str_field(step, "url")?)?;
        let (addr, authority, path) = parse_url(&url)?;
        let headers = self.headers(step)?;
        let bytes = build_request("GET", &authority, &path, &headers, b"");
        let mut conn = self.conn(None, addr, deadline)?;
        write_pieces(&mut conn.sock, &bytes, &[], Duration::ZERO, deadline)?;
        let head = match read_head(&mut conn, deadline) {
            Ok(h) => h,
            Err(e) => return Ok(no_response(e, &conn)),
        };
        let mut out = head.to_json();
        if let Some(n) = step["save_session"].as_str() {
            if let Some(s) = head.header("mcp-session-id") {
                self.vars.insert(format!("session:{n}"), s.to_string());
            }
        }
        let sock = conn
            .sock
            .try_clone()
            .map_err(|e| format!("clone socket: {e}"))?;
        let shared = Arc::new((Mutex::new(StreamState::default()), Condvar::new()));
        let sh = shared.clone();
        let mut body = BodyReader::new(&head, "GET");
        let reader = std::thread::spawn(move || {
            let mut parser = SseParser::new();
            let (lock, cvar) = &*sh;
            let result = loop {
                match body.next(&mut conn, None) {
                    Ok(Some(bytes)) => {
                        let events = parser.push(&bytes);
                        if !events.is_empty() {
                            let mut st = lock.lock().unwrap();
                            for ev in events {
                                if ev.event.as_deref() == Some("endpoint") && st.endpoint.is_none()
                                {
                                    st.endpoint = ev.data.clone();
                                }
                                st.events.push(ev);
                            }
                            cvar.notify_all();
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            let mut st = lock.lock().unwrap();
            st.ended = true;
            st.error = result;
            cvar.notify_all();
        });
        if !head.is_sse() {
            out["warning"] = json!("not a text/event-stream response");
        }
        self.streams.insert(
            name,
            SseStream {
                url,
                sock,
                shared,
                reader: Some(reader),
            },
        );
        Ok(out)
    }

    fn stream(&self, step: &Value) -> Result<&SseStream, String> {
        let name = str_field(step, "stream")?;
        self.streams
            .get(name)
            .ok_or_else(|| format!("no stream {name}"))
    }

    fn sse_wait(&mut self, step: &Value, deadline: Instant) -> Result<Value, String> {
        let s = self.stream(step)?;
        let until_id = step.get("until_id");
        let count = step["count"].as_u64().map(|n| n as usize);
        let (lock, cvar) = &*s.shared;
        let mut st = lock.lock().unwrap();
        let mut timeout = false;
        if until_id.is_some() || count.is_some() {
            loop {
                let done = st.ended
                    || count.is_some_and(|n| st.events.len() >= n)
                    || st.events.iter().any(|e| event_matches(e, until_id));
                if done {
                    break;
                }
                let left = remaining(deadline);
                if left.is_zero() {
                    timeout = true;
                    break;
                }
                st = cvar.wait_timeout(st, left).unwrap().0;
            }
        }
        let events: Vec<Value> = st.events.drain(..).map(|e| e.to_json()).collect();
        let mut out = json!({"events": events, "ended": st.ended});
        if timeout {
            out["timeout"] = json!(true);
        }
        if let Some(e) = &st.error {
            out["stream_error"] = json!(e);
        }
        Ok(out)
    }

    fn sse_endpoint(&mut self, step: &Value, deadline: Instant) -> Result<Value, String> {
        let name = str_field(step, "stream")?.to_string();
        let s = self.stream(step)?;
        let (lock, cvar) = &*s.shared;
        let mut st = lock.lock().unwrap();
        while st.endpoint.is_none() && !st.ended && !remaining(deadline).is_zero() {
            st = cvar.wait_timeout(st, remaining(deadline)).unwrap().0;
        }
        let Some(data) = st.endpoint.clone() else {
            return Err(if st.ended {
                "stream ended without an endpoint event".into()
            } else {
                "timeout waiting for the endpoint event".into()
            });
        };
        drop(st);
        let endpoint = resolve(&s.url, &data);
        self.vars
            .insert(format!("endpoint:{name}"), endpoint.clone());
        Ok(json!({"data": data, "endpoint": endpoint}))
    }

    fn sse_close(&mut self, step: &Value) -> Result<Value, String> {
        let name = str_field(step, "stream")?;
        let mut s = self
            .streams
            .remove(name)
            .ok_or_else(|| format!("no stream {name}"))?;
        let _ = s.sock.shutdown(Shutdown::Both);
        if let Some(t) = s.reader.take() {
            let _ = t.join();
        }
        let st = s.shared.0.lock().unwrap();
        let events: Vec<Value> = st.events.iter().map(SseEvent::to_json).collect();
        Ok(json!({"events": events}))
    }
}

/// An endpoint event's data resolved against the SSE stream's URL.
fn resolve(base: &str, data: &str) -> String {
    if data.starts_with("http://") || data.starts_with("https://") {
        return data.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|i| base[i..].find('/').map(|j| i + j))
        .unwrap_or(base.len());
    if data.starts_with('/') {
        return format!("{}{data}", &base[..origin_end]);
    }
    let path = base[origin_end..].split('?').next().unwrap_or("/");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    format!("{}{dir}{data}", &base[..origin_end])
}

/// Standard Base64 (padding optional, no whitespace); `None` if malformed.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let sextet = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for group in s.chunks(4) {
        if group.len() == 1 {
            return None;
        }
        let mut acc = 0u32;
        for (i, &c) in group.iter().enumerate() {
            acc |= sextet(c)? << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..group.len()]);
    }
    Some(out)
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn build_request(
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("Host: {authority}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("accept") {
        let accept = if method == "GET" {
            "text/event-stream"
        } else {
            "application/json, text/event-stream"
        };
        head.push_str(&format!("accept: {accept}\r\n"));
    }
    if !body.is_empty() && !has("content-type") {
        head.push_str("content-type: application/json\r\n");
    }
    let wants_length = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if wants_length && !has("content-length") && !has("transfer-encoding") {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn write_pieces(
    sock: &mut TcpStream,
    bytes: &[u8],
    chunks: &[usize],
    delay: Duration,
    deadline: Instant,
) -> Result<(), String> {
    sock.set_write_timeout(Some(remaining(deadline).max(Duration::from_millis(1))))
        .ok();
    let mut pos = 0;
    for &n in chunks {
        if pos >= bytes.len() {
            break;
        }
        let end = (pos + n).min(bytes.len());
        sock.write_all(&bytes[pos..end])
            .map_err(|e| format!("write: {e}"))?;
        pos = end;
        std::thread::sleep(delay);
    }
    sock.write_all(&bytes[pos..])
        .map_err(|e| format!("write: {e}"))
}

/// A response head.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_sse(&self) -> bool {
        self.header("content-type")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"))
    }

    fn to_json(&self) -> Value {
        let mut h = Map::new();
        for (k, v) in &self.headers {
            let k = k.to_ascii_lowercase();
            match h.get_mut(&k) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    h.insert(k, json!(v));
                }
            }
        }
        json!({"status": self.status, "headers": h})
    }
}

/// Read more bytes into `conn.pending`. Ok(false) at EOF. `deadline` None: block.
fn fill(conn: &mut Conn, deadline: Option<Instant>) -> Result<bool, String> {
    let timeout = match deadline {
        Some(d) => {
            let left = remaining(d);
            if left.is_zero() {
                return Err("timeout".into());
            }
            Some(left)
        }
        None => None,
    };
    conn.sock.set_read_timeout(timeout).ok();
    let mut buf = [0u8; 16384];
    match conn.sock.read(&mut buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            conn.pending.extend_from_slice(&buf[..n]);
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err("timeout".into())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// Read a final response head (skipping 1xx interim responses other than 101).
fn read_head(conn: &mut Conn, deadline: Instant) -> Result<Head, String> {
    loop {
        let end = loop {
            if let Some(i) = find(&conn.pending, b"\r\n\r\n") {
                break i;
            }
            match fill(conn, Some(deadline)) {
                Ok(true) => {}
                Ok(false) => return Err("connection closed before a response head".into()),
                Err(e) => return Err(format!("{e} before a response head")),
            }
        };
        let text = String::from_utf8_lossy(&conn.pending[..end]).into_owned();
        conn.pending.drain(..end + 4);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        return Ok(Head { status, headers });
    }
}

enum Framing {
    Empty,
    Length(usize),
    Chunked(ChunkState),
    UntilClose,
}

#[derive(Clone, Copy)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailers,
}

/// Decodes a response body as it arrives.
struct BodyReader {
    framing: Framing,
    done: bool,
}

impl BodyReader {
    fn new(head: &Head, method: &str) -> BodyReader {
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let framing = if method == "HEAD" || matches!(head.status, 101 | 204 | 304) {
            Framing::Empty
        } else if chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(n) = head.header("content-length").and_then(|v| v.parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        BodyReader {
            framing,
            done: false,
        }
    }

    /// Whether the connection can carry another request once this body is read.
    fn reusable(&self) -> bool {
        self.done && !matches!(self.framing, Framing::UntilClose)
    }

    /// The next body bytes; Ok(None) once the body is complete.
    fn next(
        &mut self,
        conn: &mut Conn,
        deadline: Option<Instant>,
    ) -> Result<Option<Vec<u8>>, String> {
        loop {
            if self.done {
                return Ok(None);
            }
            match &mut self.framing {
                Framing::Empty | Framing::Length(0) => {
                    self.done = true;
                    continue;
                }
                Framing::Length(n) if !conn.pending.is_empty() => {
                    let take = (*n).min(conn.pending.len());
                    *n -= take;
                    return Ok(Some(conn.pending.drain(..take).collect()));
                }
                Framing::UntilClose if !conn.pending.is_empty() => {
                    return Ok(Some(std::mem::take(&mut conn.pending)));
                }
                Framing::Chunked(state) => {
                    if let Some(out) = decode_chunk(state, &mut conn.pending)? {
                        match out {
                            ChunkOut::Data(d) => return Ok(Some(d)),
                            ChunkOut::End => {
                                self.done = true;
                                continue;
                            }
                        }
                    }
                }
                _ => {}
            }
            if !fill(conn, deadline)? {
                if matches!(self.framing, Framing::UntilClose) {
                    self.done = true;
                    continue;
                }
                return Err("connection closed in the middle of the body".into());
            }
        }
    }
}

enum ChunkOut {
    Data(Vec<u8>),
    End,
}

/// Advance the chunked decoder over `buf`; Ok(None): more bytes needed.
fn decode_chunk(state: &mut ChunkState, buf: &mut Vec<u8>) -> Result<Option<ChunkOut>, String> {
    loop {
        match *state {
            ChunkState::Size => {
                let Some(i) = find(buf, b"\r\n") else {
                    return Ok(None);
                };
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                buf.drain(..i + 2);
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| format!("bad chunk size line {line:?}"))?;
                *state = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(n) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = n.min(buf.len());
                let data: Vec<u8> = buf.drain(..take).collect();
                *state = if take == n {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(n - take)
                };
                return Ok(Some(ChunkOut::Data(data)));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF".into());
                }
                buf.drain(..2);
                *state = ChunkState::Size;
            }
            ChunkState::Trailers => {
                let Some(i) = find(buf, b"\r\n") else {
                    return Ok(None);
                };
                buf.drain(..i + 2);
                if i == 0 {
                    *state = ChunkState::Size;
                    return Ok(Some(ChunkOut::End));
                }
            }
        }
    }
}

/// When an SSE read stops early.
#[derive(Default)]
struct Stop {
    max_events: Option<usize>,
    until_id: Option<Value>,
}

fn no_response(reason: String, conn: &Conn) -> Value {
    json!({"error": reason, "received": String::from_utf8_lossy(&conn.pending)})
}

/// Read one response: its head, then the whole body, or SSE events until `stop`. Returns the
/// output object and whether the connection can be used again.
fn read_response(conn: &mut Conn, method: &str, stop: &Stop, deadline: Instant) -> (Value, bool) {
    let head = match read_head(conn, deadline) {
        Ok(h) => h,
        Err(e) => return (no_response(e, conn), false),
    };
    let mut out = head.to_json();
    let mut body = BodyReader::new(&head, method);
    let close = head
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    if head.is_sse() {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        let mut stopped = false;
        let mut error = None;
        let mut linger_until = None;
        loop {
            let d = linger_until.unwrap_or(deadline);
            match body.next(conn, Some(d)) {
                Ok(Some(bytes)) => {
                    for ev in parser.push(&bytes) {
                        stopped |= event_matches(&ev, stop.until_id.as_ref());
                        events.push(ev.to_json());
                        stopped |= stop.max_events.is_some_and(|n| events.len() >= n);
                    }
                    if stopped && linger_until.is_none() {
                        linger_until = Some((Instant::now() + LINGER).min(deadline));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if !stopped {
                        error = Some(e);
                    }
                    break;
                }
            }
        }
        out["events"] = Value::Array(events);
        out["ended"] = json!(body.done);
        match error.as_deref() {
            Some("timeout") => out["timeout"] = json!(true),
            Some(e) => out["error"] = json!(e),
            None => {}
        }
    } else {
        let mut data = Vec::new();
        loop {
            match body.next(conn, Some(deadline)) {
                Ok(Some(bytes)) => data.extend(bytes),
                Ok(None) => break,
                Err(e) => {
                    out["error"] = json!(e);
                    break;
                }
            }
        }
        out["body"] = json!(String::from_utf8_lossy(&data));
        out["json"] = serde_json::from_slice(&data).unwrap_or(Value::Null);
    }
    (out, body.reusable() && !close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_resolution() {
        let base = "http://127.0.0.1:5/sse";
        assert_eq!(
            resolve(base, "/messages/?session_id=ab"),
            "http://127.0.0.1:5/messages/?session_id=ab"
        );
        assert_eq!(
            resolve(base, "messages?sessionId=1"),
            "http://127.0.0.1:5/messages?sessionId=1"
        );
        assert_eq!(
            resolve("http://1.2.3.4:5/a/sse", "m"),
            "http://1.2.3.4:5/a/m"
        );
        assert_eq!(
            resolve(base, "http://127.0.0.254:9/m"),
            "http://127.0.0.254:9/m"
        );
    }

    #[test]
    fn chunked_decoding_in_pieces() {
        let wire = b"3\r\nabc\r\n1;x=y\r\nd\r\n0\r\nT: v\r\n\r\nNEXT";
        let mut state = ChunkState::Size;
        let mut buf = Vec::new();
        let mut data = Vec::new();
        let mut ended = false;
        for b in wire.iter() {
            buf.push(*b);
            while let Some(out) = decode_chunk(&mut state, &mut buf).unwrap() {
                match out {
                    ChunkOut::Data(d) => data.extend(d),
                    ChunkOut::End => ended = true,
                }
                if ended {
                    break;
                }
            }
            if ended {
                break;
            }
        }
        assert!(ended);
        assert_eq!(data, b"abcd");
    }

    #[test]
    fn base64_bodies() {
        assert_eq!(base64_decode("ZWNobw==").as_deref(), Some(&b"echo"[..]));
        assert_eq!(base64_decode("ZWNobw").as_deref(), Some(&b"echo"[..]));
        assert_eq!(
            base64_decode("H4sI/w").as_deref(),
            Some(&[0x1f, 0x8b, 0x08, 0xff][..])
        );
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("ZW*o"), None);
    }

    #[test]
    fn substitutions() {
        let mut e = Exec {
            conns: HashMap::new(),
            streams: HashMap::new(),
            vars: HashMap::new(),
            timeout: DEFAULT_TIMEOUT,
        };
        e.vars.insert("session:a".into(), "S1".into());
        assert_eq!(
            e.subst("x $session:a, $5 $session:a").unwrap(),
            "x S1, $5 S1"
        );
        assert!(e.subst("$event_id:nope").is_err());
    }
}
