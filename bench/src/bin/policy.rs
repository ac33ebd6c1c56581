//! `mcpwarden-bench-policy`: scenario 5b's measuring process. It loads the 1,000-rule policy of
//! [`policygen`] into an [`Engine`] and times `decide_call` over the call mix, one decision at
//! a time, and prints one JSON [`PolicyResult`] line. The orchestrator (`mcpwarden-bench run`)
//! starts it once per repeat, so each repeat loads the policy in a fresh process.
//!
//! A binary of its own because of the allocator: the agent runs on mimalloc, and a decision
//! allocates (the rule pointer, the reason of a refusal), so this process uses mimalloc too; the
//! rest of the harness keeps the system allocator its figures were taken with.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../policygen.rs"]
mod policygen;
#[path = "../policyresult.rs"]
mod policyresult;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mcpwarden_policy::{Call, CallerScope, Engine, Outcome, Policy};
use serde_json::Value;

use policygen::{Expected, KINDS};
use policyresult::{Latency, PolicyResult};

#[derive(Parser)]
#[command(name = "mcpwarden-bench-policy")]
struct Args {
    /// Untimed decisions first.
    #[arg(long, default_value_t = 10_000)]
    warmup: usize,
    /// Timed decisions.
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// Loads of the policy after the first, to time a warm reload.
    #[arg(long, default_value_t = 3)]
    reloads: usize,
}

/// The policy's name in errors; `.json`, so it is read as JSON.
const FILE: &str = "policy-1000-rules.json";

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn outcome(e: Expected) -> Outcome {
    match e {
        Expected::Allow => Outcome::Allow,
        Expected::UnknownTool => Outcome::UnknownTool,
        Expected::Deny => Outcome::Deny,
    }
}

/// Nearest-rank quantiles of `ns` (sorted here), in µs.
fn latency(ns: &mut [u64]) -> Latency {
    ns.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len().max(1));
        ns.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0
    };
    let sum: u64 = ns.iter().sum();
    Latency {
        count: ns.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: ns.last().copied().unwrap_or(0) as f64 / 1000.0,
        mean_us: sum as f64 / ns.len().max(1) as f64 / 1000.0,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = policygen::thousand_rule_policy();
    let mix = policygen::call_mix();
    let calls: Vec<(usize, &str, Option<Value>, Outcome)> = mix
        .iter()
        .map(|c| {
            let arguments = match &c.arguments {
                Some(a) => {
                    Some(serde_json::from_str(a).with_context(|| format!("mix arguments {a}"))?)
                }
                None => None,
            };
            Ok((c.kind, c.tool.as_str(), arguments, outcome(c.expected())))
        })
        .collect::<Result<_>>()?;

    // The first load: what the agent pays at start, and what it keeps.
    let rss_before = rss_kib();
    let start = Instant::now();
    let policy = Policy::parse(&text, FILE)
        .map_err(|e| anyhow::anyhow!("the generated policy does not load: {e}"))?;
    let parsed = start.elapsed();
    let engine = Engine::new(policy);
    let first_load = start.elapsed();
    let rss_after = rss_kib();
    if !engine.policy().warnings().is_empty() {
        bail!(
            "the generated policy has {} warning(s), e.g. {:?}",
            engine.policy().warnings().len(),
            engine.policy().warnings().first()
        );
    }
    // Warm reloads (a file changed under a running agent).
    let mut reloads: Vec<u64> = (0..args.reloads)
        .map(|_| {
            let t = Instant::now();
            let p = Policy::parse(&text, FILE).map(Engine::new);
            let d = t.elapsed();
            p.map(|_| d.as_nanos() as u64)
                .map_err(|e| anyhow::anyhow!("reload: {e}"))
        })
        .collect::<Result<_>>()?;
    reloads.sort_unstable();

    let caller = CallerScope {
        grant: "bench-pod",
        process: "4242",
        session: "session-1",
        namespace: "",
        service_account: "",
    };
    // Every call must take the path its kind is named after.
    for (kind, tool, arguments, want) in &calls {
        let call = Call {
            tool,
            arguments: arguments.as_ref(),
        };
        let d = engine.decide_call(&call, &caller, Instant::now());
        if d.outcome != *want {
            bail!(
                "{tool} ({}): {:?} by {} ({:?}), expected {want:?}",
                KINDS[*kind].0,
                d.outcome,
                d.rule,
                d.reason
            );
        }
    }

    // Timer overhead: two back-to-back reads, for context (not subtracted).
    let mut timer: Vec<u64> = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();

    let n = calls.len();
    for k in 0..args.warmup {
        let (_, tool, arguments, _) = &calls[k % n];
        let call = Call {
            tool,
            arguments: arguments.as_ref(),
        };
        std::hint::black_box(engine.decide_call(&call, &caller, Instant::now()));
    }
    let mut all = Vec::with_capacity(args.decisions);
    let mut by_kind: Vec<Vec<u64>> = KINDS
        .iter()
        .map(|_| Vec::with_capacity(args.decisions / 4))
        .collect();
    let mut wrong = 0u64;
    let run = Instant::now();
    for k in 0..args.decisions {
        let (kind, tool, arguments, want) = &calls[k % n];
        let call = Call {
            tool,
            arguments: arguments.as_ref(),
        };
        let t0 = Instant::now();
        let d = engine.decide_call(&call, &caller, t0);
        let dt = t0.elapsed();
        wrong += u64::from(d.outcome != *want);
        drop(d);
        let ns = dt.as_nanos() as u64;
        all.push(ns);
        by_kind[*kind].push(ns);
    }
    let wall = run.elapsed();
    if wrong > 0 {
        bail!(
            "{wrong} of {} decisions had another outcome than their kind's",
            args.decisions
        );
    }

    let result = PolicyResult {
        rules: policygen::RULES,
        policy_bytes: text.len(),
        first_load_ms: ms(first_load),
        first_parse_ms: ms(parsed),
        reload_ms: reloads
            .get(reloads.len() / 2)
            .map_or(0.0, |&d| d as f64 / 1e6),
        reloads: reloads.len(),
        rss_growth_kib: rss_after.saturating_sub(rss_before),
        mix_calls: calls.len(),
        warmup: args.warmup,
        decisions: latency(&mut all),
        by_kind: by_kind
            .iter_mut()
            .enumerate()
            .map(|(k, v)| (KINDS[k].0.to_owned(), latency(v)))
            .collect(),
        timer_p50_ns: latency(&mut timer).p50_us * 1000.0,
        wall_ms: ms(wall),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
