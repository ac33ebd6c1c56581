//! The `mcpwarden-netns` thread: which network namespaces the interceptor serves.
//!
//! For each namespace found ([`super::discover`]): enter it, bind the interceptor's listeners
//! there (the configured loopback addresses; another port if a process there already holds the
//! configured one), read its interface addresses, hand the listeners to the accept loop, and only
//! then add it to the programs' `NETNS` map — from that moment its connects to endpoints are
//! redirected; before it, they fail (EPERM) and are audited once as `unprepared_netns`, and
//! nothing goes direct. A namespace whose loopback is not up yet (a pod sandbox before its CNI
//! ran) stays pending until an address appears there. When a namespace goes (its pin is
//! removed and no process is left in it), everything held for it goes too: the map entry, the
//! listeners, the address watch, the workers' upstream pools.
//!
//! The thread also audits what the programs refused: UDP to an endpoint, raw sockets, binds of
//! the interceptor's port (once per caller per minute, with the number of repeats).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};

use super::{
    discover::{self, MountWatch},
    open_ns, Netns, NsId,
};
use crate::{
    audit::{AuditLog, CallerPart, Event, Head, Record},
    identity,
    redirect::{
        events::{Events, KernelEvent, Kind},
        resolve::HostAddrs,
        Redirector,
    },
};

/// How often namespaces are looked for without an event (processes below the attach point,
/// pins, namespaces whose last process left).
const SWEEP: Duration = Duration::from_secs(10);
/// A refusal of one kind by one caller is audited at most this often (with its repeats).
const REFUSAL_INTERVAL: Duration = Duration::from_secs(60);

/// What the accept loop is told.
pub enum ListenerMsg {
    /// Accept on these listeners, for connections made in `netns`.
    Serve {
        netns: Arc<Netns>,
        listeners: Vec<std::net::TcpListener>,
    },
    /// Close namespace `cookie`'s listeners and drop what the workers hold for it.
    Stop { cookie: u64 },
    /// Close every listener (handed over to a new agent); connections being served go on.
    StopAccepting,
}

/// What the coverage thread needs.
pub struct CoverageSettings {
    /// The interceptor's addresses (loopback), bound in every namespace.
    pub listen: Vec<SocketAddr>,
    /// Where namespaces are pinned.
    pub pin_dirs: Vec<PathBuf>,
    /// The attach point (absolute cgroup directory): its processes' namespaces are served.
    pub attach: PathBuf,
    /// The host's interface addresses, for the endpoint resolver.
    pub host_addrs: HostAddrs,
    /// Told when the host's addresses change (local endpoints are published again).
    pub resolve_again: Arc<tokio::sync::Notify>,
    /// Listeners handed over by the previous agent, by namespace cookie: served as they are
    /// instead of binding new ones.
    pub inherited: std::sync::Mutex<HashMap<u64, Vec<std::net::TcpListener>>>,
    /// Every listener served, for the next agent's hand-over.
    pub registry: Arc<crate::handover::Registry>,
}

/// What was served once the first pass was done.
pub struct Started {
    /// The host's namespace (TLS prewarm probes from there).
    pub host: Arc<Netns>,
    /// (inode, name, cookie) of every namespace served.
    pub served: Vec<(u64, String, u64)>,
    /// Namespaces found but not served yet, with why.
    pub pending: Vec<(u64, String, String)>,
    /// Every namespace found, served or not.
    pub namespaces: Vec<Arc<Netns>>,
}

/// The running coverage thread; dropping it stops the thread.
pub struct Coverage {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Coverage {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The parts the thread works with.
pub struct Parts {
    pub redirector: Arc<Redirector>,
    pub events: Events,
    pub accept: mpsc::UnboundedSender<ListenerMsg>,
    pub audit: Arc<AuditLog>,
    pub identity: Arc<identity::Resolver>,
}

impl Coverage {
    /// Start the thread, serve every namespace that exists now (the agent's, the host's, the
    /// pinned ones, those of processes below the attach point), and return once that is done.
    /// Fails when the agent's own namespace cannot be served.
    pub fn start(settings: CoverageSettings, parts: Parts) -> Result<(Coverage, Started)> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mcpwarden-netns".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let (mut state, events) = match State::new(settings, parts) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    };
                    match state.first_pass() {
                        Ok(started) => {
                            let _ = started_tx.send(Ok(started));
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    }
                    state.run(events, stop_rx).await;
                });
            })
            .context("starting the mcpwarden-netns thread")?;
        let started = started_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the mcpwarden-netns thread stopped at start"))??;
        Ok((
            Coverage {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            started,
        ))
    }
}

