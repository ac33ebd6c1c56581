//! The tests' own "pods": network namespaces joined by veth pairs to a router namespace, a
//! "remote host" namespace behind the router, and a cgroup per pod below an attach point.
//!
//! ```text
//!   pod 1 (10.S.1.2) ──veth── router (10.S.1.1, 10.S.2.1, …, 10.S.250.1) ──veth── remote (10.S.250.2)
//!   pod 2 (10.S.2.2) ──veth──┘         (ip_forward inside the router only)
//! ```
//!
//! Every namespace is made with `ip netns add` and each pod's is also pinned in a directory of
//! this net's own ([`PodNet::pins`]), which the agent under test watches (`--netns-dir`): agents
//! of tests running at the same time never serve each other's pods. Only these namespaces and
//! loopback carry traffic; no host interface, route or sysctl is touched. Everything is removed
//! by guards, also when a test fails: pods before the router, pins unmounted, links gone with
//! their namespaces.

use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::client::{run_client_with, ClientRun, Placement};
use crate::netns::{ip, NetNs};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory whose entries are bind mounts of network namespaces: what container runtimes
/// keep in /var/run/netns. Unmounted and removed on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        let path = PathBuf::from(format!(
            "/run/mcpwarden-test-pins-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        PinDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pin `ns` here (a bind mount of its /run/netns file), as a runtime pins a new sandbox.
    pub fn pin(&self, ns: &NetNs) -> PathBuf {
        let target = self.path.join(ns.name());
        std::fs::write(&target, b"").unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
        let out = Command::new("mount")
            .arg("--bind")
            .arg(ns.path())
            .arg(&target)
            .output()
            .unwrap_or_else(|e| panic!("mount --bind: {e}"));
        assert!(
            out.status.success(),
            "mount --bind {} {}: {}",
            ns.path().display(),
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        target
    }

    /// Remove the pin of `ns` (a runtime's CNI DEL).
    pub fn unpin(&self, ns: &NetNs) {
        unpin(&self.path.join(ns.name()));
    }
}

