//! The kernel/user ABI of mcpwarden.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is shared verbatim by the eBPF
//! programs (`ebpf/`) and the agent (`agent/`). Nothing else lives in this crate.
//!
//! Addresses are always stored in their 16-byte IPv6 form: an IPv4 address `a.b.c.d` is stored as
//! the IPv4-mapped `::ffff:a.b.c.d`, so connect4, connect6 (including v4-mapped destinations from
//! AF_INET6 sockets), sock_ops and the accepting side all compute the same key. The four `u32`
//! words hold the address bytes in network order, exactly as the kernel exposes `user_ip6` /
//! `local_ip6` (each word is the raw, unswapped 32-bit load). Ports are in host byte order.
#![no_std]

/// `SOCK_STREAM` as seen in `bpf_sock_addr.type`.
pub const SOCK_STREAM: u32 = 1;
/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`.
pub const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_STATE_CB`.
pub const SOCK_OPS_STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`.
pub const SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
/// `BPF_TCP_CLOSE`.
pub const TCP_CLOSE: u32 = 7;

/// Capacity of [`MAP_ENDPOINTS`].
pub const MAX_ENDPOINTS: u32 = 4096;
/// Capacity of the LRU maps [`MAP_BY_COOKIE`] and [`MAP_BY_CLIENT`].
pub const MAX_CONNECTIONS: u32 = 65536;

/// Hash map [`SockKey`] → [`EndpointValue`]: destinations that are redirected.
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// LRU hash map socket cookie (`u64`) → [`ConnRecord`]: written by connect4/6, read by sock_ops and
/// getpeername4/6, deleted by sock_ops when the socket reaches TCP_CLOSE.
pub const MAP_BY_COOKIE: &str = "BY_COOKIE";
/// LRU hash map client [`SockKey`] → [`ConnRecord`]: written by sock_ops on ACTIVE_ESTABLISHED,
/// read and deleted by the interceptor when it accepts the connection.
pub const MAP_BY_CLIENT: &str = "BY_CLIENT";
/// Array map of one [`ProxyConfig`].
pub const MAP_CONFIG: &str = "CONFIG";

/// The program names in the object file.
pub const PROG_CONNECT4: &str = "mcpw_connect4";
pub const PROG_CONNECT6: &str = "mcpw_connect6";
pub const PROG_SOCK_OPS: &str = "mcpw_sock_ops";
pub const PROG_GETPEERNAME4: &str = "mcpw_getpeername4";
pub const PROG_GETPEERNAME6: &str = "mcpw_getpeername6";

/// An (address, port) pair in the 16-byte mapped form described in the crate docs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SockKey {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl SockKey {
    /// The third word of an IPv4-mapped address (`0000:ffff` in network order).
    #[inline(always)]
    pub fn mapped_word() -> u32 {
        u32::from_ne_bytes([0, 0, 0xff, 0xff])
    }

    /// Key for an IPv4 address given as the raw network-order word the kernel exposes.
    #[inline(always)]
    pub fn from_v4_word(ip4: u32, port: u16) -> Self {
        SockKey {
            addr: [0, 0, Self::mapped_word(), ip4],
            port,
            _pad: 0,
        }
    }

    /// Whether the address is IPv4-mapped (`::ffff:a.b.c.d`).
    #[inline(always)]
    pub fn is_v4_mapped(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == Self::mapped_word()
    }

    /// The address bytes in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.addr[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }

    /// Key from address bytes in network order.
    pub fn from_octets(o: [u8; 16], port: u16) -> Self {
        SockKey {
            addr: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
            port,
            _pad: 0,
        }
    }

    /// Key from a socket address; IPv4 becomes IPv4-mapped.
    pub fn from_socket_addr(sa: core::net::SocketAddr) -> Self {
        match sa {
            core::net::SocketAddr::V4(v4) => {
                Self::from_octets(v4.ip().to_ipv6_mapped().octets(), v4.port())
            }
            core::net::SocketAddr::V6(v6) => Self::from_octets(v6.ip().octets(), v6.port()),
        }
    }

    /// The socket address; IPv4-mapped keys become plain IPv4.
    pub fn to_socket_addr(&self) -> core::net::SocketAddr {
        let v6 = core::net::Ipv6Addr::from(self.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => core::net::SocketAddr::new(core::net::IpAddr::V4(v4), self.port),
            None => core::net::SocketAddr::new(core::net::IpAddr::V6(v6), self.port),
        }
    }
}

/// Value of [`MAP_ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointValue {
    /// Index of the first configured server that resolved to this destination (diagnostics only;
    /// the agent keeps the authoritative destination → servers table).
    pub server: u32,
    pub _pad: u32,
}

/// What connect4/6 learned about a redirected connection: where it was going and who dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnRecord {
    /// The original destination, mapped form.
    pub orig: SockKey,
    /// Thread-group id (the process id as user space sees it in the initial pid namespace).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// `comm` of the connecting thread, NUL-padded.
    pub comm: [u8; 16],
}

/// The single entry of [`MAP_CONFIG`]: where to redirect and whom never to redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    /// The interceptor's IPv4 listener, raw network-order word.
    pub v4_addr: u32,
    /// The interceptor's IPv4 listener port, host order (0: no IPv4 listener).
    pub v4_port: u16,
    /// The interceptor's IPv6 listener port, host order (0: no IPv6 listener).
    pub v6_port: u16,
    /// The interceptor's IPv6 listener, network-order words.
    pub v6_addr: [u32; 4],
    /// cgroup id of the agent's own cgroup: connections from it are never redirected.
    pub agent_cgroup_id: u64,
    /// Cookie of the network namespace the interceptor listens in. Only connections made in that
    /// namespace are redirected: elsewhere the interceptor's loopback address is not reachable.
    pub netns_cookie: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and have no padding bytes.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::ProxyConfig {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<SockKey>(), 20);
        assert_eq!(size_of::<EndpointValue>(), 8);
        // 20 + 3*4 = 32, then u64 at 32, comm 16 → 56.
        assert_eq!(size_of::<ConnRecord>(), 56);
        assert_eq!(size_of::<ProxyConfig>(), 40);
    }

    #[test]
    fn v4_mapped_roundtrip() {
        let sa: core::net::SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let k = SockKey::from_socket_addr(sa);
        assert!(k.is_v4_mapped());
        assert_eq!(k.addr[3], u32::from_ne_bytes([10, 1, 2, 3]));
        assert_eq!(
            k,
            SockKey::from_v4_word(u32::from_ne_bytes([10, 1, 2, 3]), 8080)
        );
        assert_eq!(k.to_socket_addr(), sa);
        let v6: core::net::SocketAddr = "[::ffff:10.1.2.3]:8080".parse().unwrap();
        assert_eq!(SockKey::from_socket_addr(v6), k);
        let real6: core::net::SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let k6 = SockKey::from_socket_addr(real6);
        assert!(!k6.is_v4_mapped());
        assert_eq!(k6.to_socket_addr(), real6);
    }
}
