//! Living with others: a second agent's programs on the same cgroup (cgroup links are
//! multi-attach), and endpoints configured by name rather than by address.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::*;
use mcpwarden_tests::{free_addr, test_ip, Agent, AgentOpts, TestServer};
use serde_json::json;

/// A second agent attached to the same cgroup, protecting a different server with its own policy:
/// each agent enforces its own policy on its own server, and neither disturbs the other.
#[test]
fn two_agents_on_one_cgroup_each_enforce_their_own_policy() {
    let rig = Rig::start("coexist", 20, POLICY);
    let other_server = TestServer::start(SocketAddr::new(IpAddr::V4(test_ip(21)), 0));
    let other_policy = r#"{"version": "1", "default": "deny", "tools": {"add": {}}}"#;
    let other = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "coexist-2".into(),
            endpoints: vec![(other_server.url(), other_policy.into())],
            listen: vec![free_addr(test_ip(21)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: rig.app.clone(),
            agent_cgroup: rig.cg.path().join("agent2"),
        },
    );

    // The first agent's server: its policy allows echo.
    let run = rig.client(&[
        "raw-post",
        &rig.server.url(),
        &call_body(1, "echo", json!({"text": "one"})),
    ]);
    run.assert_success();
    assert_eq!(
        result_text(&run.body_json()["result"]),
        "one",
        "{}",
        run.describe()
    );

    // The second agent's server: echo is unlisted there, add is allowed.
    let url = other_server.url();
    let run = rig.client(&[
        "raw-post",
        &url,
        &call_body(2, "echo", json!({"text": "two"})),
    ]);
    run.assert_success();
    assert_eq!(
        run.body_json()["error"]["code"],
        -32602,
        "{}",
        run.describe()
    );
    other_server.assert_not_reached("echo");
    let run = rig.client(&[
        "raw-post",
        &url,
        &call_body(3, "add", json!({"a": 2, "b": 3})),
    ]);
    run.assert_success();
    assert_eq!(
        result_text(&run.body_json()["result"]),
        "5",
        "{}",
        run.describe()
    );
    assert_eq!(other_server.calls("add"), 1);
    assert_eq!(rig.server.calls("echo"), 1);

    // Each call was decided by the agent of its server, and only by it.
    let first: Vec<_> = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| !r["decision"].is_null())
        .collect();
    let second: Vec<_> = other
        .audit_lines()
        .into_iter()
        .filter(|r| !r["decision"].is_null())
        .collect();
    assert_eq!(first.len(), 1, "first agent's decisions: {first:?}");
    assert_eq!(first[0]["id"], 1);
    assert_eq!(second.len(), 2, "second agent's decisions: {second:?}");
    assert_eq!(
        (second[0]["id"].clone(), second[0]["decision"].clone()),
        (json!(2), json!("deny"))
    );
    assert_eq!(
        (second[1]["id"].clone(), second[1]["decision"].clone()),
        (json!(3), json!("allow"))
    );
}

/// An endpoint given by name is resolved (here through /etc/hosts, where every Linux host maps
/// `localhost` to 127.0.0.1) and its addresses are redirected.
#[test]
fn endpoint_names_are_resolved_and_redirected() {
    mcpwarden_tests::require_root();
    let cg = mcpwarden_tests::TestCgroup::new("byname");
    let app = cg.child("app");
    let server = TestServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    let url = format!("http://localhost:{}/mcp", server.addr().port());
    let agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "byname".into(),
            endpoints: vec![(url, POLICY.into())],
            listen: vec![free_addr(test_ip(22)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );

    let direct = server.url();
    let run = mcpwarden_tests::run_client(
        CLIENT_BIN,
        Some(&app),
        &[
            "raw-post",
            &direct,
            &call_body(9, "drop_cluster", json!({"cluster": "prod"})),
        ],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(
        result_text(&run.body_json()["result"]),
        DENY_TEXT_DESTRUCTIVE,
        "{}",
        run.describe()
    );
    server.assert_not_reached("drop_cluster");
    let decisions: Vec<_> = agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["tool"] == "drop_cluster")
        .collect();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0]["dst"], server.addr().to_string());
    assert_eq!(
        decisions[0]["server"],
        format!("localhost:{}", server.addr().port())
    );
}

/// Two servers configured on one address (different paths, different policies): each request is
/// decided by the policy of the endpoint its path names, and a JSON-RPC request to a path that
/// names neither is refused rather than given either policy.
#[test]
fn servers_sharing_an_address_are_told_apart_by_path() {
    mcpwarden_tests::require_root();
    let cg = mcpwarden_tests::TestCgroup::new("shared");
    let app = cg.child("app");
    let server = TestServer::start(SocketAddr::new(IpAddr::V4(test_ip(23)), 0));
    let strict = r#"{"version": "1", "default": "deny", "tools": {"add": {}}}"#;
    let other_url = format!("http://{}/other", server.addr());
    let agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "shared".into(),
            endpoints: vec![(server.url(), POLICY.into()), (other_url, strict.into())],
            listen: vec![free_addr(test_ip(23)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );
    let client = |url: &str, body: &str| {
        let run = mcpwarden_tests::run_client(
            CLIENT_BIN,
            Some(&app),
            &["raw-post", url, body],
            CLIENT_TIMEOUT,
        );
        run.assert_success();
        run
    };

    // /mcp is the first server's: its policy allows echo.
    let run = client(&server.url(), &call_body(1, "echo", json!({"text": "hi"})));
    assert_eq!(
        result_text(&run.body_json()["result"]),
        "hi",
        "{}",
        run.describe()
    );
    // /other is the second server's: echo is unlisted there (the test server answers 404 on that
    // path, but the call never gets that far).
    let run = client(
        &format!("http://{}/other", server.addr()),
        &call_body(2, "echo", json!({"text": "hi"})),
    );
    assert_eq!(
        run.body_json()["error"]["code"],
        -32602,
        "{}",
        run.describe()
    );
    // Neither path: refused, not guessed.
    let run = client(
        &format!("http://{}/elsewhere", server.addr()),
        &call_body(3, "echo", json!({"text": "hi"})),
    );
    assert!(
        run.field("status").unwrap_or_default().contains(" 400"),
        "{}",
        run.describe()
    );
    assert_eq!(server.calls("echo"), 1);
    let refused: Vec<_> = agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[1]["server"].is_null(), "{refused:?}");
}
