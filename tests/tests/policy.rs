//! Policy decisions on tools/call, limits, the audit records of decisions, and bad input; and
//! the policy engine as a whole (test indices 110–119): reloads, counters across reloads, exact
//! quotas under concurrency, quota release, bindings, dry runs, argument checks.

mod common;

use common::*;
use mcpwarden_tests::cgroup::cgroup_id;
use mcpwarden_tests::sha256_hex;
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcpwarden_tests::script::run_script;
use mcpwarden_tests::{
    free_addr, free_port, require_root, run_client, test_ip, wait_for, Agent, AgentOpts, ClientRun,
    McpPeer, TempDir, TestCgroup,
};

/// (2) An unlisted tool under default deny is answered -32602 "Unknown tool: secret_dump"; an
/// explicitly denied tool gets the isError result with the policy's reason; neither reaches the
/// server; the session goes on working. Also with a 2026-07-28 request (resultType complete).
#[test]
fn unlisted_and_denied_tools_never_reach_the_server() {
    let rig = Rig::start("deny", 2, POLICY);
    let url = rig.server.url();
    let run = rig.client(&[
        "call",
        &url,
        "secret_dump",
        "{}",
        "drop_cluster",
        r#"{"cluster":"prod"}"#,
        "echo",
        r#"{"text":"still here"}"#,
    ]);
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(lines.len(), 3, "{}", run.describe());

    let err = &lines[0]["error"];
    assert_eq!(
        err["code"],
        -32602,
        "unlisted tool must be a JSON-RPC -32602 error\n{}",
        run.describe()
    );
    assert_eq!(
        err["message"],
        "Unknown tool: secret_dump",
        "{}",
        run.describe()
    );

    assert!(
        lines[1]["error"].is_null(),
        "a denied tool is a result, not an error\n{}",
        run.describe()
    );
    assert!(
        is_error_result(&lines[1]),
        "denied tool must be an isError result\n{}",
        run.describe()
    );
    assert_eq!(
        result_text(&lines[1]),
        DENY_TEXT_DESTRUCTIVE,
        "{}",
        run.describe()
    );

    assert_eq!(result_text(&lines[2]), "still here", "{}", run.describe());

    rig.server.assert_not_reached("secret_dump");
    rig.server.assert_not_reached("drop_cluster");
    assert_eq!(rig.server.calls("echo"), 1);

    // Raw requests, one speaking 2026-07-28 (per-request _meta and headers, no session).
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1.0"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let body = json!({"jsonrpc": "2.0", "id": 77, "method": "tools/call",
        "params": {"name": "drop_cluster", "arguments": {"cluster": "prod"}, "_meta": meta}})
    .to_string();
    let run = rig.client(&[
        "raw-post",
        &url,
        &body,
        "MCP-Protocol-Version: 2026-07-28",
        "Mcp-Method: tools/call",
        "Mcp-Name: drop_cluster",
    ]);
    run.assert_success();
    run.assert_status(200);
    let v = run.body_json();
    assert_eq!(v["id"], 77, "{v}");
    assert_eq!(v["result"]["isError"], true, "{v}");
    assert_eq!(
        v["result"]["content"][0]["text"], DENY_TEXT_DESTRUCTIVE,
        "{v}"
    );
    assert_eq!(
        v["result"]["resultType"], "complete",
        "a 2026-07-28 request needs resultType complete: {v}"
    );

    let body = call_body(78, "secret_dump", json!({}));
    let run = rig.client(&["raw-post", &url, &body]);
    run.assert_success();
    run.assert_status(200);
    let v = run.body_json();
    assert_eq!(v["id"], 78, "{v}");
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert_eq!(v["error"]["message"], "Unknown tool: secret_dump", "{v}");

    rig.server.assert_not_reached("secret_dump");
    rig.server.assert_not_reached("drop_cluster");
}

/// (3) A 10-per-minute limit: calls 1–10 succeed, the 11th is refused with the isError result,
/// and the server counted 10.
#[test]
fn rate_limit_refuses_the_eleventh_call() {
    let rig = Rig::start("limit", 3, POLICY);
    let url = rig.server.url();
    let mut args: Vec<&str> = vec!["call", &url];
    for _ in 0..11 {
        args.push("start_security_scan");
        args.push(r#"{"cluster":"c1"}"#);
    }
    let run = rig.client(&args);
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(lines.len(), 11, "{}", run.describe());
    for (i, l) in lines[..10].iter().enumerate() {
        assert!(
            l["error"].is_null() && !is_error_result(l),
            "call {} must succeed\n{}",
            i + 1,
            run.describe()
        );
        assert_eq!(
            result_text(l),
            "scan started on c1",
            "call {}\n{}",
            i + 1,
            run.describe()
        );
    }
    let last = &lines[10];
    assert!(
        last["error"].is_null(),
        "a limit refusal is a result, not an error\n{}",
        run.describe()
    );
    assert!(
        is_error_result(last),
        "call 11 must be refused\n{}",
        run.describe()
    );
    let text = result_text(last);
    assert!(
        text.starts_with("Denied by mcpwarden policy: ")
            && text.ends_with(". Do not retry this call."),
        "unexpected refusal text: {text}"
    );
    assert_eq!(rig.server.calls("start_security_scan"), 10);

    let recs = rig.wait_decisions("start_security_scan", run.pid, 11);
    let denies: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denies.len(), 1, "exactly one denial expected: {recs:#?}");
    assert_eq!(
        denies[0]["rule"], "/tools/start_security_scan/limits/0",
        "{}",
        denies[0]
    );
}

