//! The assembly of the pipeline: config → policies → cgroups → eBPF → endpoint resolution →
//! interceptor → network namespaces, and the `run` sequence around it (start, ready, signals,
//! stop). Nothing here parses a command line (`cli`) or a file (`config`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

use crate::{
    audit::AuditLog,
    config::{Config, FailureMode, TlsMode, AGENT_CGROUP_SELF},
    intercept::{upstream_roots, Interceptor, Leaves, Server, ServerTls, Terminator, TlsClient},
    netns::{coverage::Parts, Coverage, CoverageSettings},
    redirect::{
        cgroup,
        resolve::{EndpointResolver, HostAddrs, Routes, Target},
        Redirector, Settings,
    },
    reload::{self, Policies},
};

/// The `run` command: start the agent, say it is ready, serve until SIGTERM or SIGINT (reloading
/// on SIGHUP), then stop.
pub async fn run(config: Config) -> Result<()> {
    // First: a SIGHUP or SIGUSR1 (logrotate's postrotate) while the agent starts must not end
    // it, and a SIGTERM then stops it once started.
    let mut signals = Signals::install()?;
    let nofile = raise_nofile_limit();
    let mut agent = Agent::start(&config).await?;
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
    if agent.run_until_signal(&mut signals).await? == Stopped::HandedOver {
        let stopped = {
            let drain = agent.drain(config.drain);
            tokio::pin!(drain);
            tokio::select! {
                () = &mut drain => false,
                // Under Kubernetes SIGTERM comes as soon as the new pod is ready: the drain
                // (calls in flight, calls held for an approval) still runs to its end, within
                // terminationGracePeriodSeconds; a second signal, or SIGINT, ends it.
                _ = signals.term.recv() => {
                    tracing::info!("SIGTERM while draining: exiting once drained (another signal exits now)");
                    tokio::select! {
                        () = &mut drain => {}
                        _ = signals.term.recv() => {}
                        _ = signals.int.recv() => {}
                    }
                    true
                }
                _ = signals.int.recv() => true,
            }
        };
        // Under Kubernetes the kubelet would restart an agent that exited: this one waits for
        // its own SIGTERM, detaching and removing nothing (the new agent runs the programs).
        if !stopped {
            agent.run_until_signal(&mut signals).await?;
        }
        tracing::info!("signal received: exiting after the hand-over");
        agent.stop().await;
        return Ok(());
    }
    match config.failure_mode {
        FailureMode::Closed => tracing::info!(
            "signal received: exiting; the programs stay attached (failure_mode: closed)"
        ),
        FailureMode::Open => tracing::info!("signal received: detaching and exiting"),
    }
    agent.stop().await;
    Ok(())
}

/// The signals the agent answers, installed once for its whole run.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?,
        })
    }
}

/// Why [`Agent::run_until_signal`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Signal,
    /// A new agent took the listeners over.
    HandedOver,
}

/// A running agent. Dropping it stops the interceptor and detaches the eBPF programs.
pub struct Agent {
    /// The interceptor's addresses in every namespace (ports may differ where the configured
    /// one was taken, or where it is 0).
    pub listen: Vec<SocketAddr>,
    redirector: Arc<Redirector>,
    tasks: Vec<JoinHandle<()>>,
    /// The reload thread's queue.
    reloader: std::sync::mpsc::Sender<reload::Msg>,
    /// The `mcpwarden-netns` thread (stopped after a hand-over).
    coverage: Option<Coverage>,
    interceptor: Arc<Interceptor>,
    /// The accept loop's control channel.
    accept: tokio::sync::mpsc::UnboundedSender<crate::netns::ListenerMsg>,
    /// Notified when a new agent has taken the listeners over.
    handed_over: Arc<tokio::sync::Notify>,
    /// The endpoint resolver's task (stopped after a hand-over).
    resolver: Option<JoinHandle<()>>,
    /// The audit log (reopened on SIGUSR1).
    audit: Arc<AuditLog>,
    /// Readiness (`/readyz`, `mcpwarden health`).
    health: crate::admin::health::Health,
    /// Tells the metrics listener to stop accepting (after a hand-over, the successor has it).
    metrics_stop: Arc<tokio::sync::Notify>,
    /// The admin socket; dropping it removes the path (unless a successor bound its own).
    _admin: Option<crate::admin::socket::AdminSocket>,
    /// After a hand-over the admin socket's path is the successor's: this agent serves its
    /// held calls' approvals at `PATH.PID` while it drains (`mcpwarden approvals` asks both).
    admin_again: Option<(
        std::path::PathBuf,
        crate::admin::socket::Access,
        Arc<crate::control::Control>,
    )>,
    draining_admin: Option<crate::admin::socket::AdminSocket>,
}

