//! One accepted connection: where it was going, who made it, the servers it may be for, and the
//! caller part of every audit record it produces (built once, shared by all of them).

use std::{net::SocketAddr, sync::Arc};

use super::{
    server::{Interceptor, Server},
    upstream::{TlsClient, Upstream},
};
use crate::{
    audit::{CallerPart, Event, Head, Record, Refusal, Tls, WorkerAudit},
    identity::Caller,
    netns::Netns,
};

/// Per accepted connection.
pub(super) struct Conn {
    /// Unique within this agent's run: the `session` limit key of revisions without sessions.
    pub id: u64,
    pub shared: Arc<Interceptor>,
    /// The original destination.
    pub dst: SocketAddr,
    pub caller: Caller,
    /// The network namespace the connection was made in: its upstream is dialled from there.
    pub netns: Arc<Netns>,
    /// Ids (indices into `shared.servers`) of the servers configured at the destination (for
    /// TLS: those whose name the SNI is).
    pub servers: Vec<usize>,
    /// The upstream pool of the worker serving this connection.
    pub upstream: Arc<Upstream>,
    /// The audit writer of that worker.
    pub audit: Arc<WorkerAudit>,
    /// Set on TLS-terminated connections.
    pub tls: Option<TlsSession>,
    /// The caller part of this connection's records.
    pub who: Arc<CallerPart>,
    /// Request body bytes buffered now, over all of this connection's requests.
    pub buffered: std::sync::atomic::AtomicUsize,
}

