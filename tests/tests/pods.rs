//! Pods: callers in network namespaces of their own (test indices 130–149, each test's pods in
//! 10.<index>.0.0/16 behind a router namespace of its own; see `mcpwarden_tests::pods`).
//!
//! Every namespace the agent serves gets the interceptor's listeners inside it, from its
//! creation; a call from a pod is decided under the pod's own cgroup and dialled upstream from
//! the pod's namespace, so the server sees the pod's address and the pod's routes apply; a
//! namespace not served yet fails closed; the ways around the redirect (squatting its port,
//! UDP, raw sockets, other spellings of a local address) are closed.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mcpwarden_tests::{
    free_addr, require_root, test_ip, wait_for, Agent, AgentOpts, LineChild, PinsGuard, Pod,
    PodNet, TestCgroup, TestServer,
};
use serde_json::{json, Value};

/// The example policy, with a rate limit small enough to reach.
const PODS_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "add": {},
    "start_security_scan": {"limits": [{"counter": "scan_rate", "window": "minute", "max": 2, "scope": "grant"}]},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

/// A test's pods: a router and a remote host with an rmcp server, an attach point with a cgroup
/// per pod, and an agent watching the net's pin directory. Fields drop in order: the agent
/// first, then the server, the net (pins, namespaces), the cgroups.
struct PodRig {
    agent: Agent,
    server: TestServer,
    net: PodNet,
    /// The attach point; each pod's cgroup is below it.
    attach: PathBuf,
    cg: TestCgroup,
}

