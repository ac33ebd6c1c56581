//! mcpwarden's kernel side: redirect TCP connections to configured MCP endpoints into the local
//! interceptor, remember who made them, and hide the rewrite from the client.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: on a SOCK_STREAM connect to an (ip, port) in
//!   `ENDPOINTS`, record the original destination and the caller in `BY_COOKIE` and rewrite the
//!   destination to the interceptor. Connections from the agent's own cgroup are never touched.
//! - `sock_ops`: on ACTIVE_ESTABLISHED, copy the record to `BY_CLIENT`, keyed by the client's
//!   (ip, port) — what the interceptor sees as the peer of the accepted socket — and ask for state
//!   callbacks; on TCP_CLOSE, delete the cookie entry.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: report the original server as the peer.
//!
//! Every address is keyed in its 16-byte IPv4-mapped form (see `mcpwarden-common`).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use mcpwarden_common::{
    ConnRecord, EndpointValue, ProxyConfig, SockKey, AF_INET, AF_INET6, MAX_CONNECTIONS,
    MAX_ENDPOINTS, SOCK_OPS_ACTIVE_ESTABLISHED_CB, SOCK_OPS_STATE_CB, SOCK_OPS_STATE_CB_FLAG,
    SOCK_STREAM, TCP_CLOSE,
};

/// Allow the syscall (possibly with a rewritten address).
const ALLOW: i32 = 1;
/// Fail the syscall with EPERM.
const REJECT: i32 = 0;

#[map]
static ENDPOINTS: HashMap<SockKey, EndpointValue> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static BY_CLIENT: LruHashMap<SockKey, ConnRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);

#[inline(always)]
fn config() -> Option<ProxyConfig> {
    CONFIG.get(0).copied()
}

/// Build the record of a connect() by the current task to `orig`.
#[inline(always)]
fn record(orig: SockKey) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        orig,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Shared prologue of connect4/6: is this a TCP connect to an endpoint, by someone other than the
/// agent, in the interceptor's network namespace? Returns the config when the connection must be
/// redirected.
#[inline(always)]
fn should_redirect(ctx: &SockAddrContext, dst: &SockKey) -> Option<ProxyConfig> {
    // SAFETY: ctx.sock_addr is the kernel-provided context; fields are read one at a time.
    let sock_type = unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) };
    if sock_type != SOCK_STREAM {
        return None;
    }
    // SAFETY: map lookup with a stack key.
    unsafe { ENDPOINTS.get(dst) }?;
    let cfg = config()?;
    // SAFETY: a helper without arguments.
    if unsafe { bpf_get_current_cgroup_id() } == cfg.agent_cgroup_id {
        return None;
    }
    // Another network namespace has its own loopback, where the interceptor is not listening.
    // SAFETY: the helper takes the program context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return None;
    }
    Some(cfg)
}

/// Store the record under the socket's cookie. False when it could not be stored.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: SockKey) -> bool {
    let rec = record(dst);
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    BY_COOKIE.insert(&cookie, &rec, 0).is_ok()
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
    let Some(cfg) = should_redirect(&ctx, &dst) else {
        return ALLOW;
    };
    if cfg.v4_port == 0 || !remember(&ctx, dst) {
        // An endpoint we cannot intercept is not reached uninspected.
        return REJECT;
    }
    // SAFETY: writing the destination is what connect4 programs are for.
    unsafe {
        write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), cfg.v4_addr);
        write_volatile(
            addr_of_mut!((*ctx.sock_addr).user_port),
            u16::to_be(cfg.v4_port) as u32,
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mcpw_connect6(ctx: SockAddrContext) -> i32 {
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
    let dst = SockKey {
        addr: [w0, w1, w2, w3],
        port: u16::from_be(port as u16),
        _pad: 0,
    };
    let Some(cfg) = should_redirect(&ctx, &dst) else {
        return ALLOW;
    };
    let (addr, new_port) = if dst.is_v4_mapped() {
        // An AF_INET6 socket dialling ::ffff:a.b.c.d reaches the IPv4 listener through its mapped
        // address.
        ([0, 0, SockKey::mapped_word(), cfg.v4_addr], cfg.v4_port)
    } else {
        (cfg.v6_addr, cfg.v6_port)
    };
    if new_port == 0 || !remember(&ctx, dst) {
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

#[sock_ops]
pub fn mcpw_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != SOCK_OPS_STATE_CB {
        return 1;
    }
    if op == SOCK_OPS_ACTIVE_ESTABLISHED_CB && !to_interceptor(&ctx) {
        // Every TCP connection below the attach point gets here: the cheap port test spares the
        // others a socket cookie and a map lookup.
        return 1;
    }
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == SOCK_OPS_STATE_CB {
        if ctx.arg(1) == TCP_CLOSE {
            let _ = BY_COOKIE.remove(&cookie);
        }
        return 1;
    }
    // SAFETY: map lookup with a stack key; the record is copied out.
    let Some(rec) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    // SAFETY: context fields are copied to the stack one word at a time. Every field is read
    // unconditionally: choosing the field per family lets LLVM compute the context offset at run
    // time, which the verifier rejects ("dereference of modified ctx ptr").
    let (family, port, ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*ctx.ops).family)),
            read_volatile(addr_of!((*ctx.ops).local_port)) as u16,
            read_volatile(addr_of!((*ctx.ops).local_ip4)),
            [
                read_volatile(addr_of!((*ctx.ops).local_ip6[0])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[1])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[2])),
                read_volatile(addr_of!((*ctx.ops).local_ip6[3])),
            ],
        )
    };
    let client = match family {
        AF_INET => SockKey::from_v4_word(ip4, port),
        AF_INET6 => SockKey {
            addr: ip6,
            port,
            _pad: 0,
        },
        _ => return 1,
    };
    let _ = BY_CLIENT.insert(&client, &rec, 0);
    // Ask for the TCP_CLOSE callback so the cookie entry goes when the connection does.
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | SOCK_OPS_STATE_CB_FLAG);
    1
}

/// Whether the connection's remote port is one the interceptor listens on (a redirected
/// connection always is; the cookie lookup then decides).
#[inline(always)]
fn to_interceptor(ctx: &SockOpsContext) -> bool {
    // SAFETY: one context field copied to the stack. `remote_port` holds the network-order port in
    // its upper 16 bits on little-endian hosts.
    let remote = unsafe { read_volatile(addr_of!((*ctx.ops).remote_port)) };
    let port = u16::from_be((remote >> 16) as u16);
    config().is_some_and(|cfg| port != 0 && (port == cfg.v4_port || port == cfg.v6_port))
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<SockKey> {
    // SAFETY: the helper takes the program context; lookup with a stack key.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
