//! mcpwarden's kernel side: redirect TCP connections to configured MCP endpoints into the
//! interceptor's listener in the caller's own network namespace, remember who made them, hide the
//! rewrite from the client, and close the other ways around it.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: on a TCP connect to an endpoint (exactly, or a local
//!   spelling of a local endpoint's port) in a namespace the endpoint's scope covers, record the
//!   original destination and the caller in `BY_COOKIE` and rewrite the destination to the
//!   interceptor's listener in that namespace (`NETNS`); a namespace without one is not ready and
//!   the connect fails. A UDP connect to an endpoint fails.
//! - `cgroup/sendmsg4`, `cgroup/sendmsg6`: a UDP datagram to an endpoint fails (QUIC clients then
//!   fall back to TCP).
//! - `cgroup/bind4`, `cgroup/bind6`: nobody but the agent binds the interceptor's ports.
//! - `cgroup/sock_create`: raw sockets fail (unless allowed).
//! - `lsm_cgroup/socket_create`: `AF_PACKET` sockets fail (unless allowed). sock_create only sees
//!   the inet families.
//! - `sock_ops`: when the client's side of a redirected connection is established, its record is
//!   keyed by the connection as both ends see it (`BY_TUPLE`); when the interceptor's side is,
//!   the record moves to the accepted socket's cookie (`BY_SOCKET`), which only that socket can
//!   claim. Entries go when their socket closes.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: report the original server as the peer.
//!
//! Connections and sockets from the agents' own cgroups (`AGENT_CGROUPS`) are never touched.
//! Every address is keyed in its 16-byte IPv4-mapped form (see `mcpwarden-common`).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_ktime_get_ns,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, lsm_cgroup, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{LsmContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use mcpwarden_common::{
    ConnRecord, ConnTuple, EndpointValue, Event, EventKey, Listeners, NetnsAddr, ProxyConfig,
    SockKey, AF_INET, AF_INET6, AF_PACKET, CFG_RAW_ALLOW, EVENTS_BYTES, EVENT_INTERVAL_NS, EV_BIND,
    EV_NO_RECORD, EV_RAW, EV_UDP, EV_UNPREPARED, MAX_AGENT_CGROUPS, MAX_CONNECTIONS, MAX_ENDPOINTS,
    MAX_EVENT_SEEN, MAX_LOCAL_ADDRS, MAX_LOCAL_PORTS, MAX_NETNS, REC_LOCAL, SCOPE_HOST, SCOPE_PODS,
    SOCK_DGRAM, SOCK_OPS_ACTIVE_ESTABLISHED_CB, SOCK_OPS_PASSIVE_ESTABLISHED_CB, SOCK_OPS_STATE_CB,
    SOCK_OPS_STATE_CB_FLAG, SOCK_RAW, SOCK_STREAM, TCP_CLOSE,
};

/// Allow the syscall (possibly with a rewritten address).
const ALLOW: i32 = 1;
/// Fail the syscall with EPERM.
const REJECT: i32 = 0;

#[map]
static ENDPOINTS: HashMap<SockKey, EndpointValue> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map]
static LOCAL_PORTS: HashMap<u32, EndpointValue> = HashMap::with_max_entries(MAX_LOCAL_PORTS, 0);

#[map]
static LOCAL_ADDRS: HashMap<NetnsAddr, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
static ENDPOINT_PORTS: Array<u32> = Array::with_max_entries(65536, 0);

#[map]
static LISTEN_PORTS: Array<u32> = Array::with_max_entries(65536, 0);

/// Whether `map` marks `port` (array look-ups are inlined by the JIT: the cheapest test).
#[inline(always)]
fn marked(map: &Array<u32>, port: u16) -> bool {
    map.get(port as u32).is_some_and(|v| *v != 0)
}

#[map]
static NETNS: HashMap<u64, Listeners> = HashMap::with_max_entries(MAX_NETNS, 0);

#[map]
static AGENT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_AGENT_CGROUPS, 0);

#[map]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static BY_TUPLE: LruHashMap<ConnTuple, ConnRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static BY_SOCKET: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static EVENT_SEEN: LruHashMap<EventKey, u64> = LruHashMap::with_max_entries(MAX_EVENT_SEEN, 0);

#[map]
static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);

#[inline(always)]
fn config() -> ProxyConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Whether the current task is in one of the agents' cgroups.
#[inline(always)]
fn is_agent() -> bool {
    // SAFETY: map lookup with a stack key.
    unsafe { AGENT_CGROUPS.get(&current_cgroup()) }.is_some()
}

