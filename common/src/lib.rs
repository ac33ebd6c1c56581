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

/// `SOCK_STREAM` as seen in `bpf_sock_addr.type` and `bpf_sock.type`.
pub const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM`.
pub const SOCK_DGRAM: u32 = 2;
/// `SOCK_RAW`.
pub const SOCK_RAW: u32 = 3;
/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `AF_PACKET`.
pub const AF_PACKET: u32 = 17;

/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`.
pub const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`.
pub const SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
/// `BPF_SOCK_OPS_STATE_CB`.
pub const SOCK_OPS_STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`.
pub const SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
/// `BPF_TCP_CLOSE`.
pub const TCP_CLOSE: u32 = 7;

/// Capacity of [`MAP_ENDPOINTS`].
pub const MAX_ENDPOINTS: u32 = 4096;
/// Capacity of [`MAP_LOCAL_PORTS`].
pub const MAX_LOCAL_PORTS: u32 = 1024;
/// Capacity of the LRU maps [`MAP_BY_COOKIE`], [`MAP_BY_TUPLE`] and [`MAP_BY_SOCKET`].
pub const MAX_CONNECTIONS: u32 = 65536;
/// Capacity of [`MAP_NETNS`]: network namespaces the interceptor serves at once.
pub const MAX_NETNS: u32 = 16384;
/// Capacity of [`MAP_LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 65536;
/// Capacity of [`MAP_AGENT_CGROUPS`].
pub const MAX_AGENT_CGROUPS: u32 = 64;
/// Capacity of [`MAP_EVENT_SEEN`].
pub const MAX_EVENT_SEEN: u32 = 16384;
/// Size of the [`MAP_EVENTS`] ring buffer, bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// A kernel event of one kind from one (network namespace, cgroup) is sent at most this often.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

/// Hash map [`SockKey`] → [`EndpointValue`]: destinations that are redirected, exactly.
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Hash map port (`u32`, host order) → [`EndpointValue`]: ports of endpoints on a local address
/// (loopback, unspecified, or one of the host's). A connect to such a port is redirected when its
/// address is any local spelling in the caller's namespace: 127.0.0.0/8, `0.0.0.0`, `::`, `::1`,
/// their IPv4-mapped forms, or an address in [`MAP_LOCAL_ADDRS`] for that namespace.
pub const MAP_LOCAL_PORTS: &str = "LOCAL_PORTS";
/// Array map port → `u32` (non-zero: some endpoint, exact or local, is on that port): the
/// programs' first, cheapest test, so that a connect or a datagram to any other port costs one
/// array look-up.
pub const MAP_ENDPOINT_PORTS: &str = "ENDPOINT_PORTS";
/// Array map port → `u32` (non-zero: the interceptor listens on that port in some namespace):
/// sock_ops' first test, on every TCP connection established below the attach point.
pub const MAP_LISTEN_PORTS: &str = "LISTEN_PORTS";
/// Hash map [`NetnsAddr`] → `u32` (unused): the interface addresses of each served namespace.
pub const MAP_LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Hash map netns cookie (`u64`) → [`Listeners`]: the namespaces the interceptor serves, and
/// where in each it listens. A connect to an endpoint from a namespace missing here fails
/// (EPERM): it is not ready, and nothing goes direct.
pub const MAP_NETNS: &str = "NETNS";
/// Hash map cgroup id (`u64`) → `u32` (unused): the agents' own cgroups, never redirected and
/// free to bind the interceptor's ports.
pub const MAP_AGENT_CGROUPS: &str = "AGENT_CGROUPS";
/// LRU hash map socket cookie (`u64`) → [`ConnRecord`]: written by connect4/6 for the client's
/// socket, read by sock_ops and getpeername4/6, deleted when that socket reaches TCP_CLOSE.
pub const MAP_BY_COOKIE: &str = "BY_COOKIE";
/// LRU hash map [`ConnTuple`] → [`ConnRecord`]: written by sock_ops when the client's side is
/// established, moved to [`MAP_BY_SOCKET`] when the interceptor's side is; deleted when the
/// client's socket closes before that.
pub const MAP_BY_TUPLE: &str = "BY_TUPLE";
/// LRU hash map socket cookie (`u64`) of the interceptor's accepted socket → [`ConnRecord`]:
/// written by sock_ops on PASSIVE_ESTABLISHED, taken by the interceptor after accept()
/// (`SO_COOKIE`), so a record can only be claimed by the connection it was made for.
pub const MAP_BY_SOCKET: &str = "BY_SOCKET";
/// Ring buffer of [`Event`]s: what the programs refused or saw for the first time.
pub const MAP_EVENTS: &str = "EVENTS";
/// LRU hash map [`EventKey`] → time (`u64`, ns): when an event of that key was last sent.
pub const MAP_EVENT_SEEN: &str = "EVENT_SEEN";
/// Array map of one [`ProxyConfig`].
pub const MAP_CONFIG: &str = "CONFIG";

