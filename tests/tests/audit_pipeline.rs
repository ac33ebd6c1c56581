//! The audit pipeline loses nothing (test indices 160–169): the real `logrotate` rotating the
//! agent's audit log while calls run, in `create` mode (SIGUSR1 in `postrotate`, and rename
//! detection without it) and in `copytruncate` mode (whose own window is measured); a full disk
//! (a tiny tmpfs) refusing calls with 503 until space comes back, then an `audit_stall` record;
//! `on_stall: allow` forwarding with the records on the agent's standard error; and
//! `log_arguments` writing redacted arguments, never a header.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{AGENT_BIN, CLIENT_BIN, CLIENT_TIMEOUT};
use mcpwarden_tests::schema::check_audit_line;
use mcpwarden_tests::{
    free_addr, require_root, run_client, sha256_hex, spawn_in_cgroup, test_ip, wait_for, Agent,
    AgentOpts, ClientRun, LineChild, TempDir, TestCgroup, TestServer,
};
use serde_json::{json, Value};

const POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "drop_cluster": {"action": "deny", "reason": "destructive"}
  }
}"#;

/// A tmpfs mounted on a directory of the test's own, unmounted (lazily: the agent may still hold
/// its file) when dropped. Declared before the agent so that it outlives it.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Tmpfs {
        use std::os::unix::ffi::OsStrExt;
        let dir = TempDir::new(name);
        let target = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let data = std::ffi::CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: NUL-terminated strings valid for the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t tmpfs on {}: {}",
            dir.path().display(),
            std::io::Error::last_os_error()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file that takes every page left.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).expect("create the filler");
        for chunk in [4096, 1] {
            let buf = vec![b'.'; chunk];
            loop {
                match f.write(&buf) {
                    Ok(n) if n == chunk => {}
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(self.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One agent with a config file (its `audit:` section and servers), servers on
/// 127.0.0.(10+index), and the attached cgroup where clients run. Fields drop in order: the
/// agent first.
struct Rig {
    agent: Agent,
    servers: Vec<TestServer>,
    _cg: TestCgroup,
    app: PathBuf,
    /// The config, logrotate's configs and state.
    files: TempDir,
}

impl Rig {
    /// `servers`: (name, `log_arguments`) each. `audit` is the config's `audit:` line(s).
    fn start(name: &str, index: u8, audit: &str, servers: &[(&str, bool)], extra: &[&str]) -> Rig {
        require_root();
        let cg = TestCgroup::new(name);
        let app = cg.child("app");
        let ip = test_ip(index);
        let files = TempDir::new(&format!("{name}-files"));
        std::fs::write(files.path().join("policy.json"), POLICY).unwrap();
        let mut config = format!("{audit}\nservers:\n");
        let mut started = Vec::new();
        for (server, log_arguments) in servers {
            let s = TestServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
            config.push_str(&format!(
                "  - name: {server}\n    url: {}\n    policy: policy.json\n    log_arguments: {log_arguments}\n",
                s.url()
            ));
            started.push(s);
        }
        let config_path = files.path().join("mcpwarden.yaml");
        std::fs::write(&config_path, config).unwrap();
        let mut args: Vec<String> = vec!["--config".into(), config_path.display().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let agent = Agent::start_with(
            AGENT_BIN,
            AgentOpts {
                name: name.to_string(),
                endpoints: Vec::new(),
                listen: vec![free_addr(ip), free_addr(Ipv6Addr::LOCALHOST)],
                cgroup: app.clone(),
                agent_cgroup: cg.path().join("agent"),
            },
            &args,
        );
        Rig {
            agent,
            servers: started,
            _cg: cg,
            app,
            files,
        }
    }

    fn url(&self, i: usize) -> String {
        self.servers[i].url()
    }

    fn client(&self, args: &[&str]) -> ClientRun {
        run_client(CLIENT_BIN, Some(&self.app), args, CLIENT_TIMEOUT)
    }

    /// `mcp-client call URL echo {"text": "c-N"}...` for each N of `ids`, watched as it runs.
    fn echo_calls(&self, ids: std::ops::Range<usize>) -> LineChild {
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.arg("call").arg(self.url(0));
        for i in ids {
            cmd.arg("echo")
                .arg(json!({"text": format!("c-{i}")}).to_string());
        }
        mcpwarden_tests::client::without_proxies(&mut cmd);
        cmd.stderr(Stdio::inherit());
        spawn_in_cgroup(&mut cmd, &self.app);
        LineChild::spawn(cmd)
    }

    /// Run the real logrotate on the audit file with `directives`, forced, with its state file
    /// in the test's directory.
    fn logrotate(&self, conf_name: &str, directives: &str) {
        let conf = self.files.path().join(conf_name);
        std::fs::write(
            &conf,
            format!(
                "{} {{\n{directives}\n}}\n",
                self.agent.audit_path().display()
            ),
        )
        .unwrap();
        let out = Command::new("logrotate")
            .arg("-f")
            .arg("-s")
            .arg(self.files.path().join("logrotate.state"))
            .arg(&conf)
            .output()
            .unwrap_or_else(|e| {
                panic!("running logrotate (cargo xtask setup installs Debian's logrotate): {e}")
            });
        assert!(
            out.status.success(),
            "logrotate failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Wait for `n` more result lines of a `call` client; panic if they do not come.
fn wait_results(child: &mut LineChild, n: usize) {
    for _ in 0..n {
        child
            .wait_line(CLIENT_TIMEOUT, |l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("the client stopped printing results: {:?}", child.seen));
    }
}

/// Finish a `call` client: it succeeded, and every call echoed its text.
fn finish_calls(child: LineChild, ids: std::ops::Range<usize>) {
    let (status, lines) = child.finish();
    let results: Vec<&String> = lines.iter().filter(|l| l.starts_with('{')).collect();
    assert!(status.success(), "mcp-client failed: {lines:?}");
    assert_eq!(results.len(), ids.len(), "{lines:?}");
    for (line, i) in results.iter().zip(ids) {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["content"][0]["text"],
            format!("c-{i}"),
            "call c-{i}: {line}"
        );
    }
}

/// `args_sha256` of `echo {"text": "c-N"}` → N.
fn call_ids(ids: std::ops::Range<usize>) -> HashMap<String, usize> {
    ids.map(|i| (sha256_hex(format!(r#"{{"text":"c-{i}"}}"#).as_bytes()), i))
        .collect()
}

/// The lines of an audit file: the records (each checked against docs/audit.schema.json) and
/// the lines that are not JSON, with their numbers.
fn read_audit(path: &Path) -> (Vec<Value>, Vec<(usize, String)>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        !bytes.contains(&0),
        "{} has NUL bytes (a hole)",
        path.display()
    );
    let text = String::from_utf8_lossy(&bytes);
    let (mut records, mut broken) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) => {
                if let Err(e) = check_audit_line(line) {
                    panic!("{}:{}: {e}\n  {line}", path.display(), n + 1);
                }
                records.push(v);
            }
            Err(_) => broken.push((n + 1, line.to_owned())),
        }
    }
    (records, broken)
}

/// The ids (by [`call_ids`]) of the `echo` decision records in `records`, in file order.
fn echo_ids(records: &[Value], ids: &HashMap<String, usize>) -> Vec<usize> {
    records
        .iter()
        .filter(|r| r["event"] == "request" && r["tool"] == "echo")
        .map(|r| {
            let sha = r["args_sha256"].as_str().unwrap_or_default();
            *ids.get(sha)
                .unwrap_or_else(|| panic!("an echo record of no call of this test: {r}"))
        })
        .collect()
}

/// Wait (≤ 30 s) for a line of the agent's log after its first `skip` lines that has every one
/// of `needles`.
fn wait_log_after(agent: &Agent, skip: usize, needles: &[&str]) {
    wait_for(Duration::from_secs(30), || {
        agent
            .log()
            .lines()
            .skip(skip)
            .any(|l| needles.iter().all(|n| l.contains(n)))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no log line with {needles:?}:\n{}", agent.log()));
}

/// `PATH.n`
fn numbered(path: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

/// (a) logrotate `create`, twice while 400 calls run: once with `postrotate` sending SIGUSR1,
/// once with no signal (the agent sees the rename). Every call's decision record is in exactly
/// one of the three files, in order; calls after the second rotation are in the new file.
#[test]
fn logrotate_create_mode_loses_and_duplicates_nothing() {
    let rig = Rig::start(
        "rotate-create",
        160,
        "audit: {stall_ms: 1000}",
        &[("tools", false)],
        &[],
    );
    let audit = rig.agent.audit_path().to_owned();
    let pid = rig.agent.pid().expect("the agent runs");
    let ids = call_ids(0..450);

    let mut calls = rig.echo_calls(0..400);
    wait_results(&mut calls, 100);
    let mark = rig.agent.log().lines().count();
    rig.logrotate(
        "signal.conf",
        &format!(
            "  rotate 10\n  create 0600 root root\n  nocompress\n  missingok\n  postrotate\n    kill -USR1 {pid}\n  endscript"
        ),
    );
    wait_log_after(&rig.agent, mark, &["audit log reopened", "SIGUSR1"]);
    wait_results(&mut calls, 100);
    // No signal this time: the agent notices the rename by itself.
    let mark = rig.agent.log().lines().count();
    rig.logrotate(
        "nosignal.conf",
        "  rotate 10\n  create 0600 root root\n  nocompress\n  missingok",
    );
    finish_calls(calls, 0..400);
    wait_log_after(&rig.agent, mark, &["audit log reopened", "renamed"]);
    let after = rig.echo_calls(400..450);
    finish_calls(after, 400..450);

    // Oldest first: the first rotation's file was shifted to .2 by the second.
    let mut all = Vec::new();
    for path in [numbered(&audit, 2), numbered(&audit, 1), audit.clone()] {
        let (records, broken) = read_audit(&path);
        assert!(
            broken.is_empty(),
            "{}: lines that are not JSON: {broken:?}",
            path.display()
        );
        let in_file = echo_ids(&records, &ids);
        assert!(!in_file.is_empty(), "{} has no call", path.display());
        eprintln!(
            "{}: calls c-{}..=c-{}",
            path.display(),
            in_file[0],
            in_file[in_file.len() - 1]
        );
        if path == audit {
            assert!(
                in_file.ends_with(&(400..450).collect::<Vec<_>>()),
                "the calls after the second rotation are in the new file: {in_file:?}"
            );
        }
        all.extend(in_file);
    }
    assert_eq!(
        all,
        (0..450).collect::<Vec<_>>(),
        "every call's record once, in order, across the rotated files and the new one"
    );
    assert!(!numbered(&audit, 3).exists());
}

/// (b) logrotate `copytruncate` while 400 calls run. logrotate copies, then truncates: a line
/// written in between is in neither file (its man page says so; no writer can prevent it). The
/// test bounds that loss to the records written while logrotate ran, at the boundary between the
/// two files, and checks everything else: every record written before logrotate started is in
/// the copy, every one after it finished is in the truncated file, none twice, no hole.
#[test]
fn logrotate_copytruncate_loses_only_what_its_own_window_loses() {
    let rig = Rig::start(
        "rotate-copytruncate",
        161,
        "audit: {stall_ms: 1000}",
        &[("tools", false)],
        &[],
    );
    let audit = rig.agent.audit_path().to_owned();
    let ids = call_ids(0..450);
    let server = &rig.servers[0];

    let mut calls = rig.echo_calls(0..400);
    wait_results(&mut calls, 150);
    // The server counts a call after its record was written: every record of a call it has
    // counted before logrotate starts was written before; at most one more (in flight) was.
    let before = server.calls("echo") as usize;
    rig.logrotate(
        "copytruncate.conf",
        "  rotate 10\n  copytruncate\n  nocompress\n  missingok",
    );
    let after = server.calls("echo") as usize + 1;
    finish_calls(calls, 0..400);
    finish_calls(rig.echo_calls(400..450), 400..450);

    let (copy, copy_broken) = read_audit(&numbered(&audit, 1));
    let (new, new_broken) = read_audit(&audit);
    // The copy may end inside a line that was being written as logrotate read it.
    let copy_text = std::fs::read_to_string(numbered(&audit, 1)).unwrap();
    match copy_broken.as_slice() {
        [] => {}
        [(n, _)] if *n == copy_text.lines().count() && !copy_text.ends_with('\n') => {}
        more => panic!("the copy has lines that are not JSON besides a cut last one: {more:?}"),
    }
    assert!(new_broken.is_empty(), "the truncated file: {new_broken:?}");
    let in_copy = echo_ids(&copy, &ids);
    let in_new = echo_ids(&new, &ids);
    let last_copied = in_copy.last().copied();
    let first_new = in_new.first().copied().unwrap_or(450);
    assert_eq!(
        in_copy,
        (0..last_copied.map_or(0, |l| l + 1)).collect::<Vec<_>>(),
        "the copy holds the first calls, each once"
    );
    assert_eq!(
        in_new,
        (first_new..450).collect::<Vec<_>>(),
        "the truncated file holds the last calls, each once"
    );
    let lost: Vec<usize> = (last_copied.map_or(0, |l| l + 1)..first_new).collect();
    eprintln!(
        "copytruncate: {} record(s) written while logrotate ran (calls c-{before}..=c-{after}); \
         lost in its copy-then-truncate window: {lost:?}",
        after - before + 1
    );
    assert!(
        lost.iter().all(|&i| (before..=after).contains(&i)),
        "records lost outside logrotate's run (c-{before}..=c-{after}): {lost:?}"
    );
    wait_log_after(&rig.agent, 0, &["the audit file was truncated"]);
}

/// A tools/call of echo with `text`, padded.
fn echo_body(id: u64, text: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "echo", "arguments": {"text": text}}})
    .to_string()
}

/// `raw-post` one echo call; its HTTP status.
fn post_echo(rig: &Rig, id: u64, text: &str) -> (u16, ClientRun) {
    let run = rig.client(&["raw-post", &rig.url(0), &echo_body(id, text)]);
    run.assert_success();
    let status = run
        .field("status")
        .and_then(|s| s.split_whitespace().nth(1).and_then(|c| c.parse().ok()))
        .unwrap_or_else(|| panic!("no status: {}", run.describe()));
    (status, run)
}

fn sha_of_text(text: &str) -> String {
    sha256_hex(json!({"text": text}).to_string().as_bytes())
}

/// (c) The audit file on a 64 KiB tmpfs, filled: calls get 503 and never reach the server,
/// nothing is forwarded unrecorded; with space again calls go through and an `audit_stall`
/// record says how many were refused.
#[test]
fn a_full_disk_refuses_calls_until_space_comes_back() {
    require_root();
    let fs = Tmpfs::mount("audit-enospc", "64k");
    let audit = fs.path().join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let rig = Rig::start(
        "audit-full",
        162,
        "audit: {stall_ms: 200, on_stall: deny}",
        &[("tools", false)],
        &["--audit-log", &audit_arg],
    );
    let server = &rig.servers[0];
    let (status, run) = post_echo(&rig, 1, "before");
    assert_eq!(status, 200, "{}", run.describe());
    let filler = fs.fill();

    let mut ok = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        let text = format!("full-{i:02}");
        let (status, run) = post_echo(&rig, 100 + i, &text);
        match status {
            200 => {
                assert_eq!(
                    refused, 0,
                    "a call went through after one was refused on a full disk"
                );
                ok.push(text);
            }
            503 => {
                let body = run.body_json();
                assert_eq!(body["error"]["code"], -32603, "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("cannot write its audit log")),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("HTTP {other}: {}", run.describe()),
        }
    }
    assert!(
        refused >= 20,
        "{refused} refused, {} went through",
        ok.len()
    );
    // The server ran exactly the calls that got 200.
    assert_eq!(server.calls("echo") as usize, 1 + ok.len());

    std::fs::remove_file(filler).unwrap();
    let (status, run) = post_echo(&rig, 999, "after");
    assert_eq!(status, 200, "{}", run.describe());
    assert_eq!(server.calls("echo") as usize, 2 + ok.len());

    let stall = wait_for(Duration::from_secs(10), || {
        let (records, _) = read_audit(&audit);
        records.into_iter().find(|r| r["event"] == "audit_stall")
    })
    .unwrap_or_else(|| {
        panic!(
            "no audit_stall record:\n{}",
            std::fs::read_to_string(&audit).unwrap_or_default()
        )
    });
    assert!(
        stall["stall"]["refused"].as_u64() >= Some(refused as u64),
        "{stall} ({refused} refused)"
    );
    assert_eq!(stall["stall"]["forwarded_unrecorded"], 0, "{stall}");
    assert!(
        stall["stall"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left") || e.contains("short write")),
        "{stall}"
    );

    // Every call that reached the server has its decision record in the file, whole; a full
    // disk leaves at most one line that is not JSON (the cut record, written again whole).
    let (records, broken) = read_audit(&audit);
    assert!(broken.len() <= 1, "{broken:?}");
    let recorded: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "request" && r["tool"] == "echo")
        .filter_map(|r| r["args_sha256"].as_str())
        .collect();
    let forwarded: Vec<String> = ["before".to_owned()]
        .into_iter()
        .chain(ok.iter().cloned())
        .chain(["after".to_owned()])
        .collect();
    for text in &forwarded {
        assert_eq!(
            recorded.iter().filter(|s| **s == sha_of_text(text)).count(),
            1,
            "the record of {text}"
        );
    }
    assert_eq!(
        recorded.len(),
        forwarded.len(),
        "no record of a refused call"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.ends_with('\n'));
}

/// (c) `on_stall: allow`: on a full disk calls are forwarded, and each record the file did not
/// take is on the agent's standard error; the `audit_stall` record counts them.
#[test]
fn on_stall_allow_forwards_with_the_records_on_standard_error() {
    require_root();
    let fs = Tmpfs::mount("audit-allow", "64k");
    let audit = fs.path().join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let rig = Rig::start(
        "audit-allow",
        163,
        "audit: {stall_ms: 100, on_stall: allow}",
        &[("tools", false)],
        &["--audit-log", &audit_arg],
    );
    let server = &rig.servers[0];
    let (status, _) = post_echo(&rig, 1, "before");
    assert_eq!(status, 200);
    let filler = fs.fill();
    let texts: Vec<String> = (0..20).map(|i| format!("allow-{i:02}")).collect();
    for (i, text) in texts.iter().enumerate() {
        let (status, run) = post_echo(&rig, 100 + i as u64, text);
        assert_eq!(status, 200, "{}", run.describe());
    }
    assert_eq!(server.calls("echo"), 21);
    std::fs::remove_file(filler).unwrap();
    let (status, _) = post_echo(&rig, 999, "after");
    assert_eq!(status, 200);
    let stall = wait_for(Duration::from_secs(10), || {
        let (records, _) = read_audit(&audit);
        records.into_iter().find(|r| r["event"] == "audit_stall")
    })
    .unwrap_or_else(|| panic!("no audit_stall record"));

    let (records, broken) = read_audit(&audit);
    assert!(broken.len() <= 1, "{broken:?}");
    let log = rig.agent.log();
    // The decision records (a call's `response` record went there too, deferred).
    let on_stderr: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("forwarded without an audit record") && l.contains(r#""event":"request""#)
        })
        .collect();
    let mut unrecorded = 0;
    for text in &texts {
        let sha = sha_of_text(text);
        let in_file = records
            .iter()
            .filter(|r| r["event"] == "request" && r["args_sha256"] == sha.as_str())
            .count();
        let in_log = on_stderr.iter().filter(|l| l.contains(&sha)).count();
        assert_eq!(
            in_file + in_log,
            1,
            "{text}: {in_file} in the file, {in_log} on stderr"
        );
        unrecorded += in_log;
    }
    assert!(unrecorded >= 15, "{unrecorded} of 20 on standard error");
    assert!(
        stall["stall"]["forwarded_unrecorded"].as_u64() >= Some(unrecorded as u64),
        "{stall}"
    );
    assert_eq!(stall["stall"]["refused"], 0, "{stall}");
}

/// (d) `log_arguments: true` writes the call's arguments with secret-named keys masked; a server
/// without it gets none; no header value (Authorization, Cookie, …) is written anywhere.
#[test]
fn log_arguments_writes_masked_arguments_and_never_a_header() {
    let rig = Rig::start(
        "audit-arguments",
        164,
        "audit: {stall_ms: 1000}",
        &[("logged", true), ("plain", false)],
        &[],
    );
    let logged = rig.url(0);
    let plain = rig.url(1);
    let echo_args = json!({
        "text": "hello-d",
        "password": "hunter2-d",
        "nested": {"ApiToken": "tok-d", "list": [{"client_secret": "sec-d", "n": 1}], "note": "fine"}
    });
    let run = rig.client(&[
        "call",
        &logged,
        "echo",
        &echo_args.to_string(),
        "drop_cluster",
        r#"{"cluster":"prod","token":"tok2-d"}"#,
    ]);
    run.assert_success();
    let run = rig.client(&[
        "call",
        &plain,
        "echo",
        r#"{"text":"plain-d","password":"hunter3-d"}"#,
    ]);
    run.assert_success();
    let headers = rig.client(&[
        "raw-post",
        &logged,
        &echo_body(9, "hdr-d"),
        "Authorization: Bearer authz-secret-d",
        "Cookie: sid=cookie-secret-d",
        "Proxy-Authorization: Basic proxy-secret-d",
        "X-Api-Key: apikey-secret-d",
    ]);
    headers.assert_success();
    headers.assert_status(200);

    let audit = rig.agent.audit_path().to_owned();
    let find = |pred: &dyn Fn(&Value) -> bool| {
        wait_for(Duration::from_secs(5), || {
            read_audit(&audit).0.into_iter().find(|r| pred(r))
        })
        .unwrap_or_else(|| panic!("no such record:\n{}", rig.agent.audit_text()))
    };
    let echo = find(&|r| {
        r["event"] == "request"
            && r["server"] == "logged"
            && r["tool"] == "echo"
            && r["arguments"]["text"] == "hello-d"
    });
    assert_eq!(
        echo["arguments"],
        json!({
            "text": "hello-d",
            "password": "[redacted]",
            "nested": {"ApiToken": "[redacted]", "list": [{"client_secret": "[redacted]", "n": 1}], "note": "fine"}
        }),
        "{echo}"
    );
    assert_eq!(
        echo["args_sha256"],
        sha256_hex(echo_args.to_string().as_bytes()).as_str(),
        "the hash is of the arguments as sent"
    );
    let denied = find(&|r| r["event"] == "refused" && r["tool"] == "drop_cluster");
    assert_eq!(
        denied["arguments"],
        json!({"cluster": "prod", "token": "[redacted]"}),
        "{denied}"
    );
    let response =
        find(&|r| r["event"] == "response" && r["server"] == "logged" && r["tool"] == "echo");
    assert!(
        response["arguments"].is_object(),
        "a response repeats its call's head: {response}"
    );
    let unlogged =
        find(&|r| r["event"] == "request" && r["server"] == "plain" && r["tool"] == "echo");
    assert!(unlogged.get("arguments").is_none(), "{unlogged}");
    assert!(unlogged["arg_keys"].is_array(), "{unlogged}");
    find(&|r| r["event"] == "request" && r["arguments"]["text"] == "hdr-d");

    let text = rig.agent.audit_text();
    assert!(text.contains("hello-d"));
    for secret in [
        "hunter2-d",
        "tok-d",
        "sec-d",
        "tok2-d",
        "plain-d",
        "hunter3-d",
        "authz-secret-d",
        "cookie-secret-d",
        "proxy-secret-d",
        "apikey-secret-d",
    ] {
        assert!(
            !text.contains(secret),
            "{secret} is in the audit log:\n{text}"
        );
    }
    // Nor in the agent's own log.
    let log = rig.agent.log();
    for secret in [
        "hunter2-d",
        "authz-secret-d",
        "cookie-secret-d",
        "apikey-secret-d",
    ] {
        assert!(!log.contains(secret), "{secret} is in the agent's log");
    }
}
