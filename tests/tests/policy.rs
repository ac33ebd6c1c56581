//! Policy decisions on tools/call, limits, the audit records of decisions, and bad input.

mod common;

use common::*;
use mcpwarden_tests::cgroup::cgroup_id;
use mcpwarden_tests::sha256_hex;
use serde_json::{json, Value};

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
