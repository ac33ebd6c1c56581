//! The `Agent` guard: runs the real mcpwarden agent binary and stops it on drop.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// What the agent is started with. Policies are given as JSON text; the guard writes them to
/// files in its temp dir.
pub struct AgentOpts {
    /// A short name for temp files.
    pub name: String,
    /// (endpoint URL, policy JSON) pairs → `--endpoint URL --policy FILE`.
    pub endpoints: Vec<(String, String)>,
    /// `--listen` addresses of the interceptor.
    pub listen: Vec<SocketAddr>,
    /// `--cgroup`: where the programs attach.
    pub cgroup: PathBuf,
    /// `--agent-cgroup`: where the agent moves itself.
    pub agent_cgroup: PathBuf,
}

pub struct Agent {
    child: Option<Child>,
    exit: Option<ExitStatus>,
    log_path: PathBuf,
    audit_path: PathBuf,
    policy_paths: Vec<PathBuf>,
    args: Vec<String>,
    launch: Launch,
    /// How many times [`Agent::respawn`] started it again.
    generation: u32,
    /// `--bpffs-dir`, and whether the guard chose it (and so removes it on drop).
    bpffs_dir: PathBuf,
    owns_bpffs_dir: bool,
    /// The output was already part of a panic message: do not print it again on drop.
    output_shown: bool,
    // Last field: dropped after the process has been stopped.
    tmp: TempDir,
}

pub const READY_MARKER: &str = "mcpwarden ready";

/// How the process is started, kept for [`Agent::respawn`].
struct Launch {
    bin: String,
    /// Started inside this cgroup (`--agent-cgroup self`).
    stay_in: Option<PathBuf>,
    nofile: Option<u64>,
}

impl Agent {
    /// Start `bin run ...` and wait (≤ 60 s) until its output contains `mcpwarden ready`.
    /// Panics, with the captured output, on timeout or early exit.
    pub fn start(bin: &str, opts: AgentOpts) -> Agent {
        Self::start_with(bin, opts, &[])
    }

    /// [`Agent::start`] with more arguments after the usual ones (e.g. `--config FILE`,
    /// `--upstream-ca FILE`). The state directory (`--state-dir`, where the generated CA lives)
    /// is always `state/` in the guard's temp dir, unless `extra` names one.
    pub fn start_with(bin: &str, opts: AgentOpts, extra: &[String]) -> Agent {
        Self::start_limited(bin, opts, extra, None)
    }

    /// [`Agent::start_with`] with the agent's open-file limit (soft and hard) set to `nofile`
    /// before it starts, when given.
    pub fn start_limited(
        bin: &str,
        opts: AgentOpts,
        extra: &[String],
        nofile: Option<u64>,
    ) -> Agent {
        Self::launch(bin, opts, extra, nofile, false)
    }

    /// [`Agent::start_with`], the agent started inside `opts.agent_cgroup` (created) and told to
    /// stay there (`--agent-cgroup self`), as a containerised agent stays in its container's
    /// cgroup.
    pub fn start_staying(bin: &str, opts: AgentOpts, extra: &[String]) -> Agent {
        Self::launch(bin, opts, extra, None, true)
    }

