//! Real wire captures replayed through the agent (addresses 127.0.0.100–103, indices 90–93).
//!
//! `tests/fixtures/mcp-wire/*.txt` are the bytes the official Python MCP SDK client and server
//! exchanged on loopback, one file per transport. Each test serves a capture again with two
//! [`ReplayServer`]s on one address (two ports), one behind a permissive policy and one behind a
//! restrictive one, with one agent in front of both; `mcp-client script` then sends the
//! captured requests (bodies and headers as captured, Host aside) through the agent to each:
//! - permissive: where the agent does not intervene it is transparent: every response the
//!   client gets (status, JSON body, each SSE event) is the captured one, and every request the
//!   server gets carries the captured body and headers;
//! - restrictive: the listing loses `list_pods` (hidden), `add` (denied) and `nope` (unlisted)
//!   are answered by the agent and never reach the server, `slow_echo` passes unchanged;
//! - the audit records carry the capture's transport and revision.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use common::{AGENT_BIN, AUDIT_WAIT, CLIENT_BIN, CLIENT_TIMEOUT};
use mcpwarden_tests::replay::{Capture, CapturedResponse, RawEvent, ReplayServer};
use mcpwarden_tests::script::{run_script, ScriptRun};
use mcpwarden_tests::{free_addr, require_root, run_client, test_ip, Agent, AgentOpts, TestCgroup};
use serde_json::{json, Value};

const OPEN_POLICY: &str = r#"{"version":"1","default":"allow"}"#;

const STRICT_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "hide": ["list_pods"],
  "tools": {
    "add": {"action": "deny", "reason": "no adding"},
    "slow_echo": {}, "start_security_scan": {}, "drop_cluster": {}
  }
}"#;

/// One capture file and what the agent must make of it.
struct Wire {
    file: &'static str,
    /// The endpoint path the agent is configured with.
    endpoint: &'static str,
    transport: &'static str,
    revision: &'static str,
}

const HTTP_SSE: Wire = Wire {
    file: "py-2024-11-05-sse.txt",
    endpoint: "/sse",
    transport: "http+sse",
    // That client negotiated 2025-11-25 over the 2024-11-05 transport.
    revision: "2025-11-25",
};
const STREAMABLE_SSE: Wire = Wire {
    file: "py-2025-11-25-streamable.txt",
    endpoint: "/mcp",
    transport: "streamable_http",
    revision: "2025-11-25",
};
const STREAMABLE_JSON: Wire = Wire {
    file: "py-2025-11-25-streamable-json.txt",
    endpoint: "/mcp",
    transport: "streamable_http",
    revision: "2025-11-25",
};
const STATELESS: Wire = Wire {
    file: "py-2026-07-28.txt",
    endpoint: "/mcp",
    transport: "stateless_http",
    revision: "2026-07-28",
};

fn load(file: &str) -> Capture {
    Capture::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/mcp-wire")
            .join(file),
    )
}

/// A capture served twice on one address, one agent in front of both servers. Fields drop in
/// declaration order: agent, servers, cgroup.
struct CaptureRig {
    agent: Agent,
    open: ReplayServer,
    strict: ReplayServer,
    _cg: TestCgroup,
    app: PathBuf,
    capture: Capture,
    wire: Wire,
}

impl CaptureRig {
    fn start(name: &str, index: u8, wire: Wire) -> CaptureRig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let ip = test_ip(index);
        let capture = load(wire.file);
        let open = ReplayServer::start(SocketAddr::new(IpAddr::V4(ip), 0), capture.clone());
        let strict = ReplayServer::start(SocketAddr::new(IpAddr::V4(ip), 0), capture.clone());
        let agent = Agent::start(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: vec![
                    (open.url(wire.endpoint), OPEN_POLICY.to_string()),
                    (strict.url(wire.endpoint), STRICT_POLICY.to_string()),
                ],
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: cg.path().join("agent"),
            },
        );
        CaptureRig {
            agent,
            open,
            strict,
            _cg: cg,
            app,
            capture,
            wire,
        }
    }

    /// Send the captured requests to `server` from inside the attached cgroup.
    fn replay(&self, server: &ReplayServer) -> (Vec<Step>, ScriptRun) {
        let (plan, steps) = plan(&self.capture, server);
        let run = run_script(
            CLIENT_BIN,
            Some(&self.app),
            &json!({ "steps": steps }),
            CLIENT_TIMEOUT,
        );
        (plan, run)
    }

    /// The audit records of `server` (its name is its `IP:PORT`).
    fn records(&self, server: &ReplayServer) -> Vec<Value> {
        let name = server.addr().to_string();
        self.agent
            .audit_lines()
            .into_iter()
            .filter(|r| r["server"] == name.as_str())
            .collect()
    }

    /// Wait (≤ AUDIT_WAIT) for a record of `server` satisfying `pred`.
    fn wait_record(&self, server: &ReplayServer, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        let name = server.addr().to_string();
        self.agent
            .wait_audit(AUDIT_WAIT, |r| r["server"] == name.as_str() && pred(r))
    }
}

