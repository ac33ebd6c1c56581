//! The assembly of the pipeline: config → policies → cgroups → listeners → eBPF → endpoint
//! resolution → interceptor, and the `run` sequence around it (start, ready, signals, stop).
//! Nothing here parses a command line (`cli`) or a file (`config`).

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    audit::AuditLog,
    config::{Config, TlsMode},
    intercept::{upstream_roots, Interceptor, Leaves, Server, ServerTls, Terminator, TlsClient},
    redirect::{
        cgroup,
        resolve::{EndpointResolver, Routes, Target},
        Redirector, Settings,
    },
    reload::{self, Policies},
};

/// The `run` command: start the agent, say it is ready, serve until SIGTERM or SIGINT (reloading
/// on SIGHUP), then stop.
pub async fn run(config: Config) -> Result<()> {
    let nofile = raise_nofile_limit();
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
    agent.run_until_signal().await?;
    tracing::info!("signal received: detaching and exiting");
    agent.stop().await;
    Ok(())
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
            AuditLog::open_with(&config.audit, config.audit_stall)
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
                host: s
                    .url
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase(),
                port: s.url.port,
                passthrough_paths: s.passthrough_paths.clone(),
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
            limits: config.limits,
            connections: Default::default(),
            repeats: Default::default(),
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

    /// Waits for SIGTERM or SIGINT; each SIGHUP meanwhile reloads the policies and config.
    pub async fn run_until_signal(&self) -> Result<()> {
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
                    self.reload();
                }
            }
        }
    }

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
