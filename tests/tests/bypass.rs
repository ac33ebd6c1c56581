//! Bypass attempts, table-driven: every other spelling of a call the policy refuses (JSON
//! escapes, duplicate keys, response-shaped requests, content codings, batches, 2026-07-28
//! header/body mismatches, method-name case, pipelining, HTTP/2, SSE split across TCP segments,
//! odd request paths) is refused, or decided exactly like its plain form, and never executed.
//!
//! Each case is one `mcp-client script` run (its own pid, so its audit records are its own)
//! against one [`PeerRig`] per test function, run one after another so that what reached the
//! peer during a case is known. Every case prints `case NAME: ok` or `case NAME: FAILED: …`;
//! the test fails at the end with the names of all failing cases (addresses 127.0.0.90–91).

mod common;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use common::peer_rig::*;
use common::AUDIT_WAIT;
use mcpwarden_tests::{base64_encode as base64, wait_for, PeerOpts, PeerRequest};
use serde_json::{json, Value};

const SECRET: &str = "secret_dump";
const SCAN: &str = "start_security_scan";
const DROP: &str = "drop_cluster";
const ECHO: &str = "echo";
/// Tools that no case may get executed.
const NEVER: [&str; 3] = [SECRET, SCAN, DROP];
/// The id of every single-message case (each case is its own client: ids need not differ).
const ID: u64 = 7;
const REVISION_2026: &str = "2026-07-28";
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// What a case must produce.
enum Expect {
    /// The plain call of this tool: what [`PEER_POLICY`] says (`secret_dump` and
    /// `start_security_scan`: -32602 `Unknown tool`; `drop_cluster`: an isError result naming
    /// the reason; `echo`: forwarded and answered). Its answer is what `Like` compares with.
    Plain(&'static str),
    /// Decided exactly like the plain call of this tool: the same answer (HTTP status, id,
    /// JSON-RPC error, or isError and text), the same audit event, and forwarded only if the
    /// plain call is.
    Like(&'static str),
    /// Refused as malformed: this HTTP status and JSON-RPC error code, nothing forwarded, a
    /// `refused` record.
    Malformed(u16, i64),
    /// Refused before any JSON-RPC is read (a content coding, a tunnel): this HTTP status,
    /// nothing forwarded, a `refused` record with that status.
    Status(u16),
    /// Case-specific; `Ok` carries a note for the output (what the agent did).
    Check(fn(&Outcome) -> Result<String, String>),
}

struct Case {
    name: &'static str,
    steps: Vec<Value>,
    expect: Expect,
}

fn case(name: &'static str, steps: Vec<Value>, expect: Expect) -> Case {
    Case {
        name,
        steps,
        expect,
    }
}

/// What one case did.
struct Outcome<'a> {
    rig: &'a PeerRig,
    pid: u32,
    /// The script's output, one value per step.
    steps: Vec<Value>,
    /// The HTTP responses of the `request` and `raw` steps, in order (a raw step's responses
    /// one by one; a connection that gave none is an object with `error` and no `status`).
    responses: Vec<Value>,
    /// Every HTTP request that reached the peer during the case.
    requests: Vec<PeerRequest>,
    /// Every tools/call the peer executed during the case.
    calls: Vec<(String, Value)>,
    /// The normalised answers of the plain calls, by tool.
    plain: &'a HashMap<&'static str, Value>,
}

impl Outcome<'_> {
    /// The only HTTP response of the case.
    fn response(&self) -> Result<&Value, String> {
        match self.responses.as_slice() {
            [r] => Ok(r),
            rs => Err(format!("expected one HTTP response, got {}", rs.len())),
        }
    }

    /// The only JSON-RPC answer (a message with `result` or `error`) of the only response.
    fn answer(&self) -> Result<(&Value, Value), String> {
        let resp = self.response()?;
        match answers(resp).as_slice() {
            [a] => Ok((resp, a.clone())),
            other => Err(format!(
                "expected one JSON-RPC answer, got {}: {}",
                other.len(),
                json!(other)
            )),
        }
    }

    fn nothing_forwarded(&self) -> Result<(), String> {
        if self.requests.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} request(s) reached the peer: {}",
            self.requests.len(),
            self.requests
                .iter()
                .map(describe_request)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }

    /// The tools/calls executed during the case must be exactly these (name, arguments).
    fn executed(&self, want: &[(&str, Value)]) -> Result<(), String> {
        let want: Vec<(String, Value)> = want
            .iter()
            .map(|(t, a)| (t.to_string(), a.clone()))
            .collect();
        if self.calls == want {
            return Ok(());
        }
        Err(format!(
            "the peer executed {:?}, expected {want:?}",
            self.calls
        ))
    }

    /// An audit record of this case's client satisfying `pred` (waits up to [`AUDIT_WAIT`]).
    fn audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
        wait_for(AUDIT_WAIT, || {
            self.rig
                .agent
                .audit_lines()
                .into_iter()
                .find(|r| r["pid"] == self.pid && pred(r))
        })
        .ok_or_else(|| format!("no audit record: {what}"))
    }

    fn audit_refused(&self, tool: Option<&str>) -> Result<Value, String> {
        self.audit(&format!("`refused` of {tool:?}"), |r| {
            r["event"] == "refused" && tool.is_none_or(|t| r["tool"] == t)
        })
    }

    fn audit_request(&self, tool: &str) -> Result<Value, String> {
        self.audit(&format!("`request` allowing {tool}"), |r| {
            r["event"] == "request" && r["tool"] == tool && r["decision"] == "allow"
        })
    }

    /// The audit records of this case's client, for failure reports.
    fn audit_lines(&self) -> Vec<Value> {
        self.rig
            .agent
            .audit_lines()
            .into_iter()
            .filter(|r| r["pid"] == self.pid)
            .collect()
    }

    fn describe(&self) -> String {
        let mut out = String::from("  script output:\n");
        for s in &self.steps {
            out.push_str(&format!("    {}\n", clip(&s.to_string(), 1500)));
        }
        out.push_str("  reached the peer:\n");
        for r in &self.requests {
            out.push_str(&format!("    {}\n", describe_request(r)));
        }
        out.push_str(&format!("  executed: {:?}\n  audit:\n", self.calls));
        for r in self.audit_lines() {
            out.push_str(&format!("    {r}\n"));
        }
        out
    }
}

fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn describe_request(r: &PeerRequest) -> String {
    let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "{} {} [{}] {}",
        r.method,
        r.path,
        headers.join(", "),
        clip(&String::from_utf8_lossy(&r.body), 400)
    )
}

/// The JSON-RPC messages of a response: its JSON body (one object or a batch), or the JSON of
/// its SSE events.
fn messages(resp: &Value) -> Vec<Value> {
    match &resp["json"] {
        Value::Array(items) => items.clone(),
        v @ Value::Object(_) => vec![v.clone()],
        _ => event_messages(resp),
    }
}

/// The answers (messages with `result` or `error`) of a response.
fn answers(resp: &Value) -> Vec<Value> {
    messages(resp)
        .into_iter()
        .filter(|m| {
            m.get("method").is_none() && (m.get("result").is_some() || m.get("error").is_some())
        })
        .collect()
}