#[inline(always)]
fn netns_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the program context (sock_addr, sock, sock_ops).
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the program context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Send one event, at most one per [`EVENT_INTERVAL_NS`] for the same (kind, namespace,
/// cgroup); `per_netns` counts the namespace as a whole.
#[inline(always)]
fn report(kind: u32, netns: u64, addr: SockKey, family: u32, sock_type: u32, per_netns: bool) {
    let cgroup_id = current_cgroup();
    let key = EventKey {
        kind,
        _pad: 0,
        netns,
        cgroup_id: if per_netns { 0 } else { cgroup_id },
    };
    // SAFETY: a helper without arguments; map lookup with a stack key.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(last) = unsafe { EVENT_SEEN.get(&key) } {
        if now.wrapping_sub(*last) < EVENT_INTERVAL_NS {
            return;
        }
    }
    let _ = EVENT_SEEN.insert(&key, &now, 0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let ev = Event {
        kind,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id,
        netns,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        addr,
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: 0,
        _pad: 0,
    };
    let _ = EVENTS.output::<Event>(&ev, 0);
}

/// Whether `dst` is an endpoint for a caller in the namespace of `ctx`: exactly
/// (`ENDPOINTS`), or as a local spelling of a local endpoint's port (`LOCAL_PORTS`). Returns the
/// first server there, the record flags and the namespace's cookie. Most destinations are
/// neither: a port no endpoint is on costs one array look-up, and no namespace cookie is read.
#[inline(always)]
fn endpoint<C: EbpfContext>(ctx: &C, dst: &SockKey) -> Option<(u32, u32, u64)> {
    if !marked(&ENDPOINT_PORTS, dst.port) {
        return None;
    }
    // SAFETY: map lookups with stack keys; values are copied out.
    let exact = unsafe { ENDPOINTS.get(dst) }.copied();
    let port = dst.port as u32;
    let local = unsafe { LOCAL_PORTS.get(&port) }.copied();
    if exact.is_none() && local.is_none() {
        return None;
    }
    let netns = netns_of(ctx);
    let want = if netns == config().host_netns {
        SCOPE_HOST
    } else {
        SCOPE_PODS
    };
    if let Some(v) = exact {
        if v.scope & want != 0 {
            return Some((v.server, 0, netns));
        }
    }
    let v = local?;
    if v.scope & want == 0 {
        return None;
    }
    if dst.is_self() {
        return Some((v.server, REC_LOCAL, netns));
    }
    let key = NetnsAddr {
        netns,
        addr: dst.addr,
    };
    unsafe { LOCAL_ADDRS.get(&key) }?;
    Some((v.server, REC_LOCAL, netns))
}

/// Build the record of a connect() by the current task to `orig`.
#[inline(always)]
fn record(orig: SockKey, netns: u64, cookie: u64, server: u32, flags: u32) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        orig,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: current_cgroup(),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        netns,
        client_cookie: cookie,
        server,
        flags,
    }
}

/// What connect4/6 do with a destination.
enum Verdict {
    /// Not an endpoint, or not a socket type we handle: untouched.
    Pass,
    /// Refused (EPERM).
    Refuse,
    /// Redirect to these listeners (the record is stored).
    Redirect(Listeners),
}

/// Shared body of connect4/6.
#[inline(always)]
fn decide_connect(ctx: &SockAddrContext, dst: SockKey, family: u32) -> Verdict {
    // SAFETY: one context field copied to the stack.
    let sock_type = unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) };
    if sock_type != SOCK_STREAM && sock_type != SOCK_DGRAM {
        return Verdict::Pass;
    }
    let Some((server, flags, netns)) = endpoint(ctx, &dst) else {
        return Verdict::Pass;
    };
    if is_agent() {
        return Verdict::Pass;
    }
    if sock_type == SOCK_DGRAM {
        report(EV_UDP, netns, dst, family, sock_type, false);
        return Verdict::Refuse;
    }
    // SAFETY: map lookup with a stack key; the value is copied out.
    let Some(listeners) = (unsafe { NETNS.get(&netns) }).copied() else {
        report(EV_UNPREPARED, netns, dst, family, sock_type, false);
        return Verdict::Refuse;
    };
    let cookie = socket_cookie(ctx);
    let rec = record(dst, netns, cookie, server, flags);
    if BY_COOKIE.insert(&cookie, &rec, 0).is_err() {
        report(EV_NO_RECORD, netns, dst, family, sock_type, false);
        return Verdict::Refuse;
    }
    Verdict::Redirect(listeners)
}

