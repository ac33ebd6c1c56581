//! Every MCP revision and transport through the interceptor, against `McpPeer` (a raw peer:
//! rmcp has no 2024-11-05 transport and refuses batches). Each test checks what the client
//! received, what reached the server, and the audit records (addresses 127.0.0.70–79).

mod common;

use common::peer_rig::*;
use mcpwarden_tests::PeerOpts;
use serde_json::{json, Value};

/// 2024-11-05 HTTP+SSE: answers come on the GET stream; refusals are injected there too
/// (the POST gets 202), listings are filtered, and results close their calls' records.
#[test]
fn http_sse_2024_11_05_refusals_arrive_on_the_stream() {
    let rig = PeerRig::start("proto-legacy", 60, PEER_POLICY, PeerOpts::default());
    let post =
        |body: String| json!({"op": "request", "conn": "p", "url": "$endpoint:s", "body": body});
    let wait = |id: u64| json!({"op": "sse_wait", "stream": "s", "until_id": id});
    let run = rig.script(json!([
        {"op": "sse_open", "stream": "s", "url": rig.url("/sse")},
        {"op": "sse_endpoint", "stream": "s"},
        post(init_body(1, "2024-11-05")),
        wait(1),
        post(notification("notifications/initialized")),
        post(rpc(json!(2), "tools/list", json!({}))),
        wait(2),
        post(call(3, "echo", json!({"text": "hi"}))),
        wait(3),
        post(call(4, "secret_dump", json!({}))),
        wait(4),
        post(call(5, "drop_cluster", json!({"cluster": "prod"}))),
        wait(5),
        post(call(6, "start_security_scan", json!({"cluster": "prod"}))),
        wait(6),
        {"op": "sse_close", "stream": "s"},
    ]));
    let d = run.describe();
    assert_eq!(run.step(0)["status"], 200, "{d}");
    for i in [2, 4, 5, 7, 9, 11, 13] {
        assert_eq!(
            run.step(i)["status"],
            202,
            "step {i} must be answered 202\n{d}"
        );
    }
    let answer = |step: usize, id: u64| -> Value {
        event_messages(run.step(step))
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no answer for id {id} on the stream\n{d}"))
    };
    assert_eq!(
        answer(3, 1)["result"]["protocolVersion"],
        "2024-11-05",
        "{d}"
    );
    assert_eq!(tool_names(&answer(6, 2)["result"]), VISIBLE, "{d}");
    assert_eq!(answer(8, 3)["result"]["content"][0]["text"], "hi", "{d}");
    assert_eq!(answer(10, 4)["error"]["code"], -32602, "{d}");
    assert_eq!(
        answer(10, 4)["error"]["message"],
        "Unknown tool: secret_dump",
        "{d}"
    );
    assert_eq!(answer(12, 5)["result"]["isError"], true, "{d}");
    assert!(
        answer(12, 5)["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("destructive"),
        "{d}"
    );
    assert_eq!(
        answer(14, 6)["error"]["message"],
        "Unknown tool: start_security_scan",
        "{d}"
    );
    for tool in ["secret_dump", "drop_cluster", "start_security_scan"] {
        rig.peer.assert_not_reached(tool);
    }
    assert_eq!(rig.peer.calls("echo"), 1);

    let result = rig.wait_record("echo's result", |r| {
        r["event"] == "response" && r["tool"] == "echo"
    });
    assert_eq!(result["transport"], "http+sse", "{result}");
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["revision"], "2024-11-05", "{result}");
    let listing = rig.wait_record("the listing's result", |r| {
        r["event"] == "response" && r["method"] == "tools/list"
    });
    assert_eq!(
        listing["hidden_tools"],
        json!(["start_security_scan", "secret_dump"]),
        "{listing}"
    );
    let refused = rig.wait_record("secret_dump refused", |r| {
        r["event"] == "refused" && r["tool"] == "secret_dump"
    });
    assert_eq!(refused["rule"], "/hide", "{refused}");
    assert_eq!(refused["transport"], "http+sse", "{refused}");
}

