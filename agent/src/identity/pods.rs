//! What the node knows of its pods, and of the pod behind each caller's cgroup.
//!
//! The Kubernetes watch (`crate::kube`) fills it with this node's pods by UID. A caller is
//! matched to its pod by the pod UID and container id its cgroup path carries
//! ([`super::workload`]), once per cgroup: the answer is cached by cgroup id, so a warm lookup
//! is one hash look-up under a read lock, and nothing on the data path waits for the API
//! server. Calls whose pod is not known yet wait for [`Pods::changed`] (bounded by the
//! policy's `identity_wait_ms`).
//!
//! A deleted pod stays known for a grace period: its processes can still be finishing calls.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::workload::Workload;
use crate::policy::bindings::PodMeta;

/// How long a deleted pod stays known, by default.
pub const DEFAULT_DELETED_GRACE: Duration = Duration::from_secs(60);

/// A pod as the API server describes it (what the watch keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRecord {
    /// Namespace, name, UID, labels, service account (`container` is not used here).
    pub meta: PodMeta,
    pub node: String,
    /// Container id (without the `containerd://` scheme) → container name, from the pod's
    /// status (init, regular and ephemeral containers).
    pub containers: HashMap<String, String>,
    /// The UID its cgroups carry: the pod's, or for a static pod's mirror the static pod's
    /// (its `kubernetes.io/config.mirror` annotation).
    pub cgroup_uid: String,
}

/// The pod of one caller: its pod's metadata with the caller's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// With `container` set when the container id is in the pod's status.
    pub meta: PodMeta,
    pub node: String,
}

#[derive(Debug)]
struct Known {
    record: PodRecord,
    /// When the watch said it was deleted (it is forgotten [`Pods::grace`] later).
    deleted: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    by_uid: HashMap<String, Known>,
    /// Callers' cgroups already matched to their pod.
    by_cgroup: HashMap<u64, Arc<PodInfo>>,
}

/// This node's pods by UID, and callers' pods by cgroup id.
#[derive(Debug)]
pub struct Pods {
    inner: RwLock<Inner>,
    /// Woken whenever a pod is added or changes.
    changed: Notify,
    grace: Duration,
}

impl Default for Pods {
    fn default() -> Pods {
        Pods::new(DEFAULT_DELETED_GRACE)
    }
}

