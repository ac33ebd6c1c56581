//! Which policy applies to a request: the caller's facts handed to the policy routing (bindings),
//! waiting a bounded time for pod metadata a binding needs.

use std::sync::Arc;

use super::{conn::Conn, context::Routed};
use crate::identity::PodInfo;
use crate::policy::{
    bindings::{CallerFacts, Choice, PodFacts},
    Decision, Engine,
};

/// The policy chosen for one request.
pub(super) struct Chosen {
    pub engine: Arc<Engine>,
    /// `/bindings/N` when a binding chose it.
    pub binding: Option<String>,
    /// Set when the caller's identity could not be resolved in time: every call is refused
    /// with this decision, and listings are emptied (`engine` then hides everything).
    pub unresolved: Option<Decision>,
    /// The caller's pod, when known.
    pub pod: Option<Arc<PodInfo>>,
    /// The caller runs in a pod (by its cgroup), known or not.
    pub in_pod: bool,
}

impl Conn {
    /// The policy for this caller and server: the first matching binding, else the server's
    /// default. When a binding needs the caller's pod metadata and it is not known, waits for
    /// it up to `identity_wait_ms`, then refuses: never another policy in its place.
    pub(super) async fn choose_policy(&self, routed: Routed<'_>) -> Chosen {
        let caller = &self.caller;
        let is_pod = caller.workload.pod_uid.is_some()
            || caller
                .cgroup
                .as_deref()
                .is_some_and(crate::policy::bindings::is_pod_cgroup);
        let mut deadline = None;
        loop {
            let changed = self.shared.pods.changed();
            let routing = self.shared.routing.load();
            // Looked up per request (a hash look-up once the cgroup is cached), so that a change
            // to the pod (its labels) applies to connections already open; the pod known at
            // accept stands in once a deleted pod's grace period is over.
            let pod = self
                .shared
                .pods
                .lookup(caller.cgroup_id, &caller.workload)
                .or_else(|| caller.pod.clone());
            if let Some(pod) = &pod {
                // Learnt while this connection was open: its records name the pod from now on.
                self.who.pod.set(pod);
            }
            let facts = CallerFacts {
                uid: caller.uid,
                comm: &caller.comm,
                cgroup: caller.cgroup.as_deref(),
                pod: match (&pod, is_pod) {
                    (Some(p), _) => PodFacts::Known(&p.meta),
                    (None, true) => PodFacts::Pending,
                    (None, false) => PodFacts::NotAPod,
                },
            };
            let binding = match routing.choose(routed.id, &routed.server.name, &facts) {
                Choice::Engine { engine, binding } => {
                    return Chosen {
                        engine,
                        binding: binding.map(|b| format!("/bindings/{b}")),
                        unresolved: None,
                        pod,
                        in_pod: is_pod,
                    }
                }
                Choice::Unresolved { binding } => binding,
            };
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + routing.identity_wait);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let unresolved = routing.unresolved(binding);
                tracing::warn!(
                    cgroup = caller.cgroup.as_deref().unwrap_or(""),
                    binding = unresolved.rule,
                    "caller identity unresolved: its calls are refused"
                );
                return Chosen {
                    engine: crate::policy::bindings::unresolved_engine(),
                    binding: Some(unresolved.rule.clone()),
                    unresolved: Some(unresolved),
                    pod: None,
                    in_pod: is_pod,
                };
            }
        }
    }
}
