//! The TCP sockets of a namespace, and resetting one: `NETLINK_SOCK_DIAG`, what `ss` and
//! `ss -K` use (`SOCK_DIAG_BY_FAMILY` dumps, `SOCK_DESTROY` resets; the kernel needs
//! `CONFIG_INET_DIAG_DESTROY`).
//!
//! Written by hand, like the address watch in `mod.rs`: two fixed-layout requests and one reply
//! layout (`linux/inet_diag.h`), where a netlink crate would bring a message model this does
//! not need.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::Netns;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Every TCP state but LISTEN, TIME_WAIT and CLOSE (`1 << TCP_*`): the live connections.
const LIVE_STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;

/// One TCP socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSock {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub state: u8,
    pub uid: u32,
    /// The socket's inode (`/proc/PID/fd/N -> socket:[INODE]`).
    pub inode: u32,
    /// The cgroup v2 id of the socket's creator, when the kernel reports it.
    pub cgroup_id: Option<u64>,
    /// The kernel's id of the socket (`inet_diag_sockid.idiag_cookie`, raw).
    cookie: [u8; 8],
    family: u8,
}

/// The live TCP sockets (IPv4 and IPv6) of `ns`.
pub fn tcp_sockets(ns: &Netns) -> io::Result<Vec<TcpSock>> {
    let sock = ns.enter(open)?;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut req = [0u8; REQ_LEN];
        req[0] = family;
        req[1] = libc::IPPROTO_TCP as u8;
        req[4..8].copy_from_slice(&LIVE_STATES.to_ne_bytes());
        send(&sock, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        read_dump(&sock, &mut out)?;
    }
    Ok(out)
}

/// Reset `s` in `ns` (`SOCK_DESTROY`): its owner's next read or write fails with ECONNABORTED,
/// and the peer gets a RST.
pub fn destroy(ns: &Netns, s: &TcpSock) -> io::Result<()> {
    let sock = ns.enter(open)?;
    let mut req = [0u8; REQ_LEN];
    req[0] = s.family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    write_sockid(&mut req[8..56], s);
    send(&sock, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    let mut buf = vec![0u8; 8192];
    let n = recv(&sock, &mut buf)?;
    let msg = &buf[..n];
    if msg.len() >= NLMSG_HDR + 4 && u16::from_ne_bytes([msg[4], msg[5]]) == NLMSG_ERROR {
        let code = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor of this process.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A reply that never comes must not hang the agent's start.
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn send(sock: &OwnedFd, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
    let len = NLMSG_HDR + payload.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(payload);
    // SAFETY: send reads `msg.len()` bytes of `msg`; the kernel is the destination of an unbound
    // netlink socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn read_dump(sock: &OwnedFd, out: &mut Vec<TcpSock>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(sock, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let m = &buf[at..n];
            let len = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize;
            let kind = u16::from_ne_bytes([m[4], m[5]]);
            if len < NLMSG_HDR || len > m.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a truncated sock_diag reply",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = m
                        .get(16..20)
                        .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse(&m[NLMSG_HDR..len]) {
                        out.push(s);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// One `inet_diag_msg` and its attributes.
fn parse(m: &[u8]) -> Option<TcpSock> {
    if m.len() < MSG_LEN {
        return None;
    }
    let family = m[0];
    let state = m[1];
    let id = &m[4..52];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let ip = |b: &[u8]| -> Option<IpAddr> {
        if family == libc::AF_INET as u8 {
            Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        } else if family == libc::AF_INET6 as u8 {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[..16]);
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        } else {
            None
        }
    };
    let src = SocketAddr::new(ip(&id[4..20])?, sport);
    let dst = SocketAddr::new(ip(&id[20..36])?, dport);
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&id[40..48]);
    let uid = u32::from_ne_bytes([m[64], m[65], m[66], m[67]]);
    let inode = u32::from_ne_bytes([m[68], m[69], m[70], m[71]]);
    let mut cgroup_id = None;
    let mut at = MSG_LEN;
    while at + 4 <= m.len() {
        let len = u16::from_ne_bytes([m[at], m[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([m[at + 2], m[at + 3]]);
        if len < 4 || at + len > m.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            let v = &m[at + 4..at + 12];
            cgroup_id = Some(u64::from_ne_bytes([
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
            ]));
        }
        at += (len + 3) & !3;
    }
    Some(TcpSock {
        src,
        dst,
        state,
        uid,
        inode,
        cgroup_id,
        cookie,
        family,
    })
}

/// `struct inet_diag_sockid` of `s`, to name exactly that socket.
fn write_sockid(id: &mut [u8], s: &TcpSock) {
    id[0..2].copy_from_slice(&s.src.port().to_be_bytes());
    id[2..4].copy_from_slice(&s.dst.port().to_be_bytes());
    let put = |b: &mut [u8], ip: IpAddr| match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b[..16].copy_from_slice(&v6.octets()),
    };
    put(&mut id[4..20], s.src.ip());
    put(&mut id[20..36], s.dst.ip());
    id[40..48].copy_from_slice(&s.cookie);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection made here shows in the dump with its addresses and this test's cgroup, and
    /// `destroy` resets it: the next read fails.
    #[test]
    fn a_connection_is_listed_and_reset() -> anyhow::Result<()> {
        use std::io::Read;
        crate::netns::init_own()?;
        let ns = Netns::own()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (_server_side, _) = listener.accept()?;
        let local = client.local_addr()?;
        let all = tcp_sockets(&ns)?;
        let s = all
            .iter()
            .find(|s| s.src == local)
            .ok_or_else(|| anyhow::anyhow!("{local} not in the dump: {all:?}"))?;
        assert_eq!(s.dst, listener.local_addr()?);
        assert!(s.cgroup_id.is_some(), "{s:?}");
        if let Err(e) = destroy(&ns, s) {
            // Needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY: the privileged suite has both.
            anyhow::bail!("SOCK_DESTROY failed: {e}");
        }
        let mut b = [0u8; 1];
        let err = client.read(&mut b);
        assert!(err.is_err(), "read after the reset: {err:?}");
        Ok(())
    }
}
