//! Where network namespaces are found.
//!
//! - **Pins**: container runtimes pin each pod sandbox's namespace as a bind mount before any of
//!   the pod's containers starts (containerd `/var/run/netns/cni-…`, CRI-O `/var/run/netns/…`,
//!   Docker `/var/run/docker/netns/…`, `ip netns add` `/run/netns/…`). A pin is a mount, so
//!   the mount table changing is the event ([`MountWatch`]: `/proc/self/mountinfo` is pollable);
//!   the pin directories are then read again. This is how a pod's namespace is served before
//!   its workload's first connect.
//! - **Processes below the attach point** (`cgroup.procs` of the subtree, then
//!   `/proc/PID/ns/net`): the namespaces that exist at start, and any a process made without a
//!   pin (`unshare -n`), found again on each sweep.
//! - **The programs' events** (`coverage`): a connect to an endpoint from a namespace not served
//!   yet, which the programs refuse and report.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use tokio::io::{unix::AsyncFd, Interest};

use super::NsId;

/// The pins in `dirs` now: each pin's path with its namespace's identity. A directory that does
/// not exist has none; a pin that is not bind-mounted yet (a plain file) is left out.
pub fn pins(dirs: &[PathBuf]) -> BTreeMap<PathBuf, NsId> {
    let mut out = BTreeMap::new();
    let mut seen_dirs = Vec::new();
    for dir in dirs {
        // /var/run is usually /run: read each directory once.
        let real = fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        if seen_dirs.contains(&real) {
            continue;
        }
        seen_dirs.push(real);
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(id) = NsId::at(&path) {
                if is_nsfs(&path) {
                    out.insert(path, id);
                }
            }
        }
    }
    out
}

/// Whether the file at `path` is on nsfs (a namespace, not the empty file a pin starts as).
fn is_nsfs(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == NSFS_MAGIC
}

/// The processes in the cgroup subtree at `root` (an absolute path below the cgroup2 mount).
pub fn processes_below(root: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// The network namespace process `pid` is in.
pub fn netns_of_pid(pid: u32) -> io::Result<NsId> {
    NsId::at(&proc_netns(pid))
}

/// `/proc/PID/ns/net`.
pub fn proc_netns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// The network namespace of every process on the machine (as this agent's /proc shows them),
/// with one process in each.
pub fn all_process_namespaces() -> BTreeMap<NsId, u32> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(id) = netns_of_pid(pid) {
            out.entry(id).or_insert(pid);
        }
    }
    out
}

/// Wakes up when this process's mount table changes (a pin was mounted or unmounted).
pub struct MountWatch {
    fd: AsyncFd<fs::File>,
}

impl MountWatch {
    /// Needs a tokio runtime.
    pub fn new() -> io::Result<MountWatch> {
        let file = fs::File::open("/proc/self/mountinfo")?;
        // SAFETY: the AsyncFd owns the File, which stays open as long as it does.
        let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
            .map_err(io::Error::from)?;
        Ok(MountWatch { fd })
    }

    /// Waits for the next change. Polling the file acknowledges it (the kernel compares the
    /// namespace's event count with the last one this file saw).
    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self.fd.ready(Interest::PRIORITY).await?;
        guard.clear_ready();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_processes_and_namespace_are_found() -> io::Result<()> {
        let own = netns_of_pid(std::process::id())?;
        let all = all_process_namespaces();
        assert!(all.contains_key(&own), "{all:?}");
        assert!(is_nsfs(&proc_netns(std::process::id())));
        assert!(!is_nsfs(Path::new("/proc/self/status")));
        // A directory that does not exist has no pins; a plain file is not one.
        let dir = std::env::temp_dir().join(format!("mcpwarden-pins-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("not-yet-mounted"), b"")?;
        let found = pins(&[dir.clone(), dir.join("missing")]);
        assert!(found.is_empty(), "{found:?}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
