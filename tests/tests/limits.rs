//! The rows of the README's limits table, each pushed past by a client in the attached cgroup
//! (tests/lenient/python/limits_client.py, or `mcp-client script`), in front of the raw MCP
//! peer: the client over a limit gets its error, the agent writes its record (once a second
//! for floods), and a normal client's calls go on. Two agents with small limits, one per test
//! (addresses 127.0.0.134–135).

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AGENT_BIN, AUDIT_WAIT, CLIENT_BIN, CLIENT_TIMEOUT};
use mcpwarden_tests::script::run_script;
use mcpwarden_tests::{
    free_addr, require_root, spawn_in_cgroup, test_ip, Agent, AgentOpts, McpPeer, PeerOpts,
    TempDir, TestCgroup,
};
use serde_json::{json, Value};

const POLICY: &str = r#"{"version": "1", "default": "deny", "tools": {"echo": {}}}"#;

struct Rig {
    agent: Agent,
    peer: McpPeer,
    cg: TestCgroup,
    app: PathBuf,
    _dir: TempDir,
}

impl Rig {
    fn start(name: &str, index: u8, limits: &str) -> Rig {
        Self::start_with(name, index, &format!("limits:\n{limits}"), &[])
    }

    /// With a whole config file and more agent arguments.
    fn start_with(name: &str, index: u8, config_text: &str, extra: &[String]) -> Rig {
        Self::start_limited(name, index, config_text, extra, None)
    }

    fn start_limited(
        name: &str,
        index: u8,
        config_text: &str,
        extra: &[String],
        nofile: Option<u64>,
    ) -> Rig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let ip = test_ip(index);
        let peer = McpPeer::start_with(SocketAddr::new(IpAddr::V4(ip), 0), PeerOpts::default());
        let dir = TempDir::new(name);
        let config = dir.path().join("limits.yaml");
        std::fs::write(&config, config_text).expect("writing the config");
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend(extra.iter().cloned());
        let agent = Agent::start_limited(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: vec![(peer.url("/mcp"), POLICY.to_string())],
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: cg.path().join("agent"),
            },
            &args,
            nofile,
        );
        Rig {
            agent,
            peer,
            cg,
            app,
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        self.peer.addr().to_string()
    }

    /// The limits client, started in `cgroup` (below the attach point).
    fn python(&self, cgroup: &Path, args: &[&str]) -> std::process::Child {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lenient/python/limits_client.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn_in_cgroup(&mut cmd, cgroup);
        cmd.spawn()
            .expect("python3 (cargo xtask setup installs it)")
    }

    /// Run the limits client to its end; its JSON output and pid.
    fn python_out(&self, cgroup: &Path, args: &[&str]) -> (Value, u32) {
        let child = self.python(cgroup, args);
        let pid = child.id();
        let out = child.wait_with_output().expect("waiting for python3");
        let text = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "limits_client {args:?}: {e}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (value, pid)
    }

    /// One `mcp-client script` request step's response.
    fn one(&self, step: Value) -> (Value, u32) {
        let run = run_script(
            CLIENT_BIN,
            Some(&self.app),
            &json!({"steps": [step]}),
            CLIENT_TIMEOUT,
        );
        (
            run.steps.first().cloned().unwrap_or(Value::Null),
            run.run.pid,
        )
    }

    fn echo(&self) -> u64 {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": "echo", "arguments": {"text": "hi"}}});
        let (resp, _) = self
            .one(json!({"op": "request", "url": self.peer.url("/mcp"), "body": body.to_string()}));
        resp["status"].as_u64().unwrap_or(0)
    }

    fn refusals(&self, pid: u32, reason_part: &str) -> Vec<Value> {
        self.agent
            .audit_lines()
            .into_iter()
            .filter(|r| {
                r["pid"] == pid
                    && r["event"] == "refused"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|s| s.contains(reason_part))
            })
            .collect()
    }

    fn wait_refusal(&self, pid: u32, reason_part: &str) -> Value {
        let found = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
            self.refusals(pid, reason_part).into_iter().next()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no refused record with {reason_part:?} for pid {pid}:\n{}",
                self.agent.audit_text()
            )
        })
    }
}