/// What one script step checks.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Captured exchange i's request, answered in its own response.
    Request(usize),
    /// The HTTP+SSE GET stream of exchange i opened (its head).
    LegacyOpen(usize),
    /// Its `endpoint` event.
    LegacyEndpoint,
    /// The events before any answer (the endpoint), drained.
    LegacyFirst(usize),
    /// The answer to exchange i's request, on the HTTP+SSE stream.
    StreamAnswer(usize),
    /// A standalone GET stream opened (exchange i).
    StandaloneOpen(usize),
    /// The standalone stream after the DELETE: no event, ended.
    StandaloneEnd,
    Close,
}

/// The script that sends the capture's requests to `server`, and what each step checks.
fn plan(capture: &Capture, server: &ReplayServer) -> (Vec<Step>, Vec<Value>) {
    let mut plan = Vec::new();
    let mut steps = Vec::new();
    let legacy = capture.legacy_stream().map(|l| l as *const _);
    let mut standalone = false;
    for (i, e) in capture.exchanges.iter().enumerate() {
        let headers: Vec<Value> = e
            .request
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
            .map(|(k, v)| json!([k, v]))
            .collect();
        let url = server.url(&e.request.target);
        let sse_get =
            e.request.method == "GET" && e.response.as_ref().is_some_and(CapturedResponse::is_sse);
        if sse_get && legacy == Some(e as *const _) {
            steps.push(
                json!({"op": "sse_open", "stream": "legacy", "url": url, "headers": headers}),
            );
            plan.push(Step::LegacyOpen(i));
            steps.push(json!({"op": "sse_endpoint", "stream": "legacy"}));
            plan.push(Step::LegacyEndpoint);
            steps.push(json!({"op": "sse_wait", "stream": "legacy", "count": 1}));
            plan.push(Step::LegacyFirst(i));
            continue;
        }
        if sse_get {
            steps.push(
                json!({"op": "sse_open", "stream": "standalone", "url": url, "headers": headers}),
            );
            plan.push(Step::StandaloneOpen(i));
            standalone = true;
            continue;
        }
        steps.push(json!({
            "op": "request",
            "conn": format!("c{}", e.conn),
            "url": url,
            "method": e.request.method,
            "headers": headers,
            "body": String::from_utf8(e.request.body.clone()).expect("captured bodies are UTF-8"),
        }));
        plan.push(Step::Request(i));
        if let (Some(_), Some(id)) = (legacy, e.request.rpc().1) {
            steps.push(json!({"op": "sse_wait", "stream": "legacy", "until_id": id}));
            plan.push(Step::StreamAnswer(i));
        }
    }
    if standalone {
        steps.push(
            json!({"op": "sse_wait", "stream": "standalone", "count": 1, "timeout_ms": 3000}),
        );
        plan.push(Step::StandaloneEnd);
        steps.push(json!({"op": "sse_close", "stream": "standalone"}));
        plan.push(Step::Close);
    }
    if legacy.is_some() {
        steps.push(json!({"op": "sse_close", "stream": "legacy"}));
        plan.push(Step::Close);
    }
    (plan, steps)
}

/// What the restrictive policy makes of a captured request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Forwarded; the captured answer comes back unchanged.
    Captured,
    /// Forwarded; the listing comes back without `list_pods`.
    Listing,
    /// `add`: an isError result "no adding" from the agent.
    Denied,
    /// `nope`: -32602 "Unknown tool: nope" from the agent.
    Unknown,
}

