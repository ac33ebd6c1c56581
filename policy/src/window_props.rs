//! Property tests of sliding-window limits: whatever the arrivals, no closed interval one
//! window long ever holds more than `max` of what was admitted.
//!
//! Calls are fed through [`Engine::decide_call`] with `now = base + offset`. Besides calls in
//! clock order, the properties cover calls whose clock readings arrive out of order (a caller
//! that read the clock, then waited for the lock while a later reading went first), and real
//! threads sharing one engine.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

use super::{Call, CallerScope, Engine, Outcome, Policy};

const CALLER: CallerScope<'static> = CallerScope {
    grant: "grant",
    process: "process",
    session: "session",
    namespace: "",
    service_account: "",
};

/// Float sums of the same amounts in another order may differ in the last bits.
const EPSILON: f64 = 1e-9;

/// One call: when its caller read the clock (ms after the base instant), and what it spends
/// when the limit has `increment_from`.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    at_ms: u64,
    amount: f64,
}

/// An admitted call: its instant (ms after base) and what it counted.
type Admission = (u64, f64);

/// An engine whose tool `t` has one limit: `max` per `window_s` seconds, counting calls, or
/// with `spend` the argument `n`.
fn engine(window_s: u64, max: u32, spend: bool) -> Engine {
    let mut limit = json!({"counter": "c", "window": window_s, "max": max, "scope": "grant"});
    if spend {
        limit["increment_from"] = json!("args.n");
    }
    let policy = json!({"version": "1", "default": "deny", "tools": {"t": {"limits": [limit]}}});
    Engine::new(Policy::parse(&policy.to_string(), "policy.json").expect("a valid policy"))
}

/// Decides one arrival; `Some` with what it counted when admitted.
fn decide(
    engine: &Engine,
    base: Instant,
    arrival: Arrival,
    spend: bool,
) -> Result<Option<Admission>, TestCaseError> {
    let args: Value = json!({ "n": arrival.amount });
    let call = Call {
        tool: "t",
        arguments: Some(&args),
    };
    let d = engine.decide_call(&call, &CALLER, base + Duration::from_millis(arrival.at_ms));
    match d.outcome {
        // A call that comes to the lock after a later-stamped one is admitted at that later
        // instant (the reservation says when); a call that counted nothing has none.
        Outcome::Allow => Ok(Some((
            d.reservation.as_ref().map_or(arrival.at_ms, |r| {
                u64::try_from(r.at().duration_since(base).as_millis()).unwrap_or(u64::MAX)
            }),
            if spend { arrival.amount } else { 1.0 },
        ))),
        Outcome::Deny => {
            prop_assert_eq!(&d.rule, "/tools/t/limits/0", "{:?}", d);
            Ok(None)
        }
        other => Err(TestCaseError::fail(format!("unexpected {other:?}: {d:?}"))),
    }
}

/// The total admitted within the closed interval `[from, to]` (ms).
fn total_within(admitted: &[Admission], from: u64, to: u64) -> f64 {
    admitted
        .iter()
        .filter(|(at, _)| (from..=to).contains(at))
        .map(|(_, amount)| amount)
        .sum()
}

/// For every admitted instant t, what was admitted in `[t - window, t]` and in
/// `[t, t + window]` is at most `max`. (Those intervals include the fullest one: an interval
/// holding the most can be slid until an admission sits on one of its ends.)
fn assert_every_window_fits(
    admitted: &[Admission],
    window_ms: u64,
    max: f64,
) -> Result<(), TestCaseError> {
    for &(t, _) in admitted {
        for (from, to) in [(t.saturating_sub(window_ms), t), (t, t + window_ms)] {
            let total = total_within(admitted, from, to);
            prop_assert!(
                total <= max + EPSILON,
                "{} admitted within [{}ms, {}ms] (window {}ms), max {}; admitted: {:?}",
                total,
                from,
                to,
                window_ms,
                max,
                admitted
            );
        }
    }
    Ok(())
}

fn arrivals(len: usize) -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (0u64..20_000, 0.0f64..=3.0).prop_map(|(at_ms, amount)| Arrival { at_ms, amount }),
        0..=len,
    )
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // A failure must not write a regressions file into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Feeds `arrivals` in the given order through one engine; returns what it admitted.
fn feed(
    window_s: u64,
    max: u32,
    spend: bool,
    arrivals: &[Arrival],
) -> Result<Vec<Admission>, TestCaseError> {
    let engine = engine(window_s, max, spend);
    let base = Instant::now();
    let mut admitted = Vec::new();
    for &arrival in arrivals {
        if let Some(admission) = decide(&engine, base, arrival, spend)? {
            admitted.push(admission);
        }
    }
    Ok(admitted)
}

