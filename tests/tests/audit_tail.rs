//! `mcpwarden audit tail`: the real binary on a recorded audit log (`fixtures/audit/recorded.jsonl`,
//! written by agents of these tests): one line per call with its latency, filters, colours only
//! when asked or on a terminal, standard input, `--follow` across appends, a rotation and a truncation, bad lines
//! skipped, a closed pipe.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::AGENT_BIN;
use mcpwarden_tests::{schema, TempDir};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/audit/recorded.jsonl");

fn records() -> Vec<Value> {
    std::fs::read_to_string(FIXTURE)
        .expect("read the fixture")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a fixture line is JSON"))
        .collect()
}

fn event(r: &Value) -> &str {
    r["event"].as_str().unwrap_or("")
}

/// Runs `mcpwarden audit tail ARGS` to its end; (success, stdout, stderr).
fn tail(args: &[&str], stdin: Option<&Path>) -> (bool, String, String) {
    let mut cmd = Command::new(AGENT_BIN);
    cmd.arg("audit")
        .arg("tail")
        .args(args)
        .env_remove("NO_COLOR");
    cmd.stdin(match stdin {
        Some(path) => Stdio::from(std::fs::File::open(path).expect("open stdin file")),
        None => Stdio::null(),
    });
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {AGENT_BIN} audit tail: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tail_ok(args: &[&str]) -> Vec<String> {
    let (ok, out, err) = tail(args, None);
    assert!(ok, "audit tail {args:?} failed:\n{out}\n{err}");
    assert!(err.is_empty(), "audit tail {args:?} warned:\n{err}");
    out.lines().map(str::to_owned).collect()
}

/// The records `audit tail` shows a line for by default: all but responses (merged into their
/// call's line), `non_mcp` and `server_message`.
fn shown(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| !matches!(event(r), "response" | "non_mcp" | "server_message"))
        .collect()
}

#[test]
fn the_fixture_is_a_recorded_log_that_matches_the_schema() {
    let records = records();
    assert!(records.len() >= 20, "{} records", records.len());
    for kind in ["request", "response", "refused", "non_mcp"] {
        assert!(
            records.iter().any(|r| event(r) == kind),
            "no {kind} record in the fixture"
        );
    }
    assert!(
        schema::audit_file_problems(Path::new(FIXTURE)).is_empty(),
        "{:#?}",
        schema::audit_file_problems(Path::new(FIXTURE))
    );
}

#[test]
fn one_line_per_call_with_its_latency() {
    let records = records();
    let lines = tail_ok(&[FIXTURE]);
    assert_eq!(
        lines.len(),
        shown(&records).len(),
        "one line per request and per refusal:\n{}",
        lines.join("\n")
    );
    // Each answered tools/call's line carries the latency of its response.
    let mut checked = 0;
    for request in records
        .iter()
        .filter(|r| event(r) == "request" && r["method"] == "tools/call")
    {
        let response = records
            .iter()
            .find(|r| {
                event(r) == "response"
                    && ["pid", "cgroup_id", "dst", "server", "id", "tool"]
                        .iter()
                        .all(|f| r[f] == request[f])
            })
            .unwrap_or_else(|| panic!("no response to {request} in the fixture"));
        let latency = format!(
            "{:.1} ms",
            response["latency_ms"].as_f64().expect("latency")
        );
        let tool = request["tool"].as_str().expect("tool");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("  {tool} ")) && l.contains(&latency)),
            "no line for {tool} with {latency}:\n{}",
            lines.join("\n")
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the fixture has {checked} answered tool calls"
    );
    // No colours on a pipe. Each line starts with the time (UTC, HH:MM:SS.mmm) of the record
    // that opened it: the lines' times are the shown records' times.
    assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:?}");
    let mut printed: Vec<&str> = lines.iter().map(|l| &l[..12]).collect();
    let mut want: Vec<&str> = shown(&records)
        .iter()
        .map(|r| &r["ts"].as_str().expect("ts")[11..23])
        .collect();
    printed.sort_unstable();
    want.sort_unstable();
    assert_eq!(printed, want, "{}", lines.join("\n"));
}

