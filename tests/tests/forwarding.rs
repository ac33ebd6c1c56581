//! Allowed calls pass through the agent unchanged; the client cannot tell it was redirected;
//! the agent's own upstream connections are not redirected to itself.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;
use mcpwarden_tests::cgroup::cgroup_of_pid;
use mcpwarden_tests::rawhttp::{self, RawOutcome};
use mcpwarden_tests::{
    free_addr, require_root, run_client, test_ip, Agent, AgentOpts, TestCgroup, TestServer,
};
use serde_json::json;

/// (1) An allowed call through the agent succeeds, and the HTTP response body is byte-identical
/// to the one the same raw POST gets when made directly (from the test process, which is in
/// no attached cgroup).
#[test]
fn allowed_call_is_forwarded_byte_identical() {
    let rig = Rig::start("allowed", 1, POLICY);
    let url = rig.server.url();
    let body = call_body(41, "echo", json!({"text": "hello through mcpwarden"}));

    // Direct, not redirected.
    let direct = match rawhttp::post(&url, body.as_bytes(), &[], Duration::from_secs(30)) {
        RawOutcome::Response(r) => r,
        RawOutcome::NoResponse { reason, .. } => {
            panic!("direct POST to {url} got no response: {reason}")
        }
    };
    assert_eq!(direct.status, 200, "direct POST: {direct:?}");
    assert_eq!(
        rig.server.calls("echo"),
        1,
        "the direct POST must reach the server"
    );
    let direct_json = direct.json();
    assert_eq!(
        direct_json["result"]["content"][0]["text"], "hello through mcpwarden",
        "{direct_json}"
    );

    // The same bytes from a process in the attached cgroup.
    let via = rig.client(&["raw-post", &url, &body]);
    via.assert_success();
    via.assert_field("status", direct.status_line.as_str());
    let via_body = via.body().expect("body");
    assert_eq!(
        String::from_utf8_lossy(&via_body),
        String::from_utf8_lossy(&direct.body),
        "the body through the agent differs from the direct one\n{}",
        via.describe()
    );
    assert_eq!(via_body, direct.body, "bodies differ in bytes");
    assert_eq!(
        rig.server.calls("echo"),
        2,
        "the call through the agent must reach the server exactly once"
    );

    // It really went through the agent: the agent audited that client's call.
    let recs = rig.wait_decisions("echo", via.pid, 1);
    assert_eq!(recs[0]["decision"], "allow", "{}", recs[0]);
    assert_eq!(recs[0]["id"], 41, "{}", recs[0]);

    // A real MCP client (initialize, then calls) works through the agent too.
    let run = rig.client(&[
        "call",
        &url,
        "echo",
        r#"{"text":"hi"}"#,
        "add",
        r#"{"a":2,"b":3}"#,
    ]);
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2, "{}", run.describe());
    assert!(!is_error_result(&lines[0]), "{}", run.describe());
    assert_eq!(result_text(&lines[0]), "hi", "{}", run.describe());
    assert_eq!(result_text(&lines[1]), "5", "{}", run.describe());
    assert_eq!(rig.server.calls("echo"), 3);
    assert_eq!(rig.server.calls("add"), 1);
    rig.wait_decisions("add", run.pid, 1);
}

