//! Counters for Prometheus, kept off the hot path's locks.
//!
//! Most of what the agent counts it already says in an audit record: every decision, refusal,
//! answer, reload. [`Metrics`] is an [`audit::Observer`](crate::audit::Observer): it sees each
//! record as it is written and counts it, so a metric can never disagree with the log. The
//! rest (decision time, SSE streams) is counted where it happens.
//!
//! Every counter is a relaxed atomic in a per-worker shard (a worker thread writes its own
//! shard, other threads shard 0): no lock, no shared cache line between workers. A scrape sums
//! the shards. The `tool` label holds only names some loaded policy lists literally, everything
//! else is `other`, so callers cannot grow the series count; the name table is swapped whole
//! when policies reload (readers load an `Arc`), and the counts of an earlier table are kept and
//! summed by label, so counters never go back.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::audit::{Event, Record, Refusal, Verdict};

/// The `tool` label of every name no policy lists.
pub const OTHER: &str = "other";

/// Decision-time buckets (seconds): a decision is microseconds.
const DECISION_BOUNDS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
];
/// Call-latency buckets (seconds): from the client's request to the server's answer.
const CALL_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const DECISIONS: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::RequireApproval];

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
        Verdict::RequireApproval => 2,
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::RequireApproval => "require_approval",
    }
}

thread_local! {
    /// The shard this thread counts into (workers set theirs; everyone else uses 0).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Count this thread's metrics in shard `index` (interceptor worker `index - 1`).
pub fn set_shard(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// A histogram of fixed buckets, each an atomic: `observe` takes no lock.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Not cumulative; the last is +Inf.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// Sums of several histograms with the same bounds, as the encoder wants them.
struct Merged {
    sum: f64,
    count: u64,
    cumulative: Vec<(f64, u64)>,
}

fn merge<'a>(bounds: &[f64], hs: impl Iterator<Item = &'a Histogram>) -> Merged {
    let mut counts = vec![0u64; bounds.len() + 1];
    let mut sum_ns = 0u64;
    for h in hs {
        for (c, b) in counts.iter_mut().zip(h.buckets.iter()) {
            *c += b.load(Relaxed);
        }
        sum_ns = sum_ns.saturating_add(h.sum_ns.load(Relaxed));
    }
    let mut running = 0;
    let mut cumulative = Vec::with_capacity(counts.len());
    for (i, c) in counts.iter().enumerate() {
        running += c;
        cumulative.push((bounds.get(i).copied().unwrap_or(f64::INFINITY), running));
    }
    Merged {
        sum: sum_ns as f64 / 1e9,
        count: running,
        cumulative,
    }
}

/// What one worker counts outside the call table.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    refusals: [AtomicU64; Refusal::ALL.len()],
    decision_time: Histogram,
    call_latency: Histogram,
    sse_streams: AtomicI64,
    unprepared_netns: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    preexisting_reset: AtomicU64,
    admin_refused: AtomicU64,
    /// `approval` records, by step ([`APPROVAL_STEPS`]).
    approvals: [AtomicU64; APPROVAL_STEPS.len()],
}

/// The steps of an approval, as `approval` records name them.
const APPROVAL_STEPS: [&str; 7] = [
    "requested",
    "approved",
    "denied",
    "timed_out",
    "abandoned",
    "remembered",
    "refused",
];

impl Shard {
    fn new() -> Shard {
        Shard {
            refusals: Default::default(),
            decision_time: Histogram::new(DECISION_BOUNDS),
            call_latency: Histogram::new(CALL_BOUNDS),
            sse_streams: AtomicI64::new(0),
            unprepared_netns: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            preexisting_reset: AtomicU64::new(0),
            admin_refused: AtomicU64::new(0),
            approvals: Default::default(),
        }
    }
}

