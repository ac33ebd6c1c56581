//! Endpoint names → addresses in the endpoint maps.
//!
//! Every configured server URL names a host (a name or an IP literal) and a port. Names are
//! resolved with hickory-resolver (system resolv.conf and /etc/hosts, read again whenever a lookup
//! fails or a name has no address), A and AAAA separately, and each name is resolved again when its TTL runs out. Holes are what matter here,
//! since an address missing from the map is traffic that bypasses the interceptor:
//! - a family whose lookup fails (timeout, SERVFAIL) keeps its previous addresses, and is retried
//!   soon; only an answer ("these records", or "no such records") changes a family's set;
//! - an address that leaves DNS stays in the map for [`GRACE`], because clients with a cached
//!   answer keep dialling it; then it leaves the map.
//!
//! An address that is local — loopback, unspecified, or one of the host's interface addresses —
//! is reached by other spellings too (`0.0.0.0`, the rest of 127.0.0.0/8, `::`, the host's
//! other addresses, IPv4-mapped forms): its port also goes into the local-port map, which the
//! programs match against every local spelling in the caller's namespace. Which namespaces an
//! address means is its server's `scope` (default: `host` for loopback and unspecified
//! addresses, which inside a pod are the pod's own, `all` otherwise).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Result;
use hickory_resolver::{proto::rr::RecordType, TokioResolver};
use mcpwarden_common::{EndpointValue, SockKey, SCOPE_HOST, SCOPE_PODS};
use tokio::time::Instant;

use super::Redirector;

/// Which network namespaces a server's address means (its `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The host's namespace only (and host-network pods).
    Host,
    /// Every namespace but the host's: inside a pod, a loopback address is the pod's own.
    Pods,
    /// Every namespace.
    All,
}

/// Re-resolve no sooner than this, whatever the TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Re-resolve at least this often.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Retry delay after a failed lookup.
const RETRY: Duration = Duration::from_secs(5);
/// How long an address that left DNS stays redirected.
pub const GRACE: Duration = Duration::from_secs(60);

/// A server's origin as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// `scope`, when configured.
    pub scope: Option<Scope>,
}

/// Which namespaces one server at one address covers, as the programs' bit mask.
fn scope_bits(scope: Option<Scope>, ip: IpAddr) -> u32 {
    match scope {
        Some(Scope::Host) => SCOPE_HOST,
        Some(Scope::Pods) => SCOPE_PODS,
        Some(Scope::All) => SCOPE_HOST | SCOPE_PODS,
        None if is_self(ip) => SCOPE_HOST,
        None => SCOPE_HOST | SCOPE_PODS,
    }
}

/// Loopback or unspecified: an address that names whichever namespace dials it.
fn is_self(ip: IpAddr) -> bool {
    SockKey::from_socket_addr(SocketAddr::new(ip, 0)).is_self()
}

/// A server at a destination, and the namespaces it covers there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    server: usize,
    scope: u32,
}

#[derive(Debug, Default)]
struct Table {
    exact: HashMap<SocketAddr, Vec<Route>>,
    /// Ports of local endpoints: any local spelling of that port.
    local: HashMap<u16, Vec<Route>>,
}

/// Destination → indices of the servers configured there. The interceptor reads it for every
/// connection to learn which servers (and so which policies) it may be talking to.
#[derive(Debug, Default)]
pub struct Routes {
    inner: RwLock<Table>,
}

impl Routes {
    /// Servers reachable at `dst` for a caller in the host's namespace (`host`) or another, in
    /// configuration order. `local`: the programs matched `dst` as a local spelling of a local
    /// endpoint's port, so the servers at that port count when none is at `dst` itself.
    pub fn servers_for(&self, dst: SocketAddr, local: bool, host: bool) -> Vec<usize> {
        let want = if host { SCOPE_HOST } else { SCOPE_PODS };
        let Ok(t) = self.inner.read() else {
            return Vec::new();
        };
        let pick = |routes: Option<&Vec<Route>>| -> Vec<usize> {
            routes
                .map(|r| {
                    r.iter()
                        .filter(|r| r.scope & want != 0)
                        .map(|r| r.server)
                        .collect()
                })
                .unwrap_or_default()
        };
        let exact = pick(t.exact.get(&dst));
        if !exact.is_empty() || !local {
            return exact;
        }
        pick(t.local.get(&dst.port()))
    }