proptest! {
    #![proptest_config(config(256))]

    /// Calls in clock order: the engine admits exactly what a sliding window allows: a call
    /// is refused if and only if what was admitted in `[t - window, t]` plus its own amount
    /// exceeds `max`.
    #[test]
    fn in_order_admissions_fit_every_window(
        window_s in 1u64..=5,
        max in 0u32..=8,
        spend in any::<bool>(),
        mut arrivals in arrivals(200),
    ) {
        arrivals.sort_by_key(|a| a.at_ms);
        let engine = engine(window_s, max, spend);
        let base = Instant::now();
        let window_ms = window_s * 1000;
        let max = f64::from(max);
        let mut admitted = Vec::new();
        for arrival in arrivals {
            let amount = if spend { arrival.amount } else { 1.0 };
            let used = total_within(
                &admitted,
                arrival.at_ms.saturating_sub(window_ms),
                arrival.at_ms,
            );
            let decided = decide(&engine, base, arrival, spend)?;
            // Too close to call in floating point: either answer is right.
            if (used + amount - max).abs() > EPSILON {
                prop_assert_eq!(
                    decided.is_some(),
                    used + amount <= max,
                    "call at {}ms adding {} with {} used of {}; admitted so far: {:?}",
                    arrival.at_ms, amount, used, max, admitted
                );
            }
            if let Some(admission) = decided {
                admitted.push(admission);
            }
        }
        assert_every_window_fits(&admitted, window_ms, max)?;
    }

    /// Clock readings in any order.
    #[test]
    fn out_of_order_admissions_fit_every_window(
        window_s in 1u64..=5,
        max in 0u32..=8,
        spend in any::<bool>(),
        arrivals in arrivals(200),
    ) {
        let admitted = feed(window_s, max, spend, &arrivals)?;
        assert_every_window_fits(&admitted, window_s * 1000, f64::from(max))?;
    }

    /// Clock readings in order but for a little skew: each caller read the clock up to 50 ms
    /// before it got the lock, as concurrent callers do.
    #[test]
    fn slightly_late_admissions_fit_every_window(
        window_s in 1u64..=5,
        max in 0u32..=8,
        spend in any::<bool>(),
        mut arrivals in arrivals(200),
        skews in prop::collection::vec(0u64..=50, 200),
    ) {
        arrivals.sort_by_key(|a| a.at_ms);
        for (arrival, skew) in arrivals.iter_mut().zip(&skews) {
            arrival.at_ms = arrival.at_ms.saturating_sub(*skew);
        }
        let admitted = feed(window_s, max, spend, &arrivals)?;
        assert_every_window_fits(&admitted, window_s * 1000, f64::from(max))?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Four threads, fifty calls each, at random instants, against one shared engine.
    #[test]
    fn concurrent_admissions_fit_every_window(
        window_s in 1u64..=5,
        max in 0u32..=8,
        spend in any::<bool>(),
        per_thread in prop::collection::vec(
            prop::collection::vec(
                (0u64..20_000, 0.0f64..=3.0)
                    .prop_map(|(at_ms, amount)| Arrival { at_ms, amount }),
                50,
            ),
            4,
        ),
    ) {
        let engine = Arc::new(engine(window_s, max, spend));
        let base = Instant::now();
        let barrier = Barrier::new(per_thread.len());
        let results: Vec<Result<Vec<Admission>, TestCaseError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = per_thread
                .iter()
                .map(|arrivals| {
                    let engine = Arc::clone(&engine);
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        let mut admitted = Vec::new();
                        for &arrival in arrivals {
                            if let Some(admission) = decide(&engine, base, arrival, spend)? {
                                admitted.push(admission);
                            }
                        }
                        Ok(admitted)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a deciding thread panicked"))
                .collect()
        });
        let mut admitted = Vec::new();
        for result in results {
            admitted.extend(result?);
        }
        admitted.sort_by_key(|(at, _)| *at);
        assert_every_window_fits(&admitted, window_s * 1000, f64::from(max))?;
    }
}
