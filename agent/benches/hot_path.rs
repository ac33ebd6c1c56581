//! Micro-benchmarks of the per-call hot path: the work the interceptor does
//! for every `tools/call` besides moving bytes over sockets.
//!
//! Run with `cargo bench -p mcpwarden --bench hot_path` (add `-- --quick` for
//! a fast pass). Criterion writes each result under
//! `target/criterion/<id>/new/estimates.json`; every id below is also that
//! directory path.
//!
//! - `policy/decide_1000_rules/*`: [`Engine::decide_call`] against a policy
//!   of 1,000 tool rules (900 plain allows, 50 explicit denies with a reason,
//!   50 rate-limited tools), under `default: deny`. Tools are looked up by
//!   name in a hash map, so the rule count should not matter; the large
//!   policy is there to show that it does not. One id per path through the
//!   engine:
//!   - `allow_listed`: a listed tool without limits (tool 500 of 1,000).
//!   - `unknown_tool`: a tool the policy does not list (falls to `default`).
//!   - `denied`: a tool with `action: deny` and a `reason`.
//!   - `limited`: a tool with one limit (`window: minute`, `max: 10^9`) that
//!     never trips. Limits keep a sliding log of admission instants per
//!     grant, so the call takes the engine's lock, prunes, counts and appends
//!     to that log. The log holds every admission of the last window (up to
//!     `max`), so with a real clock it would grow by one entry per iteration
//!     (tens of millions of entries per run) and the figure would be
//!     dominated by `VecDeque` growth. Instead the benchmark drives
//!     `decide_call` with a synthetic clock that advances 1 ms per call: a
//!     single grant calling the tool 1,000 times a second, forever. After the
//!     first 60,000 calls the log is in steady state (60,000 instants, about
//!     1 MB; each call drops one and appends one), which is what is measured.
//!     Every decision is checked to be an allow.
//!
//!   The other three paths ignore `now`; it is read once outside the loop so
//!   that the figures are the engine's alone (the interceptor reads the
//!   clock once per call on top of this).
//! - `policy/decide_1000_rules_mixed/*`: the same against the 1,000-rule
//!   policy of BENCHMARKS.md scenario 5b (`bench/src/policygen.rs`, included
//!   here as source): 800 exact names (100 with an `arguments` JSON Schema
//!   and conditions, 400 more with `deny_if`/`require`, 40 limited), 200
//!   patterns, `hide` patterns and `all_tools`. One id per kind of call of
//!   5b's mix, each cycling through that kind's calls (tool and parsed
//!   arguments, built outside the loop), and `mix`, which cycles through the
//!   whole mix (1,024 calls): its time per iteration is the mean of 5b. The
//!   clock is synthetic again, 1 µs per decision (about 5b's rate), carried
//!   across cases: in `limited_allowed` the 40 limited tools take every
//!   decision, so each one's log (1-second window) holds about 25,000
//!   admissions in steady state; in `mix`, about 1,500. Every decision is
//!   checked to have its kind's outcome.
//! - `audit/serialize_record`: `serde_json::to_vec` of one fully filled
//!   decision [`Record`], the CPU part of an audit write.
//! - `audit/write_record`: [`AuditLog::write`] of that record to a file in
//!   the system temp directory: serialization, the lock and one `write(2)`
//!   in append mode (no fsync; the page cache absorbs it). The difference
//!   from `serialize_record` is the syscall and lock. The file is truncated
//!   every 4,096 writes, outside the timed region, so that it stays small,
//!   and removed at the end.
//! - `mcp/parse_tools_call`: [`mcp::parse_body`] of a ~200-byte `tools/call`
//!   request: strict JSON parse with duplicate-key checks, message
//!   validation, and the sorted argument keys plus SHA-256 of the canonical
//!   arguments that go into the audit record. The parser does not look at
//!   `Content-Type`, so the headers are empty (no routing headers, which is
//!   the common case).
//! - `mcp/inspect_result`: [`mcp::inspect`] of a ~150-byte `tools/call` result (what every
//!   JSON answer costs on the way back: strict parse, audit fields, no listing);
//!   `mcp/filter_listing_50`: the same for a 50-tool `tools/list` result of which the policy
//!   hides 5 (parse, filter, write the new body); `mcp/sse_split_8_events`: the SSE splitter
//!   over a 1 KiB piece holding 8 CRLF events.
//! - `tls/mint_leaf`: one leaf signed by a generated CA (P-256 key generation +
//!   ECDSA signature) — what the first handshake for a name costs on top of a
//!   cached one; `tls/cached_leaf_config`: the leaf-cache hit every other
//!   handshake costs.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mcpwarden::audit::{
    AuditLog, CallerPart, Event, Head, MessagePart, PolicyRef, Record, RequestPart, Verdict,
};
use mcpwarden::mcp::{self, Parsed};
use mcpwarden::policy::{Call, CallerScope, Engine, Outcome, Policy};

