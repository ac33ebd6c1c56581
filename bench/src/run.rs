//! The orchestrator: one agent, one nginx, one responder, and every scenario run on the three
//! paths alternately in one invocation.
//!
//! - direct: the load generator in the `plain` cgroup (no programs) dials the responder;
//! - nginx: the load generator in `plain` dials nginx (also in `plain`), which proxies to the
//!   responder over keep-alive;
//! - agent: the load generator in the `redirected` cgroup (the agent's attach point) dials the
//!   responder; connect4 sends it to the interceptor, which forwards to the responder.
//!
//! The agent path is checked, not assumed: the audit log must gain one `request` record per
//! call, and the direct and nginx paths must add none.
//!
//! Scenario 5b (the policy decision, [`crate::policyrun`]) runs first, in a process of its own,
//! before any of this starts. Scenario 7 (SSE, [`crate::sserun`]) runs after 1–4, on the same agent configuration.
//! Scenario 6 (TLS, [`crate::tlsrun`]) runs after 7: it adds TLS responders and a TLS-terminating
//! nginx, and restarts the agent with `https://` endpoints. Scenario 8 (pods, [`crate::podrun`])
//! runs last: it adds network namespaces of its own and restarts the agent to serve them.

use std::{
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use mcpwarden_tests::{free_port, require_root, spawn_in_cgroup, Agent, AgentOpts, TestCgroup};

use crate::{
    load::{Call, LoadResult, LoadSpec, Shape, PATH},
    nginx::{Hop, Nginx},
    probe::ConnectResult,
    report::{self, Report},
    stats::Spread,
};

#[derive(clap::Args)]
pub struct RunOpts {
    /// A one-minute smoke run: it checks that the harness works and asserts no timing.
    #[arg(long)]
    pub quick: bool,
    /// The mcpwarden binary (a release build).
    #[arg(long)]
    pub agent: PathBuf,
    /// Where to write the report (markdown).
    #[arg(long)]
    pub out: PathBuf,
    /// criterion's output directory, whose estimates go into the report.
    #[arg(long)]
    pub criterion: Option<PathBuf>,
    /// The command line to print in the report.
    #[arg(long, default_value = "cargo xtask bench")]
    pub command: String,
    /// Run scenario 6 (TLS) alone: for working on the TLS harness; the report's other
    /// sections are empty.
    #[arg(long, hide = true, conflicts_with_all = ["sse_only", "policy_only"])]
    pub tls_only: bool,
    /// Run scenario 7 (SSE) alone: for working on the SSE harness; the report's other
    /// sections are empty.
    #[arg(long, hide = true, conflicts_with = "policy_only")]
    pub sse_only: bool,
    /// Run scenario 5b (the policy decision, in process) alone: no agent, nginx or cgroups are
    /// started; the report's other sections are empty.
    #[arg(long, hide = true)]
    pub policy_only: bool,
    /// Run scenarios 2a and 3 alone (for A/B runs of two agent builds): the report's other
    /// sections are empty.
    #[arg(long, hide = true, conflicts_with_all = ["tls_only", "sse_only", "policy_only"])]
    pub cpu_only: bool,
    /// Run scenario 8 (pods) alone: for working on the pods harness; the report's other
    /// sections are empty.
    #[arg(long, hide = true, conflicts_with_all = ["tls_only", "sse_only", "policy_only", "cpu_only"])]
    pub pods_only: bool,
    /// Repeats of each scenario instead of the mode's default (5, quick: 1).
    #[arg(long, hide = true)]
    pub repeats: Option<usize>,
}

/// The bench policy: the tools the load calls are allowed (`echo`, and `progress`, answered
/// over SSE); everything else is denied.
const POLICY: &str = r#"{"version":"1","default":"deny","tools":{"echo":{},"progress":{}}}"#;

/// Bench addresses: 127.0.0.220+, above every index the integration tests use.
pub fn bench_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 220 + i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Nginx,
    Agent,
}

pub const ROUTES: [Route; 3] = [Route::Direct, Route::Nginx, Route::Agent];

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Nginx => "nginx",
            Route::Agent => "mcpwarden",
        }
    }
}

/// One load run on one route, with the proxy's CPU time (agent or nginx worker) over it.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub load: LoadResult,
    pub proxy_cpu_us_per_call: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub agent_idle_kib: u64,
    pub agent_1k_kib: u64,
    pub nginx_idle_kib: u64,
    pub nginx_1k_kib: u64,
}

