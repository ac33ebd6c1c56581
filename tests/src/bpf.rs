//! Which BPF programs are attached to a cgroup, asked of the kernel directly with
//! `bpf(BPF_PROG_QUERY)` (the same query `bpftool cgroup show` makes), so the tests need no
//! external tool.

use std::os::fd::AsRawFd;
use std::path::Path;

const BPF_PROG_QUERY: libc::c_long = 16;

/// Every cgroup attach type of `enum bpf_attach_type` (uapi/linux/bpf.h), with its name.
pub const CGROUP_ATTACH_TYPES: &[(u32, &str)] = &[
    (0, "cgroup_inet_ingress"),
    (1, "cgroup_inet_egress"),
    (2, "cgroup_inet_sock_create"),
    (3, "cgroup_sock_ops"),
    (6, "cgroup_device"),
    (8, "cgroup_inet4_bind"),
    (9, "cgroup_inet6_bind"),
    (10, "cgroup_inet4_connect"),
    (11, "cgroup_inet6_connect"),
    (12, "cgroup_inet4_post_bind"),
    (13, "cgroup_inet6_post_bind"),
    (14, "cgroup_udp4_sendmsg"),
    (15, "cgroup_udp6_sendmsg"),
    (18, "cgroup_sysctl"),
    (19, "cgroup_udp4_recvmsg"),
    (20, "cgroup_udp6_recvmsg"),
    (21, "cgroup_getsockopt"),
    (22, "cgroup_setsockopt"),
    (29, "cgroup_inet4_getpeername"),
    (30, "cgroup_inet6_getpeername"),
    (31, "cgroup_inet4_getsockname"),
    (32, "cgroup_inet6_getsockname"),
    (34, "cgroup_inet_sock_release"),
];

pub const ATTACH_INET4_CONNECT: u32 = 10;
pub const ATTACH_INET6_CONNECT: u32 = 11;
pub const ATTACH_SOCK_OPS: u32 = 3;
pub const ATTACH_INET4_GETPEERNAME: u32 = 29;
pub const ATTACH_INET6_GETPEERNAME: u32 = 30;

/// Program ids attached directly to the cgroup at `dir` for `attach_type`
/// (`effective`: include those inherited from ancestors).
pub fn query(dir: &Path, attach_type: u32, effective: bool) -> std::io::Result<Vec<u32>> {
    let f = std::fs::File::open(dir)?;
    let mut ids = vec![0u32; 256];
    // union bpf_attr, `query` member: target_fd u32 @0, attach_type u32 @4, query_flags u32 @8,
    // attach_flags u32 @12, prog_ids u64 @16, prog_cnt u32 @24, (pad) @28,
    // prog_attach_flags u64 @32, link_ids u64 @40, link_attach_flags u64 @48, revision u64 @56.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(f.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    let flags: u32 = if effective { 1 } else { 0 }; // BPF_F_QUERY_EFFECTIVE
    attr[8..12].copy_from_slice(&flags.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cnt = u32::from_ne_bytes(attr[24..28].try_into().unwrap()) as usize;
    ids.truncate(cnt.min(256));
    Ok(ids)
}

/// Every program attached directly to the cgroup at `dir`, as (attach type name, prog ids),
/// only the non-empty ones. Attach types this kernel does not know (EINVAL) are skipped.
pub fn attached(dir: &Path) -> Vec<(&'static str, Vec<u32>)> {
    let mut out = Vec::new();
    for &(t, name) in CGROUP_ATTACH_TYPES {
        match query(dir, t, false) {
            Ok(ids) if !ids.is_empty() => out.push((name, ids)),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("BPF_PROG_QUERY {name} on {}: {e}", dir.display()),
        }
    }
    out
}
