//! What the admin socket and the metrics listener read of the running agent: the
//! [`admin::Control`](crate::admin::Control) implementation over the parts `app` assembled.
//! Here, not in `admin`, so that `admin` knows no part's internals.

use std::{
    sync::{atomic::Ordering::Relaxed, mpsc, Arc},
    time::{Duration, Instant},
};

use crate::{
    admin::{self, health::Health, status, ExplainQuery, Reloaded},
    audit::{AuditLog, CallerPart, Event, Head, Record},
    config::{Config, FailureMode},
    intercept::Interceptor,
    metrics::{AuditSnapshot, Metrics, Snapshot},
    redirect::{resolve::Routes, Redirector},
    reload::{self, Policies},
};

/// The running agent, as operators see it.
pub struct Control {
    pub config: Config,
    pub started: Instant,
    pub health: Health,
    pub metrics: Arc<Metrics>,
    pub redirector: Arc<Redirector>,
    pub routes: Arc<Routes>,
    pub policies: Arc<Policies>,
    pub audit: Arc<AuditLog>,
    pub interceptor: Arc<Interceptor>,
    pub reloader: std::sync::Mutex<mpsc::Sender<reload::Msg>>,
    pub agent_cgroup: String,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The redirect maps' occupancy, counted at most once a second (each count walks a map).
    pub occupancy: std::sync::Mutex<Option<(Instant, Occupancy)>>,
    /// The Kubernetes API connection, when there is one.
    pub kube: Option<Arc<crate::k8s::Kube>>,
}

type Occupancy = Vec<(&'static str, u64, u64)>;

/// How long a count of the maps' entries is reused.
const OCCUPANCY_FRESH: Duration = Duration::from_secs(1);

/// How long `mcpwarden reload` waits for the reload thread.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

impl Control {
    /// What the metrics listener reads at scrape time besides the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            open_connections: self.interceptor.connections.open() as u64,
            maps: self.occupancy(),
            namespaces: self.redirector.served_netns().len() as u64,
            leaves_minted: self
                .interceptor
                .terminator
                .as_ref()
                .map_or(0, |t| t.leaves.minted()),
            approvals_pending: self.interceptor.approvals.pending_count() as u64,
            audit: audit_snapshot(&self.audit),
            kubernetes: self.kube.as_ref().map(|k| k.report()),
        }
    }

    /// The maps' occupancy, counted again when the last count is older than a second.
    fn occupancy(&self) -> Occupancy {
        let mut cached = self
            .occupancy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some((at, counts)) if at.elapsed() < OCCUPANCY_FRESH => counts.clone(),
            _ => {
                let counts = self.redirector.occupancy();
                *cached = Some((Instant::now(), counts.clone()));
                counts
            }
        }
    }

    /// The servers whose endpoint resolved to no address.
    pub fn unresolved(routes: &Routes, config: &Config) -> Vec<String> {
        let table = routes.table();
        config
            .servers
            .iter()
            .enumerate()
            .filter(|(i, _)| !table.iter().any(|(_, servers)| servers.contains(i)))
            .map(|(_, s)| format!("{} ({})", s.name, s.url.host))
            .collect()
    }
}

fn audit_snapshot(audit: &AuditLog) -> AuditSnapshot {
    let s = audit.stats();
    let mut running = 0;
    let bounds = crate::audit::WRITE_LATENCY_BOUNDS;
    let write_latency = s
        .write_latency_buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            running += b.load(Relaxed);
            (bounds.get(i).copied().unwrap_or(f64::INFINITY), running)
        })
        .collect();
    AuditSnapshot {
        bytes_written: s.bytes_written.load(Relaxed),
        records_written: s.records_written.load(Relaxed),
        write_errors: s.write_errors.load(Relaxed),
        stalls: s.stalls.load(Relaxed),
        unrecorded_forwarded: s.unrecorded_forwarded.load(Relaxed),
        refused_for_stall: s.refused_for_stall.load(Relaxed),
        reopens: s.reopens.load(Relaxed),
        rotations: s.rotations.load(Relaxed),
        write_latency,
        write_latency_sum: s.write_latency_sum_ns.load(Relaxed) as f64 / 1e9,
        write_latency_count: s.write_latency_count.load(Relaxed),
    }
}