/// (8) Audit records of calls carry the client's pid, comm ("mcp-client"), uid 0, its cgroup,
/// the decision and the deciding rule, the policy file and its sha256, the argument keys and
/// a hash, never the argument values.
#[test]
fn audit_records_identify_the_caller_and_the_rule() {
    let rig = Rig::start("audit", 8, POLICY);
    let url = rig.server.url();
    let secret_value = "s3cr3t-argument-value-8c1f";
    let echo_args = json!({"text": secret_value}).to_string();
    let run = rig.client(&[
        "call",
        &url,
        "echo",
        &echo_args,
        "drop_cluster",
        r#"{"cluster":"prod"}"#,
        "secret_dump",
        "{}",
    ]);
    run.assert_success();
    let pid = run.pid;

    let echo = rig.wait_decisions("echo", pid, 1);
    let drop = rig.wait_decisions("drop_cluster", pid, 1);
    let dump = rig.wait_decisions("secret_dump", pid, 1);
    let policy_file = rig.agent.policy_path(0);
    let policy_sha = sha256_hex(&std::fs::read(policy_file).unwrap());
    let app_rel = rig.app_rel();
    let app_id = cgroup_id(&rig.app);

    for (rec, decision) in [(&echo[0], "allow"), (&drop[0], "deny"), (&dump[0], "deny")] {
        assert_eq!(rec["v"], 1, "{rec}");
        assert!(rec["ts"].is_string(), "{rec}");
        assert_eq!(rec["pid"], pid, "{rec}");
        assert_eq!(rec["comm"], "mcp-client", "{rec}");
        assert_eq!(rec["uid"], 0, "{rec}");
        assert_eq!(rec["method"], "tools/call", "{rec}");
        assert_eq!(rec["decision"], decision, "{rec}");
        assert_eq!(rec["dst"], rig.server.addr().to_string(), "{rec}");
        let cg = rec["cgroup"]
            .as_str()
            .unwrap_or_else(|| panic!("no cgroup path: {rec}"));
        assert!(
            cg.ends_with(&app_rel),
            "cgroup {cg} is not the client's {app_rel}: {rec}"
        );
        assert_eq!(
            rec["cgroup_id"], app_id,
            "cgroup_id must be the client's cgroup id: {rec}"
        );
        assert_eq!(
            rec["policy"]["file"],
            policy_file.display().to_string(),
            "{rec}"
        );
        assert_eq!(rec["policy"]["sha256"], policy_sha, "{rec}");
        assert!(!rec["id"].is_null(), "{rec}");
        if decision == "allow" {
            assert_eq!(rec["event"], "request", "{rec}");
        } else {
            assert!(
                rec["event"] == "request" || rec["event"] == "refused",
                "{rec}"
            );
        }
    }
    let er = &echo[0];
    let rule = er["rule"]
        .as_str()
        .unwrap_or_else(|| panic!("no rule: {er}"));
    assert!(
        rule.starts_with("/tools/echo"),
        "allow rule should point into /tools/echo: {er}"
    );
    assert_eq!(er["arg_keys"], json!(["text"]), "{er}");
    let h = er["args_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no args_sha256: {er}"));
    assert!(
        h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
        "args_sha256 is not a sha256: {er}"
    );

    assert_eq!(drop[0]["rule"], "/tools/drop_cluster/action", "{}", drop[0]);
    assert!(
        drop[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("destructive"),
        "{}",
        drop[0]
    );
    assert_eq!(dump[0]["rule"], "/default", "{}", dump[0]);

    // The forwarded call has its response audited too, with the HTTP status.
    let resp = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "response" && r["id"] == er["id"]
        })
        .unwrap_or_else(|| {
            panic!(
                "no response record for the echo call; audit:\n{}",
                rig.agent.audit_text()
            )
        });
    assert_eq!(resp["status"], 200, "{resp}");
    assert!(resp["latency_ms"].is_number(), "{resp}");

    let text = rig.agent.audit_text();
    assert!(
        !text.contains(secret_value),
        "the audit must never contain argument values:\n{text}"
    );
    assert!(
        !text.contains("do-not-leak"),
        "the audit must never contain result contents:\n{text}"
    );
}

/// (10) Bad input: a non-JSON body is answered 400 with JSON-RPC -32700, audited `refused`,
/// not forwarded; JSON-RPC with duplicate keys is refused and not forwarded either.
#[test]
fn bad_input_is_refused_and_not_forwarded() {
    let rig = Rig::start("badinput", 10, POLICY);
    let url = rig.server.url();
    let before = rig.server.http_requests();

    let run = rig.client(&["raw-post", &url, "this is {not json"]);
    run.assert_success();
    let status = run.field("status").unwrap_or_default();
    assert!(
        status.contains(" 400"),
        "non-JSON body must get 400, got `{status}`\n{}",
        run.describe()
    );
    let v = run.body_json();
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    assert_eq!(v["error"]["code"], -32700, "{v}");
    assert!(v["id"].is_null(), "a parse error has id null: {v}");
    rig.wait_refused(run.pid, "the non-JSON body");
    assert_eq!(
        rig.server.http_requests(),
        before,
        "the non-JSON body reached the server"
    );

    // Duplicate keys: the agent and the server could read different tool names.
    let dup_name = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","name":"drop_cluster","arguments":{"cluster":"prod","text":"x"}}}"#;
    let dup_method = r#"{"jsonrpc":"2.0","id":10,"method":"tools/list","method":"tools/call","params":{"name":"drop_cluster","arguments":{"cluster":"prod"}}}"#;
    for body in [dup_name, dup_method] {
        let run = rig.client(&["raw-post", &url, body]);
        // Either an answer that is a JSON-RPC error, or the connection closed: never forwarded.
        if run.field("status").is_some() {
            let v = run.body_json();
            assert!(
                v["error"]["code"].is_i64(),
                "duplicate keys must be refused with a JSON-RPC error: {v}\n{}",
                run.describe()
            );
            assert!(v["result"].is_null(), "{v}");
        }
        rig.wait_refused(run.pid, body);
    }
    assert_eq!(
        rig.server.http_requests(),
        before,
        "a refused request reached the server"
    );
    assert_eq!(rig.server.calls("drop_cluster"), 0);
    assert_eq!(rig.server.calls("echo"), 0);
}

/// (2, on a reused connection) A client that keeps its HTTP/1.1 connection open — one request
/// after another, or all pipelined at once — gets each call decided on its own: the denied call
/// in the middle never reaches the server, the allowed ones around it do.
#[test]
fn every_request_on_a_kept_alive_connection_is_decided() {
    let rig = Rig::start("keepalive", 11, POLICY);
    let url = rig.server.url();
    let b1 = call_body(1, "echo", json!({"text": "first"}));
    let b2 = call_body(2, "drop_cluster", json!({"cluster": "prod"}));
    let b3 = call_body(3, "echo", json!({"text": "third"}));
    let mut echoes = 0;
    for mode in ["keepalive", "pipeline"] {
        let run = rig.client(&[mode, &url, &b1, &b2, &b3]);
        let lines = run.json_lines();
        assert_eq!(
            rig.server.calls("drop_cluster"),
            0,
            "{mode}: the denied call on a reused connection reached the server\n{}",
            run.describe()
        );
        run.assert_success();
        assert_eq!(
            lines.len(),
            3,
            "{mode}: one response per request\n{}",
            run.describe()
        );
        let bodies: Vec<Value> = lines
            .iter()
            .map(|l| {
                assert_eq!(l["status"], 200, "{mode}: {l}");
                serde_json::from_str(l["body"].as_str().unwrap()).expect("JSON body")
            })
            .collect();
        assert_eq!(bodies[0]["id"], 1, "{mode}: {}", bodies[0]);
        assert_eq!(
            bodies[0]["result"]["content"][0]["text"], "first",
            "{mode}: {}",
            bodies[0]
        );
        assert_eq!(bodies[1]["id"], 2, "{mode}: {}", bodies[1]);
        assert_eq!(
            bodies[1]["result"]["isError"], true,
            "{mode}: {}",
            bodies[1]
        );
        assert_eq!(
            bodies[1]["result"]["content"][0]["text"], DENY_TEXT_DESTRUCTIVE,
            "{mode}: {}",
            bodies[1]
        );
        assert_eq!(bodies[2]["id"], 3, "{mode}: {}", bodies[2]);
        assert_eq!(
            bodies[2]["result"]["content"][0]["text"], "third",
            "{mode}: {}",
            bodies[2]
        );
        echoes += 2;
        assert_eq!(rig.server.calls("echo"), echoes, "{mode}");
        rig.wait_decisions("drop_cluster", run.pid, 1);
    }
}

