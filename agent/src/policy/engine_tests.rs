//! Tests of decisions and rate limits. Time is synthetic: a base instant
//! plus offsets; nothing sleeps.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::load_tests::SEED;
use super::{CallerScope, Decision, Engine, Outcome, Policy};

const ONE: CallerScope<'static> = CallerScope { grant: "4242" };

fn engine(text: &str) -> Engine {
    Engine::new(Policy::parse(text, "policy.json").unwrap())
}

/// A policy with `default: deny` and the given `tools` object.
fn engine_with_tools(tools: &str) -> Engine {
    engine(&format!(
        r#"{{"version": "1", "default": "deny", "tools": {tools}}}"#
    ))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn assert_decision(d: &Decision, outcome: Outcome, rule: &str, reason: Option<&str>) {
    assert_eq!(d.outcome, outcome, "{d:?}");
    assert_eq!(d.rule, rule, "{d:?}");
    assert_eq!(d.reason.as_deref(), reason, "{d:?}");
}

fn is_allowed(engine: &Engine, tool: &str, caller: &CallerScope<'_>, now: Instant) -> bool {
    engine.decide_call(tool, caller, now).outcome == Outcome::Allow
}

#[test]
fn engine_and_policy_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
    check::<Policy>();
}

#[test]
fn seed_decisions() {
    let engine = engine(SEED);
    let now = Instant::now();
    assert_decision(
        &engine.decide_call("drop_cluster", &ONE, now),
        Outcome::Deny,
        "/tools/drop_cluster/action",
        Some("destructive"),
    );
    assert_decision(
        &engine.decide_call("start_security_scan", &ONE, now),
        Outcome::Allow,
        "/tools/start_security_scan",
        None,
    );
    assert_decision(
        &engine.decide_call("delete_everything", &ONE, now),
        Outcome::UnknownTool,
        "/default",
        Some("tool delete_everything is not allowed by this policy (default deny)"),
    );
    for _ in 1..10 {
        assert!(is_allowed(&engine, "start_security_scan", &ONE, now));
    }
    assert_decision(
        &engine.decide_call("start_security_scan", &ONE, now),
        Outcome::Deny,
        "/tools/start_security_scan/limits/0",
        Some("rate limit start_security_scan_rate exceeded: at most 10 calls per minute"),
    );
}

#[test]
fn default_allow_and_listed_tools() {
    let engine = engine(
        r#"{"version": "1", "default": "allow", "tools": {
            "read": {"action": "allow"},
            "list": {},
            "wipe": {"action": "deny"},
            "a/b~c": {"action": "deny", "on_deny": "no slashes"}
        }}"#,
    );
    let now = Instant::now();
    assert_decision(
        &engine.decide_call("anything", &ONE, now),
        Outcome::Allow,
        "/default",
        None,
    );
    assert_decision(
        &engine.decide_call("read", &ONE, now),
        Outcome::Allow,
        "/tools/read",
        None,
    );
    assert_decision(
        &engine.decide_call("list", &ONE, now),
        Outcome::Allow,
        "/tools/list",
        None,
    );
    assert_decision(
        &engine.decide_call("wipe", &ONE, now),
        Outcome::Deny,
        "/tools/wipe/action",
        Some("tool wipe is denied by policy"),
    );
    assert_decision(
        &engine.decide_call("a/b~c", &ONE, now),
        Outcome::Deny,
        "/tools/a~1b~0c/action",
        Some("no slashes"),
    );
}

#[test]
fn explicit_deny_wins_over_limits() {
    let engine = engine_with_tools(
        r#"{"t": {"action": "deny", "limits": [{"counter": "c", "window": "minute", "max": 5, "scope": "grant"}]}}"#,
    );
    let d = engine.decide_call("t", &ONE, Instant::now());
    assert_decision(
        &d,
        Outcome::Deny,
        "/tools/t/action",
        Some("tool t is denied by policy"),
    );
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
}

#[test]
fn sliding_window_admits_again_only_after_the_oldest_is_a_window_old() {
    let engine = engine(SEED);
    let base = Instant::now();
    let tool = "start_security_scan";
    // Ten calls, one a second, starting at base.
    for i in 0..10 {
        assert!(is_allowed(&engine, tool, &ONE, base + secs(i)), "call {i}");
    }
    assert!(!is_allowed(&engine, tool, &ONE, base + secs(30)));
    // Exactly one window after the oldest admission it still counts.
    assert!(!is_allowed(&engine, tool, &ONE, base + secs(60)));
    // Just past it, one slot is free again, and only one.
    let later = base + secs(60) + Duration::from_nanos(1);
    assert!(is_allowed(&engine, tool, &ONE, later));
    assert!(!is_allowed(&engine, tool, &ONE, later));
    // The admission at base + 1s ages out next.
    assert!(!is_allowed(&engine, tool, &ONE, base + secs(61)));
    assert!(is_allowed(
        &engine,
        tool,
        &ONE,
        base + secs(61) + Duration::from_millis(1)
    ));
}