/// Scenario 5b's policy and calls (the agent crate cannot depend on the bench crate).
#[allow(dead_code)]
#[path = "../../bench/src/policygen.rs"]
mod policygen;

/// Number of tool rules in the generated policy.
const RULES: usize = 1000;

/// Every `DENY_EVERY`th tool (offset `DENY_AT`) is denied, and every
/// `LIMIT_EVERY`th (offset `LIMIT_AT`) is limited: 50 of each in 1,000.
const DENY_EVERY: usize = 20;
const DENY_AT: usize = 7;
const LIMIT_EVERY: usize = 20;
const LIMIT_AT: usize = 13;

/// The tools each policy benchmark calls.
const ALLOWED_TOOL: &str = "tool_0500";
const DENIED_TOOL: &str = "tool_0507";
const LIMITED_TOOL: &str = "tool_0513";
const UNKNOWN_TOOL: &str = "tool_not_in_policy";

/// How far the synthetic clock of the `limited` benchmark moves per call.
const LIMITED_CALL_INTERVAL: Duration = Duration::from_millis(1);

/// Audit writes between truncations of the benchmark's audit file.
const AUDIT_WRITES_PER_TRUNCATE: u64 = 4096;

fn tool_name(index: usize) -> String {
    format!("tool_{index:04}")
}

/// policy.json text with [`RULES`] tool rules and `default: deny`.
fn policy_json() -> String {
    let mut tools = serde_json::Map::new();
    for index in 0..RULES {
        let name = tool_name(index);
        let rule = if index % DENY_EVERY == DENY_AT {
            serde_json::json!({
                "action": "deny",
                "reason": format!("{name} changes production state; ask an operator"),
            })
        } else if index % LIMIT_EVERY == LIMIT_AT {
            serde_json::json!({
                "limits": [{
                    "counter": format!("{name}_rate"),
                    "window": "minute",
                    "max": 1_000_000_000u64,
                    "scope": "grant",
                }],
            })
        } else {
            serde_json::json!({})
        };
        tools.insert(name, rule);
    }
    serde_json::json!({ "version": "1", "default": "deny", "tools": tools }).to_string()
}