/// (2, other spellings) The decision is made on the decoded JSON: a tool name or method written
/// with JSON escapes, or a denied call inside a JSON-RPC batch, is denied like the plain one and
/// never reaches the server.
#[test]
fn escaped_and_batched_denied_calls_are_denied() {
    let rig = Rig::start("escaped", 12, POLICY);
    let url = rig.server.url();
    let escaped_name = r#"{"jsonrpc":"2.0","id":21,"method":"tools/call","params":{"name":"drop\u005fcluster","arguments":{"cluster":"p"}}}"#;
    let escaped_method = r#"{"jsonrpc":"2.0","id":22,"method":"tools\/call","params":{"name":"drop_cluster","arguments":{"cluster":"p"}}}"#;
    for (body, id) in [(escaped_name, 21), (escaped_method, 22)] {
        let run = rig.client(&["raw-post", &url, body]);
        run.assert_success();
        let v = run.body_json();
        assert_eq!(v["id"], id, "{v}");
        assert_eq!(v["result"]["isError"], true, "{body} must be denied: {v}");
        assert_eq!(
            v["result"]["content"][0]["text"], DENY_TEXT_DESTRUCTIVE,
            "{v}"
        );
    }
    let batch = format!(
        "[{}]",
        call_body(23, "drop_cluster", json!({"cluster": "p"}))
    );
    let run = rig.client(&["raw-post", &url, &batch]);
    let out = run.stdout_text();
    assert!(
        !out.contains("dropped cluster"),
        "the batched denied call was executed\n{}",
        run.describe()
    );
    assert_eq!(
        rig.server.calls("drop_cluster"),
        0,
        "a denied call reached the server"
    );
    assert_eq!(
        rig.server.http_requests(),
        0,
        "nothing here should have been forwarded"
    );
}

/// A JSON-RPC body is inspected whatever the HTTP method carries it: a server that routes PUT or
/// PATCH to its MCP handler must not receive a call the policy never saw.
#[test]
fn bodies_of_other_methods_are_inspected_too() {
    let rig = Rig::start("othermethods", 13, POLICY);
    let url = rig.server.url();
    for (i, method) in ["PUT", "PATCH", "DELETE", "GET"].into_iter().enumerate() {
        let body = call_body(90 + i as u64, "drop_cluster", json!({"cluster": "prod"}));
        let run = rig.client(&["raw-request", method, &url, &body]);
        run.assert_success();
        let v = run.body_json();
        assert_eq!(v["result"]["isError"], true, "{method}: {v}");
        assert_eq!(
            result_text(&v["result"]),
            DENY_TEXT_DESTRUCTIVE,
            "{method}: {v}"
        );
    }
    rig.server.assert_not_reached("drop_cluster");
    assert_eq!(rig.decisions_for("drop_cluster").len(), 4);
}

/// Requests that would open a tunnel past the parser (Upgrade: websocket or h2c) are refused, and
/// a body above the inspection limit (4 MiB by default) is refused rather than forwarded unread.
#[test]
fn tunnels_and_oversized_bodies_are_refused() {
    let rig = Rig::start("tunnels", 15, POLICY);
    let url = rig.server.url();
    let body = call_body(1, "echo", json!({"text": "through a tunnel"}));
    for upgrade in ["websocket", "h2c"] {
        let run = rig.client(&[
            "raw-post",
            &url,
            &body,
            "Connection: Upgrade",
            &format!("Upgrade: {upgrade}"),
        ]);
        run.assert_success();
        let status = run.field("status").unwrap_or_default();
        assert!(
            status.contains(" 403"),
            "Upgrade: {upgrade} got `{status}`\n{}",
            run.describe()
        );
        rig.wait_refused(run.pid, upgrade);
    }
    // Just over the limit: what the agent leaves unread stays small enough for the socket
    // buffers, so the client reads the answer instead of a reset.
    let over = 4 * 1024 * 1024 + 64 * 1024;
    let run = rig.client(&["raw-post-big", &url, &over.to_string()]);
    let status = run.field("status").unwrap_or_default();
    assert!(
        status.contains(" 413"),
        "a body over 4 MiB got `{status}`\n{}",
        run.describe()
    );
    rig.wait_refused(run.pid, "the body over 4 MiB");
    assert_eq!(
        rig.server.http_requests(),
        0,
        "a refused request reached the server"
    );
}

// ---------------------------------------------------------------------------------------------
// The policy engine as a whole: reloads, counters across reloads, exact quotas under
// concurrency, quota given back when the upstream did not run a call, bindings (and callers
// whose pod is not known), dry runs, argument schemas and conditions. Test indices 110–119.

/// A test's world for the policy-engine tests: one cgroup (clients run in its child `app`), an
/// [`McpPeer`], and an agent started with `--config DIR/mcpwarden.yaml`. The config and the
/// policy files live in a directory of their own (not the agent's temp dir, where the audit
/// and the log are written), so the watcher there sees only what the test writes.
/// Fields drop in order: the agent stops first, then the peer, then the cgroup, then the files.
struct EngineRig {
    agent: Agent,
    peer: McpPeer,
    cg: TestCgroup,
    app: PathBuf,
    dir: TempDir,
}

