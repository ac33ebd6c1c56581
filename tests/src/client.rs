//! Running the `mcp-client` binary as a subprocess inside a test cgroup.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cgroup::spawn_in_cgroup;

/// What a finished `mcp-client` run printed.
#[derive(Debug)]
pub struct ClientRun {
    /// The pid the client printed first (`pid=<n>`).
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub args: Vec<String>,
}

impl ClientRun {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Lines of stdout after the `pid=` line.
    pub fn lines(&self) -> Vec<String> {
        self.stdout_text()
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    }

    /// The JSON lines printed by `call` (one per call).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("client line is not JSON ({e}): {l}\n{}", self.describe())
                })
            })
            .collect()
    }

    /// Value of a `key=value` line.
    pub fn field(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.stdout_text()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    /// For `raw-post` and `peer ... BODY`: the exact body bytes (`body-len=N` followed by a
    /// newline and N bytes).
    pub fn body(&self) -> Option<Vec<u8>> {
        let marker = b"\nbody-len=";
        let i = self
            .stdout
            .windows(marker.len())
            .position(|w| w == marker)?;
        let rest = &self.stdout[i + marker.len()..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let len: usize = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
        let body = &rest[nl + 1..];
        assert!(
            body.len() >= len,
            "truncated body in client output\n{}",
            self.describe()
        );
        Some(body[..len].to_vec())
    }

    pub fn body_json(&self) -> serde_json::Value {
        let b = self
            .body()
            .unwrap_or_else(|| panic!("no body in client output\n{}", self.describe()));
        serde_json::from_slice(&b).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}\n{}",
                String::from_utf8_lossy(&b),
                self.describe()
            )
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "mcp-client {:?} exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args,
            self.status,
            self.stdout_text(),
            self.stderr
        )
    }

    /// Panic unless the client exited 0.
    /// Assert that the HTTP status the client printed is `code`.
    pub fn assert_status(&self, code: u16) -> &Self {
        let status = self.field("status").unwrap_or_default();
        assert!(
            status.contains(&format!(" {code}")),
            "expected HTTP {code}, got `{status}`\n{}",
            self.describe()
        );
        self
    }

    /// Assert that the `key=value` line the client printed has this value.
    pub fn assert_field(&self, key: &str, expected: &str) -> &Self {
        assert_eq!(
            self.field(key).as_deref(),
            Some(expected),
            "{}",
            self.describe()
        );
        self
    }

    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "mcp-client failed\n{}",
            self.describe()
        );
        self
    }
}

/// Run `bin args...` inside the cgroup `cgroup_dir` (or in the test's own cgroup if `None`),
/// waiting at most `timeout` (then it is killed and the test fails).
pub fn run_client(
    bin: &str,
    cgroup_dir: Option<&Path>,
    args: &[&str],
    timeout: Duration,
) -> ClientRun {
    run_client_env(bin, cgroup_dir, args, &[], timeout)
}

/// [`run_client`] with extra environment variables (e.g. `SSL_CERT_FILE`, how an unmodified
/// client is told to trust the mcpwarden CA).
pub fn run_client_env(
    bin: &str,
    cgroup_dir: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> ClientRun {
    run_client_with(
        bin,
        Placement {
            cgroup: cgroup_dir,
            netns: None,
        },
        args,
        env,
        timeout,
    )
}

/// Where a client process runs: a cgroup (joined first), then a network namespace.
#[derive(Clone, Copy, Default)]
pub struct Placement<'a> {
    pub cgroup: Option<&'a Path>,
    pub netns: Option<&'a std::os::fd::OwnedFd>,
}

/// [`run_client_env`] in a cgroup and a network namespace.
pub fn run_client_with(
    bin: &str,
    at: Placement<'_>,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> ClientRun {
    let mut cmd = Command::new(bin);
    cmd.envs(env.iter().copied());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_proxies(&mut cmd);
    if let Some(dir) = at.cgroup {
        spawn_in_cgroup(&mut cmd, dir);
    }
    if let Some(fd) = at.netns {
        crate::pods::enter_netns(&mut cmd, fd);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin} {args:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(s) = child.try_wait().expect("try_wait client") {
            break (s, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait().expect("wait client"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let pid_line = String::from_utf8_lossy(&stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let pid = pid_line.strip_prefix("pid=").and_then(|p| p.parse().ok());
    let run = ClientRun {
        pid: pid.unwrap_or(0),
        status,
        stdout,
        stderr,
        args,
    };
    if timed_out {
        panic!(
            "mcp-client did not finish within {timeout:?} and was killed\n{}",
            run.describe()
        );
    }
    if pid.is_none() {
        panic!(
            "mcp-client did not print `pid=<n>` first\n{}",
            run.describe()
        );
    }
    run
}

/// A child process whose stdout lines arrive on a channel as it prints them (for clients that
/// must be watched while they run: an SSE stream, a connection waiting in a queue).
pub struct LineChild {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line received so far.
    pub seen: Vec<String>,
}

impl LineChild {
    /// Spawn `cmd` (stdout piped, stdin null) and read its lines on a thread.
    pub fn spawn(mut cmd: Command) -> LineChild {
        use std::io::BufRead;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineChild {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (≤ `timeout`) for a line that satisfies `pred` and return it; None if the output
    /// ended or the time ran out first.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Wait for the process to exit; return its status and every line it printed.
    pub fn finish(mut self) -> (ExitStatus, Vec<String>) {
        let status = self.child.wait().expect("wait for the child");
        let rest: Vec<String> = self.lines.iter().collect();
        self.seen.extend(rest);
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client must talk to the addresses it is given, never to a proxy from the environment.
pub fn without_proxies(cmd: &mut Command) {
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("NO_PROXY", "*");
}
