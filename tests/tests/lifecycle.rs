//! Stopping the agent: `failure_mode: open` leaves nothing behind; `closed` (the default)
//! leaves the programs attached, pinned, so that nothing goes direct until an agent serves
//! again, and the next agent adopts them.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::*;
use mcpwarden_tests::{
    bpf, free_addr, require_root, run_client, spawn_in_cgroup, test_ip, Agent, AgentOpts,
    LineChild, PinsGuard, TestCgroup, TestServer,
};
use serde_json::json;

/// (9) `failure_mode: open`: while the agent runs, its programs are attached to the cgroup
/// (asked of the kernel with bpf(BPF_PROG_QUERY), as `bpftool cgroup show` does); after SIGTERM
/// it exits 0 and nothing stays attached, and a connection from the cgroup to the endpoint goes
/// straight to the server (which now also gets the call the policy used to deny).
#[test]
fn sigterm_with_failure_mode_open_detaches_everything() {
    let mut rig = Rig::start_with(
        "detach",
        9,
        POLICY,
        &["--failure-mode".into(), "open".into()],
    );
    assert!(
        rig.agent.log().contains("failure_mode: open"),
        "open mode is said loudly at start:\n{}",
        rig.agent.log()
    );
    let url = rig.server.url();

    assert_attached(
        &rig.app,
        &[
            "cgroup_inet4_connect",
            "cgroup_inet6_connect",
            "cgroup_sock_ops",
            "cgroup_inet4_getpeername",
            "cgroup_inet6_getpeername",
        ],
        "while running",
    );
    // Attached at --cgroup only, not at its parent.
    assert!(
        bpf::attached(rig.cg.path()).is_empty(),
        "programs attached above --cgroup: {:?}",
        bpf::attached(rig.cg.path())
    );

    // Enforcing while running.
    let run = rig.client(&["call", &url, "drop_cluster", r#"{"cluster":"prod"}"#]);
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    assert_eq!(rig.server.calls("drop_cluster"), 0);

    let (status, killed) = rig.agent.terminate();
    assert!(
        !killed,
        "the agent did not exit within 10 s of SIGTERM\n{}",
        rig.agent.log()
    );
    assert!(
        status.success(),
        "the agent must exit 0 on SIGTERM, got {status}\n{}",
        rig.agent.log()
    );

    let after = bpf::attached(&rig.app);
    assert!(
        after.is_empty(),
        "programs still attached to {} after the agent exited: {after:?}",
        rig.app.display()
    );
    for dir in [rig.cg.path().to_path_buf(), rig.agent_cg.clone()] {
        if dir.exists() {
            let left = bpf::attached(&dir);
            assert!(
                left.is_empty(),
                "programs left attached to {}: {left:?}",
                dir.display()
            );
        }
    }

    // Now straight to the server: it sees the client's own socket, and the call the policy
    // denied goes through.
    let addr = rig.server.addr().to_string();
    let run = rig.client(&[
        "peer",
        &addr,
        "/mcp",
        &call_body(91, "drop_cluster", json!({"cluster": "prod"})),
    ]);
    run.assert_success();
    run.assert_field("peer", addr.as_str());
    assert_eq!(
        run.body_json()["result"]["content"][0]["text"],
        "dropped cluster prod",
        "{}",
        run.describe()
    );
    let local: SocketAddr = run.field("local").expect("local=").parse().unwrap();
    assert!(
        rig.server.peers().contains(&local),
        "the server did not see the client's socket {local} (peers {:?}): still redirected?",
        rig.server.peers()
    );
    assert_eq!(rig.server.calls("drop_cluster"), 1);
}

/// Each of `want` (attach type names) has a program attached to `cgroup`.
fn assert_attached(cgroup: &std::path::Path, want: &[&str], when: &str) {
    let attached = bpf::attached(cgroup);
    let names: Vec<&str> = attached.iter().map(|(n, _)| *n).collect();
    for w in want {
        assert!(
            names.contains(w),
            "{when}, {w} must be attached to {}: {attached:?}",
            cgroup.display()
        );
    }
}

fn pins_args(pins: &PinsGuard) -> Vec<String> {
    vec!["--bpffs-dir".into(), pins.0.display().to_string()]
}

/// A call from the attached cgroup while no agent serves: refused at once, never direct.
fn assert_refused_at_once(rig: &Rig, tool: &str) {
    let started = std::time::Instant::now();
    let run = rig.client(&["call", &rig.server.url(), tool, r#"{"message":"x"}"#]);
    let took = started.elapsed();
    assert!(
        !run.status.success(),
        "a call went through with no agent: {}",
        run.describe()
    );
    assert!(
        run.describe().contains("Connection refused (os error 111)"),
        "the connect must be refused: {}",
        run.describe()
    );
    eprintln!("a redirected connect with no agent serving failed in {took:?}");
    assert!(
        took < CLIENT_TIMEOUT / 2,
        "the call hung ({took:?}) rather than failing at once: {}",
        run.describe()
    );
}

/// (150) kill -9: the programs stay attached (pinned), calls from the cgroup fail at once and
/// reach the server neither inspected nor direct; a new agent adopts the pinned maps and links,
/// rebuilds the counters from their journal (a 10-per-minute limit half spent before the kill
/// is half spent after), and calls resume.
#[test]
fn kill9_fails_closed_and_the_next_agent_adopts_the_datapath() {
    let pins = PinsGuard::new("kill9");
    let mut rig = Rig::start_with("kill9", 150, POLICY, &pins_args(&pins));
    let url = rig.server.url();
    let run = rig.client(&["call", &url, "echo", r#"{"message":"before"}"#]);
    run.assert_success();
    assert_eq!(rig.server.calls("echo"), 1);
    // Half of a 10-per-minute limit spent before the kill.
    let scans = |n: usize| -> Vec<String> {
        let mut args = vec!["call".to_string(), url.clone()];
        for _ in 0..n {
            args.extend(["start_security_scan".into(), r#"{"cluster":"prod"}"#.into()]);
        }
        args
    };
    let args = scans(5);
    let run = rig.client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run.assert_success();
    assert!(
        run.json_lines().iter().all(|l| !is_error_result(l)),
        "{}",
        run.describe()
    );

    rig.agent.kill9();
    assert_attached(
        &rig.app,
        &[
            "cgroup_inet4_connect",
            "cgroup_inet6_connect",
            "cgroup_sock_ops",
            "cgroup_inet4_bind",
        ],
        "after kill -9",
    );
    assert_refused_at_once(&rig, "echo");
    assert_refused_at_once(&rig, "drop_cluster");
    // How fast a bare connect() is refused (a figure for the log, not a timed assertion).
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import socket,sys,time\n\
         host,port=sys.argv[1],int(sys.argv[2]);ts=[]\n\
         for _ in range(200):\n\
         \ts=socket.socket();t=time.perf_counter()\n\
         \ttry: s.connect((host,port)); print('connected'); sys.exit(1)\n\
         \texcept ConnectionRefusedError: ts.append(time.perf_counter()-t)\n\
         \ts.close()\n\
         ts.sort();print('refused=%d p50_us=%.1f p99_us=%.1f'%(len(ts),ts[100]*1e6,ts[197]*1e6))",
        &rig.server.addr().ip().to_string(),
        &rig.server.addr().port().to_string(),
    ]);
    spawn_in_cgroup(&mut cmd, &rig.app);
    let out = cmd.output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("refused=200"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "with no agent serving, connect() to the endpoint: {}",
        text.trim()
    );
    assert_eq!(
        rig.server.calls("echo"),
        1,
        "a call reached the server with no agent"
    );
    assert_eq!(rig.server.calls("drop_cluster"), 0);

    rig.agent.respawn(&[]);
    let log = rig.agent.log();
    assert!(
        log.contains("maps_adopted=true"),
        "the maps are adopted:\n{log}"
    );
    assert!(
        log.contains("links_created=0"),
        "no link is made anew:\n{log}"
    );
    assert!(
        log.contains("rate-limit counters restored from the journal")
            && log.contains("admissions=5"),
        "{log}"
    );
    // Still half spent: five more pass, the sixth is refused.
    let args = scans(6);
    let run = rig.client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run.assert_success();
    let lines = run.json_lines();
    assert!(
        lines[..5].iter().all(|l| !is_error_result(l)),
        "{}",
        run.describe()
    );
    assert!(is_error_result(&lines[5]), "{}", run.describe());
    assert!(
        result_text(&lines[5]).contains("rate limit"),
        "{}",
        run.describe()
    );
    assert_eq!(rig.server.calls("start_security_scan"), 10);
    let run = rig.client(&["call", &url, "echo", r#"{"message":"after"}"#]);
    run.assert_success();
    assert_eq!(rig.server.calls("echo"), 2);
    let run = rig.client(&["call", &url, "drop_cluster", r#"{"cluster":"prod"}"#]);
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    assert_eq!(rig.server.calls("drop_cluster"), 0);
}

/// (151) A build with another map layout: the second agent makes new maps beside the old ones,
/// swaps the program of every pinned link in place, and unpins the old maps. A client calling a
/// denied tool in a loop throughout never reaches the server: there is no moment without
/// programs.
#[test]
fn a_new_map_layout_swaps_the_programs_with_no_window() {
    let pins = PinsGuard::new("layout");
    let mut rig = Rig::start_with("layout", 151, POLICY, &pins_args(&pins));
    let url = rig.server.url();
    let layouts = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir.join("maps"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = layouts(&pins.0);
    assert_eq!(first.len(), 1, "one layout pinned: {first:?}");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = rig.app.clone();
    let hammer = {
        let stop = stop.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = mcpwarden_tests::client::run_client(
                    CLIENT_BIN,
                    Some(&app),
                    &["call", &url, "drop_cluster", r#"{"cluster":"prod"}"#],
                    CLIENT_TIMEOUT,
                );
                runs += 1;
            }
            runs
        })
    };
    // Agent A stops with SIGTERM (closed: its programs stay), agent B starts with another
    // layout while the loop runs.
    let (status, _) = rig.agent.terminate();
    assert!(status.success(), "{}", rig.agent.log());
    rig.agent
        .respawn(&["--layout-salt".into(), "another build".into()]);
    let run = rig.client(&["call", &url, "echo", r#"{"message":"after"}"#]);
    run.assert_success();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = hammer.join().expect("the client loop");
    assert!(runs > 0);
    assert_eq!(
        rig.server.calls("drop_cluster"),
        0,
        "a denied call reached the server during the swap ({runs} tries)"
    );
    let log = rig.agent.log();
    assert!(log.contains("maps_adopted=false"), "{log}");
    assert!(
        log.contains("links_created=0"),
        "the links are swapped, not made anew:\n{log}"
    );
    assert!(
        log.contains(&first[0]),
        "the old layout is named as unpinned:\n{log}"
    );
    let second = layouts(&pins.0);
    assert_eq!(
        second.len(),
        1,
        "only the new layout stays pinned: {second:?}"
    );
    assert_ne!(second, first);
}

/// (152) `mcpwarden uninstall` is refused while an agent runs; once none does, it removes every
/// pin and state file it owns (the counters' journal, the lock, the hand-over socket): nothing
/// stays attached (BPF_PROG_QUERY), the directory is gone, and calls go direct again.
/// `status --datapath` first shows the pinned links and, per cgroup, whose programs run there.
#[test]
fn uninstall_leaves_nothing_attached_or_pinned() {
    let pins = PinsGuard::new("uninstall");
    let mut rig = Rig::start_with("uninstall", 152, POLICY, &pins_args(&pins));
    let state = rig.agent.temp_dir().join("state");
    let uninstall = || {
        Command::new(AGENT_BIN)
            .args(["uninstall", "--bpffs-dir"])
            .arg(&pins.0)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("run mcpwarden uninstall")
    };
    // Refused while the agent runs.
    let out = uninstall();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A call with a limit, so that the counters' journal has something.
    let run = rig.client(&[
        "call",
        &rig.server.url(),
        "start_security_scan",
        r#"{"cluster":"prod"}"#,
    ]);
    run.assert_success();
    rig.agent.kill9();
    assert!(!bpf::attached(&rig.app).is_empty());
    let status = Command::new(AGENT_BIN)
        .args(["status", "--datapath", "--bpffs-dir"])
        .arg(&pins.0)
        .arg("--cgroup")
        .arg(&rig.app)
        .output()
        .expect("run mcpwarden status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("program mcpw_connect4: runs program"),
        "{text}"
    );
    assert!(
        text.contains("(mcpw_connect4) — mcpwarden (pinned)"),
        "BPF_PROG_QUERY on the cgroup names mcpwarden's programs: {text}"
    );
    let out = uninstall();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mcpw_connect4"),
        "it prints what it removed: {text}"
    );
    assert!(text.contains("BY_SOCKET"), "maps too: {text}");
    assert!(
        text.contains("counters"),
        "the counters' journal too: {text}"
    );
    assert!(
        text.contains("agent.lock") && text.contains("handover.sock"),
        "{text}"
    );
    assert!(!pins.0.exists(), "{} is left", pins.0.display());
    assert!(!state.join("counters").exists());
    let after = bpf::attached(&rig.app);
    assert!(
        after.is_empty(),
        "still attached after uninstall: {after:?}"
    );
    for dir in [rig.cg.path().to_path_buf(), rig.agent_cg.clone()] {
        if dir.exists() {
            assert!(bpf::attached(&dir).is_empty(), "left on {}", dir.display());
        }
    }
    let run = rig.client(&["call", &rig.server.url(), "echo", r#"{"message":"direct"}"#]);
    run.assert_success();
    assert_eq!(rig.server.calls("echo"), 1);
}

/// (153) A connection to the endpoint opened before the agent started went direct, uninspected:
/// once the programs are attached it is reset (the client sees its read fail), audited as
/// `preexisting_reset` with the process that held it; a connection to another address is left
/// alone, and the client's next call is inspected.
#[test]
fn a_connection_opened_before_the_agent_is_reset_and_the_next_is_inspected() {
    let cg = TestCgroup::new("preexisting");
    let app = cg.child("app");
    let ip = test_ip(153);
    let server = TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
    let other = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(ip), 0)).expect("bind");
    let hold = |addr: String| {
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.args(["hold", &addr]);
        spawn_in_cgroup(&mut cmd, &app);
        let mut child = LineChild::spawn(cmd);
        child
            .wait_line(CLIENT_TIMEOUT, |l| l.starts_with("connected"))
            .unwrap_or_else(|| panic!("the holder never connected to {addr}"));
        child
    };
    let mut direct = hold(server.addr().to_string());
    let mut untouched = hold(other.local_addr().expect("addr").to_string());

    let agent = Agent::start(
        AGENT_BIN,
        AgentOpts {
            name: "preexisting".into(),
            endpoints: vec![(server.url(), POLICY.into())],
            listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
            cgroup: app.clone(),
            agent_cgroup: cg.path().join("agent"),
        },
    );
    let holder_pid = direct.child.id();
    let ended = direct.wait_line(AUDIT_WAIT, |l| l.starts_with("ended="));
    assert!(
        ended.is_some(),
        "the direct connection was not reset: {:?}\n{}",
        direct.seen,
        agent.log()
    );
    let record = agent
        .wait_audit(AUDIT_WAIT, |r| r["event"] == "preexisting_reset")
        .unwrap_or_else(|| panic!("no preexisting_reset record:\n{}", agent.audit_text()));
    assert_eq!(record["pid"], holder_pid, "{record}");
    assert_eq!(record["comm"], "mcp-client", "{record}");
    assert_eq!(record["dst"], server.addr().to_string(), "{record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("was reset")),
        "{record}"
    );
    let resets = agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "preexisting_reset")
        .count();
    assert_eq!(
        resets,
        1,
        "only the connection to the endpoint:\n{}",
        agent.audit_text()
    );
    assert!(
        untouched
            .wait_line(Duration::from_millis(300), |l| l.starts_with("ended="))
            .is_none(),
        "a connection to another address was reset"
    );

    let run = run_client(
        CLIENT_BIN,
        Some(&app),
        &[
            "call",
            &server.url(),
            "drop_cluster",
            r#"{"cluster":"prod"}"#,
        ],
        CLIENT_TIMEOUT,
    );
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    assert_eq!(server.calls("drop_cluster"), 0);
}

/// (154) An upgrade: agent B starts while agent A serves 50 clients making 200 calls each
/// (keep-alive, every tenth call on a new connection). B takes A's listening sockets over, A
/// stops accepting and drains (its answers close their connections), and no connection is
/// refused and no call fails; every call is audited exactly once; A idles after draining, and
/// answers SIGTERM by exiting without detaching anything.
#[test]
fn a_new_agent_takes_the_listeners_over_without_a_failed_call() {
    let pins = PinsGuard::new("handover");
    let mut extra = pins_args(&pins);
    extra.extend(["--drain-seconds".into(), "5".into()]);
    let rig = Rig::start_with("handover", 154, POLICY, &extra);
    let url = rig.server.url();
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.args(["load", &url, "50", "200"]);
    spawn_in_cgroup(&mut cmd, &rig.app);
    let mut load = LineChild::spawn(cmd);
    load.wait_line(CLIENT_TIMEOUT, |l| l == "started")
        .expect("the load started");
    // Let A serve part of the load first.
    mcpwarden_tests::wait_for(Duration::from_secs(30), || {
        (rig.server.calls("echo") >= 500).then_some(())
    })
    .expect("A served calls");
    let b = rig.agent.start_successor("handover-b");
    let blog = b.log();
    assert!(
        blog.contains("taking the listening sockets over from the running agent"),
        "{blog}"
    );
    let done = load
        .wait_line(Duration::from_secs(120), |l| l.starts_with("ok="))
        .unwrap_or_else(|| panic!("the load did not finish: {:?}", load.seen));
    let (_, rest) = load.finish();
    assert_eq!(
        done,
        "ok=10000 failed=0",
        "{rest:?}\nA:\n{}\nB:\n{}",
        rig.agent.log(),
        b.log()
    );
    assert_eq!(rig.server.calls("echo"), 10000);
    // Every call audited exactly once, by one agent or the other.
    let decided = rig
        .agent
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "request" && r["tool"] == "echo" && r["decision"] == "allow")
        .count();
    assert_eq!(decided, 10000);
    // A drained and idles; B is the active agent.
    let alog = rig.agent.log();
    assert!(alog.contains("handed over to a new agent"), "{alog}");
    let drained = mcpwarden_tests::wait_for(Duration::from_secs(15), || {
        rig.agent
            .log()
            .contains("drained: idle until SIGTERM")
            .then_some(())
    });
    assert!(
        drained.is_some(),
        "A did not finish draining:\n{}",
        rig.agent.log()
    );
    assert!(!bpf::attached(&rig.app).is_empty());
    let run = rig.client(&["call", &url, "drop_cluster", r#"{"cluster":"prod"}"#]);
    run.assert_success();
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("A:\n{}\nB:\n{}", rig.agent.log(), b.log());
    }
    drop(b);
}

/// (155) The hand-over socket answers only agents: a root process in a workload cgroup (below
/// the attach point), or a process that is not root, that connects is refused and gets no
/// descriptor; a successor that dies
/// before it is ready (here: it cannot use its bpffs directory) leaves the running agent
/// serving, as before.
#[test]
fn the_hand_over_refuses_a_workload_and_survives_a_successor_that_fails() {
    let pins = PinsGuard::new("handover-refuse");
    let rig = Rig::start_with("handover-refuse", 155, POLICY, &pins_args(&pins));
    let socket = rig.agent.temp_dir().join("state").join("handover.sock");
    let run = rig.client(&["handover-peer", &socket.display().to_string()]);
    run.assert_success();
    run.assert_field("handover-bytes", "0");
    run.assert_field("handover-fds", "0");
    let refused = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
        rig.agent
            .log()
            .contains("a workload, not an agent")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", rig.agent.log());

    // A process that is not root: the 0700 state directory keeps it out; opened up here (as a
    // mistaken chmod would), the agent still refuses it by its credentials (SO_PEERCRED).
    use std::os::unix::fs::PermissionsExt;
    let state = socket.parent().expect("state dir").to_path_buf();
    let opened = [(state.clone(), 0o711), (socket.clone(), 0o666)];
    for (path, mode) in &opened {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            CLIENT_BIN,
        ])
        .arg("handover-peer")
        .arg(&socket)
        .output()
        .expect("run setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("handover-fds=0"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
        rig.agent
            .log()
            .contains("is not root (uid 65534)")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", rig.agent.log());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    // A successor that fails after it received the listeners.
    let mut args: Vec<String> = rig.agent.args().to_vec();
    let at = args
        .iter()
        .position(|a| a == "--bpffs-dir")
        .expect("--bpffs-dir");
    args[at + 1] = rig.agent.temp_dir().join("not-bpffs").display().to_string();
    let out = Command::new(AGENT_BIN)
        .args(&args)
        .output()
        .expect("run the failing successor");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("taking the listening sockets over")
            && text.contains("not on a bpf filesystem"),
        "{text}"
    );
    let aborted = mcpwarden_tests::wait_for(AUDIT_WAIT, || {
        rig.agent.log().contains("hand-over aborted").then_some(())
    });
    assert!(aborted.is_some(), "{}", rig.agent.log());
    // A successor with failure_mode: open does not take over (its programs would run against
    // maps of its own).
    let mut open_args = rig.agent.args().to_vec();
    open_args.extend(["--failure-mode".into(), "open".into()]);
    let out = Command::new(AGENT_BIN)
        .args(&open_args)
        .output()
        .expect("run the open-mode successor");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("with failure_mode: open stop it first"),
        "{text}"
    );
    // Still serving, still enforcing.
    let run = rig.client(&[
        "call",
        &rig.server.url(),
        "echo",
        r#"{"text":"still here"}"#,
    ]);
    run.assert_success();
    assert_eq!(result_text(&run.json_lines()[0]), "still here");
    let run = rig.client(&[
        "call",
        &rig.server.url(),
        "drop_cluster",
        r#"{"cluster":"prod"}"#,
    ]);
    assert!(is_error_result(&run.json_lines()[0]), "{}", run.describe());
}

/// (156) A forged "active agent" — something holding the lock and answering on the hand-over
/// socket — that passes a socket which is not listening: the starting agent checks every
/// descriptor before use, refuses it, and does not start.
#[test]
fn a_forged_hand_over_with_a_socket_that_is_not_listening_is_refused() {
    use std::os::fd::AsRawFd;
    require_root();
    let cg = TestCgroup::new("handover-forged");
    let app = cg.child("app");
    let ip = test_ip(156);
    let server = TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
    let dir = std::env::temp_dir().join(format!("mcpwarden-forged-{}", std::process::id()));
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("agent.lock"))
        .expect("lock file");
    // SAFETY: flock on a file this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let listener =
        std::os::unix::net::UnixListener::bind(state.join("handover.sock")).expect("bind");
    // A connected TCP socket, not a listening one.
    let peer = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let connected = std::net::TcpStream::connect(peer.local_addr().unwrap()).expect("connect");
    let forged = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let line = format!(
            "[{{\"cookie\":1,\"addr\":\"{}\"}}]\n",
            connected.local_addr().unwrap()
        );
        let mut iov = libc::iovec {
            iov_base: line.as_ptr() as *mut _,
            iov_len: line.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: a msghdr over buffers that outlive the call, one SCM_RIGHTS message.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), connected.as_raw_fd());
            assert!(libc::sendmsg(s.as_raw_fd(), &msg, 0) > 0);
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut &s, &mut rest);
        rest
    });
    let policy = dir.join("policy.json");
    std::fs::write(&policy, POLICY).expect("policy");
    let listen = free_addr(ip).to_string();
    let bpffs = PinsGuard::new("handover-forged");
    let out = Command::new(AGENT_BIN)
        .args(["run", "--endpoint", &server.url(), "--policy"])
        .arg(&policy)
        .args(["--listen", &listen, "--audit-log"])
        .arg(dir.join("audit.jsonl"))
        .arg("--cgroup")
        .arg(&app)
        .arg("--agent-cgroup")
        .arg(cg.path().join("agent"))
        .arg("--netns-dir")
        .arg(dir.join("pins"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--bpffs-dir")
        .arg(&bpffs.0)
        .output()
        .expect("run the agent");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the agent started on a forged hand-over:\n{text}"
    );
    assert!(text.contains("is not listening"), "{text}");
    assert!(
        bpf::attached(&app).is_empty(),
        "programs attached after a refused hand-over"
    );
    let rest = forged.join().expect("the forged agent");
    assert!(!rest.contains("READY"), "the agent said READY: {rest}");
    drop(lock);
    let _ = std::fs::remove_dir_all(&dir);
}