#[test]
fn time_and_size_limits() {
    let rig = Rig::start(
        "limits-time",
        124,
        "  header_read_timeout_ms: 1000\n  idle_timeout_ms: 3000\n  body_read_timeout_ms: 1000\n  \
         max_connections_per_caller: 400\n  max_batch: 3\n  max_buffered_bytes_per_connection: 2048\n  max_buffered_answer_bytes_per_worker: 1000\n",
    );
    let addr = rig.addr();

    // Slowloris: 200 connections sending their heads a byte every 150 ms are cut at the head
    // deadline; meanwhile a normal client's calls go through.
    let started = Instant::now();
    let slow = rig.python(&rig.app, &["slowloris", &addr, "200", "150", "6"]);
    let slow_pid = slow.id();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        assert_eq!(rig.echo(), 200, "call {i} during the slowloris");
    }
    let out = slow.wait_with_output().expect("slowloris");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "slowloris output: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let closed = result["closed_after_ms"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(closed.len(), 200);
    for (i, c) in closed.iter().enumerate() {
        let ms = c
            .as_u64()
            .unwrap_or_else(|| panic!("connection {i} was never closed: {result}"));
        assert!(
            (800..=4000).contains(&ms),
            "connection {i} closed after {ms} ms"
        );
    }
    println!(
        "slowloris: 200 connections cut, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    rig.wait_refusal(slow_pid, "header_read_timeout_ms");
    let records = rig.refusals(slow_pid, "header_read_timeout_ms");
    let counted: u64 = records
        .iter()
        .map(|r| 1 + r["repeats"].as_u64().unwrap_or(0))
        .sum();
    // Written once a second: a few records, not 200; the last window may still be unwritten.
    assert!(
        records.len() <= 6,
        "{} records for one flood",
        records.len()
    );
    assert!(counted >= 1 && counted <= 200, "{counted}");

    // An idle keep-alive connection outlives the head deadline, and is closed after the idle
    // timeout; an idle SSE stream (a request in flight) outlives both.
    let (idle, _) = rig.python_out(&rig.app, &["idle", &addr, "2000"]);
    assert_eq!(
        idle,
        json!({"first": 200, "second": 200, "open": true}),
        "idle 2 s"
    );
    let (idle, _) = rig.python_out(&rig.app, &["idle", &addr, "4500"]);
    assert_eq!(idle["first"], 200);
    assert_eq!(
        idle["second"], 0,
        "closed after the 3 s idle timeout: {idle}"
    );
    let (sse, _) = rig.python_out(&rig.app, &["sse", &addr, "4500"]);
    assert_eq!(
        sse,
        json!({"endpoint": true, "open": true}),
        "the SSE stream stays open"
    );

    // A body that stops arriving: 408 after the body timeout, audited.
    let (stall, pid) = rig.python_out(&rig.app, &["stall_body", &addr]);
    assert_eq!(stall["status"], 408, "{stall}");
    assert!(stall["after_ms"].as_u64().unwrap_or(0) >= 900, "{stall}");
    rig.wait_refusal(pid, "body_read_timeout_ms");

    // A batch longer than max_batch: 413 with a JSON-RPC error, nothing forwarded.
    let before = rig.peer.requests().len();
    let batch: Vec<Value> = (0..4)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
        .collect();
    let (resp, pid) = rig.one(
        json!({"op": "request", "url": rig.peer.url("/mcp"), "body": json!(batch).to_string()}),
    );
    assert_eq!(resp["status"], 413, "{resp}");
    assert_eq!(resp["json"]["error"]["code"], -32600, "{resp}");
    rig.wait_refusal(pid, "limits.max_batch");
    assert_eq!(
        rig.peer.requests().len(),
        before,
        "the long batch was not forwarded"
    );

    // Within max_batch: the notifications share one record, the request has its own.
    let batch = json!([
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 2}},
        {"jsonrpc": "2.0", "id": 9, "method": "ping"}
    ]);
    let (resp, pid) =
        rig.one(json!({"op": "request", "url": rig.peer.url("/mcp"), "body": batch.to_string()}));
    assert_eq!(resp["status"], 200, "{resp}");
    let mine = |pred: &dyn Fn(&Value) -> bool| {
        rig.agent
            .audit_lines()
            .into_iter()
            .filter(|r| r["pid"] == pid && pred(r))
            .count()
    };
    assert_eq!(
        mine(&|r| r["aggregated"]
            == json!({"notifications": 2, "responses": 0, "methods": ["notifications/progress"]})),
        1,
        "one record for both notifications"
    );
    assert_eq!(
        mine(&|r| r["event"] == "request" && r["method"] == "ping"),
        1
    );
    assert_eq!(
        mine(&|r| r["event"] == "request" && r["method"] == "notifications/progress"),
        0
    );

    // A body beyond what one connection may buffer: 503, nothing forwarded.
    let before = rig.peer.requests().len();
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "echo", "arguments": {"text": "x".repeat(3000)}}});
    let (resp, pid) =
        rig.one(json!({"op": "request", "url": rig.peer.url("/mcp"), "body": big.to_string()}));
    assert_eq!(resp["status"], 503, "{resp}");
    assert!(resp["json"]["error"].is_object(), "{resp}");
    rig.wait_refusal(pid, "max_buffered_bytes_per_connection");
    assert_eq!(
        rig.peer.requests().len(),
        before,
        "nothing over a limit was forwarded"
    );

    // A JSON answer beyond what a worker may hold buffered: 503 to that client.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "y".repeat(1500)}}});
    let (resp, _) = rig
        .one(json!({"op": "request", "url": rig.peer.url("/mcp-json"), "body": call.to_string()}));
    assert_eq!(resp["status"], 503, "{resp}");
    assert!(
        resp["json"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_buffered_answer_bytes_per_worker")),
        "{resp}"
    );
    assert_eq!(rig.echo(), 200, "other calls are unaffected");
}

