//! Upgrades without a refused connection: a starting agent takes the interceptor's listening
//! sockets over from the running one by descriptor passing, as Envoy's hot restart and ztunnel
//! do, instead of binding anew.
//!
//! The state directory (0700) holds `agent.lock`, which the active agent keeps locked (`flock`;
//! exactly one agent is active), and `handover.sock`, where it answers a successor:
//!
//! ```text
//! new agent                                   active agent
//!   flock(agent.lock, NB) fails: one is active
//!   connect(handover.sock)  ───────────────▶  peer check: uid 0 (SO_PEERCRED), its cgroup not
//!                                             below the attach point (not a workload's)
//!                           ◀───────────────  per batch: a JSON line [{cookie, addr}…] with the
//!                                             listening sockets (SCM_RIGHTS); then `END`
//!   check each: SO_ACCEPTCONN, SO_DOMAIN, SO_TYPE, getsockname, SO_NETNS_COOKIE;
//!   serve them (both accept meanwhile: no connection waits), attach, …
//!   `READY` ────────────────────────────────▶ stops accepting, unlocks, drains, idles
//!   flock(agent.lock) — now the active one      (if the new agent goes away before `READY`,
//!                                               the active one keeps serving as before)
//! ```
//!
//! No `SO_REUSEPORT`: a pod's root could join such a group. The listeners are the same sockets,
//! so the programs' map entries (ports) stay right throughout. The metrics listener (`/metrics`,
//! `/healthz`, `/readyz`) is handed over the same way, marked `"metrics": true`, so the two
//! agents never need its port at once.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, IoSlice, IoSliceMut, Write},
    mem::MaybeUninit,
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rustix::net::{
    recvmsg, sendmsg, sockopt, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketType,
};
use serde::{Deserialize, Serialize};

const LOCK: &str = "agent.lock";
const SOCKET: &str = "handover.sock";
/// Descriptors per message (the kernel takes at most 253).
const BATCH: usize = 128;
/// How long a new agent waits for the active one to answer, and then to unlock.
const WAIT: Duration = Duration::from_secs(30);

/// The listening sockets this agent serves, by namespace cookie: what a successor is handed.
/// `netns` coverage adds each namespace's listeners (duplicates of them) and removes them when
/// the namespace goes.
#[derive(Debug, Default)]
pub struct Registry {
    by_netns: Mutex<HashMap<u64, Vec<(SocketAddr, OwnedFd)>>>,
    /// The metrics listener (in the agent's own namespace): `(cookie, address, socket)`.
    metrics: Mutex<Option<(u64, SocketAddr, OwnedFd)>>,
}

impl Registry {
    pub fn add(&self, cookie: u64, listener: &TcpListener) {
        let (Ok(addr), Ok(fd)) = (listener.local_addr(), listener.as_fd().try_clone_to_owned())
        else {
            return;
        };
        self.lock().entry(cookie).or_default().push((addr, fd));
    }

    /// The metrics listener, handed over too.
    pub fn set_metrics(&self, listener: &TcpListener) -> Result<()> {
        let cookie = crate::redirect::netns_cookie(listener)?;
        let addr = listener.local_addr()?;
        let fd = listener.as_fd().try_clone_to_owned()?;
        *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = Some((cookie, addr, fd));
        Ok(())
    }

    pub fn remove(&self, cookie: u64) {
        self.lock().remove(&cookie);
    }