#[test]
fn filters_by_decision_tool_and_caller() {
    let records = records();
    let shown = shown(&records);

    let denied = tail_ok(&["--decision", "deny", FIXTURE]);
    let want = shown.iter().filter(|r| r["decision"] == "deny").count();
    assert!(want >= 2, "the fixture has {want} denials");
    assert_eq!(denied.len(), want, "{}", denied.join("\n"));
    assert!(denied.iter().all(|l| l.contains("  deny ")), "{denied:?}");

    let allowed = tail_ok(&["--decision=allow", FIXTURE]);
    let want = shown.iter().filter(|r| r["decision"] == "allow").count();
    assert_eq!(allowed.len(), want, "{}", allowed.join("\n"));
    assert!(
        allowed.iter().all(|l| l.contains("  allow ")),
        "{allowed:?}"
    );

    let tool = shown
        .iter()
        .find(|r| event(r) == "request" && r["tool"].is_string())
        .and_then(|r| r["tool"].as_str())
        .expect("an allowed tool call");
    let by_tool = tail_ok(&["--tool", tool, FIXTURE]);
    let want = shown.iter().filter(|r| r["tool"] == tool).count();
    assert_eq!(by_tool.len(), want, "{}", by_tool.join("\n"));
    assert!(by_tool.iter().all(|l| l.contains(&format!("  {tool} "))));
    assert!(tail_ok(&["--tool", "no_such_tool", FIXTURE]).is_empty());

    // The caller: any case, a part of comm, pid, uid or cgroup.
    let comm = shown
        .iter()
        .find_map(|r| r["comm"].as_str())
        .expect("a caller")
        .to_owned();
    let by_comm = tail_ok(&["--caller", &comm.to_uppercase(), FIXTURE]);
    let want = shown
        .iter()
        .filter(|r| {
            r["comm"]
                .as_str()
                .is_some_and(|c| c.to_lowercase().contains(&comm.to_lowercase()))
                || r["cgroup"]
                    .as_str()
                    .is_some_and(|c| c.to_lowercase().contains(&comm.to_lowercase()))
        })
        .count();
    assert!(want >= 1);
    assert_eq!(by_comm.len(), want, "{}", by_comm.join("\n"));
    let pid = shown
        .iter()
        .find_map(|r| r["pid"].as_u64())
        .expect("a pid")
        .to_string();
    let by_pid = tail_ok(&["--caller", &pid, FIXTURE]);
    assert!(!by_pid.is_empty() && by_pid.iter().all(|l| l.contains(&format!("[{pid}]"))));
    assert!(tail_ok(&["--caller", "no-such-caller", FIXTURE]).is_empty());

    // Filters combine.
    let both = tail_ok(&["--decision", "deny", "--tool", tool, FIXTURE]);
    let want = shown
        .iter()
        .filter(|r| r["tool"] == tool && r["decision"] == "deny")
        .count();
    assert_eq!(both.len(), want, "{}", both.join("\n"));
}

#[test]
fn colours_only_when_asked_or_on_a_terminal() {
    let plain = tail_ok(&[FIXTURE]).join("\n");
    assert!(!plain.contains('\x1b'), "colours on a pipe:\n{plain}");
    let coloured = tail_ok(&["--color", "always", FIXTURE]).join("\n");
    assert!(coloured.contains("\x1b[31mdeny\x1b[0m"), "{coloured:?}");
    assert!(coloured.contains("\x1b[32mallow\x1b[0m"), "{coloured:?}");
    // Nothing but the colour codes differs.
    assert_eq!(
        coloured
            .replace("\x1b[31m", "")
            .replace("\x1b[32m", "")
            .replace("\x1b[33m", "")
            .replace("\x1b[0m", ""),
        plain
    );
    assert!(!tail_ok(&["--color=never", FIXTURE])
        .join("\n")
        .contains('\x1b'));
}

