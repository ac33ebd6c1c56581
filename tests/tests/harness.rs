//! Checks of the harness itself, without the agent, so that a failure elsewhere can be blamed
//! on the agent and not on the test server, the client or the cgroup guard.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use mcpwarden_tests::cgroup::cgroup_of_pid;
use mcpwarden_tests::peer::PEER_TOOLS;
use mcpwarden_tests::rawhttp::{self, RawOutcome};
use mcpwarden_tests::script::{run_script, ScriptRun};
use mcpwarden_tests::{
    bpf, require_root, run_client, test_ip, McpPeer, PeerOpts, TcpEcho, TestCgroup, TestServer,
    UdpEcho,
};
use serde_json::json;

/// The rmcp test server answers the real rmcp client and raw POSTs, counts calls, and the
/// client runs inside a cgroup that the guard then removes.
#[test]
fn server_client_and_cgroup_work_without_the_agent() {
    require_root();
    let cg = TestCgroup::new("harness");
    let dir = cg.child("app");
    let mapped_host = format!("[::ffff:{}]", test_ip(0));
    let server =
        TestServer::start_with_hosts(SocketAddr::new(IpAddr::V4(test_ip(0)), 0), &[&mapped_host]);
    let url = server.url();

    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &[
            "call",
            &url,
            "echo",
            r#"{"text":"x"}"#,
            "add",
            r#"{"a":1,"b":2}"#,
            "nope",
            "{}",
        ],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(result_text(&lines[0]), "x", "{}", run.describe());
    assert_eq!(result_text(&lines[1]), "3", "{}", run.describe());
    assert_eq!(lines[2]["error"]["code"], -32602, "{}", run.describe());
    assert_eq!(server.calls("echo"), 1);
    assert_eq!(server.calls("add"), 1);

    // raw POST without initialize (stateless server): same bytes from the client and from here.
    let body = call_body(5, "echo", json!({"text": "raw"}));
    let RawOutcome::Response(direct) =
        rawhttp::post(&url, body.as_bytes(), &[], Duration::from_secs(10))
    else {
        panic!("no response")
    };
    assert_eq!(direct.status, 200);
    assert_eq!(direct.json()["result"]["content"][0]["text"], "raw");
    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &["raw-post", &url, &body],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(run.body().unwrap(), direct.body);

    // An AF_INET6 socket dialling the IPv4-mapped address reaches the IPv4 server, whose
    // allowed-Host list accepts the mapped name.
    let mapped_url = format!("http://{mapped_host}:{}/mcp", server.addr().port());
    let RawOutcome::Response(r) =
        rawhttp::post(&mapped_url, body.as_bytes(), &[], Duration::from_secs(10))
    else {
        panic!("no response")
    };
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, direct.body);

    // Unknown path → 404, not MCP.
    let RawOutcome::Response(r) = rawhttp::post(
        &format!("http://{}/other", server.addr()),
        b"{}",
        &[],
        Duration::from_secs(10),
    ) else {
        panic!("no response")
    };
    assert_eq!(r.status, 404);

    // peer, without redirection, is the server itself.
    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &["peer", &server.addr().to_string()],
        CLIENT_TIMEOUT,
    );
    assert_eq!(run.field("peer"), Some(server.addr().to_string()));

    // peer with a request on the same connection.
    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &["peer", &server.addr().to_string(), "/mcp", &body],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(run.body().unwrap(), direct.body, "{}", run.describe());
    let local: SocketAddr = run.field("local").unwrap().parse().unwrap();
    assert!(server.peers().contains(&local));

    // TCP and UDP echo.
    let tcp = TcpEcho::start(SocketAddr::new(IpAddr::V4(test_ip(0)), 0));
    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &["tcp-echo", &tcp.addr().to_string(), "hello"],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    run.assert_field("echo", "hello");
    let udp = UdpEcho::start(server.addr());
    let run = run_client(
        CLIENT_BIN,
        Some(&dir),
        &["udp-echo", &server.addr().to_string(), "dgram"],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    run.assert_field("echo", "dgram");
    assert_eq!(
        run.field("from"),
        Some(server.addr().to_string()),
        "{}",
        run.describe()
    );
    assert_eq!(udp.sources().len(), 1);
    drop((tcp, udp));

    // The process really ran in the cgroup: a sleeping one is listed there, and the guard
    // kills it.
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    mcpwarden_tests::spawn_in_cgroup(&mut cmd, &dir);
    let mut child = cmd.spawn().unwrap();
    assert_eq!(cgroup_of_pid(child.id()), Some(cg.child_rel_path("app")));
    assert!(TestCgroup::procs_of(&dir).contains(&(child.id() as i32)));
    assert!(bpf::attached(&dir).is_empty());
    let path = cg.path().to_path_buf();
    drop(cg);
    assert!(!path.exists(), "cgroup dir not removed");
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep should have been killed");
}

