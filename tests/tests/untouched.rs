//! Traffic the agent must not touch, and connections it must not serve.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use mcpwarden_tests::rawhttp::post_request_bytes;
use mcpwarden_tests::{test_ip, wait_for, TcpEcho, UdpEcho};
use serde_json::json;

/// (4) From the attached cgroup, TCP to an address that is not an endpoint (another port on
/// the endpoint's IP, and another IP) and UDP to another port reach them untouched. UDP to the
/// endpoint's own ip:port (QUIC, HTTP/3) is refused — connect() and sendto() fail, a UDP socket
/// bound there receives nothing — and audited once for the caller, so clients fall back to TCP.
#[test]
fn non_endpoint_tcp_and_udp_are_untouched() {
    let rig = Rig::start("untouched", 4, POLICY);
    let other_port = TcpEcho::start(SocketAddr::new(IpAddr::V4(rig.ip), 0));
    let other_ip = TcpEcho::start(SocketAddr::new(IpAddr::V4(test_ip(104)), 0));
    let udp = UdpEcho::start(rig.server.addr());
    let udp_other = UdpEcho::start(SocketAddr::new(IpAddr::V4(rig.ip), 0));

    let mut pids = Vec::new();
    for echo in [&other_port, &other_ip] {
        let addr = echo.addr().to_string();
        let run = rig.client(&["tcp-echo", &addr, "plain tcp, not mcp"]);
        run.assert_success();
        pids.push(run.pid);
        run.assert_field("echo", "plain tcp, not mcp");
        run.assert_field("peer", addr.as_str());
        let local: SocketAddr = run
            .field("local")
            .expect("local=")
            .parse()
            .expect("local address");
        assert!(
            echo.peers().contains(&local),
            "the listener did not see the client's own socket {local} (peers {:?}): the connection was not direct",
            echo.peers()
        );
    }

    let other = udp_other.addr().to_string();
    let run = rig.client(&["udp-echo", &other, "udp datagram"]);
    run.assert_success();
    pids.push(run.pid);
    run.assert_field("echo", "udp datagram");
    run.assert_field("from", other.as_str());
    assert_eq!(
        udp_other.sources().len(),
        1,
        "UDP to another port is untouched"
    );

    let addr = rig.server.addr().to_string();
    let connected = rig.client(&["udp-echo", &addr, "quic initial"]);
    let error = connected.field("connect-error").unwrap_or_default();
    assert!(
        error.contains("Operation not permitted"),
        "a UDP connect to the endpoint must fail (EPERM)\n{}",
        connected.describe()
    );
    let sent = rig.client(&["udp-sendto", &addr, "quic initial"]);
    let error = sent.field("send-error").unwrap_or_default();
    assert!(
        error.contains("Operation not permitted"),
        "a UDP datagram to the endpoint must be refused (EPERM)\n{}",
        sent.describe()
    );
    assert!(
        udp.sources().is_empty(),
        "a datagram reached the endpoint's port"
    );
    let refused = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "refused"
                && r["pid"] == connected.pid
                && r["reason"].as_str().is_some_and(|t| t.starts_with("UDP"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no audit record of the refused UDP connect:\n{}",
                rig.agent.audit_text()
            )
        });
    assert_eq!(refused["dst"], addr.as_str());
    assert_eq!(refused["cgroup"], rig.app_rel());
    // Once per caller per minute: the sendto from the same cgroup a moment later is counted,
    // not written.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !rig.agent
            .audit_lines()
            .iter()
            .any(|r| r["pid"] == sent.pid && r["event"] == "refused"),
        "a second UDP refusal by the same caller within the minute was written:\n{}",
        rig.agent.audit_text()
    );

    assert_eq!(
        rig.server.http_requests(),
        0,
        "nothing was MCP, nothing should reach the MCP server"
    );
    let audit = rig.agent.audit_lines();
    assert!(
        !audit.iter().any(|r| pids.iter().any(|p| r["pid"] == *p)),
        "traffic that was not redirected must not be seen by the agent: {audit:#?}"
    );
}

