//! Operating a running agent (test indices 170–179): the metrics listener (`/metrics`,
//! `/healthz`, `/readyz`) scraped for real, the admin socket's peer checks with real uids and
//! groups, `mcpwarden status`, `reload`, `health` and `policy explain --live` against a running
//! agent, the metrics listener and admin socket across a hand-over, and a bounded loopback load
//! whose every call has its decision record.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use mcpwarden_tests::hosts::HostsEntry;
use mcpwarden_tests::rawhttp::{self, RawOutcome};
use mcpwarden_tests::script::run_script;
use mcpwarden_tests::{sha256_hex, wait_for};

/// One request with `method` over a fresh connection: the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    match rawhttp::request(method, &url, b"", &[], Duration::from_secs(10)) {
        RawOutcome::Response(r) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        RawOutcome::NoResponse { reason, .. } => panic!("{method} {url}: {reason}"),
    }
}

/// `mcpwarden ARGS...` (the agent binary's CLI), as root.
fn cli(args: &[&str]) -> Output {
    Command::new(AGENT_BIN)
        .args(args)
        .output()
        .expect("run the mcpwarden CLI")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn status_json(socket: &Path) -> Value {
    let out = cli(&[
        "status",
        "--admin-socket",
        &socket.display().to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

/// The value of the one sample `name{labels}` (labels as written, in order), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// (170) A scrape of a running agent: every metric family with its type; calls counted by
/// server, tool and decision; 1,000 made-up tool names add one `other` series, not 1,000;
/// refusals by kind; the audit sink's counters; only the three paths, GET only.
#[test]
fn a_scrape_names_every_family_and_callers_cannot_grow_the_tool_label() {
    let rig = Rig::start("scrape", 170, POLICY);
    let url = rig.server.url();
    let run = rig.client(&[
        "call",
        &url,
        "echo",
        r#"{"text":"hi"}"#,
        "drop_cluster",
        r#"{"cluster":"prod"}"#,
    ]);
    run.assert_success();
    // 1,000 distinct made-up names, in batches of 100 on one connection.
    let steps: Vec<Value> = (0..10)
        .map(|b| {
            let batch: Vec<Value> = (0..100)
                .map(|i| {
                    json!({"jsonrpc": "2.0", "id": b * 100 + i, "method": "tools/call",
                        "params": {"name": format!("madeup_{b}_{i}"), "arguments": {}}})
                })
                .collect();
            json!({"op": "request", "conn": "a", "url": url, "body": Value::Array(batch).to_string()})
        })
        .collect();
    let script = run_script(
        CLIENT_BIN,
        Some(&rig.app),
        &json!({ "steps": steps }),
        CLIENT_TIMEOUT,
    );
    for step in &script.steps {
        assert_eq!(step["status"], 200, "{step}");
    }
    rig.server.assert_not_reached("madeup_0_0");
    let addr = rig.agent.metrics_addr();
    // Decision records of the last batch are written before its answer: counted by now.
    let (status, text) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    for (family, kind) in [
        ("mcpwarden_calls", "counter"),
        ("mcpwarden_refusals", "counter"),
        ("mcpwarden_decision_duration_seconds", "histogram"),
        ("mcpwarden_call_duration_seconds", "histogram"),
        ("mcpwarden_open_connections", "gauge"),
        ("mcpwarden_sse_streams", "gauge"),
        ("mcpwarden_network_namespaces", "gauge"),
        ("mcpwarden_redirect_map_entries", "gauge"),
        ("mcpwarden_redirect_map_capacity", "gauge"),
        ("mcpwarden_unprepared_netns_refusals", "counter"),
        ("mcpwarden_preexisting_resets", "counter"),
        ("mcpwarden_policy_reloads", "counter"),
        ("mcpwarden_admin_refused", "counter"),
        ("mcpwarden_approvals", "counter"),
        ("mcpwarden_approvals_pending", "gauge"),
        ("mcpwarden_tls_leaves_minted", "counter"),
        ("mcpwarden_audit_bytes", "counter"),
        ("mcpwarden_audit_records", "counter"),
        ("mcpwarden_audit_write_errors", "counter"),
        ("mcpwarden_audit_stalls", "counter"),
        ("mcpwarden_audit_refused_for_stall", "counter"),
        ("mcpwarden_audit_unrecorded_forwarded", "counter"),
        ("mcpwarden_audit_reopens", "counter"),
        ("mcpwarden_audit_rotations", "counter"),
        ("mcpwarden_audit_write_duration_seconds", "histogram"),
        ("mcpwarden_ready", "gauge"),
    ] {
        let name = if kind == "counter" {
            format!("{family}_total")
        } else {
            family.to_owned()
        };
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}`:\n{text}"
        );
    }
    let server = format!("{}:{}", rig.ip, rig.server.addr().port());
    let calls = |tool: &str, decision: &str| {
        sample(
            &text,
            &format!(
                "mcpwarden_calls_total{{server=\"{server}\",tool=\"{tool}\",decision=\"{decision}\"}}"
            ),
        )
    };
    assert_eq!(calls("echo", "allow"), Some(1.0), "{text}");
    assert_eq!(calls("drop_cluster", "deny"), Some(1.0), "{text}");
    assert_eq!(calls("other", "deny"), Some(1000.0), "{text}");
    let series = text
        .lines()
        .filter(|l| l.starts_with("mcpwarden_calls_total{"))
        .count();
    assert_eq!(
        series, 3,
        "one series per listed tool and decision, one `other`:\n{text}"
    );
    assert!(
        !text.contains("madeup_"),
        "a made-up name became a label:\n{text}"
    );
    assert!(
        sample(&text, "mcpwarden_refusals_total{kind=\"policy\"}").unwrap_or(0.0) >= 1001.0,
        "{text}"
    );
    assert!(
        sample(&text, "mcpwarden_audit_records_total").unwrap_or(0.0) >= 1003.0,
        "{text}"
    );
    assert!(
        sample(&text, "mcpwarden_audit_bytes_total").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "mcpwarden_decision_duration_seconds_count").unwrap_or(0.0) >= 12.0,
        "{text}"
    );
    assert!(
        sample(&text, "mcpwarden_call_duration_seconds_count").unwrap_or(0.0) >= 1.0,
        "the allowed call's answer: {text}"
    );
    assert_eq!(sample(&text, "mcpwarden_ready"), Some(1.0), "{text}");
    assert!(
        sample(&text, "mcpwarden_redirect_map_capacity{map=\"BY_SOCKET\"}").unwrap_or(0.0) > 0.0,
        "{text}"
    );

    let (status, body) = http(addr, "GET", "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http(addr, "GET", "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("ready\n") && !body.contains("[-]"), "{body}");
    assert_eq!(http(addr, "GET", "/status").0, 404);
    assert_eq!(http(addr, "POST", "/metrics").0, 405);
}

/// (171) `/readyz` answers 503 naming what is missing while an endpoint resolves to no address
/// (its traffic would go uninspected), 200 once it resolves; `mcpwarden health` says the same
/// through the admin socket (an exec probe), exit 1 then 0.
#[test]
fn readyz_fails_until_every_endpoint_is_in_the_maps() {
    mcpwarden_tests::require_root();
    let cg = mcpwarden_tests::TestCgroup::new("readyz");
    let app = cg.child("app");
    let ip = mcpwarden_tests::test_ip(171);
    let server = mcpwarden_tests::TestServer::start(SocketAddr::new(ip.into(), 0));
    let name = format!("mcpwarden-readyz-{}.test", std::process::id());
    let url = format!("http://{name}:{}/mcp", server.addr().port());
    let agent = mcpwarden_tests::Agent::start_with(
        AGENT_BIN,
        mcpwarden_tests::AgentOpts {
            name: "readyz".into(),
            endpoints: vec![(url, POLICY.to_owned())],
            listen: vec![mcpwarden_tests::free_addr(ip)],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
        &[],
    );
    let addr = agent.metrics_addr();
    let socket = agent.admin_socket().display().to_string();
    let (status, body) = http(addr, "GET", "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("[-] maps") && body.contains(&name) && body.contains("[+] programs"),
        "{body}"
    );
    let out = cli(&["health", "--admin-socket", &socket]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&name),
        "{}",
        describe(&out)
    );
    let out = cli(&["health", "--live", "--admin-socket", &socket]);
    assert!(
        out.status.success(),
        "alive while not ready: {}",
        describe(&out)
    );
    // Liveness does not depend on readiness.
    assert_eq!(http(addr, "GET", "/healthz").0, 200);

    let _hosts = HostsEntry::add(&name, ip.into());
    // The resolver retries every 5 s.
    let ready = wait_for(Duration::from_secs(20), || {
        (http(addr, "GET", "/readyz").0 == 200).then_some(())
    });
    assert!(ready.is_some(), "{}", http(addr, "GET", "/readyz").1);
    let out = cli(&["health", "--admin-socket", &socket]);
    assert!(out.status.success(), "{}", describe(&out));
    drop(agent);
}

/// (172) The admin socket checks its peers by their kernel credentials: root is served; a uid
/// outside the admin group is refused (403) and audited as `admin_refused`, even when the
/// socket file's mode would let it connect; a uid whose supplementary groups hold the admin
/// group is served, as is one whose primary group is it. With the socket's own mode (0660,
/// root:group) an outsider cannot even connect.
#[test]
fn the_admin_socket_serves_root_and_its_group_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const GROUP: u32 = 64_172;
    let rig = Rig::start_with(
        "admin",
        172,
        POLICY,
        &["--admin-group".into(), GROUP.to_string()],
    );
    let socket = rig.agent.admin_socket();
    let meta = std::fs::metadata(&socket).expect("the admin socket");
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, GROUP));
    // Non-root processes must reach the socket's directory.
    std::fs::set_permissions(rig.agent.temp_dir(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let as_user = |ids: &[&str]| -> Output {
        Command::new("setpriv")
            .args(ids)
            .arg(AGENT_BIN)
            .args(["status", "--json", "--admin-socket"])
            .arg(&socket)
            .output()
            .expect("run setpriv")
    };
    let outsider = ["--reuid=64170", "--regid=64170", "--clear-groups"];
    let out = as_user(&outsider);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "the file mode keeps it out first: {}",
        describe(&out)
    );

    // Opened up (as a mistaken chmod would): the credential check still refuses it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_user(&outsider);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("uid 64170") && err.contains("admin group"),
        "{}",
        describe(&out)
    );
    let record = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| r["event"] == "admin_refused")
        .unwrap_or_else(|| panic!("no admin_refused record:\n{}", rig.agent.audit_text()));
    assert_eq!(record["uid"], 64170, "{record}");
    assert!(record["pid"].as_u64().is_some(), "{record}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).expect("chmod");

    // A supplementary group (SO_PEERGROUPS), then a primary group (SO_PEERCRED).
    for ids in [
        ["--reuid=64171", "--regid=64171", "--groups=64172"],
        ["--reuid=64171", "--regid=64172", "--clear-groups"],
    ] {
        let out = as_user(&ids);
        assert!(out.status.success(), "{ids:?}: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        assert_eq!(v["agent"]["pid"], rig.agent.pid().unwrap_or(0), "{v}");
    }
    let refused = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "admin_refused")
        .count();
    assert_eq!(refused, 1, "only the outsider was refused");
}

/// (173) `status` against a running agent (JSON and text), `reload` (a good and a bad file),
/// `policy explain --live` against the live counters without counting.
#[test]
fn status_reload_and_live_explain_against_a_running_agent() {
    let rig = Rig::start("status", 173, POLICY);
    let url = rig.server.url();
    let run = rig.client(&[
        "call",
        &url,
        "echo",
        r#"{"text":"a"}"#,
        "start_security_scan",
        r#"{"cluster":"x"}"#,
        "start_security_scan",
        r#"{"cluster":"y"}"#,
        "start_security_scan",
        r#"{"cluster":"z"}"#,
    ]);
    run.assert_success();
    let socket = rig.agent.admin_socket();
    let socket_arg = socket.display().to_string();
    let v = status_json(&socket);
    assert_eq!(v["agent"]["pid"], rig.agent.pid().unwrap_or(0), "{v:#}");
    assert_eq!(v["health"]["ready"], true, "{v:#}");
    assert!(
        v["datapath"]["programs"]
            .as_array()
            .is_some_and(|p| p.iter().any(|n| n == "mcpw_connect4")),
        "{v:#}"
    );
    assert!(
        v["datapath"]["attach_cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&rig.app_rel())),
        "{v:#}"
    );
    assert_eq!(v["datapath"]["pinned"], true, "{v:#}");
    let server_addr = rig.server.addr().to_string();
    assert_eq!(v["endpoints"][0]["url"], url, "{v:#}");
    assert!(
        v["endpoints"][0]["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == server_addr.as_str())),
        "{v:#}"
    );
    assert!(v["namespaces"]["served"].as_u64() >= Some(1), "{v:#}");
    let policy_file = rig.agent.policy_path(0).display().to_string();
    assert_eq!(v["policies"][0]["file"], policy_file, "{v:#}");
    assert_eq!(
        v["policies"][0]["sha256"],
        sha256_hex(POLICY.as_bytes()),
        "{v:#}"
    );
    let counter = v["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["counter"] == "scan_rate"))
        .unwrap_or_else(|| panic!("no scan_rate counter: {v:#}"))
        .clone();
    assert_eq!(
        (counter["used"].as_f64(), counter["max"].as_f64()),
        (Some(3.0), Some(10.0)),
        "{counter}"
    );
    assert_eq!(counter["scope"], "grant", "{counter}");
    assert_eq!(v["audit"]["sink"], "file", "{v:#}");
    assert!(v["audit"]["records_written"].as_u64() > Some(0), "{v:#}");
    assert!(
        v["traffic"]["calls"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["tool"] == "start_security_scan"
                && c["decision"] == "allow"
                && c["count"] == 3)),
        "{v:#}"
    );

    let out = cli(&["status", "--admin-socket", &socket_arg]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "ready:      yes",
        "scan_rate",
        &policy_file,
        "mcpw_connect4",
        &server_addr,
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }

    // Explained against the live counters, twice: neither counts.
    for _ in 0..2 {
        let out = cli(&[
            "policy",
            "explain",
            "--live",
            "--admin-socket",
            &socket_arg,
            "--tool",
            "start_security_scan",
            "--args",
            r#"{"cluster":"q"}"#,
            "--format",
            "json",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let e: Value = serde_json::from_slice(&out.stdout).expect("explanation JSON");
        assert_eq!(e["decision"], "allow", "{e}");
        assert_eq!(e["policy"]["file"], policy_file, "{e}");
    }
    let v = status_json(&socket);
    let used = v["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["counter"] == "scan_rate"))
        .and_then(|c| c["used"].as_f64());
    assert_eq!(used, Some(3.0), "explaining counted: {v:#}");

    // Reload: nothing changed; then a bad file (the previous policy stays, exit 1, file:line:col).
    let out = cli(&["reload", "--admin-socket", &socket_arg]);
    assert!(out.status.success(), "{}", describe(&out));
    std::fs::write(
        rig.agent.policy_path(0),
        "{\n  \"version\": \"1\",\n  \"tools\": [\n}\n",
    )
    .expect("write");
    let out = cli(&["reload", "--admin-socket", &socket_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{policy_file}:")),
        "{}",
        describe(&out)
    );
    let v = status_json(&socket);
    assert_eq!(
        v["policies"][0]["sha256"],
        sha256_hex(POLICY.as_bytes()),
        "{v:#}"
    );
}

/// (174) Across a hand-over, the metrics listener goes with the interceptor's: the successor
/// serves the same port (no second bind), the old agent reports not ready while it drains and
/// stops accepting on it; the admin socket path answers with the successor.
#[test]
fn the_metrics_listener_and_admin_socket_follow_a_hand_over() {
    let port = mcpwarden_tests::free_port(std::net::Ipv4Addr::LOCALHOST);
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    // Outside the first agent's temp dir, which goes with its guard.
    let dir = mcpwarden_tests::TempDir::new("opshandover-admin");
    let socket = dir.path().join("admin.sock");
    let rig = Rig::start_with(
        "opshandover",
        174,
        POLICY,
        &[
            "--metrics-listen".into(),
            metrics.to_string(),
            "--drain-seconds".into(),
            "5".into(),
            "--admin-socket".into(),
            socket.display().to_string(),
        ],
    );
    assert_eq!(rig.agent.metrics_addr(), metrics);
    assert_eq!(http(metrics, "GET", "/readyz").0, 200);
    let old_pid = rig.agent.pid().unwrap_or(0);
    let next = rig.agent.start_successor("opshandover-next");
    assert_eq!(next.metrics_addr(), metrics, "{}", next.log());
    let new_pid = next.pid().unwrap_or(0);
    // The old agent stops accepting once the successor is ready: every scrape from now on is
    // the successor's.
    for _ in 0..20 {
        let (status, body) = http(metrics, "GET", "/readyz");
        assert_eq!(status, 200, "{body}");
    }
    let v = status_json(&next.admin_socket());
    assert_eq!(v["agent"]["pid"], new_pid, "{v:#}");
    assert_ne!(new_pid, old_pid);
    let old_log = rig.agent.log();
    assert!(
        !old_log.contains("metrics listener accept failed"),
        "{old_log}"
    );
    // Only the old agent: the rig's cgroup holds the successor too.
    let Rig {
        agent, server, cg, ..
    } = rig;
    drop(agent);
    // The old agent is gone; the successor still serves both.
    assert_eq!(http(metrics, "GET", "/healthz").0, 200);
    let v = status_json(&next.admin_socket());
    assert_eq!(v["agent"]["pid"], new_pid, "{v:#}");
    drop(next);
    drop(server);
    drop(cg);
}

/// (175) A bounded loopback load: 50 clients × 1,000 calls, every call answered, and the audit
/// file holds exactly one decision record (`request`, allow) and one `response` per call, each
/// call by its id: no record lost.
#[test]
fn every_call_of_a_50000_call_load_has_its_decision_record() {
    let rig = Rig::start("load50k", 175, POLICY);
    let url = rig.server.url();
    let run = mcpwarden_tests::run_client(
        CLIENT_BIN,
        Some(&rig.app),
        &["load", &url, "50", "1000"],
        Duration::from_secs(600),
    );
    run.assert_success();
    assert!(
        run.stdout_text().contains("ok=50000 failed=0"),
        "{}",
        run.describe()
    );
    // Responses are deferred by at most a few milliseconds.
    std::thread::sleep(Duration::from_millis(200));
    let text = rig.agent.audit_text();
    let mut requests = HashSet::new();
    let mut responses = HashSet::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if r["tool"] != "echo" {
            continue;
        }
        let id = r["id"].as_u64().expect("a numeric id");
        match r["event"].as_str() {
            Some("request") => {
                assert_eq!(r["decision"], "allow", "{r}");
                assert!(requests.insert(id), "two decision records for call {id}");
            }
            Some("response") => {
                assert!(responses.insert(id), "two response records for call {id}");
            }
            _ => {}
        }
    }
    assert_eq!(requests.len(), 50_000);
    assert_eq!(responses.len(), 50_000);
    let (_, metrics) = http(rig.agent.metrics_addr(), "GET", "/metrics");
    let server = format!("{}:{}", rig.ip, rig.server.addr().port());
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "mcpwarden_calls_total{{server=\"{server}\",tool=\"echo\",decision=\"allow\"}}"
            )
        ),
        Some(50_000.0),
        "{metrics}"
    );
}