impl PodRig {
    fn start(name: &str, index: u8, policy: &str) -> PodRig {
        Self::start_with(name, index, policy, &[], |ip| {
            TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0))
        })
    }

    /// With more agent arguments (after `--netns-dir`), and the server `serve` starts on the
    /// remote host's address (in its namespace).
    fn start_with(
        name: &str,
        index: u8,
        policy: &str,
        extra: &[String],
        serve: impl FnOnce(std::net::Ipv4Addr) -> TestServer + Send + 'static,
    ) -> PodRig {
        require_root();
        let cg = TestCgroup::new(name);
        let attach = cg.child("pods");
        let net = PodNet::new(name, index);
        let ip = net.remote_ip;
        let server = net.on_remote(move || serve(ip));
        let mut args = vec![
            "--netns-dir".to_string(),
            net.pins.path().display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: name.into(),
                endpoints: vec![(server.url(), policy.into())],
                listen: vec![free_addr(test_ip(index)), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: attach.clone(),
                agent_cgroup: cg.path().join("agent"),
            },
            &args,
        );
        PodRig {
            agent,
            server,
            net,
            attach,
            cg,
        }
    }

    /// A routed, pinned pod in its own cgroup below the attach point.
    fn pod(&mut self, tag: &str) -> Pod {
        let cgroup = self.attach.join(tag);
        self.net.pod(tag, cgroup, true, true)
    }

    /// `/<test cgroup>/pods/<tag>`, as records name it.
    fn cgroup_rel(&self, tag: &str) -> String {
        self.cg.child_rel_path(&format!("pods/{tag}"))
    }

    /// Wait until the agent says it serves `pod`'s namespace.
    fn wait_ready(&self, pod: &Pod) {
        self.agent.wait_netns_ready(pod.ino());
    }

    /// Decision records of `tool` from `pid`, waiting for `n` of them.
    fn decisions(&self, pid: u32, tool: &str, n: usize) -> Vec<Value> {
        wait_for(AUDIT_WAIT, || {
            let v: Vec<Value> = self
                .agent
                .decisions_for(tool)
                .into_iter()
                .filter(|r| r["pid"] == pid)
                .collect();
            (v.len() >= n).then_some(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} decision record(s) of {tool} by pid {pid}:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

/// Two pods in cgroups of their own, calling the remote server with the unmodified rmcp client:
/// allowed, denied, unknown and rate-limited calls, each decided and audited under the pod's
/// cgroup and namespace; nothing refused reaches the server; the server sees each pod's own
/// address as its peer (the upstream was dialled from the pod's namespace), and each pod has
/// its own quota.
#[test]
fn two_pods_are_each_under_policy_and_audited_as_themselves() {
    let mut rig = PodRig::start("pods-two", 130, PODS_POLICY);
    let pods = [rig.pod("a"), rig.pod("b")];
    let url = rig.server.url();
    let scan = r#"{"cluster":"prod"}"#;
    for (pod, tag) in pods.iter().zip(["a", "b"]) {
        let run = pod.client(
            CLIENT_BIN,
            &[
                "call",
                &url,
                "echo",
                r#"{"text":"from a pod"}"#,
                "drop_cluster",
                scan,
                "nope",
                "{}",
                "start_security_scan",
                scan,
                "start_security_scan",
                scan,
                "start_security_scan",
                scan,
            ],
            CLIENT_TIMEOUT,
        );
        run.assert_success();
        let lines = run.json_lines();
        assert_eq!(result_text(&lines[0]), "from a pod", "{}", run.describe());
        assert_eq!(result_text(&lines[1]), DENY_TEXT_DESTRUCTIVE);
        assert!(is_error_result(&lines[1]));
        assert_eq!(lines[2]["error"]["code"], -32602, "{}", run.describe());
        assert_eq!(result_text(&lines[3]), "scan started on prod");
        assert_eq!(result_text(&lines[4]), "scan started on prod");
        assert!(is_error_result(&lines[5]), "{}", run.describe());
        assert!(
            result_text(&lines[5]).contains("rate limit scan_rate exceeded"),
            "{}",
            run.describe()
        );

        let want_cgroup = rig.cgroup_rel(tag);
        for (tool, decision) in [
            ("echo", "allow"),
            ("drop_cluster", "deny"),
            ("nope", "deny"),
        ] {
            let records = rig.decisions(run.pid, tool, 1);
            let r = &records[0];
            assert_eq!(r["decision"], decision, "{r}");
            assert_eq!(r["cgroup"], want_cgroup.as_str(), "{r}");
            assert_eq!(r["netns"], pod.ino(), "{r}");
            assert_eq!(r["dst"], rig.server.addr().to_string(), "{r}");
        }
        let scans = rig.decisions(run.pid, "start_security_scan", 3);
        let verdicts: Vec<&Value> = scans.iter().map(|r| &r["decision"]).collect();
        assert_eq!(verdicts, ["allow", "allow", "deny"], "{scans:#?}");
    }
    let server = &rig.server;
    assert_eq!(server.calls("echo"), 2);
    assert_eq!(
        server.calls("start_security_scan"),
        4,
        "two per pod: quotas are per pod"
    );
    server.assert_not_reached("drop_cluster");
    server.assert_not_reached("nope");
    let peers: Vec<IpAddr> = server.peers().iter().map(|p| p.ip()).collect();
    for pod in &pods {
        assert!(
            peers.contains(&IpAddr::V4(pod.ip)),
            "the server never saw pod {} as its peer: {peers:?}",
            pod.ip
        );
    }
    assert!(
        peers
            .iter()
            .all(|ip| pods.iter().any(|p| IpAddr::V4(p.ip) == *ip)),
        "a connection to the server came from elsewhere than the pods: {peers:?}"
    );
    // The start-up log lists the namespaces covered: both pods were pinned before the agent
    // started... or after; either way each was reported ready.
    for pod in &pods {
        rig.wait_ready(pod);
    }
}

/// A pod whose routes cannot reach the server (no default route) cannot reach it through
/// mcpwarden either: the agent dials from the pod's namespace, fails, and says why (502); it
/// never dials from its own.
#[test]
fn a_pod_that_cannot_route_to_the_server_cannot_reach_it_through_mcpwarden() {
    let mut rig = PodRig::start("pods-noroute", 131, PODS_POLICY);
    let cgroup = rig.attach.join("isolated");
    let pod = rig.net.pod("isolated", cgroup, false, true);
    rig.wait_ready(&pod);
    // A call with a quota: the quota is given back, since the call certainly never ran.
    let body = call_body(7, "start_security_scan", json!({"cluster": "unreachable"}));
    let run = pod.client(
        CLIENT_BIN,
        &["raw-post", &rig.server.url(), &body],
        CLIENT_TIMEOUT,
    );
    run.assert_status(502);
    let text = String::from_utf8_lossy(&run.body().unwrap_or_default()).into_owned();
    assert!(
        text.contains("could not be reached") && text.contains("unreachable"),
        "the 502 must say why: {text}"
    );
    assert_eq!(rig.server.http_requests(), 0, "the server was reached");
    let response = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "response" && r["pid"] == run.pid
        })
        .unwrap_or_else(|| panic!("no response record:\n{}", rig.agent.audit_text()));
    assert_eq!(response["status"], 502, "{response}");
    assert_eq!(response["quota_released"], true, "{response}");
}

/// A namespace made while the agent runs is served once the agent says so, and the first
/// connect from it then succeeds. Its pin is a bind mount, as a runtime makes for a pod
/// sandbox: the mount table changing is what the agent notices.
#[test]
fn a_namespace_made_while_the_agent_runs_is_served_from_its_first_connect() {
    let mut rig = PodRig::start("pods-new", 132, PODS_POLICY);
    let pod = rig.pod("late");
    rig.wait_ready(&pod);
    let run = pod.client(
        CLIENT_BIN,
        &["call", &rig.server.url(), "echo", r#"{"text":"first"}"#],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "first",
        "{}",
        run.describe()
    );
    assert!(
        !rig.agent
            .audit_lines()
            .iter()
            .any(|r| r["event"] == "unprepared_netns"),
        "a namespace made while the agent runs was not ready for its first connect:\n{}",
        rig.agent.audit_text()
    );
}

/// With the agent stopped (SIGSTOP: it cannot discover anything), a connect to an endpoint
/// from a namespace it has not prepared fails at once (EPERM) and never goes direct; when the
/// agent runs again it audits the attempt once per namespace (`unprepared_netns`, with the
/// caller), prepares the namespace, and the next connect works.
#[test]
fn a_namespace_not_prepared_yet_fails_closed_and_is_audited_once() {
    let mut rig = PodRig::start("pods-unprep", 133, PODS_POLICY);
    let paused = rig.agent.pause();
    let pod = rig.pod("unprepared");
    let addr = rig.server.addr().to_string();
    let first = pod.client(CLIENT_BIN, &["tcp-echo", &addr, "x"], CLIENT_TIMEOUT);
    let error = first.field("connect-error").unwrap_or_default();
    assert!(
        error.contains("Operation not permitted"),
        "a connect from an unprepared namespace must fail at once (EPERM)\n{}",
        first.describe()
    );
    // A second caller in the same namespace, from another cgroup.
    let other_cgroup = rig.attach.join("unprepared-2");
    std::fs::create_dir_all(&other_cgroup).expect("mkdir");
    let second = pod_in_cgroup(&pod, &other_cgroup).client(&["tcp-echo", &addr, "y"]);
    assert!(
        second
            .field("connect-error")
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "{}",
        second.describe()
    );
    assert_eq!(
        rig.server.http_requests(),
        0,
        "an unprepared namespace went direct"
    );
    drop(paused);
    rig.wait_ready(&pod);
    let record = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| r["event"] == "unprepared_netns")
        .unwrap_or_else(|| panic!("no unprepared_netns record:\n{}", rig.agent.audit_text()));
    assert_eq!(record["decision"], "deny", "{record}");
    assert_eq!(record["dst"], addr.as_str(), "{record}");
    assert!(
        record["pid"] == first.pid || record["pid"] == second.pid,
        "the record names one of the callers: {record}"
    );
    assert_eq!(record["netns"], pod.ino(), "{record}");
    std::thread::sleep(Duration::from_millis(300));
    let count = rig
        .agent
        .audit_lines()
        .iter()
        .filter(|r| r["event"] == "unprepared_netns")
        .count();
    assert_eq!(
        count,
        1,
        "audited once per namespace:\n{}",
        rig.agent.audit_text()
    );
    let run = pod.client(
        CLIENT_BIN,
        &["call", &rig.server.url(), "echo", r#"{"text":"now"}"#],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(result_text(&run.json_lines()[0]), "now");
}

/// A pod's process placed in another cgroup (same namespace).
struct Elsewhere<'a> {
    pod: &'a Pod,
    cgroup: &'a std::path::Path,
}

fn pod_in_cgroup<'a>(pod: &'a Pod, cgroup: &'a std::path::Path) -> Elsewhere<'a> {
    Elsewhere { pod, cgroup }
}

impl Elsewhere<'_> {
    fn client(&self, args: &[&str]) -> mcpwarden_tests::ClientRun {
        mcpwarden_tests::client::run_client_with(
            CLIENT_BIN,
            mcpwarden_tests::client::Placement {
                cgroup: Some(self.cgroup),
                netns: Some(&mcpwarden_tests::pods::open_ns(&self.pod.ns_path)),
            },
            args,
            &[],
            CLIENT_TIMEOUT,
        )
    }
}

/// Inside a pod, the interceptor's port cannot be bound (by any address, on IPv4 or IPv6), UDP
/// to the endpoint fails (connect and sendto), a raw socket fails; each is audited under the
/// pod's cgroup. A packet socket fails too where the kernel can run the AF_PACKET guard; where
/// it cannot, the agent said so at start.
#[test]
fn squatting_udp_and_raw_sockets_are_refused_in_a_pod() {
    let mut rig = PodRig::start("pods-closed", 134, PODS_POLICY);
    let pod = rig.pod("hostile");
    rig.wait_ready(&pod);
    let listen = rig.agent.log();
    let port = listen_port(&rig, &pod);
    for at in [
        format!("127.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("{}:{port}", pod.ip),
    ] {
        let run = pod.client(CLIENT_BIN, &["listen", &at], CLIENT_TIMEOUT);
        let error = run.field("bind-error").unwrap_or_default();
        assert!(
            error.contains("Operation not permitted") || error.contains("in use"),
            "binding the interceptor's port {at} in a pod must fail\n{}",
            run.describe()
        );
    }
    let bind = pod.client(
        CLIENT_BIN,
        &["listen", &format!("0.0.0.0:{port}")],
        CLIENT_TIMEOUT,
    );
    assert!(
        bind.field("bind-error")
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "the guard, not the listener's own bind, refuses a wildcard bind\n{}",
        bind.describe()
    );
    let addr = rig.server.addr().to_string();
    let udp = pod.client(CLIENT_BIN, &["udp-echo", &addr, "quic"], CLIENT_TIMEOUT);
    assert!(
        udp.field("connect-error")
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "{}",
        udp.describe()
    );
    let sendto = pod.client(CLIENT_BIN, &["udp-sendto", &addr, "quic"], CLIENT_TIMEOUT);
    assert!(
        sendto
            .field("send-error")
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "{}",
        sendto.describe()
    );
    let raw = pod.client(CLIENT_BIN, &["raw-socket", "inet"], CLIENT_TIMEOUT);
    assert!(
        raw.field("socket-error")
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "{}",
        raw.describe()
    );
    let packet = pod.client(CLIENT_BIN, &["raw-socket", "packet"], CLIENT_TIMEOUT);
    if listen.contains("AF_PACKET guard") {
        // This kernel cannot load the lsm_cgroup program: the agent must have said so loudly.
        assert!(
            listen.contains("AF_PACKET sockets below the attach point are NOT refused"),
            "{listen}"
        );
        eprintln!("note: AF_PACKET guard unavailable on this kernel (the agent warned at start)");
    } else {
        assert!(
            packet
                .field("socket-error")
                .unwrap_or_default()
                .contains("Operation not permitted"),
            "{}",
            packet.describe()
        );
    }
    let want_cgroup = rig.cgroup_rel("hostile");
    for (pid, reason) in [
        (bind.pid, "binding the interceptor's port"),
        (udp.pid, "UDP to an MCP endpoint"),
        (raw.pid, "SOCK_RAW socket refused"),
    ] {
        let r = rig
            .agent
            .wait_audit(AUDIT_WAIT, |r| {
                r["event"] == "refused"
                    && r["reason"].as_str().is_some_and(|t| t.starts_with(reason))
            })
            .unwrap_or_else(|| panic!("no record of {reason:?}:\n{}", rig.agent.audit_text()));
        assert_eq!(r["cgroup"], want_cgroup.as_str(), "{r}");
        assert_eq!(r["netns"], pod.ino(), "{r}");
        let _ = pid;
    }
    assert_eq!(rig.server.http_requests(), 0);
}

/// The interceptor's IPv4 port in `pod`'s namespace, from the agent's log.
fn listen_port(rig: &PodRig, pod: &Pod) -> u16 {
    let line = rig.agent.wait_netns_ready(pod.ino());
    let v4 = line
        .split("v4=Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no v4 listener in {line}"));
    v4.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{v4}: {e}"))
        .port()
}

/// Inside a pod, `getpeername()` on a redirected connection reports the original server, and
/// a plain TCP connection to it arrives at the interceptor (its local address is loopback).
#[test]
fn getpeername_in_a_pod_reports_the_original_server() {
    let mut rig = PodRig::start("pods-peer", 135, PODS_POLICY);
    let pod = rig.pod("peer");
    rig.wait_ready(&pod);
    let addr = rig.server.addr().to_string();
    let body = call_body(3, "echo", json!({"text": "peer"}));
    let run = pod.client(CLIENT_BIN, &["peer", &addr, "/mcp", &body], CLIENT_TIMEOUT);
    run.assert_success();
    run.assert_field("peer", &addr);
    let local: SocketAddr = run
        .field("local")
        .expect("local=")
        .parse()
        .expect("address");
    assert!(
        local.ip().is_loopback(),
        "the connection was not redirected to the interceptor in the pod: local {local}"
    );
    assert_eq!(run.body_json()["result"]["content"][0]["text"], "peer");
}

/// An endpoint on a loopback address with `scope: pods` means each pod's own server: every
/// local spelling of its port inside the pod (the rest of 127.0.0.0/8, 0.0.0.0, ::, ::1,
/// IPv4-mapped forms, the pod's own address) is redirected and decided, and a denied call never
/// runs on the server, which listens on the pod's wildcard address.
#[test]
fn every_local_spelling_of_a_pod_local_endpoint_is_redirected() {
    require_root();
    let cg = TestCgroup::new("pods-spell");
    let attach = cg.child("pods");
    let mut net = PodNet::new("pods-spell", 136);
    let pod = net.pod("local", attach.join("local"), true, true);
    let port = mcpwarden_tests::free_port(Ipv6Addr::UNSPECIFIED);
    // The pod's own MCP server on [::]:port (dual stack: every local address of the pod).
    let server = mcpwarden_tests::pods::in_netns(&pod.ns_path, move || {
        TestServer::start_with_hosts(
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            &[
                "127.0.0.1",
                "127.9.8.7",
                "0.0.0.0",
                "[::]",
                "[::1]",
                "10.136.1.2",
                "[::ffff:127.0.0.1]",
                "[::ffff:0.0.0.0]",
                "[::ffff:10.136.1.2]",
            ],
        )
    });
    let files = mcpwarden_tests::TempDir::new("pods-spell");
    let policy = files.path().join("policy.json");
    std::fs::write(&policy, PODS_POLICY).expect("write policy");
    let config = files.path().join("mcpwarden.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  - name: sidecar\n    url: http://127.0.0.1:{port}/mcp\n    policy: {}\n    scope: pods\n",
            policy.display()
        ),
    )
    .expect("write config");
    let agent = Agent::start_with(
        AGENT_BIN,
        AgentOpts {
            name: "pods-spell".into(),
            endpoints: Vec::new(),
            listen: vec![free_addr(test_ip(136)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: attach.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
        &[
            "--config".to_string(),
            config.display().to_string(),
            "--netns-dir".to_string(),
            net.pins.path().display().to_string(),
        ],
    );
    agent.wait_netns_ready(pod.ino());
    let spellings = [
        format!("127.0.0.1:{port}"),
        format!("127.9.8.7:{port}"),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[::ffff:0.0.0.0]:{port}"),
        format!("{}:{port}", pod.ip),
        format!("[::ffff:{}]:{port}", pod.ip),
    ];
    for (i, spelling) in spellings.iter().enumerate() {
        let url = format!("http://{spelling}/mcp");
        let deny = call_body(i as u64, "drop_cluster", json!({"cluster": "prod"}));
        let run = pod.client(CLIENT_BIN, &["raw-post", &url, &deny], CLIENT_TIMEOUT);
        run.assert_status(200);
        assert_eq!(
            run.body_json()["result"]["content"][0]["text"],
            DENY_TEXT_DESTRUCTIVE,
            "{spelling} was not decided\n{}",
            run.describe()
        );
        let allow = call_body(100 + i as u64, "echo", json!({"text": spelling}));
        let run = pod.client(CLIENT_BIN, &["raw-post", &url, &allow], CLIENT_TIMEOUT);
        run.assert_status(200);
        assert_eq!(
            run.body_json()["result"]["content"][0]["text"],
            spelling.as_str()
        );
        let record = agent
            .wait_audit(AUDIT_WAIT, |r| {
                r["pid"] == run.pid && r["tool"] == "echo" && !r["decision"].is_null()
            })
            .unwrap_or_else(|| panic!("{spelling}: not audited:\n{}", agent.audit_text()));
        assert_eq!(record["server"], "sidecar", "{record}");
        assert_eq!(record["decision"], "allow", "{record}");
    }
    server.assert_not_reached("drop_cluster");
    assert_eq!(server.calls("echo"), spellings.len() as u64);
    // The host's own namespace is not the pod's: the endpoint (scope: pods) means nothing there.
    assert!(
        !agent
            .audit_lines()
            .iter()
            .any(|r| r["netns"] != pod.ino() && !r["netns"].is_null()),
        "{}",
        agent.audit_text()
    );
    drop(agent);
    drop(server);
    drop(pod);
}

/// A record can only be claimed by the connection it was made for, and every key includes the
/// namespace. With the agent stopped (nothing is accepted): in pod a, a redirected connection
/// from 127.0.0.1:P is reset by its client before it is accepted; then a new one from the same
/// 127.0.0.1:P in pod a and another from 127.0.0.1:P in pod b (its own port space) both wait
/// in the queue. Once the agent runs, each live connection is served as its own caller (its
/// pid, its namespace); the dead one claims nobody's record.
#[test]
fn records_are_per_namespace_and_per_connection() {
    let mut rig = PodRig::start("pods-keys", 137, PODS_POLICY);
    let a = rig.pod("a");
    let b = rig.pod("b");
    rig.wait_ready(&a);
    rig.wait_ready(&b);
    let server = rig.server.addr().to_string();
    let port = 40_000 + (std::process::id() % 20_000) as u16;
    let local = format!("127.0.0.1:{port}");
    let paused = rig.agent.pause();
    let dead = a.client(CLIENT_BIN, &["peer-abort", &local, &server], CLIENT_TIMEOUT);
    dead.assert_success();
    dead.assert_field("local", &local);
    let mut waiting = Vec::new();
    for (pod, text) in [(&a, "a"), (&b, "b")] {
        let body = call_body(1, "echo", json!({"text": text}));
        let mut cmd = pod.command(CLIENT_BIN);
        cmd.args(["peer-from", &local, &server, "/mcp", &body]);
        let mut client = LineChild::spawn(cmd);
        // Connected (and queued, since the agent is stopped) once it prints its local address.
        let line = client
            .wait_line(Duration::from_secs(30), |l| {
                l.starts_with("local=") || l.starts_with("connect-error=")
            })
            .unwrap_or_else(|| panic!("pod {text}: the client never connected"));
        assert_eq!(
            line,
            format!("local={local}"),
            "pod {text}: {:?}",
            client.seen
        );
        waiting.push((pod, text, client));
    }
    drop(paused);
    for (pod, text, client) in waiting {
        let (status, lines) = client.finish();
        assert!(status.success(), "pod {text}: {lines:?}");
        let pid: u32 = lines[0]
            .strip_prefix("pid=")
            .and_then(|p| p.parse().ok())
            .expect("pid= line");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(r#""text":"{text}""#))),
            "pod {text} was not served as itself: {lines:?}\n{}",
            rig.agent.audit_text()
        );
        let record = rig.decisions(pid, "echo", 1);
        assert_eq!(record[0]["netns"], pod.ino(), "{}", record[0]);
        assert_eq!(record[0]["decision"], "allow");
    }
    assert_eq!(rig.server.calls("echo"), 2);
    assert!(
        !rig.agent
            .audit_lines()
            .iter()
            .any(|r| r["pid"] == dead.pid && !r["decision"].is_null() && r["decision"] != "deny"),
        "the reset connection was served:\n{}",
        rig.agent.audit_text()
    );
}

/// An `https://` endpoint called from a pod: the client trusts the mcpwarden CA, the agent
/// terminates TLS in the pod's namespace, decides, and opens its own verified TLS connection to
/// the server from the pod's namespace (the server sees the pod's address).
#[test]
fn an_https_endpoint_is_under_policy_from_a_pod() {
    let files = mcpwarden_tests::TempDir::new("pods-tls");
    let ca = mcpwarden_tests::TestCa::new("upstream CA of pods-tls");
    let ca_path = files.path().join("upstream-ca.pem");
    ca.write_pem(&ca_path);
    let cert = ca.issue(&["10.138.250.2"], mcpwarden_tests::Validity::Current);
    let mut rig = PodRig::start_with(
        "pods-tls",
        138,
        PODS_POLICY,
        &["--upstream-ca".to_string(), ca_path.display().to_string()],
        move |ip| {
            TestServer::start_tls(
                SocketAddr::new(IpAddr::V4(ip), 0),
                mcpwarden_tests::TlsOpts::new(cert),
            )
        },
    );
    let pod = rig.pod("tls");
    rig.wait_ready(&pod);
    let url = rig.server.url();
    assert!(url.starts_with("https://"), "{url}");
    let agent_ca = rig.agent.ca_cert_path().display().to_string();
    let run = pod.client_env(
        CLIENT_BIN,
        &[
            "call",
            &url,
            "echo",
            r#"{"text":"over tls"}"#,
            "drop_cluster",
            r#"{"cluster":"x"}"#,
        ],
        &[("SSL_CERT_FILE", &agent_ca)],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    let lines = run.json_lines();
    assert_eq!(result_text(&lines[0]), "over tls", "{}", run.describe());
    assert_eq!(result_text(&lines[1]), DENY_TEXT_DESTRUCTIVE);
    let r = &rig.decisions(run.pid, "echo", 1)[0];
    assert_eq!(r["tls"], "terminated", "{r}");
    assert_eq!(r["netns"], pod.ino(), "{r}");
    rig.server.assert_not_reached("drop_cluster");
    assert_eq!(rig.server.calls("echo"), 1);
    let peers: Vec<IpAddr> = rig.server.peers().iter().map(|p| p.ip()).collect();
    assert!(
        !peers.is_empty() && peers.iter().all(|ip| *ip == IpAddr::V4(pod.ip)),
        "the TLS upstream (and its protocol probe) must come from the pod: {peers:?}"
    );
}

/// An SSE stream held open from a pod: its first event reaches the client while the stream is
/// still open, through the agent's listener in the pod, and the stream was dialled from the pod.
#[test]
fn an_sse_stream_is_held_open_from_a_pod() {
    require_root();
    let cg = TestCgroup::new("pods-sse");
    let attach = cg.child("pods");
    let mut net = PodNet::new("pods-sse", 139);
    let ip = net.remote_ip;
    let stream = net.on_remote(move || {
        mcpwarden_tests::held::HeldStream::start(SocketAddr::new(IpAddr::V4(ip), 0))
    });
    let url = format!("http://{}/mcp", stream.addr);
    let agent = Agent::start_with(
        AGENT_BIN,
        AgentOpts {
            name: "pods-sse".into(),
            endpoints: vec![(url.clone(), POLICY.into())],
            listen: vec![free_addr(test_ip(139)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: attach.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
        &[
            "--netns-dir".to_string(),
            net.pins.path().display().to_string(),
        ],
    );
    let pod = net.pod("sse", attach.join("sse"), true, true);
    agent.wait_netns_ready(pod.ino());
    let mut cmd = pod.command(CLIENT_BIN);
    cmd.args(["sse-get", &url]);
    let mut client = LineChild::spawn(cmd);
    if let Err(e) = stream.delivered_live(&mut client) {
        panic!("{e}\n{}", agent.audit_text());
    }
    let (status, _) = client.finish();
    assert!(status.success(), "{status}");
    let record = agent
        .audit_lines()
        .into_iter()
        .find(|r| r["event"] == "non_mcp" && r["http_method"] == "GET")
        .unwrap_or_else(|| panic!("the stream was not audited:\n{}", agent.audit_text()));
    assert_eq!(record["netns"], pod.ino(), "{record}");
    drop(agent);
    drop(pod);
}

/// The agent stays in the cgroup it was started in (`--agent-cgroup self`, as in a container),
/// which is below the attach point: its own upstream connections, made from a pod's namespace,
/// are exempt by its cgroup id and never come back to it.
#[test]
fn an_agent_staying_in_its_cgroup_below_the_attach_point_does_not_loop() {
    require_root();
    let cg = TestCgroup::new("pods-stay");
    let attach = cg.child("pods");
    let mut net = PodNet::new("pods-stay", 140);
    let ip = net.remote_ip;
    let server = net.on_remote(move || TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0)));
    let pod = net.pod("stay", attach.join("stay"), true, true);
    let agent = Agent::start_staying(
        AGENT_BIN,
        AgentOpts {
            name: "pods-stay".into(),
            endpoints: vec![(server.url(), PODS_POLICY.into())],
            listen: vec![free_addr(test_ip(140)), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: attach.clone(),
            // Below the attach point: everything but the agent there is redirected.
            agent_cgroup: attach.join("mcpwarden"),
        },
        &[
            "--netns-dir".to_string(),
            net.pins.path().display().to_string(),
        ],
    );
    assert_eq!(
        mcpwarden_tests::cgroup::cgroup_of_pid(agent.pid().expect("pid")),
        Some(cg.child_rel_path("pods/mcpwarden")),
        "the agent did not stay where it was started"
    );
    // The start-up log lists the pod's namespace (pinned before the agent started).
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("network namespaces covered")
                && l.contains(&format!("net:[{}]", pod.ino()))),
        "{}",
        agent.log()
    );
    let run = pod.client(
        CLIENT_BIN,
        &["call", &server.url(), "echo", r#"{"text":"no loop"}"#],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "no loop",
        "{}",
        run.describe()
    );
    assert_eq!(server.calls("echo"), 1);
    assert!(
        !agent.log().contains("no redirect record"),
        "the agent's own upstream connection came back to it:\n{}",
        agent.log()
    );
    // The agent's cgroup holds the agent alone; another process there makes `self` an error.
    drop(agent);
    drop(pod);
}

/// In the host's namespace, an endpoint on a loopback address (default `scope: host`) is
/// reached by every local spelling of its port: the rest of 127.0.0.0/8, 0.0.0.0, ::, ::1, the
/// IPv4-mapped forms, and each of the host's own interface addresses. Each is redirected and
/// decided (a denied call is answered by the agent and never forwarded).
#[test]
fn every_local_spelling_of_a_host_endpoint_is_redirected_on_the_host() {
    let rig = Rig::start("spell-host", 142, PODS_POLICY);
    let port = rig.server.addr().port();
    let mut spellings = vec![
        format!("127.0.0.1:{port}"),
        format!("127.200.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[::ffff:0.0.0.0]:{port}"),
    ];
    // The host's own interface addresses (what getifaddrs(3) lists), but link-local ones,
    // which need a zone.
    let out = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
        .expect("ip -j addr");
    let addrs: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    for iface in addrs.as_array().into_iter().flatten() {
        for a in iface["addr_info"].as_array().into_iter().flatten() {
            let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
            if ip.is_loopback() || link_local {
                continue;
            }
            spellings.push(SocketAddr::new(ip, port).to_string());
        }
    }
    for (i, spelling) in spellings.iter().enumerate() {
        let url = format!("http://{spelling}/mcp");
        let deny = call_body(i as u64, "drop_cluster", json!({"cluster": "prod"}));
        let run = rig.client(&["raw-post", &url, &deny]);
        run.assert_status(200);
        assert_eq!(
            run.body_json()["result"]["content"][0]["text"],
            DENY_TEXT_DESTRUCTIVE,
            "{spelling} was not redirected and decided\n{}",
            run.describe()
        );
        let r = rig
            .agent
            .wait_audit(AUDIT_WAIT, |r| {
                r["pid"] == run.pid && r["tool"] == "drop_cluster"
            })
            .unwrap_or_else(|| panic!("{spelling}: not audited:\n{}", rig.agent.audit_text()));
        assert_eq!(r["dst"], written(spelling), "{r}");
    }
    rig.server.assert_not_reached("drop_cluster");
}

/// How the agent writes a destination dialled as `s` (IPv4-mapped addresses as IPv4).
fn written(s: &str) -> String {
    let sa: SocketAddr = s.parse().expect("a socket address");
    match sa {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()).to_string(),
            None => sa.to_string(),
        },
        v4 => v4.to_string(),
    }
}

/// kill -9 with a pod calling: its connects are refused at once while no agent serves (the
/// programs stay attached and point at the pod's dead listener), nothing reaches the server,
/// and the next agent adopts the datapath, serves the pod's namespace again, and its calls
/// resume under the same policy.
#[test]
fn a_pod_fails_closed_while_the_agent_is_down_and_resumes_after() {
    let pins = PinsGuard::new("pods-kill9");
    let pin_args = vec!["--bpffs-dir".to_string(), pins.0.display().to_string()];
    let mut rig = PodRig::start_with("pods-kill9", 143, PODS_POLICY, &pin_args, |ip| {
        TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0))
    });
    let pod = rig.pod("a");
    rig.wait_ready(&pod);
    let url = rig.server.url();
    let call = |pod: &Pod, tool: &str| {
        pod.client(
            CLIENT_BIN,
            &["call", &url, tool, r#"{"text":"x","cluster":"prod"}"#],
            CLIENT_TIMEOUT,
        )
    };
    call(&pod, "echo").assert_success();
    assert_eq!(rig.server.calls("echo"), 1);

    rig.agent.kill9();
    for tool in ["echo", "drop_cluster"] {
        let started = std::time::Instant::now();
        let run = call(&pod, tool);
        let took = started.elapsed();
        assert!(!run.status.success(), "{}", run.describe());
        assert!(
            run.describe().contains("Connection refused (os error 111)"),
            "{}",
            run.describe()
        );
        eprintln!("a pod's connect with no agent serving failed in {took:?}");
        assert!(took < CLIENT_TIMEOUT / 2, "it hung: {took:?}");
    }
    assert_eq!(
        rig.server.calls("echo"),
        1,
        "a call reached the server with no agent"
    );
    rig.server.assert_not_reached("drop_cluster");

    rig.agent.respawn(&[]);
    rig.wait_ready(&pod);
    let log = rig.agent.log();
    assert!(log.contains("maps_adopted=true"), "{log}");
    call(&pod, "echo").assert_success();
    assert_eq!(rig.server.calls("echo"), 2);
    let run = call(&pod, "drop_cluster");
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    rig.server.assert_not_reached("drop_cluster");
}

/// An upgrade with a pod served: the new agent takes over the pod's listener too (the same
/// socket, so the programs' map entry stays right), and the pod's calls go on under policy.
#[test]
fn a_new_agent_takes_over_a_pods_listener() {
    let pins = PinsGuard::new("pods-handover");
    let pin_args = vec![
        "--bpffs-dir".to_string(),
        pins.0.display().to_string(),
        "--drain-seconds".into(),
        "2".into(),
    ];
    let mut rig = PodRig::start_with("pods-handover", 144, PODS_POLICY, &pin_args, |ip| {
        TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0))
    });
    let pod = rig.pod("a");
    rig.wait_ready(&pod);
    let url = rig.server.url();
    let call = |tool: &str| {
        pod.client(
            CLIENT_BIN,
            &["call", &url, tool, r#"{"text":"x","cluster":"prod"}"#],
            CLIENT_TIMEOUT,
        )
    };
    call("echo").assert_success();
    let port_before = listen_port(&rig, &pod);
    let b = rig.agent.start_successor("pods-handover-b");
    let log = b.log();
    assert!(
        log.contains("taking the listening sockets over") && log.contains("namespaces=2"),
        "the host's and the pod's listeners are handed over:\n{log}"
    );
    let drained = wait_for(Duration::from_secs(15), || {
        rig.agent
            .log()
            .contains("drained: idle until SIGTERM")
            .then_some(())
    });
    assert!(drained.is_some(), "{}", rig.agent.log());
    let port_of = |line: String| {
        line.split("v4=Some(")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.port())
    };
    assert_eq!(
        port_of(b.wait_netns_ready(pod.ino())),
        Some(port_before),
        "the new agent serves the pod on the same listener"
    );
    let run = call("echo");
    run.assert_success();
    assert_eq!(rig.server.calls("echo"), 2);
    let run = call("drop_cluster");
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    rig.server.assert_not_reached("drop_cluster");
    drop(b);
}