    fn launch(
        bin: &str,
        opts: AgentOpts,
        extra: &[String],
        nofile: Option<u64>,
        stay: bool,
    ) -> Agent {
        let tmp = TempDir::new(&format!("agent-{}", opts.name));
        let log_path = tmp.path().join("agent.log");
        // The audit log in a directory of its own, as the DaemonSet keeps /var/log/mcpwarden
        // apart from /etc/mcpwarden: beside the policy files, every record would also wake the
        // policy watcher's inotify thread.
        let audit_dir = tmp.path().join("log");
        std::fs::create_dir_all(&audit_dir).expect("create the audit log's directory");
        let audit_path = audit_dir.join("audit.jsonl");
        let mut args: Vec<String> = vec!["run".into()];
        let mut policy_paths = Vec::new();
        for (i, (url, policy)) in opts.endpoints.iter().enumerate() {
            let p = tmp.path().join(format!("policy-{i}.json"));
            std::fs::write(&p, policy).expect("write policy file");
            args.push("--endpoint".into());
            args.push(url.clone());
            args.push("--policy".into());
            args.push(p.display().to_string());
            policy_paths.push(p);
        }
        for l in &opts.listen {
            args.push("--listen".into());
            args.push(l.to_string());
        }
        // An `--audit-log` of the caller's (a FIFO) wins; `audit_lines` then reads nothing.
        if !extra.iter().any(|a| a == "--audit-log") {
            args.push("--audit-log".into());
            args.push(audit_path.display().to_string());
        }
        args.push("--cgroup".into());
        args.push(opts.cgroup.display().to_string());
        args.push("--agent-cgroup".into());
        if stay {
            args.push("self".into());
        } else {
            args.push(opts.agent_cgroup.display().to_string());
        }
        // Namespaces pinned on the host (other tests' `ip netns add`) are not this agent's
        // business unless a test says so: by default it watches an empty directory of its own.
        if !extra.iter().any(|a| a == "--netns-dir") {
            args.push("--netns-dir".into());
            args.push(tmp.path().join("netns-pins").display().to_string());
        }
        if !extra.iter().any(|a| a == "--state-dir") {
            args.push("--state-dir".into());
            args.push(tmp.path().join("state").display().to_string());
        }
        // Agents run side by side: each its own admin socket, and a metrics port the kernel
        // picks (the log and `status` say which).
        if !extra.iter().any(|a| a == "--admin-socket") {
            args.push("--admin-socket".into());
            args.push(tmp.path().join("admin.sock").display().to_string());
        }
        if !extra.iter().any(|a| a == "--metrics-listen") {
            args.push("--metrics-listen".into());
            args.push("127.0.0.1:0".into());
        }
        // Each agent pins its datapath in a directory of its own, removed with the guard (unless
        // the test names one, to hand it to a second agent).
        let given_bpffs = extra
            .iter()
            .position(|a| a == "--bpffs-dir")
            .and_then(|i| extra.get(i + 1));
        let owns_bpffs_dir = given_bpffs.is_none();
        let bpffs_dir = match given_bpffs {
            Some(d) => PathBuf::from(d),
            None => {
                let d = test_bpffs_dir(&opts.name);
                args.push("--bpffs-dir".into());
                args.push(d.display().to_string());
                d
            }
        };
        args.extend(extra.iter().cloned());

        let mut agent = Agent {
            child: None,
            exit: None,
            log_path,
            audit_path,
            policy_paths,
            args,
            bpffs_dir,
            owns_bpffs_dir,
            output_shown: false,
            launch: Launch {
                bin: bin.to_owned(),
                stay_in: stay.then(|| opts.agent_cgroup.clone()),
                nofile,
            },
            generation: 0,
            tmp,
        };
        agent.spawn();
        agent
    }

    /// Start the agent again, after it stopped, with the same arguments and `more` after them
    /// (its output goes to a new log file; the audit log is the same).
    pub fn respawn(&mut self, more: &[String]) {
        assert!(self.child.is_none(), "respawn: the agent still runs");
        self.generation += 1;
        self.log_path = self
            .tmp
            .path()
            .join(format!("agent-{}.log", self.generation));
        self.args.extend(more.iter().cloned());
        self.exit = None;
        self.spawn();
    }

    /// A second agent process started with exactly this one's arguments while it still runs
    /// (an upgrade: it takes the listeners over); its output goes to a log of its own, its
    /// audit records to the same file. Drop it before this guard.
    pub fn start_successor(&self, name: &str) -> Agent {
        let tmp = TempDir::new(&format!("agent-{name}"));
        let mut next = Agent {
            child: None,
            exit: None,
            log_path: tmp.path().join("agent.log"),
            audit_path: self.audit_path.clone(),
            policy_paths: self.policy_paths.clone(),
            args: self.args.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
            owns_bpffs_dir: false,
            output_shown: false,
            launch: Launch {
                bin: self.launch.bin.clone(),
                stay_in: self.launch.stay_in.clone(),
                nofile: self.launch.nofile,
            },
            generation: 0,
            tmp,
        };
        next.spawn();
        next
    }

