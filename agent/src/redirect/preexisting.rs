//! Connections to endpoints that were opened before the programs were attached went straight
//! to the servers, uninspected; they are reset once the programs run, so that the client's next
//! attempt is redirected and inspected (`SOCK_DESTROY`, what `ss -K` does; see `netns::diag`).
//!
//! Only client sockets below the attach point are reset: made by a cgroup there, not the
//! agent's, and connected to an address and port the programs redirect from that namespace.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use crate::netns::{diag, Netns};

use super::Redirector;

/// One connection found, and whether resetting it worked.
#[derive(Debug)]
pub struct Found {
    pub netns: Arc<Netns>,
    pub sock: diag::TcpSock,
    /// The process holding it and its name, when one was found (`/proc/*/fd`).
    pub pid: Option<(u32, String)>,
    pub reset: Result<(), String>,
}

/// Reset the connections to endpoints made before the programs were attached, in each of
/// `namespaces`, by cgroups below `attach` (except `agent_cgroup`). A namespace whose sockets
/// cannot be listed is returned with why.
pub fn reset(
    redirector: &Redirector,
    namespaces: &[Arc<Netns>],
    attach: &Path,
    agent_cgroup: u64,
) -> (Vec<Found>, Vec<(Arc<Netns>, String)>) {
    let below = super::cgroup::ids_below(attach);
    let mut candidates: Vec<(Arc<Netns>, diag::TcpSock)> = Vec::new();
    let mut failed = Vec::new();
    for ns in namespaces {
        let socks = match diag::tcp_sockets(ns) {
            Ok(s) => s,
            Err(e) => {
                failed.push((ns.clone(), e.to_string()));
                continue;
            }
        };
        for sock in socks {
            let Some(cg) = sock.cgroup_id else {
                continue;
            };
            if cg == agent_cgroup || !below.contains(&cg) {
                continue;
            }
            if redirector.is_endpoint(ns.cookie, ns.host, sock.dst) {
                candidates.push((ns.clone(), sock));
            }
        }
    }
    // Who holds each, while they still do (a reset client may exit at once).
    let owners = if candidates.is_empty() {
        Default::default()
    } else {
        socket_owners(candidates.iter().map(|(_, s)| s.inode).collect())
    };
    let found = candidates
        .into_iter()
        .map(|(netns, sock)| Found {
            pid: owners.get(&sock.inode).cloned(),
            reset: diag::destroy(&netns, &sock).map_err(|e| e.to_string()),
            netns,
            sock,
        })
        .collect();
    (found, failed)
}

/// Which process holds each socket inode (the first found), with its name.
fn socket_owners(inodes: BTreeSet<u32>) -> std::collections::HashMap<u32, (u32, String)> {
    let mut out = std::collections::HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(ino) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u32>().ok())
            {
                if inodes.contains(&ino) {
                    out.entry(ino).or_insert_with(|| {
                        let comm = std::fs::read_to_string(p.path().join("comm"))
                            .map(|c| c.trim_end().to_owned())
                            .unwrap_or_default();
                        (pid, comm)
                    });
                }
            }
        }
        if out.len() == inodes.len() {
            break;
        }
    }
    out
}
