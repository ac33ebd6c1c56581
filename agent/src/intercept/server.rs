//! What every connection shares: the configured servers, the routes to them, TLS termination,
//! the sessions, the policy routing and the audit log.

use std::{os::fd::BorrowedFd, sync::Arc};

use arc_swap::ArcSwap;

use super::{
    session::{ParamTable, Sessions},
    tls::{Leaves, Protocols},
    upstream::TlsClient,
};
use crate::{
    audit::AuditLog,
    ca::LeafName,
    identity,
    netns::Netns,
    policy::bindings::Routing,
    redirect::{resolve::Routes, Redirected},
};

/// Where accepted connections learn their original destination and caller. Implemented by
/// `redirect::Redirector` (the eBPF map, keyed by the accepted socket's cookie); a connection
/// without a record is refused.
pub trait OrigDst: Send + Sync + 'static {
    fn take(&self, accepted: BorrowedFd<'_>) -> Option<Redirected>;
}

impl OrigDst for crate::redirect::Redirector {
    fn take(&self, accepted: BorrowedFd<'_>) -> Option<Redirected> {
        crate::redirect::Redirector::take(self, &accepted)
    }
}

/// One configured MCP server as the interceptor needs it.
pub struct Server {
    pub name: String,
    /// Normalised endpoint path.
    pub path: String,
    /// `https://` servers.
    pub tls: Option<ServerTls>,
    /// `host:port` as configured, lower case: an origin an HTTP+SSE endpoint may name.
    pub origin: String,
    /// The configured host, lower case, without brackets: what Host must name on plaintext.
    pub host: String,
    /// Other spellings of `host` clients may use: a Service's short names (`tools.mcp`,
    /// `tools.mcp.svc`), accepted in SNI and Host.
    pub aliases: Vec<String>,
    pub port: u16,
    /// `passthrough_paths`, normalised: where a body that is not JSON-RPC may be forwarded.
    pub passthrough_paths: Vec<String>,
    /// `Mcp-Param-*` designations learnt from this server's listings.
    pub params: Arc<ParamTable>,
}

impl Server {
    /// Whether `name` (a Host's host or an SNI) names this server: its host or an alias.
    pub fn is_named(&self, name: &str) -> bool {
        self.host.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// How an `https://` server is reached.
pub struct ServerTls {
    /// The configured host, lower case: the SNI its clients send.
    pub host: String,
    /// Forward untouched instead of terminating.
    pub passthrough: bool,
    /// Verifies the server (system roots plus its `upstream_ca`).
    pub client: Arc<TlsClient>,
}

/// TLS termination: the minted leaves and what each server speaks.
pub struct Terminator {
    pub leaves: Leaves,
    pub(super) protocols: Arc<Protocols>,
}

impl Terminator {
    pub fn new(leaves: Leaves) -> Terminator {
        Terminator {
            leaves,
            protocols: Arc::default(),
        }
    }

    /// Learn what each configured https origin at its resolved addresses speaks, as seen from
    /// `netns` (the host's), and mint its leaf, before clients ask: their first handshakes then
    /// wait for neither.
    /// Returns how many origins were warmed.
    pub async fn prewarm(&self, servers: &[Server], routes: &Routes, netns: &Arc<Netns>) -> usize {
        let mut origins = 0;
        for (dst, indices) in routes.table() {
            for s in indices.iter().filter_map(|&i| servers.get(i)) {
                let Some(tls) = s.tls.as_ref().filter(|t| !t.passthrough) else {
                    continue;
                };
                // Clients of a server configured by address send no SNI.
                let (sni, name) = match tls.host.parse::<std::net::IpAddr>() {
                    Ok(_) => (None, LeafName::Ip(dst.ip())),
                    Err(_) => (Some(tls.host.as_str()), LeafName::Dns(tls.host.clone())),
                };
                tokio::join!(
                    self.protocols.learn(netns, dst, sni, &tls.client),
                    self.leaves.warm(&name)
                );
                origins += 1;
            }
        }
        origins
    }
}

/// Everything shared by all connections.
pub struct Interceptor {
    /// A server's index in this list is its id everywhere (sessions, TLS pools, routes).
    pub servers: Vec<Server>,
    pub routes: Arc<Routes>,
    pub orig_dst: Arc<dyn OrigDst>,
    /// Names callers (process, cgroup) on the workers.
    pub identity: Arc<identity::Resolver>,
    pub audit: Arc<AuditLog>,
    pub max_body: usize,
    /// `limits:` of the config.
    pub limits: crate::config::Limits,
    /// Connections being served, in total and per caller (cgroup id).
    pub connections: Arc<super::limits::Connections>,
    /// Refusals a flood repeats, written once a second per caller.
    pub repeats: super::limits::Repeats,
    /// Present when some server is `https://` and terminated.
    pub terminator: Option<Arc<Terminator>>,
    /// MCP sessions, shared by every worker.
    pub sessions: Arc<Sessions>,
    /// Which policy applies to which caller; swapped whole on reload.
    pub routing: Arc<ArcSwap<Routing>>,
    /// Pod metadata of callers, for bindings that select on it.
    pub pods: Arc<identity::Pods>,
    /// Set after a hand-over: connections finish and close.
    pub drain: Arc<super::drain::Drain>,
    /// Decision time and SSE streams (the rest is counted from the audit records).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Calls held for an operator's approval.
    pub approvals: Arc<crate::approvals::Approvals>,
    /// Calls approved by their client's user (2026-07-28): the node's key, spent nonces.
    pub user_approvals: Arc<crate::approvals::user::UserApprovals>,
}