impl admin::Control for Control {
    fn status(&self) -> status::Status {
        let c = &self.config;
        let (layout, pinned) = self.redirector.layout();
        let pins = crate::redirect::pin::PinDir::new(&c.bpffs_dir);
        let attach = self.redirector.attach_point();
        let links_pinned = pins
            .links()
            .iter()
            .filter(|(cgroup, _, _)| {
                crate::redirect::cgroup::id_of(attach).is_ok_and(|id| id.to_string() == *cgroup)
            })
            .count();
        let programs = if self
            .health
            .check()
            .checks
            .iter()
            .any(|k| k.name == "programs" && k.ok)
        {
            self.redirector.program_names()
        } else {
            Vec::new()
        };
        let table = self.routes.table();
        let endpoints = c
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| status::Endpoint {
                server: s.name.clone(),
                url: s.url.raw.clone(),
                addresses: table
                    .iter()
                    .filter(|(_, servers)| servers.contains(&i))
                    .map(|(dst, _)| dst.to_string())
                    .collect(),
            })
            .collect();
        let served = self.redirector.served_netns();
        let state = self.audit.sink_state();
        let snap = audit_snapshot(&self.audit);
        status::Status {
            agent: status::AgentInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_secs: self.started.elapsed().as_secs(),
                failure_mode: match c.failure_mode {
                    FailureMode::Closed => "closed",
                    FailureMode::Open => "open",
                }
                .to_owned(),
                config: c.flags.config.as_ref().map(|p| p.display().to_string()),
                state_dir: c.ca.state_dir.display().to_string(),
                admin_socket: c.operate.admin_socket.display().to_string(),
                metrics_listen: self.metrics_listen.map(|a| a.to_string()),
                workers: c.workers,
            },
            health: Some(self.health.check()),
            datapath: status::Datapath {
                attach_cgroup: attach.display().to_string(),
                agent_cgroup: self.agent_cgroup.clone(),
                bpffs_dir: c.bpffs_dir.display().to_string(),
                pinned,
                layout: layout.to_owned(),
                programs,
                links_pinned,
                maps: self
                    .occupancy()
                    .into_iter()
                    .map(|(name, entries, max)| status::MapUse {
                        name: name.to_owned(),
                        entries,
                        max_entries: max,
                    })
                    .collect(),
            },
            endpoints,
            namespaces: status::Namespaces {
                served: served.len(),
                cookies: served
                    .iter()
                    .map(|(cookie, _)| *cookie)
                    .take(status::MAX_NAMESPACES)
                    .collect(),
            },
            policies: self.policies.status(),
            counters: self.policies.usage(status::MAX_COUNTERS),
            audit: status::AuditInfo {
                sink: serde_json::to_value(state.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                path: state
                    .path
                    .map_or_else(|| "-".to_owned(), |p| p.display().to_string()),
                stalled: state.stalled,
                on_stall: serde_json::to_value(state.on_stall)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                bytes_written: snap.bytes_written,
                records_written: snap.records_written,
                write_errors: snap.write_errors,
                stalls: snap.stalls,
            },
            kubernetes: self.kube.as_ref().map(|k| k.report()),
            traffic: status::Traffic {
                open_connections: self.interceptor.connections.open() as u64,
                sse_streams: self.metrics.sse_streams(),
                calls: self
                    .metrics
                    .call_totals()
                    .into_iter()
                    .map(|((server, tool, decision), count)| status::CallCount {
                        server,
                        tool,
                        decision: decision.to_owned(),
                        count,
                    })
                    .collect(),
            },
        }
    }

    fn reload(&self) -> Reloaded {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .reloader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(reload::Msg::ReloadNow(tx));
        if sent.is_err() {
            return Reloaded {
                changed: 0,
                errors: vec!["the reload thread has stopped".into()],
            };
        }
        rx.recv_timeout(RELOAD_WAIT).unwrap_or_else(|_| Reloaded {
            changed: 0,
            errors: vec!["the reload did not finish within 30 s".into()],
        })
    }

    fn explain(&self, q: &ExplainQuery) -> Result<serde_json::Value, String> {
        let engine = self
            .policies
            .engine(q.server.as_deref(), q.policy.as_deref())?;
        let mut question = crate::policy_cli::Question::new(&q.tool, q.arguments.clone())
            .map_err(|e| e.to_string())?;
        for (slot, given) in [
            (&mut question.grant, &q.grant),
            (&mut question.process, &q.process),
            (&mut question.session, &q.session),
            (&mut question.namespace, &q.namespace),
            (&mut question.service_account, &q.service_account),
        ] {
            if let Some(v) = given {
                slot.clone_from(v);
            }
        }
        Ok(question.answer(&engine))
    }

    fn health(&self) -> admin::health::Report {
        self.health.check()
    }

    fn refused(&self, pid: u32, uid: u32, reason: &str) {
        let caller = CallerPart {
            pid: Some(pid),
            uid: Some(uid),
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|s| s.trim_end().to_owned()),
            ..CallerPart::default()
        };
        let rec = Record::new(
            Event::AdminRefused,
            Arc::new(Head::caller(&Arc::new(caller))),
        )
        .because(reason);
        if let Err(e) = self.audit.write(&rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    fn approvals(&self) -> Vec<crate::approvals::Summary> {
        self.interceptor.approvals.list()
    }

    fn decide(
        &self,
        d: &admin::Decide,
        peer: &admin::Peer,
    ) -> Result<crate::approvals::Summary, (u16, String)> {
        use crate::approvals::{Approver, DecideError, Via};
        let remember = match d.for_.as_deref() {
            Some(text) => Some(
                crate::policy::parse_duration(text).map_err(|e| (400, format!("--for: {e}")))?,
            ),
            None => None,
        };
        // The approver's own cgroup and pod, for the self-approval check.
        let mount = crate::redirect::cgroup::cgroup2_mount().ok();
        let dir = mount
            .as_deref()
            .and_then(|m| crate::redirect::cgroup::of_process(m, &peer.pid.to_string()).ok());
        let cgroup_id = dir
            .as_deref()
            .and_then(|d| crate::redirect::cgroup::id_of(d).ok());
        let pod_uid = match (&mount, &dir) {
            (Some(m), Some(d)) => d.strip_prefix(m).ok().and_then(|rel| {
                crate::identity::workload::parse(&format!("/{}", rel.display())).pod_uid
            }),
            _ => None,
        };
        let Some(cgroup_id) = cgroup_id else {
            let why = format!(
                "approval {} refused: the approver's cgroup (pid {}) cannot be read, so it \
                 cannot be told apart from the caller's",
                d.id, peer.pid
            );
            if let Some(summary) = self.interceptor.approvals.get(&d.id) {
                let by = Approver {
                    via: Via::Cli,
                    uid: Some(peer.uid),
                    pid: Some(peer.pid),
                    claimed_as: d.as_.clone(),
                    ..Approver::default()
                };
                self.interceptor
                    .approvals
                    .audit_refused(&summary, &by, &why);
            }
            return Err((403, why));
        };
        let by = Approver {
            via: Via::Cli,
            uid: Some(peer.uid),
            gids: std::iter::once(peer.gid)
                .chain(peer.groups.iter().copied().filter(|g| *g != peer.gid))
                .collect(),
            pid: Some(peer.pid),
            user: None,
            claimed_as: d.as_.clone(),
            cgroup_id: Some(cgroup_id),
            pod_uid,
        };
        match self
            .interceptor
            .approvals
            .decide(&d.id, d.approve, d.reason.clone(), remember, by)
        {
            Ok(summary) => Ok((*summary).clone()),
            // A refused approver is audited by the registry's auditor ([`audit_refused_approver`]).
            Err(e) => Err((
                match &e {
                    DecideError::NotFound(_) => 404,
                    DecideError::SelfApproval(..) => 403,
                    DecideError::Abandoned(_) => 409,
                },
                e.to_string(),
            )),
        }
    }
}

