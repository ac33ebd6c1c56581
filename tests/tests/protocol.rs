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