#[test]
fn connection_limits_per_caller_and_in_total() {
    let rig = Rig::start(
        "limits-conns",
        125,
        "  max_connections: 8\n  max_connections_per_caller: 5\n",
    );
    let addr = rig.addr();
    let a = rig.cg.child("app/a");
    let b = rig.cg.child("app/b");
    // Caller a: 5 served, the 6th and 7th refused with 503; it then holds its 5 open.
    let holder = rig.python(&a, &["connections", &addr, "7", "4000"]);
    let holder_pid = holder.id();
    let mut stdout = holder.stdout.expect("piped stdout");
    let mut line = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(&mut stdout)
            .read_line(&mut line)
            .expect("reading the holder's statuses");
    }
    let statuses: Value = serde_json::from_str(line.trim()).expect("statuses JSON");
    // Workers admit in their own order: count, not positions.
    assert_eq!(
        sorted(&statuses),
        [200, 200, 200, 200, 200, 503, 503],
        "{statuses}"
    );
    rig.wait_refusal(holder_pid, "limits.max_connections_per_caller");
    // Caller b, while a holds 5: 3 more fit under the total of 8.
    let (other, pid) = rig.python_out(&b, &["connections", &addr, "5", "0"]);
    assert_eq!(sorted(&other), [200, 200, 200, 503, 503], "{other}");
    rig.wait_refusal(pid, "limits.max_connections)");
}

fn sorted(out: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = out["statuses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[test]
fn a_stalled_audit_pipe_refuses_calls_within_the_stall_and_recovers() {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = TempDir::new("audit-fifo");
    let fifo = dir.path().join("audit.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("a path");
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // A reader that has stopped reading: a log shipper that hangs.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("opening the FIFO");
    let rig = Rig::start_with(
        "limits-stall",
        126,
        "audit:\n  stall_ms: 300\n",
        &["--audit-log".into(), fifo.display().to_string()],
    );
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "x".repeat(500)}}})
    .to_string();
    let step = json!({"op": "request", "conn": "a", "url": rig.peer.url("/mcp"), "body": call});
    let steps: Vec<Value> = (0..300).map(|_| step.clone()).collect();
    let started = Instant::now();
    let run = run_script(
        CLIENT_BIN,
        Some(&rig.app),
        &json!({"steps": steps}),
        CLIENT_TIMEOUT,
    );
    let statuses: Vec<u64> = run
        .steps
        .iter()
        .map(|s| s["status"].as_u64().unwrap_or(0))
        .collect();
    let first_503 = statuses
        .iter()
        .position(|&s| s == 503)
        .unwrap_or_else(|| panic!("the pipe never filled: {statuses:?}"));
    assert!(
        first_503 > 0,
        "calls went through while the pipe had room: {statuses:?}"
    );
    assert!(
        statuses[..first_503].iter().all(|&s| s == 200),
        "{statuses:?}"
    );
    assert!(
        statuses[first_503..].iter().all(|&s| s == 503),
        "{statuses:?}"
    );
    let refused = &run.steps[first_503];
    assert!(
        refused["json"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("audit")),
        "{refused}"
    );
    // Waiting at most the stall once, then refused at once: 300 calls take seconds, not 300 × 0.3.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let forwarded = rig.peer.tool_calls().len();
    assert_eq!(forwarded, first_503, "no refused call was forwarded");
    // Another client is refused as quickly: no worker is frozen.
    let other = Instant::now();
    assert_eq!(rig.echo(), 503);
    assert!(
        other.elapsed() < Duration::from_secs(5),
        "{:?}",
        other.elapsed()
    );
    // The reader catches up: calls go through again.
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    assert_eq!(rig.echo(), 200, "after the pipe drained");
}

/// Out of file descriptors (EMFILE on accept): new connections wait in the backlog while the
/// accept loop backs off; connections already served go on; once descriptors are free again,
/// waiting connections are served.
#[test]
fn running_out_of_descriptors_delays_new_connections_only() {
    let rig = Rig::start_limited("limits-emfile", 127, "limits: {}\n", &[], Some(96));
    let addr = rig.addr();
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "kept"}}})
    .to_string();
    let step = json!({"op": "request", "conn": "a", "url": rig.peer.url("/mcp"), "body": call});
    // One keep-alive connection, served before the descriptors run out, calls on through.
    let steps = json!([step, {"op": "sleep", "ms": 2500}, step, step]);
    let client = std::thread::spawn({
        let app = rig.app.clone();
        move || {
            run_script(
                CLIENT_BIN,
                Some(&app),
                &json!({"steps": steps}),
                CLIENT_TIMEOUT,
            )
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    let holder = rig.python(&rig.app, &["hold", &addr, "200", "4000"]);
    let run = client.join().expect("the keep-alive client");
    let statuses: Vec<u64> = run
        .steps
        .iter()
        .filter(|s| s["op"] == "request")
        .map(|s| s["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses, [200, 200, 200], "{:?}", run.steps);
    assert!(
        rig.agent.log().contains("accept failed"),
        "the agent never ran out of descriptors: raise the flood\n{}",
        rig.agent.log()
    );
    let out = holder.wait_with_output().expect("holder");
    assert!(String::from_utf8_lossy(&out.stdout).contains("opened"));
    // Descriptors free again: a new connection is served.
    assert_eq!(rig.echo(), 200);
}