impl Agent {
    /// Load the policies, settle the agent's cgroup, attach, resolve, serve every network
    /// namespace. Every failure here is an error naming what to fix; nothing stays attached
    /// after one.
    pub async fn start(config: &Config) -> Result<Agent> {
        let audit = Arc::new(
            AuditLog::for_config(config)
                .with_context(|| format!("opening the audit log {}", config.audit.display()))?,
        );
        // Policies first: a bad file stops the agent before it touches the host.
        let policies = Arc::new(Policies::load(config, audit.clone())?);
        let health = crate::admin::health::Health::default();
        health.policies_loaded();
        let metrics = Arc::new(crate::metrics::Metrics::new(
            config.workers,
            config.servers.iter().map(|s| s.name.clone()).collect(),
            &policies.listed_tools(),
            health.clone(),
        ));
        audit.set_observer(metrics.clone());
        policies.set_metrics(metrics.clone());
        let mut servers = Vec::new();
        for s in &config.servers {
            servers.push(Server {
                name: s.name.clone(),
                path: s.url.path.clone(),
                tls: None,
                origin: format!("{}:{}", s.url.host, s.url.port).to_ascii_lowercase(),
                host: s
                    .url
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase(),
                aliases: crate::config::host_aliases(&s.url.host),
                port: s.url.port,
                passthrough_paths: s.passthrough_paths.clone(),
                params: Arc::default(),
            });
        }
        let terminator = tls_setup(config, &mut servers)?;

        let mount = cgroup::cgroup2_mount()?;
        let attach = cgroup::resolve(&mount, &config.cgroup)?;
        let agent_cgroup = settle_agent_cgroup(&mount, &attach, &config.agent_cgroup)?;
        let agent_cgroup_id = cgroup::id_of(&agent_cgroup)?;

        // Another agent active: take its listeners over (it keeps serving until this one is
        // ready), rather than bind new ones.
        let start = crate::handover::begin(&config.ca.state_dir)?;
        let (inherited, mut takeover, mut active) = match start {
            crate::handover::Start::Fresh(a) => (Default::default(), None, Some(a)),
            crate::handover::Start::Takeover(_) if config.failure_mode == FailureMode::Open => {
                // Without pins each agent would run its own programs against its own maps, and
                // the records one agent's programs write, the other could not read.
                anyhow::bail!(
                    "another agent is running (it holds {}/agent.lock): with failure_mode: open \
                     stop it first; handing over needs the pinned datapath (failure_mode: closed)",
                    config.ca.state_dir.display()
                );
            }
            crate::handover::Start::Takeover(mut t) => {
                let n: usize = t.listeners.values().map(Vec::len).sum();
                tracing::info!(
                    from_pid = t.from_pid,
                    listeners = n,
                    namespaces = t.listeners.len(),
                    "taking the listening sockets over from the running agent"
                );
                (std::mem::take(&mut t.listeners), Some(t), None)
            }
        };
        let registry = Arc::new(crate::handover::Registry::default());
        // The metrics listener first: probes get an answer (not ready) while the rest starts.
        let metrics_stop = Arc::new(tokio::sync::Notify::new());
        let inherited_metrics = takeover.as_mut().and_then(|t| t.metrics.take());
        let mut tasks = Vec::new();
        let mut metrics_listener = match config.operate.metrics_listen {
            None => None,
            Some(want) => {
                let listener = match inherited_metrics {
                    Some(l)
                        if l.local_addr().is_ok_and(|a| {
                            a.ip() == want.ip() && (want.port() == 0 || a.port() == want.port())
                        }) =>
                    {
                        l
                    }
                    other => {
                        // Another address: the previous agent's goes with it.
                        drop(other);
                        std::net::TcpListener::bind(want).with_context(|| {
                            format!("binding the metrics listener {want} (--metrics-listen; `off` for none)")
                        })?
                    }
                };
                registry.set_metrics(&listener)?;
                Some(listener)
            }
        };
        let metrics_listen = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let mut serve_metrics = |tasks: &mut Vec<JoinHandle<()>>| -> Result<()> {
            if let Some(listener) = metrics_listener.take() {
                let (addr, task) = crate::admin::listener::serve(
                    listener,
                    metrics.clone(),
                    health.clone(),
                    metrics_stop.clone(),
                )?;
                tasks.push(task);
                tracing::info!(%addr, "metrics listener: /metrics, /healthz, /readyz");
            }
            Ok(())
        };
        // Started now, probes get an answer (not ready) while the rest starts; one handed over
        // is served once this agent is the active one (until then the previous agent answers on
        // it, and two agents never answer on one socket).
        if takeover.is_none() {
            serve_metrics(&mut tasks)?;
        }

        crate::netns::init_own().context("recording the agent's own network namespace")?;
        let host_netns = crate::netns::Netns::host_cookie()
            .context("reading the host's network namespace cookie")?;
        let port = |v6: bool| {
            config
                .listen
                .iter()
                .find(|a| a.is_ipv6() == v6)
                .map_or(0, |a| a.port())
        };
        let closed = config.failure_mode == FailureMode::Closed;
        let redirector = Arc::new(Redirector::load(&Settings {
            attach: attach.clone(),
            agent_cgroup: (agent_cgroup.clone(), agent_cgroup_id),
            host_netns,
            guard_ports: (port(false), port(true)),
            raw_sockets_allowed: config.raw_sockets == crate::config::RawSockets::Allow,
            pins: closed.then(|| config.bpffs_dir.clone()),
            pin_dir: config.bpffs_dir.clone(),
            layout_salt: config.layout_salt.clone(),
        })?);
        let events = redirector
            .take_events()
            .ok_or_else(|| anyhow::anyhow!("the programs' event ring buffer is already taken"))?;

        let routes = Arc::new(Routes::default());
        let host_addrs = HostAddrs::default();
        let resolve_again = Arc::new(tokio::sync::Notify::new());
        // Callers' pods and Services' backends, from the Kubernetes API when there is one.
        let pods = Arc::new(crate::identity::Pods::new(
            config.kubernetes.deleted_pod_grace,
        ));
        let backends = crate::k8s::Backends::new(resolve_again.clone());
        let kube_config = crate::k8s::client_config(&config.kubernetes).await?;
        let mut resolver = EndpointResolver::new(
            config
                .servers
                .iter()
                .map(|s| Target {
                    host: s.url.host.clone(),
                    port: s.url.port,
                    scope: s.scope,
                })
                .collect(),
            host_addrs.clone(),
        )?
        .with_backends(backends.clone());
        resolver.refresh(redirector.as_ref(), &routes).await?;
        for host in resolver.unresolved() {
            tracing::error!(host, "endpoint resolved to no address: its traffic is not intercepted until it does (retrying)");
        }

        let identity = Arc::new(crate::identity::Resolver::new(&mount)?);
        // Held calls.
        let approvals = crate::approvals::Approvals::new(crate::approvals::Settings {
            node: crate::k8s::node_name(&config.kubernetes),
            ..config.approvals.clone()
        });
        {
            let audit = audit.clone();
            approvals.on_refused(Box::new(move |summary, by, why| {
                crate::control::audit_refused_approver(&audit, summary, by, why);
            }));
        }
        // The user-approval key lives in this process only: a state issued by another run
        // (before a restart or a hand-over) is refused, and its client asks again, so a spent
        // state cannot be replayed to a successor that never saw it spent.
        let user_approvals = Arc::new(crate::approvals::user::UserApprovals::new());
        if let Some(webhook) = config.approvals.webhook.clone() {
            tasks.push(crate::approvals::webhook::spawn(
                approvals.clone(),
                webhook,
            )?);
        }
        let interceptor = Arc::new(Interceptor {
            servers,
            routes: routes.clone(),
            orig_dst: redirector.clone(),
            identity: identity.clone(),
            audit: audit.clone(),
            max_body: config.max_body_bytes,
            limits: config.limits,
            connections: Default::default(),
            repeats: Default::default(),
            terminator,
            sessions: Arc::default(),
            routing: policies.routing(),
            pods: pods.clone(),
            drain: Arc::default(),
            metrics: metrics.clone(),
            approvals,
            user_approvals,
        });
        let (reloader, _) = reload::spawn(policies.clone(), config.flags.clone())?;
        if reload::shares_watched_dir(&policies, &config.flags, &config.audit) {
            tracing::warn!(
                audit = %config.audit.display(),
                "the audit log is in a directory the policy watcher watches: every record wakes \
                 the watcher (a few µs of CPU per call); keep it apart, as /var/log/mcpwarden is \
                 from /etc/mcpwarden"
            );
        }
        // The watches start before the datapath: a caller's pod is known as early as can be.
        // An unreachable API server delays nothing here (the watchers retry on their own).
        let kube = match kube_config.clone() {
            Some(kc) => {
                let services = config
                    .servers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        crate::k8s::service_of(&s.url.host, s.url.port).map(|svc| (i, svc))
                    })
                    .collect();
                let (kube, watches) = crate::k8s::start(crate::k8s::Watches {
                    config: kc,
                    settings: config.kubernetes.clone(),
                    pods: pods.clone(),
                    backends: backends.clone(),
                    services,
                    approvals: Some(interceptor.approvals.clone()),
                })?;
                tasks.extend(watches);
                let k = kube.clone();
                health.set_kubernetes(move || k.not_ready());
                Some(kube)
            }
            None => {
                tracing::info!("no Kubernetes API configured: callers are known by process, cgroup and container");
                None
            }
        };
        let (listeners_tx, listeners_rx) = tokio::sync::mpsc::unbounded_channel();
        // The workers first: if they cannot start, nothing has been spawned yet.
        let serve = interceptor.clone().serve(listeners_rx, config.workers)?;
        let (coverage, started) = Coverage::start(
            CoverageSettings {
                listen: config.listen.clone(),
                pin_dirs: config.netns_dirs.clone(),
                attach: attach.clone(),
                host_addrs,
                resolve_again: resolve_again.clone(),
                inherited: std::sync::Mutex::new(inherited),
                registry: registry.clone(),
            },
            Parts {
                redirector: redirector.clone(),
                events,
                accept: listeners_tx.clone(),
                audit: audit.clone(),
                identity: identity.clone(),
            },
        )?;
        // The host's addresses are known now: endpoints on one of them are local too.
        resolver.refresh(redirector.as_ref(), &routes).await?;
        health.maps_synced();
        {
            let (routes, config) = (routes.clone(), config.clone());
            health.set_unresolved(move || crate::control::Control::unresolved(&routes, &config));
        }
        tracing::info!(
            count = started.served.len(),
            namespaces = ?started
                .served
                .iter()
                .map(|(ino, name, _)| format!("{name} (net:[{ino}])"))
                .collect::<Vec<_>>(),
            "network namespaces covered"
        );
        for (ino, name, why) in &started.pending {
            tracing::warn!(netns = ino, name, "network namespace not served yet: {why}");
        }
        // Resolve first, attach second: the endpoints and the namespaces' listeners are in the
        // maps before any program runs, so no connect made from now on goes direct.
        let attached = redirector.attach()?;
        health.attached();
        tracing::info!(
            failure_mode = ?config.failure_mode,
            bpffs_dir = %config.bpffs_dir.display(),
            layout = %attached.layout,
            maps_adopted = attached.maps_adopted,
            links_updated = attached.updated,
            links_created = attached.created,
            links_unpinned = attached.unpinned,
            old_layouts = ?attached.old_layouts,
            "programs attached"
        );
        if closed {
            tracing::info!("failure_mode: closed — the programs stay attached when this agent stops: redirected connects are refused until an agent serves again (`mcpwarden uninstall` removes them)");
        } else {
            tracing::warn!("failure_mode: open — when this agent stops, for whatever reason (a crash, an OOM kill, an upgrade), its programs detach and every call goes straight to the servers, uninspected and unaudited");
        }
        reset_preexisting(
            &redirector,
            &started.namespaces,
            &attach,
            agent_cgroup_id,
            &identity,
            &audit,
        );
        let forgotten = redirector.forget_inherited_netns()?;
        if !forgotten.is_empty() {
            tracing::info!(count = forgotten.len(), "network namespaces an earlier agent served and this one does not: dropped from the maps");
        }
        if config.raw_sockets == crate::config::RawSockets::Allow {
            tracing::warn!("raw_sockets: allow — raw and packet sockets below the attach point can send around the redirect, uninspected");
        }
        let listen = redirector
            .served_netns()
            .into_iter()
            .find(|(cookie, _)| *cookie == started.host.cookie)
            .map(|(_, l)| listen_addrs(&l))
            .unwrap_or_default();

        let resolver =
            tokio::spawn(resolver.run(redirector.clone(), routes.clone(), resolve_again));
        tasks.push(tokio::spawn(serve));
        if let Some(terminator) = interceptor
            .terminator
            .clone()
            .filter(|_| config.tls_prewarm)
        {
            let interceptor = interceptor.clone();
            let routes = routes.clone();
            let host = started.host.clone();
            tasks.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let origins = terminator
                    .prewarm(&interceptor.servers, &routes, &host)
                    .await;
                tracing::info!(
                    origins,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "TLS origins prewarmed: protocols probed, leaves minted"
                );
            }));
        }
        // The admin socket before the previous agent is told to stop: a failure here leaves it
        // serving.
        let control = Arc::new(crate::control::Control {
            config: config.clone(),
            started: std::time::Instant::now(),
            health: health.clone(),
            metrics: metrics.clone(),
            redirector: redirector.clone(),
            routes: routes.clone(),
            policies: policies.clone(),
            audit: audit.clone(),
            interceptor: interceptor.clone(),
            reloader: std::sync::Mutex::new(reloader.clone()),
            agent_cgroup: agent_cgroup.display().to_string(),
            metrics_listen,
            occupancy: std::sync::Mutex::default(),
            kube: kube.clone(),
        });
        {
            let control = control.clone();
            metrics.set_source(move || control.snapshot());
        }
        let access = crate::admin::socket::Access {
            group: config.operate.admin_group,
        };
        // Bound beside the path, moved over it once this agent is the active one: a failed
        // hand-over leaves the previous agent's socket in place.
        let mut admin =
            crate::admin::socket::AdminSocket::bind(&config.operate.admin_socket, access)?;
        let admin_again = Some((config.operate.admin_socket.clone(), access, control.clone()));
        tasks.extend(admin.serve(control, access));
        // Serving: the previous agent (if any) stops accepting and unlocks; this one answers
        // the next.
        if let Some(t) = takeover.take() {
            active = Some(t.ready()?);
            tracing::info!(
                "the previous agent was told to stop accepting: this agent is the active one"
            );
            serve_metrics(&mut tasks)?;
        }
        admin.publish()?;
        tracing::info!(path = %admin.path().display(), group = ?access.group, "admin socket: mcpwarden status, reload, policy explain --live");
        // Workload pods may be scheduled here once this agent is ready (pods known included).
        if let (Some(kube), Some(kc), Some(taint)) =
            (kube, kube_config, config.kubernetes.remove_taint.clone())
        {
            let health = health.clone();
            tasks.push(tokio::spawn(async move {
                while !health.check().ready {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                match crate::k8s::remove_taint(kc, kube, taint) {
                    Ok(task) => {
                        let _ = task.await;
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot remove the not-ready taint"),
                }
            }));
        }
        let handed_over = Arc::new(tokio::sync::Notify::new());
        if let Some(a) = active {
            a.serve(registry, mount.clone(), attach.clone(), handed_over.clone())?;
        }
        Ok(Agent {
            listen,
            redirector,
            tasks,
            reloader,
            coverage: Some(coverage),
            interceptor,
            accept: listeners_tx,
            handed_over,
            resolver: Some(resolver),
            audit,
            health,
            metrics_stop,
            _admin: Some(admin),
            admin_again,
            draining_admin: None,
        })
    }

    /// Waits for SIGTERM or SIGINT; each SIGHUP meanwhile reloads the policies and config, each
    /// SIGUSR1 reopens the audit log (after logrotate renamed it).
    pub async fn run_until_signal(&self, signals: &mut Signals) -> Result<Stopped> {
        loop {
            tokio::select! {
                _ = signals.term.recv() => return Ok(Stopped::Signal),
                _ = signals.int.recv() => return Ok(Stopped::Signal),
                () = self.handed_over.notified() => return Ok(Stopped::HandedOver),
                _ = signals.hup.recv() => {
                    tracing::info!("SIGHUP: reloading policies and config");
                    self.reload();
                }
                _ = signals.usr1.recv() => {
                    if let Err(e) = self.audit.reopen() {
                        tracing::error!(error = %e, "SIGUSR1: reopening the audit log failed; writing on to the file open before");
                    }
                }
            }
        }
    }

    /// Stop and wait until everything is down: connections closed, the workers joined (their
    /// deferred audit records written), the programs detached once the last reference to the
    /// maps and links is gone. Dropping an `Agent` only starts this.
    pub async fn stop(mut self) {
        let mut tasks = std::mem::take(&mut self.tasks);
        tasks.extend(self.resolver.take());
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            // Cancelled or finished: either way the task's future has been dropped.
            let _ = t.await;
        }
    }

    /// After a hand-over: accept nothing more, stop watching namespaces and endpoints (the new
    /// agent does), let the connections still open finish within `within` — HTTP/1.1 answers
    /// close their connections, HTTP/2 ones get GOAWAY — and close what is left then.
    pub async fn drain(&mut self, within: std::time::Duration) {
        // Calls held for an approval keep their connections: they are decided here (this
        // agent's admin socket and watches stay up) or time out before the deadline.
        let within = within
            .max(self.interceptor.approvals.longest_wait() + std::time::Duration::from_secs(1));
        if let Some((path, access, control)) = self.admin_again.take() {
            match crate::admin::socket::AdminSocket::bind(&path, access) {
                Ok(mut socket) => {
                    self.tasks.extend(socket.serve(control, access));
                    tracing::info!(path = %socket.staged().display(), "admin socket of the draining agent: its held calls are approved here");
                    self.draining_admin = Some(socket);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot bind the draining agent's admin socket: its held calls can only time out or be decided through Approval resources")
                }
            }
        }
        let open = self.interceptor.connections.open();
        tracing::info!(
            connections = open,
            within_s = within.as_secs(),
            "handed over to a new agent: no longer accepting; draining"
        );
        let _ = self.accept.send(crate::netns::ListenerMsg::StopAccepting);
        self.health.handed_over();
        self.metrics_stop.notify_one();
        self.coverage = None;
        // The new agent keeps the shared maps up to date.
        if let Some(resolver) = self.resolver.take() {
            resolver.abort();
        }
        self.interceptor.drain.start();
        let mut deadline = tokio::time::Instant::now() + within;
        while self.interceptor.connections.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            // A call held since (a request on a connection still open) may wait longer.
            let held = self.interceptor.approvals.longest_wait();
            if !held.is_zero() {
                deadline = deadline
                    .max(tokio::time::Instant::now() + held + std::time::Duration::from_secs(1));
            }
        }
        let left = self.interceptor.connections.open();
        if left > 0 {
            self.interceptor.drain.force();
            tracing::warn!(connections = left, "drain deadline: closing the connections still open (idle keep-alive connections, SSE streams); their clients reconnect to the new agent");
        }
        // The connections' tasks end and write their last records.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        tracing::info!(
            closed_at_deadline = left,
            "drained: idle until SIGTERM (nothing detached)"
        );
    }

    /// Re-read the policy files and the config now (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.reloader.send(reload::Msg::Reload);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.reloader.send(reload::Msg::Stop);
        for t in self.tasks.iter().chain(&self.resolver) {
            t.abort();
        }
    }
}