fn strict_expect(capture: &Capture, i: usize) -> Expect {
    let req = &capture.exchanges[i].request;
    match (req.rpc().0.as_deref(), req.tool().as_deref()) {
        (Some("tools/list"), _) => Expect::Listing,
        (Some("tools/call"), Some("add")) => Expect::Denied,
        (Some("tools/call"), Some("nope")) => Expect::Unknown,
        _ => Expect::Captured,
    }
}

fn event_json(ev: &RawEvent) -> Value {
    ev.parsed
        .as_ref()
        .map(|e| e.to_json())
        .unwrap_or(Value::Null)
}

/// The captured events that a client sees (comment-only blocks are not events).
fn captured_events<'a>(events: impl IntoIterator<Item = &'a RawEvent>) -> Vec<Value> {
    events
        .into_iter()
        .filter(|e| e.parsed.is_some())
        .map(event_json)
        .collect()
}

/// The captured listing without `list_pods`.
fn filtered_listing(captured: &Value) -> Value {
    let mut v = captured.clone();
    if let Some(tools) = v["result"]["tools"].as_array_mut() {
        tools.retain(|t| t["name"] != "list_pods");
    }
    v
}

/// Every failed check of a test, to report them all at once: each names its phase ((a)
/// permissive, (b) restrictive, (c) audit), what was checked, expected and got.
#[derive(Default)]
struct Checks {
    phase: &'static str,
    failures: Vec<String>,
    /// What to show with the failures (script outputs, the audit).
    context: Vec<String>,
}

impl Checks {
    fn eq(&mut self, what: &str, got: &Value, want: &Value) {
        if got != want {
            self.failures.push(format!(
                "{} {what}:\n    expected {want}\n    got      {got}",
                self.phase
            ));
        }
    }

    fn that(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if !ok {
            self.failures
                .push(format!("{} {what}: {detail}", self.phase));
        }
    }

    /// Start a phase; `context` is shown if any of its checks fail.
    fn phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }

    /// Keep `context` if the current phase failed since `mark` failures.
    fn context_if_failed(&mut self, mark: usize, context: impl FnOnce() -> String) {
        if self.failures.len() > mark {
            let ctx = context();
            self.context.push(format!("--- {} ---\n{ctx}", self.phase));
        }
    }

    fn finish(self, file: &str) {
        assert!(
            self.failures.is_empty(),
            "[{file}] {} check(s) failed:\n- {}\n\n{}",
            self.failures.len(),
            self.failures.join("\n- "),
            self.context.join("\n")
        );
    }
}

/// The captured response, as the client must get it: status, content type, session id, and
/// the JSON body or every SSE event.
fn same_response(c: &mut Checks, what: &str, out: &Value, captured: &CapturedResponse) {
    c.eq(
        &format!("{what}: status"),
        &out["status"],
        &json!(captured.status),
    );
    for h in ["content-type", "mcp-session-id"] {
        if let Some(v) = captured.header(h) {
            c.eq(
                &format!("{what}: header {h}"),
                &out["headers"][h],
                &json!(v),
            );
        }
    }
    match &captured.events {
        Some(events) => {
            c.eq(
                &format!("{what}: SSE events (data, event, id) as captured"),
                &out["events"],
                &Value::Array(captured_events(events)),
            );
            c.eq(
                &format!("{what}: SSE body ended"),
                &out["ended"],
                &json!(true),
            );
        }
        None => c.eq(
            &format!("{what}: body bytes as captured"),
            &out["body"],
            &json!(captured.body_text()),
        ),
    }
}

/// The messages a step received: its SSE events' JSON, or its JSON body.
fn messages(out: &Value) -> Vec<Value> {
    match out["events"].as_array() {
        Some(evs) => evs.iter().map(|e| e["json"].clone()).collect(),
        None => vec![out["json"].clone()],
    }
}

