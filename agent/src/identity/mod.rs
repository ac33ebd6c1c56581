//! Who is calling: from what the kernel recorded at connect() (process, user, cgroup id) to the
//! caller the policy and the audit name — the process name, the cgroup path, the pod — and the
//! scope keys its quotas count under.
//!
//! Resolution reads `/proc` and the cgroup filesystem, so it runs on the worker that serves the
//! connection, never on the accept thread. [`pods`] holds what is known of callers' pods.

mod cgroup;
mod pods;
pub mod workload;

use std::{
    num::NonZeroUsize,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use lru::LruCache;

pub use cgroup::CgroupNames;
pub use pods::{PodInfo, PodRecord, Pods, DEFAULT_DELETED_GRACE};
pub use workload::{Runtime, Workload};

use crate::policy::bindings::PodMeta;

/// What the kernel recorded of a connection's caller at connect().
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The thread group (process) id.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The comm of the thread that called connect().
    pub comm: String,
    /// Cookie of the network namespace the connection was made in.
    pub netns: u64,
}

/// Who opened a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The process's name.
    pub comm: String,
    pub cgroup_id: u64,
    /// Path relative to the cgroup2 mount ("/a/b"), when the cgroup still exists.
    pub cgroup: Option<Arc<str>>,
    /// What the cgroup path says: pod UID, runtime, container id.
    pub workload: Workload,
    /// The caller's pod, when the node knows it (looked up at accept; a call that needs it
    /// and finds it missing waits for it: see `intercept::choose`).
    pub pod: Option<Arc<PodInfo>>,
}

impl Caller {
    /// The `grant` scope key: the caller's pod when it is known, else its cgroup.
    pub fn grant_key(&self, pod: Option<&PodMeta>) -> String {
        match pod {
            Some(pod) => format!("pod:{}", pod.uid),
            None => format!("cgroup:{}", self.cgroup_id),
        }
    }

    /// The `process` scope key.
    pub fn process_key(&self) -> String {
        format!("pid:{}", self.pid)
    }
}

/// The `namespace` and `service_account` scope keys of every caller in a pod not known yet.
pub const UNKNOWN_NAMESPACE: &str = "namespace:?";
pub const UNKNOWN_SERVICE_ACCOUNT: &str = "sa:?";

/// The `namespace` scope key of a caller in a known pod.
pub fn namespace_key(pod: &PodMeta) -> String {
    format!("namespace:{}", pod.namespace)
}

/// The `service_account` scope key of a caller in a known pod.
pub fn service_account_key(pod: &PodMeta) -> String {
    format!("sa:{}/{}", pod.namespace, pod.service_account)
}

/// The `session` scope key of a Streamable HTTP or HTTP+SSE session.
pub fn session_key(id: &str) -> String {
    format!("session:{id}")
}

/// The `session` scope key of revisions without sessions: the connection.
pub fn connection_key(connection: u64) -> String {
    format!("connection:{connection}")
}

/// Turns kernel records into callers.
pub struct Resolver {
    names: CgroupNames,
    mount: std::path::PathBuf,
    /// What each cgroup's path says, once checked (see [`Resolver::workload`]).
    workloads: Mutex<LruCache<u64, Workload>>,
}

/// Cgroups whose workload is remembered (least recently used dropped).
const WORKLOADS_MAX: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

impl Resolver {
    /// Cgroup ids are resolved below `mount`, the cgroup2 mount.
    pub fn new(mount: &Path) -> Result<Resolver> {
        Ok(Resolver {
            names: CgroupNames::new(mount)?,
            mount: mount.to_path_buf(),
            workloads: Mutex::new(LruCache::new(WORKLOADS_MAX)),
        })
    }