/// Reset the connections to endpoints opened before the programs were attached, each audited
/// as `preexisting_reset`; where that cannot be done, say so (a warning, and the record's
/// reason).
fn reset_preexisting(
    redirector: &Redirector,
    namespaces: &[Arc<crate::netns::Netns>],
    attach: &Path,
    agent_cgroup: u64,
    identity: &crate::identity::Resolver,
    audit: &AuditLog,
) {
    use crate::audit::{CallerPart, Event, Head, Record};
    let (found, failed) =
        crate::redirect::preexisting::reset(redirector, namespaces, attach, agent_cgroup);
    for (ns, why) in &failed {
        tracing::warn!(netns = ns.ino, error = %why, "cannot list the connections opened before the programs were attached in this network namespace: any to an endpoint stays uninspected until it closes");
    }
    for f in &found {
        let (pid, comm) = f.pid.clone().unwrap_or_default();
        let kernel = crate::identity::Kernel {
            pid,
            uid: f.sock.uid,
            gid: 0,
            cgroup_id: f.sock.cgroup_id.unwrap_or(0),
            comm,
            netns: f.netns.cookie,
        };
        let caller = identity.caller(&kernel);
        let head = Arc::new(Head::caller(&Arc::new(CallerPart::of(
            &caller,
            Some(f.sock.dst),
            Some(f.netns.ino),
        ))));
        let record = Record::new(Event::PreexistingReset, head);
        let record = match &f.reset {
            Ok(()) => {
                tracing::info!(netns = f.netns.ino, src = %f.sock.src, dst = %f.sock.dst, pid, "reset a connection to an endpoint opened before the programs were attached: its next attempt is inspected");
                record.because("a connection to an MCP endpoint opened before mcpwarden attached (never inspected) was reset; the client's next connection is inspected")
            }
            Err(e) => {
                tracing::warn!(netns = f.netns.ino, src = %f.sock.src, dst = %f.sock.dst, error = %e, "cannot reset a connection to an endpoint opened before the programs were attached: it stays uninspected until it closes");
                record.because(format!("a connection to an MCP endpoint opened before mcpwarden attached could not be reset ({e}): it stays uninspected until it closes"))
            }
        };
        if let Err(e) = audit.write(&record) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }
}