/// An HTTP+SSE stream announcing its POST endpoint on another origin is cut: a client would
/// post its calls where they are not intercepted.
#[test]
fn http_sse_endpoint_on_another_origin_is_refused() {
    let rig = PeerRig::start("proto-foreign", 61, PEER_POLICY, PeerOpts::default());
    let run = rig.script(json!([
        {"op": "sse_open", "stream": "s", "url": rig.url("/sse-foreign")},
        {"op": "sse_wait", "stream": "s", "count": 1, "timeout_ms": 2000},
    ]));
    let d = run.describe();
    assert_eq!(
        run.step(1)["events"],
        json!([]),
        "no endpoint reaches the client\n{d}"
    );
    assert_eq!(run.step(1)["ended"], true, "the stream is cut\n{d}");
    let rec = rig.wait_record("foreign endpoint refused", |r| {
        r["event"] == "refused"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("another origin"))
    });
    assert!(
        rec["reason"].as_str().unwrap().contains("127.0.0.254:9"),
        "{rec}"
    );
}

const SESS: [&str; 2] = ["mcp-session-id", "$session:m"];

fn version(v: &str) -> Value {
    json!(["mcp-protocol-version", v])
}

/// Streamable HTTP with SSE answers (2025-06-18): the listing is filtered inside the stream,
/// progress notifications and a server request pass event by event and are audited as
/// `server_message`, the result closes its call's record, refusals are answered as JSON.
#[test]
fn streamable_sse_2025_06_18_events_pass_and_listing_is_filtered() {
    let rig = PeerRig::start("proto-sse", 62, PEER_POLICY, PeerOpts::default());
    let url = rig.url("/mcp");
    let h = json!([SESS, version("2025-06-18")]);
    let slow = rpc(
        json!(3),
        "tools/call",
        json!({"name": "slow_echo", "arguments": {"text": "slow"}, "_meta": {"progressToken": "tok"}}),
    );
    let run = rig.script(json!([
        {"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-06-18"), "save_session": "m"},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": notification("notifications/initialized")},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": rpc(json!(2), "tools/list", json!({}))},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": slow},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": call(4, "drop_cluster", json!({"cluster": "prod"}))},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": call(5, "secret_dump", json!({}))},
        {"op": "request", "conn": "a", "url": url, "method": "DELETE", "headers": h},
    ]));
    let d = run.describe();
    assert_eq!(
        run.step(0)["headers"]["content-type"],
        "text/event-stream",
        "{d}"
    );
    assert_eq!(run.step(1)["status"], 202, "{d}");
    let listing = event_messages(run.step(2));
    assert_eq!(listing.len(), 1, "{d}");
    assert_eq!(tool_names(&listing[0]["result"]), VISIBLE, "{d}");

    let slow = event_messages(run.step(3));
    let methods: Vec<&str> = slow
        .iter()
        .map(|m| m["method"].as_str().unwrap_or("result"))
        .collect();
    assert_eq!(
        methods,
        [
            "notifications/progress",
            "notifications/progress",
            "notifications/progress",
            "ping",
            "result"
        ],
        "{d}"
    );
    assert_eq!(slow[4]["result"]["content"][0]["text"], "slow", "{d}");

    let denied = &run.step(4)["json"];
    assert_eq!(denied["result"]["isError"], true, "{d}");
    assert_eq!(
        run.step(5)["json"]["error"]["message"],
        "Unknown tool: secret_dump",
        "{d}"
    );
    assert_eq!(run.step(6)["status"], 200, "{d}");
    rig.peer.assert_not_reached("drop_cluster");
    rig.peer.assert_not_reached("secret_dump");

    let result = rig.wait_record("slow_echo's result", |r| {
        r["event"] == "response" && r["tool"] == "slow_echo"
    });
    assert_eq!(result["transport"], "streamable_http", "{result}");
    assert_eq!(result["revision"], "2025-06-18", "{result}");
    assert_eq!(result["is_error"], false, "{result}");
    let progress: Vec<Value> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "server_message" && r["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{}", rig.agent.audit_text());
    rig.wait_record("the server's ping", |r| {
        r["event"] == "server_message" && r["method"] == "ping" && r["id"] == "srv-1"
    });
}