/// A child process killed on drop.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Counts `request` records appended to the audit log since the last look (and `refused` and
/// `non_mcp` records since the start).
struct AuditCounter {
    path: PathBuf,
    offset: u64,
    carry: Vec<u8>,
    refused: u64,
    non_mcp: u64,
}

impl AuditCounter {
    fn new(agent: &Agent) -> AuditCounter {
        AuditCounter {
            path: agent.audit_path().to_path_buf(),
            offset: 0,
            carry: Vec::new(),
            refused: 0,
            non_mcp: 0,
        }
    }

    fn new_requests(&mut self) -> Result<u64> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = std::mem::take(&mut self.carry);
        let start = buf.len();
        f.read_to_end(&mut buf)?;
        self.offset += (buf.len() - start) as u64;
        // Only complete lines count; a partial last line waits for the next look.
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.carry = buf.split_off(end);
        let count = |needle: &[u8]| {
            buf.split(|&b| b == b'\n')
                .filter(|line| line.windows(needle.len()).any(|w| w == needle))
                .count() as u64
        };
        self.refused += count(br#""event":"refused""#);
        self.non_mcp += count(br#""event":"non_mcp""#);
        Ok(count(br#""event":"request""#))
    }
}

pub struct Bench {
    pub quick: bool,
    pub exe: PathBuf,
    pub redirected: PathBuf,
    pub plain: PathBuf,
    upstream: SocketAddr,
    nginx: Nginx,
    pub agent: Agent,
    audit: AuditCounter,
    agent_bin: PathBuf,
    agent_cgroup: PathBuf,
    /// What the agent is (re)started with: its endpoints and extra arguments.
    agent_config: AgentConfig,
    /// ERROR lines of the agents stopped so far.
    pub agent_log_errors: Vec<String>,
    /// Where the connect() scenario dials: an accept-and-drop listener in `plain`.
    sink_addr: SocketAddr,
    _sink: Proc,
    _responder: Proc,
    // Last: removed after every process in it has stopped.
    _cgroup: TestCgroup,
}

/// Run `cmd` in `cgroup`, wait, and return its last stdout line; stderr is passed through.
pub fn child_output(cmd: Command, cgroup: &Path) -> Result<String> {
    child_output_in(cmd, cgroup, None)
}

/// Make `cmd` enter the network namespace at `netns` between fork and exec, after the pre_exec
/// hooks registered so far (joining a cgroup). The returned descriptor must stay open until
/// the child has been spawned.
pub fn enter_netns(cmd: &mut Command, netns: Option<&Path>) -> Result<Option<OwnedFd>> {
    let Some(path) = netns else {
        return Ok(None);
    };
    let fd: OwnedFd = std::fs::File::open(path)
        .with_context(|| format!("opening the network namespace {}", path.display()))?
        .into();
    mcpwarden_tests::pods::enter_netns(cmd, &fd);
    Ok(Some(fd))
}

/// [`child_output`], the child in the network namespace at `netns` (when given).
pub fn child_output_in(mut cmd: Command, cgroup: &Path, netns: Option<&Path>) -> Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    spawn_in_cgroup(&mut cmd, cgroup);
    let _ns = enter_netns(&mut cmd, netns)?;
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {stdout}", out.status);
    }
    stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{cmd:?} printed nothing"))
}

pub struct ProcStat {
    pub ppid: u32,
    pub cpu_ticks: u64,
}

/// Fields of /proc/PID/stat (after the parenthesised comm, which may contain spaces).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(proc_stat(pid)?.cpu_ticks as f64 / hz.max(1) as f64)
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Start `exe SUBCOMMAND --listen IP:0 EXTRA…` in `cgroup` and read the `listening ADDR` line.
pub fn spawn_listening(
    exe: &Path,
    subcommand: &str,
    ip: Ipv4Addr,
    cgroup: &Path,
    extra: &[&std::ffi::OsStr],
) -> Result<(Proc, SocketAddr)> {
    spawn_listening_in(exe, subcommand, ip, cgroup, None, extra)
}

/// [`spawn_listening`], the process in the network namespace at `netns` (when given).
pub fn spawn_listening_in(
    exe: &Path,
    subcommand: &str,
    ip: Ipv4Addr,
    cgroup: &Path,
    netns: Option<&Path>,
    extra: &[&std::ffi::OsStr],
) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(exe);
    cmd.arg(subcommand)
        .arg("--listen")
        .arg(SocketAddr::new(ip.into(), 0).to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    spawn_in_cgroup(&mut cmd, cgroup);
    let _ns = enter_netns(&mut cmd, netns)?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {subcommand}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let proc = Proc(child);
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("the {subcommand} did not say where it listens: {line:?}")
        })?;
    Ok((proc, addr))
}

