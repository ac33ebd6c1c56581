//! The boot window: until the agent has attached, nothing redirects a node's pods. New nodes
//! register with a NoSchedule taint the agent tolerates (kubelet applies it only when it creates
//! the Node: a reboot is not covered, see the README); once ready,
//! the agent removes it from its own node with a JSON Patch that first tests the taints are
//! what it read (a concurrent change fails the test and the agent reads again).

use std::sync::{atomic::Ordering, Arc};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::{backoff, Kube};

pub(super) async fn remove(client: Client, kube: Arc<Kube>, taint: String) {
    let api: Api<Node> = Api::all(client);
    let mut attempt = 0u32;
    loop {
        match remove_once(&api, &kube.node, &taint).await {
            Ok(removed) => {
                kube.ok();
                kube.taint_removed.store(true, Ordering::Relaxed);
                if removed {
                    tracing::info!(
                        node = kube.node,
                        taint,
                        "removed the not-ready taint: workload pods may be scheduled here"
                    );
                } else {
                    tracing::debug!(node = kube.node, taint, "the node has no not-ready taint");
                }
                return;
            }
            Err(e) => kube.failed(
                &format!("removing taint {taint} from node {}", kube.node),
                &e,
            ),
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Whether the taint was there (and is now removed).
async fn remove_once(api: &Api<Node>, node: &str, taint: &str) -> Result<bool, kube::Error> {
    let current = api.get(node).await?;
    let taints = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints.iter().filter(|t| t.key != taint).cloned().collect();
    if kept.len() == taints.len() {
        return Ok(false);
    }
    let before = serde_json::to_value(&taints).map_err(kube::Error::SerdeError)?;
    let after = serde_json::to_value(&kept).map_err(kube::Error::SerdeError)?;
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/spec/taints", "value": before},
        {"op": "replace", "path": "/spec/taints", "value": after},
    ]))
    .map_err(kube::Error::SerdeError)?;
    api.patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(true)
}