/// One namespace found.
struct Entry {
    netns: Arc<Netns>,
    /// Pins naming it now.
    pins: BTreeSet<PathBuf>,
    /// The agent's and the host's: never torn down.
    permanent: bool,
    /// The address watch task.
    watch: Option<tokio::task::JoinHandle<()>>,
    /// Where the interceptor listens there; None while pending.
    v4: Option<SocketAddrV4>,
    v6: Option<SocketAddrV6>,
    served: bool,
    /// Why it is not served yet.
    pending: Option<String>,
    addrs: BTreeSet<IpAddr>,
    /// When it was found (namespace-ready latency).
    found: Instant,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
    }
}

struct State {
    s: CoverageSettings,
    redirector: Arc<Redirector>,
    accept: mpsc::UnboundedSender<ListenerMsg>,
    audit: Arc<AuditLog>,
    identity: Arc<identity::Resolver>,
    own: NsId,
    host: NsId,
    entries: HashMap<u64, Entry>,
    by_id: HashMap<NsId, u64>,
    pins: BTreeMap<PathBuf, NsId>,
    /// Namespaces whose unprepared connect was audited (until they are served and gone).
    unprepared_audited: HashSet<u64>,
    /// (kind, cgroup) → (last written, repeats since).
    refusals: HashMap<(u8, u64), (Instant, u64)>,
    addr_tx: mpsc::UnboundedSender<u64>,
    addr_rx: Option<mpsc::UnboundedReceiver<u64>>,
}

impl State {
    fn new(s: CoverageSettings, parts: Parts) -> Result<(State, Events)> {
        let own = NsId::at(&discover::proc_netns(std::process::id()))
            .context("reading the agent's own network namespace")?;
        // The host's namespace is PID 1's (a containerised agent needs the host's PID
        // namespace to see it; otherwise its own counts as the host's).
        let host = discover::netns_of_pid(1).unwrap_or(own);
        let (addr_tx, addr_rx) = mpsc::unbounded_channel();
        Ok((
            State {
                s,
                redirector: parts.redirector,
                accept: parts.accept,
                audit: parts.audit,
                identity: parts.identity,
                own,
                host,
                entries: HashMap::new(),
                by_id: HashMap::new(),
                pins: BTreeMap::new(),
                unprepared_audited: HashSet::new(),
                refusals: HashMap::new(),
                addr_tx,
                addr_rx: Some(addr_rx),
            },
            parts.events,
        ))
    }

    /// The agent's namespace, the host's, the pins, the processes below the attach point.
    fn first_pass(&mut self) -> Result<Started> {
        let own_fd = open_ns(discover::proc_netns(std::process::id()))
            .context("opening the agent's own network namespace")?;
        let own = self.add(own_fd, "agent".into(), None, true, Instant::now())?;
        if !self.entries.get(&own).is_some_and(|e| e.served) {
            let why = self
                .entries
                .get(&own)
                .and_then(|e| e.pending.clone())
                .unwrap_or_default();
            anyhow::bail!("binding the interceptor in the agent's own network namespace: {why}");
        }
        if self.host != self.own {
            match open_ns("/proc/1/ns/net") {
                Ok(fd) => {
                    self.add(fd, "host".into(), None, true, Instant::now())?;
                }
                Err(e) => tracing::warn!(error = %e, "cannot open the host's network namespace"),
            }
        }
        self.rescan_pins();
        self.scan_processes();
        let host_cookie = self.by_id.get(&self.host).copied().unwrap_or(own);
        let host = self
            .entries
            .get(&host_cookie)
            .map(|e| e.netns.clone())
            .ok_or_else(|| anyhow::anyhow!("the host's network namespace is not served"))?;
        let mut served = Vec::new();
        let mut pending = Vec::new();
        for e in self.entries.values() {
            match &e.pending {
                None => served.push((e.netns.ino, e.netns.name.clone(), e.netns.cookie)),
                Some(why) => pending.push((e.netns.ino, e.netns.name.clone(), why.clone())),
            }
        }
        served.sort();
        pending.sort();
        Ok(Started {
            host,
            served,
            pending,
            namespaces: self.entries.values().map(|e| e.netns.clone()).collect(),
        })
    }