/// JSON answers: upstream JSON-RPC errors are audited with their code; every page of a
/// paginated listing is filtered.
#[test]
fn streamable_json_errors_and_every_page_filtered() {
    let opts = PeerOpts {
        page_size: Some(2),
        ..PeerOpts::default()
    };
    let rig = PeerRig::start("proto-json", 63, PEER_POLICY, opts);
    let url = rig.url("/mcp-json");
    let mut steps = vec![
        json!({"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-03-26"), "save_session": "m"}),
        json!({"op": "request", "conn": "a", "url": url, "headers": [SESS], "body": call(2, "fail_rpc", json!({}))}),
    ];
    // Five pages of two (nine tools); each page's cursor comes from the previous answer.
    steps.push(json!({"op": "request", "conn": "a", "url": url, "headers": [SESS],
        "body": rpc(json!(10), "tools/list", json!({})), "save": {"c0": "/json/result/nextCursor"}}));
    for page in 1..5 {
        steps.push(json!({"op": "request", "conn": "a", "url": url, "headers": [SESS],
            "body": format!(r#"{{"jsonrpc":"2.0","id":{},"method":"tools/list","params":{{"cursor":"$var:c{}"}}}}"#, 10 + page, page - 1),
            "save": {format!("c{page}"): "/json/result/nextCursor"}}));
    }
    let run = rig.script(Value::Array(steps));
    let d = run.describe();
    assert_eq!(run.step(1)["json"]["error"]["code"], -32001, "{d}");
    let mut seen = Vec::new();
    for i in 2..7 {
        let page = &run.step(i)["json"]["result"];
        assert!(
            page["tools"].as_array().is_some_and(|t| t.len() <= 2),
            "{d}"
        );
        seen.extend(tool_names(page));
    }
    assert_eq!(seen, VISIBLE, "every page filtered, nothing lost\n{d}");
    let err = rig.wait_record("fail_rpc's error", |r| {
        r["event"] == "response" && r["tool"] == "fail_rpc"
    });
    assert_eq!(err["error_code"], -32001, "{err}");
    assert_eq!(err["is_error"], true, "{err}");
    assert_eq!(err["revision"], "2025-03-26", "{err}");
    // Records reach the file in order: once the last page's is there, all are.
    rig.wait_record("the last page's record", |r| {
        r["event"] == "response" && r["id"] == 14
    });
    let pages: Vec<Value> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "response" && r["method"] == "tools/list")
        .collect();
    assert_eq!(pages.len(), 5, "{}", rig.agent.audit_text());
}

/// 2025-11-25: the server ends the POST's stream after a priming event and `retry:`; the
/// client resumes with GET + Last-Event-ID and the result arrives there, attributed to its
/// call.
#[test]
fn streamable_2025_11_25_result_on_a_resumed_stream() {
    let rig = PeerRig::start("proto-resume", 64, PEER_POLICY, PeerOpts::default());
    let url = rig.url("/mcp");
    let h = json!([SESS, version("2025-11-25")]);
    let run = rig.script(json!([
        {"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-11-25"), "save_session": "m"},
        {"op": "request", "conn": "a", "url": url, "headers": h, "body": call(2, "resumable", json!({"text": "later"})), "save_event_id": "e"},
        {"op": "request", "url": url, "method": "GET", "headers": [SESS, ["mcp-protocol-version", "2025-11-25"], ["last-event-id", "$event_id:e"]], "until_id": 2},
    ]));
    let d = run.describe();
    let first = run.step(1);
    assert_eq!(first["ended"], true, "{d}");
    assert!(
        event_messages(first).iter().all(|m| m["id"] != 2),
        "no result on the first stream\n{d}"
    );
    assert!(
        first["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| !e["retry"].is_null()),
        "retry passed\n{d}"
    );
    let resumed = event_messages(run.step(2));
    let result = resumed
        .iter()
        .find(|m| m["id"] == 2)
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(result["result"]["content"][0]["text"], "later", "{d}");
    // The call's own record (its POST) is closed by the result that came on the GET stream,
    // not by the end of the first stream.
    let rec = rig.wait_record("the resumed result", |r| {
        r["event"] == "response" && r["tool"] == "resumable"
    });
    assert_eq!(rec["reason"], Value::Null, "{rec}");
    assert_eq!(rec["is_error"], false, "{rec}");
    assert_eq!(rec["http_method"], "POST", "{rec}");
}

