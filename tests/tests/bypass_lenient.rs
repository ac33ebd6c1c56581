//! The reading classes of issue 14, tried against servers that read requests as leniently as
//! real ones do: Go's `encoding/json` (keys matched ignoring case, the last duplicate wins),
//! Node's `raw-body` (the body decoded in the Content-Type's charset, UTF-7 included), Python's
//! `json.loads` on bytes (UTF-16 and UTF-32 detected), each answering every path and method
//! (tests/lenient/), and the rmcp server of the other suites.
//!
//! One test per server, each with its own cgroup, address and agent. Every case is one
//! `mcp-client script` run inside the attached cgroup; it passes only if the server executed
//! nothing forbidden (a hidden, denied or unlisted tool, or a transfer of more than the
//! policy's maximum, as that server read the arguments), the client got the expected answer,
//! and the agent wrote an audit record of the refusal for that client. Cases print
//! `case NAME: ok` or `case NAME: FAILED: …`; the test fails at the end naming every failure.
//! Addresses 127.0.0.130–133.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use common::{AGENT_BIN, AUDIT_WAIT, CLIENT_BIN, CLIENT_TIMEOUT};
use mcpwarden::mcp::fold_key;
use mcpwarden_tests::script::run_script;
use mcpwarden_tests::{
    base64_encode, free_addr, require_root, test_ip, wait_for, Agent, AgentOpts, Lenient,
    LenientServer, TestCgroup, TestServer,
};
use serde_json::{json, Value};

/// Allowed: echo, and transfer up to 100. Hidden: secret_dump. Denied: drop_cluster. Unlisted
/// under default deny: start_security_scan.
const POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "hide": ["secret_dump"],
  "tools": {
    "echo": {},
    "secret_dump": {},
    "drop_cluster": {"action": "deny", "reason": "destructive"},
    "transfer": {"arguments": {"type": "object",
                               "properties": {"amount": {"type": "number", "maximum": 100}}}}
  }
}"#;

/// Tools no case may get executed.
const NEVER: [&str; 3] = ["secret_dump", "drop_cluster", "start_security_scan"];
/// The policy's transfer maximum.
const MAX_AMOUNT: f64 = 100.0;
/// A value that must never appear in a reason or an audit record.
const SECRET_VALUE: &str = "4711000";
const SECRET_TOKEN: &str = "tok-9f2e7c";

/// The server behind the agent.
enum Target {
    Lenient(LenientServer),
    Rmcp(TestServer),
}

impl Target {
    fn addr(&self) -> SocketAddr {
        match self {
            Target::Lenient(s) => s.addr(),
            Target::Rmcp(s) => s.addr(),
        }
    }

    /// What the server executed that the policy forbids.
    fn forbidden(&self) -> Vec<String> {
        match self {
            Target::Lenient(s) => s
                .executed()
                .into_iter()
                .filter(|(tool, args)| {
                    NEVER.contains(&tool.as_str()) || (tool == "transfer" && over_max(args))
                })
                .map(|(tool, args)| format!("{tool} {args}"))
                .collect(),
            // The rmcp server has no transfer tool: any transfer reaching it counts.
            Target::Rmcp(s) => NEVER
                .iter()
                .chain(&["transfer"])
                .filter(|t| s.calls(t) > 0)
                .map(|t| t.to_string())
                .collect(),
        }
    }
}

/// Whether arguments, as a server read them, spend more than the maximum under any key that
/// folds to `amount`.
fn over_max(args: &Value) -> bool {
    args.as_object().is_some_and(|m| {
        m.iter().any(|(k, v)| {
            fold_key(k) == "amount"
                && (v.as_f64().is_some_and(|n| n > MAX_AMOUNT)
                    || v.as_str()
                        .and_then(|s| s.parse::<f64>().ok())
                        .is_some_and(|n| n > MAX_AMOUNT))
        })
    })
}

struct Rig {
    agent: Agent,
    target: Target,
    _cg: TestCgroup,
    app: PathBuf,
}