/// The label table of the calls counter and its cells: `server × tool × decision` per shard.
#[derive(Debug)]
struct CallTable {
    servers: Vec<String>,
    server_index: HashMap<String, usize>,
    /// Index 0 is [`OTHER`].
    tools: Vec<String>,
    tool_index: HashMap<String, usize>,
    shards: usize,
    cells: Box<[AtomicU64]>,
}

impl CallTable {
    fn new(servers: &[String], tools: &[String], shards: usize) -> CallTable {
        let mut names = vec![OTHER.to_owned()];
        names.extend(tools.iter().filter(|t| t.as_str() != OTHER).cloned());
        // The server label: each configured server, and "" for a record naming none.
        let mut server_names = vec![String::new()];
        server_names.extend(servers.iter().cloned());
        let n = shards * server_names.len() * names.len() * DECISIONS.len();
        CallTable {
            server_index: server_names
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i))
                .collect(),
            servers: server_names,
            tool_index: names
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            tools: names,
            shards,
            cells: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn cell(
        &self,
        shard: usize,
        server: usize,
        tool: usize,
        decision: usize,
    ) -> Option<&AtomicU64> {
        let i = ((shard % self.shards * self.servers.len() + server) * self.tools.len() + tool)
            * DECISIONS.len()
            + decision;
        self.cells.get(i)
    }

