//! What the node knows of each caller's Kubernetes pod, by cgroup.
//!
//! Policy bindings select callers by namespace, labels, service account and container. This
//! directory holds that metadata per cgroup id, and wakes calls waiting for a pod to become
//! known. Nothing fills it from the Kubernetes API yet (that is the identity issue): callers in
//! pods therefore stay unresolved, and a binding that needs their metadata refuses their calls
//! after `identity_wait_ms` rather than give them another policy.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

use crate::policy::bindings::PodMeta;

/// Pod metadata by cgroup id.
#[derive(Debug, Default)]
pub struct Pods {
    by_cgroup: RwLock<HashMap<u64, Arc<PodMeta>>>,
    /// Woken whenever an entry is added.
    changed: Notify,
}

impl Pods {
    /// The pod of the process in cgroup `id`, when known.
    pub fn get(&self, id: u64) -> Option<Arc<PodMeta>> {
        self.by_cgroup
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Records the pod of cgroup `id` and wakes the calls waiting for metadata.
    pub fn insert(&self, id: u64, pod: PodMeta) {
        self.by_cgroup
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, Arc::new(pod));
        self.changed.notify_waiters();
    }

    /// Forgets cgroup `id` (its pod is gone).
    pub fn remove(&self, id: u64) {
        self.by_cgroup
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// Resolves when an entry is next added. Create it before looking, so that an insertion
    /// between the look and the wait is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}