    /// Spawn the child process and wait (≤ 60 s) for `mcpwarden ready`.
    fn spawn(&mut self) {
        let Launch {
            bin,
            stay_in,
            nofile,
        } = &self.launch;
        let (bin, nofile) = (bin.as_str(), *nofile);
        let log = File::create(&self.log_path).expect("create agent log");
        let mut cmd = Command::new(bin);
        if let Some(dir) = stay_in {
            std::fs::create_dir_all(dir).expect("create the agent's cgroup");
            crate::cgroup::spawn_in_cgroup(&mut cmd, dir);
        }
        if let Some(n) = nofile {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit between fork and exec, on memory allocated before the fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log fd")))
            .stderr(Stdio::from(log))
            .env("RUST_BACKTRACE", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent {bin}: {e}"));
        self.child = Some(child);
        let agent = self;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if agent.log().contains(READY_MARKER) {
                return;
            }
            if let Some(status) = agent
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .expect("try_wait agent")
            {
                agent.exit = Some(status);
                agent.child = None;
                agent.output_shown = true;
                panic!(
                    "agent exited ({status}) before printing `{READY_MARKER}`\nargs: {:?}\n--- agent output ---\n{}",
                    agent.args,
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                agent.output_shown = true;
                panic!(
                    "agent did not print `{READY_MARKER}` within 60 s\nargs: {:?}\n--- agent output ---\n{}",
                    agent.args,
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The arguments it was started with (after the binary).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Where the agent pins its links and maps (`--bpffs-dir`).
    /// `--admin-socket`, as passed.
    pub fn admin_socket(&self) -> PathBuf {
        self.arg("--admin-socket")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/mcpwarden/admin.sock"))
    }

    /// The value after `flag` in the arguments (the last one given).
    pub fn arg(&self, flag: &str) -> Option<String> {
        self.args
            .iter()
            .rposition(|a| a == flag)
            .and_then(|i| self.args.get(i + 1))
            .cloned()
    }

    /// The metrics listener's address, from the log line the agent writes when it listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        let log = self.log();
        log.lines()
            .rev()
            .filter(|l| l.contains("metrics listener"))
            .filter_map(|l| l.split("addr=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .find_map(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics listener in the agent's log:\n{log}"))
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// SIGKILL, as an OOM kill or a crash ends it: no clean-up of its own runs.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let mut child = self.child.take().expect("agent child");
        let _ = child.kill();
        let status = child.wait().expect("wait agent");
        self.exit = Some(status);
        status
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the agent printed on stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    pub fn policy_path(&self, i: usize) -> &Path {
        &self.policy_paths[i]
    }

    pub fn temp_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The generated CA's certificate (`state/ca.crt`), for clients to trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.tmp.path().join("state").join("ca.crt")
    }

    /// The raw text of the audit log (empty if it does not exist yet).
    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap_or_default()
    }

    /// Every audit record. Panics if a complete line is not a JSON object.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        let text = self.audit_text();
        let mut out = Vec::new();
        // Ignore a trailing partial line (the agent may be in the middle of writing it).
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("audit line is not JSON ({e}): {line}\n--- whole audit ---\n{text}")
            });
            assert!(v.is_object(), "audit line is not a JSON object: {line}");
            out.push(v);
        }
        out
    }

    /// Audit records of `tool` that carry a decision.
    pub fn decisions_for(&self, tool: &str) -> Vec<serde_json::Value> {
        self.audit_lines()
            .into_iter()
            .filter(|r| r["tool"] == tool && !r["decision"].is_null())
            .collect()
    }