impl EngineRig {
    /// `files` (name, text) are written to the rig's directory, then `config` as
    /// `mcpwarden.yaml` with `{PEER}` (the peer's `/mcp-json` URL), `{IP}` (the test's address)
    /// and `{CG}` (the test cgroup's path below the mount) filled in. Relative policy paths in
    /// the config are relative to that directory.
    fn start(name: &str, index: u8, files: &[(&str, &str)], config: &str) -> EngineRig {
        assert!(
            (110..=119).contains(&index),
            "the policy-engine tests use indices 110-119"
        );
        require_root();
        let dir = TempDir::new(&format!("pol-{name}"));
        let cg = TestCgroup::new(&format!("pol-{name}"));
        let app = cg.child("app");
        let agent_cg = cg.path().join("agent");
        let ip = test_ip(index);
        let peer = McpPeer::start(SocketAddr::new(IpAddr::V4(ip), 0));
        for (file, text) in files {
            std::fs::write(dir.path().join(file), text)
                .unwrap_or_else(|e| panic!("write {file}: {e}"));
        }
        let config = config
            .replace("{PEER}", &peer.url("/mcp-json"))
            .replace("{IP}", &ip.to_string())
            .replace("{CG}", &cg.rel_path());
        let config_path = dir.path().join("mcpwarden.yaml");
        std::fs::write(&config_path, &config).expect("write config");
        eprintln!("[{name}] config:\n{config}");
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: format!("pol-{name}"),
                endpoints: Vec::new(),
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: agent_cg,
            },
            &["--config".to_string(), config_path.display().to_string()],
        );
        EngineRig {
            agent,
            peer,
            cg,
            app,
            dir,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The peer's endpoint as the clients call it.
    fn url(&self) -> String {
        self.peer.url("/mcp-json")
    }

    /// `mcp-client raw-post URL BODY` in the cgroup `cgroup` (default: `app`).
    fn post_in(&self, bin: &str, cgroup: Option<&Path>, url: &str, body: &str) -> ClientRun {
        run_client(
            bin,
            Some(cgroup.unwrap_or(&self.app)),
            &["raw-post", url, body],
            CLIENT_TIMEOUT,
        )
    }

    /// One tools/call of `tool` from `app` to the peer; the client's run and the JSON-RPC
    /// response.
    fn call(&self, tool: &str, args: Value) -> (ClientRun, Value) {
        self.call_at(&self.url(), tool, args)
    }

    fn call_at(&self, url: &str, tool: &str, args: Value) -> (ClientRun, Value) {
        let run = self.post_in(CLIENT_BIN, None, url, &call_body(1, tool, args));
        run.assert_success();
        let v = run.body_json();
        (run, v)
    }

    /// The decision record of `tool` by `pid` (waits for it).
    fn decision(&self, pid: u32, tool: &str) -> Value {
        self.record(&format!("decision on {tool} by pid {pid}"), |r| {
            r["pid"] == pid && r["tool"] == tool && !r["decision"].is_null()
        })
    }

    fn record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.agent.wait_audit(AUDIT_WAIT, pred).unwrap_or_else(|| {
            panic!(
                "no audit record: {what}; audit:\n{}",
                self.agent.audit_text()
            )
        })
    }

    /// Every `policy_reload` record so far.
    fn reloads(&self) -> Vec<Value> {
        self.agent
            .audit_lines()
            .into_iter()
            .filter(|r| r["event"] == "policy_reload")
            .collect()
    }

    /// Wait for a `policy_reload` record after the first `seen` that satisfies `pred`.
    fn wait_reload(&self, seen: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(Duration::from_secs(10), || {
            self.reloads().into_iter().skip(seen).find(|r| pred(r))
        })
        .unwrap_or_else(|| {
            panic!(
                "no policy_reload record: {what}; audit:\n{}\n--- agent log ---\n{}",
                self.agent.audit_text(),
                self.agent.log()
            )
        })
    }
}

/// Replace `path` the way editors and ConfigMaps do: write a sibling, rename it over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// The JSON-RPC result of a tools/call that was allowed and ran: its text. Panics otherwise.
fn ran(v: &Value, what: &str) -> String {
    assert!(
        v["error"].is_null() && v["result"]["isError"] != true,
        "{what}: expected the call to run, got {v}"
    );
    result_text(&v["result"]).to_owned()
}

/// The refusal text of a denied tools/call (an isError result). Panics otherwise.
fn refused(v: &Value, what: &str) -> String {
    assert!(
        v["error"].is_null() && v["result"]["isError"] == true,
        "{what}: expected an isError refusal, got {v}"
    );
    result_text(&v["result"]).to_owned()
}

const RELOAD_A: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

const RELOAD_B: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {"action": "deny", "reason": "B says no"},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

/// Line 6 lacks a comma between two members. Were it read, echo would be allowed.
const RELOAD_BROKEN: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {"action": "allow"},
    "drop_cluster": {"action": "allow" "reason": "broken"}
  }
}"#;
const RELOAD_BROKEN_LINE: usize = 6;

const RELOAD_C: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "drop_cluster": {"action": "deny", "reason": "C says no"}
  }
}"#;

const ONE_SERVER: &str = "servers:\n  - name: peer\n    url: {PEER}\n    policy: policy.json\n";