/// The agent's answer to a refused call: `add` denied (isError "no adding"), `nope` unknown.
fn refusal(
    c: &mut Checks,
    what: &str,
    msgs: &[Value],
    id: &Value,
    expect: Expect,
    stateless: bool,
) {
    let [msg] = msgs else {
        c.that(
            &format!("{what}: exactly one answer"),
            false,
            format!("got {msgs:?}"),
        );
        return;
    };
    c.eq(&format!("{what}: answer id"), &msg["id"], id);
    match expect {
        Expect::Denied => {
            c.eq(
                &format!("{what}: isError result"),
                &msg["result"]["isError"],
                &json!(true),
            );
            let text = msg["result"]["content"][0]["text"].as_str().unwrap_or("");
            c.that(
                &format!("{what}: the text gives the policy's reason"),
                text.contains("no adding"),
                format!("text {text:?} in {msg}"),
            );
            if stateless {
                c.eq(
                    &format!("{what}: 2026-07-28 resultType"),
                    &msg["result"]["resultType"],
                    &json!("complete"),
                );
            }
        }
        _ => {
            c.eq(
                &format!("{what}: error code"),
                &msg["error"]["code"],
                &json!(-32602),
            );
            c.eq(
                &format!("{what}: error message"),
                &msg["error"]["message"],
                &json!("Unknown tool: nope"),
            );
        }
    }
}

/// Headers the server must receive as the client sent them: all but Host (the URL's), the
/// hop-by-hop Connection, and Accept-Encoding (MCP requests go out with `identity`).
fn end_to_end(name: &str) -> bool {
    !["host", "connection", "accept-encoding"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// What the server received: the captured requests (those `keep` selects), in order, bodies
/// byte for byte, end-to-end headers as sent.
fn check_received(
    c: &mut Checks,
    capture: &Capture,
    server: &ReplayServer,
    keep: impl Fn(usize) -> bool,
) {
    let got = server.requests();
    let want: Vec<_> = capture
        .exchanges
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, e)| &e.request)
        .collect();
    let line = |m: &str, t: &str| format!("{m} {t}");
    c.eq(
        "server: requests received (method, target) in order",
        &json!(got
            .iter()
            .map(|r| line(&r.method, &r.path))
            .collect::<Vec<_>>()),
        &json!(want
            .iter()
            .map(|r| line(&r.method, &r.target))
            .collect::<Vec<_>>()),
    );
    for (r, w) in got.iter().zip(&want) {
        let what = format!("server: {} {} body {:?}", w.method, w.target, w.rpc());
        c.that(
            &format!("{what}: bytes as the client sent them"),
            r.body == w.body,
            format!(
                "sent {:?}, received {:?}",
                String::from_utf8_lossy(&w.body),
                String::from_utf8_lossy(&r.body)
            ),
        );
        for (k, v) in w.headers.iter().filter(|(k, _)| end_to_end(k)) {
            c.eq(
                &format!("{what}: header {k}"),
                &json!(r.header(k)),
                &json!(v),
            );
        }
    }
}

/// (a) Permissive policy: the client gets the captured responses, the server the captured
/// requests, byte for byte.
fn check_transparent(rig: &CaptureRig, c: &mut Checks) {
    c.phase("(a) permissive");
    let mark = c.failures.len();
    let capture = &rig.capture;
    let (plan, run) = rig.replay(&rig.open);
    for (n, step) in plan.iter().enumerate() {
        let out = run.step(n);
        if let Some(e) = out.get("error") {
            c.that(&format!("step {n} {step:?}"), false, format!("error {e}"));
            continue;
        }
        match *step {
            Step::Request(i) | Step::LegacyOpen(i) | Step::StandaloneOpen(i) => {
                let e = &capture.exchanges[i];
                let what = format!(
                    "client: {} {} {:?}",
                    e.request.method,
                    e.request.target,
                    e.request.rpc()
                );
                let resp = e.response.as_ref().expect("captured response");
                if matches!(step, Step::Request(_)) {
                    same_response(c, &what, out, resp);
                } else {
                    c.eq(
                        &format!("{what}: status"),
                        &out["status"],
                        &json!(resp.status),
                    );
                    let ct = resp.header("content-type").map(|v| json!(v));
                    c.eq(
                        &format!("{what}: content-type"),
                        &out["headers"]["content-type"],
                        &ct.unwrap_or(Value::Null),
                    );
                }
            }
            Step::LegacyEndpoint => c.eq(
                "client: the endpoint event's data",
                &out["data"],
                &json!(capture.legacy_endpoint()),
            ),
            Step::LegacyFirst(i) => {
                let events = capture.exchanges[i]
                    .response
                    .as_ref()
                    .and_then(|r| r.events.as_ref());
                let first =
                    events.map(|evs| captured_events(evs.iter().filter(|e| e.answers().is_none())));
                c.eq(
                    "client: the HTTP+SSE stream's first events as captured",
                    &out["events"],
                    &json!(first),
                );
            }
            Step::StreamAnswer(i) => {
                let id = capture.exchanges[i].request.rpc().1.expect("id");
                c.eq(
                    &format!("client: the answer to id {id} on the HTTP+SSE stream as captured"),
                    &out["events"],
                    &Value::Array(captured_events(capture.stream_answers(&id))),
                );
            }
            Step::StandaloneEnd => {
                c.eq(
                    "client: standalone GET stream events",
                    &out["events"],
                    &json!([]),
                );
                c.eq(
                    "client: standalone GET stream ended after DELETE",
                    &out["ended"],
                    &json!(true),
                );
            }
            Step::Close => {}
        }
    }
    check_received(c, capture, &rig.open, |_| true);
    c.context_if_failed(mark, || run.describe());
}