impl Rig {
    fn start(name: &str, index: u8, kind: Option<Lenient>) -> Rig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let agent_cg = cg.path().join("agent");
        let ip = test_ip(index);
        let addr = SocketAddr::new(IpAddr::V4(ip), 0);
        let target = match kind {
            Some(kind) => Target::Lenient(LenientServer::start(kind, addr)),
            None => Target::Rmcp(TestServer::start(addr)),
        };
        let agent = Agent::start(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: vec![(format!("http://{}/mcp", target.addr()), POLICY.to_string())],
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: agent_cg,
            },
        );
        Rig {
            agent,
            target,
            _cg: cg,
            app,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.target.addr())
    }

    fn host(&self) -> String {
        self.target.addr().to_string()
    }
}

/// What a case must get back.
enum Expect {
    /// Refused by the agent with this HTTP status.
    Refused(u16),
    /// Decided by the policy and answered by the agent: HTTP 200 carrying a JSON-RPC error or
    /// an `isError` result.
    Answered,
}

struct Case {
    class: &'static str,
    name: &'static str,
    step: Value,
    expect: Expect,
}

fn case(class: &'static str, name: &'static str, step: Value, expect: Expect) -> Case {
    Case {
        class,
        name,
        step,
        expect,
    }
}

fn request(url: String, method: &str, headers: &[(&str, &str)], body: &str) -> Value {
    let headers: Vec<[&str; 2]> = headers.iter().map(|(k, v)| [*k, *v]).collect();
    json!({"op": "request", "url": url, "method": method, "headers": headers, "body": body})
}

fn request_bytes(url: String, headers: &[(&str, &str)], body: &[u8]) -> Value {
    let headers: Vec<[&str; 2]> = headers.iter().map(|(k, v)| [*k, *v]).collect();
    json!({"op": "request", "url": url, "headers": headers, "body_base64": base64_encode(body)})
}

fn call(tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": tool, "arguments": args}})
    .to_string()
}

fn utf16le(text: &str, bom: bool) -> Vec<u8> {
    let mut out = if bom { vec![0xff, 0xfe] } else { Vec::new() };
    out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    out
}

fn utf32be(text: &str) -> Vec<u8> {
    text.chars()
        .flat_map(|c| u32::from(c).to_be_bytes())
        .collect()
}

/// UTF-7 (RFC 2152) of ASCII text with every `"` and `m` written as a shifted sequence, so
/// that read as UTF-8 the body holds neither a `"method"` key nor valid string syntax.
fn utf7(text: &str) -> String {
    text.replace('"', "+ACI-").replace('m', "+AG0-")
}

