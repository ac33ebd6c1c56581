//! Checks of the harness itself, without the agent, so that a failure elsewhere can be blamed
//! on the agent and not on the test server, the client or the cgroup guard.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use mcpwarden_tests::cgroup::cgroup_of_pid;
use mcpwarden_tests::rawhttp::{self, RawOutcome};
use mcpwarden_tests::{
    bpf, require_root, run_client, test_ip, TcpEcho, TestCgroup, TestServer, UdpEcho,
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