/// Connect straight to `addr` and send a valid MCP call; return what came back and how the
/// connection ended.
fn dial_directly(addr: SocketAddr, server_url: &str) -> (Vec<u8>, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the interceptor {addr}: {e}"));
    let (_, host, path) = mcpwarden_tests::rawhttp::parse_url(server_url);
    let body = call_body(61, "echo", json!({"text": "direct"}));
    // The agent may close before reading everything: a write error is fine.
    let _ = s.write_all(&post_request_bytes(&host, &path, body.as_bytes(), &[]));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".to_string(),
            Err(e) => break format!("not closed after {:?}: {e}", start.elapsed()),
        }
    };
    (got, end)
}

/// (6) A connection dialled straight to the interceptor port (from the test process, outside
/// the attached cgroup, so with no redirect record) is closed without any response, nothing is
/// forwarded, and the agent says why.
#[test]
fn direct_dial_of_the_interceptor_is_refused() {
    let mut rig = Rig::start("directdial", 6, POLICY);
    let url = rig.server.url();
    for listen in [rig.listen_v4, rig.listen_v6] {
        let (got, end) = dial_directly(listen, &url);
        assert!(
            end == "eof" || end == "reset",
            "the interceptor at {listen} must close the connection: {end}"
        );
        assert!(
            got.is_empty(),
            "the interceptor at {listen} must not answer a connection without a redirect record, got: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // The same from inside the attached cgroup: dialling the interceptor itself is not a
    // connection to an endpoint, so it has no redirect record either.
    let inside_url = format!("http://{}/mcp", rig.listen_v4);
    let run = rig.client(&[
        "raw-post",
        &inside_url,
        &call_body(62, "echo", json!({"text": "inside"})),
    ]);
    let reason = run.field("no-response").unwrap_or_else(|| {
        panic!(
            "a direct dial from the cgroup must get no response\n{}",
            run.describe()
        )
    });
    assert!(
        reason.contains("EOF") || reason.to_ascii_lowercase().contains("reset"),
        "the interceptor must close the connection, not leave it open: {reason}\n{}",
        run.describe()
    );
    run.assert_field("received-len", "0");

    assert_eq!(
        rig.server.http_requests(),
        0,
        "a direct dial was forwarded to the server"
    );
    assert_eq!(rig.server.calls("echo"), 0);
    wait_for(AUDIT_WAIT, || {
        rig.agent.log().contains("no redirect record").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent log does not mention `no redirect record`:\n{}",
            rig.agent.log()
        )
    });
    rig.agent.assert_running();

    // The agent still serves redirected clients afterwards.
    let run = rig.client(&["call", &url, "echo", r#"{"text":"after"}"#]);
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "after",
        "{}",
        run.describe()
    );
}

/// An endpoint on a loopback address means the host's service (its default `scope: host`):
/// inside another network namespace, that address is the namespace's own loopback, so its
/// connections there are left alone (here they reach that namespace's own service at the
/// endpoint's address) — while the namespace itself is served (tests/tests/pods.rs).
#[test]
fn other_network_namespaces_are_not_redirected() {
    let rig = Rig::start("netns", 14, POLICY);
    let ns = mcpwarden_tests::NetNs::new("untouched");
    let addr = rig.server.addr();
    let echo = ns.one_shot_echo(addr);
    let addr_s = addr.to_string();
    let run = mcpwarden_tests::run_client(
        "ip",
        Some(&rig.app),
        &[
            "netns",
            "exec",
            ns.name(),
            CLIENT_BIN,
            "tcp-echo",
            &addr_s,
            "inside the namespace",
        ],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    run.assert_field("echo", "inside the namespace");
    run.assert_field("peer", &addr_s);
    let peer = echo.join().expect("echo thread");
    assert!(
        peer.is_some(),
        "the namespace's own listener saw no connection"
    );
    assert_eq!(
        rig.server.http_requests(),
        0,
        "the host's MCP server was reached"
    );
    assert!(
        rig.agent.audit_lines().is_empty(),
        "the agent saw the connection: {}",
        rig.agent.audit_text()
    );
}
