//! Approvals (test indices 190–194): calls held by `action: require_approval`, decided with
//! `mcpwarden approvals` against a running agent by real clients (rmcp), refused when the
//! approver is the caller's own workload, given up when the client goes, bounded per caller,
//! decided again after a reload; and approval by the client's user inside the 2026-07-28
//! protocol, with the official Python SDK (accepting, declining) and with raw requests
//! (a replayed, a forged and a changed-arguments retry).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::peer_rig::PeerRig;
use common::*;
use mcpwarden_tests::client::{run_client, ClientRun};
use mcpwarden_tests::{wait_for, PeerOpts};
use serde_json::{json, Value};

/// `mcpwarden ARGS... --admin-socket SOCKET`, as root, from the test's own cgroup.
fn cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(AGENT_BIN)
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
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

fn pending(socket: &Path) -> Vec<Value> {
    let out = cli(socket, &["approvals", "list", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

/// Waits until a call of `tool` is held; its summary.
fn wait_pending(socket: &Path, tool: &str) -> Value {
    wait_for(Duration::from_secs(15), || {
        pending(socket).into_iter().find(|s| s["tool"] == tool)
    })
    .unwrap_or_else(|| panic!("no pending approval for {tool}: {:?}", pending(socket)))
}

/// `mcp-client call URL TOOL ARGS` in the attached cgroup, on a thread of its own: the test
/// decides the held call meanwhile.
fn call_in_thread(rig: &Rig, tool: &str, args: &str) -> thread::JoinHandle<ClientRun> {
    let (app, url) = (rig.app.clone(), rig.server.url());
    let (tool, args) = (tool.to_owned(), args.to_owned());
    thread::spawn(move || {
        run_client(
            CLIENT_BIN,
            Some(&app),
            &["call", &url, &tool, &args],
            CLIENT_TIMEOUT,
        )
    })
}

fn approval_steps(rig_audit: &[Value], tool: &str) -> Vec<String> {
    rig_audit
        .iter()
        .filter(|r| r["event"] == "approval" && r["tool"] == tool)
        .map(|r| r["approval"]["step"].as_str().unwrap_or("").to_owned())
        .collect()
}

const OPERATOR_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {"action": "require_approval", "reason": "a human reads every echo",
             "approval": {"timeout": "30s", "show_arguments": true}},
    "add": {"action": "require_approval", "approval": {"timeout": "2s"}},
    "start_security_scan": {"action": "require_approval"},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

/// (190) Approve (with --for), deny, time out, an unknown id: each through the CLI against a
/// running agent, the client an rmcp client that only waits. Nothing refused reaches the
/// server; every step is audited with who decided.
#[test]
fn an_operator_approves_denies_and_lets_time_out() {
    let rig = Rig::start("approve-cli", 190, OPERATOR_POLICY);
    let socket = rig.agent.admin_socket();
    let url = rig.server.url();

    // Held, listed with what the approver needs, approved with --for.
    let held = call_in_thread(&rig, "echo", r#"{"text":"hi"}"#);
    let s = wait_pending(&socket, "echo");
    assert_eq!(s["arg_keys"], json!(["text"]), "{s}");
    assert_eq!(s["arguments"], json!({"text": "hi"}), "show_arguments: {s}");
    assert_eq!(s["reason"], "a human reads every echo", "{s}");
    assert_eq!(s["rule"], "/tools/echo/action", "{s}");
    assert!(s["expires_in_s"].as_u64().is_some_and(|t| t <= 30), "{s}");
    assert!(
        s["caller"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&rig.app_rel())),
        "{s}"
    );
    assert_eq!(rig.server.calls("echo"), 0, "held: not forwarded");
    let text = String::from_utf8_lossy(&cli(&socket, &["approvals", "list"]).stdout).into_owned();
    assert!(
        text.contains(s["id"].as_str().unwrap_or("?")) && text.contains("echo"),
        "{text}"
    );
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let out = cli(
        &socket,
        &[
            "approvals",
            "approve",
            &id,
            "--reason",
            "ticket 42",
            "--as",
            "alice",
            "--for",
            "10m",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let run = held.join().expect("client thread");
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "hi",
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("echo"), 1);
    // Decided: a second decision finds nothing.
    let again = cli(&socket, &["approvals", "deny", &id]);
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no pending approval"),
        "{}",
        describe(&again)
    );

    // --for 10m: the next echo of this caller goes through without asking.
    let run = rig.client(&["call", &url, "echo", r#"{"text":"again"}"#]);
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "again",
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("echo"), 2);

    // A rule timeout of 2 s: refused with the reason, never forwarded.
    let started = Instant::now();
    let run = rig.client(&["call", &url, "add", r#"{"a":1,"b":2}"#]);
    let line = &run.json_lines()[0];
    assert!(is_error_result(line), "{}", run.describe());
    assert!(
        result_text(line).contains("approval timed out"),
        "{}",
        run.describe()
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(rig.server.calls("add"), 0);

    // Denied with a reason: the client reads who and why.
    let held = call_in_thread(&rig, "start_security_scan", r#"{"cluster":"prod"}"#);
    let s = wait_pending(&socket, "start_security_scan");
    assert!(
        s.get("arguments").is_none(),
        "values only with show_arguments: {s}"
    );
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let out = cli(
        &socket,
        &[
            "approvals",
            "deny",
            &id,
            "--reason",
            "not today",
            "--as",
            "bob",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let run = held.join().expect("client thread");
    let line = &run.json_lines()[0];
    assert!(is_error_result(line), "{}", run.describe());
    assert!(
        result_text(line).contains("approval denied by bob (uid 0): not today"),
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("start_security_scan"), 0);

    // Audited: every step, with who decided and for how long.
    let audit = rig.agent.audit_lines();
    assert_eq!(
        approval_steps(&audit, "echo"),
        ["requested", "approved", "remembered"],
        "{}",
        rig.agent.audit_text()
    );
    let approved = audit
        .iter()
        .find(|r| r["event"] == "approval" && r["approval"]["step"] == "approved")
        .cloned()
        .unwrap_or_default();
    assert_eq!(approved["approval"]["by"]["via"], "cli", "{approved}");
    assert_eq!(approved["approval"]["by"]["uid"], 0, "{approved}");
    assert_eq!(
        approved["approval"]["by"]["claimed_as"], "alice",
        "{approved}"
    );
    assert_eq!(approved["approval"]["remember_s"], 600, "{approved}");
    assert_eq!(approved["reason"], "ticket 42", "{approved}");
    assert_eq!(approval_steps(&audit, "add"), ["requested", "timed_out"]);
    assert_eq!(
        approval_steps(&audit, "start_security_scan"),
        ["requested", "denied"]
    );
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|r| r["event"] == "refused" && r["tool"] == "add")
        .collect();
    assert_eq!(refused.len(), 1, "{}", rig.agent.audit_text());
    assert_eq!(refused[0]["decision"], "require_approval");
    assert_eq!(refused[0]["reason"], "approval timed out");
    let forwarded = audit
        .iter()
        .filter(|r| r["event"] == "request" && r["tool"] == "echo")
        .count();
    assert_eq!(forwarded, 2, "{}", rig.agent.audit_text());

    // Counted from the same records.
    let metrics = format!("http://{}/metrics", rig.agent.metrics_addr());
    let text =
        match mcpwarden_tests::rawhttp::request("GET", &metrics, b"", &[], Duration::from_secs(10))
        {
            mcpwarden_tests::rawhttp::RawOutcome::Response(r) => {
                String::from_utf8_lossy(&r.body).into_owned()
            }
            mcpwarden_tests::rawhttp::RawOutcome::NoResponse { reason, .. } => panic!("{reason}"),
        };
    for (series, n) in [
        ("mcpwarden_approvals_total{step=\"requested\"}", 3),
        ("mcpwarden_approvals_total{step=\"approved\"}", 1),
        ("mcpwarden_approvals_total{step=\"remembered\"}", 1),
        ("mcpwarden_approvals_total{step=\"timed_out\"}", 1),
        ("mcpwarden_approvals_total{step=\"denied\"}", 1),
        ("mcpwarden_approvals_pending", 0),
    ] {
        assert!(
            text.lines().any(|l| l == format!("{series} {n}")),
            "{series} {n}:\n{text}"
        );
    }
    mcpwarden_tests::schema::assert_audit_file_matches_schema(rig.agent.audit_path());
}

/// Runs `mcpwarden ARGS` inside the cgroup `cg` (joined before exec).
fn cli_in_cgroup(cg: &Path, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = format!(
        "echo $$ > {}/cgroup.procs && exec {AGENT_BIN}",
        cg.display()
    );
    for a in args {
        cmd.push_str(&format!(" '{a}'"));
    }
    cmd.push_str(&format!(" --admin-socket '{}'", socket.display()));
    Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .expect("run the CLI in a cgroup")
}

/// (191) A workload cannot approve its own call: an approver in the caller's cgroup is refused
/// (403, audited as `refused`) and the call stays held; a client that goes gives its approval
/// up (nothing forwarded, audited `abandoned`, a late approval finds nothing); the per-caller
/// bound refuses the fifth held call; an approval given after a reload is decided against the
/// new policy.
#[test]
fn self_approval_abandonment_bounds_and_reload() {
    let rig = Rig::start("approve-edge", 191, OPERATOR_POLICY);
    let socket = rig.agent.admin_socket();
    let url = rig.server.url();

    // Self-approval, from the caller's own cgroup.
    let held = call_in_thread(&rig, "echo", r#"{"text":"mine"}"#);
    let s = wait_pending(&socket, "echo");
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let out = cli_in_cgroup(&rig.app, &socket, &["approvals", "approve", &id]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must not approve itself"),
        "{}",
        describe(&out)
    );
    assert_eq!(pending(&socket).len(), 1, "still held");
    assert_eq!(rig.server.calls("echo"), 0);
    let refused = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "approval" && r["approval"]["step"] == "refused"
        })
        .unwrap_or_else(|| panic!("no refused approver record\n{}", rig.agent.audit_text()));
    assert_eq!(refused["approval"]["id"], id.as_str(), "{refused}");
    assert_eq!(refused["tool"], "echo", "{refused}");
    let requested = rig
        .agent
        .audit_lines()
        .into_iter()
        .find(|r| r["event"] == "approval" && r["approval"]["step"] == "requested")
        .unwrap_or_default();
    assert!(requested["server"].is_string(), "{requested}");
    assert_eq!(refused["server"], requested["server"], "{refused}");
    assert_eq!(refused["approval"]["by"]["via"], "cli", "{refused}");

    // Re-decided after a reload: echo is now denied, and the approval cannot override it.
    let changed = OPERATOR_POLICY.replace(
        r#""echo": {"action": "require_approval", "reason": "a human reads every echo",
             "approval": {"timeout": "30s", "show_arguments": true}}"#,
        r#""echo": {"action": "deny", "reason": "echo is retired"}"#,
    );
    assert_ne!(changed, OPERATOR_POLICY);
    std::fs::write(rig.agent.policy_path(0), &changed).expect("rewrite the policy");
    let out = cli(&socket, &["reload"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = cli(&socket, &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    let run = held.join().expect("client thread");
    let line = &run.json_lines()[0];
    assert!(is_error_result(line), "{}", run.describe());
    assert!(
        result_text(line).contains("echo is retired"),
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("echo"), 0);
    std::fs::write(rig.agent.policy_path(0), OPERATOR_POLICY).expect("restore the policy");
    let out = cli(&socket, &["reload"]);
    assert!(out.status.success(), "{}", describe(&out));

    // A client that goes: killed while its call is held.
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.args(["call", &url, "start_security_scan", r#"{"cluster":"a"}"#])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    mcpwarden_tests::spawn_in_cgroup(&mut cmd, &rig.app);
    let mut child = cmd.spawn().expect("spawn the client");
    wait_pending(&socket, "start_security_scan");
    child.kill().expect("kill the client");
    let _ = child.wait();
    let abandoned = rig
        .agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "approval"
                && r["tool"] == "start_security_scan"
                && r["approval"]["step"] == "abandoned"
        })
        .unwrap_or_else(|| panic!("no abandoned record\n{}", rig.agent.audit_text()));
    let gone_id = abandoned["approval"]["id"].as_str().unwrap_or_default();
    assert!(pending(&socket).is_empty(), "{:?}", pending(&socket));
    let late = cli(&socket, &["approvals", "approve", gone_id]);
    assert!(!late.status.success(), "{}", describe(&late));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rig.server.calls("start_security_scan"),
        0,
        "abandoned: never forwarded"
    );

    // At most 4 held per caller (the default): the fifth is refused at once.
    let clients: Vec<_> = (0..4)
        .map(|i| {
            call_in_thread(
                &rig,
                "start_security_scan",
                &format!(r#"{{"cluster":"c{i}"}}"#),
            )
        })
        .collect();
    let four = wait_for(Duration::from_secs(15), || {
        let p = pending(&socket);
        (p.len() == 4).then_some(p)
    })
    .unwrap_or_else(|| panic!("four held: {:?}", pending(&socket)));
    let run = rig.client(&["call", &url, "start_security_scan", r#"{"cluster":"c5"}"#]);
    let line = &run.json_lines()[0];
    assert!(
        result_text(line).contains("max_pending_per_caller"),
        "{}",
        run.describe()
    );
    for s in &four {
        let out = cli(
            &socket,
            &["approvals", "deny", s["id"].as_str().unwrap_or("?")],
        );
        assert!(out.status.success(), "{}", describe(&out));
    }
    for c in clients {
        let run = c.join().expect("client thread");
        assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    }
    assert_eq!(rig.server.calls("start_security_scan"), 0);
    // Every record of these steps (the refused approver's too) is a record of the schema.
    mcpwarden_tests::schema::assert_audit_file_matches_schema(rig.agent.audit_path());
}

/// The Python SDK's venv, made by `cargo xtask setup`.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let py = target.join("venv-mcp/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the MCP Python SDK)",
        py.display()
    );
    py
}

/// `approval_client.py URL TOOL ARGS MODE` inside the attached cgroup: its one JSON line.
fn python_client(rig: &PeerRig, tool: &str, args: &str, mode: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/approval_client.py");
    let py = python();
    let mut cmd = format!(
        "echo $$ > {}/cgroup.procs && exec {} {}",
        rig.app.display(),
        py.display(),
        script.display()
    );
    for a in [rig.url("/mcp26").as_str(), tool, args, mode] {
        cmd.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .expect("run the Python client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON line from the Python client: {}", describe(&out)))
}

const USER_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {"action": "require_approval", "approval": {"mode": "user", "timeout": "2s"}},
    "add": {}
  }
}"#;

/// (192) `approval: user` with the official Python SDK speaking 2026-07-28: a user who accepts
/// gets the call run once; one who declines gets a refusal and the server never sees it; a
/// client that declared no elicitation falls back to operator approval (here: timed out).
#[test]
fn the_clients_user_approves_inside_the_protocol() {
    let rig = PeerRig::start("approve-user", 192, USER_POLICY, PeerOpts::default());
    let accepted = python_client(&rig, "echo", r#"{"text":"approved"}"#, "accept");
    assert_eq!(accepted["ok"], true, "{accepted}");
    assert_eq!(accepted["is_error"], false, "{accepted}");
    assert_eq!(accepted["elicitations"], 1, "{accepted}");
    assert!(
        accepted["messages"][0]
            .as_str()
            .is_some_and(|m| m.contains("echo") && m.contains("approved")),
        "{accepted}"
    );
    assert_eq!(rig.peer.calls("echo"), 1, "{accepted}");

    let declined = python_client(&rig, "echo", r#"{"text":"no"}"#, "decline");
    assert_eq!(declined["is_error"], true, "{declined}");
    assert!(
        declined["text"]
            .as_str()
            .is_some_and(|t| t.contains("declined")),
        "{declined}"
    );
    assert_eq!(rig.peer.calls("echo"), 1, "declined: never forwarded");

    let fallback = python_client(&rig, "echo", r#"{"text":"op"}"#, "none");
    assert_eq!(fallback["elicitations"], 0, "{fallback}");
    assert!(
        fallback["text"]
            .as_str()
            .is_some_and(|t| t.contains("approval timed out")),
        "operator approval, which nobody gave: {fallback}"
    );
    assert_eq!(rig.peer.calls("echo"), 1);

    let audit = rig.agent.audit_lines();
    let modes: Vec<(String, String)> = audit
        .iter()
        .filter(|r| r["event"] == "approval")
        .map(|r| {
            (
                r["approval"]["mode"].as_str().unwrap_or("").to_owned(),
                r["approval"]["step"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("user", "requested"),
        ("user", "approved"),
        ("user", "requested"),
        ("user", "denied"),
        ("operator", "requested"),
        ("operator", "timed_out"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(modes, want, "{}", rig.agent.audit_text());
    mcpwarden_tests::schema::assert_audit_file_matches_schema(rig.agent.audit_path());
}

/// A 2026-07-28 tools/call of `echo` with `extra` merged into its params.
fn call26(id: u64, text: &str, extra: Value) -> String {
    let mut params = json!({
        "name": "echo",
        "arguments": {"text": text},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}
        }
    });
    if let (Some(p), Value::Object(more)) = (params.as_object_mut(), extra) {
        p.extend(more);
    }
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}).to_string()
}

fn step26(url: &str, body: String) -> Value {
    json!({"op": "request", "url": url, "body": body, "headers": [
        ["mcp-protocol-version", "2026-07-28"], ["mcp-method", "tools/call"], ["mcp-name", "echo"]
    ]})
}

/// (193) The signed state, attacked with raw requests: a replayed state, changed arguments on
/// the retry, a forged state and a declined answer are refused and never reach the server;
/// only the accepted retry of the same call does, once.
#[test]
fn the_user_approval_state_cannot_be_replayed_forged_or_moved() {
    let rig = PeerRig::start("approve-state", 193, USER_POLICY, PeerOpts::default());
    let url = rig.url("/mcp26");
    let yes = json!({"mcpwarden_approval": {"action": "accept", "content": {"approve": true}}});
    let mut first = step26(&url, call26(1, "one", json!({})));
    first["save"] = json!({"rs": "/json/result/requestState"});
    let mut second = step26(&url, call26(3, "two", json!({})));
    second["save"] = json!({"rs2": "/json/result/requestState"});
    let run = rig.script(json!([
        first,
        step26(
            &url,
            call26(
                2,
                "one",
                json!({"requestState": "$var:rs", "inputResponses": yes})
            )
        ),
        step26(
            &url,
            call26(
                4,
                "one",
                json!({"requestState": "$var:rs", "inputResponses": yes})
            )
        ),
        second,
        step26(
            &url,
            call26(
                5,
                "TWO",
                json!({"requestState": "$var:rs2", "inputResponses": yes})
            )
        ),
        step26(
            &url,
            call26(
                6,
                "two",
                json!({"requestState": "mcpw1.e30.AAAA", "inputResponses": yes})
            )
        ),
        step26(
            &url,
            call26(
                7,
                "two",
                json!({"requestState": "$var:rs2",
            "inputResponses": {"mcpwarden_approval": {"action": "decline"}}})
            )
        ),
    ]));
    let result = |i: usize| run.step(i)["json"]["result"].clone();
    assert_eq!(result(0)["resultType"], "input_required", "{}", run.step(0));
    assert!(
        result(0)["inputRequests"]["mcpwarden_approval"]["method"] == "elicitation/create",
        "{}",
        run.step(0)
    );
    assert_eq!(result(1)["isError"], false, "accepted: {}", run.step(1));
    assert!(result(1)["content"][0]["text"]
        .as_str()
        .is_some_and(|t| t.contains("one")));
    let refused = |i: usize, words: &str| {
        let r = result(i);
        assert_eq!(r["isError"], true, "step {i}: {}", run.step(i));
        assert!(
            r["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains(words)),
            "step {i} wants {words:?}: {}",
            run.step(i)
        );
    };
    refused(2, "already used");
    refused(4, "arguments changed");
    refused(5, "not made by this agent");
    // rs2 was spent by the changed-arguments attempt? No: a mismatch does not spend it, so the
    // decline is what spends it.
    refused(6, "declined");
    assert_eq!(rig.peer.calls("echo"), 1, "only the accepted retry ran");
}

/// (194) A call held when a new agent takes over: the old agent keeps it while it drains
/// (the drain lasts at least the approval's timeout), `mcpwarden approvals` on the usual path
/// lists it from the draining agent's socket and approves it there; the successor holds the
/// next call itself.
#[test]
fn a_held_call_survives_a_hand_over() {
    let rig = Rig::start_with(
        "approve-handover",
        194,
        OPERATOR_POLICY,
        &["--drain-seconds".to_owned(), "1".to_owned()],
    );
    let socket = rig.agent.admin_socket();
    let held = call_in_thread(&rig, "echo", r#"{"text":"across"}"#);
    let s = wait_pending(&socket, "echo");
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let next = rig.agent.start_successor("approve-handover-next");
    // The drain outlasts its 1 s: the held call is still there, served by the old agent.
    thread::sleep(Duration::from_secs(2));
    let listed = pending(&next.admin_socket());
    assert!(
        listed.iter().any(|p| p["id"] == id.as_str()),
        "{listed:?}\nold agent:\n{}",
        rig.agent.log()
    );
    let out = cli(
        &next.admin_socket(),
        &["approvals", "approve", &id, "--as", "carol"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let run = held.join().expect("client thread");
    run.assert_success();
    assert_eq!(
        result_text(&run.json_lines()[0]),
        "across",
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("echo"), 1);
    drop(next);
}

/// (195) A Streamable HTTP client that sent a progress token and reads SSE hears, while its
/// call is held, a progress notification every 5 s, then the answer on the same stream; one
/// that stops reading gives its approval up.
#[test]
fn a_held_call_reports_progress_on_its_stream() {
    let rig = Rig::start("approve-progress", 195, OPERATOR_POLICY);
    let socket = rig.agent.admin_socket();
    let url = rig.server.url();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "slowly"}, "_meta": {"progressToken": "p1"}}})
    .to_string();
    let held = {
        let (app, url, body) = (rig.app.clone(), url.clone(), body.clone());
        thread::spawn(move || {
            mcpwarden_tests::script::run_script(
                CLIENT_BIN,
                Some(&app),
                &json!({"steps": [{"op": "request", "url": url, "body": body, "until_id": 1,
                                   "timeout_ms": 30000}]}),
                CLIENT_TIMEOUT,
            )
        })
    };
    let s = wait_pending(&socket, "echo");
    thread::sleep(Duration::from_millis(6500));
    let out = cli(
        &socket,
        &["approvals", "approve", s["id"].as_str().unwrap_or("?")],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let run = held.join().expect("script thread");
    let step = run.step(0);
    assert_eq!(step["status"], 200, "{step}");
    assert!(
        step["headers"]["content-type"]
            .as_str()
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{step}"
    );
    let messages = common::peer_rig::event_messages(step);
    let progress: Vec<&Value> = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert!(!progress.is_empty(), "{step}");
    assert_eq!(progress[0]["params"]["progressToken"], "p1", "{step}");
    let answer = messages
        .iter()
        .find(|m| m["id"] == 1)
        .unwrap_or_else(|| panic!("no answer on the stream: {step}"));
    assert_eq!(answer["result"]["content"][0]["text"], "slowly", "{step}");
    assert_eq!(rig.server.calls("echo"), 1);

    // A reader that stops: the script's 2 s deadline closes its connection.
    let run = mcpwarden_tests::script::run_script(
        CLIENT_BIN,
        Some(&rig.app),
        &json!({"steps": [{"op": "request", "url": url, "body": body.replace("slowly", "never"),
                           "until_id": 1, "timeout_ms": 2000}]}),
        CLIENT_TIMEOUT,
    );
    assert_eq!(run.step(0)["timeout"], true, "{}", run.step(0));
    rig.agent
        .wait_audit(AUDIT_WAIT, |r| {
            r["event"] == "approval" && r["approval"]["step"] == "abandoned"
        })
        .unwrap_or_else(|| panic!("no abandoned record\n{}", rig.agent.audit_text()));
    assert!(pending(&socket).is_empty());
    assert_eq!(rig.server.calls("echo"), 1, "the abandoned call never ran");
}
