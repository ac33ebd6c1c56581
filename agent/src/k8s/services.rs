//! Services named as endpoints: a pod can dial a Service's backend pods directly (their IPs
//! are in EndpointSlices anyone in the namespace can read), so a server configured by its
//! Service name also covers its backends' addresses. One watch per Service, of the
//! EndpointSlices labelled `kubernetes.io/service-name=SVC` in its namespace; the addresses go
//! into the endpoint maps with the server's (`crate::redirect::resolve`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::Kube;

/// The label naming who made an EndpointSlice, and the value of Kubernetes' own controller.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// A Service, from an endpoint host `SVC.NS.svc.cluster.local` or `SVC.NS.svc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
    /// The port the endpoint URL names (the Service's port).
    pub port: u16,
}

/// The Service an endpoint host names, if it is one (`SVC.NS.svc[.cluster.local]`).
pub fn service_of(host: &str, port: u16) -> Option<ServiceName> {
    let host = host.to_ascii_lowercase();
    let rest = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))?;
    let (name, namespace) = rest.split_once('.')?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (label(name) && label(namespace)).then(|| ServiceName {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        port,
    })
}

/// One server's backend addresses, by EndpointSlice name.
type Slices = BTreeMap<String, BTreeSet<SocketAddr>>;

/// Backend addresses of the Services, by server index and EndpointSlice name; a change wakes
/// the endpoint resolver, which publishes them with the DNS-resolved addresses.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    inner: Arc<RwLock<BTreeMap<usize, Slices>>>,
    changed: Arc<Notify>,
}

impl Backends {
    /// Wakes `notify` on every change.
    pub fn new(notify: Arc<Notify>) -> Backends {
        Backends {
            inner: Arc::default(),
            changed: notify,
        }
    }

    /// Every backend address of server `server`.
    pub fn of(&self, server: usize) -> BTreeSet<SocketAddr> {
        self.inner
            .read()
            .map(|m| {
                m.get(&server)
                    .map(|slices| slices.values().flatten().copied().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Backend addresses over all servers.
    pub fn count(&self) -> usize {
        self.inner
            .read()
            .map(|m| m.values().flat_map(|s| s.values()).map(BTreeSet::len).sum())
            .unwrap_or(0)
    }

    fn set(&self, server: usize, slice: &str, addrs: BTreeSet<SocketAddr>) {
        if let Ok(mut m) = self.inner.write() {
            let slices = m.entry(server).or_default();
            if slices.get(slice) == Some(&addrs) {
                return;
            }
            if addrs.is_empty() {
                slices.remove(slice);
            } else {
                slices.insert(slice.to_owned(), addrs);
            }
        }
        self.changed.notify_one();
    }

    /// After a re-list: slices not listed are gone.
    fn keep_only(&self, server: usize, listed: &BTreeSet<String>) {
        if let Ok(mut m) = self.inner.write() {
            if let Some(slices) = m.get_mut(&server) {
                slices.retain(|name, _| listed.contains(name));
            }
        }
        self.changed.notify_one();
    }
}

pub(super) async fn watch(
    client: Client,
    server: usize,
    service: ServiceName,
    backends: Backends,
    kube: Arc<Kube>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    // Only slices Kubernetes' own controller made from the Service's selector: a slice anyone
    // with write access to the namespace hand-made could otherwise point every node's
    // interceptor at any address (the API server's, say).
    let config = watcher::Config::default().labels(&format!(
        "kubernetes.io/service-name={},{MANAGED_BY}={CONTROLLER}",
        service.name
    ));
    let mut synced = false;
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(slice)) | Ok(watcher::Event::Apply(slice)) => {
                kube.ok();
                let name = slice.metadata.name.clone().unwrap_or_default();
                if let Some(seen) = listing.as_mut() {
                    seen.insert(name.clone());
                }
                let addrs = addresses(&slice, &service);
                tracing::debug!(service = service.name, slice = name, addresses = ?addrs, "EndpointSlice");
                backends.set(server, &name, addrs);
            }
            Ok(watcher::Event::InitDone) => {
                kube.ok();
                if let Some(seen) = listing.take() {
                    backends.keep_only(server, &seen);
                }
                if !std::mem::replace(&mut synced, true) {
                    kube.services_pending
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(watcher::Event::Delete(slice)) => {
                kube.ok();
                let name = slice.metadata.name.clone().unwrap_or_default();
                backends.set(server, &name, BTreeSet::new());
            }
            Err(e) => kube.failed(
                &format!(
                    "watching the EndpointSlices of Service {}/{}",
                    service.namespace, service.name
                ),
                &e,
            ),
        }
    }
}

/// The backend addresses of a slice: every endpoint's addresses (ready or not: a pod can dial
/// one that is not ready, and an address missing from the maps is a way around the
/// interceptor) at the slice's TCP ports. A slice with several ports cannot say which one the
/// Service's port maps to (that is in the Service, which the agent does not read): the port
/// equal to the URL's is taken when there is one, else every TCP port.
fn addresses(slice: &EndpointSlice, service: &ServiceName) -> BTreeSet<SocketAddr> {
    let tcp: Vec<u16> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
        .collect();
    let ports = match tcp.as_slice() {
        [] => return BTreeSet::new(),
        [one] => vec![*one],
        many if many.contains(&service.port) => vec![service.port],
        many => many.to_vec(),
    };
    slice
        .endpoints
        .iter()
        // Pods only: the controller names each endpoint's pod.
        .filter(|e| {
            e.target_ref
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("Pod"))
        })
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .flat_map(|ip| ports.iter().map(move |p| SocketAddr::new(ip, *p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_hosts_are_recognised() {
        let s = service_of("tools.mcp.svc.cluster.local", 8080).expect("a service");
        assert_eq!((s.name.as_str(), s.namespace.as_str()), ("tools", "mcp"));
        assert!(service_of("Tools.MCP.svc", 80).is_some());
        assert_eq!(service_of("mcp.example.com", 443), None);
        assert_eq!(service_of("a.b.c.svc.cluster.local", 443), None);
        assert_eq!(service_of("10.0.0.1", 80), None);
        assert_eq!(service_of(".mcp.svc", 80), None);
    }

    #[test]
    fn backends_are_every_address_at_the_right_port() -> Result<(), serde_json::Error> {
        let service = service_of("tools.mcp.svc", 8080).expect("a service");
        let slice = |ports: serde_json::Value| -> Result<EndpointSlice, serde_json::Error> {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "tools-abc"}, "addressType": "IPv4", "ports": ports,
                "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "a"}},
                              {"addresses": ["10.1.0.6"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "b"}},
                              {"addresses": ["10.96.0.1"], "conditions": {"ready": true}}]}))
        };
        let one = addresses(
            &slice(serde_json::json!([{"port": 9000, "protocol": "TCP"}]))?,
            &service,
        );
        assert_eq!(
            one.into_iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.1.0.5:9000", "10.1.0.6:9000"]
        );
        let two = addresses(
            &slice(
                serde_json::json!([{"port": 9000}, {"port": 8080}, {"port": 53, "protocol": "UDP"}]),
            )?,
            &service,
        );
        assert!(two.iter().all(|a| a.port() == 8080), "{two:?}");
        Ok(())
    }
}