/// (b) Restrictive policy: listing filtered, `add` and `nope` answered by the agent and never
/// forwarded, the rest as captured.
fn check_enforced(rig: &CaptureRig, c: &mut Checks) {
    c.phase("(b) restrictive");
    let mark = c.failures.len();
    let capture = &rig.capture;
    let stateless = rig.wire.transport == "stateless_http";
    let legacy = capture.legacy_stream().is_some();
    let (plan, run) = rig.replay(&rig.strict);
    for (n, step) in plan.iter().enumerate() {
        let out = run.step(n);
        if let Some(e) = out.get("error") {
            c.that(&format!("step {n} {step:?}"), false, format!("error {e}"));
            continue;
        }
        let (i, on_stream) = match *step {
            Step::Request(i) => (i, false),
            Step::StreamAnswer(i) => (i, true),
            _ => continue,
        };
        let e = &capture.exchanges[i];
        let resp = e.response.as_ref().expect("captured response");
        let id = e.request.rpc().1.unwrap_or(Value::Null);
        let what = format!(
            "client: {} {:?}{}",
            e.request.target,
            e.request.rpc(),
            if on_stream { " (HTTP+SSE stream)" } else { "" }
        );
        let expect = strict_expect(capture, i);
        match (expect, legacy, on_stream) {
            (Expect::Captured, _, false) => same_response(c, &what, out, resp),
            (Expect::Captured, _, true) => c.eq(
                &format!("{what}: as captured"),
                &out["events"],
                &Value::Array(captured_events(capture.stream_answers(&id))),
            ),
            // HTTP+SSE: the POST of a refused or listed call gets 202, the answer comes on the
            // stream.
            (_, true, false) => {
                c.eq(&format!("{what}: status"), &out["status"], &json!(202));
                c.eq(&format!("{what}: body"), &out["body"], &json!("Accepted"));
            }
            (Expect::Listing, _, _) => {
                let captured = match &resp.events {
                    _ if on_stream => capture.stream_answers(&id).first().and_then(|e| e.json()),
                    Some(evs) => evs.iter().find_map(RawEvent::json),
                    None => serde_json::from_slice(&resp.body).ok(),
                }
                .expect("captured listing");
                let got = messages(out);
                c.eq(
                    &format!("{what}: the listing without list_pods, otherwise as captured"),
                    &json!(got),
                    &json!([filtered_listing(&captured)]),
                );
                let names: Vec<&str> = got
                    .first()
                    .and_then(|m| m["result"]["tools"].as_array())
                    .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
                    .unwrap_or_default();
                c.that(
                    &format!("{what}: list_pods hidden"),
                    !names.contains(&"list_pods"),
                    format!("{names:?}"),
                );
                if !on_stream {
                    c.eq(
                        &format!("{what}: status"),
                        &out["status"],
                        &json!(resp.status),
                    );
                }
            }
            (Expect::Denied | Expect::Unknown, _, _) => {
                if !on_stream {
                    c.eq(&format!("{what}: status"), &out["status"], &json!(200));
                }
                refusal(c, &what, &messages(out), &id, expect, stateless);
            }
        }
    }
    let refused = |i: usize| matches!(strict_expect(capture, i), Expect::Denied | Expect::Unknown);
    check_received(c, capture, &rig.strict, |i| !refused(i));
    c.eq(
        "server: tools/call received (add and nope never forwarded)",
        &json!(rig.strict.tool_calls()),
        &json!(["slow_echo"]),
    );
    c.context_if_failed(mark, || run.describe());
}