/// The program names in the object file.
pub const PROG_CONNECT4: &str = "mcpw_connect4";
pub const PROG_CONNECT6: &str = "mcpw_connect6";
pub const PROG_SENDMSG4: &str = "mcpw_sendmsg4";
pub const PROG_SENDMSG6: &str = "mcpw_sendmsg6";
pub const PROG_BIND4: &str = "mcpw_bind4";
pub const PROG_BIND6: &str = "mcpw_bind6";
pub const PROG_SOCK_CREATE: &str = "mcpw_sock_create";
pub const PROG_PACKET_CREATE: &str = "mcpw_packet_create";
pub const PROG_SOCK_OPS: &str = "mcpw_sock_ops";
pub const PROG_GETPEERNAME4: &str = "mcpw_getpeername4";
pub const PROG_GETPEERNAME6: &str = "mcpw_getpeername6";

/// [`EndpointValue::scope`]: redirected in the host's network namespace.
pub const SCOPE_HOST: u32 = 1;
/// [`EndpointValue::scope`]: redirected in every other network namespace (pods).
pub const SCOPE_PODS: u32 = 2;

/// [`ConnRecord::flags`]: the destination matched [`MAP_LOCAL_PORTS`] as a local spelling, not
/// [`MAP_ENDPOINTS`] exactly.
pub const REC_LOCAL: u32 = 1;

/// [`ProxyConfig::flags`]: raw sockets (`SOCK_RAW`, `AF_PACKET`) are allowed below the attach
/// point (`raw_sockets: allow`).
pub const CFG_RAW_ALLOW: u32 = 1;

/// [`Event::kind`]: a TCP connect to an endpoint from a namespace that is not ready: refused
/// (EPERM); the agent prepares that namespace.
pub const EV_UNPREPARED: u32 = 2;
/// UDP to an endpoint's address and port (connect or sendmsg): refused.
pub const EV_UDP: u32 = 3;
/// A raw socket (`SOCK_RAW`, `AF_PACKET`): refused.
pub const EV_RAW: u32 = 4;
/// A bind to the interceptor's port by anyone but the agent: refused.
pub const EV_BIND: u32 = 5;
/// A connect to an endpoint whose record could not be stored: refused.
pub const EV_NO_RECORD: u32 = 6;

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

    /// Whether the address always names the caller's own namespace, whatever its interfaces:
    /// 127.0.0.0/8, `0.0.0.0` (a connect there reaches loopback), `::`, `::1`, and the
    /// IPv4-mapped forms of the IPv4 ones.
    #[inline(always)]
    pub fn is_self(&self) -> bool {
        if self.is_v4_mapped() {
            let first = self.addr[3].to_ne_bytes()[0];
            return first == 127 || self.addr[3] == 0;
        }
        self.addr[0] == 0
            && self.addr[1] == 0
            && self.addr[2] == 0
            && (self.addr[3] == 0 || self.addr[3] == u32::from_ne_bytes([0, 0, 0, 1]))
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

/// Value of [`MAP_ENDPOINTS`] and [`MAP_LOCAL_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointValue {
    /// Index of the first configured server there (diagnostics only; the agent keeps the
    /// authoritative destination → servers table).
    pub server: u32,
    /// Where it is redirected: [`SCOPE_HOST`], [`SCOPE_PODS`], or both.
    pub scope: u32,
}