fn cases(rig: &Rig) -> Vec<Case> {
    use Expect::*;
    let mcp = || rig.url("/mcp");
    let secret = call("secret_dump", json!({}));
    let host = rig.host();
    vec![
        // Envelope keys: a key that is a member only when case-folded, even alone.
        case("envelope", "response-shaped with Method and Params", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"result":{},"Method":"tools/call","Params":{"name":"secret_dump","arguments":{}}}"#), Refused(400)),
        case("envelope", "PARAMS beside params", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}},"PARAMS":{"name":"secret_dump"}}"#), Refused(400)),
        case("envelope", "NAME alone", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"NAME":"secret_dump","arguments":{}}}"#), Refused(400)),
        case("envelope", "param\u{17f} (long s) alone", request(mcp(), "POST", &[],
            "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/call\",\"param\u{17f}\":{\"name\":\"secret_dump\"}}"), Refused(400)),
        case("envelope", "notification-shaped with ID", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","ID":7,"method":"tools/call","params":{"name":"secret_dump"}}"#), Refused(400)),
        case("envelope", "batch element with Method", request(mcp(), "POST", &[],
            r#"[{"jsonrpc":"2.0","id":8,"method":"ping"},{"jsonrpc":"2.0","id":7,"result":{},"METHOD":"tools/call","params":{"name":"drop_cluster"}}]"#), Refused(400)),
        // Argument keys and numbers.
        case("arguments", "Amount where the schema checks amount", request(mcp(), "POST", &[],
            &call("transfer", json!({"Amount": 5000}))), Answered),
        case("arguments", "AMOUNT on another path", request(rig.url("/anything"), "POST", &[],
            &call("transfer", json!({"AMOUNT": 5000}))), Answered),
        case("arguments", "amount and Amount", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"Amount":5000}}}"#), Refused(400)),
        case("arguments", "amount beyond a double's precision", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":100.0000000000000001}}}"#), Refused(400)),
        case("arguments", "amount 1e400", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":1e400}}}"#), Refused(400)),
        case("arguments", "amount beyond 64 bits", request(mcp(), "POST", &[],
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":18446744073709551616}}}"#), Refused(400)),
        // Encodings: only UTF-8, on every path.
        // Read as UTF-8 this is a response (no "method" key); Node decodes +AG0- to "m".
        case("encoding", "UTF-7 charset, a response to UTF-8", request(mcp(), "POST",
            &[("Content-Type", "application/json; charset=utf-7")],
            r#"{"jsonrpc":"2.0","id":7,"result":{},"+AG0-ethod":"tools/call","params":{"name":"secret_dump","arguments":{}}}"#), Refused(415)),
        case("encoding", "UTF-7 charset on another path", request(rig.url("/other"), "POST",
            &[("Content-Type", "application/json;charset=\"UTF-7\"")],
            &utf7(&secret)), Refused(415)),
        case("encoding", "latin1 charset", request(mcp(), "POST",
            &[("Content-Type", "application/json; charset=latin1")], &secret), Refused(415)),
        case("encoding", "UTF-16LE body named by its charset", request_bytes(mcp(),
            &[("Content-Type", "application/json; charset=utf-16le")], &utf16le(&secret, false)), Refused(415)),
        case("encoding", "UTF-16LE with BOM", request_bytes(mcp(),
            &[], &utf16le(&secret, true)), Refused(415)),
        case("encoding", "UTF-32BE without BOM on another path", request_bytes(rig.url("/x"),
            &[], &utf32be(&secret)), Refused(415)),
        case("encoding", "invalid UTF-8", request_bytes(mcp(), &[],
            b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/call\",\"params\":{\"name\":\"secret_dump\xff\"}}"), Refused(400)),
        // Not JSON-RPC to the endpoint's address: decided like a call, or refused.
        case("paths", "PUT to the endpoint", request(mcp(), "PUT", &[], &secret), Answered),
        case("paths", "GET with a body", request(mcp(), "GET", &[], &call("drop_cluster", json!({}))), Answered),
        case("paths", "the path in upper case", request(rig.url("/MCP"), "POST", &[], &secret), Answered),
        case("paths", "a ; parameter", request(rig.url("/mcp;v=1"), "POST", &[], &secret), Answered),
        case("paths", "percent-encoded", request(rig.url("/%6d%63%70"), "POST", &[], &call("start_security_scan", json!({}))), Answered),
        case("paths", "newline-delimited JSON elsewhere", request(rig.url("/stream"), "POST", &[],
            &format!("{{\"a\":1}}\n{secret}")), Refused(403)),
        case("paths", "a form body elsewhere", request(rig.url("/oauth/token"), "POST",
            &[("Content-Type", "application/x-www-form-urlencoded")], "grant_type=x"), Refused(403)),
        // Host and authority.
        case("host", "two Host headers", request(mcp(), "POST",
            &[("Host", &host), ("Host", "evil.example")], &secret), Refused(400)),
        case("host", "a Host naming no server here", request(mcp(), "POST",
            &[("Host", "evil.example")], &secret), Refused(421)),
        case("host", "user info in Host", request(mcp(), "POST",
            &[("Host", &format!("user@{host}"))], &secret), Refused(400)),
        case("host", "absolute form naming another host",
            json!({"op": "raw", "addr": host, "responses": 1, "bytes": format!(
                "POST http://evil.example/mcp HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{secret}",
                secret.len())}), Refused(400)),
        // Values never in reasons or logs.
        case("values", "a refused amount is not quoted", request(mcp(), "POST", &[],
            &call("transfer", json!({"amount": SECRET_VALUE.parse::<u64>().unwrap_or(1)}))), Answered),
        case("values", "a token in the query is masked", request(
            rig.url(&format!("/mcp?token={SECRET_TOKEN}")), "POST", &[], &secret), Answered),
    ]
}

/// The only HTTP response of a script run.
fn response(steps: &[Value]) -> Option<Value> {
    let step = steps.first()?;
    match step.get("responses") {
        Some(Value::Array(rs)) => rs.first().cloned(),
        _ => Some(step.clone()),
    }
}

fn check(rig: &Rig, case: &Case, pid: u32, resp: &Value) -> Result<(), String> {
    let status = resp["status"].as_u64().unwrap_or(0);
    match case.expect {
        Expect::Refused(want) if status != u64::from(want) => {
            return Err(format!("expected HTTP {want}, got {status}: {resp}"))
        }
        Expect::Answered => {
            let json = &resp["json"];
            let answered =
                status == 200 && (json["error"].is_object() || json["result"]["isError"] == true);
            if !answered {
                return Err(format!(
                    "expected a policy answer (200, error or isError), got {resp}"
                ));
            }
        }
        Expect::Refused(_) => {}
    }
    let refusal = |r: &Value| {
        r["pid"] == pid
            && (r["event"] == "refused"
                || matches!(r["decision"].as_str(), Some("deny" | "unknown_tool")))
    };
    wait_for(AUDIT_WAIT, || {
        rig.agent.audit_lines().into_iter().find(|r| refusal(r))
    })
    .ok_or_else(|| "no audit record of the refusal for this client".to_owned())?;
    let mine: Vec<String> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["pid"] == pid)
        .map(|r| r.to_string())
        .collect();
    for value in [SECRET_VALUE, SECRET_TOKEN] {
        if let Some(line) = mine.iter().find(|l| l.contains(value)) {
            return Err(format!("an audit record quotes {value}: {line}"));
        }
        if resp["body"].as_str().is_some_and(|b| b.contains(value)) {
            return Err(format!("the answer quotes {value}: {resp}"));
        }
    }
    Ok(())
}

fn run(name: &str, index: u8, kind: Option<Lenient>) {
    let rig = Rig::start(name, index, kind);
    let server = kind.map_or("rmcp", Lenient::name);
    // The plain allowed calls go through: the rig is sound.
    let run = run_script(
        CLIENT_BIN,
        Some(&rig.app),
        &json!({"steps": [request(rig.url("/mcp"), "POST", &[], &call("echo", json!({"text": "hi"})))]}),
        CLIENT_TIMEOUT,
    );
    let ok =
        response(&run.steps).is_some_and(|r| r["status"] == 200 && r["json"]["result"].is_object());
    assert!(ok, "{server}: a plain echo call failed: {:?}", run.steps);

    let mut failures = Vec::new();
    let cases = cases(&rig);
    for case in &cases {
        let label = format!("{}/{} ({server})", case.class, case.name);
        let run = run_script(
            CLIENT_BIN,
            Some(&rig.app),
            &json!({"steps": [case.step.clone()]}),
            CLIENT_TIMEOUT,
        );
        let verdict = match response(&run.steps) {
            None => Err("no response".to_owned()),
            Some(resp) => check(&rig, case, run.run.pid, &resp),
        };
        let forbidden = rig.target.forbidden();
        let verdict = if forbidden.is_empty() {
            verdict
        } else {
            Err(format!("the server EXECUTED {forbidden:?}"))
        };
        match verdict {
            Ok(()) => println!("case {label}: ok"),
            Err(e) => {
                println!("case {label}: FAILED: {e}");
                failures.push(label);
                // Later cases must not be blamed for this one's executions.
                if !forbidden.is_empty() {
                    break;
                }
            }
        }
    }
    println!(
        "{} cases against {server}, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed against {server}: {failures:?}");
}

#[test]
fn every_reading_class_is_refused_in_front_of_go_encoding_json() {
    run("lenient-go", 120, Some(Lenient::Go));
}

#[test]
fn every_reading_class_is_refused_in_front_of_node_raw_body() {
    run("lenient-node", 121, Some(Lenient::Node));
}

#[test]
fn every_reading_class_is_refused_in_front_of_python_json_loads() {
    run("lenient-python", 122, Some(Lenient::Python));
}

#[test]
fn every_reading_class_is_refused_in_front_of_rmcp() {
    run("lenient-rmcp", 123, None);
}
