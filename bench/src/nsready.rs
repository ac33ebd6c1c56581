//! `mcpwarden-bench nsready`: scenario 8c's probe, the time from a network namespace's creation
//! until the agent serves it.
//!
//! For each namespace, on this (the main, only) thread: the clock starts; `unshare(CLONE_NEWNET)`
//! makes a new namespace; a pin file in the pin directory gets `/proc/thread-self/ns/net`
//! bind-mounted onto it (what a container runtime does for a pod sandbox, and the mount the
//! agent notices); then every [`POLL`] a fresh TCP socket (`SO_REUSEADDR`, as the agent's
//! listener has, so that the probe's socket never keeps the agent from binding) tries to bind
//! the agent's listen address there: `EADDRINUSE` means the agent's listener is there, and the
//! clock stops. The thread then goes back to its own namespace, and the pin is unmounted and
//! removed (the namespace, with no process and no pin left, goes).
//!
//! The probe runs outside the agent's attach point: none of its sockets raises an event of the
//! programs, so the pin is the only way the agent learns of the namespace.

use std::{
    ffi::CString,
    net::SocketAddrV4,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How often the probe tries to bind.
const POLL: Duration = Duration::from_micros(200);
/// How long a namespace may take before the probe gives up.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Pause between namespaces: each is timed on its own, not as part of a burst, and the agent
/// has let go of the previous one.
const GAP: Duration = Duration::from_millis(20);

/// The namespace of this thread.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// What one `nsready` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NsReadyResult {
    /// Per namespace, creation → the agent's listener bound there (ms).
    pub ready_ms: Vec<f64>,
    /// Per namespace, its inode (what the agent logs as `netns`).
    pub netns: Vec<u64>,
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).context("a path with a NUL byte")
}

/// A pin of this thread's current namespace. Dropping it takes the thread back to `home` and
/// then unmounts and removes the pin.
struct Pin<'a> {
    path: PathBuf,
    home: &'a OwnedFd,
}

impl Pin<'_> {
    fn new<'a>(path: PathBuf, home: &'a OwnedFd) -> Result<Pin<'a>> {
        std::fs::write(&path, b"").with_context(|| format!("creating {}", path.display()))?;
        let pin = Pin { path, home };
        let src = cstring(Path::new(OWN_NETNS))?;
        let dst = cstring(&pin.path)?;
        // SAFETY: a bind mount between two valid NUL-terminated paths.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            bail!("bind-mounting {OWN_NETNS} on {}: {e}", pin.path.display());
        }
        Ok(pin)
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        // SAFETY: setns with a valid namespace descriptor, on this thread.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        if let Ok(c) = cstring(&self.path) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether another socket holds `addr` in this thread's namespace (the bind fails with
/// EADDRINUSE). Any other failure is an error: the probe could not tell.
fn held(addr: SocketAddrV4) -> Result<bool> {
    // A socket is made in the calling thread's namespace; binding needs no runtime.
    let socket = tokio::net::TcpSocket::new_v4().context("socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    match socket.bind(addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e).with_context(|| format!("binding {addr} in a new namespace")),
    }
}

/// Make `count` namespaces one after another, pinned in `pins`, and time each until the agent's
/// listener at `probe` is bound there.
pub fn run(pins: &Path, probe: SocketAddrV4, count: usize) -> Result<NsReadyResult> {
    let home: OwnedFd = std::fs::File::open(OWN_NETNS)
        .context("opening this thread's network namespace")?
        .into();
    let home_ino = std::fs::metadata(OWN_NETNS)?.ino();
    if !held(probe)? {
        // The agent serves the host's namespace too: the address should be taken here already.
        eprintln!(
            "mcpwarden-bench nsready: nothing listens on {probe} in the bench's own namespace: is it the agent's listen address?"
        );
    }
    let mut out = NsReadyResult::default();
    for i in 0..count {
        let t0 = Instant::now();
        // SAFETY: unshare affects this thread only (the process's only one).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
        }
        let pin = pins.join(format!("nsready-{}-{i}", std::process::id()));
        let pin = match Pin::new(pin, &home) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: back to our own namespace, on this thread.
                unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
                return Err(e);
            }
        };
        let ino = std::fs::metadata(OWN_NETNS)?.ino();
        if ino == home_ino {
            bail!("unshare(CLONE_NEWNET) left the thread in its namespace");
        }
        loop {
            if held(probe)? {
                break;
            }
            if t0.elapsed() > GIVE_UP {
                bail!(
                    "namespace {ino} ({} of {count}) was not served within {GIVE_UP:?} of its creation",
                    i + 1
                );
            }
            std::thread::sleep(POLL);
        }
        out.ready_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        out.netns.push(ino);
        drop(pin);
        std::thread::sleep(GAP);
    }
    Ok(out)
}
