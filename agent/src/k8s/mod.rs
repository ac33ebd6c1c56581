//! The Kubernetes API, off the data path: this node's pods (who a caller in a pod is), the
//! EndpointSlices of Services named as endpoints (the backend addresses a pod can dial
//! directly), the node's not-ready taint, and the `Approval` resources of held calls
//! ([`approvals`]).
//!
//! One kube client; kube-runtime watchers list, then watch from the list's resourceVersion,
//! re-list on 410 Gone, resume from the last resourceVersion when a watch ends, and back off
//! on errors. Nothing here blocks the agent: with the API unreachable the agent starts, callers
//! in pods stay unresolved (bindings that need their pod refuse them after `identity_wait_ms`),
//! and `/readyz`, status and metrics say why.
//!
//! Without a cluster (no kubeconfig given, not in a pod) nothing here runs: identity stops at
//! the cgroup and the container.

pub mod approvals;
mod pods;
mod services;
mod taint;

use std::path::PathBuf;
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex,
};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

pub use services::{service_of, Backends, ServiceName};

use crate::identity::Pods;

/// The taint nodes register with and the agent removes once ready, by default.
pub const DEFAULT_TAINT: &str = "mcpwarden.io/agent-not-ready";

/// Whether to talk to a Kubernetes API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// When a kubeconfig is given or the agent runs in a pod (the in-cluster service account):
    /// else not, and nothing fails.
    #[default]
    Auto,
    /// Required: the agent does not start without a client configuration.
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "true" | "on" => Ok(Mode::On),
            "false" | "off" => Ok(Mode::Off),
            _ => Err(format!("{s:?}: expected auto, true or false")),
        }
    }
}

impl<'de> Deserialize<'de> for Mode {
    /// `true`, `false` or `auto`; by hand rather than `untagged`, so that a bad value keeps
    /// its own message and position.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Mode, E> {
                Ok(if v { Mode::On } else { Mode::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Mode, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `kubernetes:` in the config, with `--kubernetes`, `--kubeconfig`, `--node-name` on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// Else: in-cluster (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: `$NODE_NAME`, then the host name).
    pub node_name: Option<String>,
    /// How long a deleted pod's callers are still attributed to it.
    pub deleted_pod_grace: Duration,
    /// The NoSchedule taint removed from this node once the agent is ready (`None`: leave
    /// taints alone).
    pub remove_taint: Option<String>,
    /// Where this node's `Approval` resources are (`None`: the client's default namespace, in a
    /// pod the agent's own).
    pub approvals_namespace: Option<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Auto,
            kubeconfig: None,
            node_name: None,
            deleted_pod_grace: crate::identity::DEFAULT_DELETED_GRACE,
            remove_taint: Some(DEFAULT_TAINT.to_owned()),
            approvals_namespace: None,
        }
    }
}

/// The file's `kubernetes:` mapping.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub enabled: Option<Mode>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    pub deleted_pod_grace_s: Option<u64>,
    /// `""`: leave taints alone.
    pub remove_taint: Option<String>,
    /// `""` or absent: the agent's own namespace.
    pub approvals_namespace: Option<String>,
}

impl FileSettings {
    /// Relative paths are resolved against `base` (the config file's directory).
    pub fn settings(self, base: &std::path::Path) -> Settings {
        let d = Settings::default();
        Settings {
            mode: self.enabled.unwrap_or(d.mode),
            kubeconfig: self.kubeconfig.map(|p| base.join(p)),
            node_name: self.node_name,
            deleted_pod_grace: self
                .deleted_pod_grace_s
                .map_or(d.deleted_pod_grace, Duration::from_secs),
            remove_taint: match self.remove_taint {
                Some(t) if t.is_empty() => None,
                Some(t) => Some(t),
                None => d.remove_taint,
            },
            approvals_namespace: self.approvals_namespace.filter(|n| !n.is_empty()),
        }
    }
}

/// What the API connection is doing, for status, metrics and readiness.
#[derive(Debug, Default)]
pub struct Kube {
    pub node: String,
    /// The pod list has been read completely at least once.
    pods_synced: AtomicBool,
    /// The last request to the API server succeeded.
    connected: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    taint_removed: AtomicBool,
    /// Services whose EndpointSlices have not been listed yet.
    services_pending: std::sync::atomic::AtomicUsize,
    pods: Arc<Pods>,
    backends: Backends,
}

/// [`Kube`] as status and metrics show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub node: String,
    pub connected: bool,
    pub pods_synced: bool,
    pub pods: u64,
    /// Service backend addresses (from EndpointSlices) in the maps.
    pub service_backends: u64,
    pub watch_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    pub taint_removed: bool,
}

impl Kube {
    pub fn report(&self) -> Report {
        Report {
            node: self.node.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            pods_synced: self.pods_synced.load(Ordering::Relaxed),
            pods: self.pods.len() as u64,
            service_backends: self.backends.count() as u64,
            watch_errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            taint_removed: self.taint_removed.load(Ordering::Relaxed),
        }
    }