fn policy_benches(c: &mut Criterion) {
    let policy = Policy::parse(&policy_json(), "bench-policy.json").expect("generated policy");
    let engine = Engine::new(policy);
    let caller = CallerScope {
        grant: "cgroup:1234",
        process: "pid:1",
        session: "connection:1",
        namespace: "",
        service_account: "",
    };
    let call = |tool| Call {
        tool,
        arguments: None,
    };
    let now = Instant::now();

    // Each scenario must take the path it is named after.
    for (tool, expected) in [
        (ALLOWED_TOOL, Outcome::Allow),
        (UNKNOWN_TOOL, Outcome::UnknownTool),
        (DENIED_TOOL, Outcome::Deny),
    ] {
        assert_eq!(
            engine.decide_call(&call(tool), &caller, now).outcome,
            expected,
            "{tool}"
        );
    }

    let mut group = c.benchmark_group("policy");
    let id = |case: &str| BenchmarkId::new("decide_1000_rules", case);

    group.bench_function(id("allow_listed"), |b| {
        b.iter(|| engine.decide_call(&call(black_box(ALLOWED_TOOL)), &caller, now));
    });
    group.bench_function(id("unknown_tool"), |b| {
        b.iter(|| engine.decide_call(&call(black_box(UNKNOWN_TOOL)), &caller, now));
    });
    group.bench_function(id("denied"), |b| {
        b.iter(|| engine.decide_call(&call(black_box(DENIED_TOOL)), &caller, now));
    });

    // The synthetic clock carries on across warm-up and samples, so the
    // admission log stays in steady state rather than restarting.
    let mut clock = now;
    let mut calls: u64 = 0;
    let mut refused: u64 = 0;
    group.bench_function(id("limited"), |b| {
        b.iter(|| {
            clock += LIMITED_CALL_INTERVAL;
            let decision = engine.decide_call(&call(black_box(LIMITED_TOOL)), &caller, clock);
            calls += 1;
            refused += u64::from(decision.outcome != Outcome::Allow);
            decision
        });
    });
    group.finish();
    assert_eq!(
        refused, 0,
        "the limited tool refused {refused} of {calls} calls"
    );
}

/// `policy/decide_1000_rules_mixed/*`: scenario 5b's policy and call mix.
fn mixed_policy_benches(c: &mut Criterion) {
    use policygen::Expected;
    let policy = Policy::parse(
        &policygen::thousand_rule_policy(),
        "bench-policy-mixed.json",
    )
    .expect("the generated 1,000-rule policy loads");
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    let engine = Engine::new(policy);
    let caller = CallerScope {
        grant: "cgroup:1234",
        process: "pid:1",
        session: "connection:1",
        namespace: "",
        service_account: "",
    };
    let outcome = |e: Expected| match e {
        Expected::Allow => Outcome::Allow,
        Expected::UnknownTool => Outcome::UnknownTool,
        Expected::Deny => Outcome::Deny,
    };
    // (kind, tool, arguments, outcome), in the mix's order.
    let mix: Vec<(usize, String, Option<serde_json::Value>, Outcome)> = policygen::call_mix()
        .into_iter()
        .map(|m| {
            let arguments = m
                .arguments
                .as_deref()
                .map(|a| serde_json::from_str(a).expect("mix arguments"));
            (m.kind, m.tool.clone(), arguments, outcome(m.expected()))
        })
        .collect();

    let mut clock = Instant::now();
    let mut wrong: u64 = 0;
    let mut group = c.benchmark_group("policy");
    let cases = [
        ("schema_conditions_allowed", Some(0)),
        ("conditions_allowed", Some(1)),
        ("plain_allowed", Some(2)),
        ("limited_allowed", Some(3)),
        ("pattern_allowed", Some(4)),
        ("schema_fails", Some(5)),
        ("condition_denied", Some(6)),
        ("unknown_tool", Some(7)),
        ("hidden", Some(8)),
        ("mix", None),
    ];
    for (case, kind) in cases {
        let calls: Vec<_> = mix
            .iter()
            .filter(|(k, ..)| kind.is_none_or(|want| *k == want))
            .collect();
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("decide_1000_rules_mixed", case), |b| {
            b.iter(|| {
                let (_, tool, arguments, expected) = calls[next % calls.len()];
                next += 1;
                clock += Duration::from_micros(1);
                let call = Call {
                    tool: black_box(tool),
                    arguments: arguments.as_ref(),
                };
                let decision = engine.decide_call(&call, &caller, clock);
                wrong += u64::from(decision.outcome != *expected);
                decision
            });
        });
    }
    group.finish();
    assert_eq!(
        wrong, 0,
        "{wrong} decisions had another outcome than their kind's"
    );
}

