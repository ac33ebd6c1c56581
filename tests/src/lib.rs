//! Harness for mcpwarden's privileged integration tests.
//!
//! Everything here is a guard that cleans up in `Drop`, including when a test panics:
//! [`TestCgroup`] kills its processes and removes its directories, [`Agent`] stops the agent
//! (whose eBPF links close with it), [`TestServer`] and the echo listeners stop their threads.
//!
//! The tests need root with CAP_BPF on a kernel with cgroup v2 ([`require_root`]); they never
//! skip: a test that cannot run fails with a message saying why.

pub mod agent;
pub mod apiserver;
pub mod bpf;
pub mod cgroup;
pub mod client;
pub mod echo;
pub mod held;
pub mod hosts;
pub mod image;
pub mod lenient;
pub mod netns;
pub mod peer;
pub mod pods;
pub mod rawhttp;
pub mod replay;
pub mod schema;
pub mod script;
pub mod server;
pub mod sse;
pub mod tls;

pub use agent::{Agent, AgentOpts, PinsGuard};
pub use apiserver::ApiServer;
pub use cgroup::{cgroup2_mount, spawn_in_cgroup, TestCgroup};
pub use client::{run_client, run_client_env, ClientRun, LineChild};
pub use echo::{TcpEcho, UdpEcho};
pub use lenient::{Lenient, LenientServer};
pub use netns::NetNs;
pub use peer::{McpPeer, PeerOpts, PeerRequest};
pub use pods::{Pod, PodNet};
pub use server::{TestServer, TlsOpts};
pub use tls::{sha256_fingerprint, ServerCert, TestCa, Validity};

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A test server on its own two-thread tokio runtime, on its own thread: `serve` gets the
/// receiver that fires when this guard drops; the guard then waits for the thread (and gives the
/// runtime 2 s to finish its tasks).
pub struct ServerThread {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    pub fn spawn<F>(
        name: String,
        serve: impl FnOnce(tokio::sync::oneshot::Receiver<()>) -> F + Send + 'static,
    ) -> ServerThread
    where
        F: std::future::Future<Output = ()>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(serve(rx));
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .unwrap_or_else(|e| panic!("spawn thread {name}: {e}"));
        ServerThread {
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Panics unless the test process runs as root with CAP_BPF (and CAP_NET_ADMIN, CAP_SYS_ADMIN,
/// which attaching cgroup programs and writing `cgroup.procs` of arbitrary cgroups need).
/// Never skips: under CI or not, a test that cannot run must fail loudly.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "mcpwarden integration tests must run as root (euid is {euid}): they load eBPF programs, \
             attach them to cgroups and move processes between cgroups. Run `sudo -E cargo test -p mcpwarden-tests` \
             (these tests never skip themselves)."
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("parse CapEff"))
        .expect("CapEff line in /proc/self/status");
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    for (bit, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        if cap_eff & (1u64 << bit) == 0 {
            panic!(
                "mcpwarden integration tests need {name} in the effective capability set (CapEff={cap_eff:#x}); \
                 run them as real root, not in a capability-restricted container"
            );
        }
    }
}

/// The loopback address reserved for test number `index`: 127.0.0.(10 + index).
/// Every test uses its own index so that parallel tests never share an address.
pub fn test_ip(index: u8) -> Ipv4Addr {
    assert!(index < 200, "test index {index} too large");
    Ipv4Addr::new(127, 0, 0, 10 + index)
}

/// A currently free TCP port on `ip` (found by binding port 0 and closing the socket).
pub fn free_port(ip: impl Into<std::net::IpAddr>) -> u16 {
    let ip = ip.into();
    let l =
        TcpListener::bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().unwrap().port()
}

/// A free TCP port on `ip`, as a socket address.
pub fn free_addr(ip: impl Into<std::net::IpAddr>) -> SocketAddr {
    let ip = ip.into();
    SocketAddr::new(ip, free_port(ip))
}

/// Poll `f` every 50 ms until it returns `Some`, or `None` after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A private directory under the system temp dir, removed on drop (kept, and reported on
/// stderr, when the test is panicking so that the agent's log and audit can be inspected, or
/// when MCPWARDEN_TEST_KEEP is set).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mcpwarden-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed: keeping {} for inspection",
                self.path.display()
            );
        } else if std::env::var_os("MCPWARDEN_TEST_KEEP").is_some() {
            eprintln!("MCPWARDEN_TEST_KEEP: keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Standard Base64 with padding, for `body_base64` script steps.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in data.chunks(3) {
        let mut n = 0u32;
        for (i, &b) in group.iter().enumerate() {
            n |= u32::from(b) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