/// What a client learns from an answer: the HTTP status, the id, the error's code and
/// message, or the result's isError and first text (fields 2026-07-28 adds are left out).
fn normalise(resp: &Value, answer: &Value) -> Value {
    let mut n = json!({"status": resp["status"], "id": answer["id"]});
    if let Some(e) = answer.get("error") {
        n["error"] = json!({"code": e["code"], "message": e["message"]});
    }
    if let Some(r) = answer.get("result") {
        n["isError"] = json!(r["isError"] == true);
        n["text"] = r["content"][0]["text"].clone();
    }
    n
}

/// The answer `PEER_POLICY` gives a plain call of `tool` with id [`ID`].
fn policy_answer(tool: &str) -> Value {
    match tool {
        SECRET | SCAN => json!({"status": 200, "id": ID,
            "error": {"code": -32602, "message": format!("Unknown tool: {tool}")}}),
        DROP => json!({"status": 200, "id": ID, "isError": true,
            "text": "Denied by mcpwarden policy: destructive. Do not retry this call."}),
        ECHO => json!({"status": 200, "id": ID, "isError": false, "text": "hi"}),
        other => panic!("no plain form for {other}"),
    }
}

/// The arguments every case gives `tool`.
fn args(tool: &str) -> Value {
    match tool {
        ECHO => json!({"text": "hi"}),
        SCAN | DROP => json!({"cluster": "prod"}),
        _ => json!({}),
    }
}

/// The plain call of `tool`.
fn plain(tool: &str) -> String {
    call(ID, tool, args(tool))
}

/// `body` with the first `from` replaced by `to`; panics if there is none, so that no variant
/// is silently its plain form.
fn alter(body: &str, from: &str, to: &str) -> String {
    assert!(body.contains(from), "{from:?} is not in {body}");
    body.replacen(from, to, 1)
}

/// Checks shared by `Plain` and `Like`: the answer, then where it went and what was audited.
/// Returns the normalised answer.
fn decided_like(o: &Outcome, tool: &str, reference: &Value) -> Result<Value, String> {
    let (resp, answer) = o.answer()?;
    let got = normalise(resp, &answer);
    if got != *reference {
        return Err(format!("answered {got}, the plain form is {reference}"));
    }
    if tool == ECHO {
        o.executed(&[(ECHO, args(ECHO))])?;
        o.audit_request(ECHO)?;
    } else {
        o.nothing_forwarded()?;
        let rec = o.audit_refused(Some(tool))?;
        if tool == SECRET && rec["rule"] != "/hide" {
            return Err(format!("refused by rule {} instead of /hide", rec["rule"]));
        }
    }
    Ok(got)
}

fn check(o: &Outcome, expect: &Expect) -> Result<String, String> {
    match expect {
        Expect::Plain(tool) => decided_like(o, tool, &policy_answer(tool)).map(|_| String::new()),
        Expect::Like(tool) => {
            let reference = o
                .plain
                .get(tool)
                .ok_or_else(|| format!("the plain {tool} case did not pass"))?;
            decided_like(o, tool, reference).map(|_| String::new())
        }
        Expect::Malformed(status, code) => {
            let resp = o.response()?;
            let (got_status, got_code) = (&resp["status"], &resp["json"]["error"]["code"]);
            if *got_status != *status || *got_code != *code {
                return Err(format!(
                    "expected HTTP {status} with JSON-RPC {code}, got HTTP {got_status} with {got_code}"
                ));
            }
            o.nothing_forwarded()?;
            o.audit_refused(None)?;
            Ok(String::new())
        }
        Expect::Status(status) => {
            let resp = o.response()?;
            if resp["status"] != *status {
                return Err(format!(
                    "expected HTTP {status}, got {} ({})",
                    resp["status"], resp["body"]
                ));
            }
            o.nothing_forwarded()?;
            o.audit("`refused` with that status", |r| {
                r["event"] == "refused" && r["status"] == *status
            })?;
            Ok(String::new())
        }
        Expect::Check(f) => f(o),
    }
}

/// Run `cases` in order against `rig`; print each verdict; panic at the end naming every
/// failing case.
fn run_cases(rig: &PeerRig, cases: Vec<Case>) {
    let mut plain_answers: HashMap<&'static str, Value> = HashMap::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let started = std::time::Instant::now();
    for case in &cases {
        let (req_before, calls_before) = (rig.peer.requests().len(), rig.peer.tool_calls().len());
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| rig.script(json!(case.steps))));
        let run = match run {
            Ok(run) => run,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("case {}: FAILED: the script run failed", case.name);
                failures.push((
                    case.name.to_string(),
                    format!("the script run failed: {msg}"),
                ));
                continue;
            }
        };
        let responses = run
            .steps
            .iter()
            .flat_map(|s| match s["op"].as_str() {
                Some("request") => vec![s.clone()],
                Some("raw") => s["responses"].as_array().cloned().unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect();
        let o = Outcome {
            rig,
            pid: run.run.pid,
            steps: run.steps.clone(),
            responses,
            requests: rig.peer.requests().split_off(req_before),
            calls: rig.peer.tool_calls().split_off(calls_before),
            plain: &plain_answers,
        };
        let mut verdict = check(&o, &case.expect);
        if let Some((tool, _)) = o.calls.iter().find(|(t, _)| NEVER.contains(&t.as_str())) {
            verdict = Err(format!("the peer EXECUTED {tool}"));
        }
        match verdict {
            Ok(note) if note.is_empty() => println!("case {}: ok", case.name),
            Ok(note) => println!("case {}: ok ({note})", case.name),
            Err(e) => {
                println!("case {}: FAILED: {e}", case.name);
                failures.push((case.name.to_string(), format!("{e}\n{}", o.describe())));
                continue;
            }
        }
        if let Expect::Plain(tool) = case.expect {
            plain_answers.insert(tool, policy_answer(tool));
        }
    }
    for tool in NEVER {
        let n = rig.peer.calls(tool);
        if n != 0 {
            failures.push((
                "(whole run)".into(),
                format!("the peer executed {tool} {n} time(s)"),
            ));
        }
    }
    println!(
        "{} cases ran in {:.1} s, {} failed",
        cases.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|(n, _)| n.as_str()).collect();
        let details: Vec<String> = failures
            .iter()
            .map(|(n, d)| format!("case {n}: {d}"))
            .collect();
        panic!(
            "{} of {} bypass cases failed: {}\n\n{}",
            failures.len(),
            cases.len(),
            names.join(", "),
            details.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Steps.

/// A POST of `body` to `url`.
fn post(url: String, body: impl Into<String>) -> Value {
    json!({"op": "request", "url": url, "body": body.into()})
}

/// A POST of `body` to `url` with these headers.
fn post_h(url: String, headers: &[(&str, &str)], body: impl Into<String>) -> Value {
    let mut step = post(url, body);
    step["headers"] = json!(headers
        .iter()
        .map(|(k, v)| json!([k, v]))
        .collect::<Vec<_>>());
    step
}

/// A POST of the bytes `body` with these headers.
fn post_bytes(url: String, headers: &[(&str, &str)], body: &[u8]) -> Value {
    let mut step = post_h(url, headers, "");
    step.as_object_mut().unwrap().remove("body");
    step["body_base64"] = json!(base64(body));
    step
}

/// The 2026-07-28 headers of a request: the version, `Mcp-Method`, and `Mcp-Name` if given.
fn h26<'a>(method: &'a str, name: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("MCP-Protocol-Version", REVISION_2026),
        ("Mcp-Method", method),
    ];
    if let Some(n) = name {
        h.push(("Mcp-Name", n));
    }
    h
}

