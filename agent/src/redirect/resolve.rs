//! Endpoint names → addresses in the endpoint map.
//!
//! Every configured server URL names a host (a name or an IP literal) and a port. Names are
//! resolved with hickory-resolver (system config plus /etc/hosts), every address goes in the map,
//! and each name is resolved again when its TTL runs out; addresses that disappear leave the map.
//! A failed lookup keeps the previous addresses and retries soon: a DNS blip must not open a hole.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Result;
use hickory_resolver::TokioResolver;
use mcpwarden_common::{EndpointValue, SockKey};
use tokio::time::Instant;

use super::Redirector;

/// Re-resolve no sooner than this, whatever the TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Re-resolve at least this often (also covers /etc/hosts edits).
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Retry delay after a failed lookup.
const RETRY: Duration = Duration::from_secs(5);

/// A server's origin as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

/// Destination → indices of the servers configured there. The interceptor reads it for every
/// request to learn which server (and so which policy) a connection belongs to.
#[derive(Debug, Default)]
pub struct Routes {
    inner: RwLock<HashMap<SocketAddr, Vec<usize>>>,
}

impl Routes {
    /// Servers reachable at `dst`, in configuration order.
    pub fn servers_for(&self, dst: SocketAddr) -> Vec<usize> {
        self.inner
            .read()
            .map(|m| m.get(&dst).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn replace(&self, table: HashMap<SocketAddr, Vec<usize>>) {
        if let Ok(mut m) = self.inner.write() {
            *m = table;
        }
    }
}

/// Keeps the endpoint map and [`Routes`] in step with DNS.
pub struct EndpointResolver {
    targets: Vec<Target>,
    resolver: Option<TokioResolver>,
    /// Per target: current addresses and when to look again.
    state: Vec<(Vec<IpAddr>, Instant)>,
}

impl EndpointResolver {
    pub fn new(targets: Vec<Target>) -> Result<Self> {
        let needs_dns = targets.iter().any(|t| t.host.parse::<IpAddr>().is_err());
        let resolver = if needs_dns {
            Some(TokioResolver::builder_tokio()?.build()?)
        } else {
            None
        };
        let now = Instant::now();
        let state = targets.iter().map(|_| (Vec::new(), now)).collect();
        Ok(EndpointResolver {
            targets,
            resolver,
            state,
        })
    }

    /// Resolve whatever is due, then publish the map and the routes. Returns when to call again.
    pub async fn refresh(&mut self, redirector: &Redirector, routes: &Routes) -> Result<Instant> {
        let now = Instant::now();
        for (i, target) in self.targets.iter().enumerate() {
            if self.state[i].1 > now {
                continue;
            }
            self.state[i] = match target.host.parse::<IpAddr>() {
                Ok(ip) => (vec![ip], now + MAX_REFRESH),
                Err(_) => lookup(self.resolver.as_ref(), &target.host, &self.state[i].0).await,
            };
        }
        let mut table: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
        let mut map = BTreeMap::new();
        for (i, (target, (addrs, _))) in self.targets.iter().zip(&self.state).enumerate() {
            for ip in addrs {
                let dst = normalize(SocketAddr::new(*ip, target.port));
                table.entry(dst).or_default().push(i);
                map.entry(SockKey::from_socket_addr(dst))
                    .or_insert(EndpointValue {
                        server: i as u32,
                        _pad: 0,
                    });
            }
        }
        redirector.set_endpoints(&map)?;
        routes.replace(table);
        Ok(self
            .state
            .iter()
            .map(|(_, due)| *due)
            .min()
            .unwrap_or(now + MAX_REFRESH))
    }

    /// Refresh forever (until the task is dropped).
    pub async fn run(mut self, redirector: Arc<Redirector>, routes: Arc<Routes>) {
        loop {
            let next = match self.refresh(&redirector, &routes).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "updating the endpoint map failed");
                    Instant::now() + RETRY
                }
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

async fn lookup(
    resolver: Option<&TokioResolver>,
    host: &str,
    previous: &[IpAddr],
) -> (Vec<IpAddr>, Instant) {
    let now = Instant::now();
    let Some(resolver) = resolver else {
        return (previous.to_vec(), now + RETRY);
    };
    match resolver.lookup_ip(host).await {
        Ok(found) => {
            let mut addrs: Vec<IpAddr> = found.iter().collect();
            addrs.sort();
            addrs.dedup();
            let ttl = found
                .valid_until()
                .saturating_duration_since(std::time::Instant::now())
                .clamp(MIN_REFRESH, MAX_REFRESH);
            if addrs != previous {
                tracing::info!(host, addresses = ?addrs, "endpoint resolved");
            }
            (addrs, now + ttl)
        }
        Err(e) => {
            tracing::warn!(host, error = %e, "endpoint lookup failed; keeping previous addresses");
            (previous.to_vec(), now + RETRY)
        }
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 destination they stand for.
pub fn normalize(sa: SocketAddr) -> SocketAddr {
    SockKey::from_socket_addr(sa).to_socket_addr()
}