    fn count(&self, server: Option<&str>, tool: &str, decision: Verdict) {
        let s = self
            .server_index
            .get(server.unwrap_or(""))
            .copied()
            .unwrap_or(0);
        let t = self.tool_index.get(tool).copied().unwrap_or(0);
        let shard = SHARD.with(Cell::get);
        if let Some(c) = self.cell(shard, s, t, verdict_index(decision)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Every non-zero count by `(server, tool, decision)`, summed over shards.
    fn totals(&self, into: &mut BTreeMap<(String, String, &'static str), u64>) {
        for shard in 0..self.shards {
            for (s, server) in self.servers.iter().enumerate() {
                for (t, tool) in self.tools.iter().enumerate() {
                    for (d, decision) in DECISIONS.iter().enumerate() {
                        let n = self.cell(shard, s, t, d).map_or(0, |c| c.load(Relaxed));
                        if n > 0 {
                            *into
                                .entry((server.clone(), tool.clone(), verdict_name(*decision)))
                                .or_default() += n;
                        }
                    }
                }
            }
        }
    }
}

/// Gauges and counters read from other parts of the agent at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub open_connections: u64,
    /// `(map, entries, max_entries)` of the redirect maps.
    pub maps: Vec<(&'static str, u64, u64)>,
    pub namespaces: u64,
    pub leaves_minted: u64,
    /// Calls held for an approval.
    pub approvals_pending: u64,
    pub audit: AuditSnapshot,
    /// With a Kubernetes API.
    pub kubernetes: Option<crate::k8s::Report>,
}

/// The audit sink's counters, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct AuditSnapshot {
    pub bytes_written: u64,
    pub records_written: u64,
    pub write_errors: u64,
    pub stalls: u64,
    pub unrecorded_forwarded: u64,
    pub refused_for_stall: u64,
    pub reopens: u64,
    pub rotations: u64,
    /// `(upper bound in seconds, cumulative count)`, the last +Inf; with sum (s) and count.
    pub write_latency: Vec<(f64, u64)>,
    pub write_latency_sum: f64,
    pub write_latency_count: u64,
}

type Source = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// The agent's metrics.
pub struct Metrics {
    shards: Box<[Shard]>,
    servers: Vec<String>,
    calls: ArcSwap<CallTable>,
    /// Tables replaced by a reload: their counts still count.
    retired: Mutex<Vec<Arc<CallTable>>>,
    source: OnceLock<Source>,
    ready: crate::admin::health::Health,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for `workers` interceptor workers and the configured `servers`, the `tool`
    /// label bounded to `tools`.
    pub fn new(
        workers: usize,
        servers: Vec<String>,
        tools: &[String],
        ready: crate::admin::health::Health,
    ) -> Metrics {
        let shards = workers + 1;
        Metrics {
            shards: (0..shards).map(|_| Shard::new()).collect(),
            calls: ArcSwap::from_pointee(CallTable::new(&servers, tools, shards)),
            servers,
            retired: Mutex::default(),
            source: OnceLock::new(),
            ready,
        }
    }

    fn shard(&self) -> &Shard {
        let i = SHARD.with(Cell::get);
        &self.shards[i % self.shards.len()]
    }

    /// The policies changed: the `tool` label now admits `tools`. Counts so far are kept: the
    /// replaced table stays and is summed with the new one (a table per change of the listed
    /// names, not per reload).
    pub fn set_tools(&self, tools: &[String]) {
        // Swapped and retired under the lock a scrape reads them under: a scrape sees the
        // old table once, as current or as retired, never twice or not at all.
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.calls.load_full();
        let mut wanted: Vec<&str> = tools
            .iter()
            .map(String::as_str)
            .filter(|t| *t != OTHER)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut have: Vec<&str> = current.tools.iter().skip(1).map(String::as_str).collect();
        have.sort_unstable();
        if have == wanted {
            return;
        }
        let table = Arc::new(CallTable::new(&self.servers, tools, self.shards.len()));
        retired.push(self.calls.swap(table));
    }

    /// Where scrape-time values come from (set once, by `app`).
    pub fn set_source(&self, source: impl Fn() -> Snapshot + Send + Sync + 'static) {
        let _ = self.source.set(Box::new(source));
    }

    /// Time spent deciding one request's messages.
    pub fn decided(&self, took: Duration) {
        self.shard().decision_time.observe(took);
    }

    /// An SSE stream opened; it counts until the guard is dropped.
    pub fn sse_stream(self: &Arc<Self>) -> StreamGuard {
        let shard = SHARD.with(Cell::get) % self.shards.len();
        self.shards[shard].sse_streams.fetch_add(1, Relaxed);
        StreamGuard {
            metrics: self.clone(),
            shard,
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(self: &Arc<Self>) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// Counts of `tools/call` decisions, for status: `(server, tool, decision) → n`.
    pub fn call_totals(&self) -> BTreeMap<(String, String, &'static str), u64> {
        let mut totals = BTreeMap::new();
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        self.calls.load().totals(&mut totals);
        for t in retired.iter() {
            t.totals(&mut totals);
        }
        totals
    }

    /// SSE streams open now.
    pub fn sse_streams(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.sse_streams.load(Relaxed))
            .sum::<i64>()
            .max(0)
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }
}

/// Counts one open SSE stream.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    shard: usize,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.shards[self.shard]
            .sse_streams
            .fetch_sub(1, Relaxed);
    }
}

impl crate::audit::Observer for Metrics {
    fn observe(&self, r: &Record) {
        let shard = self.shard();
        let message = r.head.message.as_ref();
        let server = r.head.request.as_ref().and_then(|q| q.server.as_deref());
        match r.event {
            Event::Request | Event::Refused => {
                if r.event == Event::Refused {
                    if let Some(kind) = r.kind {
                        if let Some(c) = Refusal::ALL
                            .iter()
                            .position(|k| *k == kind)
                            .and_then(|i| shard.refusals.get(i))
                        {
                            c.fetch_add(1, Relaxed);
                        }
                    }
                }
                let tool = message
                    .filter(|m| m.method.as_deref() == Some("tools/call"))
                    .and_then(|m| m.tool.as_deref());
                if let (Some(tool), Some(decision)) = (tool, r.decision) {
                    self.calls.load().count(server, tool, decision);
                }
            }
            Event::Response => {
                let is_call = message.is_some_and(|m| m.method.as_deref() == Some("tools/call"));
                if let (true, Some(ms)) = (is_call, r.latency_ms) {
                    shard
                        .call_latency
                        .observe(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
                }
            }
            Event::UnpreparedNetns => {
                shard.unprepared_netns.fetch_add(1, Relaxed);
            }
            Event::PreexistingReset => {
                shard.preexisting_reset.fetch_add(1, Relaxed);
            }
            Event::PolicyReload => {
                let failed = r
                    .reason
                    .as_deref()
                    .is_some_and(|why| why.contains("(not loaded"));
                if failed {
                    shard.reloads_failed.fetch_add(1, Relaxed);
                } else {
                    shard.reloads_ok.fetch_add(1, Relaxed);
                }
            }
            Event::AdminRefused => {
                shard.admin_refused.fetch_add(1, Relaxed);
            }
            Event::Approval => {
                let step = r.approval.as_ref().map(|a| a.step);
                if let Some(i) = APPROVAL_STEPS.iter().position(|s| Some(*s) == step) {
                    shard.approvals[i].fetch_add(1, Relaxed);
                }
            }
            _ => {}
        }
    }
}

/// One scrape: reads every shard and the scrape-time sources.
#[derive(Debug)]
struct Scrape(Arc<Metrics>);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let snap = m.source.get().map(|f| f()).unwrap_or_default();

