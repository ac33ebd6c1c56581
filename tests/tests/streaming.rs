//! Server-sent events flow through the interceptor as they happen, not when the stream ends.
//!
//! The server sends one event and then holds the stream open until the test has seen that event
//! arrive at the client; only then does it send the second and close. An interceptor that
//! buffered the stream would never deliver the first event, and the test would fail on its wait
//! (no timing is asserted: the wait is a deadlock guard).

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;

use common::*;
use mcpwarden_tests::held::HeldStream;
use mcpwarden_tests::{
    free_addr, spawn_in_cgroup, test_ip, Agent, AgentOpts, LineChild, TestCgroup,
};

#[test]
fn sse_events_are_delivered_while_the_stream_is_open() {
    mcpwarden_tests::require_root();
    let cg = TestCgroup::new("sse");
    let app = cg.child("app");
    let server = HeldStream::start(SocketAddr::new(IpAddr::V4(test_ip(24)), 0));
    let url = format!("http://{}/mcp", server.addr);
    let agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "sse".into(),
            endpoints: vec![(url.clone(), POLICY.into())],
            listen: vec![free_addr(test_ip(24)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );

    let mut cmd = Command::new(CLIENT_BIN);
    cmd.args(["sse-get", &url]);
    spawn_in_cgroup(&mut cmd, &app);
    let mut client = LineChild::spawn(cmd);
    if let Err(e) = server.delivered_live(&mut client) {
        panic!("{e}; audit:\n{}", agent.audit_text());
    }
    let (status, seen) = client.finish();
    assert!(status.success(), "{status}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("peer=") && l.ends_with(&server.addr.to_string())),
        "{seen:?}"
    );
    // It went through the agent: the GET is audited as non-MCP traffic of this server.
    let audited = agent
        .audit_lines()
        .into_iter()
        .any(|r| r["event"] == "non_mcp" && r["http_method"] == "GET");
    assert!(audited, "{}", agent.audit_text());
}