    /// Why the agent is not ready as far as Kubernetes goes, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if self.pods_synced.load(Ordering::Relaxed) {
            // Until a Service's slices are read, its backends can be dialled around the
            // interceptor: not ready (nor is the taint removed) before.
            return match self.services_pending.load(Ordering::Relaxed) {
                0 => None,
                n => Some(format!(
                    "the EndpointSlices of {n} Service(s) named as endpoints are not read yet{}",
                    self.last_error()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
            };
        }
        Some(match self.last_error() {
            Some(e) => format!("the pod list of node {} is not read yet: {e}", self.node),
            None => format!("reading the pod list of node {}", self.node),
        })
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn ok(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }

    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.connected.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        let text = format!("{what}: {error}");
        tracing::warn!(error = %text, "Kubernetes API; retrying with backoff");
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
    }
}

/// The client configuration `settings` asks for: `None` when there is no cluster to talk to
/// (mode `auto` without a kubeconfig, outside a pod).
pub async fn client_config(settings: &Settings) -> Result<Option<kube::Config>> {
    if settings.mode == Mode::Off {
        return Ok(None);
    }
    if let Some(path) = &settings.kubeconfig {
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("{}: cannot read the kubeconfig", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .with_context(|| format!("{}: unusable kubeconfig", path.display()))?;
        return Ok(Some(config));
    }
    // In a pod: the service account's token and CA, and the API server's address from the
    // environment kubelet sets. A kubeconfig in root's home is not picked up silently.
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return kube::Config::incluster()
            .map(Some)
            .context("in-cluster Kubernetes configuration");
    }
    match settings.mode {
        Mode::On => anyhow::bail!(
            "kubernetes.enabled is true but there is no client configuration: give \
             kubernetes.kubeconfig (--kubeconfig), or run in a pod with a service account"
        ),
        _ => Ok(None),
    }
}

/// This node's name: configured, else `$NODE_NAME` (the downward API), else the host name
/// (kubelet's default).
pub fn node_name(settings: &Settings) -> String {
    settings
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_ascii_lowercase())
                .unwrap_or_default()
        })
}

/// kube's client retries 429/503/504 answers itself, up to 15 times over minutes, before a
/// watcher sees an error: the watchers here back off on their own (`default_backoff`), and an
/// unreachable API server must show in status, metrics and readiness at once.
fn without_client_retries(mut config: kube::Config) -> kube::Config {
    config.default_retry = false;
    config
}

/// What the watches are started with.
pub struct Watches {
    pub config: kube::Config,
    pub settings: Settings,
    pub pods: Arc<Pods>,
    pub backends: Backends,
    /// The Services named as endpoints, by server index.
    pub services: Vec<(usize, ServiceName)>,
    /// The node's held calls: published as `Approval` resources and decided from them (`None`:
    /// no resources; the admin socket still decides).
    pub approvals: Option<Arc<crate::approvals::Approvals>>,
}

/// Starts the watches (pods, EndpointSlices, and with `approvals` the `Approval` resources);
/// they run until the returned tasks are aborted.
pub fn start(w: Watches) -> Result<(Arc<Kube>, Vec<tokio::task::JoinHandle<()>>)> {
    let client = kube::Client::try_from(without_client_retries(w.config))
        .context("building the Kubernetes client")?;
    let node = node_name(&w.settings);
    if node.is_empty() {
        anyhow::bail!("this node's name is unknown: set NODE_NAME or kubernetes.node_name");
    }
    let kube = Arc::new(Kube {
        node: node.clone(),
        pods: w.pods.clone(),
        backends: w.backends.clone(),
        services_pending: w.services.len().into(),
        ..Kube::default()
    });
    tracing::info!(
        node,
        services = w.services.len(),
        "watching this node's pods and the endpoint Services' EndpointSlices"
    );
    let mut tasks = vec![tokio::spawn(pods::watch(
        client.clone(),
        node.clone(),
        w.pods,
        w.settings.deleted_pod_grace,
        kube.clone(),
    ))];
    for (server, service) in w.services {
        tasks.push(tokio::spawn(services::watch(
            client.clone(),
            server,
            service,
            w.backends.clone(),
            kube.clone(),
        )));
    }
    if let Some(registry) = w.approvals {
        let namespace = w
            .settings
            .approvals_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        tasks.extend(approvals::start(client.clone(), namespace, node, registry));
    }
    Ok((kube, tasks))
}

/// Once the agent is ready: removes the configured taint from this node (retrying with
/// backoff until it is gone or absent).
pub fn remove_taint(
    config: kube::Config,
    kube: Arc<Kube>,
    taint: String,
) -> Result<tokio::task::JoinHandle<()>> {
    let client = kube::Client::try_from(without_client_retries(config))
        .context("building the Kubernetes client")?;
    Ok(tokio::spawn(taint::remove(client, kube, taint)))
}

/// Backoff between retries of one-shot requests: 0.5 s doubling to 30 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(30))
}