/// The cgroup2 mount comes from /proc/mounts.
#[test]
fn cgroup2_mount_is_found() {
    let m = mcpwarden_tests::cgroup2_mount();
    assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    let _ = Ipv4Addr::LOCALHOST;
}

// ---------------------------------------------------------------------------------------------
// McpPeer and `mcp-client script`, directly (no agent): every MCP transport on the wire.

fn peer_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(test_ip(0)), 0)
}

/// Run `mcp-client script` with these steps (in the test's own cgroup).
fn script(steps: serde_json::Value) -> ScriptRun {
    run_script(CLIENT_BIN, None, &json!({ "steps": steps }), CLIENT_TIMEOUT)
}

fn rpc(id: serde_json::Value, method: &str, params: serde_json::Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

fn notification(method: &str) -> String {
    json!({"jsonrpc": "2.0", "method": method}).to_string()
}

fn init_body(id: u64, version: &str) -> String {
    rpc(
        json!(id),
        "initialize",
        json!({"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    )
}

/// The JSON-RPC messages carried by a step's SSE events (events without JSON data skipped).
fn event_messages(step: &serde_json::Value) -> Vec<serde_json::Value> {
    step["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {step}"))
        .iter()
        .filter(|e| !e["json"].is_null())
        .map(|e| e["json"].clone())
        .collect()
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 2024-11-05 HTTP+SSE: endpoint event, every POST answered 202, results on the GET stream.
#[test]
fn peer_legacy_sse_flow() {
    let peer = McpPeer::start(peer_addr());
    let call = call_body(3, "echo", json!({"text": "over sse"}));
    let r = script(json!([
        {"op": "sse_open", "stream": "s", "url": peer.url("/sse")},
        {"op": "sse_endpoint", "stream": "s"},
        {"op": "request", "conn": "p", "url": "$endpoint:s", "body": init_body(1, "2025-11-25")},
        {"op": "sse_wait", "stream": "s", "until_id": 1},
        {"op": "request", "conn": "p", "url": "$endpoint:s", "body": notification("notifications/initialized")},
        {"op": "request", "conn": "p", "url": "$endpoint:s", "body": rpc(json!(2), "tools/list", json!({}))},
        {"op": "sse_wait", "stream": "s", "until_id": 2},
        {"op": "request", "conn": "p", "url": "$endpoint:s", "body": call},
        {"op": "sse_wait", "stream": "s", "until_id": 3},
        {"op": "request", "url": peer.url("/messages/?session_id=00000000000000000000000000000000"), "body": call},
        {"op": "sse_open", "stream": "ts", "url": peer.url("/sse-ts")},
        {"op": "sse_endpoint", "stream": "ts"},
        {"op": "sse_open", "stream": "f", "url": peer.url("/sse-foreign")},
        {"op": "sse_endpoint", "stream": "f"},
        {"op": "sse_close", "stream": "s"},
    ]));
    let d = r.describe();
    assert_eq!(r.step(0)["status"], 200, "{d}");
    assert!(r.step(0)["headers"]["content-type"]
        .as_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r.step(1)["data"].as_str().unwrap();
    let id = data.strip_prefix("/messages/?session_id=").expect(&d);
    assert!(is_hex32(id), "{d}");
    assert_eq!(
        r.step(1)["endpoint"],
        format!("http://{}{data}", peer.addr()),
        "{d}"
    );
    for i in [2, 4, 5, 7] {
        assert_eq!(r.step(i)["status"], 202, "step {i}\n{d}");
        assert_eq!(r.step(i)["body"], "Accepted", "step {i}\n{d}");
    }
    // The first wait also returns the endpoint event.
    let evs = r.step(3)["events"].as_array().unwrap();
    assert_eq!(evs[0]["event"], "endpoint", "{d}");
    assert_eq!(evs.last().unwrap()["event"], "message", "{d}");
    let init = event_messages(r.step(3)).pop().unwrap();
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25", "{d}");
    let list = event_messages(r.step(6)).pop().unwrap();
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, PEER_TOOLS, "{d}");
    let result = event_messages(r.step(8)).pop().unwrap();
    assert_eq!(result["id"], 3, "{d}");
    assert_eq!(result["result"]["content"][0]["text"], "over sse", "{d}");
    assert_eq!(result["result"]["isError"], false, "{d}");
    assert_eq!(r.step(9)["status"], 404, "{d}");
    let ts = r.step(11)["data"].as_str().unwrap();
    assert!(is_hex32(ts.strip_prefix("/messages?sessionId=").expect(&d)));
    let foreign = r.step(13)["endpoint"].as_str().unwrap();
    assert!(is_hex32(
        foreign
            .strip_prefix("http://127.0.0.254:9/messages/?session_id=")
            .expect(&d)
    ));
    // One call executed; the POSTs reached the peer byte for byte on one connection.
    assert_eq!(peer.calls("echo"), 1, "{d}");
    assert_eq!(
        peer.tool_calls(),
        vec![("echo".to_string(), json!({"text": "over sse"}))]
    );
    let posts: Vec<_> = peer
        .requests()
        .into_iter()
        .filter(|q| q.method == "POST" && q.path == format!("/messages/?session_id={id}"))
        .collect();
    assert_eq!(posts.len(), 4, "{:#?}", peer.requests());
    assert_eq!(posts[3].body, call.as_bytes());
    assert!(posts.iter().all(|q| q.conn == posts[0].conn));
}

/// Streamable HTTP with SSE responses: session, progress + server request + result, 202s,
/// standalone GET stream, DELETE.
#[test]
fn peer_streamable_sse_slow_echo() {
    let peer = McpPeer::start(peer_addr());
    let url = peer.url("/mcp");
    let sess = json!(["mcp-session-id", "$session:m"]);
    let ver = json!(["mcp-protocol-version", "2025-06-18"]);
    let slow = rpc(
        json!(2),
        "tools/call",
        json!({"name": "slow_echo", "arguments": {"text": "slow"}, "_meta": {"progressToken": "tok"}}),
    );
    let r = script(json!([
        {"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-06-18"), "save_session": "m"},
        {"op": "request", "conn": "a", "url": url, "headers": [sess, ver], "body": notification("notifications/initialized")},
        {"op": "request", "conn": "a", "url": url, "headers": [sess, ver], "body": slow},
        {"op": "request", "conn": "a", "url": url, "headers": [sess, ver],
         "body": json!({"jsonrpc": "2.0", "id": "srv-1", "result": {}}).to_string()},
        {"op": "sse_open", "stream": "g", "url": url, "headers": [sess, ver]},
        {"op": "sleep", "ms": 100},
        {"op": "sse_wait", "stream": "g"},
        {"op": "request", "conn": "a", "url": url, "method": "DELETE", "headers": [sess, ver]},
        {"op": "request", "conn": "a", "url": url, "headers": [sess, ver], "body": call_body(3, "echo", json!({"text": "x"}))},
    ]));
    let d = r.describe();
    let init = r.step(0);
    assert_eq!(init["status"], 200, "{d}");
    assert_eq!(init["headers"]["content-type"], "text/event-stream", "{d}");
    let session = init["headers"]["mcp-session-id"].as_str().expect(&d);
    assert!(is_hex32(session), "{d}");
    assert_eq!(init["ended"], true, "{d}");
    let msgs = event_messages(init);
    assert_eq!(msgs[0]["result"]["protocolVersion"], "2025-06-18", "{d}");
    assert_eq!(r.step(1)["status"], 202, "{d}");
    assert_eq!(r.step(1)["body"], "", "{d}");

    let slow = r.step(2);
    assert_eq!(slow["status"], 200, "{d}");
    assert_eq!(slow["ended"], true, "{d}");
    let msgs = event_messages(slow);
    assert_eq!(msgs.len(), 5, "{d}");
    for (k, m) in msgs[..3].iter().enumerate() {
        assert_eq!(m["method"], "notifications/progress", "{d}");
        assert_eq!(m["params"]["progressToken"], "tok", "{d}");
        assert_eq!(m["params"]["progress"], k as u64 + 1, "{d}");
    }
    assert_eq!(
        msgs[3],
        json!({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"})
    );
    assert_eq!(msgs[4]["id"], 2, "{d}");
    assert_eq!(msgs[4]["result"]["content"][0]["text"], "slow", "{d}");
    assert!(slow["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["event"] == "message"));

    assert_eq!(r.step(3)["status"], 202, "{d}");
    assert_eq!(r.step(4)["status"], 200, "{d}");
    assert_eq!(r.step(4)["headers"]["content-type"], "text/event-stream");
    assert_eq!(r.step(6)["events"], json!([]), "{d}");
    assert_eq!(
        r.step(6)["ended"],
        false,
        "standalone stream stays open\n{d}"
    );
    assert_eq!(r.step(7)["status"], 200, "{d}");
    assert_eq!(r.step(8)["status"], 404, "deleted session\n{d}");
    assert_eq!(peer.calls("slow_echo"), 1);
    assert_eq!(peer.calls("echo"), 0);
    // All the POSTs and the DELETE went over the one keep-alive connection.
    let reqs = peer.requests();
    let on_a: Vec<_> = reqs.iter().filter(|q| q.method != "GET").collect();
    assert_eq!(on_a.len(), 6, "{reqs:#?}");
    assert!(on_a.iter().all(|q| q.conn == on_a[0].conn), "{reqs:#?}");
    assert_eq!(on_a[1].header("mcp-session-id"), Some(session));
}

/// JSON-RPC batches: an array of the responses in order on /mcp-json, one event each on /mcp,
/// 202 for a batch without requests; errors and unknown tools.
#[test]
fn peer_batches_and_errors() {
    let peer = McpPeer::start(peer_addr());
    let batch = format!(
        "[{},{},{}]",
        call_body(1, "echo", json!({"text": "first"})),
        notification("notifications/initialized"),
        call_body(2, "add", json!({"a": 1, "b": 2}))
    );
    let only_notes = format!(
        "[{},{}]",
        notification("notifications/initialized"),
        json!({"jsonrpc": "2.0", "id": "srv-9", "result": {}})
    );
    let r = script(json!([
        {"op": "request", "url": peer.url("/mcp-json"), "body": batch},
        {"op": "request", "url": peer.url("/mcp-json"), "body": only_notes},
        {"op": "request", "url": peer.url("/mcp"), "body": batch},
        {"op": "request", "url": peer.url("/mcp-json"), "body": call_body(3, "nope", json!({}))},
        {"op": "request", "url": peer.url("/mcp-json"), "body": call_body(4, "fail_rpc", json!({}))},
        {"op": "request", "url": peer.url("/mcp-json"), "body": rpc(json!(5), "no/such", json!({}))},
    ]));
    let d = r.describe();
    let s = r.step(0);
    assert_eq!(s["status"], 200, "{d}");
    assert_eq!(s["headers"]["content-type"], "application/json", "{d}");
    let arr = s["json"].as_array().expect(&d);
    assert_eq!(arr.len(), 2, "{d}");
    assert_eq!(arr[0]["id"], 1);
    assert_eq!(arr[0]["result"]["content"][0]["text"], "first");
    assert_eq!(arr[1]["id"], 2);
    assert_eq!(arr[1]["result"]["content"][0]["text"], "3");
    assert_eq!(r.step(1)["status"], 202, "{d}");
    assert_eq!(r.step(1)["body"], "", "{d}");
    let msgs = event_messages(r.step(2));
    assert_eq!(msgs.len(), 2, "{d}");
    assert_eq!(
        (msgs[0]["id"].clone(), msgs[1]["id"].clone()),
        (json!(1), json!(2))
    );
    let nope = &r.step(3)["json"];
    assert_eq!(nope["result"]["isError"], true, "{d}");
    assert_eq!(nope["result"]["content"][0]["text"], "Unknown tool: nope");
    assert_eq!(
        r.step(4)["json"]["error"],
        json!({"code": -32001, "message": "boom"})
    );
    assert_eq!(r.step(5)["json"]["error"]["code"], -32601, "{d}");
    // Batch elements count as calls.
    assert_eq!(peer.calls("echo"), 2);
    assert_eq!(peer.calls("add"), 2);
    assert_eq!(peer.calls("nope"), 1);
    assert_eq!(peer.calls("fail_rpc"), 1);
}

/// 2025-11-25 resumption: priming event and retry, the stream closes without the result,
/// which a GET with Last-Event-ID gets (event ids continue).
#[test]
fn peer_resumable_stream() {
    let peer = McpPeer::start(peer_addr());
    let url = peer.url("/mcp");
    let sess = json!(["mcp-session-id", "$session:m"]);
    let r = script(json!([
        {"op": "request", "conn": "a", "url": url, "body": init_body(1, "2025-11-25"), "save_session": "m"},
        {"op": "request", "conn": "a", "url": url, "headers": [sess],
         "body": call_body(7, "resumable", json!({"text": "later"})), "save_event_id": "r"},
        {"op": "request", "conn": "a", "url": url, "method": "GET", "until_id": 7,
         "headers": [sess, ["last-event-id", "$event_id:r"]]},
    ]));
    let d = r.describe();
    let first = r.step(1);
    assert_eq!(first["status"], 200, "{d}");
    assert_eq!(first["ended"], true, "{d}");
    let evs = first["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2, "{d}");
    assert_eq!(evs[0]["data"], "", "priming event\n{d}");
    let n: u64 = evs[0]["id"].as_str().unwrap().parse().expect(&d);
    assert_eq!(evs[1]["retry"], 100, "{d}");
    assert!(event_messages(first).is_empty(), "{d}");
    let resumed = r.step(2);
    assert_eq!(resumed["status"], 200, "{d}");
    let evs = resumed["events"].as_array().unwrap();
    assert_eq!(evs.len(), 1, "{d}");
    assert_eq!(evs[0]["id"], (n + 1).to_string(), "{d}");
    assert_eq!(evs[0]["json"]["id"], 7, "{d}");
    assert_eq!(evs[0]["json"]["result"]["content"][0]["text"], "later");
    assert_eq!(peer.calls("resumable"), 1);
    let get = peer
        .requests()
        .into_iter()
        .find(|q| q.method == "GET")
        .unwrap();
    assert_eq!(get.header("last-event-id"), Some(n.to_string().as_str()));
}

/// Split mode: events spanning many tiny frames, a comment line, a bare `data:` event,
/// multi-line data; requests written in pieces; raw pipelined requests.
#[test]
fn peer_split_sse_and_pieces() {
    let peer = McpPeer::start(peer_addr());
    let split = call_body(4, "split_echo", json!({"text": "tiny pieces"}));
    let echo = call_body(5, "echo", json!({"text": "in pieces"}));
    let host = peer.addr().to_string();
    let one = call_body(6, "echo", json!({"text": "p1"}));
    let two = call_body(7, "add", json!({"a": 2, "b": 3}));
    let pipelined = format!(
        "POST /mcp-json HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\n\r\n{one}\
         POST /mcp-json HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\n\r\n{two}",
        one.len(),
        two.len()
    );
    let r = script(json!([
        {"op": "request", "url": peer.url("/mcp"), "body": split},
        {"op": "request", "url": peer.url("/mcp-json"), "body": echo, "chunks": [7, 30, 1, 1, 60], "delay_ms": 5},
        {"op": "raw", "addr": host, "bytes": pipelined, "responses": 2},
    ]));
    let d = r.describe();
    let s = r.step(0);
    assert_eq!(s["status"], 200, "{d}");
    assert_eq!(s["ended"], true, "{d}");
    let evs = s["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2, "{d}");
    assert_eq!(evs[0]["event"], json!(null), "bare data: event\n{d}");
    assert!(!evs[0]["comments"].as_array().expect(&d).is_empty());
    assert_eq!(evs[0]["json"]["method"], "notifications/progress", "{d}");
    assert_eq!(evs[1]["event"], "message", "{d}");
    assert!(
        evs[1]["data"].as_str().unwrap().contains('\n'),
        "multi-line data\n{d}"
    );
    assert_eq!(evs[1]["json"]["id"], 4, "{d}");
    assert_eq!(
        evs[1]["json"]["result"]["content"][0]["text"],
        "tiny pieces"
    );

    assert_eq!(
        r.step(1)["json"]["result"]["content"][0]["text"],
        "in pieces",
        "{d}"
    );
    let got = peer
        .requests()
        .into_iter()
        .find(|q| q.body == echo.as_bytes());
    assert!(got.is_some(), "body written in pieces arrived whole");

    let resp = r.step(2)["responses"].as_array().expect(&d);
    assert_eq!(resp.len(), 2, "{d}");
    assert_eq!(resp[0]["json"]["result"]["content"][0]["text"], "p1", "{d}");
    assert_eq!(resp[1]["json"]["result"]["content"][0]["text"], "5", "{d}");

    // A peer in split mode writes every SSE stream so, the legacy one too.
    let peer = McpPeer::start_with(
        peer_addr(),
        PeerOpts {
            split_sse: true,
            ..PeerOpts::default()
        },
    );
    let r = script(json!([
        {"op": "sse_open", "stream": "s", "url": peer.url("/sse")},
        {"op": "sse_endpoint", "stream": "s"},
        {"op": "request", "url": "$endpoint:s", "body": call_body(1, "echo", json!({"text": "legacy split"}))},
        {"op": "sse_wait", "stream": "s", "until_id": 1},
        {"op": "request", "url": peer.url("/mcp"), "body": call_body(2, "echo", json!({"text": "mcp split"}))},
    ]));
    let d = r.describe();
    let m = event_messages(r.step(3)).pop().expect(&d);
    assert_eq!(m["result"]["content"][0]["text"], "legacy split", "{d}");
    let m = event_messages(r.step(4)).pop().expect(&d);
    assert_eq!(m["result"]["content"][0]["text"], "mcp split", "{d}");
}

/// 2026-07-28 stateless: header checks, resultType, caching fields, multi-round-trip
/// confirm_action, server/discover, unknown method, POST only.
#[test]
fn peer_2026_stateless() {
    let peer = McpPeer::start(peer_addr());
    let url = peer.url("/mcp26");
    let h = |method: &str, name: Option<&str>| {
        let mut v = vec![
            json!(["mcp-protocol-version", "2026-07-28"]),
            json!(["mcp-method", method]),
        ];
        if let Some(n) = name {
            v.push(json!(["mcp-name", n]));
        }
        json!(v)
    };
    let confirm = |id: u64, extra: serde_json::Value| {
        let mut params = json!({"name": "confirm_action", "arguments": {"action": "deploy"}});
        for (k, v) in extra.as_object().unwrap() {
            params[k] = v.clone();
        }
        rpc(json!(id), "tools/call", params)
    };
    let retry = confirm(
        2,
        json!({"inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}}, "requestState": "RS"}),
    )
    .replace("\"RS\"", "\"$var:rs\"");
    let r = script(json!([
        {"op": "request", "url": url, "headers": h("tools/call", Some("confirm_action")), "body": confirm(1, json!({})),
         "save": {"rs": "/json/result/requestState"}},
        {"op": "request", "url": url, "headers": h("tools/call", Some("confirm_action")), "body": retry},
        {"op": "request", "url": url, "headers": h("tools/list", None), "body": rpc(json!(3), "tools/list", json!({}))},
        {"op": "request", "url": url, "headers": h("server/discover", None), "body": rpc(json!(4), "server/discover", json!({}))},
        {"op": "request", "url": url, "headers": h("no/such", None), "body": rpc(json!(5), "no/such", json!({}))},
        {"op": "request", "url": url, "method": "GET"},
        {"op": "request", "url": url, "method": "DELETE"},
        {"op": "request", "url": url, "headers": h("tools/call", Some("=?base64?ZWNobw==?=")),
         "body": call_body(6, "echo", json!({"text": "b64"}))},
        // Header/body mismatches: 400 and -32020, nothing executed.
        {"op": "request", "url": url, "headers": h("tools/call", Some("echo")),
         "body": call_body(7, "drop_cluster", json!({"cluster": "prod"}))},
        {"op": "request", "url": url, "headers": h("tools/list", Some("drop_cluster")),
         "body": call_body(8, "drop_cluster", json!({"cluster": "prod"}))},
        {"op": "request", "url": url, "body": call_body(9, "drop_cluster", json!({"cluster": "prod"}))},
    ]));
    let d = r.describe();
    let ask = &r.step(0)["json"]["result"];
    assert_eq!(ask["resultType"], "input_required", "{d}");
    assert_eq!(
        ask["inputRequests"]["confirm"]["method"],
        "elicitation/create"
    );
    assert_eq!(
        ask["inputRequests"]["confirm"]["params"]["message"],
        "Really?"
    );
    assert!(ask["requestState"].is_string(), "{d}");
    let done = &r.step(1)["json"];
    assert_eq!(done["id"], 2, "{d}");
    assert_eq!(done["result"]["resultType"], "complete", "{d}");
    assert_eq!(
        done["result"]["content"][0]["text"], "confirmed deploy",
        "{d}"
    );
    assert_eq!(peer.calls("confirm_action"), 2);
    let list = &r.step(2)["json"]["result"];
    assert_eq!(list["resultType"], "complete", "{d}");
    assert_eq!(list["ttlMs"], 300000, "{d}");
    assert_eq!(list["cacheScope"], "public", "{d}");
    assert_eq!(list["tools"].as_array().unwrap().len(), PEER_TOOLS.len());
    assert_eq!(r.step(3)["status"], 200, "{d}");
    assert_eq!(r.step(3)["json"]["result"]["resultType"], "complete", "{d}");
    assert_eq!(r.step(4)["status"], 404, "{d}");
    assert_eq!(r.step(4)["json"]["error"]["code"], -32601, "{d}");
    assert_eq!(r.step(5)["status"], 405, "{d}");
    assert_eq!(r.step(6)["status"], 405, "{d}");
    assert_eq!(
        r.step(7)["json"]["result"]["content"][0]["text"],
        "b64",
        "{d}"
    );
    for i in [8, 9, 10] {
        assert_eq!(r.step(i)["status"], 400, "step {i}\n{d}");
        assert_eq!(r.step(i)["json"]["error"]["code"], -32020, "step {i}\n{d}");
    }
    peer.assert_not_reached("drop_cluster");
}

/// tools/list pages of `page_size` with an opaque nextCursor, and a bad cursor refused.
#[test]
fn peer_tools_list_pagination() {
    let peer = McpPeer::start_with(
        peer_addr(),
        PeerOpts {
            page_size: Some(2),
            ..PeerOpts::default()
        },
    );
    let url = peer.url("/mcp-json");
    let mut steps = vec![json!({"op": "request", "conn": "a", "url": url,
        "body": rpc(json!(0), "tools/list", json!({})), "save": {"c0": "/json/result/nextCursor"}})];
    for i in 1..5 {
        steps.push(json!({"op": "request", "conn": "a", "url": url,
            "body": rpc(json!(i), "tools/list", json!({"cursor": format!("$var:c{}", i - 1)})),
            "save": {format!("c{i}"): "/json/result/nextCursor"}}));
    }
    steps.push(json!({"op": "request", "conn": "a", "url": url,
        "body": rpc(json!(9), "tools/list", json!({"cursor": "not-a-cursor"}))}));
    let r = script(json!(steps));
    let d = r.describe();
    let mut names = Vec::new();
    for i in 0..5 {
        let result = &r.step(i)["json"]["result"];
        let page = result["tools"].as_array().expect(&d);
        assert!(page.len() <= 2, "{d}");
        names.extend(page.iter().map(|t| t["name"].as_str().unwrap().to_string()));
        assert_eq!(result["nextCursor"].is_string(), i < 4, "page {i}\n{d}");
    }
    assert_eq!(names, PEER_TOOLS, "{d}");
    assert_eq!(r.step(5)["json"]["error"]["code"], -32602, "{d}");
}