#[cgroup_sock_addr(connect4)]
pub fn mcpw_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: context fields are copied to the stack before use.
    let (ip4, port) = unsafe {
        (
            read_volatile(addr_of!((*ctx.sock_addr).user_ip4)),
            read_volatile(addr_of!((*ctx.sock_addr).user_port)),
        )
    };
    let dst = SockKey::from_v4_word(ip4, u16::from_be(port as u16));
    let l = match decide_connect(&ctx, dst, AF_INET) {
        Verdict::Pass => return ALLOW,
        Verdict::Refuse => return REJECT,
        Verdict::Redirect(l) => l,
    };
    if l.v4_port == 0 {
        // An endpoint we cannot intercept is not reached uninspected.
        let _ = BY_COOKIE.remove(&socket_cookie(&ctx));
        return REJECT;
    }
    // SAFETY: writing the destination is what connect4 programs are for.
    unsafe {
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), l.v4_addr);
        write_volatile(
            addr_of_mut!((*ctx.sock_addr).user_port),
            u16::to_be(l.v4_port) as u32,
        );
    }
    ALLOW
}

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> SockKey {
    // SAFETY: the verifier rejects a 128-bit load of user_ip6: copy the words one by one.
    let (w0, w1, w2, w3, port) = unsafe {
        (
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[0])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[1])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[2])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[3])),
            read_volatile(addr_of!((*ctx.sock_addr).user_port)),
        )
    };
    SockKey {
        addr: [w0, w1, w2, w3],
        port: u16::from_be(port as u16),
        _pad: 0,
    }
}

#[inline(always)]
fn user_ip4(ctx: &SockAddrContext) -> SockKey {
    // SAFETY: context fields are copied to the stack before use.
    let (ip4, port) = unsafe {
        (
            read_volatile(addr_of!((*ctx.sock_addr).user_ip4)),
            read_volatile(addr_of!((*ctx.sock_addr).user_port)),
        )
    };
    SockKey::from_v4_word(ip4, u16::from_be(port as u16))
}

#[cgroup_sock_addr(connect6)]
pub fn mcpw_connect6(ctx: SockAddrContext) -> i32 {
    let dst = user_ip6(&ctx);
    let l = match decide_connect(&ctx, dst, AF_INET6) {
        Verdict::Pass => return ALLOW,
        Verdict::Refuse => return REJECT,
        Verdict::Redirect(l) => l,
    };
    let (addr, new_port) = if dst.is_v4_mapped() {
        // An AF_INET6 socket dialling ::ffff:a.b.c.d reaches the IPv4 listener through its
        // mapped address.
        ([0, 0, SockKey::mapped_word(), l.v4_addr], l.v4_port)
    } else {
        (l.v6_addr, l.v6_port)
    };
    if new_port == 0 {
        let _ = BY_COOKIE.remove(&socket_cookie(&ctx));
        return REJECT;
    }
    // SAFETY: writing the destination word by word is what connect6 programs are for.
    unsafe {
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[0]), addr[0]);
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[1]), addr[1]);
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[2]), addr[2]);
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[3]), addr[3]);
        write_volatile(
            addr_of_mut!((*ctx.sock_addr).user_port),
            u16::to_be(new_port) as u32,
        );
    }
    ALLOW
}