        let mut calls = e.encode_descriptor(
            "mcpwarden_calls",
            "tools/call messages decided, by server, tool (names a policy lists; others \"other\") and decision",
            None,
            MetricType::Counter,
        )?;
        for ((server, tool, decision), n) in m.call_totals() {
            let labels = [
                ("server", server.as_str()),
                ("tool", tool.as_str()),
                ("decision", decision),
            ];
            ConstCounter::new(n).encode(calls.encode_family(&labels)?)?;
        }

        let mut refusals = e.encode_descriptor(
            "mcpwarden_refusals",
            "requests and connections refused, by kind",
            None,
            MetricType::Counter,
        )?;
        for (i, kind) in Refusal::ALL.iter().enumerate() {
            let n = m.sum(|s| s.refusals.get(i).map_or(0, |c| c.load(Relaxed)));
            ConstCounter::new(n).encode(refusals.encode_family(&[("kind", kind.as_str())])?)?;
        }

        for (name, help, bounds, pick) in [
            (
                "mcpwarden_decision_duration_seconds",
                "time to decide one request's messages against the policy",
                DECISION_BOUNDS,
                (|s: &Shard| &s.decision_time) as fn(&Shard) -> &Histogram,
            ),
            (
                "mcpwarden_call_duration_seconds",
                "tools/call from the client's request to the answer (or the end of the exchange)",
                CALL_BOUNDS,
                |s: &Shard| &s.call_latency,
            ),
        ] {
            let h = merge(bounds, m.shards.iter().map(pick));
            e.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum,
                    h.count,
                    &h.cumulative,
                    None,
                )?;
        }