/// `audit tail ARGS` with its standard output on a pseudo-terminal; what it wrote there.
fn tail_on_a_terminal(args: &[&str], no_color: Option<&str>) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes the two descriptors it opens; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both were just opened and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(AGENT_BIN);
    cmd.arg("audit")
        .arg("tail")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped());
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    let child = cmd.spawn().expect("spawn audit tail on a terminal");
    // The parent's copy of the terminal's end went with `cmd`: reading the master ends (EIO)
    // once the child has exited.
    drop(cmd);
    let mut master = std::fs::File::from(master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut master, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let done = wait_with_timeout(child, Duration::from_secs(30));
    assert!(done.status.success(), "{}", done.stderr);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn colours_on_a_terminal_unless_no_color() {
    let shown = tail_on_a_terminal(&[FIXTURE], None);
    assert!(shown.contains("\x1b[31mdeny\x1b[0m"), "{shown:?}");
    let plain = tail_on_a_terminal(&[FIXTURE], Some("1"));
    assert!(
        !plain.contains('\x1b') && plain.contains("deny"),
        "{plain:?}"
    );
    let never = tail_on_a_terminal(&["--color", "never", FIXTURE], None);
    assert!(
        !never.contains('\x1b') && never.contains("deny"),
        "{never:?}"
    );
}

#[test]
fn standard_input_reads_the_same() {
    let from_file = tail_ok(&[FIXTURE]);
    for args in [&[][..], &["-"][..]] {
        let (ok, out, err) = tail(args, Some(Path::new(FIXTURE)));
        assert!(ok && err.is_empty(), "{out}\n{err}");
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        assert_eq!(lines, from_file, "stdin ({args:?}) and FILE differ");
    }
}

#[test]
fn a_line_that_is_not_json_is_skipped_with_a_warning() {
    let dir = TempDir::new("audit-tail-bad");
    let path = dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    // What a full disk leaves: a cut line, then zeros; and a line of something else.
    let mut half = lines[1].len() / 2;
    while !lines[1].is_char_boundary(half) {
        half -= 1;
    }
    let cut = &lines[1][..half];
    let broken = format!("{cut}\0\0\0");
    lines.insert(1, &broken);
    lines.insert(3, "[1, 2]");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) = tail(&[path.to_str().unwrap()], None);
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), tail_ok(&[FIXTURE]));
    assert!(
        err.contains(&format!(
            "{}:2: skipped a line that is not JSON",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(":4: skipped a line that is not a JSON object"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_closed_pipe_ends_it_quietly() {
    // Far more output than a pipe holds; the reader takes one line and goes.
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let input = text.repeat(300);
    let mut child = Command::new(AGENT_BIN)
        .args(["audit", "tail"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn audit tail");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // Fails with EPIPE once the reader has gone: expected.
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(!first.is_empty());
    drop(stdout);
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let _ = writer.join();
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

struct Finished {
    status: std::process::ExitStatus,
    stderr: String,
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Finished {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Finished { status, stderr };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("audit tail did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `audit tail --follow`, its lines read as they come; killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(path: &Path) -> Follower {
        let mut child = Command::new(AGENT_BIN)
            .args(["audit", "tail", "--follow"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn audit tail --follow");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (≤ 10 s) for a line containing `needle`; panics with what was seen.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with `{needle}` within 10 s; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A refusal of the fixture's, renamed to tool `name`: one line, printed at once.
fn probe(name: &str) -> String {
    let mut r = records()
        .into_iter()
        .find(|r| event(r) == "refused" && r["tool"].is_string())
        .expect("a refused tool call in the fixture");
    r["tool"] = Value::from(name);
    format!("{r}\n")
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn follow_reads_what_is_appended_and_survives_rotation_and_truncation() {
    let dir = TempDir::new("audit-tail-follow");
    let path = dir.path().join("audit.jsonl");
    std::fs::copy(FIXTURE, &path).unwrap();
    let mut f = Follower::start(&path);
    // What was there at start, calls merged with their answers (a call the fixture has no
    // answer to is printed later, after the hold, and says so differently).
    let expected: Vec<String> = tail_ok(&[FIXTURE])
        .into_iter()
        .filter(|l| !l.ends_with("(no answer)"))
        .collect();
    f.wait_for(expected.last().unwrap());

    // Appended after start, a line in two writes.
    append(&path, &probe("probe_appended"));
    f.wait_for("  probe_appended ");
    let split = probe("probe_split");
    append(&path, &split[..40]);
    std::thread::sleep(Duration::from_millis(500));
    append(&path, &split[40..]);
    f.wait_for("  probe_split ");

    // logrotate `create`: renamed, a new file created at the path.
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    append(&dir.path().join("audit.jsonl.1"), &probe("probe_old_file"));
    std::thread::sleep(Duration::from_millis(500));
    append(&path, &probe("probe_after_rotation"));
    f.wait_for("  probe_after_rotation ");
    f.wait_for("  probe_old_file ");

    // Removed, then created again.
    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    append(&path, &probe("probe_after_removal"));
    f.wait_for("  probe_after_removal ");

    // logrotate `copytruncate`: emptied in place, then written again.
    append(&path, &probe("probe_before_truncation"));
    f.wait_for("  probe_before_truncation ");
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    append(&path, &probe("probe_after_truncation"));
    f.wait_for("  probe_after_truncation ");

    // Every line once: nothing read twice across the rotations.
    for probe in [
        "probe_appended",
        "probe_split",
        "probe_old_file",
        "probe_after_rotation",
        "probe_after_removal",
        "probe_before_truncation",
        "probe_after_truncation",
    ] {
        assert_eq!(f.count(&format!("  {probe} ")), 1, "{}", f.seen.join("\n"));
    }
    for line in &expected {
        assert_eq!(
            f.seen.iter().filter(|l| *l == line).count(),
            expected.iter().filter(|l| *l == line).count(),
            "{line}\n--- seen ---\n{}",
            f.seen.join("\n")
        );
    }
}