/// (5) getpeername() in the client shows the original server, not the interceptor: IPv4,
/// IPv6 ([::1]) and IPv4-mapped IPv6 ([::ffff:127.0.0.X] from an AF_INET6 socket). Each
/// connection also carries a request, and the audit proves it went through the agent.
#[test]
fn getpeername_shows_the_original_server() {
    require_root();
    let cg = TestCgroup::new("peer");
    let app = cg.child("app");
    let ip = test_ip(5);
    let mapped_host = format!("[::ffff:{ip}]");
    let server4 = TestServer::start_with_hosts(SocketAddr::new(IpAddr::V4(ip), 0), &[&mapped_host]);
    let server6 = TestServer::start(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0));
    let listen_v4 = free_addr(ip);
    let listen_v6 = free_addr(Ipv6Addr::LOCALHOST);
    let agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "peer".into(),
            endpoints: vec![
                (server4.url(), POLICY.to_string()),
                (server6.url(), POLICY.to_string()),
            ],
            listen: vec![listen_v4, listen_v6],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );
    let client = |args: &[&str]| run_client(CLIENT_BIN, Some(&app), args, CLIENT_TIMEOUT);
    let audited = |pid: u32, id: u64| {
        agent
            .wait_audit(AUDIT_WAIT, |r| {
                r["pid"] == pid && r["id"] == id && r["tool"] == "echo" && r["decision"] == "allow"
            })
            .unwrap_or_else(|| {
                panic!(
                    "no audit decision for pid {pid} id {id}; audit:\n{}",
                    agent.audit_text()
                )
            })
    };

    // IPv4.
    let a4 = server4.addr().to_string();
    let run = client(&[
        "peer",
        &a4,
        "/mcp",
        &call_body(501, "echo", json!({"text": "v4"})),
    ]);
    run.assert_success();
    assert_eq!(
        run.field("peer").as_deref(),
        Some(a4.as_str()),
        "getpeername must show the server\n{}",
        run.describe()
    );
    assert_ne!(run.field("peer"), Some(listen_v4.to_string()));
    assert_eq!(
        run.body_json()["result"]["content"][0]["text"],
        "v4",
        "{}",
        run.describe()
    );
    let rec = audited(run.pid, 501);
    assert_eq!(
        rec["dst"], a4,
        "audit dst must be the original destination: {rec}"
    );
    assert_eq!(server4.calls("echo"), 1);

    // IPv6.
    let a6 = server6.addr().to_string();
    let run = client(&[
        "peer",
        &a6,
        "/mcp",
        &call_body(502, "echo", json!({"text": "v6"})),
    ]);
    run.assert_success();
    assert_eq!(
        run.field("peer").as_deref(),
        Some(a6.as_str()),
        "getpeername must show the server\n{}",
        run.describe()
    );
    assert_ne!(run.field("peer"), Some(listen_v6.to_string()));
    assert_eq!(
        run.body_json()["result"]["content"][0]["text"],
        "v6",
        "{}",
        run.describe()
    );
    let rec = audited(run.pid, 502);
    assert_eq!(
        rec["dst"], a6,
        "audit dst must be the original destination: {rec}"
    );
    assert_eq!(server6.calls("echo"), 1);

    // A real MCP client over the IPv6 endpoint.
    let run = client(&["call", &server6.url(), "echo", r#"{"text":"six"}"#]);
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "six",
        "{}",
        run.describe()
    );
    assert_eq!(server6.calls("echo"), 2);

    // IPv4-mapped IPv6 from an AF_INET6 socket: connect6 must match the embedded v4 endpoint
    // and getpeername6 must give back the mapped address the application dialled.
    let mapped = format!("[::ffff:{ip}]:{}", server4.addr().port());
    let run = client(&[
        "peer",
        &mapped,
        "/mcp",
        &call_body(503, "echo", json!({"text": "mapped"})),
    ]);
    run.assert_success();
    assert_eq!(
        run.field("peer").as_deref(),
        Some(mapped.as_str()),
        "getpeername must show the dialled address\n{}",
        run.describe()
    );
    assert_eq!(
        run.body_json()["result"]["content"][0]["text"],
        "mapped",
        "{}",
        run.describe()
    );
    audited(run.pid, 503);
    assert_eq!(server4.calls("echo"), 2);
    drop(agent);
}

/// (7) Loop avoidance: the agent is attached at a parent P and lives in P/agent; a client in
/// P/client still gets its call through (the agent's upstream connect is not redirected back
/// into itself), and the server counts it once.
#[test]
fn agent_below_the_attach_point_does_not_loop() {
    require_root();
    let p = TestCgroup::new("loop");
    let client_cg = p.child("client");
    let agent_cg = p.path().join("agent");
    let ip = test_ip(7);
    let server = TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
    let mut agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "loop".into(),
            endpoints: vec![(server.url(), POLICY.to_string())],
            listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: p.path().to_path_buf(),
            agent_cgroup: agent_cg.clone(),
        },
    );
    let agent_pid = agent.pid().expect("agent pid");
    assert_eq!(
        cgroup_of_pid(agent_pid).as_deref(),
        Some(p.child_rel_path("agent").as_str()),
        "the agent must have moved itself into --agent-cgroup"
    );

    let run = run_client(
        CLIENT_BIN,
        Some(&client_cg),
        &["call", &server.url(), "echo", r#"{"text":"no loop"}"#],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(result_text(&lines[0]), "no loop", "{}", run.describe());
    assert_eq!(
        server.calls("echo"),
        1,
        "the server must see the call exactly once"
    );
    agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["pid"] == run.pid && r["tool"] == "echo" && r["decision"] == "allow"
        })
        .unwrap_or_else(|| {
            panic!(
                "the call did not go through the agent; audit:\n{}",
                agent.audit_text()
            )
        });
    // The agent's upstream connections came from the agent, not redirected to itself: none of
    // them is audited as coming from the agent's own pid.
    assert!(
        agent.audit_lines().iter().all(|r| r["pid"] != agent_pid),
        "the agent intercepted its own connection:\n{}",
        agent.audit_text()
    );
    agent.assert_running();
}