/// A policy rewritten in place (watcher) takes effect, with a `policy_reload` record naming its
/// sha256; a broken one is refused with `file:line:col` and the previous one stays in force; a
/// change the watcher cannot see (written through a hard link in another directory) takes
/// effect on SIGHUP.
#[test]
fn reload_valid_invalid_valid() {
    let rig = EngineRig::start("reload", 110, &[("policy.json", RELOAD_A)], ONE_SERVER);
    let policy = rig.file("policy.json");
    let policy_name = policy.display().to_string();

    // A: echo runs, drop_cluster is refused.
    let (run, v) = rig.call("echo", json!({"text": "under A"}));
    assert_eq!(ran(&v, "A: echo"), "under A");
    assert_eq!(
        rig.decision(run.pid, "echo")["policy"]["sha256"],
        sha256_hex(RELOAD_A.as_bytes())
    );
    let (_, v) = rig.call("drop_cluster", json!({"cluster": "prod"}));
    assert_eq!(refused(&v, "A: drop_cluster"), DENY_TEXT_DESTRUCTIVE);
    eprintln!("[reload] A: echo ran, drop_cluster refused");

    // B, written in place (the watcher's path).
    let seen = rig.reloads().len();
    std::fs::write(&policy, RELOAD_B).expect("write B");
    let sha_b = sha256_hex(RELOAD_B.as_bytes());
    let rec = rig.wait_reload(seen, "B loaded", |r| r["policy"]["sha256"] == sha_b);
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("loaded"),
        "{rec}"
    );
    assert_eq!(rec["policy"]["file"], policy_name, "{rec}");
    let (run, v) = rig.call("echo", json!({"text": "under B"}));
    assert_eq!(
        refused(&v, "B: echo"),
        "Denied by mcpwarden policy: B says no. Do not retry this call."
    );
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["rule"], "/tools/echo/action", "{d}");
    assert_eq!(d["policy"]["sha256"], sha_b, "{d}");
    assert_eq!(d["policy"]["file"], policy_name, "{d}");
    eprintln!("[reload] B via the watcher: {rec}\n[reload] B decides echo: {d}");

    // Broken: refused with file:line:col, B stays in force.
    let seen = rig.reloads().len();
    replace_file(&policy, RELOAD_BROKEN);
    let rec = rig.wait_reload(seen, "the broken file refused", |r| {
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("stays in force")
    });
    let reason = rec["reason"].as_str().unwrap_or_default().to_owned();
    let at = format!("{policy_name}:{RELOAD_BROKEN_LINE}:");
    let col = reason
        .find(&at)
        .map(|i| &reason[i + at.len()..])
        .unwrap_or_else(|| panic!("the reload error does not name {at}COL: {rec}"));
    let digits: String = col.chars().take_while(char::is_ascii_digit).collect();
    assert!(
        !digits.is_empty() && digits != "0" && col[digits.len()..].starts_with(':'),
        "the reload error must name {at}COL: with a column: {rec}"
    );
    let (run, v) = rig.call("echo", json!({"text": "under broken"}));
    refused(&v, "broken: echo still decided by B");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["rule"], "/tools/echo/action", "{d}");
    assert_eq!(d["policy"]["sha256"], sha_b, "{d}");
    rig.peer.assert_not_reached("drop_cluster");
    assert_eq!(rig.peer.calls("echo"), 1);
    eprintln!("[reload] broken file refused ({reason}); B still decides echo");

    // C, written through a hard link in a directory nobody watches: the watcher cannot see
    // it (inotify reports a change to the directory of the path it was opened by), so only
    // SIGHUP can load it.
    let elsewhere = TempDir::new("pol-reload-link");
    let link = elsewhere.path().join("policy.json");
    std::fs::hard_link(&policy, &link).expect("hard link the policy file");
    std::thread::sleep(Duration::from_millis(600));
    let seen = rig.reloads().len();
    std::fs::write(&link, RELOAD_C).expect("write C through the link");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), RELOAD_C);
    std::thread::sleep(Duration::from_millis(1000));
    let (run, v) = rig.call("echo", json!({"text": "before SIGHUP"}));
    refused(&v, "C written unseen: B still decides echo until SIGHUP");
    assert_eq!(rig.decision(run.pid, "echo")["policy"]["sha256"], sha_b);
    let sha_c = sha256_hex(RELOAD_C.as_bytes());
    assert!(
        !rig.reloads()
            .iter()
            .skip(seen)
            .any(|r| r["policy"]["sha256"] == sha_c),
        "C was loaded without SIGHUP: the premise of this step (the watcher cannot see a \
         write through a link elsewhere) does not hold; audit:\n{}",
        rig.agent.audit_text()
    );
    let pid = rig.agent.pid().expect("agent running");
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGHUP) },
        0,
        "kill -HUP"
    );
    let rec = rig.wait_reload(seen, "C loaded on SIGHUP", |r| {
        r["policy"]["sha256"] == sha_c
    });
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("loaded"),
        "{rec}"
    );
    let (_, v) = rig.call("echo", json!({"text": "under C"}));
    assert_eq!(ran(&v, "C: echo"), "under C");
    let (run, v) = rig.call("drop_cluster", json!({"cluster": "prod"}));
    assert_eq!(
        refused(&v, "C: drop_cluster"),
        "Denied by mcpwarden policy: C says no. Do not retry this call."
    );
    let d = rig.decision(run.pid, "drop_cluster");
    assert_eq!(d["rule"], "/tools/drop_cluster/action", "{d}");
    assert_eq!(d["policy"]["sha256"], sha_c, "{d}");
    eprintln!("[reload] C (unseen by the watcher) loaded on SIGHUP: {rec}; C decides");
}

fn limit_policy(scope: &str, other_reason: &str) -> String {
    format!(
        r#"{{
  "version": "1",
  "default": "deny",
  "tools": {{
    "start_security_scan": {{"limits": [{{"counter": "scans", "window": "minute", "max": 3, "scope": "{scope}"}}]}},
    "drop_cluster": {{"action": "deny", "reason": "{other_reason}"}}
  }}
}}"#
    )
}

/// A counter keeps its count across a reload that leaves its name and scope alone, and starts
/// afresh when its scope changes.
#[test]
fn counters_survive_reload() {
    let v1 = limit_policy("grant", "first wording");
    let rig = EngineRig::start("counters", 111, &[("policy.json", &v1)], ONE_SERVER);
    let policy = rig.file("policy.json");
    let scan = |what: &str| {
        let (run, v) = rig.call("start_security_scan", json!({"cluster": "c1"}));
        (run, v, what.to_owned())
    };
    for i in 1..=2 {
        let (_, v, what) = scan(&format!("call {i}"));
        assert_eq!(ran(&v, &what), "scan started on c1");
    }

    let v2 = limit_policy("grant", "second wording, same counters");
    let seen = rig.reloads().len();
    replace_file(&policy, &v2);
    let sha2 = sha256_hex(v2.as_bytes());
    rig.wait_reload(seen, "cosmetic change loaded", |r| {
        r["policy"]["sha256"] == sha2
    });
    let (_, v, what) = scan("call 3 (after a cosmetic reload)");
    ran(&v, &what);
    let (run, v, what) = scan("call 4 (over 3 per minute)");
    let text = refused(&v, &what);
    let d = rig.decision(run.pid, "start_security_scan");
    assert_eq!(d["rule"], "/tools/start_security_scan/limits/0", "{d}");
    assert_eq!(d["policy"]["sha256"], sha2, "{d}");
    eprintln!("[counters] 2 calls, reload, 1 more allowed, the 4th refused: {text}");

    let v3 = limit_policy("server", "second wording, same counters");
    let seen = rig.reloads().len();
    replace_file(&policy, &v3);
    let sha3 = sha256_hex(v3.as_bytes());
    rig.wait_reload(seen, "scope change loaded", |r| {
        r["policy"]["sha256"] == sha3
    });
    let (run, v, what) = scan("call 5 (scope changed to server: a new counter)");
    ran(&v, &what);
    assert_eq!(
        rig.decision(run.pid, "start_security_scan")["decision"],
        "allow"
    );
    assert_eq!(rig.peer.calls("start_security_scan"), 4);
    eprintln!("[counters] scope grant -> server: the counter started afresh (call 5 allowed)");
}