/// A 2026-07-28 tools/call (the version in `params._meta` too, as its clients send it).
fn call26(tool: &str) -> String {
    rpc(
        json!(ID),
        "tools/call",
        json!({"name": tool, "arguments": args(tool), "_meta": {META_VERSION: REVISION_2026}}),
    )
}

/// One HTTP/1.1 POST as bytes on the wire.
fn http1(authority: &str, target: &str, body: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: {authority}\r\ncontent-type: application/json\r\n\
         accept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A raw write of `bytes` to the peer's address, reading `responses` responses.
fn raw(rig: &PeerRig, bytes: String, responses: u64) -> Value {
    json!({"op": "raw", "addr": rig.peer.addr().to_string(), "bytes": bytes, "responses": responses})
}

/// Bits written least significant first, as DEFLATE packs them.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, len: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, whose bits go most significant first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = (0..len).fold(0, |r, i| r | ((code >> i) & 1) << (len - 1 - i));
        self.put(reversed, len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// DEFLATE (RFC 1951): one final block with the fixed Huffman codes, literals only. Not
/// smaller, but really coded: no byte of the JSON appears in it as it is.
fn deflate_fixed(data: &[u8]) -> Vec<u8> {
    let mut bits = Bits::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed Huffman codes
    for &byte in data {
        let v = u32::from(byte);
        if v < 144 {
            bits.code(0x30 + v, 8);
        } else {
            bits.code(0x190 + v - 144, 9);
        }
    }
    bits.code(0, 7); // end of block
    bits.finish()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// `Content-Encoding: gzip` (RFC 1952).
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.extend(deflate_fixed(data));
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

/// `Content-Encoding: deflate`: the zlib format (RFC 1950), as HTTP defines it.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    out.extend(deflate_fixed(data));
    out.extend(adler32(data).to_be_bytes());
    out
}

/// One HTTP/2 frame.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
}

/// A plaintext HTTP/2 connection with prior knowledge: the preface, an empty SETTINGS, then a
/// POST of `body` to /mcp on stream 1 (HPACK literals without Huffman coding). Every byte is
/// ASCII, so the script can carry it in a JSON string.
fn h2c_prior_knowledge(authority: &str, body: &str) -> String {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, 0x4, 0, 0, &[]);
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/mcp"),
        (":authority", authority),
        ("content-type", "application/json"),
    ] {
        block.push(0); // literal header field without indexing, new name
        block.push(k.len() as u8);
        block.extend(k.bytes());
        block.push(v.len() as u8);
        block.extend(v.bytes());
    }
    h2_frame(&mut out, 0x1, 0x4, 1, &block); // HEADERS, END_HEADERS
    h2_frame(&mut out, 0x0, 0x1, 1, body.as_bytes()); // DATA, END_STREAM
    assert!(out.is_ascii(), "the HTTP/2 bytes must be ASCII");
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Case-specific checks.

/// The answer with this id among a response's messages.
fn answer_for(resp: &Value, id: u64) -> Result<Value, String> {
    answers(resp)
        .into_iter()
        .find(|m| m["id"] == id)
        .ok_or_else(|| format!("no answer for id {id}"))
}

fn expect_text(answer: &Value, text: &str) -> Result<(), String> {
    if answer["result"]["content"][0]["text"] == text && answer["result"]["isError"] != true {
        return Ok(());
    }
    Err(format!(
        "expected a result with text {text:?}, got {answer}"
    ))
}

fn expect_error(answer: &Value, code: i64, message: &str) -> Result<(), String> {
    if answer["error"]["code"] == code && answer["error"]["message"] == message {
        return Ok(());
    }
    Err(format!("expected error {code} {message:?}, got {answer}"))
}

/// The batch `[echo 1, secret_dump 2, notifications/initialized, add 4]`.
fn mixed_batch() -> String {
    format!(
        "[{},{},{},{}]",
        call(1, ECHO, args(ECHO)),
        call(2, SECRET, json!({})),
        notification("notifications/initialized"),
        call(4, "add", json!({"a": 1, "b": 2})),
    )
}

/// The answers to [`mixed_batch`] on `resp`, and what the peer got.
fn mixed_batch_answered(o: &Outcome, resp: &Value) -> Result<(), String> {
    expect_text(&answer_for(resp, 1)?, "hi")?;
    expect_error(&answer_for(resp, 2)?, -32602, "Unknown tool: secret_dump")?;
    expect_text(&answer_for(resp, 4)?, "3")?;
    let [forwarded] = o.requests.as_slice() else {
        return Err(format!(
            "expected one request at the peer, got {}",
            o.requests.len()
        ));
    };
    let methods: Vec<(Value, Value)> = match forwarded.json() {
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| (m["method"].clone(), m["params"]["name"].clone()))
            .collect(),
        other => return Err(format!("the peer got {other:?}, not a batch")),
    };
    let want = vec![
        (json!("tools/call"), json!(ECHO)),
        (json!("notifications/initialized"), Value::Null),
        (json!("tools/call"), json!("add")),
    ];
    if methods != want {
        return Err(format!(
            "the peer got the batch {methods:?}, expected {want:?}"
        ));
    }
    o.executed(&[(ECHO, args(ECHO)), ("add", json!({"a": 1, "b": 2}))])?;
    o.audit_refused(Some(SECRET))?;
    o.audit_request(ECHO)?;
    o.audit_request("add")?;
    Ok(())
}

fn batch_mixed_json(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    let ids: Vec<Value> = match &resp["json"] {
        Value::Array(items) => items.iter().map(|m| m["id"].clone()).collect(),
        other => return Err(format!("expected a JSON array, got {other}")),
    };
    if ids != [json!(1), json!(2), json!(4)] {
        return Err(format!(
            "answers in the order {ids:?}, not the client's [1, 2, 4]"
        ));
    }
    mixed_batch_answered(o, resp)?;
    Ok(String::new())
}

fn batch_mixed_sse(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    if resp["events"].as_array().is_none_or(Vec::is_empty) {
        return Err(format!("expected an SSE answer, got {resp}"));
    }
    mixed_batch_answered(o, resp)?;
    let ids: Vec<Value> = answers(resp).iter().map(|m| m["id"].clone()).collect();
    Ok(format!("events answer ids {ids:?}"))
}

fn batch_only_refused(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    if resp["status"] != 200 || !resp["json"].is_array() {
        return Err(format!("expected HTTP 200 with a JSON array, got {resp}"));
    }
    expect_error(&answer_for(resp, 1)?, -32602, "Unknown tool: secret_dump")?;
    expect_error(
        &answer_for(resp, 2)?,
        -32602,
        "Unknown tool: start_security_scan",
    )?;
    let denied = answer_for(resp, 3)?;
    if denied["result"]["isError"] != true {
        return Err(format!(
            "drop_cluster: expected an isError result, got {denied}"
        ));
    }
    o.nothing_forwarded()?;
    for tool in NEVER {
        o.audit_refused(Some(tool))?;
    }
    Ok(String::new())
}

