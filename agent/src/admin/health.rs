//! Liveness and readiness: what `/healthz` and `/readyz` (and `mcpwarden health`) answer.
//!
//! Healthy: the process serves (whoever answers is alive). Ready: every check below holds —
//! the programs are attached, the maps hold every endpoint and the served namespaces, every
//! policy file is loaded, and this agent has not handed its listeners over to a successor.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, OnceLock,
};

use serde::{Deserialize, Serialize};

type Unresolved = Box<dyn Fn() -> Vec<String> + Send + Sync>;
type NotReady = Box<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Default)]
struct State {
    attached: AtomicBool,
    policies_loaded: AtomicBool,
    handed_over: AtomicBool,
    /// Endpoints that resolve to no address now (their traffic is not redirected yet).
    unresolved: OnceLock<Unresolved>,
    /// Whether the maps have been written once (endpoints resolved, namespaces served).
    maps_synced: AtomicBool,
    /// With a Kubernetes API: why this node's pods are not known yet, if they are not.
    kubernetes: OnceLock<NotReady>,
}

/// Shared readiness state: cheap to clone, set by the parts that know.
#[derive(Clone, Default)]
pub struct Health(Arc<State>);

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

/// One check of readiness.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What `/readyz` and `mcpwarden health` report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub healthy: bool,
    pub ready: bool,
    pub checks: Vec<Check>,
}

impl Health {
    pub fn policies_loaded(&self) {
        self.0.policies_loaded.store(true, Ordering::Release);
    }

    pub fn attached(&self) {
        self.0.attached.store(true, Ordering::Release);
    }

    pub fn maps_synced(&self) {
        self.0.maps_synced.store(true, Ordering::Release);
    }

    pub fn handed_over(&self) {
        self.0.handed_over.store(true, Ordering::Release);
    }

    /// Where to learn which endpoints resolve to no address now (read at each check).
    pub fn set_unresolved(&self, source: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        let _ = self.0.unresolved.set(Box::new(source));
    }

    /// Where to learn whether this node's pods are known (checked only when set).
    pub fn set_kubernetes(&self, source: impl Fn() -> Option<String> + Send + Sync + 'static) {
        let _ = self.0.kubernetes.set(Box::new(source));
    }

    pub fn check(&self) -> Report {
        let s = &self.0;
        let unresolved = s.unresolved.get().map(|f| f()).unwrap_or_default();
        let flag = |b: &AtomicBool| b.load(Ordering::Acquire);
        let mut checks = vec![
            Check {
                name: "policies".into(),
                ok: flag(&s.policies_loaded),
                detail: if flag(&s.policies_loaded) {
                    "every policy file loaded".into()
                } else {
                    "loading the policy files".into()
                },
            },
            Check {
                name: "maps".into(),
                ok: flag(&s.maps_synced) && unresolved.is_empty(),
                detail: if !flag(&s.maps_synced) {
                    "writing endpoints and namespaces into the maps".into()
                } else if unresolved.is_empty() {
                    "every endpoint and served namespace is in the maps".into()
                } else {
                    format!(
                        "endpoints resolved to no address (not intercepted until they do): {}",
                        unresolved.join(", ")
                    )
                },
            },
            Check {
                name: "programs".into(),
                ok: flag(&s.attached),
                detail: if flag(&s.attached) {
                    "attached".into()
                } else {
                    "not attached yet".into()
                },
            },
            Check {
                name: "active".into(),
                ok: !flag(&s.handed_over),
                detail: if flag(&s.handed_over) {
                    "handed over to a new agent: draining".into()
                } else {
                    "this agent serves the node".into()
                },
            },
        ];
        if let Some(kube) = s.kubernetes.get() {
            let why = kube();
            checks.push(Check {
                name: "kubernetes".into(),
                ok: why.is_none(),
                detail: why.unwrap_or_else(|| "this node's pods are known".into()),
            });
        }
        Report {
            healthy: true,
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_holds() {
        let h = Health::default();
        assert!(h.check().healthy);
        assert!(!h.check().ready);
        h.policies_loaded();
        h.maps_synced();
        assert!(!h.check().ready, "not attached yet");
        h.attached();
        assert!(h.check().ready);
        let missing = Arc::new(std::sync::Mutex::new(vec!["mcp.internal".to_owned()]));
        let source = missing.clone();
        h.set_unresolved(move || source.lock().map(|v| v.clone()).unwrap_or_default());
        let r = h.check();
        assert!(!r.ready);
        assert!(r
            .checks
            .iter()
            .any(|c| c.name == "maps" && !c.ok && c.detail.contains("mcp.internal")));
        missing.lock().unwrap().clear();
        assert!(h.check().ready);
        h.handed_over();
        assert!(!h.check().ready);
    }
}