/// A client that goes away before the result closes the call's record; so does a
/// `notifications/cancelled` (here on HTTP+SSE, where the call's POST is answered at once).
#[test]
fn disconnect_and_cancel_close_the_calls_record() {
    let opts = PeerOpts {
        slow_delay: std::time::Duration::from_millis(300),
        ..PeerOpts::default()
    };
    let rig = PeerRig::start("proto-close", 65, PEER_POLICY, opts);
    let url = rig.url("/mcp");
    let h = json!([SESS, version("2025-06-18")]);
    let post =
        |body: String| json!({"op": "request", "conn": "p", "url": "$endpoint:s", "body": body});
    let run = rig.script(json!([
        {"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-06-18"), "save_session": "m"},
        // Read one progress event, then drop the connection.
        {"op": "request", "url": url, "headers": h, "body": call(2, "slow_echo", json!({"text": "a"})), "max_events": 1},
        {"op": "sse_open", "stream": "s", "url": rig.url("/sse")},
        {"op": "sse_endpoint", "stream": "s"},
        post(call(3, "slow_echo", json!({"text": "b"}))),
        post(json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3, "reason": "user"}}).to_string()),
        {"op": "sse_wait", "stream": "s", "until_id": 3},
    ]));
    let d = run.describe();
    assert_eq!(run.step(5)["status"], 202, "{d}");
    let gone = rig.wait_record("call 2 closed by the disconnect", |r| {
        r["event"] == "response" && r["id"] == 2
    });
    assert_eq!(
        gone["reason"], "the client disconnected before the result",
        "{gone}"
    );
    let cancelled = rig.wait_record("call 3 closed by the cancellation", |r| {
        r["event"] == "response" && r["id"] == 3
    });
    assert_eq!(
        cancelled["reason"], "cancelled by the client (notifications/cancelled)",
        "{cancelled}"
    );
    // The late result of the cancelled call (the peer ignores cancellations) closes nothing
    // more: each record is closed once.
    assert!(
        event_messages(run.step(6)).iter().any(|m| m["id"] == 3),
        "{d}"
    );
    let closes = || {
        rig.agent
            .audit_lines()
            .into_iter()
            .filter(|r| r["event"] == "response" && (r["id"] == 2 || r["id"] == 3))
            .count()
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(closes(), 2, "{}", rig.agent.audit_text());
}