/// (c) Audit: transport and revision on every message record; allowed, refused and filtered
/// calls recorded as such; no false alarm.
fn check_audit(rig: &CaptureRig, c: &mut Checks) {
    c.phase("(c) audit");
    let mark = c.failures.len();
    let (t, rev) = (rig.wire.transport, rig.wire.revision);
    let record =
        |c: &mut Checks, server: &ReplayServer, what: &str, pred: &dyn Fn(&Value) -> bool| {
            let found = rig.wait_record(server, pred);
            c.that(what, found.is_some(), "no such record");
            found.unwrap_or(Value::Null)
        };
    // Permissive: every call allowed, forwarded and answered by the server.
    for (tool, is_error) in [("add", false), ("slow_echo", false), ("nope", true)] {
        let req = record(
            c,
            &rig.open,
            &format!("permissive: request record of {tool}"),
            &|r| r["event"] == "request" && r["tool"] == tool,
        );
        c.eq(
            &format!("permissive: {tool} decision"),
            &req["decision"],
            &json!("allow"),
        );
        let resp = record(
            c,
            &rig.open,
            &format!("permissive: response record of {tool}"),
            &|r| r["event"] == "response" && r["tool"] == tool,
        );
        c.eq(
            &format!("permissive: {tool} is_error"),
            &resp["is_error"],
            &json!(is_error),
        );
        c.eq(
            &format!("permissive: {tool} status"),
            &resp["status"],
            &json!(200),
        );
    }
    let listing = record(
        c,
        &rig.open,
        "permissive: response record of tools/list",
        &|r| r["event"] == "response" && r["method"] == "tools/list",
    );
    c.that(
        "permissive: the listing hides nothing",
        listing["hidden_tools"].is_null() || listing["hidden_tools"] == json!([]),
        &listing,
    );
    // Restrictive: add and nope refused, the listing filtered, slow_echo answered.
    let add = record(c, &rig.strict, "restrictive: refused record of add", &|r| {
        r["event"] == "refused" && r["tool"] == "add"
    });
    c.eq(
        "restrictive: add decision",
        &add["decision"],
        &json!("deny"),
    );
    c.eq(
        "restrictive: add reason",
        &add["reason"],
        &json!("no adding"),
    );
    let nope = record(
        c,
        &rig.strict,
        "restrictive: refused record of nope",
        &|r| r["event"] == "refused" && r["tool"] == "nope",
    );
    c.eq(
        "restrictive: nope decision",
        &nope["decision"],
        &json!("deny"),
    );
    let listing = record(
        c,
        &rig.strict,
        "restrictive: response record of tools/list",
        &|r| r["event"] == "response" && r["method"] == "tools/list",
    );
    c.eq(
        "restrictive: hidden_tools of the listing",
        &listing["hidden_tools"],
        &json!(["list_pods"]),
    );
    let slow = record(
        c,
        &rig.strict,
        "restrictive: response record of slow_echo",
        &|r| r["event"] == "response" && r["tool"] == "slow_echo",
    );
    c.eq(
        "restrictive: slow_echo is_error",
        &slow["is_error"],
        &json!(false),
    );

    for (label, server, forwarded) in [
        ("permissive", &rig.open, 1),
        ("restrictive", &rig.strict, 0),
    ] {
        let records = rig.records(server);
        for tool in ["add", "nope"] {
            let n = records
                .iter()
                .filter(|r| r["event"] == "request" && r["tool"] == tool)
                .count();
            c.eq(
                &format!("{label}: request records of {tool}"),
                &json!(n),
                &json!(forwarded),
            );
        }
        for r in &records {
            let event = r["event"].as_str().unwrap_or("");
            if ["request", "response", "refused"].contains(&event) && !r["method"].is_null() {
                let what = format!(
                    "{label}: transport and revision of the {event} record of {} id {}",
                    r["method"], r["id"]
                );
                c.eq(
                    &what,
                    &json!([r["transport"], r["revision"]]),
                    &json!([t, rev]),
                );
            }
            // The servers write whole events and answer every call: none of these can be true.
            let reason = r["reason"].as_str().unwrap_or("");
            let false_alarm = [
                "answer to no call",
                "could not be read",
                "ended inside an event",
            ];
            c.that(
                &format!("{label}: no false alarm"),
                !false_alarm.iter().any(|f| reason.contains(f)),
                format!(
                    "{} record of {} {}: {reason:?}",
                    r["event"], r["http_method"], r["path"]
                ),
            );
        }
    }
    c.context_if_failed(mark, || rig.agent.audit_text());
}

