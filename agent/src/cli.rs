//! The command line, and the assembly of the pipeline: config → policies → cgroups → listeners →
//! eBPF → endpoint resolution → interceptor.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    audit::AuditLog,
    config::{Config, Flags, TlsMode},
    intercept::{upstream_roots, Interceptor, Leaves, Server, ServerTls, Terminator, TlsClient},
    redirect::{
        cgroup,
        resolve::{EndpointResolver, Routes, Target},
        Redirector, Settings,
    },
    reload::{self, Policies},
};

#[derive(Debug, Parser)]
#[command(
    name = "mcpwarden",
    version,
    about = "Transparent policy enforcement for MCP tool calls on this host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Run(RunArgs),
    /// Run the embedded demo: a sample MCP server, the agent with a sample policy, and an
    /// unmodified MCP client making an allowed, a denied and a rate-limited call. Needs root.
    Demo,
    /// The demo's MCP client (started by `demo` inside the redirected cgroup).
    #[command(hide = true)]
    DemoClient { url: String },
    /// The CA that signs the certificates presented to workloads for https:// servers.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check policy files, or explain the decision for one call.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files: each error as file:line:col with a hint, and warnings about rules
    /// that can never apply. Exits non-zero if any file is invalid.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: crate::policy_cli::Format,
    },
    /// Decide one tools/call against a policy file: the decision, the rule's JSON Pointer, and
    /// every check on the way.
    Explain {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The tool called.
        #[arg(long)]
        tool: String,
        /// The call's arguments, a JSON object.
        #[arg(long)]
        args: Option<String>,
        /// Limit scope keys of the caller: grant=…, process=…, session=… (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        caller: Vec<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: crate::policy_cli::Format,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the CA certificate(s) workloads must trust (PEM, on stdout) and their SHA-256
    /// fingerprints (stderr). Generates the CA in the state directory if there is none yet.
    Show(CaArgs),
    /// Add the CA certificate(s) to this host's trust store (update-ca-certificates or
    /// update-ca-trust).
    Install(CaArgs),
    /// Remove them from this host's trust store.
    Uninstall,
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    /// Read the `ca:` section and `state_dir` from this configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory [default: /var/lib/mcpwarden].
    #[arg(long = "state-dir")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// YAML configuration file (see config docs); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// MCP endpoint to protect, e.g. http://10.0.0.5:8080/mcp. Repeatable; pairs with --policy.
    #[arg(long = "endpoint", value_name = "URL")]
    endpoints: Vec<String>,
    /// Policy file (PolicyLayer policy.json) for the --endpoint at the same position.
    #[arg(long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// Interceptor address; at most one IPv4 and one IPv6 [default: 127.0.0.1:15001, [::1]:15001].
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Audit log path, or - for standard output [default: -].
    #[arg(long = "audit-log", value_name = "PATH|-")]
    audit_log: Option<PathBuf>,
    /// cgroup to attach to: absolute, or relative to the cgroup2 mount [default: the mount root].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The agent's own cgroup (created if missing; never redirected) [default: mcpwarden].
    #[arg(long = "agent-cgroup")]
    agent_cgroup: Option<PathBuf>,
    /// Largest request body inspected; larger ones are refused [default: 4194304].
    #[arg(long = "max-body-bytes")]
    max_body_bytes: Option<usize>,
    /// Interceptor worker threads [default: one per CPU].
    #[arg(long)]
    workers: Option<usize>,
    /// State directory; the generated CA lives here [default: /var/lib/mcpwarden].
    #[arg(long = "state-dir")]
    state_dir: Option<PathBuf>,
    /// PEM roots trusted for every https:// --endpoint, besides the system's.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Do not probe https servers and mint their leaves at start: each origin's first client
    /// connection then waits for both (measuring that cold path is what this is for).
    #[arg(long = "no-tls-prewarm")]
    no_tls_prewarm: bool,
}