fn unpin(target: &Path) {
    if let Ok(c) = CString::new(target.as_os_str().as_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(target);
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten() {
                unpin(&e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// One pod: its namespace (pinned in the net's [`PinDir`] unless made unpinned), its address,
/// and its cgroup below the attach point.
pub struct Pod {
    pub ip: Ipv4Addr,
    /// The pod's cgroup (created by the caller's [`crate::TestCgroup`]; removed with it).
    pub cgroup: PathBuf,
    /// The namespace file its processes enter.
    pub ns_path: PathBuf,
    /// Open while the pod lives: processes enter the namespace through it.
    fd: OwnedFd,
    // Last: the namespace goes after everything that refers to it.
    pub ns: NetNs,
}

impl Pod {
    /// A command that starts in this pod: it joins the pod's cgroup first (the cgroup file
    /// system is the host's), then enters its network namespace, then execs.
    pub fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(bin);
        crate::cgroup::spawn_in_cgroup(&mut cmd, &self.cgroup);
        enter_netns(&mut cmd, &self.fd);
        cmd
    }

    /// Run `mcp-client args...` in this pod.
    pub fn client(&self, bin: &str, args: &[&str], timeout: Duration) -> ClientRun {
        self.client_env(bin, args, &[], timeout)
    }

    pub fn client_env(
        &self,
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> ClientRun {
        run_client_with(
            bin,
            Placement {
                cgroup: Some(&self.cgroup),
                netns: Some(&self.fd),
            },
            args,
            env,
            timeout,
        )
    }

    /// The namespace's inode (what the agent logs and audits as `netns`).
    pub fn ino(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.ns_path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.ns_path.display()))
            .ino()
    }
}

/// Make `cmd` enter the network namespace `fd` between fork and exec (after any earlier
/// pre_exec, such as joining a cgroup).
pub fn enter_netns(cmd: &mut Command, fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent until the child has
    // exec'd (the caller keeps it), and it is close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Open a namespace file (close-on-exec).
pub fn open_ns(path: &Path) -> OwnedFd {
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .into()
}

/// Run `f` on a thread of its own inside the namespace at `path`, and return what it returns:
/// sockets it creates (a server's listener) stay in that namespace.
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let fd = open_ns(path);
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// A router, a remote host behind it, and pods: see the module docs.
pub struct PodNet {
    /// 10.`subnet`.0.0/16 is this net's.
    pub subnet: u8,
    pub remote_ip: Ipv4Addr,
    next_pod: u8,
    // Drop order: pins first (unmounted), then the remote and the router namespaces.
    pub pins: PinDir,
    pub remote: NetNs,
    pub router: NetNs,
}

impl PodNet {
    /// A router and a remote host at 10.`subnet`.250.2.
    pub fn new(tag: &str, subnet: u8) -> PodNet {
        let router = NetNs::new(&format!("{tag}-r"));
        let remote = NetNs::new(&format!("{tag}-s"));
        ip(&[
            "netns",
            "exec",
            router.name(),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let remote_ip = Ipv4Addr::new(10, subnet, 250, 2);
        link(&router, "rs", &remote, "eth0");
        ip(&[
            "-n",
            router.name(),
            "addr",
            "add",
            &format!("10.{subnet}.250.1/24"),
            "dev",
            "rs",
        ]);
        ip(&[
            "-n",
            remote.name(),
            "addr",
            "add",
            &format!("{remote_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            remote.name(),
            "route",
            "add",
            "default",
            "via",
            &format!("10.{subnet}.250.1"),
        ]);
        PodNet {
            subnet,
            remote_ip,
            next_pod: 1,
            pins: PinDir::new(tag),
            remote,
            router,
        }
    }

    /// A new pod in `cgroup`, reachable at 10.`subnet`.N.2, with a default route through the
    /// router (`routed: false`: no route at all but its own subnet), pinned unless `pinned`
    /// is false.
    pub fn pod(&mut self, tag: &str, cgroup: PathBuf, routed: bool, pinned: bool) -> Pod {
        let n = self.next_pod;
        assert!(n < 250, "too many pods in one PodNet");
        self.next_pod += 1;
        let ns = NetNs::new(&format!("{tag}-p"));
        let ip_addr = Ipv4Addr::new(10, self.subnet, n, 2);
        let router_side = format!("p{n}");
        link(&self.router, &router_side, &ns, "eth0");
        ip(&[
            "-n",
            self.router.name(),
            "addr",
            "add",
            &format!("10.{}.{n}.1/24", self.subnet),
            "dev",
            &router_side,
        ]);
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        if routed {
            ip(&[
                "-n",
                ns.name(),
                "route",
                "add",
                "default",
                "via",
                &format!("10.{}.{n}.1", self.subnet),
            ]);
        }
        let ns_path = if pinned {
            self.pins.pin(&ns)
        } else {
            ns.path()
        };
        std::fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        Pod {
            ip: ip_addr,
            cgroup,
            fd: open_ns(&ns.path()),
            ns_path,
            ns,
        }
    }

    /// Delete `pod` as a runtime deletes a sandbox: its pin goes, then its namespace, then its
    /// cgroup.
    pub fn remove(&self, pod: Pod) {
        self.pins.unpin(&pod.ns);
        let cgroup = pod.cgroup.clone();
        drop(pod);
        let _ = std::fs::remove_dir(&cgroup);
    }

    /// Run `f` inside the remote host's namespace (bind a server there).
    pub fn on_remote<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.remote.path(), f)
    }

    /// A socket address on the remote host.
    pub fn remote_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.remote_ip, port))
    }
}

/// A veth pair between `a` (named `a_name`) and `b` (named `b_name`), both up. Made inside `a`,
/// so no interface ever exists in the host's namespace.
fn link(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    ip(&[
        "-n",
        a.name(),
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]);
    ip(&["-n", a.name(), "link", "set", a_name, "up"]);
    ip(&["-n", b.name(), "link", "set", b_name, "up"]);
}