    /// Let go of every listener: after a hand-over this agent accepts nothing more.
    pub fn clear(&self) {
        self.lock().clear();
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<(SocketAddr, OwnedFd)>>> {
        self.by_netns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holding the lock: this agent is the active one.
#[derive(Debug)]
pub struct Active {
    /// Locked while this agent is the active one; closing it unlocks.
    _lock: fs::File,
    dir: PathBuf,
}

/// What a starting agent finds.
pub enum Start {
    /// No agent is active: this one is, and binds its own listeners.
    Fresh(Active),
    /// One is: these listeners (by namespace cookie) are handed over; say [`Takeover::ready`]
    /// once serving them.
    Takeover(Takeover),
}

/// A hand-over in progress, on the new agent's side.
pub struct Takeover {
    stream: UnixStream,
    lock: fs::File,
    dir: PathBuf,
    /// Sockets received, by namespace cookie.
    pub listeners: HashMap<u64, Vec<TcpListener>>,
    /// The metrics listener, if the active agent had one.
    pub metrics: Option<TcpListener>,
    /// The active agent's pid.
    pub from_pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Described {
    cookie: u64,
    addr: SocketAddr,
    /// The metrics listener rather than an interceptor's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    metrics: bool,
}

/// Take the lock, or the listeners of the agent holding it.
pub fn begin(state_dir: &Path) -> Result<Start> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} 0700", state_dir.display()))?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join(LOCK))
        .with_context(|| format!("opening {}", state_dir.join(LOCK).display()))?;
    if try_lock(&lock)? {
        write_pid(&lock);
        return Ok(Start::Fresh(Active {
            _lock: lock,
            dir: state_dir.to_path_buf(),
        }));
    }
    let path = state_dir.join(SOCKET);
    let deadline = Instant::now() + WAIT;
    let stream = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) => {
                // The active agent may be starting itself, or stopping: once it unlocks, this
                // one starts afresh.
                if try_lock(&lock)? {
                    write_pid(&lock);
                    return Ok(Start::Fresh(Active {
                        _lock: lock,
                        dir: state_dir.to_path_buf(),
                    }));
                }
                if Instant::now() > deadline {
                    return Err(e).with_context(|| {
                        format!(
                            "another agent holds {} but does not answer on {}",
                            state_dir.join(LOCK).display(),
                            path.display()
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    stream.set_read_timeout(Some(WAIT))?;
    let cred =
        crate::identity::peer_cred(&stream).context("reading the active agent's credentials")?;
    let from_pid = cred.pid;
    let peer_uid = cred.uid;
    if peer_uid != 0 {
        bail!(
            "the process answering on {} is not root (uid {peer_uid}): refusing its sockets",
            path.display()
        );
    }
    let (listeners, metrics) = receive(&stream).context("receiving the listening sockets")?;
    Ok(Start::Takeover(Takeover {
        stream,
        lock,
        dir: state_dir.to_path_buf(),
        listeners,
        metrics,
        from_pid,
    }))
}

impl Takeover {
    /// This agent serves: tell the old one to stop accepting and unlock, then hold the lock.
    pub fn ready(mut self) -> Result<Active> {
        self.stream
            .write_all(b"READY\n")
            .context("telling the active agent this one is ready")?;
        let deadline = Instant::now() + WAIT;
        while !try_lock(&self.lock)? {
            if Instant::now() > deadline {
                bail!(
                    "the previous agent did not unlock {} after the hand-over",
                    self.dir.join(LOCK).display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        write_pid(&self.lock);
        Ok(Active {
            _lock: self.lock,
            dir: self.dir,
        })
    }
}

impl Active {
    /// Answer successors on `handover.sock` (a thread of its own). `workload_cgroups`: the
    /// attach point; a peer in a cgroup below it is a workload, refused. When a successor
    /// reports ready, this agent unlocks and `handed_over` is notified; the thread ends.
    pub fn serve(
        self,
        registry: Arc<Registry>,
        cgroup_mount: PathBuf,
        attach: PathBuf,
        handed_over: Arc<tokio::sync::Notify>,
    ) -> Result<()> {
        let path = self.dir.join(SOCKET);
        let _ = fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new()
            .name("mcpwarden-handover".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    match self.hand_over(&stream, &registry, &cgroup_mount, &attach) {
                        Ok(true) => {
                            registry.clear();
                            // Unlocked as the file closes; the successor takes it.
                            drop(self);
                            handed_over.notify_one();
                            return;
                        }
                        Ok(false) => {
                            tracing::warn!("hand-over aborted: the new agent went away before it was ready; this agent keeps serving");
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "hand-over refused or failed; this agent keeps serving");
                        }
                    }
                }
            })
            .context("starting the hand-over thread")?;
        Ok(())
    }

    /// One successor: check it, send the listeners, wait for `READY` (true) or its going away.
    fn hand_over(
        &self,
        stream: &UnixStream,
        registry: &Registry,
        mount: &Path,
        attach: &Path,
    ) -> Result<bool> {
        let cred = crate::identity::peer_cred(stream).context("reading the peer's credentials")?;
        let pid = cred.pid;
        if cred.uid != 0 {
            bail!("peer pid {pid} is not root (uid {})", cred.uid);
        }
        if pid == 0 {
            bail!("the peer's process is not visible from this PID namespace: cannot check its cgroup");
        }
        let cgroup = crate::redirect::cgroup::of_process(mount, &pid.to_string())?;
        if cgroup.starts_with(attach) {
            bail!(
                "peer pid {pid} runs in {} below the attach point: a workload, not an agent",
                cgroup.display()
            );
        }
        tracing::info!(pid, cgroup = %cgroup.display(), "handing the listening sockets over to a new agent");
        let mut sockets: Vec<(Described, OwnedFd)> = registry
            .lock()
            .iter()
            .flat_map(|(cookie, ls)| {
                ls.iter().filter_map(move |(addr, fd)| {
                    fd.try_clone().ok().map(|fd| {
                        let d = Described {
                            cookie: *cookie,
                            addr: *addr,
                            metrics: false,
                        };
                        (d, fd)
                    })
                })
            })
            .collect();
        if let Some((cookie, addr, fd)) = registry
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let d = Described {
                cookie: *cookie,
                addr: *addr,
                metrics: true,
            };
            sockets.push((d, fd.try_clone()?));
        }
        for batch in sockets.chunks(BATCH) {
            let described: Vec<&Described> = batch.iter().map(|(d, _)| d).collect();
            let mut line = serde_json::to_vec(&described)?;
            line.push(b'\n');
            let fds: Vec<_> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                bail!("too many descriptors for one message");
            }
            let sent = sendmsg(
                stream,
                &[IoSlice::new(&line)],
                &mut control,
                SendFlags::empty(),
            )
            .context("sending listening sockets")?;
            if sent != line.len() {
                bail!("a short write on the hand-over socket");
            }
        }
        (&*stream).write_all(b"END\n")?;
        let mut answer = String::new();
        let mut reader = BufReader::new(stream);
        let read = reader.read_line(&mut answer)?;
        Ok(read > 0 && answer.trim() == "READY")
    }
}

/// Read batches until `END`, checking every descriptor before it is used.
type Received = (HashMap<u64, Vec<TcpListener>>, Option<TcpListener>);

fn receive(stream: &UnixStream) -> Result<Received> {
    let mut out: HashMap<u64, Vec<TcpListener>> = HashMap::new();
    let mut metrics = None;
    let mut pending = Vec::new();
    loop {
        let mut buf = vec![0u8; 64 * 1024];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .context("receiving from the active agent")?;
        if got.bytes == 0 {
            bail!("the active agent closed the hand-over before it was done");
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        pending.extend_from_slice(&buf[..got.bytes]);
        // Each message is one line; descriptors arrive with the line that describes them.
        let Some(end) = pending.iter().position(|b| *b == b'\n') else {
            bail!("a hand-over message without its line end");
        };
        let line: Vec<u8> = pending.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        if line == "END" {
            if !fds.is_empty() {
                bail!("descriptors after the end of the hand-over");
            }
            return Ok((out, metrics));
        }
        let described: Vec<Described> =
            serde_json::from_str(&line).context("reading the sockets' description")?;
        if described.len() != fds.len() {
            bail!(
                "{} sockets described, {} received",
                described.len(),
                fds.len()
            );
        }
        for (d, fd) in described.into_iter().zip(fds) {
            let listener = check(fd, &d)?;
            if d.metrics {
                metrics = Some(listener);
            } else {
                out.entry(d.cookie).or_default().push(listener);
            }
        }
    }
}

/// A received descriptor is used only if it is a listening TCP socket bound where it is said to
/// be, in the namespace it is said to be in.
fn check(fd: OwnedFd, d: &Described) -> Result<TcpListener> {
    let what = format!(
        "the socket said to listen on {} (netns cookie {})",
        d.addr, d.cookie
    );
    if !sockopt::socket_acceptconn(&fd).with_context(|| what.clone())? {
        bail!("{what} is not listening");
    }
    let domain = sockopt::socket_domain(&fd).with_context(|| what.clone())?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        bail!("{what} is not an IP socket");
    }
    if sockopt::socket_type(&fd).with_context(|| what.clone())? != SocketType::STREAM {
        bail!("{what} is not a stream socket");
    }
    let listener = TcpListener::from(fd);
    let bound = listener.local_addr().with_context(|| what.clone())?;
    if bound != d.addr {
        bail!("{what} is bound to {bound}");
    }
    let cookie = crate::redirect::netns_cookie(&listener).with_context(|| what.clone())?;
    if cookie != d.cookie {
        bail!("{what} lives in network namespace cookie {cookie}");
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether an agent holds the lock in `state_dir` now.
pub fn lock_held(state_dir: &Path) -> Result<bool> {
    let f = match fs::OpenOptions::new()
        .write(true)
        .open(state_dir.join(LOCK))
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("opening {}", state_dir.join(LOCK).display()))
        }
    };
    Ok(!try_lock(&f)?)
}

/// Remove the state files an agent makes besides the CA: the counters' journal, the lock, the
/// hand-over socket. Returns what was removed.
pub fn remove_state(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let counters = state_dir.join("counters");
    if let Ok(rd) = fs::read_dir(&counters) {
        for e in rd.flatten() {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
        fs::remove_dir(&counters).with_context(|| format!("removing {}", counters.display()))?;
    }
    for name in [SOCKET, LOCK] {
        let p = state_dir.join(name);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

fn try_lock(f: &fs::File) -> Result<bool> {
    // SAFETY: flock on a descriptor the caller owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(false);
    }
    Err(e).context("locking the agent lock file")
}

fn write_pid(f: &fs::File) {
    let _ = f.set_len(0);
    let _ = (&*f).write_all(format!("{}\n", std::process::id()).as_bytes());
}