/// The agent's endpoints (each with the bench policy), its listen address and extra arguments.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub endpoints: Vec<String>,
    /// `--listen`: [`AgentConfig::any_port`] unless a scenario needs the port known in advance.
    pub listen: SocketAddr,
    pub extra: Vec<String>,
}

impl AgentConfig {
    fn plain(upstream: SocketAddr) -> AgentConfig {
        AgentConfig {
            endpoints: vec![format!("http://{upstream}{PATH}")],
            listen: AgentConfig::any_port(),
            extra: Vec::new(),
        }
    }

    /// The interceptor's usual address: a bench address, any port.
    pub fn any_port() -> SocketAddr {
        SocketAddr::new(bench_ip(2).into(), 0)
    }
}

fn start_agent(
    bin: &Path,
    config: &AgentConfig,
    redirected: &Path,
    agent_cgroup: &Path,
) -> Result<Agent> {
    let bin = bin
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("agent path is not UTF-8"))?;
    // One holder keeps 10,000 SSE streams open from one cgroup (scenario 7b): past the
    // default connection limits, which are for production callers.
    let limits = std::env::temp_dir().join(format!(
        "mcpwarden-bench-limits-{}.yaml",
        std::process::id()
    ));
    std::fs::write(
        &limits,
        "limits:\n  max_connections: 1000000\n  max_connections_per_caller: 1000000\n",
    )?;
    let mut extra = config.extra.clone();
    extra.extend(["--config".to_owned(), limits.display().to_string()]);
    Ok(Agent::start_with(
        bin,
        AgentOpts {
            name: "bench".into(),
            endpoints: config
                .endpoints
                .iter()
                .map(|url| (url.clone(), POLICY.to_owned()))
                .collect(),
            listen: vec![config.listen],
            cgroup: redirected.to_path_buf(),
            agent_cgroup: agent_cgroup.to_path_buf(),
        },
        &extra,
    ))
}

impl Bench {
    fn start(opts: &RunOpts) -> Result<Bench> {
        require_root();
        let exe = std::env::current_exe()?;
        let cgroup = TestCgroup::new("bench");
        let redirected = cgroup.child("redirected");
        let plain = cgroup.child("plain");

        let (responder, upstream) = spawn_listening(&exe, "responder", bench_ip(0), &plain, &[])?;
        let (sink, sink_addr) = spawn_listening(&exe, "sink", bench_ip(3), &plain, &[])?;

        let nginx_addr = SocketAddr::new(bench_ip(1).into(), free_port(bench_ip(1)));
        let nginx = Nginx::start(&plain, nginx_addr, &Hop::Plain { upstream })?;

        let agent_bin = opts.agent.clone();
        let agent_cgroup = cgroup.path().join("agent");
        let agent_config = AgentConfig::plain(upstream);
        let agent = start_agent(&agent_bin, &agent_config, &redirected, &agent_cgroup)?;
        let audit = AuditCounter::new(&agent);
        Ok(Bench {
            quick: opts.quick,
            exe,
            redirected,
            plain,
            upstream,
            nginx,
            agent,
            audit,
            agent_bin,
            agent_cgroup,
            agent_config,
            agent_log_errors: Vec::new(),
            sink_addr,
            _sink: sink,
            _responder: responder,
            _cgroup: cgroup,
        })
    }

    pub fn agent_pid(&self) -> Result<u32> {
        self.agent
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the agent is not running"))
    }

    /// The responder every plaintext route reaches (the Host of every request).
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The process whose CPU the route spends besides client and server.
    pub fn proxy_pid(&self, route: Route) -> Result<Option<u32>> {
        Ok(match route {
            Route::Direct => None,
            Route::Nginx => self.nginx.worker_pid(),
            Route::Agent => Some(self.agent_pid()?),
        })
    }