/// 100 calls sent at once on 100 connections under a 10-per-minute server-wide limit: exactly
/// 10 are admitted, and the server runs exactly 10.
#[test]
fn quota_exact_under_concurrency() {
    const N: usize = 100;
    let policy = r#"{"version": "1", "default": "deny", "tools": {"echo": {"limits": [
        {"counter": "echoes", "window": "minute", "max": 10, "scope": "server"}]}}}"#;
    let rig = EngineRig::start("concurrency", 112, &[("policy.json", policy)], ONE_SERVER);
    let addr = rig.peer.addr().to_string();
    let mut steps = Vec::new();
    // Every request is written before any response is read.
    for i in 0..N {
        let body = call_body(i as u64, "echo", json!({"text": format!("c{i}")}));
        let bytes =
            mcpwarden_tests::rawhttp::request_bytes(&addr, "/mcp-json", body.as_bytes(), &[], true);
        steps.push(json!({"op": "raw", "conn": format!("c{i}"), "addr": addr,
            "bytes": String::from_utf8(bytes).unwrap(), "responses": 0}));
    }
    for i in 0..N {
        steps.push(json!({"op": "raw", "conn": format!("c{i}"), "addr": addr, "bytes": "", "responses": 1}));
    }
    let run = run_script(
        CLIENT_BIN,
        Some(&rig.app),
        &json!({"timeout_ms": 20000, "steps": steps}),
        CLIENT_TIMEOUT,
    );
    let (mut allowed, mut denied) = (0, 0);
    for i in 0..N {
        let step = run.step(N + i);
        let resp = &step["responses"][0];
        let msg = if !resp["json"].is_null() {
            resp["json"].clone()
        } else {
            common::peer_rig::event_messages(resp)
                .into_iter()
                .find(|m| m["id"] == i)
                .unwrap_or(Value::Null)
        };
        assert_eq!(msg["id"], i, "request {i}: {step}\n{}", run.describe());
        if msg["result"]["isError"] == true {
            denied += 1;
        } else {
            assert_eq!(
                result_text(&msg["result"]),
                format!("c{i}"),
                "request {i}: {step}"
            );
            allowed += 1;
        }
    }
    let recs = wait_for(AUDIT_WAIT, || {
        let v = rig.agent.decisions_for("echo");
        (v.len() >= N).then_some(v)
    })
    .unwrap_or_else(|| panic!("expected {N} decisions; audit:\n{}", rig.agent.audit_text()));
    let audit_allowed = recs.iter().filter(|r| r["decision"] == "allow").count();
    let audit_denied: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    eprintln!(
        "[concurrency] {N} concurrent calls: {allowed} ran, {denied} refused; audit {audit_allowed} allow / {} deny; peer ran {}",
        audit_denied.len(),
        rig.peer.calls("echo")
    );
    assert_eq!(allowed, 10, "exactly 10 calls may run");
    assert_eq!(denied, N - 10);
    assert_eq!(audit_allowed, 10, "audit allow records");
    assert_eq!(audit_denied.len(), N - 10, "audit deny records");
    assert!(
        audit_denied
            .iter()
            .all(|r| r["rule"] == "/tools/echo/limits/0"),
        "every denial is the limit's"
    );
    assert_eq!(
        rig.peer.calls("echo"),
        10,
        "the server ran exactly 10 calls"
    );
}

/// How a [`RawUpstream`] treats each request it has read whole.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RawMode {
    /// Close the connection without a word (the request was delivered: it may have run).
    CloseSilently,
    /// Answer `500 Internal Server Error` with a plain-text body.
    Http500,
}

/// A bare HTTP/1.1 upstream on its own thread: reads each request (head and content-length
/// body), counts it, then does what its [`RawMode`] says. Stops on drop.
struct RawUpstream {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawUpstream {
    fn start(ip: Ipv4Addr, mode: RawMode) -> RawUpstream {
        let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(ip), 0)).expect("bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => Self::serve(sock, mode, &r),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        RawUpstream {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// One request per connection: both modes close it afterwards.
    fn serve(mut sock: TcpStream, mode: RawMode, received: &AtomicU64) {
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        received.fetch_add(1, Ordering::SeqCst);
        match mode {
            RawMode::CloseSilently => {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            RawMode::Http500 => {
                let _ = sock.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n\
                      content-length: 5\r\nconnection: close\r\n\r\noops!",
                );
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one_call_per_minute(tool: &str, counter: &str) -> String {
    format!(
        r#"{{"version": "1", "default": "deny", "tools": {{"{tool}": {{"limits": [
        {{"counter": "{counter}", "window": "minute", "max": 1, "scope": "server"}}]}}}}}}"#
    )
}

/// The response record of the call made by `pid` (a record with its pid and no decision).
fn response_record(rig: &EngineRig, pid: u32, what: &str) -> Value {
    rig.record(what, |r| {
        r["pid"] == pid && r["event"] == "response" && r["decision"].is_null()
    })
}