/// A gzip-compressed batch `[echo, secret_dump]`: split after decoding.
fn batch_gzip(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    expect_text(&answer_for(resp, 1)?, "hi")?;
    expect_error(&answer_for(resp, 2)?, -32602, "Unknown tool: secret_dump")?;
    let [forwarded] = o.requests.as_slice() else {
        return Err(format!(
            "expected one request at the peer, got {}",
            o.requests.len()
        ));
    };
    if forwarded.header("content-encoding").is_some() {
        return Err("the split batch went on with its Content-Encoding".into());
    }
    if forwarded.json()
        != Some(json!([serde_json::from_str::<Value>(&call(
            1,
            ECHO,
            args(ECHO)
        ))
        .unwrap()]))
    {
        return Err(format!("the peer got {}", describe_request(forwarded)));
    }
    o.executed(&[(ECHO, args(ECHO))])?;
    o.audit_refused(Some(SECRET))?;
    Ok(String::new())
}

/// An echo call sent gzip-compressed is answered like the plain one and reaches the peer
/// decoded: no Content-Encoding, the plain JSON bytes.
fn gzip_echo_forwarded_decoded(o: &Outcome) -> Result<String, String> {
    let reference = o
        .plain
        .get(ECHO)
        .ok_or("the plain echo case did not pass")?;
    decided_like(o, ECHO, reference)?;
    let [forwarded] = o.requests.as_slice() else {
        return Err(format!(
            "expected one request at the peer, got {}",
            o.requests.len()
        ));
    };
    if let Some(ce) = forwarded.header("content-encoding") {
        return Err(format!("forwarded with Content-Encoding: {ce}"));
    }
    if forwarded.body != plain(ECHO).as_bytes() {
        return Err(format!(
            "forwarded body is not the decoded JSON: {}",
            describe_request(forwarded)
        ));
    }
    let length = forwarded.header("content-length");
    if length != Some(forwarded.body.len().to_string().as_str()) {
        return Err(format!("forwarded with content-length {length:?}"));
    }
    Ok(String::new())
}

/// Two pipelined requests, `first` then `second`: each decided on its own.
fn pipelined(o: &Outcome, first: &str, second: &str) -> Result<String, String> {
    let [a, b] = o.responses.as_slice() else {
        return Err(format!("expected two responses, got {}", o.responses.len()));
    };
    for (resp, tool, id) in [(a, first, 1), (b, second, 2)] {
        let answer = answer_for(resp, id)?;
        if tool == ECHO {
            expect_text(&answer, "hi")?;
        } else {
            expect_error(&answer, -32602, "Unknown tool: secret_dump")?;
        }
    }
    if o.requests.len() != 1 {
        return Err(format!(
            "expected one request at the peer, got {}",
            o.requests.len()
        ));
    }
    o.executed(&[(ECHO, args(ECHO))])?;
    o.audit_refused(Some(SECRET))?;
    o.audit_request(ECHO)?;
    Ok(String::new())
}

fn pipelined_echo_secret(o: &Outcome) -> Result<String, String> {
    pipelined(o, ECHO, SECRET)
}

fn pipelined_secret_echo(o: &Outcome) -> Result<String, String> {
    pipelined(o, SECRET, ECHO)
}

/// Something that is not an HTTP/1.1 request the agent can read: closed or answered with an
/// error, and nothing reaches the peer.
fn not_read(o: &Outcome) -> Result<String, String> {
    o.nothing_forwarded()?;
    let resp = o.response()?;
    let note = match resp["status"].as_u64() {
        Some(s) if s >= 400 => format!("answered HTTP {s}"),
        Some(s) => return Err(format!("answered HTTP {s}: {resp}")),
        None => format!("closed: {}", resp["error"]),
    };
    let rec = o.audit_refused(None)?;
    Ok(format!("{note}; refused: {}", rec["reason"]))
}

/// Content-Length and Transfer-Encoding together: either refused, or the body read one way
/// only (chunked) and decided; never executed.
fn cl_and_te(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    let status = resp["status"].as_u64();
    if status == Some(200) {
        let (_, answer) = o.answer()?;
        expect_error(&answer, -32602, "Unknown tool: secret_dump")?;
        o.nothing_forwarded()?;
        o.audit_refused(Some(SECRET))?;
        return Ok("read as chunked and decided".into());
    }
    o.nothing_forwarded()?;
    match status {
        Some(s) if s >= 400 => Ok(format!("answered HTTP {s}")),
        _ => Err(format!("unexpected answer {resp}")),
    }
}

/// A gzip transfer coding (which hyper, like most servers, does not undo): refused with 501.
fn transfer_coding(o: &Outcome) -> Result<String, String> {
    // A transfer coding the agent cannot undo is refused (501), never forwarded.
    o.nothing_forwarded()?;
    let resp = o.response()?;
    if resp["status"] != 501 {
        return Err(format!("expected HTTP 501, got {resp}"));
    }
    let rec = o.audit_refused(None)?;
    Ok(format!("HTTP 501; refused: {}", rec["reason"]))
}

/// An echo answered on the peer's CRLF SSE stream: answered like the plain call, and the
/// agent's splitter ends each event where the client does (no event left unfinished when the
/// stream ends).
fn sse_echo_whole(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    whole_events(resp)?;
    let reference = o
        .plain
        .get(ECHO)
        .ok_or("the plain echo case did not pass")?;
    decided_like(o, ECHO, reference)?;
    o.audit("echo's `response`", |r| {
        r["event"] == "response" && r["tool"] == ECHO
    })?;
    let unfinished = wait_for(Duration::from_millis(300), || {
        o.audit_lines().into_iter().find(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("ended inside an event"))
        })
    });
    match unfinished {
        Some(rec) => Err(format!("the agent held an unfinished event: {rec}")),
        None => Ok(String::new()),
    }
}

/// A tools/list answered on an SSE stream written in 1–3 byte pieces: every event whole, and
/// the listing filtered.
fn split_listing(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    whole_events(resp)?;
    let answer = answer_for(resp, ID)?;
    let names = tool_names(&answer["result"]);
    if names != VISIBLE {
        return Err(format!("listed {names:?}, expected {VISIBLE:?}"));
    }
    let rec = o.audit("the listing's `response`", |r| {
        r["event"] == "response" && r["method"] == "tools/list"
    })?;
    if rec["hidden_tools"] != json!([SCAN, SECRET]) {
        return Err(format!("hidden_tools {} in {rec}", rec["hidden_tools"]));
    }
    Ok(String::new())
}