/// (a) The SSE answers to POSTs byte for byte: the whole body, each event's bytes included
/// (the script's client reports events parsed; `raw-request` prints the exact body bytes).
/// Runs last: it sends those captured requests to the permissive server once more.
fn check_sse_bytes(rig: &CaptureRig, c: &mut Checks) {
    c.phase("(a) permissive, SSE bytes");
    for e in &rig.capture.exchanges {
        let Some(resp) = e.response.as_ref().filter(|r| r.is_sse()) else {
            continue;
        };
        if e.request.method != "POST" {
            continue;
        }
        let body = String::from_utf8(e.request.body.clone()).expect("captured bodies are UTF-8");
        let mut args = vec![
            "raw-request".to_string(),
            "POST".into(),
            rig.open.url(&e.request.target),
            body,
        ];
        // The MCP headers as captured (raw-request writes Host, content-type and accept).
        for (k, v) in &e.request.headers {
            if k.to_ascii_lowercase().starts_with("mcp-") {
                args.push(format!("{k}: {v}"));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = run_client(CLIENT_BIN, Some(&rig.app), &args, CLIENT_TIMEOUT);
        let got = run.body().unwrap_or_default();
        let mark = c.failures.len();
        let want = &resp.body;
        let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        let tail = |b: &[u8]| format!("{:?}", String::from_utf8_lossy(&b[at.saturating_sub(12)..]));
        c.that(
            &format!(
                "client: SSE body of {:?} byte for byte as captured",
                e.request.rpc()
            ),
            got == *want,
            format!(
                "expected {} bytes, got {}; from byte {}: expected …{} got …{}",
                want.len(),
                got.len(),
                at.saturating_sub(12),
                tail(want),
                tail(&got)
            ),
        );
        c.context_if_failed(mark, || run.describe());
    }
}

fn replay_capture(name: &str, index: u8, wire: Wire) {
    let rig = CaptureRig::start(name, index, wire);
    let mut c = Checks::default();
    check_transparent(&rig, &mut c);
    check_enforced(&rig, &mut c);
    check_audit(&rig, &mut c);
    check_sse_bytes(&rig, &mut c);
    c.finish(rig.wire.file);
}

/// 2024-11-05 HTTP+SSE (the client negotiates 2025-11-25): answers and refusals on the GET
/// stream, POSTs answered 202.
#[test]
fn python_sdk_http_sse_capture_replayed() {
    replay_capture("cap-sse", 90, HTTP_SSE);
}

/// Streamable HTTP 2025-11-25 with SSE answers, a standalone GET stream and a DELETE.
#[test]
fn python_sdk_streamable_sse_capture_replayed() {
    replay_capture("cap-streamable", 91, STREAMABLE_SSE);
}

/// Streamable HTTP 2025-11-25 with JSON answers.
#[test]
fn python_sdk_streamable_json_capture_replayed() {
    replay_capture("cap-json", 92, STREAMABLE_JSON);
}

/// 2026-07-28 stateless: `Mcp-Method`/`Mcp-Name` headers, `_meta` revision, private listing.
#[test]
fn python_sdk_stateless_2026_capture_replayed() {
    replay_capture("cap-2026", 93, STATELESS);
}
