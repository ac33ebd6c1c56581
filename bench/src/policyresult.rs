//! What `mcpwarden-bench-policy` (scenario 5b) prints: one JSON line. Shared as source by that
//! binary (`#[path]`) and the orchestrator.

use serde::{Deserialize, Serialize};

/// Per-decision latency quantiles (nearest rank), each decision timed on its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyResult {
    /// Rules in `tools`.
    pub rules: usize,
    /// Size of the policy file.
    pub policy_bytes: usize,
    /// `Policy::parse` + `Engine::new`, the first time in the process (ms).
    pub first_load_ms: f64,
    /// `Policy::parse` alone, the first time (ms).
    pub first_parse_ms: f64,
    /// `Policy::parse` + `Engine::new` again, median of `reloads` (ms).
    pub reload_ms: f64,
    pub reloads: usize,
    /// VmRSS after the first load minus before it (KiB).
    pub rss_growth_kib: u64,
    /// Distinct prebuilt calls the decisions cycle through.
    pub mix_calls: usize,
    /// Untimed decisions before the timed ones.
    pub warmup: usize,
    /// Every timed decision.
    pub decisions: Latency,
    /// The same per kind of call (label, latency), in `policygen::KINDS` order.
    pub by_kind: Vec<(String, Latency)>,
    /// Median of `Instant::now()` then `elapsed()` with nothing between (ns): the timer's own
    /// share of every figure, not subtracted.
    pub timer_p50_ns: f64,
    /// Wall time of the timed loop (ms).
    pub wall_ms: f64,
}