/// The interceptor's addresses in one namespace, as the programs' map holds them.
fn listen_addrs(l: &mcpwarden_common::Listeners) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if l.v4_port != 0 {
        out.push(SocketAddr::from((l.v4_addr.to_ne_bytes(), l.v4_port)));
    }
    if l.v6_port != 0 {
        let key = mcpwarden_common::SockKey {
            addr: l.v6_addr,
            port: l.v6_port,
            _pad: 0,
        };
        out.push(key.to_socket_addr());
    }
    out
}

/// The agent's own cgroup, never redirected: `given` (relative to the mount, or absolute), which
/// the agent moves into, or `self`: the cgroup it was started in (a container's), which it
/// must hold alone — every process in it is exempt.
fn settle_agent_cgroup(mount: &Path, attach: &Path, given: &Path) -> Result<PathBuf> {
    let own = given == Path::new(AGENT_CGROUP_SELF);
    let dir = if own {
        cgroup::of_process(mount, "self")?
    } else {
        cgroup::resolve(mount, given)?
    };
    // Everything in the agent's cgroup is exempt from redirection: it must hold the agent only.
    if dir.components().eq(mount.components()) || dir.components().eq(attach.components()) {
        anyhow::bail!(
            "the agent cgroup {} must be a cgroup of its own, not the attach point or the cgroup2 root: \
             every process in it is exempt from redirection",
            dir.display()
        );
    }
    if !own {
        cgroup::join(&dir)?;
        return Ok(dir);
    }
    let me = std::process::id().to_string();
    let others: Vec<String> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?
        .lines()
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != me)
        .map(str::to_owned)
        .collect();
    if !others.is_empty() {
        anyhow::bail!(
            "agent_cgroup: self, but the agent's cgroup {} also holds processes {}: they would be \
             exempt from redirection. Run the agent alone in its cgroup (a container, a systemd \
             service), or give --agent-cgroup PATH to move it into a cgroup of its own",
            dir.display(),
            others.join(", ")
        );
    }
    Ok(dir)
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

/// Raise the open-file limit: every intercepted connection holds two descriptors (client and
/// upstream), and long-lived SSE streams hold theirs for hours, so the default soft limit of
/// 1024 would cap a node at a few hundred agent connections. As root (CAP_SYS_RESOURCE) the
/// hard limit is raised too, up to the kernel's `fs.nr_open` (at most 1,048,576); otherwise the
/// soft limit goes up to the hard one. Returns the limit in force.
pub fn raise_nofile_limit() -> Option<u64> {
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