    /// Where `route` dials, and from which cgroup.
    pub fn route_target(&self, route: Route) -> (SocketAddr, &Path) {
        match route {
            Route::Direct => (self.upstream, &self.plain),
            Route::Nginx => (self.nginx.listen, &self.plain),
            Route::Agent => (self.upstream, &self.redirected),
        }
    }

    /// One load run on `route`; on the agent route every call must have been audited.
    fn load(
        &mut self,
        route: Route,
        conns: usize,
        shape: Shape,
        max_calls: u64,
        secs: f64,
    ) -> Result<Measured> {
        let (target, cgroup) = self.route_target(route);
        let cgroup = cgroup.to_path_buf();
        let spec = LoadSpec {
            target,
            host: self.upstream.to_string(),
            conns,
            shape,
            warmup: 20,
            max_calls,
            duration: Duration::from_secs_f64(secs),
            tls: None,
            call: Call::Echo,
        };
        let proxy = self.proxy_pid(route)?;
        self.measure(route, &cgroup, proxy, &spec)
    }

    /// Run `spec` in `cgroup`, with the CPU time of `proxy` over it; on the agent route every
    /// call must have been audited, on the others none.
    pub fn measure(
        &mut self,
        route: Route,
        cgroup: &Path,
        proxy: Option<u32>,
        spec: &LoadSpec,
    ) -> Result<Measured> {
        self.measure_in(route, cgroup, None, proxy, spec)
    }