/// Key of [`MAP_LOCAL_ADDRS`]: one address of one network namespace's interfaces.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NetnsAddr {
    pub netns: u64,
    /// Mapped form, like [`SockKey::addr`].
    pub addr: [u32; 4],
}

/// Value of [`MAP_NETNS`]: the interceptor's listeners in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Listeners {
    /// The IPv4 listener, raw network-order word.
    pub v4_addr: u32,
    /// Its port, host order (0: no IPv4 listener there).
    pub v4_port: u16,
    /// The IPv6 listener's port, host order (0: none there).
    pub v6_port: u16,
    /// The IPv6 listener, network-order words.
    pub v6_addr: [u32; 4],
}

/// Key of [`MAP_BY_TUPLE`]: a redirected connection as both of its ends see it, in the
/// namespace it was made in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnTuple {
    pub netns: u64,
    /// The client's address, mapped form.
    pub client: [u32; 4],
    /// The client's port, host order.
    pub client_port: u16,
    /// The interceptor's listening port, host order.
    pub listener_port: u16,
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
    /// Cookie of the network namespace the connection was made in.
    pub netns: u64,
    /// Cookie of the client's socket.
    pub client_cookie: u64,
    /// The first server at the destination (diagnostics).
    pub server: u32,
    /// [`REC_LOCAL`].
    pub flags: u32,
}

/// The single entry of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    /// Cookie of the host's network namespace (where [`SCOPE_HOST`] applies).
    pub host_netns: u64,
    /// The interceptor's configured ports (host order; 0: none): nobody but the agent may bind
    /// them below the attach point, in any namespace.
    pub guard_v4_port: u16,
    pub guard_v6_port: u16,
    /// [`CFG_RAW_ALLOW`].
    pub flags: u32,
}

/// Key of [`MAP_EVENT_SEEN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventKey {
    pub kind: u32,
    pub _pad: u32,
    pub netns: u64,
    /// 0 for events counted per namespace.
    pub cgroup_id: u64,
}

/// One entry of the [`MAP_EVENTS`] ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `EV_*`.
    pub kind: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns: u64,
    pub comm: [u8; 16],
    /// The destination (connect, sendmsg) or the bound address (bind), mapped form.
    pub addr: SockKey,
    /// The socket's family and type (raw sockets).
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and have no padding bytes.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::NetnsAddr {}
    unsafe impl aya::Pod for super::Listeners {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::EventKey {}
    unsafe impl aya::Pod for super::Event {}
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
        assert_eq!(size_of::<NetnsAddr>(), 24);
        assert_eq!(size_of::<Listeners>(), 24);
        assert_eq!(size_of::<ConnTuple>(), 32);
        // 20 + 3*4 = 32, then u64 at 32, comm 16 → 56, two u64 → 72, two u32 → 80.
        assert_eq!(size_of::<ConnRecord>(), 80);
        assert_eq!(size_of::<ProxyConfig>(), 16);
        assert_eq!(size_of::<EventKey>(), 24);
        // 4*4, two u64 → 32, comm → 48, SockKey → 68, 2+2+4+4 → 80.
        assert_eq!(size_of::<Event>(), 80);
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

    #[test]
    fn self_spellings() {
        let is_self = |s: &str| SockKey::from_socket_addr(s.parse().unwrap()).is_self();
        for s in [
            "127.0.0.1:1",
            "127.255.0.9:1",
            "0.0.0.0:1",
            "[::]:1",
            "[::1]:1",
            "[::ffff:127.0.0.2]:1",
            "[::ffff:0.0.0.0]:1",
        ] {
            assert!(is_self(s), "{s}");
        }
        for s in [
            "10.0.0.1:1",
            "128.0.0.1:1",
            "[::2]:1",
            "[2001:db8::1]:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(!is_self(s), "{s}");
        }
    }
}
