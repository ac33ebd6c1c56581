//! Endpoint names → addresses in the endpoint map.
//!
//! Every configured server URL names a host (a name or an IP literal) and a port. Names are
//! resolved with hickory-resolver (system resolv.conf; /etc/hosts as read at start), A and AAAA
//! separately, and each name is resolved again when its TTL runs out. Holes are what matter here,
//! since an address missing from the map is traffic that bypasses the interceptor:
//! - a family whose lookup fails (timeout, SERVFAIL) keeps its previous addresses, and is retried
//!   soon; only an answer ("these records", or "no such records") changes a family's set;
//! - an address that leaves DNS stays in the map for [`GRACE`], because clients with a cached
//!   answer keep dialling it; then it leaves the map.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Result;
use hickory_resolver::{proto::rr::RecordType, TokioResolver};
use mcpwarden_common::{EndpointValue, SockKey};
use tokio::time::Instant;

use super::Redirector;

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
}

/// Destination → indices of the servers configured there. The interceptor reads it for every
/// connection to learn which servers (and so which policies) it may be talking to.
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

    /// Every destination with its servers.
    pub fn table(&self) -> Vec<(SocketAddr, Vec<usize>)> {
        self.inner
            .read()
            .map(|m| m.iter().map(|(d, s)| (*d, s.clone())).collect())
            .unwrap_or_default()
    }

    fn replace(&self, table: HashMap<SocketAddr, Vec<usize>>) {
        if let Ok(mut m) = self.inner.write() {
            *m = table;
        }
    }
}

/// Where resolved endpoints go: the eBPF endpoint map.
pub trait EndpointSink: Send + Sync {
    /// Make the map hold exactly `want`.
    fn set_endpoints(&self, want: &BTreeMap<SockKey, EndpointValue>) -> Result<()>;
}

impl EndpointSink for Redirector {
    fn set_endpoints(&self, want: &BTreeMap<SockKey, EndpointValue>) -> Result<()> {
        Redirector::set_endpoints(self, want)
    }
}

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
}

impl EndpointResolver {
    pub fn new(targets: Vec<Target>) -> Result<Self> {
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
        })
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
                            Answer::Failed => next = next.min(now + RETRY),
                        }
                    }
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
        self.publish(sink, routes)?;
        Ok(self
            .state
            .iter()
            .filter_map(|s| s.due)
            .min()
            .unwrap_or(now + MAX_REFRESH))
    }

    fn publish(&self, sink: &dyn EndpointSink, routes: &Routes) -> Result<()> {
        let mut table: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
        let mut map = BTreeMap::new();
        for (i, (target, state)) in self.targets.iter().zip(&self.state).enumerate() {
            for ip in state.seen.keys() {
                let dst = normalize(SocketAddr::new(*ip, target.port));
                table.entry(dst).or_default().push(i);
                map.entry(SockKey::from_socket_addr(dst))
                    .or_insert(EndpointValue {
                        server: i as u32,
                        _pad: 0,
                    });
            }
        }
        sink.set_endpoints(&map)?;
        routes.replace(table);
        Ok(())
    }

    /// Refresh forever (until the task is dropped).
    pub async fn run(mut self, redirector: Arc<Redirector>, routes: Arc<Routes>) {
        loop {
            let next = match self.refresh(redirector.as_ref(), &routes).await {
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

    #[derive(Default)]
    struct Recorder(Mutex<Vec<BTreeMap<SockKey, EndpointValue>>>);

    impl EndpointSink for Recorder {
        fn set_endpoints(&self, want: &BTreeMap<SockKey, EndpointValue>) -> Result<()> {
            self.0
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .push(want.clone());
            Ok(())
        }
    }

    fn key(s: &str) -> Result<SockKey> {
        Ok(SockKey::from_socket_addr(s.parse()?))
    }

    #[tokio::test]
    async fn literals_and_hosts_file_names_reach_the_map_and_the_routes() -> Result<()> {
        let mut r = EndpointResolver::new(vec![
            Target {
                host: "127.0.0.9".into(),
                port: 8080,
            },
            Target {
                host: "::1".into(),
                port: 8081,
            },
            // Every Linux host maps localhost in /etc/hosts (to 127.0.0.1, often also to ::1).
            Target {
                host: "localhost".into(),
                port: 8082,
            },
        ])?;
        let sink = Recorder::default();
        let routes = Routes::default();
        r.refresh(&sink, &routes).await?;
        let maps = sink.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let map = maps
            .last()
            .ok_or_else(|| anyhow::anyhow!("nothing published"))?;
        assert!(map.contains_key(&key("127.0.0.9:8080")?));
        assert!(map.contains_key(&key("[::1]:8081")?));
        assert!(map.contains_key(&key("127.0.0.1:8082")?), "{map:?}");
        assert_eq!(routes.servers_for("127.0.0.9:8080".parse()?), vec![0]);
        assert_eq!(routes.servers_for("[::1]:8081".parse()?), vec![1]);
        assert_eq!(routes.servers_for("127.0.0.1:8082".parse()?), vec![2]);
        assert!(routes.servers_for("127.0.0.1:9999".parse()?).is_empty());
        assert!(r.unresolved().is_empty());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn vanished_addresses_stay_for_the_grace_period_then_leave() -> Result<()> {
        let mut r = EndpointResolver::new(vec![Target {
            host: "localhost".into(),
            port: 1,
        }])?;
        let old: IpAddr = "127.0.0.77".parse()?;
        r.state[0].seen.insert(old, Instant::now());
        let sink = Recorder::default();
        let routes = Routes::default();
        r.refresh(&sink, &routes).await?;
        assert!(
            !routes.servers_for(SocketAddr::new(old, 1)).is_empty(),
            "removed at once"
        );
        tokio::time::advance(GRACE + Duration::from_secs(1)).await;
        r.state[0].due = None;
        r.refresh(&sink, &routes).await?;
        assert!(
            routes.servers_for(SocketAddr::new(old, 1)).is_empty(),
            "kept after the grace period"
        );
        assert!(!routes.servers_for("127.0.0.1:1".parse()?).is_empty());
        Ok(())
    }
}