/// Every event of an SSE response carries whole JSON (the split mode's comment shows the
/// peer wrote it in pieces).
fn whole_events(resp: &Value) -> Result<(), String> {
    let events = resp["events"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or_else(|| format!("expected SSE events, got {resp}"))?;
    for e in events {
        if e["json"].is_null() {
            return Err(format!("an event arrived broken: {e}"));
        }
    }
    if resp["ended"] != true {
        return Err(format!("the stream did not end: {resp}"));
    }
    Ok(())
}

/// split_echo: a progress notification, then the result, each event whole.
fn split_echo(o: &Outcome) -> Result<String, String> {
    let resp = o.response()?;
    whole_events(resp)?;
    let events = resp["events"].as_array().unwrap();
    let progress = events
        .iter()
        .find(|e| e["json"]["method"] == "notifications/progress")
        .ok_or("no progress notification")?;
    if progress["comments"] != json!(["mcp-peer split mode"]) {
        return Err(format!("the peer did not write in split mode: {progress}"));
    }
    expect_text(&answer_for(resp, ID)?, "hi")?;
    o.executed(&[("split_echo", args(ECHO))])?;
    Ok(format!("{} events", events.len()))
}

/// 2024-11-05 on a split stream: a refusal injected while the server is writing an event in
/// pieces waits for its end, so every event arrives whole; the allowed call is answered.
fn split_legacy(o: &Outcome) -> Result<String, String> {
    if o.steps[1]["endpoint"].is_null() {
        return Err(format!("no endpoint: {}", o.steps[1]));
    }
    let events: Vec<&Value> = o.steps[5..]
        .iter()
        .flat_map(|s| s["events"].as_array().into_iter().flatten())
        .filter(|e| e["event"] != "endpoint")
        .collect();
    for e in &events {
        if e["json"].is_null() {
            return Err(format!("an event arrived broken: {e}"));
        }
    }
    let on_stream = |id: u64| {
        events
            .iter()
            .map(|e| &e["json"])
            .find(|m| m["id"] == id && m.get("method").is_none())
            .cloned()
            .ok_or_else(|| format!("no answer for id {id} on the stream"))
    };
    expect_error(&on_stream(3)?, -32602, "Unknown tool: secret_dump")?;
    expect_text(&on_stream(4)?, "hi")?;
    o.executed(&[("split_echo", args(ECHO))])?;
    let rec = o.audit_refused(Some(SECRET))?;
    if rec["transport"] != "http+sse" {
        return Err(format!(
            "refusal audited with transport {}",
            rec["transport"]
        ));
    }
    let order: Vec<String> = events
        .iter()
        .map(|e| match e["json"]["method"].as_str() {
            Some(m) => m.to_owned(),
            None => format!("answer {}", e["json"]["id"]),
        })
        .collect();
    Ok(format!("stream order {order:?}"))
}

// ---------------------------------------------------------------------------------------------
// The tables.

/// Everything but the split SSE stream.
fn bypass_cases(rig: &PeerRig) -> Vec<Case> {
    use Expect::*;
    let json_url = || rig.url("/mcp-json");
    let p = |body: &str| post(json_url(), body);
    let authority = rig.peer.addr().to_string();
    // A tools/call whose params are this JSON text, as written.
    let with_params = |params_body: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/call","params":{params_body}}}"#)
    };
    let plain_secret = plain(SECRET);
    let gz = |data: &str| gzip(data.as_bytes());
    let mut truncated = gz(&plain_secret);
    truncated.truncate(truncated.len() / 2);
    let mut bad_crc = gz(&plain_secret);
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi","x":{}{}}}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(plain_secret.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let url26 = || rig.url("/mcp26");
    let echo_b64 = "=?base64?ZWNobw==?=";
    let secret_b64 = format!("=?base64?{}?=", base64(SECRET.as_bytes()));

    vec![
        // The plain forms, which the variants are compared with.
        case("plain/secret_dump", vec![p(&plain(SECRET))], Plain(SECRET)),
        case(
            "plain/start_security_scan",
            vec![p(&plain(SCAN))],
            Plain(SCAN),
        ),
        case("plain/drop_cluster", vec![p(&plain(DROP))], Plain(DROP)),
        case("plain/echo", vec![p(&plain(ECHO))], Plain(ECHO)),
        // 1. JSON escapes: decided on the decoded text.
        case(
            "escape/name \\u0073ecret_dump",
            vec![p(&with_params(
                r#"{"name":"\u0073ecret_dump","arguments":{}}"#,
            ))],
            Like(SECRET),
        ),
        case(
            "escape/name secret\\u005Fdump",
            vec![p(&with_params(
                r#"{"name":"secret\u005Fdump","arguments":{}}"#,
            ))],
            Like(SECRET),
        ),
        case(
            "escape/name all \\u",
            vec![p(&with_params(
                r#"{"name":"\u0073\u0065\u0063\u0072\u0065\u0074\u005f\u0064\u0075\u006d\u0070","arguments":{}}"#,
            ))],
            Like(SECRET),
        ),
        case(
            "escape/name drop\\u005fcluster",
            vec![p(&alter(
                &plain(DROP),
                "drop_cluster",
                r"drop\u005fcluster",
            ))],
            Like(DROP),
        ),
        case(
            "escape/name start\\u005fsecurity_scan",
            vec![p(&alter(
                &plain(SCAN),
                "start_security_scan",
                r"start\u005fsecurity_scan",
            ))],
            Like(SCAN),
        ),
        case(
            "escape/method tools\\/call",
            vec![p(&alter(&plain_secret, "tools/call", "tools\\/call"))],
            Like(SECRET),
        ),
        case(
            "escape/method \\u0074ools/call",
            vec![p(&alter(&plain_secret, "tools/call", "\\u0074ools/call"))],
            Like(SECRET),
        ),
        case(
            "escape/key \"n\\u0061me\"",
            vec![p(&with_params(
                r#"{"n\u0061me":"secret_dump","arguments":{}}"#,
            ))],
            Like(SECRET),
        ),
        case(
            "escape/key \"m\\u0065thod\"",
            vec![p(&alter(&plain_secret, "\"method\"", "\"m\\u0065thod\""))],
            Like(SECRET),
        ),
        case(
            "escape/key \"p\\u0061rams\"",
            vec![p(&alter(&plain_secret, "\"params\"", "\"p\\u0061rams\""))],
            Like(SECRET),
        ),
        case(
            "escape/echo \\u0065cho allowed",
            vec![p(&alter(&plain(ECHO), r#""echo""#, r#""\u0065cho""#))],
            Like(ECHO),
        ),
        // 2. Duplicate keys, and keys equal but for case: one reader takes one, another the other.
        case(
            "dup/name echo then secret_dump",
            vec![p(&with_params(
                r#"{"name":"echo","name":"secret_dump","arguments":{"text":"hi"}}"#,
            ))],
            Malformed(400, -32600),
        ),
        case(
            "dup/name secret_dump then echo",
            vec![p(&with_params(
                r#"{"name":"secret_dump","name":"echo","arguments":{"text":"hi"}}"#,
            ))],
            Malformed(400, -32600),
        ),
        case(
            "dup/name escaped n\\u0061me",
            vec![p(&with_params(
                r#"{"name":"echo","n\u0061me":"secret_dump","arguments":{"text":"hi"}}"#,
            ))],
            Malformed(400, -32600),
        ),
        case(
            "dup/method",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/list","method":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}"#
            ))],
            Malformed(400, -32600),
        ),
        case(
            "dup/params",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi"}}}},"params":{{"name":"secret_dump","arguments":{{}}}}}}"#
            ))],
            Malformed(400, -32600),
        ),
        case(
            "dup/id",
            vec![p(&alter(&plain_secret, "\"id\":7", "\"id\":7,\"id\":8"))],
            Malformed(400, -32600),
        ),
        case(
            "dup/arguments key",
            vec![p(&with_params(
                r#"{"name":"echo","arguments":{"text":"hi","text":"ho"}}"#,
            ))],
            Malformed(400, -32600),
        ),
        case(
            "case/\"Name\" next to \"name\"",
            vec![p(&with_params(
                r#"{"name":"echo","Name":"secret_dump","arguments":{"text":"hi"}}"#,
            ))],
            Malformed(400, -32600),
        ),
        case(
            "case/\"METHOD\" next to \"method\"",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/list","METHOD":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}"#
            ))],
            Malformed(400, -32600),
        ),
        case(
            "case/\"Params\" next to \"params\"",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi"}}}},"Params":{{"name":"secret_dump"}}}}"#
            ))],
            Malformed(400, -32600),
        ),
        case(
            "case/all keys upper case (Go reads them)",
            vec![p(&format!(
                r#"{{"JSONRPC":"2.0","ID":{ID},"METHOD":"tools/call","PARAMS":{{"NAME":"secret_dump","ARGUMENTS":{{}}}}}}"#
            ))],
            Malformed(400, -32600),
        ),
        case(
            "case/\"NAME\" in params (Go reads it)",
            vec![p(&with_params(r#"{"NAME":"secret_dump","arguments":{}}"#))],
            Malformed(400, -32600),
        ),
        // 3. Response-shaped requests: decided as the request a server sees.
        case(
            "shape/result + method",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"result":{{}},"method":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}"#
            ))],
            Like(SECRET),
        ),
        case(
            "shape/error + method",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"error":{{"code":1,"message":"x"}},"method":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}"#
            ))],
            Like(SECRET),
        ),
        case(
            "shape/result + method, batched",
            vec![p(&format!(
                r#"[{{"jsonrpc":"2.0","id":{ID},"result":{{}},"method":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}]"#
            ))],
            Check(|o| {
                let resp = o.response()?;
                expect_error(&answer_for(resp, ID)?, -32602, "Unknown tool: secret_dump")?;
                o.nothing_forwarded()?;
                o.audit_refused(Some(SECRET))?;
                Ok(String::new())
            }),
        ),
        // 4. Content codings: decoded, decided, forwarded decoded; unknown or corrupt refused.
        case(
            "encoding/gzip secret_dump",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip")],
                &gz(&plain_secret),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/x-gzip secret_dump",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "x-gzip")],
                &gz(&plain_secret),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/GZIP (upper case) secret_dump",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "GZIP")],
                &gz(&plain_secret),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/deflate secret_dump",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "deflate")],
                &zlib(plain_secret.as_bytes()),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/deflate, gzip stacked",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "deflate, gzip")],
                &gzip(&zlib(plain_secret.as_bytes())),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/deflate + gzip in two headers",
            vec![post_bytes(
                json_url(),
                &[
                    ("Content-Encoding", "deflate"),
                    ("Content-Encoding", "gzip"),
                ],
                &gzip(&zlib(plain_secret.as_bytes())),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/identity secret_dump",
            vec![post_h(
                json_url(),
                &[("Content-Encoding", "identity")],
                plain_secret.clone(),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/gzip echo forwarded decoded",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip")],
                &gz(&plain(ECHO)),
            )],
            Check(gzip_echo_forwarded_decoded),
        ),
        case(
            "encoding/gzip batch split after decoding",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip")],
                &gz(&format!(
                    "[{},{}]",
                    call(1, ECHO, args(ECHO)),
                    call(2, SECRET, json!({}))
                )),
            )],
            Check(batch_gzip),
        ),
        case(
            "encoding/compress → 415",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "compress")],
                &gz(&plain_secret),
            )],
            Status(415),
        ),
        case(
            "encoding/gzip, compress → 415",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip, compress")],
                &gz(&plain_secret),
            )],
            Status(415),
        ),
        case(
            "encoding/corrupt gzip (truncated) → 400",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip")],
                &truncated,
            )],
            Status(400),
        ),
        case(
            "encoding/corrupt gzip (bad CRC) → 400",
            vec![post_bytes(
                json_url(),
                &[("Content-Encoding", "gzip")],
                &bad_crc,
            )],
            Status(400),
        ),
        case(
            "encoding/gzip label on a plain body → 400",
            vec![post_h(
                json_url(),
                &[("Content-Encoding", "gzip")],
                plain_secret.clone(),
            )],
            Status(400),
        ),
        case(
            "encoding/chunked, name split across chunks",
            vec![{
                let (a, b) = plain_secret.split_at(plain_secret.find("dump").unwrap());
                post_h(
                    json_url(),
                    &[("Transfer-Encoding", "chunked")],
                    format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len()),
                )
            }],
            Like(SECRET),
        ),
        case(
            "encoding/CONTENT-ENCODING header name upper case",
            vec![post_bytes(
                json_url(),
                &[("CONTENT-ENCODING", "gzip")],
                &gz(&plain_secret),
            )],
            Like(SECRET),
        ),
        case(
            "encoding/Transfer-Encoding: gzip, chunked",
            vec![{
                let body = gz(&plain_secret);
                let mut framed = format!("{:x}\r\n", body.len()).into_bytes();
                framed.extend(&body);
                framed.extend(b"\r\n0\r\n\r\n");
                post_bytes(
                    json_url(),
                    &[("Transfer-Encoding", "gzip, chunked")],
                    &framed,
                )
            }],
            Check(transfer_coding),
        ),
        case(
            "encoding/UTF-16 body (Python's json.loads reads it) → 415",
            vec![post_bytes(json_url(), &[], &utf16)],
            Malformed(415, -32700),
        ),
        case(
            "encoding/UTF-8 BOM → -32700",
            vec![p(&format!("\u{feff}{plain_secret}"))],
            Malformed(400, -32700),
        ),
        // 5. Batches: every element decided, refused ones answered here, the rest forwarded.
        case(
            "batch/mixed on /mcp-json",
            vec![p(&mixed_batch())],
            Check(batch_mixed_json),
        ),
        case(
            "batch/mixed on /mcp (SSE)",
            vec![post(rig.url("/mcp"), mixed_batch())],
            Check(batch_mixed_sse),
        ),
        case(
            "batch/only refused calls",
            vec![p(&format!(
                "[{},{},{}]",
                call(1, SECRET, json!({})),
                call(2, SCAN, args(SCAN)),
                call(3, DROP, args(DROP))
            ))],
            Check(batch_only_refused),
        ),
        case(
            "batch/escaped secret_dump beside echo",
            vec![p(&format!(
                r#"[{},{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"\u0073ecret_dump","arguments":{{}}}}}}]"#,
                call(1, ECHO, args(ECHO))
            ))],
            Check(|o| {
                let resp = o.response()?;
                expect_text(&answer_for(resp, 1)?, "hi")?;
                expect_error(&answer_for(resp, 2)?, -32602, "Unknown tool: secret_dump")?;
                o.executed(&[(ECHO, args(ECHO))])?;
                o.audit_refused(Some(SECRET))?;
                Ok(String::new())
            }),
        ),
        case(
            "batch/tools/call notification → -32600",
            vec![p(&format!(
                r#"[{},{{"jsonrpc":"2.0","method":"tools/call","params":{{"name":"secret_dump","arguments":{{}}}}}}]"#,
                call(1, ECHO, args(ECHO))
            ))],
            Malformed(400, -32600),
        ),
        case(
            "batch/nested batch on /mcp → -32600",
            vec![post(rig.url("/mcp"), format!("[[{plain_secret}]]"))],
            Malformed(400, -32600),
        ),
        case(
            "batch/nested batch on /mcp-json → -32600",
            vec![p(&format!("[[{plain_secret}]]"))],
            Malformed(400, -32600),
        ),
        case(
            "batch/empty on /mcp → -32600",
            vec![post(rig.url("/mcp"), "[]")],
            Malformed(400, -32600),
        ),
        case(
            "batch/duplicate key in one element → -32600",
            vec![p(&format!(
                r#"[{},{}]"#,
                call(1, ECHO, args(ECHO)),
                with_params(r#"{"name":"echo","name":"secret_dump"}"#)
            ))],
            Malformed(400, -32600),
        ),
        // 6. 2026-07-28 routing headers against the body.
        case(
            "h26/matching echo",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(ECHO)),
                call26(ECHO),
            )],
            Like(ECHO),
        ),
        case(
            "h26/matching secret_dump",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(SECRET)),
                call26(SECRET),
            )],
            Like(SECRET),
        ),
        case(
            "h26/matching drop_cluster",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(DROP)),
                call26(DROP),
            )],
            Like(DROP),
        ),
        case(
            "h26/matching base64 Mcp-Name secret_dump",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(&secret_b64)),
                call26(SECRET),
            )],
            Like(SECRET),
        ),
        case(
            "h26/matching base64 Mcp-Name echo",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(echo_b64)),
                call26(ECHO),
            )],
            Like(ECHO),
        ),
        case(
            "h26/Mcp-Method tools/list, body tools/call",
            vec![post_h(
                url26(),
                &h26("tools/list", Some(SECRET)),
                call26(SECRET),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Method TOOLS/CALL",
            vec![post_h(
                url26(),
                &h26("TOOLS/CALL", Some(ECHO)),
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name echo, body secret_dump",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(ECHO)),
                call26(SECRET),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name base64 echo, body secret_dump",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(echo_b64)),
                call26(SECRET),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name secret_dump, body echo",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(SECRET)),
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name Echo (case differs)",
            vec![post_h(
                url26(),
                &h26("tools/call", Some("Echo")),
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name malformed base64",
            vec![post_h(
                url26(),
                &h26("tools/call", Some("=?base64?ZWNobw?=")),
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name repeated (echo, secret_dump), body echo",
            vec![post_h(
                url26(),
                &[
                    ("MCP-Protocol-Version", REVISION_2026),
                    ("Mcp-Method", "tools/call"),
                    ("Mcp-Name", ECHO),
                    ("Mcp-Name", SECRET),
                ],
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Name repeated (secret_dump, echo), body secret_dump",
            vec![post_h(
                url26(),
                &[
                    ("MCP-Protocol-Version", REVISION_2026),
                    ("Mcp-Method", "tools/call"),
                    ("Mcp-Name", SECRET),
                    ("Mcp-Name", ECHO),
                ],
                call26(SECRET),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/Mcp-Method repeated",
            vec![post_h(
                url26(),
                &[
                    ("MCP-Protocol-Version", REVISION_2026),
                    ("Mcp-Method", "tools/call"),
                    ("Mcp-Method", "tools/list"),
                    ("Mcp-Name", ECHO),
                ],
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/MCP-Protocol-Version 2025-11-25, _meta 2026-07-28",
            vec![post_h(
                url26(),
                &[
                    ("MCP-Protocol-Version", "2025-11-25"),
                    ("Mcp-Method", "tools/call"),
                    ("Mcp-Name", ECHO),
                ],
                call26(ECHO),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/MCP-Protocol-Version 2026-07-28, _meta 2025-11-25",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(ECHO)),
                alter(&call26(ECHO), REVISION_2026, "2025-11-25"),
            )],
            Malformed(400, -32020),
        ),
        case(
            "h26/routing headers on a batch",
            vec![post_h(
                url26(),
                &h26("tools/call", Some(ECHO)),
                format!("[{}]", call26(ECHO)),
            )],
            Malformed(400, -32020),
        ),
        // 7. Method-name case: a server matching methods loosely would run these, so they
        // are decided like the plain call.
        case(
            "method/Tools/Call",
            vec![p(&alter(&plain_secret, "tools/call", "Tools/Call"))],
            Like(SECRET),
        ),
        case(
            "method/TOOLS/CALL",
            vec![p(&alter(&plain_secret, "tools/call", "TOOLS/CALL"))],
            Like(SECRET),
        ),
        case(
            "method/tools/call + trailing space",
            vec![p(&alter(&plain_secret, "tools/call", "tools/call "))],
            Like(SECRET),
        ),
        case(
            "tool name/Secret_Dump (unlisted)",
            vec![p(&call(ID, "Secret_Dump", json!({})))],
            Check(|o| {
                let (resp, answer) = o.answer()?;
                if resp["status"] != 200 {
                    return Err(format!("HTTP {}", resp["status"]));
                }
                expect_error(&answer, -32602, "Unknown tool: Secret_Dump")?;
                o.nothing_forwarded()?;
                o.audit_refused(Some("Secret_Dump"))?;
                Ok(String::new())
            }),
        ),
        case(
            "tool name/secret_dump + NUL",
            vec![p(&call(ID, "secret_dump\u{0}", json!({})))],
            Check(|o| {
                let (_, answer) = o.answer()?;
                expect_error(&answer, -32602, "Unknown tool: secret_dump\u{0}")?;
                o.nothing_forwarded()?;
                Ok(String::new())
            }),
        ),
        // 8. Pipelining: two requests in one write, each decided.
        case(
            "pipeline/echo then secret_dump",
            vec![raw(
                rig,
                format!(
                    "{}{}",
                    http1(&authority, "/mcp-json", &call(1, ECHO, args(ECHO))),
                    http1(&authority, "/mcp-json", &call(2, SECRET, json!({})))
                ),
                2,
            )],
            Check(pipelined_echo_secret),
        ),
        case(
            "pipeline/secret_dump then echo",
            vec![raw(
                rig,
                format!(
                    "{}{}",
                    http1(&authority, "/mcp-json", &call(1, SECRET, json!({}))),
                    http1(&authority, "/mcp-json", &call(2, ECHO, args(ECHO)))
                ),
                2,
            )],
            Check(pipelined_secret_echo),
        ),
        case(
            "smuggle/Content-Length and Transfer-Encoding",
            vec![post_h(
                json_url(),
                &[("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                format!("{:x}\r\n{plain_secret}\r\n0\r\n\r\n", plain_secret.len()),
            )],
            Check(cl_and_te),
        ),
        case(
            "smuggle/two Content-Length",
            vec![post_h(
                json_url(),
                &[
                    ("Content-Length", &plain_secret.len().to_string()),
                    ("Content-Length", "2"),
                ],
                plain_secret.clone(),
            )],
            Check(cl_and_te),
        ),
        // 9. HTTP/2 in plaintext.
        case(
            "http2/h2c prior knowledge",
            vec![raw(rig, h2c_prior_knowledge(&authority, &plain_secret), 1)],
            Check(not_read),
        ),
        case(
            "http2/Upgrade: h2c → 403",
            vec![post_h(
                rig.url("/mcp"),
                &[
                    ("Connection", "Upgrade, HTTP2-Settings"),
                    ("Upgrade", "h2c"),
                    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
                ],
                plain_secret.clone(),
            )],
            Status(403),
        ),
        // 11. Paths: a JSON-RPC body is inspected wherever it goes.
        case(
            "path: /mcp (the endpoint)",
            vec![post(rig.url("/mcp"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /mcp?x=1",
            vec![post(rig.url("/mcp?x=1"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /mcp/",
            vec![post(rig.url("/mcp/"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: //mcp",
            vec![post(rig.url("//mcp"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /./mcp",
            vec![post(rig.url("/./mcp"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /x/../mcp",
            vec![post(rig.url("/x/../mcp"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /%6dcp",
            vec![post(rig.url("/%6dcp"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /MCP",
            vec![post(rig.url("/MCP"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /mcp%2F",
            vec![post(rig.url("/mcp%2F"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /mcp;x=1",
            vec![post(rig.url("/mcp;x=1"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: /other",
            vec![post(rig.url("/other"), plain_secret.clone())],
            Like(SECRET),
        ),
        case(
            "path: absolute form",
            vec![raw(
                rig,
                http1(&authority, &rig.url("/mcp"), &plain_secret),
                1,
            )],
            Like(SECRET),
        ),
        case(
            "method: GET with a body",
            vec![{
                let mut s = post(rig.url("/mcp"), plain_secret.clone());
                s["method"] = json!("GET");
                s
            }],
            Like(SECRET),
        ),
        case(
            "method: lower-case post",
            vec![raw(
                rig,
                alter(&http1(&authority, "/mcp", &plain_secret), "POST", "post"),
                1,
            )],
            Like(SECRET),
        ),
        case(
            "sse/echo on /mcp: CRLF events pass whole",
            vec![post(rig.url("/mcp"), plain(ECHO))],
            Check(sse_echo_whole),
        ),
        case(
            "content-type/text/plain",
            vec![post_h(
                json_url(),
                &[("Content-Type", "text/plain")],
                plain_secret.clone(),
            )],
            Like(SECRET),
        ),
        // 12. tools/call without an id, and other ids no server reads the same.
        case(
            "id/tools/call notification (secret_dump)",
            vec![p(&notification_call(SECRET))],
            Malformed(400, -32600),
        ),
        case(
            "id/tools/call notification (echo)",
            vec![p(&notification_call(ECHO))],
            Malformed(400, -32600),
        ),
        case(
            "id/null",
            vec![p(&alter(&plain_secret, "\"id\":7", "\"id\":null"))],
            Malformed(400, -32600),
        ),
        case(
            "id/7.0",
            vec![p(&alter(&plain_secret, "\"id\":7", "\"id\":7.0"))],
            Malformed(400, -32600),
        ),
        case(
            "id/object",
            vec![p(&alter(&plain_secret, "\"id\":7", "\"id\":{\"a\":1}"))],
            Malformed(400, -32600),
        ),
        // Bodies that a lenient reader reads and the strict one does not.
        case(
            "syntax/two objects (NDJSON)",
            vec![p(&format!("{}\n{}", plain(ECHO), plain_secret))],
            Malformed(400, -32700),
        ),
        case(
            "syntax/nested 200 deep",
            vec![p(&deep)],
            Malformed(400, -32700),
        ),
        case(
            "syntax/jsonrpc 1.0",
            vec![p(&alter(&plain_secret, "\"2.0\"", "\"1.0\""))],
            Malformed(400, -32600),
        ),
        case(
            "syntax/trailing comma",
            vec![p(&alter(&plain_secret, "}}", "},}"))],
            Malformed(400, -32700),
        ),
        case(
            "params/params an array",
            vec![p(&format!(
                r#"{{"jsonrpc":"2.0","id":{ID},"method":"tools/call","params":["secret_dump"]}}"#
            ))],
            Malformed(400, -32602),
        ),
        case(
            "params/name not a string",
            vec![p(&with_params(
                r#"{"name":["secret_dump"],"arguments":{}}"#,
            ))],
            Malformed(400, -32602),
        ),
        case(
            "params/arguments a string",
            vec![p(&with_params(
                r#"{"name":"secret_dump","arguments":"{}"}"#,
            ))],
            Malformed(400, -32602),
        ),
    ]
}

/// A tools/call without an id.
fn notification_call(tool: &str) -> String {
    json!({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": tool, "arguments": args(tool)}})
        .to_string()
}

/// Cases against a peer that writes every SSE stream in 1–3 byte pieces, and requests written
/// in small pieces.
fn split_cases(rig: &PeerRig) -> Vec<Case> {
    use Expect::*;
    let json_url = || rig.url("/mcp-json");
    let list = rpc(json!(ID), "tools/list", json!({}));
    let pieces = |body: String| {
        let mut s = post(json_url(), body);
        s["chunks"] = json!(vec![3; 80]);
        s["delay_ms"] = json!(2);
        s
    };
    let legacy = |body: String| json!({"op": "request", "url": "$endpoint:s", "body": body});
    let wait = |id: u64| json!({"op": "sse_wait", "stream": "s", "until_id": id});
    vec![
        case(
            "plain/secret_dump",
            vec![post(json_url(), plain(SECRET))],
            Plain(SECRET),
        ),
        case(
            "plain/echo",
            vec![post(json_url(), plain(ECHO))],
            Plain(ECHO),
        ),
        case(
            "split/tools/list on /mcp",
            vec![post(rig.url("/mcp"), list.clone())],
            Check(split_listing),
        ),
        case(
            "split/split_echo on /mcp",
            vec![post(rig.url("/mcp"), call(ID, "split_echo", args(ECHO)))],
            Check(split_echo),
        ),
        case(
            "split/2024-11-05 stream",
            vec![
                json!({"op": "sse_open", "stream": "s", "url": rig.url("/sse")}),
                json!({"op": "sse_endpoint", "stream": "s"}),
                // The refusal of 3 comes while 4's events are being written in pieces.
                legacy(call(4, "split_echo", args(ECHO))),
                json!({"op": "sleep", "ms": 30}),
                legacy(call(3, SECRET, json!({}))),
                wait(3),
                wait(4),
                json!({"op": "sse_close", "stream": "s"}),
            ],
            Check(split_legacy),
        ),
        case(
            "pieces/secret_dump, headers and body in 3-byte writes",
            vec![pieces(plain(SECRET))],
            Like(SECRET),
        ),
        case(
            "pieces/echo, headers and body in 3-byte writes",
            vec![pieces(plain(ECHO))],
            Like(ECHO),
        ),
        case(
            "pieces/escaped secret_dump in 3-byte writes",
            vec![pieces(alter(
                &plain(SECRET),
                "secret_dump",
                "\\u0073ecret_dump",
            ))],
            Like(SECRET),
        ),
    ]
}

#[test]
fn bypass_attempts_are_refused_or_decided_like_the_plain_call() {
    let rig = PeerRig::start("bypass", 80, PEER_POLICY, PeerOpts::default());
    let cases = bypass_cases(&rig);
    run_cases(&rig, cases);
}

#[test]
fn split_sse_and_split_requests_are_read_whole() {
    let rig = PeerRig::start(
        "bypass-split",
        81,
        PEER_POLICY,
        PeerOpts {
            split_sse: true,
            split_delay: Duration::from_millis(1),
            ..Default::default()
        },
    );
    let cases = split_cases(&rig);
    run_cases(&rig, cases);
}