/// Entry point of the `mcpwarden` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands: no runtime, no logging set-up, exit codes of their own.
    if let Command::Policy(cmd) = &cli.command {
        return policy_command(cmd);
    }
    // One crypto provider for the process: the agent's own TLS configs name ring explicitly,
    // but rmcp's HTTP client (the demo's) uses reqwest built without a provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn")),
        )
        .init();
    // The control plane (accept loop, endpoint resolution, signals) runs on this thread; the
    // interceptor's worker threads have runtimes of their own. The demo also hosts its sample
    // server here, so it gets a multi-threaded runtime.
    let runtime = match &cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcpwarden: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Demo => crate::demo::run().await,
            Command::DemoClient { url } => crate::demo::client(&url).await,
            Command::Ca(cmd) => ca_command(cmd),
            Command::Policy(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpwarden: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn policy_command(cmd: &PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check { files, format } => {
            if crate::policy_cli::check(files, *format) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        PolicyCommand::Explain {
            file,
            tool,
            args,
            caller,
            format,
        } => match crate::policy_cli::explain(file, tool, args.as_deref(), caller, *format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcpwarden: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Raise the open-file limit: every intercepted connection holds two descriptors (client and
/// upstream), and long-lived SSE streams hold theirs for hours, so the default soft limit of
/// 1024 would cap a node at a few hundred agent connections. As root (CAP_SYS_RESOURCE) the
/// hard limit is raised too, up to the kernel's `fs.nr_open` (at most 1,048,576); otherwise the
/// soft limit goes up to the hard one. Returns the limit in force.
fn raise_nofile_limit() -> Option<u64> {
    const CEILING: u64 = 1 << 20;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(CEILING)
        .min(CEILING);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        let want = lim.rlim_max.max(nr_open);
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(want);
            }
            if lim.rlim_cur < lim.rlim_max {
                let soft = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
                    return Some(lim.rlim_max);
                }
            }
        }
    }
    Some(lim.rlim_cur)
}

async fn run(args: RunArgs) -> Result<()> {
    let nofile = raise_nofile_limit();
    let config = Config::assemble(Flags {
        config: args.config,
        endpoints: args.endpoints,
        policies: args.policies,
        listen: args.listen,
        audit: args.audit_log,
        cgroup: args.cgroup,
        agent_cgroup: args.agent_cgroup,
        max_body_bytes: args.max_body_bytes,
        workers: args.workers,
        state_dir: args.state_dir,
        upstream_ca: args.upstream_ca,
        tls_prewarm: args.no_tls_prewarm.then_some(false),
    })?;
    let agent = Agent::start(&config).await?;
    tracing::info!(
        listen = ?agent.listen,
        cgroup = %agent.redirector.attach_point().display(),
        servers = config.servers.len(),
        workers = config.workers,
        nofile = ?nofile,
        "mcpwarden ready"
    );
    // Loading the programs parsed the kernel's BTF: tens of MiB of start-up garbage that
    // mimalloc (the binary's allocator) would otherwise keep for an idle main thread.
    // SAFETY: mi_collect only releases free memory of the calling thread's heap; it is a no-op
    // when the process's allocator is not mimalloc (the heap is empty).
    unsafe { libmimalloc_sys::mi_collect(true) };
    shutdown_signal(&agent).await?;
    tracing::info!("signal received: detaching and exiting");
    agent.stop().await;
    Ok(())
}

/// The CA settings the `ca` commands act on: the config file's, or just a state directory.
fn ca_settings(args: &CaArgs) -> Result<crate::ca::CaSettings> {
    match &args.config {
        Some(path) => Ok(Config::assemble(Flags {
            config: Some(path.clone()),
            state_dir: args.state_dir.clone(),
            ..Flags::default()
        })?
        .ca),
        None => Ok(crate::ca::CaSettings {
            state_dir: args
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::ca::DEFAULT_STATE_DIR)),
            ..Default::default()
        }),
    }
}