    /// [`Bench::measure`], the load generator in the network namespace at `netns` (when given).
    pub fn measure_in(
        &mut self,
        route: Route,
        cgroup: &Path,
        netns: Option<&Path>,
        proxy: Option<u32>,
        spec: &LoadSpec,
    ) -> Result<Measured> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("load")
            .arg("--spec")
            .arg(serde_json::to_string(spec)?);
        self.audit.new_requests()?;
        let cpu_before = proxy.and_then(cpu_seconds);
        let line = child_output_in(cmd, cgroup, netns)?;
        let cpu_after = proxy.and_then(cpu_seconds);
        let load: LoadResult =
            serde_json::from_str(&line).with_context(|| format!("load result {line:?}"))?;
        if load.errors > 0 {
            bail!("{} calls failed on the {} route", load.errors, route.name());
        }
        // Records are written before each call is forwarded, so they are all there by now.
        let audited = self.audit.new_requests()?;
        let sent = load.calls + spec.warmup * spec.conns as u64;
        match route {
            Route::Agent if audited < sent => bail!(
                "the agent audited {audited} calls of the {sent} sent: the load did not go through it"
            ),
            Route::Direct | Route::Nginx if audited > 0 => bail!(
                "the {} route went through the agent ({audited} audit records)",
                route.name()
            ),
            _ => {}
        }
        let proxy_cpu_us_per_call = match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if sent > 0 => Some((a - b) * 1e6 / sent as f64),
            _ => None,
        };
        Ok(Measured {
            load,
            proxy_cpu_us_per_call,
        })
    }

    /// connect() timing to the sink (not an endpoint), with programs (`redirected`) or without.
    fn connect(&self, attached: bool, count: u64) -> Result<ConnectResult> {
        let cgroup = if attached {
            &self.redirected
        } else {
            &self.plain
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg("connect")
            .arg("--target")
            .arg(self.sink_addr.to_string())
            .arg("--count")
            .arg(count.to_string());
        let line = child_output(cmd, cgroup)?;
        serde_json::from_str(&line).with_context(|| format!("connect result {line:?}"))
    }

    /// Replace the agent with a fresh one (the memory scenario measures from a clean start:
    /// allocators keep what earlier scenarios used).
    pub fn restart_agent(&mut self) -> Result<()> {
        self.agent.terminate();
        self.agent_log_errors.extend(log_errors(&self.agent));
        self.agent = start_agent(
            &self.agent_bin,
            &self.agent_config,
            &self.redirected,
            &self.agent_cgroup,
        )?;
        self.audit = AuditCounter::new(&self.agent);
        Ok(())
    }

    /// RSS of `pid` while 1,000 keep-alive connections through `route` are open.
    fn rss_holding(&self, route: Route, pid: u32, conns: usize) -> Result<u64> {
        let (target, cgroup) = self.route_target(route);
        self.rss_holding_at(target, cgroup, route.name(), pid, conns, false)
    }

    /// RSS of `pid` while a holder in `cgroup` keeps `conns` connections to `target` open: idle
    /// keep-alive connections after one call each, or (`sse`) idle standalone SSE streams, which
    /// must all still be open when the holder is released.
    pub fn rss_holding_at(
        &self,
        target: SocketAddr,
        cgroup: &Path,
        what: &str,
        pid: u32,
        conns: usize,
        sse: bool,
    ) -> Result<u64> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("hold")
            .arg("--target")
            .arg(target.to_string())
            .arg("--host")
            .arg(self.upstream.to_string())
            .arg("--conns")
            .arg(conns.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if sse {
            cmd.arg("--sse");
        }
        spawn_in_cgroup(&mut cmd, cgroup);
        let mut child = Proc(cmd.spawn().context("starting the holder")?);
        let mut out = child.0.stdout.take().map(BufReader::new);
        let mut line = String::new();
        if let Some(out) = &mut out {
            out.read_line(&mut line)?;
        }
        if !line.starts_with("holding") {
            bail!("the holder failed on the {what} route: {line:?}");
        }
        // Let the proxy settle (buffers of the last calls are released).
        std::thread::sleep(Duration::from_millis(if sse { 500 } else { 300 }));
        let rss = rss_kib(pid).ok_or_else(|| anyhow::anyhow!("no RSS for pid {pid}"))?;
        if let Some(mut stdin) = child.0.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        if sse {
            line.clear();
            if let Some(out) = &mut out {
                out.read_line(&mut line)?;
            }
            let ended = line
                .trim()
                .strip_suffix(" ended early")
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            match ended {
                Some(0) => {}
                Some(n) => bail!(
                    "{n} of the {conns} SSE streams held on the {what} route ended while held"
                ),
                None => bail!("the holder failed on the {what} route: {line:?}"),
            }
        }
        let _ = child.0.wait();
        Ok(rss)
    }

    /// `refused` audit records of the current agent so far (connections or requests it
    /// turned away).
    pub fn audit_refused(&mut self) -> Result<u64> {
        self.audit.new_requests()?;
        Ok(self.audit.refused)
    }

    /// `non_mcp` audit records of the current agent so far (requests without an MCP message,
    /// such as the GET of a standalone SSE stream).
    pub fn audit_non_mcp(&mut self) -> Result<u64> {
        self.audit.new_requests()?;
        Ok(self.audit.non_mcp)
    }

    /// From now on, (re)start the agent with `config`, starting with a restart now.
    pub fn reconfigure_agent(&mut self, config: AgentConfig) -> Result<()> {
        self.agent_config = config;
        self.restart_agent()
    }

    fn memory(&mut self, conns: usize) -> Result<Memory> {
        self.restart_agent()?;
        // Start-up work (parsing the kernel's BTF to load the programs) is transient: let the
        // allocator give it back before measuring idle.
        std::thread::sleep(Duration::from_secs(2));
        let agent = self.agent_pid()?;
        let worker = self
            .nginx
            .worker_pid()
            .ok_or_else(|| anyhow::anyhow!("no nginx worker"))?;
        let idle = |pid| rss_kib(pid).ok_or_else(|| anyhow::anyhow!("no RSS for pid {pid}"));
        Ok(Memory {
            agent_idle_kib: idle(agent)?,
            agent_1k_kib: self.rss_holding(Route::Agent, agent, conns)?,
            nginx_idle_kib: idle(worker)?,
            nginx_1k_kib: self.rss_holding(Route::Nginx, worker, conns)?,
        })
    }
}

/// Repeat `one` `repeats` times; when `noisy` says the figures cannot carry their claim, run the
/// whole scenario again (up to `attempts` times) and keep the last set.
pub fn repeated<T>(
    name: &str,
    repeats: usize,
    attempts: usize,
    mut one: impl FnMut(usize) -> Result<T>,
    noisy: impl Fn(&[T]) -> Option<String>,
) -> Result<(Vec<T>, usize, Option<String>)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut runs = Vec::with_capacity(repeats);
        for r in 0..repeats {
            runs.push(one(r)?);
        }
        // One run has nothing to compare: only repeats can be noisy.
        let why = if runs.len() > 1 { noisy(&runs) } else { None };
        match &why {
            Some(why) if attempt < attempts => {
                eprintln!("mcpwarden-bench: {name}: {why}; running it again");
            }
            _ => return Ok((runs, attempt, why)),
        }
    }
}