        gauge(
            &mut e,
            "mcpwarden_open_connections",
            "client connections being served",
            i64::try_from(snap.open_connections).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "mcpwarden_sse_streams",
            "SSE streams open to clients",
            m.sse_streams(),
        )?;
        gauge(
            &mut e,
            "mcpwarden_network_namespaces",
            "network namespaces served",
            i64::try_from(snap.namespaces).unwrap_or(i64::MAX),
        )?;
        if let Some(k) = &snap.kubernetes {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            gauge(
                &mut e,
                "mcpwarden_kubernetes_connected",
                "1 when the last request to the Kubernetes API server succeeded",
                i64::from(k.connected),
            )?;
            gauge(
                &mut e,
                "mcpwarden_kubernetes_pods_synced",
                "1 once this node's pod list has been read",
                i64::from(k.pods_synced),
            )?;
            gauge(
                &mut e,
                "mcpwarden_kubernetes_pods",
                "pods of this node known (deleted ones in their grace period included)",
                n(k.pods),
            )?;
            gauge(
                &mut e,
                "mcpwarden_service_backends",
                "Service backend addresses (EndpointSlices) in the endpoint maps",
                n(k.service_backends),
            )?;
            counter(
                &mut e,
                "mcpwarden_kubernetes_watch_errors",
                "errors watching or calling the Kubernetes API (each retried with backoff)",
                k.watch_errors,
            )?;
        }
        for (name, help, col) in [
            (
                "mcpwarden_redirect_map_entries",
                "entries in each redirect map",
                0usize,
            ),
            (
                "mcpwarden_redirect_map_capacity",
                "max_entries of each redirect map",
                1,
            ),
        ] {
            let mut fam = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (map, entries, max) in &snap.maps {
                let v = if col == 0 { *entries } else { *max };
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                    .encode(fam.encode_family(&[("map", *map)])?)?;
            }
        }
        counter(
            &mut e,
            "mcpwarden_unprepared_netns_refusals",
            "connects refused in the kernel from a network namespace not served yet",
            m.sum(|s| s.unprepared_netns.load(Relaxed)),
        )?;
        counter(
            &mut e,
            "mcpwarden_preexisting_resets",
            "connections opened before the programs were attached, reset at start",
            m.sum(|s| s.preexisting_reset.load(Relaxed)),
        )?;
        let mut reloads = e.encode_descriptor(
            "mcpwarden_policy_reloads",
            "policy and config reloads, by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("ok", m.sum(|s| s.reloads_ok.load(Relaxed))),
            ("failed", m.sum(|s| s.reloads_failed.load(Relaxed))),
        ] {
            ConstCounter::new(n).encode(reloads.encode_family(&[("result", result)])?)?;
        }
        counter(
            &mut e,
            "mcpwarden_admin_refused",
            "admin socket peers refused (not root, not in the admin group)",
            m.sum(|s| s.admin_refused.load(Relaxed)),
        )?;
        let mut approvals = e.encode_descriptor(
            "mcpwarden_approvals",
            "steps of held calls' approvals (requested, approved, denied, timed_out, abandoned, remembered, refused)",
            None,
            MetricType::Counter,
        )?;
        for (i, step) in APPROVAL_STEPS.iter().enumerate() {
            let n = m.sum(|s| s.approvals[i].load(Relaxed));
            ConstCounter::new(n).encode(approvals.encode_family(&[("step", *step)])?)?;
        }
        gauge(
            &mut e,
            "mcpwarden_approvals_pending",
            "calls held for an approval now",
            i64::try_from(snap.approvals_pending).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut e,
            "mcpwarden_tls_leaves_minted",
            "TLS leaf certificates minted",
            snap.leaves_minted,
        )?;

        let a = &snap.audit;
        for (name, help, v) in [
            ("mcpwarden_audit_bytes", "bytes written to the audit sink", a.bytes_written),
            ("mcpwarden_audit_records", "audit records written", a.records_written),
            ("mcpwarden_audit_write_errors", "audit writes that failed (each retried until audit.stall_ms)", a.write_errors),
            ("mcpwarden_audit_stalls", "audit records that waited the whole audit.stall_ms", a.stalls),
            ("mcpwarden_audit_refused_for_stall", "requests answered 503 because the audit sink stalled (audit.on_stall: deny)", a.refused_for_stall),
            ("mcpwarden_audit_unrecorded_forwarded", "requests forwarded while the audit sink stalled, their records written to stderr instead (audit.on_stall: allow)", a.unrecorded_forwarded),
            ("mcpwarden_audit_reopens", "times the audit file was reopened (SIGUSR1, renamed or removed)", a.reopens),
            ("mcpwarden_audit_rotations", "built-in size rotations of the audit file", a.rotations),
        ] {
            counter(&mut e, name, help, v)?;
        }
        e.encode_descriptor(
            "mcpwarden_audit_write_duration_seconds",
            "time one audit write(2) took, retries included",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            a.write_latency_sum,
            a.write_latency_count,
            &a.write_latency,
            None,
        )?;
        let health = m.ready.check();
        gauge(
            &mut e,
            "mcpwarden_ready",
            "1 when /readyz answers 200",
            i64::from(health.ready),
        )?;
        let mut info = e.encode_descriptor(
            "mcpwarden_build",
            "the agent's version",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Head, MessagePart, Observer, RequestPart};