fn ca_command(cmd: CaCommand) -> Result<()> {
    use crate::ca::{trust, Ca};
    match cmd {
        CaCommand::Show(args) => {
            let ca = Ca::load_or_generate(&ca_settings(&args)?)?;
            for (file, fingerprint, signing) in ca.describe(std::time::SystemTime::now()) {
                eprintln!(
                    "{}: SHA-256 {fingerprint}{}",
                    file.display(),
                    if signing { " (signing)" } else { "" }
                );
            }
            print!("{}", ca.bundle_pem());
        }
        CaCommand::Install(args) => {
            let ca = Ca::load_or_generate(&ca_settings(&args)?)?;
            let pems: Vec<String> = ca
                .bundle_pem()
                .split_inclusive("-----END CERTIFICATE-----\n")
                .map(str::to_owned)
                .collect();
            for f in trust::detect()?.install(&pems)? {
                eprintln!("installed {}", f.display());
            }
        }
        CaCommand::Uninstall => {
            let removed = trust::detect()?.uninstall()?;
            if removed.is_empty() {
                eprintln!("no mcpwarden CA was installed");
            }
            for f in removed {
                eprintln!("removed {}", f.display());
            }
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT; each SIGHUP meanwhile reloads the policies and config.
async fn shutdown_signal(agent: &Agent) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policies and config");
                agent.reload();
            }
        }
    }
}

/// A running agent. Dropping it stops the interceptor and detaches the eBPF programs.
pub struct Agent {
    pub listen: Vec<SocketAddr>,
    redirector: Arc<Redirector>,
    tasks: Vec<JoinHandle<()>>,
    /// The reload thread's queue.
    reloader: std::sync::mpsc::Sender<reload::Msg>,
}

impl Agent {
    /// Load the policies, join the agent cgroup, bind the listeners, attach, resolve, serve.
    /// Every failure here is an error naming what to fix; nothing stays attached after one.
    pub async fn start(config: &Config) -> Result<Agent> {
        let audit = Arc::new(
            AuditLog::open(&config.audit)
                .with_context(|| format!("opening the audit log {}", config.audit.display()))?,
        );
        // Policies first: a bad file stops the agent before it touches the host.
        let policies = Arc::new(Policies::load(config, audit.clone())?);
        let mut servers = Vec::new();
        for s in &config.servers {
            servers.push(Server {
                name: s.name.clone(),
                path: s.url.path.clone(),
                tls: None,
                origin: format!("{}:{}", s.url.host, s.url.port).to_ascii_lowercase(),
                params: Arc::default(),
            });
        }
        let terminator = tls_setup(config, &mut servers)?;

        let mount = cgroup::cgroup2_mount()?;
        let agent_cgroup = cgroup::resolve(&mount, &config.agent_cgroup)?;
        let attach = cgroup::resolve(&mount, &config.cgroup)?;
        // Everything in the agent's cgroup is exempt from redirection: it must hold the agent only.
        if agent_cgroup.components().eq(mount.components())
            || agent_cgroup.components().eq(attach.components())
        {
            anyhow::bail!(
                "the agent cgroup {} must be a cgroup of its own, not the attach point or the cgroup2 root: \
                 every process in it is exempt from redirection",
                agent_cgroup.display()
            );
        }
        cgroup::join(&agent_cgroup)?;
        let agent_cgroup_id = cgroup::id_of(&agent_cgroup)?;

        let mut listeners = Vec::new();
        let (mut v4, mut v6) = (None, None);
        for addr in &config.listen {
            let l = match TcpListener::bind(addr).await {
                Ok(l) => l,
                // A host without IPv6 has no ::1: run IPv4-only. connect6 then refuses (EPERM)
                // native IPv6 connections to endpoints, which are never let through uninspected.
                Err(e) if addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!(%addr, "IPv6 is not available here: the interceptor listens on IPv4 only");
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("binding the interceptor to {addr}"))
                }
            };
            match l.local_addr()? {
                SocketAddr::V4(a) => v4 = Some(a),
                SocketAddr::V6(a) => v6 = Some(a),
            }
            listeners.push(l);
        }
        let listen: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let first = listeners
            .first()
            .ok_or_else(|| anyhow::anyhow!("no interceptor address could be bound"))?;
        let netns_cookie = crate::redirect::netns_cookie(first)?;

        let identity = Arc::new(crate::identity::Resolver::new(&mount)?);
        let redirector = Arc::new(Redirector::start(&Settings {
            attach,
            agent_cgroup_id,
            netns_cookie,
            v4,
            v6,
        })?);
        let routes = Arc::new(Routes::default());
        let mut resolver = EndpointResolver::new(
            config
                .servers
                .iter()
                .map(|s| Target {
                    host: s.url.host.clone(),
                    port: s.url.port,
                })
                .collect(),
        )?;
        resolver.refresh(redirector.as_ref(), &routes).await?;
        for host in resolver.unresolved() {
            tracing::error!(host, "endpoint resolved to no address: its traffic is not intercepted until it does (retrying)");
        }

        let interceptor = Arc::new(Interceptor {
            servers,
            routes: routes.clone(),
            orig_dst: redirector.clone(),
            identity,
            audit,
            max_body: config.max_body_bytes,
            terminator,
            sessions: Arc::default(),
            routing: policies.routing(),
            pods: Arc::default(),
        });
        let (reloader, _) = reload::spawn(policies, config.flags.clone())?;
        // The workers first: if they cannot start, nothing has been spawned yet.
        let serve = interceptor.clone().serve(listeners, config.workers)?;
        let mut tasks = vec![
            tokio::spawn(resolver.run(redirector.clone(), routes.clone())),
            tokio::spawn(serve),
        ];
        if let Some(terminator) = interceptor
            .terminator
            .clone()
            .filter(|_| config.tls_prewarm)
        {
            let interceptor = interceptor.clone();
            tasks.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let origins = terminator.prewarm(&interceptor.servers, &routes).await;
                tracing::info!(
                    origins,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "TLS origins prewarmed: protocols probed, leaves minted"
                );
            }));
        }
        Ok(Agent {
            listen,
            redirector,
            tasks,
            reloader,
        })
    }
}

