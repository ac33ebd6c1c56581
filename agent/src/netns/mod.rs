//! Network namespaces: every one the interceptor serves, from its creation to its end.
//!
//! A pod has its own network namespace, with its own loopback and its own ports, so a
//! connection there cannot be redirected to a listener in the agent's namespace. As istio's
//! ztunnel does in its in-pod mode, the agent opens the interceptor's listeners *inside* each
//! namespace (enter it with `setns` on the current thread, create the socket, come back: a
//! socket stays in the namespace it was created in) and serves them from its own process, and
//! it dials each caller's upstream from a socket created in the caller's namespace, so the
//! pod's routes, source address and NetworkPolicy apply exactly as without mcpwarden.
//!
//! - [`Netns`]: one namespace, its cookie (what the programs see), and sockets made inside it.
//! - [`discover`]: where namespaces are found — the runtimes' pins (`/run/netns`, watched
//!   through the mount table), the processes below the attach point (`/proc`), the programs'
//!   events.
//! - [`coverage`]: the thread that prepares each namespace (listeners, addresses, the
//!   programs' map), tears it down when it goes, and audits what the programs refused.

pub mod coverage;
pub mod diag;
pub mod discover;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::OnceLock,
    time::Duration,
};

pub use coverage::{Coverage, CoverageSettings, ListenerMsg};

/// The agent's own network namespace, opened before any thread enters another: where every
/// thread comes back to.
static OWN: OnceLock<OwnedFd> = OnceLock::new();

/// How long a connection to an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Remember the calling thread's network namespace as the agent's own. Call once, on the main
/// thread, before anything enters another namespace.
pub fn init_own() -> io::Result<()> {
    if OWN.get().is_some() {
        return Ok(());
    }
    let fd = open_ns("/proc/thread-self/ns/net")?;
    let _ = OWN.set(fd);
    Ok(())
}

/// A namespace file's identity: (device, inode) of its nsfs inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    pub fn of(fd: &impl AsFd) -> io::Result<NsId> {
        let file = std::fs::File::from(fd.as_fd().try_clone_to_owned()?);
        let meta = file.metadata()?;
        use std::os::unix::fs::MetadataExt;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The identity of the namespace file at `path` (`/proc/PID/ns/net`, a pin), without
    /// opening it.
    pub fn at(path: &Path) -> io::Result<NsId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Open a namespace file and check that it is a network namespace (a pin that is still a plain
/// file — created, not yet bind-mounted — is not).
pub fn open_ns(path: impl AsRef<Path>) -> io::Result<OwnedFd> {
    let path = path.as_ref();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: open with a valid NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without argument on a valid fd.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a network namespace", path.display()),
        ));
    }
    Ok(fd)
}

/// One network namespace the interceptor serves.
#[derive(Debug)]
pub struct Netns {
    /// `SO_NETNS_COOKIE` of sockets in it: what `bpf_get_netns_cookie()` returns there. Unique
    /// for the machine's uptime, never reused.
    pub cookie: u64,
    /// The nsfs inode (`ls -l /proc/PID/ns/net` shows `net:[INODE]`), what the audit shows.
    pub ino: u64,
    pub id: NsId,
    /// Whether this is the host's namespace (where `scope: host` applies).
    pub host: bool,
    /// How it was found: its pin's name, `pid:N`, `agent`, `host`.
    pub name: String,
    /// None: the agent's own namespace (nothing to enter).
    fd: Option<OwnedFd>,
}

impl Netns {
    /// A namespace from an open namespace file. `own` is the agent's own namespace's identity.
    pub(crate) fn new(fd: OwnedFd, own: NsId, host: NsId, name: String) -> io::Result<Netns> {
        let id = NsId::of(&fd)?;
        let mut ns = Netns {
            cookie: 0,
            ino: id.ino,
            id,
            host: id == host,
            name,
            fd: (id != own).then_some(fd),
        };
        ns.cookie = ns.enter(|| {
            let probe =
                tokio::net::TcpSocket::new_v4().or_else(|_| tokio::net::TcpSocket::new_v6())?;
            crate::redirect::netns_cookie(&probe).map_err(io::Error::other)
        })?;
        Ok(ns)
    }