/// A call's quota is given back when the upstream certainly did not run it (a JSON-RPC error,
/// connect refused, an HTTP 500), and stays spent when the request was delivered and the
/// connection then dropped without an answer.
#[test]
fn quota_released_when_upstream_not_run() {
    let ip = test_ip(113);
    let silent = RawUpstream::start(ip, RawMode::CloseSilently);
    let http500 = RawUpstream::start(ip, RawMode::Http500);
    let closed_port = free_port(ip);
    let closed_url = format!("http://{ip}:{closed_port}/mcp");
    let silent_url = format!("http://{}/mcp", silent.addr);
    let http500_url = format!("http://{}/mcp", http500.addr);
    let config = format!(
        "servers:\n\
         \x20 - {{name: peer, url: \"{{PEER}}\", policy: peer.json}}\n\
         \x20 - {{name: closed, url: \"{closed_url}\", policy: closed.json}}\n\
         \x20 - {{name: silent, url: \"{silent_url}\", policy: silent.json}}\n\
         \x20 - {{name: http500, url: \"{http500_url}\", policy: http500.json}}\n"
    );
    let peer_policy = r#"{"version": "1", "default": "deny", "tools": {
        "fail_rpc": {"limits": [{"counter": "f", "window": "minute", "max": 1, "scope": "server"}]},
        "echo": {"limits": [{"counter": "e", "window": "minute", "max": 1, "scope": "server"}]}}}"#;
    let rig = EngineRig::start(
        "release",
        113,
        &[
            ("peer.json", peer_policy),
            ("closed.json", &one_call_per_minute("echo", "c")),
            ("silent.json", &one_call_per_minute("echo", "s")),
            ("http500.json", &one_call_per_minute("echo", "h")),
        ],
        &config,
    );

    // Control: a call that ran keeps its quota.
    let (run, v) = rig.call("echo", json!({"text": "ran"}));
    assert_eq!(ran(&v, "control: echo 1"), "ran");
    let resp = response_record(&rig, run.pid, "response to echo 1");
    assert_ne!(resp["quota_released"], true, "a call that ran: {resp}");
    let (run, v) = rig.call("echo", json!({"text": "over"}));
    refused(&v, "control: echo 2 over the limit");
    assert_eq!(
        rig.decision(run.pid, "echo")["rule"],
        "/tools/echo/limits/0"
    );
    eprintln!("[release] control: a call that ran keeps its quota (the next is refused)");

    // (a) JSON-RPC error from the upstream: released, the next call is admitted.
    let (run, v) = rig.call("fail_rpc", json!({}));
    assert_eq!(
        v["error"]["code"], -32001,
        "fail_rpc 1 reaches the server: {v}"
    );
    let resp = response_record(&rig, run.pid, "response to fail_rpc 1");
    assert_eq!(resp["quota_released"], true, "JSON-RPC error: {resp}");
    let (run, v) = rig.call("fail_rpc", json!({}));
    assert_eq!(
        v["error"]["code"], -32001,
        "fail_rpc 2 must be admitted (quota released) and reach the server: {v}"
    );
    assert_eq!(rig.decision(run.pid, "fail_rpc")["decision"], "allow");
    assert_eq!(rig.peer.calls("fail_rpc"), 2);
    eprintln!("[release] (a) JSON-RPC error: quota released, the next call admitted");

    // (b) Connect refused: 502, released.
    for i in 1..=2 {
        let run = rig.post_in(
            CLIENT_BIN,
            None,
            &closed_url,
            &call_body(1, "echo", json!({"text": "x"})),
        );
        run.assert_success();
        run.assert_status(502);
        let d = rig.decision(run.pid, "echo");
        assert_eq!(
            d["decision"], "allow",
            "closed port, call {i}: admitted, as the quota was given back: {d}"
        );
        let rec = rig.record(&format!("closed port call {i}: quota_released"), |r| {
            r["pid"] == run.pid && r["quota_released"] == true
        });
        eprintln!("[release] (b) connect refused, call {i}: 502, quota released: {rec}");
    }

    // (d) HTTP 500 before any result: released.
    for i in 1..=2 {
        let run = rig.post_in(
            CLIENT_BIN,
            None,
            &http500_url,
            &call_body(1, "echo", json!({"text": "x"})),
        );
        run.assert_success();
        let status = run.field("status").unwrap_or_default();
        assert!(
            status.contains(" 500") || status.contains(" 502"),
            "{}",
            run.describe()
        );
        assert_eq!(rig.decision(run.pid, "echo")["decision"], "allow");
        rig.record(&format!("HTTP 500 call {i}: quota_released"), |r| {
            r["pid"] == run.pid && r["quota_released"] == true
        });
    }
    assert_eq!(http500.received(), 2);
    eprintln!("[release] (d) HTTP 500: quota released twice, both calls reached the upstream");

    // (c) Delivered, then the connection closed without an answer: the quota stays spent.
    let run = rig.post_in(
        CLIENT_BIN,
        None,
        &silent_url,
        &call_body(1, "echo", json!({"text": "x"})),
    );
    let status = run.field("status").unwrap_or_default();
    assert!(
        !status.contains(" 200"),
        "no answer from the upstream cannot be a 200\n{}",
        run.describe()
    );
    assert_eq!(rig.decision(run.pid, "echo")["decision"], "allow");
    let first = run.pid;
    let (run, v) = rig.call_at(&silent_url, "echo", json!({"text": "x"}));
    refused(&v, "silent upstream, call 2: the quota stays spent");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["rule"], "/tools/echo/limits/0", "{d}");
    assert_eq!(
        silent.received(),
        1,
        "only the first call reached the upstream"
    );
    let released: Vec<Value> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["pid"] == first && r["quota_released"] == true)
        .collect();
    assert!(
        released.is_empty(),
        "a call delivered to the upstream must keep its quota: {released:?}"
    );
    eprintln!(
        "[release] (c) delivered then disconnected ({status}): quota kept, the next call refused"
    );
}

/// Bindings: the first match wins (comm before cgroup), a caller nothing matches gets the
/// server's policy, pod selectors pass over callers outside pods, and a caller in a pod cgroup
/// whose metadata never comes is refused after `identity_wait_ms`.
#[test]
fn bindings() {
    let deny = |who: &str| {
        format!(
            r#"{{"version": "1", "default": "deny", "tools": {{"echo": {{"action": "deny", "reason": "{who} says no"}}}}}}"#
        )
    };
    let allow_echo = r#"{"version": "1", "default": "deny", "tools": {"echo": {}}}"#;
    let config = "identity_wait_ms: 300\n\
                  servers:\n  - name: peer\n    url: {PEER}\n    policy: default.json\n\
                  bindings:\n\
                  \x20 - match: {namespace: payments}\n    policy: payments.json\n\
                  \x20 - match: {comm: mcp-client}\n    policy: strict.json\n\
                  \x20 - match: {cgroup: \"{CG}/app/other*\"}\n    policy: other.json\n";
    let rig = EngineRig::start(
        "bindings",
        114,
        &[
            ("default.json", allow_echo),
            ("payments.json", allow_echo),
            ("strict.json", &deny("strict")),
            ("other.json", &deny("other")),
        ],
        config,
    );
    let other_cg = rig.cg.child("app/other1");
    // The same client under another name: comm "polclient".
    let renamed = rig.file("polclient");
    std::fs::copy(CLIENT_BIN, &renamed).expect("copy mcp-client");
    let renamed = renamed.display().to_string();
    let url = rig.url();
    let body = call_body(1, "echo", json!({"text": "hi"}));
    let file_of = |f: &str| rig.file(f).display().to_string();

    // mcp-client in app/other1: both the comm and the cgroup binding match; the first wins.
    let run = rig.post_in(CLIENT_BIN, Some(&other_cg), &url, &body);
    run.assert_success();
    refused(&run.body_json(), "mcp-client in other1 → strict");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["comm"], "mcp-client", "{d}");
    assert_eq!(d["binding"], "/bindings/1", "{d}");
    assert_eq!(d["policy"]["file"], file_of("strict.json"), "{d}");
    assert_eq!(d["reason"], "strict says no", "{d}");

    // polclient in app/other1: the cgroup binding.
    let run = rig.post_in(&renamed, Some(&other_cg), &url, &body);
    run.assert_success();
    refused(&run.body_json(), "polclient in other1 → other");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["comm"], "polclient", "{d}");
    assert_eq!(d["binding"], "/bindings/2", "{d}");
    assert_eq!(d["policy"]["file"], file_of("other.json"), "{d}");

    // polclient in app: nothing matches; the server's policy, binding null.
    let run = rig.post_in(&renamed, None, &url, &body);
    run.assert_success();
    assert_eq!(ran(&run.body_json(), "polclient in app → default"), "hi");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["decision"], "allow", "{d}");
    assert!(d["binding"].is_null(), "the server's default policy: {d}");
    assert_eq!(d["policy"]["file"], file_of("default.json"), "{d}");
    assert_eq!(rig.peer.calls("echo"), 1);
    eprintln!("[bindings] comm wins over cgroup (/bindings/1), cgroup alone (/bindings/2), nothing → default");

    // A caller in a pod cgroup whose metadata is never known: refused after the wait.
    let pod_cg = rig
        .cg
        .child("app/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice");
    let started = Instant::now();
    let run = rig.post_in(CLIENT_BIN, Some(&pod_cg), &url, &body);
    let took = started.elapsed();
    run.assert_success();
    let text = refused(
        &run.body_json(),
        "caller in a pod whose metadata is unknown",
    );
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["rule"], "/bindings/0", "{d}");
    assert_eq!(d["binding"], "/bindings/0", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("caller identity unresolved"),
        "{d}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "refused after {took:?}, before identity_wait_ms (300 ms)"
    );
    assert_eq!(
        rig.peer.calls("echo"),
        1,
        "the unresolved call reached the server"
    );
    eprintln!("[bindings] pod caller refused after {took:?}: {text}");

    // The config is watched too: with the cgroup binding moved before the comm binding,
    // mcp-client in app/other1 gets other.json.
    let config_path = rig.file("mcpwarden.yaml");
    let reordered = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("policy: strict.json", "policy: @SWAP@")
        .replace("policy: other.json", "policy: strict.json")
        .replace("policy: @SWAP@", "policy: other.json")
        .replace("{comm: mcp-client}", "@COMM@")
        .replace(
            &format!("{{cgroup: \"{}/app/other*\"}}", rig.cg.rel_path()),
            "{comm: mcp-client}",
        )
        .replace(
            "@COMM@",
            &format!("{{cgroup: \"{}/app/other*\"}}", rig.cg.rel_path()),
        );
    let seen = rig.reloads().len();
    replace_file(&config_path, &reordered);
    let sha = sha256_hex(reordered.as_bytes());
    let rec = rig.wait_reload(seen, "the reordered config loaded", |r| {
        r["policy"]["sha256"] == sha
    });
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("loaded"),
        "{rec}"
    );
    let run = rig.post_in(CLIENT_BIN, Some(&other_cg), &url, &body);
    run.assert_success();
    refused(
        &run.body_json(),
        "mcp-client in other1 after the reorder → other",
    );
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["binding"], "/bindings/1", "{d}");
    assert_eq!(d["policy"]["file"], file_of("other.json"), "{d}");
    assert_eq!(d["reason"], "other says no", "{d}");
    eprintln!("[bindings] config reloaded (bindings reordered): mcp-client in other1 now gets /bindings/1 = other.json");
}