#[test]
fn windows_are_not_calendar_aligned() {
    let engine = engine(SEED);
    let base = Instant::now();
    let tool = "start_security_scan";
    // Ten calls in the last ten seconds of one "minute"...
    for i in 50..60 {
        assert!(
            is_allowed(&engine, tool, &ONE, base + secs(i)),
            "call at {i}s"
        );
    }
    // ...still count in the first seconds of the next one, where a fixed
    // window would have reset.
    for i in 60..110 {
        assert!(
            !is_allowed(&engine, tool, &ONE, base + secs(i)),
            "call at {i}s"
        );
    }
    assert!(is_allowed(
        &engine,
        tool,
        &ONE,
        base + secs(110) + Duration::from_millis(1)
    ));
}

#[test]
fn numeric_window_in_seconds() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": 30, "max": 2, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, base));
    assert!(is_allowed(&engine, "t", &ONE, base + secs(10)));
    assert_decision(
        &engine.decide_call("t", &ONE, base + secs(20)),
        Outcome::Deny,
        "/tools/t/limits/0",
        Some("rate limit c exceeded: at most 2 calls per 30 seconds"),
    );
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(30)));
    assert!(is_allowed(
        &engine,
        "t",
        &ONE,
        base + secs(30) + Duration::from_millis(1)
    ));
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(39)));
}

#[test]
fn max_zero_admits_nothing() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "second", "max": 0, "scope": "grant"}]}}"#,
    );
    let d = engine.decide_call("t", &ONE, Instant::now());
    assert_decision(
        &d,
        Outcome::Deny,
        "/tools/t/limits/0",
        Some("rate limit c exceeded: at most 0 calls per second"),
    );
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
}

#[test]
fn tools_naming_one_counter_share_it_with_their_own_windows() {
    let engine = engine_with_tools(
        r#"{
        "a": {"limits": [{"counter": "shared", "window": "minute", "max": 3, "scope": "grant"}]},
        "b": {"limits": [{"counter": "shared", "window": "second", "max": 1, "scope": "grant"}]}
    }"#,
    );
    let base = Instant::now();
    assert!(is_allowed(&engine, "a", &ONE, base));
    // b sees a's call within its one-second window.
    assert_decision(
        &engine.decide_call("b", &ONE, base + Duration::from_millis(500)),
        Outcome::Deny,
        "/tools/b/limits/0",
        Some("rate limit shared exceeded: at most 1 call per second"),
    );
    // A second later b has room again; a's minute-long limit does not apply to b.
    assert!(is_allowed(&engine, "b", &ONE, base + secs(2)));
    // a sees b's call: two in the minute, one more allowed.
    assert!(is_allowed(&engine, "a", &ONE, base + secs(3)));
    assert_decision(
        &engine.decide_call("a", &ONE, base + secs(4)),
        Outcome::Deny,
        "/tools/a/limits/0",
        Some("rate limit shared exceeded: at most 3 calls per minute"),
    );
}

#[test]
fn different_grants_do_not_share() {
    let engine = engine(SEED);
    let now = Instant::now();
    let other = CallerScope { grant: "777" };
    for _ in 0..10 {
        assert!(is_allowed(&engine, "start_security_scan", &ONE, now));
    }
    assert!(!is_allowed(&engine, "start_security_scan", &ONE, now));
    for _ in 0..10 {
        assert!(is_allowed(&engine, "start_security_scan", &other, now));
    }
    assert!(!is_allowed(&engine, "start_security_scan", &other, now));
}

#[test]
fn several_limits_reserve_all_or_none() {
    let engine = engine_with_tools(
        r#"{
        "both": {"limits": [{"counter": "wide", "window": "minute", "max": 5, "scope": "grant"},
                            {"counter": "narrow", "window": "minute", "max": 2, "scope": "grant"}]},
        "wide_only": {"limits": [{"counter": "wide", "window": "minute", "max": 5, "scope": "grant"}]}
    }"#,
    );
    let now = Instant::now();
    assert!(is_allowed(&engine, "both", &ONE, now));
    assert!(is_allowed(&engine, "both", &ONE, now));
    // "narrow" is exhausted; the refused calls must not take "wide" slots.
    for _ in 0..5 {
        assert_decision(
            &engine.decide_call("both", &ONE, now),
            Outcome::Deny,
            "/tools/both/limits/1",
            Some("rate limit narrow exceeded: at most 2 calls per minute"),
        );
    }
    let wide = engine
        .policy()
        .counters
        .iter()
        .position(|c| c.name == "wide")
        .unwrap();
    assert_eq!(engine.with_counters(|c| c.log_len(wide, ONE.grant)), 2);
    for _ in 0..3 {
        assert!(is_allowed(&engine, "wide_only", &ONE, now));
    }
    assert_decision(
        &engine.decide_call("wide_only", &ONE, now),
        Outcome::Deny,
        "/tools/wide_only/limits/0",
        Some("rate limit wide exceeded: at most 5 calls per minute"),
    );
}

#[test]
fn first_exhausted_limit_is_reported() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "x", "window": "minute", "max": 1, "scope": "grant"},
                           {"counter": "y", "window": "minute", "max": 1, "scope": "grant"}]}}"#,
    );
    let now = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, now));
    assert_eq!(engine.decide_call("t", &ONE, now).rule, "/tools/t/limits/0");
}