/// Shared body of sendmsg4/6 (UDP only: the kernel runs these hooks for datagrams with an
/// address).
#[inline(always)]
fn decide_sendmsg(ctx: &SockAddrContext, dst: SockKey, family: u32) -> i32 {
    let Some((_, _, netns)) = endpoint(ctx, &dst) else {
        return ALLOW;
    };
    if is_agent() {
        return ALLOW;
    }
    report(EV_UDP, netns, dst, family, SOCK_DGRAM, false);
    REJECT
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mcpw_sendmsg4(ctx: SockAddrContext) -> i32 {
    let dst = user_ip4(&ctx);
    decide_sendmsg(&ctx, dst, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mcpw_sendmsg6(ctx: SockAddrContext) -> i32 {
    let dst = user_ip6(&ctx);
    decide_sendmsg(&ctx, dst, AF_INET6)
}

/// Shared body of bind4/6: the interceptor's ports (configured, and the ones it listens on in
/// this namespace) are the agent's alone.
#[inline(always)]
fn decide_bind(ctx: &SockAddrContext, at: SockKey, family: u32) -> i32 {
    // SAFETY: one context field copied to the stack.
    let sock_type = unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) };
    if sock_type != SOCK_STREAM || at.port == 0 || is_agent() {
        return ALLOW;
    }
    let cfg = config();
    let netns = netns_of(ctx);
    let mut guarded = at.port == cfg.guard_v4_port || at.port == cfg.guard_v6_port;
    // SAFETY: map lookup with a stack key; the value is copied out.
    if let Some(l) = unsafe { NETNS.get(&netns) }.copied() {
        guarded = guarded || at.port == l.v4_port || at.port == l.v6_port;
    }
    if !guarded {
        return ALLOW;
    }
    report(EV_BIND, netns, at, family, sock_type, false);
    REJECT
}

#[cgroup_sock_addr(bind4)]
pub fn mcpw_bind4(ctx: SockAddrContext) -> i32 {
    let at = user_ip4(&ctx);
    decide_bind(&ctx, at, AF_INET)
}

#[cgroup_sock_addr(bind6)]
pub fn mcpw_bind6(ctx: SockAddrContext) -> i32 {
    let at = user_ip6(&ctx);
    decide_bind(&ctx, at, AF_INET6)
}

/// Raw sockets only: every socket below the attach point passes here, so anything else returns
/// after one context read.
#[cgroup_sock(sock_create)]
pub fn mcpw_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: one context field copied to the stack.
    let sock_type = unsafe { read_volatile(addr_of!((*ctx.sock).type_)) };
    if sock_type != SOCK_RAW || config().flags & CFG_RAW_ALLOW != 0 || is_agent() {
        return ALLOW;
    }
    // SAFETY: one context field copied to the stack.
    let family = unsafe { read_volatile(addr_of!((*ctx.sock).family)) };
    report(
        EV_RAW,
        netns_of(&ctx),
        SockKey::default(),
        family,
        sock_type,
        false,
    );
    REJECT
}

/// `socket_create(int family, int type, int protocol, int kern)`: packet sockets, which
/// cgroup/sock_create never sees. Returns 1 to allow, 0 to refuse (EPERM).
#[lsm_cgroup(hook = "socket_create")]
pub fn mcpw_packet_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || family as u32 != AF_PACKET {
        return 1;
    }
    if config().flags & CFG_RAW_ALLOW != 0 || is_agent() {
        return 1;
    }
    // No socket yet, so no namespace cookie: the event carries the caller alone.
    report(
        EV_RAW,
        0,
        SockKey::default(),
        AF_PACKET,
        sock_type as u32,
        false,
    );
    0
}

/// Both ends of a sock_ops socket, read unconditionally: choosing the field per family lets
/// LLVM compute the context offset at run time, which the verifier rejects ("dereference of
/// modified ctx ptr").
struct Ends {
    local: SockKey,
    remote: SockKey,
}

#[inline(always)]
fn ends(ctx: &SockOpsContext) -> Option<Ends> {
    // SAFETY: context fields are copied to the stack one word at a time. `remote_port` holds the
    // network-order port in its upper 16 bits on little-endian hosts; `local_port` is host order.
    let (family, lport, rport, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(addr_of!((*ctx.ops).family)),
            read_volatile(addr_of!((*ctx.ops).local_port)) as u16,
            u16::from_be((read_volatile(addr_of!((*ctx.ops).remote_port)) >> 16) as u16),
            read_volatile(addr_of!((*ctx.ops).local_ip4)),
            read_volatile(addr_of!((*ctx.ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ctx.ops).local_ip6[0])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[1])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[2])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ctx.ops).remote_ip6[0])),
                read_volatile(addr_of!((*ctx.ops).remote_ip6[1])),
                read_volatile(addr_of!((*ctx.ops).remote_ip6[2])),
                read_volatile(addr_of!((*ctx.ops).remote_ip6[3])),
            ],
        )
    };
    match family {
        AF_INET => Some(Ends {
            local: SockKey::from_v4_word(l4, lport),
            remote: SockKey::from_v4_word(r4, rport),
        }),
        AF_INET6 => Some(Ends {
            local: SockKey {
                addr: l6,
                port: lport,
                _pad: 0,
            },
            remote: SockKey {
                addr: r6,
                port: rport,
                _pad: 0,
            },
        }),
        _ => None,
    }
}

#[inline(always)]
fn is_listener_port(l: &Listeners, port: u16) -> bool {
    port != 0 && (port == l.v4_port || port == l.v6_port)
}