/// One load shape run on the three routes, `repeats` times (scenarios 2a, 2b and 3).
struct Plan {
    repeats: usize,
    attempts: usize,
    conns: usize,
    shape: Shape,
    max_calls: u64,
    secs: f64,
}

impl Plan {
    fn run(
        &self,
        bench: &mut Bench,
        name: &str,
        noisy: impl Fn(&[[Measured; 3]]) -> Option<String>,
    ) -> Result<(Vec<[Measured; 3]>, usize, Option<String>)> {
        repeated(
            name,
            self.repeats,
            self.attempts,
            |r| {
                three(
                    |route| bench.load(route, self.conns, self.shape, self.max_calls, self.secs),
                    r,
                )
            },
            noisy,
        )
    }
}

/// The routes in a rotated order for repeat `r`, so no route always runs first or last.
fn rotation(r: usize) -> [Route; 3] {
    let mut order = ROUTES;
    order.rotate_left(r % 3);
    order
}

pub fn three<T: Default>(mut f: impl FnMut(Route) -> Result<T>, r: usize) -> Result<[T; 3]> {
    let mut out: [T; 3] = Default::default();
    for route in rotation(r) {
        let i = ROUTES.iter().position(|&x| x == route).unwrap_or(0);
        out[i] = f(route)?;
    }
    Ok(out)
}

/// Spread of `f(route measurement) − f(direct measurement)` over repeats.
pub fn added(runs: &[[Measured; 3]], route: Route, f: impl Fn(&LoadResult) -> f64) -> Spread {
    let i = ROUTES.iter().position(|&x| x == route).unwrap_or(0);
    let v: Vec<f64> = runs.iter().map(|r| f(&r[i].load) - f(&r[0].load)).collect();
    Spread::of(&v).unwrap_or_default()
}

/// Spread of `f(route) / f(direct)` over repeats.
pub fn ratio(runs: &[[Measured; 3]], route: Route, f: impl Fn(&LoadResult) -> f64) -> Spread {
    let i = ROUTES.iter().position(|&x| x == route).unwrap_or(0);
    let v: Vec<f64> = runs.iter().map(|r| f(&r[i].load) / f(&r[0].load)).collect();
    Spread::of(&v).unwrap_or_default()
}

pub fn noisy_added(
    runs: &[[Measured; 3]],
    f: impl Fn(&LoadResult) -> f64 + Copy,
) -> Option<String> {
    for route in [Route::Nginx, Route::Agent] {
        let s = added(runs, route, f);
        if s.noisier_than(s.median) {
            return Some(format!(
                "{} added latency spread {:.1}–{:.1} µs is wider than its median {:.1} µs",
                route.name(),
                s.min,
                s.max,
                s.median
            ));
        }
    }
    None
}

/// Scenario 3's noise: the agent's throughput ratio spread wider than its distance from 1.
pub fn noisy_throughput(runs: &[[Measured; 3]]) -> Option<String> {
    let s = ratio(runs, Route::Agent, |l| l.calls_per_s);
    s.noisier_than(1.0 - s.median).then(|| {
        format!(
            "throughput ratio spread {:.3}–{:.3} is wider than its effect",
            s.min, s.max
        )
    })
}

pub fn run(opts: RunOpts) -> Result<()> {
    let quick = opts.quick;
    let repeats = opts.repeats.unwrap_or(if quick { 1 } else { 5 }).max(1);
    let attempts = if quick { 1 } else { 3 };
    let mut report = Report::new(&opts, repeats);
    report.rate = RATE;

    // 5b. The policy decision, in process: first, while nothing else of the bench runs.
    if !opts.tls_only && !opts.sse_only && !opts.cpu_only && !opts.pods_only {
        report.policy = Some(crate::policyrun::run(repeats, quick)?);
    }
    if !opts.policy_only {
        network(&opts, &mut report, repeats, attempts)?;
    }

    if let Some(dir) = &opts.criterion {
        report.criterion = report::read_criterion(dir)?;
    }
    let text = report.render();
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let existing = std::fs::read_to_string(&opts.out).unwrap_or_default();
    std::fs::write(&opts.out, report::splice(&existing, &text))
        .with_context(|| format!("writing {}", opts.out.display()))?;
    println!("{text}");
    eprintln!("mcpwarden-bench: report written to {}", opts.out.display());
    Ok(())
}