/// An approver refused (in the caller's own workload, or not told apart from it): an
/// `approval` record, step `refused`, naming the call and who tried. The registry's auditor,
/// set at start ([`crate::approvals::Approvals::on_refused`]).
pub fn audit_refused_approver(
    audit: &AuditLog,
    summary: &crate::approvals::Summary,
    by: &crate::approvals::Approver,
    why: &str,
) {
    let caller = CallerPart {
        pid: Some(summary.caller.pid),
        uid: Some(summary.caller.uid),
        comm: Some(summary.caller.comm.clone()),
        cgroup_id: Some(summary.caller.cgroup_id),
        ..CallerPart::default()
    };
    let request = crate::audit::RequestPart {
        server: Some(summary.server.clone()),
        ..crate::audit::RequestPart::default()
    };
    let head = Head {
        request: Some(Arc::new(request)),
        message: Some(crate::audit::MessagePart {
            method: Some("tools/call".to_owned()),
            tool: Some(summary.tool.clone()),
            arg_keys: Some(summary.arg_keys.clone()),
            args_sha256: Some(summary.args_sha256.clone()).filter(|h| !h.is_empty()),
            ..crate::audit::MessagePart::default()
        }),
        ..Head::caller(&Arc::new(caller))
    };
    let mut rec = Record::new(Event::Approval, Arc::new(head)).because(why);
    rec.rule = Some(summary.rule.clone());
    rec.approval = Some(crate::audit::ApprovalPart {
        id: Some(summary.id.clone()),
        step: "refused",
        mode: "operator",
        by: Some(by.clone()),
        remember_s: None,
    });
    if let Err(e) = audit.write(&rec) {
        tracing::error!(error = %e, "writing an audit record failed");
    }
}