/// A decision record as the interceptor writes it for an allowed call, with
/// every field that such a record carries filled in.
fn decision_record() -> Record {
    let caller = Arc::new(CallerPart {
        dst: Some("10.42.7.19:8443".into()),
        pid: Some(48_213),
        comm: Some("claude".into()),
        uid: Some(1000),
        cgroup: Some("/user.slice/user-1000.slice/user@1000.service/app.slice/agent.scope".into()),
        cgroup_id: Some(12_884_902_541),
        ..CallerPart::default()
    });
    let request = Arc::new(RequestPart {
        server: Some("security-scanner".into()),
        http_method: Some("POST".into()),
        path: Some("/mcp".into()),
        ..RequestPart::default()
    });
    let head = Head::request(&caller, &request).with_message(MessagePart {
        method: Some("tools/call".into()),
        id: Some(serde_json::json!(42)),
        tool: Some("start_security_scan".into()),
        arg_keys: Some(vec![
            "depth".into(),
            "include_subdomains".into(),
            "target".into(),
        ]),
        args_sha256: Some(
            "3b7e1f0c9a8d2e4f6b1c3a5d7e9f0b2c4d6e8f1a3b5c7d9e0f2a4b6c8d0e1f3a".into(),
        ),
        arguments: None,
    });
    let mut record = Record::new(Event::Request, Arc::new(head));
    record.decision = Some(Verdict::Allow);
    record.rule = Some("/tools/start_security_scan/limits/0".into());
    record.policy = Some(PolicyRef {
        file: "/etc/mcpwarden/policies/security-scanner.json".into(),
        sha256: "9f2c4e1a7b3d5f60e8a1c2b4d6f8091a3c5e7b9d1f2a4c6e8b0d2f4a6c8e0b2d".into(),
    });
    record
}

fn audit_benches(c: &mut Criterion) {
    let record = decision_record();
    let dir: PathBuf = std::env::temp_dir().join(format!("mcpwarden-bench-{}", std::process::id()));
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&path).expect("open the audit log");
    // A second handle on the same file, only to truncate it; the log's own
    // handle appends, so its next write lands at the new end.
    let truncator = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open the audit log for truncation");

    let mut group = c.benchmark_group("audit");
    group.bench_function("serialize_record", |b| {
        b.iter(|| serde_json::to_vec(black_box(&record)).expect("serialize"));
    });
    group.bench_function("write_record", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(AUDIT_WRITES_PER_TRUNCATE);
                let start = Instant::now();
                for _ in 0..chunk {
                    log.write(black_box(&record)).expect("audit write");
                }
                timed += start.elapsed();
                truncator.set_len(0).expect("truncate the audit log");
                left -= chunk;
            }
            timed
        });
    });
    group.finish();

    // What metrics add to every record: the observer (per-worker atomics, the tool label
    // looked up in a table loaded without a lock).
    let tools: Vec<String> = (0..200)
        .map(|i| format!("tool_{i}"))
        .chain(["start_security_scan".into()])
        .collect();
    let metrics = mcpwarden::metrics::Metrics::new(
        2,
        vec!["security-scanner".into()],
        &tools,
        mcpwarden::admin::health::Health::default(),
    );
    mcpwarden::metrics::set_shard(1);
    let mut group = c.benchmark_group("metrics");
    group.bench_function("observe_decision", |b| {
        b.iter(|| mcpwarden::audit::Observer::observe(&metrics, black_box(&record)));
    });
    group.finish();

    drop(truncator);
    drop(log);
    std::fs::remove_dir_all(&dir).expect("remove the benchmark's audit directory");
}

/// A typical `tools/call` request body, about 200 bytes.
const TOOLS_CALL_BODY: &str = r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"start_security_scan","arguments":{"target":"https://staging.example.internal","depth":3,"include_subdomains":false},"_meta":{"progressToken":"scan-42"}}}"#;