    /// What cgroup `id`'s path says of the workload in it, believed only where root made the
    /// directories: a user given a cgroup subtree of their own (systemd delegation, rootless
    /// containers) can create directories named like kubelet's (`…-pod<uid>.slice/
    /// cri-containerd-<id>.scope`) and move processes there, but cannot make root own them. The
    /// pod is believed only when its directory is root's, the container only when the caller's
    /// cgroup is. Checked once per cgroup (the answer is cached by id).
    fn workload(&self, id: u64, path: &str) -> Workload {
        let cache = || {
            self.workloads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(w) = cache().get(&id) {
            return w.clone();
        }
        let mut w = workload::parse(path);
        let root_owns = |rel: &str| {
            !rel.split('/').any(|s| s == "..")
                && std::fs::metadata(self.mount.join(rel.trim_start_matches('/')))
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        };
        if w.pod_dir.as_deref().is_some_and(|dir| !root_owns(dir)) {
            tracing::warn!(
                cgroup = path,
                "a cgroup named like a pod's but not made by root: not attributed to the pod"
            );
            w = Workload::default();
        } else if w.container_id.is_some() && !root_owns(path) {
            w.container_id = None;
            w.runtime = None;
        }
        cache().put(id, w.clone());
        w
    }

    /// The caller behind `kernel`: its process name (falling back to the thread's when the
    /// process is gone) and its cgroup's path.
    pub fn caller(&self, kernel: &Kernel) -> Caller {
        let cgroup = self.names.path_of(kernel.cgroup_id);
        Caller {
            pid: kernel.pid,
            uid: kernel.uid,
            gid: kernel.gid,
            comm: process_comm(kernel.pid).unwrap_or_else(|| kernel.comm.clone()),
            cgroup_id: kernel.cgroup_id,
            workload: cgroup
                .as_deref()
                .map(|p| self.workload(kernel.cgroup_id, p))
                .unwrap_or_default(),
            cgroup,
            pod: None,
        }
    }
}

/// The process's name (its main thread's comm). The kernel records the comm of the thread that
/// called connect(), which for threaded runtimes is a worker's name ("tokio-rt-worker"); the
/// process name is what an operator recognises.
fn process_comm(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_keys_name_the_pod_when_known_else_the_cgroup() {
        let caller = Caller {
            pid: 12,
            uid: 0,
            gid: 0,
            comm: "agent".into(),
            cgroup_id: 99,
            cgroup: None,
            workload: Workload::default(),
            pod: None,
        };
        assert_eq!(caller.grant_key(None), "cgroup:99");
        let pod = PodMeta {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "0b9e".into(),
            labels: Default::default(),
            service_account: "sa".into(),
            container: None,
        };
        assert_eq!(caller.grant_key(Some(&pod)), "pod:0b9e");
        assert_eq!(caller.process_key(), "pid:12");
        assert_eq!(session_key("abc"), "session:abc");
        assert_eq!(connection_key(7), "connection:7");
    }

    #[test]
    fn a_pod_is_believed_only_from_directories_root_made() -> Result<()> {
        use std::os::unix::fs::{chown, MetadataExt};
        let mount = std::env::temp_dir().join(format!("mcpwarden-identity-{}", std::process::id()));
        let uid = "3f1c2a9e_8d4b_4c1e_9a7f_0b5e6d2c1a44";
        let id = "ab".repeat(32);
        let pod =
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice");
        let leaf = format!("{pod}/cri-containerd-{id}.scope");
        std::fs::create_dir_all(mount.join(&leaf))?;
        let resolver = Resolver::new(&mount)?;
        let path = format!("/{leaf}");
        // Made by root (this test runs as root, as the agent does): the pod and the container.
        assert_eq!(std::fs::metadata(mount.join(&pod))?.uid(), 0, "run as root");
        let w = resolver.workload(1, &path);
        assert_eq!(w.pod_uid.as_deref(), Some(uid.replace('_', "-").as_str()));
        assert_eq!(w.container_id.as_deref(), Some(id.as_str()));
        // The same names in a user's delegated subtree: neither.
        let user = format!("user.slice/delegated/{leaf}");
        std::fs::create_dir_all(mount.join(&user))?;
        let mut dir = mount.join("user.slice/delegated");
        for part in leaf.split('/') {
            dir = dir.join(part);
            chown(&dir, Some(1000), Some(1000))?;
        }
        assert_eq!(
            resolver.workload(2, &format!("/{user}")),
            Workload::default()
        );
        // A container leaf the user made (rootless): no container id.
        let rootless = format!("user.slice/libpod-{id}.scope");
        std::fs::create_dir_all(mount.join(&rootless))?;
        chown(mount.join(&rootless), Some(1000), Some(1000))?;
        assert_eq!(
            resolver.workload(3, &format!("/{rootless}")),
            Workload::default()
        );
        std::fs::remove_dir_all(&mount)?;
        Ok(())
    }

    #[test]
    fn a_live_process_is_named_by_its_process_and_a_gone_one_by_its_thread() -> Result<()> {
        let resolver = Resolver::new(Path::new("/"))?;
        let own = std::fs::read_to_string("/proc/self/comm")?;
        let kernel = Kernel {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
            cgroup_id: 0,
            comm: "some-thread".into(),
            netns: 0,
        };
        assert_eq!(resolver.caller(&kernel).comm, own.trim_end());
        // pid_max is at most 2^22: this pid cannot exist.
        let gone = Kernel {
            pid: u32::MAX,
            ..kernel
        };
        assert_eq!(resolver.caller(&gone).comm, "some-thread");
        Ok(())
    }
}

/// The credentials of a Unix socket's peer as the kernel recorded them at connect
/// (`SO_PEERCRED`): pid, uid, gid. The pid is 0 when the peer's process is not visible from
/// this PID namespace (read as a plain integer: 0 is a valid answer here, not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(socket: &impl std::os::fd::AsFd) -> std::io::Result<PeerCred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a ucred, `len` its size; both outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
        gid: cred.gid,
    })
}
