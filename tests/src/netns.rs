//! Network namespaces for tests: created with `ip netns add`, loopback up, always deleted on drop.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/<name>`).
pub struct NetNs {
    name: String,
}

/// Run `ip ARGS…`; panic with its error output if it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e} (iproute2 is needed)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!(
            "mcpw-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Accept one TCP connection on `addr` inside the namespace, echo what it sends until EOF,
    /// and return the peer; None if nobody connected within 30 s. The listener is bound before
    /// this returns.
    pub fn one_shot_echo(&self, addr: SocketAddr) -> JoinHandle<Option<SocketAddr>> {
        let path = format!("/run/netns/{}", self.name);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on this thread only; the fd is valid for the call.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in netns: {e}"));
            l.set_nonblocking(true).expect("nonblocking listener");
            ready_tx.send(()).expect("signal ready");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        use std::io::{Read, Write};
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_secs(10))).ok();
                        let mut buf = Vec::new();
                        let _ = c.read_to_end(&mut buf);
                        let _ = c.write_all(&buf);
                        return Some(peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            None
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the echo listener in the namespace did not start");
        handle
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