/// `mode: dry_run`: what the policy would refuse is forwarded and audited `allow` with `would`,
/// and tools/list is not filtered.
#[test]
fn dry_run() {
    let policy = r#"{"version": "1", "mode": "dry_run", "default": "deny", "hide": ["secret_dump"],
        "tools": {"echo": {}, "drop_cluster": {"action": "deny", "reason": "destructive"}}}"#;
    let rig = EngineRig::start("dryrun", 115, &[("policy.json", policy)], ONE_SERVER);

    let (run, v) = rig.call("drop_cluster", json!({"cluster": "prod"}));
    let text = ran(&v, "dry run: drop_cluster is forwarded");
    assert_eq!(rig.peer.calls("drop_cluster"), 1);
    let d = rig.decision(run.pid, "drop_cluster");
    assert_eq!(d["decision"], "allow", "{d}");
    assert_eq!(d["would"], "deny", "{d}");
    assert_eq!(d["rule"], "/tools/drop_cluster/action", "{d}");
    eprintln!("[dryrun] drop_cluster ran ({text}); audit: {d}");

    let (run, v) = rig.call("secret_dump", json!({}));
    ran(&v, "dry run: a hidden tool is forwarded");
    let d = rig.decision(run.pid, "secret_dump");
    assert_eq!(d["decision"], "allow", "{d}");
    assert!(
        !d["would"].is_null() && d["would"] != "allow",
        "a hidden tool would be refused: {d}"
    );
    assert!(d["rule"].is_string(), "{d}");
    eprintln!(
        "[dryrun] hidden secret_dump ran; audit decision allow, would {}, rule {}",
        d["would"], d["rule"]
    );

    let (run, v) = rig.call("echo", json!({"text": "fine"}));
    assert_eq!(ran(&v, "dry run: echo"), "fine");
    let d = rig.decision(run.pid, "echo");
    assert_eq!(d["decision"], "allow", "{d}");
    assert!(d["would"].is_null(), "nothing would refuse echo: {d}");

    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}).to_string();
    let run = rig.post_in(CLIENT_BIN, None, &rig.url(), &body);
    run.assert_success();
    let names = common::peer_rig::tool_names(&run.body_json()["result"]);
    for t in ["echo", "drop_cluster", "secret_dump", "start_security_scan"] {
        assert!(
            names.iter().any(|n| n == t),
            "dry run must not filter tools/list: {t} missing from {names:?}"
        );
    }
    eprintln!("[dryrun] tools/list unfiltered: {names:?}");
}

/// An `arguments` schema and a `deny_if` condition: violating calls are refused with the
/// argument named and the rule pointed at, and never reach the server; a valid call runs.
#[test]
fn arguments_and_conditions() {
    let policy = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "add": {
      "arguments": {
        "type": "object",
        "properties": {"a": {"type": "integer", "maximum": 100}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": false
      },
      "deny_if": [{"path": "args.b", "op": "lt", "value": 0}]
    }
  }
}"#;
    let rig = EngineRig::start("arguments", 116, &[("policy.json", policy)], ONE_SERVER);

    let (run, v) = rig.call("add", json!({"a": 500, "b": 1}));
    let text = refused(&v, "a over the schema's maximum");
    let d = rig.decision(run.pid, "add");
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["rule"], "/tools/add/arguments", "{d}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("/a"),
        "the reason must name the argument /a: {d}"
    );
    assert!(
        !text.contains("500") && !reason.contains("500"),
        "the value must not be echoed: {text} / {d}"
    );
    eprintln!("[arguments] schema violation refused: {reason}");

    let (run, v) = rig.call("add", json!({"a": 1, "b": 2, "c": 3}));
    refused(&v, "an argument the schema does not allow");
    assert_eq!(rig.decision(run.pid, "add")["rule"], "/tools/add/arguments");

    let (run, v) = rig.call("add", json!({"a": 1, "b": -5}));
    refused(&v, "deny_if b < 0");
    let d = rig.decision(run.pid, "add");
    assert_eq!(d["rule"], "/tools/add/deny_if/0", "{d}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("args.b"),
        "the reason must name args.b: {d}"
    );
    eprintln!("[arguments] deny_if refused: {reason}");

    rig.peer.assert_not_reached("add");
    let (run, v) = rig.call("add", json!({"a": 2, "b": 3}));
    assert_eq!(ran(&v, "a valid call"), "5");
    assert_eq!(rig.decision(run.pid, "add")["decision"], "allow");
    assert_eq!(
        rig.peer.calls("add"),
        1,
        "only the valid call reached the server"
    );
    eprintln!("[arguments] the valid call ran; nothing else reached the server");
}