/// For https:// servers: load (or generate) the CA, and build each server's upstream trust.
/// Before anything touches the host: a bad CA or bundle stops the agent here.
fn tls_setup(config: &Config, servers: &mut [Server]) -> Result<Option<Arc<Terminator>>> {
    if !config.servers.iter().any(|s| s.url.https) {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = if config.needs_ca() {
        Some(Arc::new(crate::ca::Ca::load_or_generate(&config.ca)?))
    } else {
        None
    };
    let ours = ca.as_ref().map(|c| c.certs()).unwrap_or_default();
    let mut clients: HashMap<Option<PathBuf>, Arc<TlsClient>> = HashMap::new();
    for (s, server) in config.servers.iter().zip(servers.iter_mut()) {
        if !s.url.https {
            continue;
        }
        let client = match clients.get(&s.upstream_ca) {
            Some(c) => c.clone(),
            None => {
                let roots = upstream_roots(&ours, s.upstream_ca.as_deref())
                    .with_context(|| format!("server {}", s.name))?;
                if roots.is_empty() {
                    tracing::warn!(server = %s.name, "no trust roots for this https server: every upstream handshake will fail (set upstream_ca)");
                }
                let c = Arc::new(TlsClient::new(provider.clone(), Arc::new(roots))?);
                clients.insert(s.upstream_ca.clone(), c.clone());
                c
            }
        };
        server.tls = Some(ServerTls {
            host: s.url.host.to_ascii_lowercase(),
            passthrough: s.tls == TlsMode::Passthrough,
            client,
        });
    }
    Ok(ca.map(|ca| Arc::new(Terminator::new(Leaves::new(ca, provider)))))
}

impl Agent {
    /// Stop and wait until everything is down: connections closed, the workers joined (their
    /// deferred audit records written), the programs detached once the last reference to the
    /// maps and links is gone. Dropping an `Agent` only starts this.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            // Cancelled or finished: either way the task's future has been dropped.
            let _ = t.await;
        }
    }
}

impl Agent {
    /// Re-read the policy files and the config now (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.reloader.send(reload::Msg::Reload);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.reloader.send(reload::Msg::Stop);
        for t in &self.tasks {
            t.abort();
        }
    }
}