#[sock_ops]
pub fn mcpw_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == SOCK_OPS_STATE_CB {
        if ctx.arg(1) == TCP_CLOSE {
            closed(&ctx);
        }
        return 1;
    }
    if op != SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    // Every TCP connection below the attach point gets here: one not to or from a port the
    // interceptor listens on is left at one array look-up. `remote_port` holds the
    // network-order port in its upper 16 bits on little-endian hosts; `local_port` is host order.
    // Both fields are read unconditionally: choosing the field per op lets LLVM compute the
    // context offset at run time, which the verifier rejects.
    // SAFETY: context fields copied to the stack one at a time.
    let (remote, local) = unsafe {
        (
            u16::from_be((read_volatile(addr_of!((*ctx.ops).remote_port)) >> 16) as u16),
            read_volatile(addr_of!((*ctx.ops).local_port)) as u16,
        )
    };
    let port = if op == SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        remote
    } else {
        local
    };
    if !marked(&LISTEN_PORTS, port) {
        return 1;
    }
    let netns = netns_of(&ctx);
    // SAFETY: map lookup with a stack key; the value is copied out.
    let Some(l) = (unsafe { NETNS.get(&netns) }).copied() else {
        return 1;
    };
    let Some(e) = ends(&ctx) else {
        return 1;
    };
    let cookie = socket_cookie(&ctx);
    if op == SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // The client's side of a connection to the interceptor: was it redirected?
        if !is_listener_port(&l, e.remote.port) {
            return 1;
        }
        // SAFETY: map lookup with a stack key; the record is copied out.
        let Some(rec) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
            return 1;
        };
        let tuple = ConnTuple {
            netns,
            client: e.local.addr,
            client_port: e.local.port,
            listener_port: e.remote.port,
            _pad: 0,
        };
        let _ = BY_TUPLE.insert(&tuple, &rec, 0);
    } else {
        // The interceptor's side: give the accepted socket the record of its client.
        if !is_listener_port(&l, e.local.port) {
            return 1;
        }
        let tuple = ConnTuple {
            netns,
            client: e.remote.addr,
            client_port: e.remote.port,
            listener_port: e.local.port,
            _pad: 0,
        };
        // SAFETY: map lookup with a stack key; the record is copied out.
        let Some(rec) = (unsafe { BY_TUPLE.get(&tuple) }).copied() else {
            return 1;
        };
        let _ = BY_TUPLE.remove(&tuple);
        let _ = BY_SOCKET.insert(&cookie, &rec, 0);
    }
    // Ask for the TCP_CLOSE callback so this socket's entries go when it does.
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | SOCK_OPS_STATE_CB_FLAG);
    1
}

/// A socket we asked callbacks for reached TCP_CLOSE: forget what is keyed by it. A client whose
/// connection was never accepted also takes its tuple entry with it, so nobody connecting later
/// from the same address and port can claim it.
#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    let _ = BY_SOCKET.remove(&cookie);
    // SAFETY: map lookup with a stack key; the record is copied out.
    let Some(rec) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let _ = BY_COOKIE.remove(&cookie);
    let Some(e) = ends(ctx) else {
        return;
    };
    let tuple = ConnTuple {
        netns: rec.netns,
        client: e.local.addr,
        client_port: e.local.port,
        listener_port: e.remote.port,
        _pad: 0,
    };
    // SAFETY: map lookup with a stack key.
    if let Some(pending) = unsafe { BY_TUPLE.get(&tuple) } {
        if pending.client_cookie == cookie {
            let _ = BY_TUPLE.remove(&tuple);
        }
    }
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<SockKey> {
    let cookie = socket_cookie(ctx);
    // SAFETY: lookup with a stack key.
    unsafe { BY_COOKIE.get(&cookie) }.map(|rec| rec.orig)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mcpw_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        // SAFETY: rewriting the reported peer is what getpeername programs are for.
        unsafe {
            write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), orig.addr[3]);
            write_volatile(
                addr_of_mut!((*ctx.sock_addr).user_port),
                u16::to_be(orig.port) as u32,
            );
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mcpw_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        // SAFETY: as above, word by word.
        unsafe {
            write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[0]), orig.addr[0]);
            write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[1]), orig.addr[1]);
            write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[2]), orig.addr[2]);
            write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip6[3]), orig.addr[3]);
            write_volatile(
                addr_of_mut!((*ctx.sock_addr).user_port),
                u16::to_be(orig.port) as u32,
            );
        }
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