/// A terminated TLS connection.
pub(super) struct TlsSession {
    pub sni: Option<String>,
    pub h2: bool,
    /// The id of the server whose trust roots verify the upstream.
    pub server: usize,
    pub client: Arc<TlsClient>,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        shared: Arc<Interceptor>,
        dst: SocketAddr,
        caller: Caller,
        netns: Arc<Netns>,
        servers: Vec<usize>,
        upstream: Arc<Upstream>,
        audit: Arc<WorkerAudit>,
    ) -> Conn {
        let who = Arc::new(caller_part(dst, &caller, &netns, None, None));
        Conn {
            id,
            shared,
            dst,
            caller,
            netns,
            servers,
            upstream,
            audit,
            tls: None,
            who,
            buffered: Default::default(),
        }
    }

    pub fn server_at(&self, id: usize) -> Option<&Server> {
        self.shared.servers.get(id)
    }

    /// The servers configured at the destination, with their ids.
    pub fn servers_here(&self) -> impl Iterator<Item = (usize, &Server)> + '_ {
        self.servers
            .iter()
            .filter_map(|&i| self.server_at(i).map(|s| (i, s)))
    }

    /// (any plaintext server, any https server) at this destination.
    pub fn schemes(&self) -> (bool, bool) {
        (
            self.servers_here().any(|(_, s)| s.tls.is_none()),
            self.servers_here().any(|(_, s)| s.tls.is_some()),
        )
    }

    /// The connection is TLS-terminated from now on: its records say so, with the SNI.
    pub fn terminated(&mut self, session: TlsSession) {
        self.who = Arc::new(CallerPart {
            pod: self.who.pod.clone(),
            ..caller_part(
                self.dst,
                &self.caller,
                &self.netns,
                session.sni.clone(),
                Some(Tls::Terminated),
            )
        });
        self.tls = Some(session);
    }

    /// A record about this connection as a whole.
    pub fn record(&self, event: Event) -> Record {
        Record::new(event, Arc::new(Head::caller(&self.who)))
    }

    /// A record about this connection with another SNI and TLS mode (the handshake's).
    pub fn tls_record(&self, event: Event, sni: Option<String>, tls: Tls) -> Record {
        let who = Arc::new(caller_part(
            self.dst,
            &self.caller,
            &self.netns,
            sni,
            Some(tls),
        ));
        Record::new(event, Arc::new(Head::caller(&who)))
    }

    /// Audit a connection refused before any HTTP was read (it is then closed).
    pub fn refuse_connection(&self, sni: Option<String>, reason: String) {
        self.write_audit(
            &self
                .tls_record(Event::Refused, sni, Tls::Terminated)
                .denied(reason)
                .kind(Refusal::Tls),
        );
    }

    /// A refusal a flood repeats (`kind`): written at most once a second for this caller,
    /// carrying how many went unwritten since.
    pub fn audit_repeated(&self, kind: &'static str, mut rec: Record) {
        let now = std::time::Instant::now();
        if let Some(skipped) = self.shared.repeats.admit(kind, self.caller.cgroup_id, now) {
            rec.repeats = (skipped > 0).then_some(skipped);
            self.write_audit(&rec);
        }
    }

    /// Best-effort immediate write for records that gate nothing but should not wait (refusals).
    pub fn write_audit(&self, rec: &Record) {
        if let Err(e) = self.audit.write(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    /// `response` records: carried by the worker's next write, at most a few ms later.
    pub fn write_audit_deferred(&self, rec: &Record) {
        if let Err(e) = self.audit.write_deferred(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }
}

/// The caller part of a record: who, from which namespace, going where, over what.
pub(super) fn caller_part(
    dst: SocketAddr,
    caller: &Caller,
    netns: &Netns,
    sni: Option<String>,
    tls: Option<Tls>,
) -> CallerPart {
    CallerPart {
        sni,
        tls,
        ..CallerPart::of(caller, Some(dst), Some(netns.ino))
    }
}

/// A connection to `dst` from this test process, with `servers` configured there, for the unit
/// tests of the stages (no socket, no eBPF).
#[cfg(test)]
pub(super) mod rig {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::{Conn, Server};
    use crate::{
        audit::{AuditLog, WorkerAudit},
        identity::{Caller, Resolver},
        intercept::{server::Interceptor, upstream::Upstream, OrigDst},
        policy::bindings::Routing,
        redirect::Redirected,
    };

    struct NoRecords;

    impl OrigDst for NoRecords {
        fn take(&self, _: std::os::fd::BorrowedFd<'_>) -> Option<Redirected> {
            None
        }
    }

    pub fn server(name: &str, path: &str) -> Server {
        Server {
            name: name.into(),
            path: path.into(),
            tls: None,
            origin: format!("{name}:80"),
            host: name.into(),
            aliases: Vec::new(),
            port: 80,
            passthrough_paths: Vec::new(),
            params: Arc::default(),
        }
    }

    pub fn conn(dst: &str, servers: Vec<Server>) -> Conn {
        let log = Arc::new(AuditLog::open(std::path::Path::new("-")).expect("stdout sink"));
        let ids = (0..servers.len()).collect();
        let shared = Arc::new(Interceptor {
            servers,
            routes: Arc::default(),
            orig_dst: Arc::new(NoRecords),
            identity: Arc::new(Resolver::new(std::path::Path::new("/")).expect("open /")),
            audit: log.clone(),
            max_body: 1 << 20,
            limits: crate::config::Limits {
                audit_path_bytes: 64,
                ..crate::config::Limits::default()
            },
            connections: Default::default(),
            repeats: Default::default(),
            terminator: None,
            sessions: Arc::default(),
            routing: Arc::new(ArcSwap::from_pointee(Routing {
                defaults: Vec::new(),
                bindings: Vec::new(),
                identity_wait: std::time::Duration::ZERO,
            })),
            pods: Arc::default(),
            drain: Arc::default(),
            metrics: Arc::new(crate::metrics::Metrics::new(
                1,
                Vec::new(),
                &[],
                crate::admin::health::Health::default(),
            )),
            approvals: crate::approvals::Approvals::new(Default::default()),
            user_approvals: Arc::new(crate::approvals::user::UserApprovals::with_key(&[1; 32])),
        });
        let caller = Caller {
            pid: 4242,
            uid: 1000,
            gid: 1000,
            comm: "agent".into(),
            cgroup_id: 7,
            cgroup: Some("/apps/agent".into()),
            workload: Default::default(),
            pod: None,
        };
        Conn::new(
            1,
            shared,
            dst.parse().expect("a socket address"),
            caller,
            Arc::new(crate::netns::Netns::own().expect("the test's own network namespace")),
            ids,
            Arc::new(Upstream::new()),
            WorkerAudit::new(log),
        )
    }
}