#[test]
fn one_counter_in_two_limits_of_a_tool_is_recorded_once() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "minute", "max": 5, "scope": "grant"},
                           {"counter": "c", "window": "hour", "max": 8, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    for i in 0..5 {
        assert!(is_allowed(&engine, "t", &ONE, base + secs(i)), "call {i}");
    }
    assert_eq!(engine.with_counters(|c| c.log_len(0, ONE.grant)), 5);
    assert_eq!(
        engine.decide_call("t", &ONE, base + secs(5)).rule,
        "/tools/t/limits/0"
    );
    // A minute on, the per-minute limit has room but the hourly one only
    // has three more.
    let later = base + secs(120);
    for _ in 0..3 {
        assert!(is_allowed(&engine, "t", &ONE, later));
    }
    assert_eq!(
        engine.decide_call("t", &ONE, later).rule,
        "/tools/t/limits/1"
    );
}

#[test]
fn calls_that_read_the_clock_out_of_order_still_count() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": 10, "max": 2, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, base + secs(5)));
    assert!(is_allowed(&engine, "t", &ONE, base + secs(1)));
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(3)));
    // The admission at 1s is the oldest: it ages out first.
    assert!(is_allowed(&engine, "t", &ONE, base + secs(12)));
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(14)));
}

#[test]
fn expired_logs_and_idle_callers_are_forgotten() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "second", "max": 100000, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    let grants: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    for grant in &grants {
        assert!(is_allowed(&engine, "t", &CallerScope { grant }, base));
    }
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 2000);
    // One caller keeps calling long after the others went away; the log of
    // a key is pruned when it is used, the rest at the next sweep.
    let later = base + secs(10);
    assert!(is_allowed(&engine, "t", &ONE, later));
    assert_eq!(engine.with_counters(|c| c.log_len(0, ONE.grant)), 1);
    for i in 0..1100u64 {
        assert!(is_allowed(
            &engine,
            "t",
            &ONE,
            later + Duration::from_micros(i)
        ));
    }
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 1);
}

#[test]
fn logs_keep_no_more_entries_than_the_largest_max() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "day", "max": 3, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    for i in 0..50 {
        let _ = engine.decide_call("t", &ONE, base + secs(i));
    }
    assert_eq!(engine.with_counters(|c| c.log_len(0, ONE.grant)), 3);
}

#[test]
fn concurrent_callers_are_admitted_exactly_max_times() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "minute", "max": 10, "scope": "grant"}]}}"#,
    );
    let threads = 100;
    let barrier = Barrier::new(threads);
    let admitted = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    is_allowed(&engine, "t", &ONE, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|allowed| *allowed)
            .count()
    });
    assert_eq!(admitted, 10);
}

/// The one visibility rule: `hide` and default-deny remove a tool from listings and make it
/// unknown when called; an explicit deny keeps it listed and refuses with the reason.
#[test]
fn hide_and_default_deny_make_tools_invisible_explicit_deny_does_not() {
    let e = engine(
        r#"{"version":"1","default":"deny","hide":["secret"],
            "tools":{"echo":{},"secret":{},"drop":{"action":"deny","reason":"no"}}}"#,
    );
    let p = e.policy();
    assert!(p.visible("echo"));
    assert!(p.visible("drop"), "explicitly denied tools stay visible");
    assert!(!p.visible("secret"), "hidden even though listed");
    assert!(!p.visible("other"), "unlisted under default deny");
    let now = Instant::now();
    assert_decision(
        &e.decide_call("secret", &ONE, now),
        Outcome::UnknownTool,
        "/hide",
        Some("tool secret is hidden by this policy"),
    );
    assert_decision(
        &e.decide_call("drop", &ONE, now),
        Outcome::Deny,
        "/tools/drop/action",
        Some("no"),
    );

    let all = engine(r#"{"version":"1","default":"allow","hide":"*","tools":{"echo":{}}}"#);
    assert!(!all.policy().visible("echo"));
    assert!(!all.policy().visible("anything"));
    assert_eq!(
        all.decide_call("echo", &ONE, now).outcome,
        Outcome::UnknownTool
    );

    let open = engine(r#"{"version":"1","default":"allow"}"#);
    assert!(open.policy().visible("anything"));
}

#[test]
fn hide_must_be_star_or_names() {
    for (text, needle) in [
        (
            r#"{"version":"1","default":"deny","hide":"x"}"#,
            "hide must be",
        ),
        (
            r#"{"version":"1","default":"deny","hide":["a","a"]}"#,
            "appears twice",
        ),
        (
            r#"{"version":"1","default":"deny","hide":[""]}"#,
            "must not be empty",
        ),
        (
            r#"{"version":"1","default":"deny","hide":[1]}"#,
            "invalid type",
        ),
        (
            r#"{"version":"1","default":"deny","hide":["get_*"]}"#,
            "not supported yet",
        ),
    ] {
        let err = Policy::parse(text, "p.json").expect_err(text);
        assert!(err.to_string().contains(needle), "{text}: {err}");
        assert!(err.line >= 1 && err.column >= 1, "{err}");
    }
}