/// Scenarios 1–4, 7, 6 and 8: the agent, nginx and the responder on loopback, then pods.
fn network(opts: &RunOpts, report: &mut Report, repeats: usize, attempts: usize) -> Result<()> {
    let mut bench = Bench::start(opts)?;
    if opts.cpu_only {
        cpu_per_call(&mut bench, report, repeats, attempts)?;
        bench.agent.assert_running();
        return Ok(());
    }
    if !opts.tls_only && !opts.sse_only && !opts.pods_only {
        plaintext(&mut bench, report, repeats, attempts)?;
    }

    // 7. SSE: responses as event streams, idle standalone streams. Before 6, which restarts
    // the agent with https endpoints.
    if !opts.tls_only && !opts.pods_only {
        let sse = crate::sserun::run(&mut bench, repeats, attempts)?;
        report.attempts.extend(sse.attempts.iter().cloned());
        report.sse = Some(sse);
    }

    // 6. TLS on both sides: latency on one connection, handshakes, first connections.
    if !opts.sse_only && !opts.pods_only {
        let tls = crate::tlsrun::run(&mut bench, repeats, attempts)?;
        report.attempts.extend(tls.attempts.iter().cloned());
        report.tls = Some(tls);
    }

    // 8. Pods: callers in network namespaces of their own. Last: it restarts the agent to serve
    // namespaces of its own, and they are gone when it ends.
    if !opts.tls_only && !opts.sse_only {
        let pods = crate::podrun::run(&mut bench, repeats, attempts)?;
        report.attempts.extend(pods.attempts.iter().cloned());
        report.pods = Some(pods);
    }

    bench.agent.assert_running();
    let mut errors = std::mem::take(&mut bench.agent_log_errors);
    errors.extend(log_errors(&bench.agent));
    report.agent_log_errors = errors.into_iter().take(5).collect();
    Ok(())
}

/// The ERROR lines of an agent's log.
fn log_errors(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .map(str::to_owned)
        .collect()
}

/// Scenarios 1–4: plaintext HTTP.
fn plaintext(
    bench: &mut Bench,
    report: &mut Report,
    repeats: usize,
    attempts: usize,
) -> Result<()> {
    let quick = bench.quick;
    // 1. connect() to a non-endpoint destination, programs attached vs not.
    let count = if quick { 2_000 } else { 20_000 };
    eprintln!("mcpwarden-bench: connect() latency ({count} connects × {repeats} × 2)");
    let (runs, n, why) = repeated(
        "connect",
        repeats,
        attempts,
        |r| {
            let (a, d) = if r % 2 == 0 {
                let d = bench.connect(false, count)?;
                (bench.connect(true, count)?, d)
            } else {
                let a = bench.connect(true, count)?;
                (a, bench.connect(false, count)?)
            };
            Ok((a, d))
        },
        |runs| {
            // The claim is "at most CONNECT_GOAL": a spread on both sides of it cannot carry it.
            let v: Vec<f64> = runs.iter().map(|(a, d)| a.p50_us / d.p50_us).collect();
            let s = Spread::of(&v).unwrap_or_default();
            (runs.len() > 1 && s.min <= CONNECT_GOAL && s.max > CONNECT_GOAL).then(|| {
                format!(
                    "ratio spread {:.3}–{:.3} straddles the {CONNECT_GOAL}× goal",
                    s.min, s.max
                )
            })
        },
    )?;
    report.connect = runs;
    report.note_attempts("connect", n, why);

    one_connection(bench, report, repeats, attempts)?;
    connection_per_call(bench, report, repeats, attempts)?;

    // 2b. Fixed moderate rate over 32 connections, open loop.
    let secs = if quick { 2.0 } else { 10.0 };
    eprintln!(
        "mcpwarden-bench: {RATE} calls/s on 32 connections for {secs} s × {repeats} × 3 routes"
    );
    let shape = Shape::Open { rate: RATE };
    let plan = Plan {
        repeats,
        attempts,
        conns: 32,
        shape,
        max_calls: u64::MAX,
        secs,
    };
    let (runs, n, why) = plan.run(bench, "fixed rate", |runs| noisy_added(runs, |l| l.p50_us))?;
    report.fixed_rate = runs;
    report.note_attempts("fixed rate", n, why);

    saturation(bench, report, repeats, attempts)?;

    // 4. Memory, idle and with 1,000 open keep-alive connections.
    let conns = 1_000;
    eprintln!("mcpwarden-bench: memory with {conns} connections × {repeats}");
    let mut memory = Vec::new();
    for _ in 0..repeats {
        memory.push(bench.memory(conns)?);
    }
    report.memory = memory;
    Ok(())
}