/// 2026-07-28 stateless: the filtered listing is private with a capped TTL; an
/// `input_required` result and the retried call are each decided and audited; refusals carry
/// `resultType`.
#[test]
fn stateless_2026_07_28_listing_private_and_input_required() {
    let rig = PeerRig::start("proto-2026", 66, PEER_POLICY, PeerOpts::default());
    let url = rig.url("/mcp26");
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28"});
    let hdr = |method: &str, name: Option<&str>| {
        let mut h = vec![
            json!(["mcp-protocol-version", "2026-07-28"]),
            json!(["mcp-method", method]),
        ];
        if let Some(n) = name {
            h.push(json!(["mcp-name", n]));
        }
        Value::Array(h)
    };
    let call26 = |id: u64, tool: &str, args: Value| {
        rpc(
            json!(id),
            "tools/call",
            json!({"name": tool, "arguments": args, "_meta": meta}),
        )
    };
    let retry = rpc(
        json!(4),
        "tools/call",
        json!({"name": "confirm_action", "arguments": {"action": "go"}, "_meta": meta,
               "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}},
               "requestState": "$var:rs"}),
    );
    let run = rig.script(json!([
        {"op": "request", "url": url, "headers": hdr("tools/list", None), "body": rpc(json!(1), "tools/list", json!({"_meta": meta}))},
        {"op": "request", "url": url, "headers": hdr("tools/call", Some("drop_cluster")), "body": call26(2, "drop_cluster", json!({"cluster": "p"}))},
        {"op": "request", "url": url, "headers": hdr("tools/call", Some("confirm_action")), "body": call26(3, "confirm_action", json!({"action": "go"})),
         "save": {"rs": "/json/result/requestState"}},
        {"op": "request", "url": url, "headers": hdr("tools/call", Some("confirm_action")), "body": retry},
    ]));
    let d = run.describe();
    let listing = &run.step(0)["json"]["result"];
    assert_eq!(tool_names(listing), VISIBLE, "{d}");
    assert_eq!(listing["cacheScope"], "private", "{d}");
    assert!(
        listing["ttlMs"].as_u64().is_some_and(|t| t <= 60_000),
        "{d}"
    );
    let denied = &run.step(1)["json"]["result"];
    assert_eq!(denied["isError"], true, "{d}");
    assert_eq!(denied["resultType"], "complete", "{d}");
    assert_eq!(
        run.step(2)["json"]["result"]["resultType"],
        "input_required",
        "{d}"
    );
    assert_eq!(
        run.step(3)["json"]["result"]["resultType"],
        "complete",
        "{d}"
    );
    rig.peer.assert_not_reached("drop_cluster");
    assert_eq!(rig.peer.calls("confirm_action"), 2);

    let decisions: Vec<Value> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "request" && r["tool"] == "confirm_action")
        .collect();
    assert_eq!(
        decisions.len(),
        2,
        "both rounds decided\n{}",
        rig.agent.audit_text()
    );
    assert!(decisions
        .iter()
        .all(|r| r["transport"] == "stateless_http" && r["revision"] == "2026-07-28"));
    let first = rig.wait_record("the input_required result", |r| {
        r["event"] == "response" && r["id"] == 3
    });
    assert_eq!(first["result_type"], "input_required", "{first}");
}

/// Real SDK peers: an unmodified rmcp client through the agent to an rmcp server that answers
/// with SSE streams (its default). The listing it gets is filtered; calls are decided as over
/// JSON.
#[test]
fn rmcp_client_and_sse_server_see_the_filtered_listing() {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    let cg = mcpwarden_tests::TestCgroup::new("proto-rmcp");
    let app = cg.child("app");
    let ip = mcpwarden_tests::test_ip(67);
    let server = mcpwarden_tests::TestServer::start_sse(SocketAddr::new(IpAddr::V4(ip), 0));
    let agent = mcpwarden_tests::Agent::start(
        common::AGENT_BIN,
        mcpwarden_tests::AgentOpts {
            name: "proto-rmcp".into(),
            endpoints: vec![(server.url(), common::POLICY.to_string())],
            listen: vec![
                mcpwarden_tests::free_addr(ip),
                mcpwarden_tests::free_addr(Ipv6Addr::LOCALHOST),
            ],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );
    let run = mcpwarden_tests::run_client(
        common::CLIENT_BIN,
        Some(&app),
        &[
            "call",
            &server.url(),
            "@list",
            "{}",
            "echo",
            r#"{"text":"over sse"}"#,
            "secret_dump",
            "{}",
        ],
        common::CLIENT_TIMEOUT,
    );
    run.assert_success();
    let lines = run.json_lines();
    let d = run.describe();
    assert_eq!(
        lines[0]["tools"],
        json!(["echo", "add", "start_security_scan", "drop_cluster"]),
        "secret_dump (unlisted, default deny) is not listed\n{d}"
    );
    assert_eq!(common::result_text(&lines[1]), "over sse", "{d}");
    assert_eq!(
        lines[2]["error"]["message"], "Unknown tool: secret_dump",
        "{d}"
    );
    assert_eq!(server.calls("secret_dump"), 0);
    let listing = agent
        .wait_audit(common::AUDIT_WAIT, |r| {
            r["event"] == "response" && r["method"] == "tools/list"
        })
        .unwrap_or_else(|| panic!("no listing record\n{}", agent.audit_text()));
    assert_eq!(listing["hidden_tools"], json!(["secret_dump"]), "{listing}");
}