fn mcp_benches(c: &mut Criterion) {
    let headers = http::HeaderMap::new();
    let body = TOOLS_CALL_BODY.as_bytes();
    match mcp::parse_body(body, &headers) {
        Ok(Parsed::Single(message)) if message.is_tool_call() => {}
        other => panic!("the benchmark body must parse as one tools/call: {other:?}"),
    }

    let mut group = c.benchmark_group("mcp");
    group.bench_function("parse_tools_call", |b| {
        b.iter(|| mcp::parse_body(black_box(body), &headers));
    });

    let result = r#"{"jsonrpc":"2.0","id":42,"result":{"content":[{"type":"text","text":"scan started: job 8812"}],"isError":false}}"#;
    let visible = |t: &str| !t.ends_with('7');
    let no_ids: [serde_json::Value; 0] = [];
    let rule = mcp::ListingRule {
        visible: &visible,
        listing_ids: &no_ids,
        per_caller: true,
    };
    assert!(mcp::inspect(result, &rule).rewritten.is_none());
    group.bench_function("inspect_result", |b| {
        b.iter(|| mcp::inspect(black_box(result), &rule));
    });
    let tools: Vec<serde_json::Value> = (0..50)
        .map(|i| serde_json::json!({"name": format!("tool_{i:02}"), "description": "does a thing",
            "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}))
        .collect();
    let listing =
        serde_json::json!({"jsonrpc": "2.0", "id": 7, "result": {"tools": tools}}).to_string();
    let ids = [serde_json::Value::from(7)];
    let listing_rule = mcp::ListingRule {
        visible: &visible,
        listing_ids: &ids,
        per_caller: true,
    };
    assert_eq!(
        mcp::inspect(&listing, &listing_rule).filtered[0]
            .1
            .removed
            .len(),
        5
    );
    group.bench_function("filter_listing_50", |b| {
        b.iter(|| mcp::inspect(black_box(&listing), &listing_rule));
    });
    let events: String = (0..8)
        .map(|i| format!("event: message\r\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":\"t\",\"progress\":{i},\"total\":8}}}}\r\n\r\n"))
        .collect();
    group.bench_function("sse_split_8_events", |b| {
        b.iter(|| {
            let mut s = mcp::SseSplitter::new(1 << 20);
            s.push(black_box(events.as_bytes())).map(|e| e.len())
        });
    });
    group.finish();
}

/// The CA work behind a TLS handshake: minting a leaf (key generation + ECDSA signature), and
/// the cache hit every later handshake for that name costs.
fn tls_benches(c: &mut Criterion) {
    use mcpwarden::ca::{Ca, CaSettings, LeafName};
    let dir = std::env::temp_dir().join(format!("mcpwarden-bench-ca-{}", std::process::id()));
    let ca = Ca::load_or_generate(&CaSettings {
        state_dir: dir.clone(),
        ..CaSettings::default()
    })
    .unwrap_or_else(|e| panic!("generating a CA in {}: {e:#}", dir.display()));
    let name = LeafName::Dns("mcp.example.test".into());
    let mut group = c.benchmark_group("tls");
    group.bench_function("mint_leaf", |b| {
        b.iter(|| ca.mint(black_box(&name), std::time::SystemTime::now()));
    });
    let leaves = mcpwarden::intercept::Leaves::new(
        std::sync::Arc::new(ca),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let offer = mcpwarden::intercept::Offer::H2AndHttp11;
    if let Err(e) = rt.block_on(leaves.config(&name, offer)) {
        panic!("the first config must mint: {e:#}");
    }
    group.bench_function("cached_leaf_config", |b| {
        b.iter(|| rt.block_on(leaves.config(black_box(&name), offer)));
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    policy_benches,
    mixed_policy_benches,
    audit_benches,
    mcp_benches,
    tls_benches
);
criterion_main!(benches);