/// Scenarios 2a and 3 alone: what an A/B run of two agent builds compares (agent CPU per call).
fn cpu_per_call(
    bench: &mut Bench,
    report: &mut Report,
    repeats: usize,
    attempts: usize,
) -> Result<()> {
    one_connection(bench, report, repeats, attempts)?;
    connection_per_call(bench, report, repeats, attempts)?;
    saturation(bench, report, repeats, attempts)
}

/// 2c. Closed loop, each call on a connection of its own: what a client that connects per call
/// pays, including the agent's per-accept work (the redirect record, the caller's comm and
/// cgroup).
fn connection_per_call(
    bench: &mut Bench,
    report: &mut Report,
    repeats: usize,
    attempts: usize,
) -> Result<()> {
    let calls = if bench.quick { 500 } else { 5_000 };
    let runs = one_at_a_time(
        bench,
        report,
        "a connection per call",
        Shape::ConnPerCall,
        calls,
        (repeats, attempts),
    )?;
    report.per_call = runs;
    Ok(())
}

/// 2a. Latency on one keep-alive connection, closed loop.
fn one_connection(
    bench: &mut Bench,
    report: &mut Report,
    repeats: usize,
    attempts: usize,
) -> Result<()> {
    let calls = if bench.quick { 2_000 } else { 30_000 };
    let runs = one_at_a_time(
        bench,
        report,
        "one connection",
        Shape::Closed,
        calls,
        (repeats, attempts),
    )?;
    report.one_conn = runs;
    Ok(())
}

/// `calls` calls one at a time (closed loop, one client) on each route, in `shape`; the
/// attempts are noted under `name`.
fn one_at_a_time(
    bench: &mut Bench,
    report: &mut Report,
    name: &str,
    shape: Shape,
    calls: u64,
    (repeats, attempts): (usize, usize),
) -> Result<Vec<[Measured; 3]>> {
    eprintln!("mcpwarden-bench: {name}, {calls} calls × {repeats} × 3 routes");
    let plan = Plan {
        repeats,
        attempts,
        conns: 1,
        shape,
        max_calls: calls,
        secs: 60.0,
    };
    let (runs, n, why) = plan.run(bench, name, |runs| noisy_added(runs, |l| l.p50_us))?;
    report.note_attempts(name, n, why);
    Ok(runs)
}

/// 3. Saturation throughput, closed loop on 32 connections.
fn saturation(
    bench: &mut Bench,
    report: &mut Report,
    repeats: usize,
    attempts: usize,
) -> Result<()> {
    let quick = bench.quick;
    let secs = if quick { 2.0 } else { 8.0 };
    eprintln!("mcpwarden-bench: saturation, 32 connections for {secs} s × {repeats} × 3 routes");
    let plan = Plan {
        repeats,
        attempts,
        conns: 32,
        shape: Shape::Closed,
        max_calls: u64::MAX,
        secs,
    };
    let (runs, n, why) = plan.run(bench, "saturation", noisy_throughput)?;
    report.saturation = runs;
    report.note_attempts("saturation", n, why);

    Ok(())
}

/// Scenario 1's goal: connect() with the programs attached at most this many times slower.
pub const CONNECT_GOAL: f64 = 1.02;

/// Scenario 3's CPU goal: the agent's CPU per call at saturation at most this many times the
/// nginx worker's.
pub const CPU_GOAL: f64 = 1.25;

/// Scenario 7a's goal: the agent's added p50 at most this many times nginx's.
pub const SSE_GOAL: f64 = 1.5;

/// The fixed moderate rate of scenario 2b, in calls per second over all connections.
pub const RATE: f64 = 2_000.0;