    /// The agent's own namespace (nothing to enter); the host's when PID 1 shares it.
    pub fn own() -> io::Result<Netns> {
        init_own()?;
        let own = NsId::at(Path::new("/proc/thread-self/ns/net"))?;
        let host = NsId::at(Path::new("/proc/1/ns/net")).unwrap_or(own);
        Netns::new(
            open_ns("/proc/thread-self/ns/net")?,
            own,
            host,
            "agent".into(),
        )
    }

    /// The cookie of the host's namespace (PID 1's; the agent's own when it cannot see PID 1's).
    pub fn host_cookie() -> io::Result<u64> {
        let own_ns = Netns::own()?;
        match open_ns("/proc/1/ns/net") {
            Ok(fd) => {
                let own = NsId::at(Path::new("/proc/thread-self/ns/net"))?;
                let host = NsId::of(&fd)?;
                Ok(Netns::new(fd, own, host, "host".into())?.cookie)
            }
            Err(_) => Ok(own_ns.cookie),
        }
    }

    /// Run `f` with the calling thread in this namespace, then return. Sockets `f` creates stay
    /// in this namespace. If the thread cannot come back, the process aborts: a thread left in
    /// a pod's namespace would make the agent's next sockets there.
    pub fn enter<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(fd) = &self.fd else {
            return f();
        };
        let own = OWN.get().ok_or_else(|| {
            io::Error::other("the agent's own network namespace was not recorded (netns::init_own)")
        })?;
        setns(fd)?;
        let result = f();
        if let Err(e) = setns(own) {
            tracing::error!(error = %e, netns = self.ino, "cannot return to the agent's own network namespace: aborting");
            std::process::abort();
        }
        result
    }

    /// A non-blocking TCP socket of `dst`'s family in this namespace, connected to `dst`.
    /// Within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.enter(|| match dst {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        })?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {dst} timed out"),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A listening TCP socket at `addr` in this namespace (non-blocking, backlog 1024,
    /// SO_REUSEADDR), not registered with any runtime: the accept loop's takes it. Needs a
    /// tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.enter(|| {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)?.into_std()
        })
    }

    /// The addresses of this namespace's interfaces.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        self.enter(interface_addresses)
    }

    /// A netlink socket that becomes readable when an address is added to or removed from an
    /// interface of this namespace.
    pub fn address_monitor(&self) -> io::Result<OwnedFd> {
        self.enter(address_monitor)
    }
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns on the calling thread with a valid namespace fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// getifaddrs(3): every address of every interface of the calling thread's namespace.
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it states.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            match family {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// A NETLINK_ROUTE socket subscribed to IPv4 and IPv6 address changes.
fn address_monitor() -> io::Result<OwnedFd> {
    // SAFETY: socket() with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    // SAFETY: bind with a correctly sized sockaddr_nl.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Read and discard whatever is queued on a non-blocking socket (what changed is read again
/// with getifaddrs; an overrun, ENOBUFS, means the same).
pub fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: recv into a stack buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            continue;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            continue;
        }
        break;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_own_namespace_is_entered_without_setns_and_sockets_get_its_cookie(
    ) -> io::Result<()> {
        init_own()?;
        let own = NsId::at(Path::new("/proc/thread-self/ns/net"))?;
        let ns = Netns::new(open_ns("/proc/self/ns/net")?, own, own, "agent".into())?;
        assert!(ns.fd.is_none(), "the agent's own namespace needs no setns");
        assert!(ns.host);
        let l = ns.listen("127.0.0.1:0".parse().map_err(io::Error::other)?)?;
        assert_eq!(
            crate::redirect::netns_cookie(&l).map_err(io::Error::other)?,
            ns.cookie
        );
        assert!(ns.addresses()?.contains(&IpAddr::from([127, 0, 0, 1])));
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_network_namespace_is_refused() {
        let err = open_ns("/proc/self/ns/mnt").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("not a network namespace")),
            "{err:?}"
        );
        assert!(open_ns("/etc/hostname").is_err());
    }
}