    async fn run(&mut self, mut events: Events, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let mounts = match MountWatch::new() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the mount table: pinned network namespaces are found by the periodic sweep only");
                None
            }
        };
        let Some(mut addr_rx) = self.addr_rx.take() else {
            return;
        };
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                batch = events.next_batch() => match batch {
                    Ok(batch) => {
                        for ev in batch {
                            self.on_event(ev);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the programs' events failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                changed = async {
                    match &mounts {
                        Some(m) => m.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_ok() {
                        self.rescan_pins();
                    }
                }
                Some(cookie) = addr_rx.recv() => self.addresses_changed(cookie),
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// Add the namespace behind `fd` (or a pin to it, if it is known), and serve it if it can
    /// be. Returns its cookie.
    fn add(
        &mut self,
        fd: OwnedFd,
        name: String,
        pin: Option<PathBuf>,
        permanent: bool,
        found: Instant,
    ) -> Result<u64> {
        let id = NsId::of(&fd).context("reading a network namespace's identity")?;
        if let Some(&cookie) = self.by_id.get(&id) {
            if let Some(e) = self.entries.get_mut(&cookie) {
                e.pins.extend(pin);
                e.permanent |= permanent;
                if !e.served {
                    self.try_serve(cookie);
                }
            }
            return Ok(cookie);
        }
        let netns = Arc::new(
            Netns::new(fd, self.own, self.host, name).context("entering a network namespace")?,
        );
        let cookie = netns.cookie;
        let watch = match netns.address_monitor() {
            Ok(fd) => Some(self.watch_addresses(cookie, fd)),
            Err(e) => {
                tracing::warn!(netns = netns.ino, error = %e, "cannot watch the namespace's addresses");
                None
            }
        };
        self.by_id.insert(id, cookie);
        self.entries.insert(
            cookie,
            Entry {
                netns,
                pins: pin.into_iter().collect(),
                permanent,
                watch,
                v4: None,
                v6: None,
                served: false,
                pending: None,
                addrs: BTreeSet::new(),
                found,
            },
        );
        self.try_serve(cookie);
        Ok(cookie)
    }

    fn watch_addresses(&self, cookie: u64, fd: OwnedFd) -> tokio::task::JoinHandle<()> {
        let tx = self.addr_tx.clone();
        tokio::spawn(async move {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open as long as it does.
            let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) })
            else {
                return;
            };
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                super::drain(guard.get_inner());
                guard.clear_ready();
                if tx.send(cookie).is_err() {
                    return;
                }
            }
        })
    }

    /// Bind the listeners in namespace `cookie` and start redirecting there.
    fn try_serve(&mut self, cookie: u64) {
        let Some(e) = self.entries.get_mut(&cookie) else {
            return;
        };
        if e.served {
            return;
        }
        let mut listeners = Vec::new();
        let mut errors = Vec::new();
        let inherited = self
            .s
            .inherited
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&cookie))
            .unwrap_or_default();
        for l in inherited {
            match l.local_addr() {
                Ok(SocketAddr::V4(a)) if e.v4.is_none() => e.v4 = Some(a),
                Ok(SocketAddr::V6(a)) if e.v6.is_none() => e.v6 = Some(a),
                _ => continue,
            }
            listeners.push(l);
        }
        for addr in &self.s.listen {
            let have = if addr.is_ipv4() {
                e.v4.is_some()
            } else {
                e.v6.is_some()
            };
            if have {
                continue;
            }
            match bind(&e.netns, *addr) {
                Ok(l) => {
                    match l.local_addr() {
                        Ok(SocketAddr::V4(a)) => e.v4 = Some(a),
                        Ok(SocketAddr::V6(a)) => e.v6 = Some(a),
                        Err(err) => {
                            errors.push(format!("{addr}: {err}"));
                            continue;
                        }
                    }
                    listeners.push(l);
                }
                Err(err) => errors.push(format!("{addr}: {err}")),
            }
        }
        if listeners.is_empty() {
            let why = format!(
                "no interceptor address could be bound there ({})",
                errors.join("; ")
            );
            if e.pending.as_deref() != Some(why.as_str()) {
                tracing::warn!(
                    netns = e.netns.ino,
                    name = %e.netns.name,
                    "network namespace not served yet, its connects to endpoints fail closed: {why}"
                );
            }
            e.pending = Some(why);
            return;
        }
        if !errors.is_empty() {
            tracing::info!(netns = e.netns.ino, name = %e.netns.name, "some interceptor addresses are not available there: {}", errors.join("; "));
        }
        let addrs = e
            .netns
            .addresses()
            .unwrap_or_default()
            .into_iter()
            .collect();
        store_addrs(&self.redirector, e, addrs);
        for l in &listeners {
            self.s.registry.add(cookie, l);
        }
        if self
            .accept
            .send(ListenerMsg::Serve {
                netns: e.netns.clone(),
                listeners,
            })
            .is_err()
        {
            return;
        }
        let l = crate::redirect::listeners(e.v4, e.v6);
        if let Err(err) = self.redirector.serve_netns(cookie, l) {
            tracing::error!(netns = e.netns.ino, error = %format!("{err:#}"), "adding the namespace to the redirect map failed");
            let _ = self.accept.send(ListenerMsg::Stop { cookie });
            e.pending = Some(format!("{err:#}"));
            return;
        }
        e.served = true;
        e.pending = None;
        tracing::info!(
            netns = e.netns.ino,
            cookie,
            name = %e.netns.name,
            v4 = ?e.v4,
            v6 = ?e.v6,
            ready_ms = e.found.elapsed().as_secs_f64() * 1000.0,
            "network namespace ready"
        );
        if e.netns.host {
            self.publish_host_addrs(cookie);
        }
    }

    /// The host's addresses changed: the resolver publishes local endpoints again.
    fn publish_host_addrs(&self, cookie: u64) {
        let Some(e) = self.entries.get(&cookie) else {
            return;
        };
        if let Ok(mut a) = self.s.host_addrs.write() {
            if *a != e.addrs {
                *a = e.addrs.clone();
                self.s.resolve_again.notify_one();
            }
        }
    }

    fn addresses_changed(&mut self, cookie: u64) {
        let Some(e) = self.entries.get_mut(&cookie) else {
            return;
        };
        if !e.served {
            self.try_serve(cookie);
            return;
        }
        let addrs: BTreeSet<IpAddr> = match e.netns.addresses() {
            Ok(a) => a.into_iter().collect(),
            Err(err) => {
                tracing::warn!(netns = e.netns.ino, error = %err, "reading the namespace's addresses failed");
                return;
            }
        };
        // An IPv6 loopback that appeared after the namespace was served.
        if e.v6.is_none() {
            if let Some(addr) = self.s.listen.iter().find(|a| a.is_ipv6()) {
                if let Ok(l) = bind(&e.netns, *addr) {
                    if let Ok(SocketAddr::V6(a)) = l.local_addr() {
                        e.v6 = Some(a);
                        self.s.registry.add(cookie, &l);
                        let _ = self.accept.send(ListenerMsg::Serve {
                            netns: e.netns.clone(),
                            listeners: vec![l],
                        });
                        let _ = self
                            .redirector
                            .serve_netns(cookie, crate::redirect::listeners(e.v4, e.v6));
                        tracing::info!(netns = e.netns.ino, v6 = ?e.v6, "IPv6 listener added");
                    }
                }
            }
        }
        if addrs == e.addrs {
            return;
        }
        store_addrs(&self.redirector, e, addrs);
        if e.netns.host {
            self.publish_host_addrs(cookie);
        }
    }

    /// Stop serving namespace `cookie` and let go of everything held for it.
    fn teardown(&mut self, cookie: u64, why: &str) {
        let Some(e) = self.entries.remove(&cookie) else {
            return;
        };
        self.by_id.remove(&e.netns.id);
        self.unprepared_audited.remove(&cookie);
        if let Err(err) = self.redirector.unserve_netns(cookie) {
            tracing::error!(netns = e.netns.ino, error = %format!("{err:#}"), "removing the namespace from the redirect map failed");
        }
        let _ = self.accept.send(ListenerMsg::Stop { cookie });
        self.s.registry.remove(cookie);
        tracing::info!(netns = e.netns.ino, cookie, name = %e.netns.name, "network namespace no longer served: {why}");
    }

    /// Read the pin directories again: serve new pins, and let go of namespaces whose last pin
    /// went and in which no process is left.
    fn rescan_pins(&mut self) {
        let now = discover::pins(&self.s.pin_dirs);
        for (path, id) in &now {
            if self.pins.get(path) == Some(id) {
                continue;
            }
            let found = Instant::now();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            match open_ns(path) {
                Ok(fd) => {
                    if let Err(e) = self.add(fd, name, Some(path.clone()), false, found) {
                        tracing::warn!(pin = %path.display(), error = %format!("{e:#}"), "cannot serve a pinned network namespace");
                    }
                }
                Err(e) => {
                    tracing::debug!(pin = %path.display(), error = %e, "not a network namespace (yet)")
                }
            }
        }
        let gone: Vec<(PathBuf, NsId)> = self
            .pins
            .iter()
            .filter(|(p, id)| now.get(*p) != Some(*id))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        self.pins = now;
        if gone.is_empty() {
            return;
        }
        let mut orphans = Vec::new();
        for (path, id) in gone {
            let Some(&cookie) = self.by_id.get(&id) else {
                continue;
            };
            if let Some(e) = self.entries.get_mut(&cookie) {
                e.pins.remove(&path);
                if e.pins.is_empty() && !e.permanent {
                    orphans.push(cookie);
                }
            }
        }
        if orphans.is_empty() {
            return;
        }
        let alive = discover::all_process_namespaces();
        for cookie in orphans {
            let Some(e) = self.entries.get(&cookie) else {
                continue;
            };
            if alive.contains_key(&e.netns.id) {
                tracing::info!(
                    netns = e.netns.ino,
                    "pin removed, processes remain: still served"
                );
                continue;
            }
            self.teardown(cookie, "its pin was removed and no process is left in it");
        }
    }

    /// Serve the namespace of every process below the attach point.
    fn scan_processes(&mut self) {
        for pid in discover::processes_below(&self.s.attach) {
            let Ok(id) = discover::netns_of_pid(pid) else {
                continue;
            };
            if self.by_id.contains_key(&id) {
                continue;
            }
            self.add_pid(pid);
        }
    }

    fn add_pid(&mut self, pid: u32) {
        let found = Instant::now();
        match open_ns(discover::proc_netns(pid)) {
            Ok(fd) => {
                if let Err(e) = self.add(fd, format!("pid:{pid}"), None, false, found) {
                    tracing::warn!(pid, error = %format!("{e:#}"), "cannot serve a process's network namespace");
                }
            }
            Err(e) => {
                tracing::debug!(pid, error = %e, "process gone before its namespace was opened")
            }
        }
    }

    /// Every few seconds: the pins and the processes (events may be lost), pending namespaces
    /// again, and namespaces with no pin whose last process left.
    fn sweep(&mut self) {
        // Callers that stopped being refused long ago: forget them (and their unwritten repeats).
        self.refusals
            .retain(|_, (last, _)| last.elapsed() < REFUSAL_INTERVAL * 10);
        self.rescan_pins();
        self.scan_processes();
        let pending: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.served)
            .map(|(c, _)| *c)
            .collect();
        for cookie in pending {
            self.try_serve(cookie);
        }
        let unpinned: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pins.is_empty() && !e.permanent)
            .map(|(c, _)| *c)
            .collect();
        if unpinned.is_empty() {
            return;
        }
        let alive = discover::all_process_namespaces();
        for cookie in unpinned {
            if self
                .entries
                .get(&cookie)
                .is_some_and(|e| !alive.contains_key(&e.netns.id))
            {
                self.teardown(cookie, "no process is left in it");
            }
        }
    }

    fn on_event(&mut self, ev: KernelEvent) {
        match ev.kind {
            Kind::Unprepared => {
                // Prepare first: the record can then name the namespace. The caller may be
                // gone already; its namespace may be pinned.
                if !self.entries.get(&ev.kernel.netns).is_some_and(|e| e.served) {
                    self.add_pid(ev.kernel.pid);
                }
                if !self.entries.contains_key(&ev.kernel.netns) {
                    self.rescan_pins();
                }
                if self.unprepared_audited.insert(ev.kernel.netns) {
                    self.audit_unprepared(&ev);
                }
            }
            Kind::Udp | Kind::Raw | Kind::Bind | Kind::NoRecord => self.audit_refusal(&ev),
        }
    }

    /// The caller part of a record about a kernel event.
    fn caller(&self, ev: &KernelEvent) -> Arc<CallerPart> {
        let caller = self.identity.caller(&ev.kernel);
        let netns = self
            .entries
            .get(&ev.kernel.netns)
            .map(|e| e.netns.ino)
            .or_else(|| discover::netns_of_pid(ev.kernel.pid).ok().map(|id| id.ino));
        Arc::new(CallerPart::of(&caller, ev.addr, netns))
    }

    fn write(&self, rec: &Record) {
        if let Err(e) = self.audit.write(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    fn audit_unprepared(&self, ev: &KernelEvent) {
        let head = Arc::new(Head::caller(&self.caller(ev)));
        tracing::warn!(pid = ev.kernel.pid, netns_cookie = ev.kernel.netns, dst = ?ev.addr, "connect to an endpoint from a network namespace not served yet: refused");
        self.write(&Record::new(Event::UnpreparedNetns, head).denied(
            "connect to an MCP endpoint from a network namespace mcpwarden does not serve yet: \
             refused (EPERM), never sent direct; the namespace is being prepared",
        ));
    }

    fn audit_refusal(&mut self, ev: &KernelEvent) {
        let (tag, reason) = match ev.kind {
            Kind::Udp => (
                0,
                "UDP to an MCP endpoint is refused: QUIC and HTTP/3 cannot be inspected; clients fall back to TCP"
                    .to_owned(),
            ),
            Kind::Raw => (
                1,
                format!(
                    "{} socket refused below the attach point: it can send packets around the \
                     redirect (raw_sockets: allow permits it, uninspected)",
                    if u32::from(ev.family) == mcpwarden_common::AF_PACKET {
                        "AF_PACKET"
                    } else {
                        "SOCK_RAW"
                    }
                ),
            ),
            Kind::Bind => (
                2,
                "binding the interceptor's port is refused: only mcpwarden listens there".to_owned(),
            ),
            Kind::NoRecord => (
                3,
                "the redirect record could not be stored (map full): connection to an MCP endpoint refused"
                    .to_owned(),
            ),
            Kind::Unprepared => return,
        };
        let now = Instant::now();
        let key = (tag, ev.kernel.cgroup_id);
        let repeats = match self.refusals.get_mut(&key) {
            Some((last, skipped)) if now.duration_since(*last) < REFUSAL_INTERVAL => {
                *skipped += 1;
                return;
            }
            Some((last, skipped)) => {
                let n = *skipped;
                *last = now;
                *skipped = 0;
                n
            }
            None => {
                self.refusals.insert(key, (now, 0));
                0
            }
        };
        let mut rec = Record::new(Event::Refused, Arc::new(Head::caller(&self.caller(ev))))
            .denied(reason)
            .kind(crate::audit::Refusal::Kernel);
        rec.repeats = (repeats > 0).then_some(repeats);
        self.write(&rec);
    }
}

/// The namespace's addresses are `addrs` now: in the programs' map and in its entry.
fn store_addrs(redirector: &Redirector, e: &mut Entry, addrs: BTreeSet<IpAddr>) {
    if let Err(err) = redirector.set_local_addrs(e.netns.cookie, &addrs) {
        tracing::error!(netns = e.netns.ino, error = %format!("{err:#}"), "writing the namespace's addresses failed");
    }
    e.addrs = addrs;
}

/// Bind `addr` in `netns`; if a process there already holds its port, another port (the
/// programs learn it from the namespace's map entry).
fn bind(netns: &Netns, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    match netns.listen(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            tracing::warn!(netns = netns.ino, %addr, "the interceptor's port is taken in this namespace (bound before mcpwarden started): listening on another");
            netns.listen(SocketAddr::new(addr.ip(), 0))
        }
        other => other,
    }
}