    /// Every exact destination with its servers.
    pub fn table(&self) -> Vec<(SocketAddr, Vec<usize>)> {
        self.inner
            .read()
            .map(|t| {
                t.exact
                    .iter()
                    .map(|(d, r)| (*d, r.iter().map(|r| r.server).collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether any endpoint is on a local address (the programs then need each namespace's
    /// addresses).
    pub fn has_local(&self) -> bool {
        self.inner
            .read()
            .map(|t| !t.local.is_empty())
            .unwrap_or(false)
    }

    fn replace(&self, table: Table) {
        if let Ok(mut t) = self.inner.write() {
            *t = table;
        }
    }
}

/// Where resolved endpoints go: the eBPF endpoint maps.
pub trait EndpointSink: Send + Sync {
    /// Make the maps hold exactly `exact` and `local`.
    fn set_endpoints(
        &self,
        exact: &BTreeMap<SockKey, EndpointValue>,
        local: &BTreeMap<u16, EndpointValue>,
    ) -> Result<()>;
}

impl EndpointSink for Redirector {
    fn set_endpoints(
        &self,
        exact: &BTreeMap<SockKey, EndpointValue>,
        local: &BTreeMap<u16, EndpointValue>,
    ) -> Result<()> {
        Redirector::set_endpoints(self, exact, local)
    }
}

/// The host's interface addresses, kept by `netns`: an endpoint on one of them is local.
pub type HostAddrs = Arc<RwLock<BTreeSet<IpAddr>>>;

/// What one family's lookup said.
enum Answer {
    /// These addresses (possibly none: the name has no such records), valid until then.
    Found(Vec<IpAddr>, Instant),
    /// No answer: keep what we had.
    Failed,
}

/// One target's addresses, each with the last time DNS returned it.
#[derive(Debug, Default)]
struct TargetState {
    seen: BTreeMap<IpAddr, Instant>,
    due: Option<Instant>,
}

/// Keeps the endpoint map and [`Routes`] in step with DNS.
pub struct EndpointResolver {
    targets: Vec<Target>,
    resolver: Option<TokioResolver>,
    state: Vec<TargetState>,
    host_addrs: HostAddrs,
    /// Backend addresses of servers configured by Service name (from EndpointSlices).
    backends: crate::k8s::Backends,
}

impl EndpointResolver {
    pub fn new(targets: Vec<Target>, host_addrs: HostAddrs) -> Result<Self> {
        let needs_dns = targets.iter().any(|t| t.host.parse::<IpAddr>().is_err());
        let resolver = if needs_dns {
            Some(TokioResolver::builder_tokio()?.build()?)
        } else {
            None
        };
        let state = targets.iter().map(|_| TargetState::default()).collect();
        Ok(EndpointResolver {
            targets,
            resolver,
            state,
            host_addrs,
            backends: crate::k8s::Backends::default(),
        })
    }

    /// Also publish these Services' backend addresses with their servers' (a change to them
    /// should wake [`EndpointResolver::run`]'s `again`).
    pub fn with_backends(mut self, backends: crate::k8s::Backends) -> Self {
        self.backends = backends;
        self
    }

    /// Names that currently have no address at all (their traffic is not intercepted).
    pub fn unresolved(&self) -> Vec<&str> {
        self.targets
            .iter()
            .zip(&self.state)
            .filter(|(_, s)| s.seen.is_empty())
            .map(|(t, _)| t.host.as_str())
            .collect()
    }

    /// Resolve whatever is due, then publish the map and the routes. Returns when to call again.
    pub async fn refresh(&mut self, sink: &dyn EndpointSink, routes: &Routes) -> Result<Instant> {
        let now = Instant::now();
        // A lookup failed, or a name has no address: read the configuration again.
        let mut reread = false;
        for (target, state) in self.targets.iter().zip(self.state.iter_mut()) {
            if state.due.is_some_and(|due| due > now) {
                continue;
            }
            let mut next = now + MAX_REFRESH;
            match target.host.parse::<IpAddr>() {
                Ok(ip) => {
                    state.seen.insert(ip, now);
                }
                Err(_) => {
                    for family in [RecordType::A, RecordType::AAAA] {
                        match lookup(self.resolver.as_ref(), &target.host, family).await {
                            Answer::Found(addrs, valid_until) => {
                                for ip in &addrs {
                                    state.seen.insert(*ip, now);
                                }
                                let ttl = valid_until.saturating_duration_since(now);
                                next = next.min(now + ttl.clamp(MIN_REFRESH, MAX_REFRESH));
                                // Addresses of this family that DNS stopped returning leave after
                                // the grace period.
                                let family_v4 = family == RecordType::A;
                                state.seen.retain(|ip, last| {
                                    ip.is_ipv4() != family_v4 || now.duration_since(*last) < GRACE
                                });
                            }
                            Answer::Failed => {
                                reread = true;
                                next = next.min(now + RETRY);
                            }
                        }
                    }
                    reread |= state.seen.is_empty();
                    // Wake up when an address in its grace period is due to leave.
                    if let Some(expiry) = state
                        .seen
                        .values()
                        .filter(|t| **t < now)
                        .map(|t| *t + GRACE)
                        .min()
                    {
                        next = next.min(expiry.max(now + Duration::from_millis(100)));
                    }
                }
            }
            state.due = Some(next);
        }
        if reread && self.resolver.is_some() {
            // The retry reads resolv.conf and /etc/hosts afresh: a name added to either since
            // (a node's hosts file, a changed DNS server) is found then.
            match TokioResolver::builder_tokio().and_then(|b| b.build()) {
                Ok(r) => self.resolver = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "re-reading the resolver configuration failed; keeping the previous one")
                }
            }
        }
        self.publish(sink, routes)?;
        Ok(self
            .state
            .iter()
            .filter_map(|s| s.due)
            .min()
            .unwrap_or(now + MAX_REFRESH))
    }

    fn publish(&self, sink: &dyn EndpointSink, routes: &Routes) -> Result<()> {
        let host_addrs = self
            .host_addrs
            .read()
            .map(|a| a.clone())
            .unwrap_or_default();
        let mut table = Table::default();
        let mut exact = BTreeMap::new();
        let mut local = BTreeMap::new();
        fn add<K: Ord>(map: &mut BTreeMap<K, EndpointValue>, key: K, server: usize, scope: u32) {
            let v = map.entry(key).or_insert(EndpointValue {
                server: server as u32,
                scope: 0,
            });
            v.scope |= scope;
        }
        for (i, (target, state)) in self.targets.iter().zip(&self.state).enumerate() {
            let backends = self.backends.of(i);
            let resolved = state
                .seen
                .keys()
                .map(|ip| SocketAddr::new(*ip, target.port));
            let dsts: BTreeSet<SocketAddr> = resolved.chain(backends).map(normalize).collect();
            for dst in dsts {
                let scope = scope_bits(target.scope, dst.ip());
                table
                    .exact
                    .entry(dst)
                    .or_default()
                    .push(Route { server: i, scope });
                add(&mut exact, SockKey::from_socket_addr(dst), i, scope);
                if is_self(dst.ip()) || host_addrs.contains(&dst.ip()) {
                    // Other spellings of a local address reach the same listener: inside a pod
                    // they name the pod itself, so they follow the loopback default.
                    let scope = match target.scope {
                        Some(_) => scope,
                        None => SCOPE_HOST,
                    };
                    let routes = table.local.entry(dst.port()).or_default();
                    if !routes.iter().any(|r| r.server == i) {
                        routes.push(Route { server: i, scope });
                    }
                    add(&mut local, dst.port(), i, scope);
                }
            }
        }
        sink.set_endpoints(&exact, &local)?;
        routes.replace(table);
        Ok(())
    }

    /// Refresh forever (until the task is dropped); `again` publishes at once (the host's
    /// addresses changed).
    pub async fn run(
        mut self,
        redirector: Arc<Redirector>,
        routes: Arc<Routes>,
        again: Arc<tokio::sync::Notify>,
    ) {
        loop {
            let next = match self.refresh(redirector.as_ref(), &routes).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "updating the endpoint map failed");
                    Instant::now() + RETRY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = again.notified() => {}
            }
        }
    }
}

async fn lookup(resolver: Option<&TokioResolver>, host: &str, family: RecordType) -> Answer {
    let Some(resolver) = resolver else {
        return Answer::Failed;
    };
    match resolver.lookup(host, family).await {
        Ok(found) => {
            let addrs: Vec<IpAddr> = found
                .answers()
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .collect();
            tracing::debug!(host, ?family, addresses = ?addrs, "endpoint resolved");
            Answer::Found(addrs, Instant::from_std(found.valid_until()))
        }
        Err(e) if e.is_no_records_found() => {
            Answer::Found(Vec::new(), Instant::now() + MIN_REFRESH)
        }
        Err(e) => {
            tracing::warn!(host, ?family, error = %e, "endpoint lookup failed; keeping the previous addresses");
            Answer::Failed
        }
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 destination they stand for.
pub fn normalize(sa: SocketAddr) -> SocketAddr {
    SockKey::from_socket_addr(sa).to_socket_addr()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Published = (
        BTreeMap<SockKey, EndpointValue>,
        BTreeMap<u16, EndpointValue>,
    );

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Published>>);

    impl EndpointSink for Recorder {
        fn set_endpoints(
            &self,
            exact: &BTreeMap<SockKey, EndpointValue>,
            local: &BTreeMap<u16, EndpointValue>,
        ) -> Result<()> {
            self.0
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .push((exact.clone(), local.clone()));
            Ok(())
        }
    }

    impl Recorder {
        fn last(&self) -> Result<Published> {
            let maps = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            maps.last()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("nothing published"))
        }
    }

    fn key(s: &str) -> Result<SockKey> {
        Ok(SockKey::from_socket_addr(s.parse()?))
    }

    fn target(host: &str, port: u16, scope: Option<Scope>) -> Target {
        Target {
            host: host.into(),
            port,
            scope,
        }
    }

    #[tokio::test]
    async fn literals_and_hosts_file_names_reach_the_map_and_the_routes() -> Result<()> {
        let mut r = EndpointResolver::new(
            vec![
                target("127.0.0.9", 8080, None),
                target("::1", 8081, None),
                // Every Linux host maps localhost in /etc/hosts (to 127.0.0.1, often also to ::1).
                target("localhost", 8082, None),
            ],
            HostAddrs::default(),
        )?;
        let sink = Recorder::default();
        let routes = Routes::default();
        r.refresh(&sink, &routes).await?;
        let (map, local) = sink.last()?;
        assert!(map.contains_key(&key("127.0.0.9:8080")?));
        assert!(map.contains_key(&key("[::1]:8081")?));
        assert!(map.contains_key(&key("127.0.0.1:8082")?), "{map:?}");
        // Loopback endpoints: their ports are local, host-only by default.
        for port in [8080, 8081, 8082] {
            assert_eq!(
                local.get(&port).map(|v| v.scope),
                Some(SCOPE_HOST),
                "{local:?}"
            );
        }
        assert_eq!(
            map.get(&key("127.0.0.9:8080")?).map(|v| v.scope),
            Some(SCOPE_HOST)
        );
        let host = |d: &str, local: bool| -> Result<Vec<usize>> {
            Ok(routes.servers_for(d.parse()?, local, true))
        };
        assert_eq!(host("127.0.0.9:8080", false)?, vec![0]);
        assert_eq!(host("[::1]:8081", false)?, vec![1]);
        assert_eq!(host("127.0.0.1:8082", false)?, vec![2]);
        assert!(host("127.0.0.1:9999", false)?.is_empty());
        // Another spelling of a local endpoint, as the programs flag it.
        assert_eq!(host("0.0.0.0:8080", true)?, vec![0]);
        assert_eq!(host("127.3.2.1:8081", true)?, vec![1]);
        assert!(
            host("0.0.0.0:8080", false)?.is_empty(),
            "only when flagged local"
        );
        // A pod's loopback is the pod's own: not these (host-scoped) servers.
        assert!(routes
            .servers_for("127.0.0.9:8080".parse()?, false, false)
            .is_empty());
        assert!(r.unresolved().is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn scopes_decide_which_namespaces_an_endpoint_means() -> Result<()> {
        let host_addrs = HostAddrs::default();
        host_addrs
            .write()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert("192.0.2.7".parse()?);
        let mut r = EndpointResolver::new(
            vec![
                target("10.9.8.7", 80, None),
                target("127.0.0.1", 81, Some(Scope::Pods)),
                target("10.9.8.6", 82, Some(Scope::Host)),
                target("192.0.2.7", 83, None),
                target("127.0.0.1", 84, Some(Scope::All)),
            ],
            host_addrs,
        )?;
        let sink = Recorder::default();
        let routes = Routes::default();
        r.refresh(&sink, &routes).await?;
        let (map, local) = sink.last()?;
        let scope = |s: &str| -> Result<Option<u32>> { Ok(map.get(&key(s)?).map(|v| v.scope)) };
        let both = SCOPE_HOST | SCOPE_PODS;
        assert_eq!(
            scope("10.9.8.7:80")?,
            Some(both),
            "remote: everywhere by default"
        );
        assert_eq!(scope("127.0.0.1:81")?, Some(SCOPE_PODS));
        assert_eq!(scope("10.9.8.6:82")?, Some(SCOPE_HOST));
        // A host interface address: pods reach it over the network, the host by any local
        // spelling.
        assert_eq!(scope("192.0.2.7:83")?, Some(both));
        assert_eq!(local.get(&83).map(|v| v.scope), Some(SCOPE_HOST));
        assert_eq!(local.get(&81).map(|v| v.scope), Some(SCOPE_PODS));
        assert_eq!(local.get(&84).map(|v| v.scope), Some(both));
        assert!(
            !local.contains_key(&80) && !local.contains_key(&82),
            "{local:?}"
        );
        assert_eq!(
            routes.servers_for("10.9.8.7:80".parse()?, false, false),
            vec![0]
        );
        assert!(routes
            .servers_for("10.9.8.6:82".parse()?, false, false)
            .is_empty());
        assert_eq!(
            routes.servers_for("127.0.0.1:83".parse()?, true, true),
            vec![3]
        );
        assert!(routes
            .servers_for("127.0.0.1:83".parse()?, true, false)
            .is_empty());
        assert_eq!(
            routes.servers_for("127.0.0.1:84".parse()?, false, false),
            vec![4]
        );
        assert!(routes.has_local());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn vanished_addresses_stay_for_the_grace_period_then_leave() -> Result<()> {
        let mut r =
            EndpointResolver::new(vec![target("localhost", 1, None)], HostAddrs::default())?;
        let old: IpAddr = "127.0.0.77".parse()?;
        r.state[0].seen.insert(old, Instant::now());
        let sink = Recorder::default();
        let routes = Routes::default();
        r.refresh(&sink, &routes).await?;
        assert!(
            !routes
                .servers_for(SocketAddr::new(old, 1), false, true)
                .is_empty(),
            "removed at once"
        );
        tokio::time::advance(GRACE + Duration::from_secs(1)).await;
        r.state[0].due = None;
        r.refresh(&sink, &routes).await?;
        assert!(
            routes
                .servers_for(SocketAddr::new(old, 1), false, true)
                .is_empty(),
            "kept after the grace period"
        );
        assert!(!routes
            .servers_for("127.0.0.1:1".parse()?, false, true)
            .is_empty());
        Ok(())
    }
}