impl Pods {
    pub fn new(grace: Duration) -> Pods {
        Pods {
            inner: RwLock::default(),
            changed: Notify::new(),
            grace,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // The maps hold no invariant a panic could break.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pod of the caller in cgroup `cgroup_id`, whose path says `workload`, when known.
    pub fn lookup(&self, cgroup_id: u64, workload: &Workload) -> Option<Arc<PodInfo>> {
        let uid = {
            let inner = self.read();
            if let Some(found) = inner.by_cgroup.get(&cgroup_id) {
                return Some(found.clone());
            }
            // A pod not known (yet): answered under the read lock, as every waiting call asks.
            let uid = workload.pod_uid.as_deref()?;
            if !inner.by_uid.contains_key(uid) {
                return None;
            }
            uid
        };
        // Built and cached under the write lock, so that a change applied meanwhile is not
        // overwritten by what was read before it.
        let mut inner = self.write();
        let known = inner.by_uid.get(uid)?;
        let container = workload
            .container_id
            .as_ref()
            .and_then(|id| known.record.containers.get(id))
            .cloned();
        let info = Arc::new(PodInfo {
            meta: PodMeta {
                container,
                ..known.record.meta.clone()
            },
            node: known.record.node.clone(),
        });
        // A container the status does not list yet is looked up again next time.
        if info.meta.container.is_some() || workload.container_id.is_none() {
            inner.by_cgroup.insert(cgroup_id, info.clone());
        }
        Some(info)
    }

    /// A pod was added or changed: callers' cached answers for it are dropped (labels, its
    /// containers may have changed), and calls waiting for a pod look again.
    pub fn apply(&self, record: PodRecord) {
        let mut inner = self.write();
        let uid = record.meta.uid.clone();
        inner.by_cgroup.retain(|_, info| info.meta.uid != uid);
        inner.by_uid.insert(
            record.cgroup_uid.clone(),
            Known {
                record,
                deleted: None,
            },
        );
        drop(inner);
        self.changed.notify_waiters();
    }

    /// A pod (by the UID its cgroups carry) was deleted at `now`: it stays known for the grace
    /// period.
    pub fn delete(&self, uid: &str, now: Instant) {
        if let Some(known) = self.write().by_uid.get_mut(uid) {
            known.deleted.get_or_insert(now);
        }
    }

    /// The watch listed every pod anew (after a restart or an expired watch): pods not in
    /// `uids` (the UIDs their cgroups carry) were deleted meanwhile.
    pub fn relisted(&self, uids: &std::collections::HashSet<String>, now: Instant) {
        for (uid, known) in self.write().by_uid.iter_mut() {
            if !uids.contains(uid) {
                known.deleted.get_or_insert(now);
            }
        }
    }

    /// Forgets pods deleted more than the grace period before `now`.
    pub fn prune(&self, now: Instant) {
        let mut inner = self.write();
        let grace = self.grace;
        let mut gone = Vec::new();
        inner.by_uid.retain(|_, known| {
            let keep = known
                .deleted
                .is_none_or(|at| now.saturating_duration_since(at) < grace);
            if !keep {
                gone.push(known.record.meta.uid.clone());
            }
            keep
        });
        if !gone.is_empty() {
            inner
                .by_cgroup
                .retain(|_, info| !gone.contains(&info.meta.uid));
        }
    }

    /// Pods known (deleted ones in their grace period included).
    pub fn len(&self) -> usize {
        self.read().by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a pod is next added or changed. Create it before looking, so that a
    /// change between the look and the wait is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44";

    fn record(app: &str) -> PodRecord {
        PodRecord {
            meta: PodMeta {
                namespace: "payments".into(),
                name: "agent-7d9f".into(),
                uid: UID.into(),
                labels: [("app".to_owned(), app.to_owned())].into(),
                service_account: "agent".into(),
                container: None,
            },
            node: "node-a".into(),
            containers: [("c0ffee00c0ffee".to_owned(), "main".to_owned())].into(),
            cgroup_uid: UID.into(),
        }
    }

    fn workload(container: &str) -> Workload {
        Workload {
            pod_uid: Some(UID.into()),
            runtime: None,
            container_id: Some(container.into()),
            pod_dir: None,
        }
    }

    #[test]
    fn a_caller_is_matched_to_its_pod_and_container_and_follows_changes() {
        let pods = Pods::default();
        assert_eq!(pods.lookup(7, &workload("c0ffee00c0ffee")), None);
        pods.apply(record("agent"));
        let found = pods.lookup(7, &workload("c0ffee00c0ffee")).expect("known");
        assert_eq!(found.meta.container.as_deref(), Some("main"));
        assert_eq!(found.meta.labels["app"], "agent");
        assert_eq!(found.node, "node-a");
        // Cached by cgroup: the path is not needed again.
        assert!(pods.lookup(7, &Workload::default()).is_some());
        // A label change reaches the next lookup.
        pods.apply(record("batch"));
        let found = pods.lookup(7, &workload("c0ffee00c0ffee")).expect("known");
        assert_eq!(found.meta.labels["app"], "batch");
        // A container not in the status yet: the pod, without a container name, not cached.
        let young = pods.lookup(8, &workload("abcdef012345")).expect("known");
        assert_eq!(young.meta.container, None);
        assert!(pods.lookup(8, &Workload::default()).is_none());
    }

    #[test]
    fn a_deleted_pod_stays_known_for_the_grace_period() {
        let pods = Pods::new(Duration::from_secs(60));
        pods.apply(record("agent"));
        let t0 = Instant::now();
        pods.delete(UID, t0);
        pods.prune(t0 + Duration::from_secs(59));
        assert!(pods.lookup(7, &workload("c0ffee00c0ffee")).is_some());
        pods.prune(t0 + Duration::from_secs(61));
        assert!(pods.lookup(7, &workload("c0ffee00c0ffee")).is_none());
        assert!(pods.is_empty());
    }

    #[test]
    fn a_relist_marks_missing_pods_deleted() {
        let pods = Pods::new(Duration::from_secs(1));
        pods.apply(record("agent"));
        let t0 = Instant::now();
        pods.relisted(&Default::default(), t0);
        pods.prune(t0 + Duration::from_secs(2));
        assert!(pods.is_empty());
    }
}