    fn call(server: &str, tool: &str, event: Event, decision: Verdict) -> Record {
        let request = Arc::new(RequestPart {
            server: Some(server.to_owned()),
            ..RequestPart::default()
        });
        let head = Head {
            request: Some(request),
            ..Head::default()
        }
        .with_message(MessagePart {
            method: Some("tools/call".into()),
            tool: Some(tool.to_owned()),
            ..MessagePart::default()
        });
        let mut r = Record::new(event, Arc::new(head));
        r.decision = Some(decision);
        if event == Event::Refused {
            r.kind = Some(Refusal::Policy);
        }
        r
    }

    fn metrics(tools: &[&str]) -> Arc<Metrics> {
        let tools: Vec<String> = tools.iter().map(|t| (*t).to_owned()).collect();
        Arc::new(Metrics::new(
            2,
            vec!["tools".into()],
            &tools,
            crate::admin::health::Health::default(),
        ))
    }

    #[test]
    fn unlisted_tools_share_one_other_series() -> Result<(), std::fmt::Error> {
        let m = metrics(&["echo"]);
        m.observe(&call("tools", "echo", Event::Request, Verdict::Allow));
        for i in 0..1000 {
            let name = format!("made_up_{i}");
            m.observe(&call("tools", &name, Event::Refused, Verdict::Deny));
        }
        let text = m.encode()?;
        assert!(text.contains(
            "mcpwarden_calls_total{server=\"tools\",tool=\"echo\",decision=\"allow\"} 1\n"
        ));
        assert!(text.contains(
            "mcpwarden_calls_total{server=\"tools\",tool=\"other\",decision=\"deny\"} 1000\n"
        ));
        assert_eq!(text.matches("mcpwarden_calls_total{").count(), 2, "{text}");
        assert!(text.contains("mcpwarden_refusals_total{kind=\"policy\"} 1000\n"));
        assert!(text.contains("# TYPE mcpwarden_decision_duration_seconds histogram\n"));
        Ok(())
    }

    #[test]
    fn counts_survive_a_new_tool_table_and_workers_are_summed() {
        let m = metrics(&["echo"]);
        set_shard(1);
        m.observe(&call("tools", "echo", Event::Request, Verdict::Allow));
        set_shard(2);
        m.observe(&call("tools", "echo", Event::Request, Verdict::Allow));
        // A reload lists another tool: echo's count goes on from 2, add starts counting.
        m.set_tools(&["echo".into(), "add".into()]);
        m.observe(&call("tools", "echo", Event::Request, Verdict::Allow));
        m.observe(&call("tools", "add", Event::Request, Verdict::Allow));
        set_shard(0);
        let totals = m.call_totals();
        let get = |tool: &str| totals.get(&("tools".to_owned(), tool.to_owned(), "allow"));
        assert_eq!(get("echo"), Some(&3));
        assert_eq!(get("add"), Some(&1));
        // The same table again: no new generation.
        m.set_tools(&["add".into(), "echo".into()]);
        assert_eq!(m.retired.lock().map(|r| r.len()).unwrap_or(0), 1);
    }

    #[test]
    fn sse_streams_count_while_their_guard_lives() {
        let m = metrics(&[]);
        let a = m.sse_stream();
        let b = m.sse_stream();
        assert_eq!(m.sse_streams(), 2);
        drop(a);
        assert_eq!(m.sse_streams(), 1);
        drop(b);
        assert_eq!(m.sse_streams(), 0);
    }
}