    /// Poll the audit log (≤ `timeout`) until some record satisfies `pred`; return it.
    pub fn wait_audit(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        crate::wait_for(timeout, || self.audit_lines().into_iter().find(|v| pred(v)))
    }

    /// The first log line (≤ `timeout`) that contains every one of `needles`.
    pub fn wait_log(&self, timeout: Duration, needles: &[&str]) -> Option<String> {
        crate::wait_for(timeout, || {
            self.log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        })
    }

    /// Wait (≤ 30 s) until the agent says it serves the network namespace with inode `ino`;
    /// return that log line. Panics, with the log, if it never does.
    pub fn wait_netns_ready(&self, ino: u64) -> String {
        self.wait_log(
            Duration::from_secs(30),
            &["network namespace ready", &format!("netns={ino} ")],
        )
        .unwrap_or_else(|| {
            panic!(
                "the agent never said it serves network namespace {ino}:\n{}",
                self.log()
            )
        })
    }

    /// Stop the agent (SIGSTOP) until the returned guard drops (SIGCONT), also when the test
    /// fails meanwhile: nothing it does (accepting, discovering namespaces) happens while paused.
    pub fn pause(&self) -> Paused {
        let pid = self.pid().expect("a running agent") as i32;
        // SAFETY: stopping a child process this guard owns.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Paused(pid)
    }

    /// Send SIGTERM and wait ≤ 10 s; then SIGKILL. Returns the exit status, and whether it had
    /// to be killed.
    pub fn terminate(&mut self) -> (ExitStatus, bool) {
        if let Some(status) = self.exit {
            return (status, false);
        }
        let mut child = self.child.take().expect("agent child");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait agent") {
                self.exit = Some(status);
                return (status, false);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait agent");
                self.exit = Some(status);
                return (status, true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Has the agent exited by itself? (Some(status) if so.)
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.exit {
            return Some(s);
        }
        let s = self.child.as_mut()?.try_wait().ok()??;
        self.exit = Some(s);
        self.child = None;
        Some(s)
    }

    /// Panic, with the log, if the agent has died.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_exit() {
            self.output_shown = true;
            panic!(
                "agent died unexpectedly ({s})\n--- agent output ---\n{}",
                self.log()
            );
        }
    }
}

/// A stopped agent; dropping this continues it.
pub struct Paused(i32);

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: continuing a child process the agent guard owns.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let (_status, killed) = self.terminate();
            if killed {
                eprintln!("agent did not exit within 10 s of SIGTERM and was killed");
            }
        }
        if self.owns_bpffs_dir {
            remove_pins(&self.bpffs_dir);
        }
        if std::thread::panicking() && !self.output_shown {
            eprintln!(
                "--- agent output (test failed) ---\n{}\n--- end of agent output ---",
                self.log()
            );
        }
        // Last: every line the agent wrote must match docs/audit.schema.json. Panics (or, in a
        // test already failing, prints) with the file, line number and the validator's message.
        crate::schema::assert_audit_file_matches_schema(&self.audit_path);
    }
}

/// A bpffs directory of this test process's own, below /sys/fs/bpf/mcpwarden-tests (the agent
/// mounts bpffs at /sys/fs/bpf if it is not there yet).
pub fn test_bpffs_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    PathBuf::from("/sys/fs/bpf/mcpwarden-tests").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Remove a pin directory and everything in it: its links (their programs detach) and maps.
pub fn remove_pins(dir: &Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("could not remove the pins in {}: {e}", dir.display());
        }
    }
}

/// Removes a pin directory shared by several agents of one test when dropped.
pub struct PinsGuard(pub PathBuf);

impl PinsGuard {
    pub fn new(name: &str) -> Self {
        PinsGuard(test_bpffs_dir(name))
    }
}

impl Drop for PinsGuard {
    fn drop(&mut self) {
        remove_pins(&self.0);
    }
}
