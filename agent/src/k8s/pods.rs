//! One watch of this node's pods (`fieldSelector=spec.nodeName=NODE`) feeding [`Pods`].

use std::collections::HashSet;
use std::sync::{atomic::Ordering, Arc};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use super::Kube;
use crate::identity::{PodRecord, Pods};
use crate::policy::bindings::PodMeta;

/// How often deleted pods past their grace period are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

pub(super) async fn watch(
    client: Client,
    node: String,
    pods: Arc<Pods>,
    grace: Duration,
    kube: Arc<Kube>,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<HashSet<String>> = None;
    let mut prune = tokio::time::interval(PRUNE_EVERY.min(grace.max(Duration::from_secs(1))));
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = prune.tick() => {
                pods.prune(Instant::now());
                continue;
            }
        };
        let Some(event) = event else {
            // The watcher's stream never ends on its own; if it does, nothing is watched.
            tracing::error!("the pod watch ended");
            return;
        };
        match event {
            Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                kube.ok();
                if let Some(record) = record(&pod) {
                    if let Some(seen) = listing.as_mut() {
                        seen.insert(record.cgroup_uid.clone());
                    }
                    pods.apply(record);
                }
            }
            Ok(watcher::Event::InitDone) => {
                kube.ok();
                if let Some(seen) = listing.take() {
                    pods.relisted(&seen, Instant::now());
                }
                if !kube.pods_synced.swap(true, Ordering::Relaxed) {
                    tracing::info!(node, pods = pods.len(), "this node's pods are known");
                }
            }
            Ok(watcher::Event::Apply(pod)) => {
                kube.ok();
                if let Some(record) = record(&pod) {
                    pods.apply(record);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                kube.ok();
                if let Some(record) = record(&pod) {
                    pods.delete(&record.cgroup_uid, Instant::now());
                }
            }
            Err(e) => kube.failed("watching this node's pods", &e),
        }
    }
}

/// What the node keeps of a pod: `None` for a pod without a UID (never sent by an API server).
fn record(pod: &Pod) -> Option<PodRecord> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let statuses = status.into_iter().flat_map(|s| {
        let lists: [&Option<Vec<ContainerStatus>>; 3] = [
            &s.container_statuses,
            &s.init_container_statuses,
            &s.ephemeral_container_statuses,
        ];
        lists.into_iter().flatten().flatten()
    });
    let containers = statuses
        .filter_map(|c| {
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
            let id = c.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            Some((id.to_owned(), c.name.clone()))
        })
        .collect();
    // A static pod's cgroups carry the UID kubelet gave it (the hash of its manifest); the API
    // server knows its mirror pod, which names that UID in an annotation.
    let cgroup_uid = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .cloned()
        .unwrap_or_else(|| uid.clone());
    Some(PodRecord {
        cgroup_uid,
        meta: PodMeta {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid,
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            container: None,
        },
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        containers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_kept_with_its_containers_by_id() -> Result<(), serde_json::Error> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agent-1", "namespace": "payments", "uid": "3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44",
                         "labels": {"app": "agent"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "agent-sa", "containers": [{"name": "main"}]},
            "status": {"containerStatuses": [
                {"name": "main", "containerID": "containerd://abc123abc123", "image": "x", "imageID": "",
                 "ready": true, "restartCount": 0},
                {"name": "side", "image": "x", "imageID": "", "ready": false, "restartCount": 0}],
              "initContainerStatuses": [
                {"name": "init", "containerID": "cri-o://def456def456", "image": "x", "imageID": "",
                 "ready": false, "restartCount": 0}]}
        }))?;
        let r = record(&pod).expect("has a uid");
        assert_eq!(r.meta.namespace, "payments");
        assert_eq!(r.meta.service_account, "agent-sa");
        assert_eq!(r.node, "node-a");
        assert_eq!(r.containers["abc123abc123"], "main");
        assert_eq!(r.containers["def456def456"], "init");
        assert_eq!(
            r.containers.len(),
            2,
            "a container not started has no id yet"
        );
        assert_eq!(r.cgroup_uid, r.meta.uid);
        let mirror: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "etcd-node-a", "namespace": "kube-system", "uid": "1d2c3b4a-0000-4000-8000-000000000001",
                         "annotations": {"kubernetes.io/config.mirror": "0f3c9d2e8b7a61544c2d1e0f9a8b7c6d"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "etcd"}]}
        }))?;
        let r = record(&mirror).expect("has a uid");
        assert_eq!(
            r.cgroup_uid, "0f3c9d2e8b7a61544c2d1e0f9a8b7c6d",
            "found by its cgroups' UID"
        );
        assert_eq!(r.meta.uid, "1d2c3b4a-0000-4000-8000-000000000001");
        Ok(())
    }
}
