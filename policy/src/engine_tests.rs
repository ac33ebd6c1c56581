//! Tests of decisions, rate limits and quotas. Time is synthetic: a base
//! instant plus offsets; nothing sleeps.
//!
//! Most constructs are tested by tables: rows of (policy, call, expected
//! outcome, rule pointer, reason substring), each decided by a fresh engine.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load_tests::{ISSUE_SEED, SEED};
use super::{Call, CallerScope, Decision, Engine, Outcome, Policy, Reservation};

const ONE: CallerScope<'static> = CallerScope {
    grant: "4242",
    process: "pid:17",
    session: "session:a",
    namespace: "",
    service_account: "",
};

fn engine(text: &str) -> Engine {
    Engine::new(Policy::parse(text, "policy.json").unwrap_or_else(|e| panic!("{e}")))
}

fn engine_json(policy: &Value) -> Engine {
    engine(&policy.to_string())
}

/// A `default: deny` policy with the given `tools` object.
fn deny_with(tools: Value) -> Value {
    json!({"version": "1", "default": "deny", "tools": tools})
}

/// A policy with `default: deny` and the given `tools` object, as text.
fn engine_with_tools(tools: &str) -> Engine {
    engine(&format!(
        r#"{{"version": "1", "default": "deny", "tools": {tools}}}"#
    ))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn decide(engine: &Engine, tool: &str, caller: &CallerScope<'_>, now: Instant) -> Decision {
    engine.decide_call(
        &Call {
            tool,
            arguments: None,
        },
        caller,
        now,
    )
}

fn decide_args(
    engine: &Engine,
    tool: &str,
    args: &Value,
    caller: &CallerScope<'_>,
    now: Instant,
) -> Decision {
    engine.decide_call(
        &Call {
            tool,
            arguments: Some(args),
        },
        caller,
        now,
    )
}

fn assert_decision(d: &Decision, outcome: Outcome, rule: &str, reason: Option<&str>) {
    assert_eq!(d.outcome, outcome, "{d:?}");
    assert_eq!(d.rule, rule, "{d:?}");
    assert_eq!(d.reason.as_deref(), reason, "{d:?}");
}

fn is_allowed(engine: &Engine, tool: &str, caller: &CallerScope<'_>, now: Instant) -> bool {
    decide(engine, tool, caller, now).outcome == Outcome::Allow
}

// ---------------------------------------------------------------------------
// The table runner
// ---------------------------------------------------------------------------

/// One row: a policy, a call (made `prior` times before the one checked, at the same instant
/// and by the same caller), and what the checked call must get.
struct Case {
    name: &'static str,
    policy: Value,
    tool: &'static str,
    args: Option<Value>,
    prior: usize,
    outcome: Outcome,
    would: Option<Outcome>,
    rule: &'static str,
    /// A substring of the reason; `None`: there must be no reason.
    reason: Option<&'static str>,
}

fn case(
    name: &'static str,
    policy: Value,
    tool: &'static str,
    args: Option<Value>,
    outcome: Outcome,
    rule: &'static str,
    reason: Option<&'static str>,
) -> Case {
    Case {
        name,
        policy,
        tool,
        args,
        prior: 0,
        outcome,
        would: None,
        rule,
        reason,
    }
}

impl Case {
    fn prior(mut self, calls: usize) -> Case {
        self.prior = calls;
        self
    }

    fn would(mut self, outcome: Outcome) -> Case {
        self.would = Some(outcome);
        self
    }

    fn check(&self, d: &Decision, how: &str) {
        let name = self.name;
        assert_eq!(d.outcome, self.outcome, "{name} ({how}): {d:?}");
        assert_eq!(d.would, self.would, "{name} ({how}): {d:?}");
        assert_eq!(d.rule, self.rule, "{name} ({how}): {d:?}");
        match self.reason {
            None => assert_eq!(d.reason, None, "{name} ({how}): {d:?}"),
            Some(words) => {
                let reason = d.reason.as_deref().unwrap_or("");
                assert!(
                    reason.contains(words),
                    "{name} ({how}): reason {reason:?} lacks {words:?}"
                );
            }
        }
        if d.outcome != Outcome::Allow || d.would.is_some() {
            assert!(d.reservation.is_none(), "{name} ({how}): {d:?}");
        }
    }
}

/// Decides every row with `decide_call` and with `explain`, each on a fresh engine.
fn run(cases: &[Case]) {
    for c in cases {
        let call = Call {
            tool: c.tool,
            arguments: c.args.as_ref(),
        };
        let now = Instant::now();

        let engine = engine_json(&c.policy);
        for _ in 0..c.prior {
            let _ = engine.decide_call(&call, &ONE, now);
        }
        c.check(&engine.decide_call(&call, &ONE, now), "decide_call");

        let engine = engine_json(&c.policy);
        for _ in 0..c.prior {
            let _ = engine.explain(&call, &ONE, now);
        }
        let explanation = engine.explain(&call, &ONE, now);
        c.check(&explanation.decision, "explain");
        assert!(!explanation.steps.is_empty(), "{}", c.name);
    }
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

#[test]
fn visibility_and_actions() {
    use Outcome::{Allow, ApprovalRequired, Deny, UnknownTool};
    let cases = [
        case(
            "hidden by name",
            json!({"version": "1", "default": "allow", "hide": ["secret"]}),
            "secret",
            None,
            UnknownTool,
            "/hide",
            Some("tool secret is hidden by this policy"),
        ),
        case(
            "not hidden: name differs",
            json!({"version": "1", "default": "allow", "hide": ["secret"]}),
            "secrets",
            None,
            Allow,
            "/default",
            None,
        ),
        case(
            "hidden by pattern",
            json!({"version": "1", "default": "allow", "hide": ["admin_*"]}),
            "admin_drop",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "hidden by suffix pattern",
            json!({"version": "1", "default": "allow", "hide": ["*_internal"]}),
            "db_internal",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "not matched by pattern",
            json!({"version": "1", "default": "allow", "hide": ["admin_*"]}),
            "user_admin",
            None,
            Allow,
            "/default",
            None,
        ),
        case(
            "hide star",
            json!({"version": "1", "default": "allow", "hide": "*", "tools": {"echo": {}}}),
            "echo",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "star in the hide list",
            json!({"version": "1", "default": "allow", "hide": ["x", "*"]}),
            "anything",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "hide beats an allow rule",
            json!({"version": "1", "default": "deny", "hide": ["secret"], "tools": {"secret": {"action": "allow"}}}),
            "secret",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "hide beats a deny rule",
            json!({"version": "1", "default": "deny", "hide": ["drop_*"], "tools": {"drop_db": {"action": "deny", "reason": "no"}}}),
            "drop_db",
            None,
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "default deny: unlisted is unknown",
            deny_with(json!({"echo": {}})),
            "delete_everything",
            None,
            UnknownTool,
            "/default",
            Some("tool delete_everything is not allowed by this policy (default deny)"),
        ),
        case(
            "default allow: unlisted is allowed",
            json!({"version": "1", "default": "allow", "tools": {"wipe": {"action": "deny"}}}),
            "anything",
            None,
            Allow,
            "/default",
            None,
        ),
        case(
            "listed without action is allowed",
            deny_with(json!({"list": {}})),
            "list",
            None,
            Allow,
            "/tools/list",
            None,
        ),
        case(
            "action allow",
            deny_with(json!({"read": {"action": "allow"}})),
            "read",
            None,
            Allow,
            "/tools/read",
            None,
        ),
        case(
            "action deny, default reason",
            json!({"version": "1", "default": "allow", "tools": {"wipe": {"action": "deny"}}}),
            "wipe",
            None,
            Deny,
            "/tools/wipe/action",
            Some("tool wipe is denied by policy"),
        ),
        case(
            "action deny with reason",
            deny_with(json!({"drop_cluster": {"action": "deny", "reason": "destructive"}})),
            "drop_cluster",
            None,
            Deny,
            "/tools/drop_cluster/action",
            Some("destructive"),
        ),
        case(
            "action deny with on_deny",
            deny_with(json!({"drop": {"action": "deny", "on_deny": "ask ops"}})),
            "drop",
            None,
            Deny,
            "/tools/drop/action",
            Some("ask ops"),
        ),
        case(
            "pointer tokens are escaped",
            deny_with(json!({"a/b~c": {"action": "deny", "on_deny": "no slashes"}})),
            "a/b~c",
            None,
            Deny,
            "/tools/a~1b~0c/action",
            Some("no slashes"),
        ),
        case(
            "require_approval",
            deny_with(json!({"pay": {"action": "require_approval"}})),
            "pay",
            None,
            ApprovalRequired,
            "/tools/pay/action",
            Some("requires approval"),
        ),
        case(
            "require_approval with reason",
            deny_with(
                json!({"pay": {"action": "require_approval", "reason": "a human confirms payments"}}),
            ),
            "pay",
            None,
            ApprovalRequired,
            "/tools/pay/action",
            Some("a human confirms payments"),
        ),
        case(
            "deny decides before argument checks",
            deny_with(json!({"d": {"action": "deny",
                "arguments": {"required": ["x"]},
                "deny_if": [{"path": "args.x", "op": "exists", "value": false}]}})),
            "d",
            None,
            Deny,
            "/tools/d/action",
            Some("denied"),
        ),
    ];
    run(&cases);
}

#[test]
fn rule_precedence() {
    use Outcome::{Allow, ApprovalRequired, Deny, UnknownTool};
    let tools = json!({
        "*": {"action": "deny", "reason": "catch-all"},
        "get_*": {},
        "get_secret_*": {"action": "deny", "reason": "secrets"},
        "get_secret_ok": {}
    });
    let p = || deny_with(tools.clone());
    // "*" and "*_pay" would tie (both prefix 0), so suffixes get a policy of their own.
    let suffixes = || {
        deny_with(json!({
            "*_pay": {"action": "require_approval"},
            "wire_*": {"action": "deny", "reason": "wires"}
        }))
    };
    let cases = [
        case(
            "exact beats patterns",
            p(),
            "get_secret_ok",
            None,
            Allow,
            "/tools/get_secret_ok",
            None,
        ),
        case(
            "longest prefix wins",
            p(),
            "get_secret_key",
            None,
            Deny,
            "/tools/get_secret_*/action",
            Some("secrets"),
        ),
        case(
            "shorter prefix",
            p(),
            "get_user",
            None,
            Allow,
            "/tools/get_*",
            None,
        ),
        case(
            "empty remainder",
            p(),
            "get_",
            None,
            Allow,
            "/tools/get_*",
            None,
        ),
        case(
            "catch-all",
            p(),
            "put_user",
            None,
            Deny,
            "/tools/*/action",
            Some("catch-all"),
        ),
        case(
            "catch-all, prefix only",
            p(),
            "get",
            None,
            Deny,
            "/tools/*/action",
            Some("catch-all"),
        ),
        // "wire_*" (prefix 5) beats "*_pay" (prefix 0).
        case(
            "prefix beats suffix pattern",
            suffixes(),
            "wire_pay",
            None,
            Deny,
            "/tools/wire_*/action",
            Some("wires"),
        ),
        case(
            "suffix pattern",
            suffixes(),
            "card_pay",
            None,
            ApprovalRequired,
            "/tools/*_pay/action",
            Some("approval"),
        ),
        case(
            "neither",
            suffixes(),
            "card",
            None,
            UnknownTool,
            "/default",
            Some("default deny"),
        ),
        case(
            "no pattern matches under default deny",
            deny_with(json!({"get_*": {}})),
            "put_user",
            None,
            UnknownTool,
            "/default",
            Some("default deny"),
        ),
        case(
            "exact beats a denying pattern",
            deny_with(json!({"get_*": {"action": "deny"}, "get_user": {}})),
            "get_user",
            None,
            Allow,
            "/tools/get_user",
            None,
        ),
        case(
            "exact deny beats an allowing pattern",
            deny_with(json!({"get_*": {}, "get_user": {"action": "deny"}})),
            "get_user",
            None,
            Deny,
            "/tools/get_user/action",
            Some("denied"),
        ),
        case(
            "same-length non-overlapping patterns",
            deny_with(json!({"get_*": {}, "put_*": {"action": "deny"}})),
            "put_x",
            None,
            Deny,
            "/tools/put_*/action",
            Some("denied"),
        ),
        case(
            "pattern rules check arguments too",
            deny_with(json!({"get_*": {"deny_if": [{"path": "args.id", "op": "eq", "value": 0}]}})),
            "get_user",
            Some(json!({"id": 0})),
            Deny,
            "/tools/get_*/deny_if/0",
            Some("args.id eq 0"),
        ),
    ];
    run(&cases);
}

#[test]
fn argument_schemas() {
    use Outcome::{Allow, Deny};
    let schema = json!({
        "type": "object",
        "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["usd", "eur"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "string"}}}}
        },
        "required": ["amount"],
        "additionalProperties": false
    });
    let p = || deny_with(json!({"pay": {"arguments": schema.clone()}}));
    let cases = [
        case(
            "valid",
            p(),
            "pay",
            Some(json!({"amount": 5, "currency": "usd"})),
            Allow,
            "/tools/pay",
            None,
        ),
        case(
            "wrong type names the path",
            p(),
            "pay",
            Some(json!({"amount": "5"})),
            Deny,
            "/tools/pay/arguments",
            Some("/amount"),
        ),
        case(
            "above maximum",
            p(),
            "pay",
            Some(json!({"amount": 1001})),
            Deny,
            "/tools/pay/arguments",
            Some("/amount"),
        ),
        case(
            "enum",
            p(),
            "pay",
            Some(json!({"amount": 1, "currency": "gbp"})),
            Deny,
            "/tools/pay/arguments",
            Some("/currency"),
        ),
        case(
            "nested path",
            p(),
            "pay",
            Some(json!({"amount": 1, "items": [{"id": "a"}, {"id": 7}]})),
            Deny,
            "/tools/pay/arguments",
            Some("/items/1/id"),
        ),
        case(
            "missing required",
            p(),
            "pay",
            Some(json!({"currency": "usd"})),
            Deny,
            "/tools/pay/arguments",
            Some("invalid arguments for pay"),
        ),
        case(
            "additional property",
            p(),
            "pay",
            Some(json!({"amount": 1, "extra": true})),
            Deny,
            "/tools/pay/arguments",
            Some("invalid arguments"),
        ),
        case(
            "no arguments are {}",
            p(),
            "pay",
            None,
            Deny,
            "/tools/pay/arguments",
            Some("invalid arguments"),
        ),
        case(
            "no arguments, nothing required",
            deny_with(json!({"t": {"arguments": {"type": "object"}}})),
            "t",
            None,
            Allow,
            "/tools/t",
            None,
        ),
        case(
            "arguments that are not an object",
            deny_with(json!({"t": {"arguments": {"type": "object"}}})),
            "t",
            Some(json!([1, 2])),
            Deny,
            "/tools/t/arguments",
            Some("invalid arguments"),
        ),
        case(
            "schema false refuses everything",
            deny_with(json!({"t": {"arguments": false}})),
            "t",
            Some(json!({})),
            Deny,
            "/tools/t/arguments",
            Some("invalid arguments"),
        ),
        case(
            "schema true accepts everything",
            deny_with(json!({"t": {"arguments": true}})),
            "t",
            Some(json!({"anything": [1]})),
            Allow,
            "/tools/t",
            None,
        ),
        case(
            "local $ref",
            deny_with(json!({"t": {"arguments": {
                "$defs": {"pos": {"type": "integer", "minimum": 1}},
                "properties": {"n": {"$ref": "#/$defs/pos"}}}}})),
            "t",
            Some(json!({"n": 0})),
            Deny,
            "/tools/t/arguments",
            Some("/n"),
        ),
        case(
            "2020-12 keywords: prefixItems",
            deny_with(json!({"t": {"arguments": {
                "properties": {"pair": {"prefixItems": [{"type": "string"}, {"type": "integer"}]}}}}})),
            "t",
            Some(json!({"pair": ["a", "b"]})),
            Deny,
            "/tools/t/arguments",
            Some("/pair/1"),
        ),
        case(
            "the rule's reason does not hide the failing path",
            deny_with(
                json!({"t": {"reason": "bad call", "arguments": {"properties": {"n": {"type": "integer"}}}}}),
            ),
            "t",
            Some(json!({"n": "x"})),
            Deny,
            "/tools/t/arguments",
            Some("/n"),
        ),
    ];
    run(&cases);
}

/// How a condition comes out for some arguments, before `deny_if`/`require` apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Holds,
    Fails,
    WrongType,
    Missing,
}

#[test]
fn conditions_every_op_in_deny_if_and_require() {
    use Verdict::{Fails, Holds, Missing, WrongType};
    let eq = json!({"path": "args.env", "op": "eq", "value": "prod"});
    let eq_num = json!({"path": "args.n", "op": "eq", "value": 1});
    let neq = json!({"path": "args.env", "op": "neq", "value": "prod"});
    let in_ = json!({"path": "args.env", "op": "in", "value": ["prod", "staging"]});
    let not_in = json!({"path": "args.env", "op": "not_in", "value": ["prod", "staging"]});
    let lt = json!({"path": "args.amount", "op": "lt", "value": 100});
    let lte = json!({"path": "args.amount", "op": "lte", "value": 100});
    let gt = json!({"path": "args.amount", "op": "gt", "value": 100});
    let gte = json!({"path": "args.amount", "op": "gte", "value": 100});
    let regex = json!({"path": "args.cmd", "op": "regex", "value": "^rm\\s"});
    let contains_str = json!({"path": "args.text", "op": "contains", "value": "secret"});
    let contains_arr = json!({"path": "args.roles", "op": "contains", "value": "admin"});
    let exists = json!({"path": "args.token", "op": "exists"});
    let exists_true = json!({"path": "args.token", "op": "exists", "value": true});
    let not_exists = json!({"path": "args.token", "op": "exists", "value": false});
    let nested = json!({"path": "args.items.0.id", "op": "eq", "value": "x"});
    let all = json!({"all": [
        {"path": "args.amount", "op": "gt", "value": 10},
        {"path": "args.currency", "op": "eq", "value": "usd"}]});
    let any = json!({"any": [
        {"path": "args.amount", "op": "gt", "value": 10},
        {"path": "args.currency", "op": "eq", "value": "usd"}]});
    let nest = json!({"any": [
        {"all": [{"path": "args.a", "op": "exists"}, {"path": "args.b", "op": "exists"}]},
        {"path": "args.c", "op": "eq", "value": true}]});
    let rows: Vec<(&Value, Value, Verdict)> = vec![
        (&eq, json!({"env": "prod"}), Holds),
        (&eq, json!({"env": "dev"}), Fails),
        (&eq, json!({"env": 1}), WrongType),
        (&eq, json!({}), Missing),
        (&eq_num, json!({"n": 1.0}), Holds),
        (&eq_num, json!({"n": 2}), Fails),
        (&eq_num, json!({"n": "1"}), WrongType),
        (&neq, json!({"env": "dev"}), Holds),
        (&neq, json!({"env": "prod"}), Fails),
        (&neq, json!({"env": 5}), WrongType),
        (&neq, json!({}), Missing),
        (&in_, json!({"env": "staging"}), Holds),
        (&in_, json!({"env": "dev"}), Fails),
        (&in_, json!({"env": 3}), WrongType),
        (&in_, json!({"other": "prod"}), Missing),
        (&not_in, json!({"env": "dev"}), Holds),
        (&not_in, json!({"env": "prod"}), Fails),
        (&not_in, json!({"env": true}), WrongType),
        (&not_in, json!({}), Missing),
        (&lt, json!({"amount": 99}), Holds),
        (&lt, json!({"amount": 99.5}), Holds),
        (&lt, json!({"amount": 100}), Fails),
        (&lt, json!({"amount": "5"}), WrongType),
        (&lt, json!({}), Missing),
        (&lte, json!({"amount": 100}), Holds),
        (&lte, json!({"amount": 100.5}), Fails),
        (&lte, json!({"amount": [1]}), WrongType),
        (&gt, json!({"amount": 101}), Holds),
        (&gt, json!({"amount": 100}), Fails),
        (&gt, json!({"amount": "200"}), WrongType),
        (&gt, json!({"amount": null}), WrongType),
        (&gt, json!({}), Missing),
        (&gte, json!({"amount": 100}), Holds),
        (&gte, json!({"amount": 99.9}), Fails),
        (&gte, json!({"amount": {"v": 1}}), WrongType),
        (&regex, json!({"cmd": "rm -rf /"}), Holds),
        (&regex, json!({"cmd": "echo rm -rf"}), Fails),
        (&regex, json!({"cmd": 42}), WrongType),
        (&regex, json!({}), Missing),
        (&contains_str, json!({"text": "top secret plan"}), Holds),
        (&contains_str, json!({"text": "public"}), Fails),
        (&contains_str, json!({"text": 5}), WrongType),
        (&contains_str, json!({}), Missing),
        (&contains_arr, json!({"roles": ["user", "admin"]}), Holds),
        (&contains_arr, json!({"roles": ["user"]}), Fails),
        (&contains_arr, json!({"roles": []}), Fails),
        (&exists, json!({"token": null}), Holds),
        (&exists, json!({"token": "t"}), Holds),
        (&exists, json!({}), Fails),
        (&exists_true, json!({"token": 0}), Holds),
        (&not_exists, json!({}), Holds),
        (&not_exists, json!({"token": 1}), Fails),
        (&nested, json!({"items": [{"id": "x"}]}), Holds),
        (&nested, json!({"items": [{"id": "y"}]}), Fails),
        (&nested, json!({"items": []}), Missing),
        (&nested, json!({"items": "x"}), Missing),
        (&all, json!({"amount": 11, "currency": "usd"}), Holds),
        (&all, json!({"amount": 11, "currency": "eur"}), Fails),
        (&all, json!({"amount": 11}), Missing),
        (&all, json!({"amount": "11", "currency": "usd"}), WrongType),
        (&any, json!({"amount": 1, "currency": "usd"}), Holds),
        (&any, json!({"amount": 11}), Holds),
        (&any, json!({"amount": 1, "currency": "eur"}), Fails),
        (&any, json!({}), Missing),
        (&nest, json!({"a": 1, "b": 2}), Holds),
        (&nest, json!({"c": true}), Holds),
        (&nest, json!({"a": 1, "c": false}), Fails),
    ];
    let mut cases = Vec::new();
    for (condition, args, verdict) in rows {
        // deny_if: denied when the condition holds, or a type is wrong (fail closed).
        let denied = matches!(verdict, Holds | WrongType);
        cases.push(if denied {
            case(
                "deny_if",
                deny_with(json!({"t": {"deny_if": [condition]}})),
                "t",
                Some(args.clone()),
                Outcome::Deny,
                "/tools/t/deny_if/0",
                Some("deny_if condition holds"),
            )
        } else {
            case(
                "deny_if",
                deny_with(json!({"t": {"deny_if": [condition]}})),
                "t",
                Some(args.clone()),
                Outcome::Allow,
                "/tools/t",
                None,
            )
        });
        // require: denied unless the condition holds; a wrong type or a missing path fails.
        cases.push(if verdict == Holds {
            case(
                "require",
                deny_with(json!({"t": {"require": [condition]}})),
                "t",
                Some(args.clone()),
                Outcome::Allow,
                "/tools/t",
                None,
            )
        } else {
            case(
                "require",
                deny_with(json!({"t": {"require": [condition]}})),
                "t",
                Some(args.clone()),
                Outcome::Deny,
                "/tools/t/require/0",
                Some("require condition does not hold"),
            )
        });
        // The row label is static; say which row failed.
        let (deny_if, require) = (cases.len() - 2, cases.len() - 1);
        for index in [deny_if, require] {
            let c = &cases[index];
            let call = Call {
                tool: c.tool,
                arguments: c.args.as_ref(),
            };
            let d = engine_json(&c.policy).decide_call(&call, &ONE, Instant::now());
            assert!(
                d.outcome == c.outcome && d.rule == c.rule,
                "{} {condition} with {args}: expected {:?} {}, got {d:?} ({verdict:?})",
                c.name,
                c.outcome,
                c.rule
            );
        }
    }
    run(&cases);
}

#[test]
fn condition_lists_and_reasons() {
    use Outcome::{Allow, Deny};
    let no = json!({"path": "args.x", "op": "eq", "value": "never"});
    let big = json!({"path": "args.amount", "op": "gt", "value": 100});
    let ticket = json!({"path": "args.ticket", "op": "exists"});
    let cases = [
        case(
            "second deny_if",
            deny_with(json!({"t": {"deny_if": [no, big]}})),
            "t",
            Some(json!({"amount": 101})),
            Deny,
            "/tools/t/deny_if/1",
            Some("deny_if condition holds: args.amount gt 100"),
        ),
        case(
            "second require",
            deny_with(json!({"t": {"require": [big, ticket]}})),
            "t",
            Some(json!({"amount": 101})),
            Deny,
            "/tools/t/require/1",
            Some("require condition does not hold: args.ticket exists"),
        ),
        case(
            "every require holds",
            deny_with(json!({"t": {"require": [big, ticket]}})),
            "t",
            Some(json!({"amount": 101, "ticket": "T-1"})),
            Allow,
            "/tools/t",
            None,
        ),
        case(
            "deny_if before require",
            deny_with(json!({"t": {"require": [ticket], "deny_if": [big]}})),
            "t",
            Some(json!({"amount": 101})),
            Deny,
            "/tools/t/deny_if/0",
            Some("deny_if"),
        ),
        case(
            "the rule's reason leads",
            deny_with(
                json!({"t": {"reason": "payments over 100 need a ticket", "require": [ticket]}}),
            ),
            "t",
            Some(json!({})),
            Deny,
            "/tools/t/require/0",
            Some("payments over 100 need a ticket"),
        ),
        case(
            "the rule's on_deny leads, the condition follows",
            deny_with(json!({"t": {"on_deny": "too big", "deny_if": [big]}})),
            "t",
            Some(json!({"amount": 101})),
            Deny,
            "/tools/t/deny_if/0",
            Some("args.amount gt 100"),
        ),
        case(
            "a call without arguments: paths are missing",
            deny_with(json!({"t": {"deny_if": [big]}})),
            "t",
            None,
            Allow,
            "/tools/t",
            None,
        ),
        case(
            "a call without arguments fails require",
            deny_with(json!({"t": {"require": [ticket]}})),
            "t",
            None,
            Deny,
            "/tools/t/require/0",
            Some("args.ticket exists"),
        ),
        case(
            "the reason does not carry argument values",
            deny_with(
                json!({"t": {"deny_if": [{"path": "args.card", "op": "regex", "value": "^4"}]}}),
            ),
            "t",
            Some(json!({"card": "4111111111111111"})),
            Deny,
            "/tools/t/deny_if/0",
            Some("args.card regex \"^4\""),
        ),
    ];
    run(&cases);
    // And the reason never quotes the argument value.
    let e = engine_json(&deny_with(
        json!({"t": {"deny_if": [{"path": "args.card", "op": "regex", "value": "^4"}]}}),
    ));
    let d = decide_args(
        &e,
        "t",
        &json!({"card": "4111111111111111"}),
        &ONE,
        Instant::now(),
    );
    assert!(!d.reason.unwrap_or_default().contains("4111"));
}

#[test]
fn all_tools_rules() {
    use Outcome::{Allow, Deny, UnknownTool};
    let prod = json!({"path": "args.env", "op": "eq", "value": "prod"});
    let ticket = json!({"path": "args.ticket", "op": "exists"});
    let limit = |counter: &str, max: u32| json!({"counter": counter, "window": "minute", "max": max, "scope": "grant"});
    let cases = [
        case(
            "deny_if on a default-allowed unlisted tool",
            json!({"version": "1", "default": "allow", "all_tools": {"deny_if": [prod]}}),
            "anything",
            Some(json!({"env": "prod"})),
            Deny,
            "/all_tools/deny_if/0",
            Some("deny_if condition holds: args.env eq \"prod\""),
        ),
        case(
            "deny_if that does not hold",
            json!({"version": "1", "default": "allow", "all_tools": {"deny_if": [prod]}}),
            "anything",
            Some(json!({"env": "dev"})),
            Allow,
            "/default",
            None,
        ),
        case(
            "second all_tools deny_if",
            json!({"version": "1", "default": "allow", "all_tools": {"deny_if": [ticket, prod]}}),
            "anything",
            Some(json!({"env": "prod"})),
            Deny,
            "/all_tools/deny_if/1",
            Some("args.env"),
        ),
        case(
            "require on a listed tool",
            json!({"version": "1", "default": "deny", "all_tools": {"require": [ticket]}, "tools": {"t": {}}}),
            "t",
            Some(json!({})),
            Deny,
            "/all_tools/require/0",
            Some("require condition does not hold"),
        ),
        case(
            "require on a pattern-matched tool",
            json!({"version": "1", "default": "deny", "all_tools": {"require": [ticket]}, "tools": {"get_*": {}}}),
            "get_x",
            Some(json!({"ticket": 1})),
            Allow,
            "/tools/get_*",
            None,
        ),
        case(
            "all_tools before the tool's own deny_if",
            json!({"version": "1", "default": "deny", "all_tools": {"deny_if": [prod]},
                   "tools": {"t": {"deny_if": [prod]}}}),
            "t",
            Some(json!({"env": "prod"})),
            Deny,
            "/all_tools/deny_if/0",
            Some("deny_if"),
        ),
        case(
            "an all_tools refusal is not prefixed with the tool's reason",
            json!({"version": "1", "default": "deny", "all_tools": {"deny_if": [prod]},
                   "tools": {"t": {"reason": "not in prod"}}}),
            "t",
            Some(json!({"env": "prod"})),
            Deny,
            "/all_tools/deny_if/0",
            Some("deny_if condition holds: args.env eq \"prod\""),
        ),
        case(
            "the tool's reason prefixes its own refusals",
            json!({"version": "1", "default": "deny",
                   "tools": {"t": {"reason": "not in prod", "deny_if": [prod]}}}),
            "t",
            Some(json!({"env": "prod"})),
            Deny,
            "/tools/t/deny_if/0",
            Some("not in prod (deny_if condition holds: args.env eq \"prod\")"),
        ),
        case(
            "explicit deny decides before all_tools",
            json!({"version": "1", "default": "deny", "all_tools": {"deny_if": [prod]},
                   "tools": {"d": {"action": "deny", "reason": "no"}}}),
            "d",
            Some(json!({"env": "prod"})),
            Deny,
            "/tools/d/action",
            Some("no"),
        ),
        case(
            "hidden decides before all_tools",
            json!({"version": "1", "default": "allow", "hide": ["h"], "all_tools": {"deny_if": [prod]}}),
            "h",
            Some(json!({"env": "prod"})),
            UnknownTool,
            "/hide",
            Some("hidden"),
        ),
        case(
            "default deny decides before all_tools",
            json!({"version": "1", "default": "deny", "all_tools": {"deny_if": [prod]}}),
            "x",
            Some(json!({"env": "prod"})),
            UnknownTool,
            "/default",
            Some("default deny"),
        ),
        case(
            "the tool's schema decides before all_tools conditions",
            json!({"version": "1", "default": "deny", "all_tools": {"deny_if": [prod]},
                   "tools": {"t": {"arguments": {"properties": {"env": {"enum": ["dev"]}}}}}}),
            "t",
            Some(json!({"env": "prod"})),
            Deny,
            "/tools/t/arguments",
            Some("/env"),
        ),
        case(
            "all_tools limits on a default-allowed tool: the second is exhausted",
            json!({"version": "1", "default": "allow",
                   "all_tools": {"limits": [limit("wide", 5), limit("narrow", 1)]}}),
            "anything",
            None,
            Deny,
            "/all_tools/limits/1",
            Some("rate limit narrow exceeded: at most 1 call per minute"),
        )
        .prior(1),
        case(
            "all_tools limits on a listed tool",
            json!({"version": "1", "default": "deny",
                   "all_tools": {"limits": [limit("all", 2)]},
                   "tools": {"t": {"limits": [limit("t", 5)]}}}),
            "t",
            None,
            Deny,
            "/all_tools/limits/0",
            Some("rate limit all exceeded"),
        )
        .prior(2),
        case(
            "tool limits after all_tools limits",
            json!({"version": "1", "default": "deny",
                   "all_tools": {"limits": [limit("all", 5)]},
                   "tools": {"t": {"limits": [limit("t", 2)]}}}),
            "t",
            None,
            Deny,
            "/tools/t/limits/0",
            Some("rate limit t exceeded"),
        )
        .prior(2),
        case(
            "within every limit",
            json!({"version": "1", "default": "deny",
                   "all_tools": {"limits": [limit("all", 5)]},
                   "tools": {"t": {"limits": [limit("t", 2)]}}}),
            "t",
            None,
            Allow,
            "/tools/t",
            None,
        )
        .prior(1),
    ];
    run(&cases);
}

#[test]
fn limits_and_increment_from() {
    use Outcome::{Allow, Deny};
    let spend = |max: f64| {
        deny_with(
            json!({"pay": {"limits": [{"counter": "spend", "window": "day", "max": max,
            "scope": "grant", "increment_from": "args.amount"}]}}),
        )
    };
    let cases = [
        case(
            "issue seed: the eleventh call in a minute",
            serde_json::from_str(ISSUE_SEED).unwrap(),
            "start_security_scan",
            None,
            Deny,
            "/tools/start_security_scan/limits/0",
            Some("rate limit start_security_scan_rate exceeded: at most 10 calls per minute"),
        )
        .prior(10),
        case(
            "issue seed: the tenth call",
            serde_json::from_str(ISSUE_SEED).unwrap(),
            "start_security_scan",
            None,
            Allow,
            "/tools/start_security_scan",
            None,
        )
        .prior(9),
        case(
            "spend within the quota",
            spend(10.0),
            "pay",
            Some(json!({"amount": 4})),
            Allow,
            "/tools/pay",
            None,
        )
        .prior(1),
        case(
            "spend beyond the quota",
            spend(10.0),
            "pay",
            Some(json!({"amount": 4})),
            Deny,
            "/tools/pay/limits/0",
            Some("quota spend exceeded: at most 10 of args.amount per day"),
        )
        .prior(2),
        case(
            "fractional amounts",
            spend(1.0),
            "pay",
            Some(json!({"amount": 0.25})),
            Allow,
            "/tools/pay",
            None,
        )
        .prior(3),
        case(
            "fractional amounts, one too many",
            spend(1.0),
            "pay",
            Some(json!({"amount": 0.25})),
            Deny,
            "/tools/pay/limits/0",
            Some("quota"),
        )
        .prior(4),
        case(
            "one amount above max",
            spend(10.0),
            "pay",
            Some(json!({"amount": 11})),
            Deny,
            "/tools/pay/limits/0",
            Some("quota"),
        ),
        case(
            "an amount of exactly max",
            spend(10.0),
            "pay",
            Some(json!({"amount": 10})),
            Allow,
            "/tools/pay",
            None,
        ),
        case(
            "an amount of 0 spends nothing",
            spend(0.0),
            "pay",
            Some(json!({"amount": 0})),
            Allow,
            "/tools/pay",
            None,
        )
        .prior(5),
        case(
            "amount missing",
            spend(10.0),
            "pay",
            Some(json!({"currency": "usd"})),
            Deny,
            "/tools/pay/limits/0/increment_from",
            Some("argument args.amount is missing"),
        ),
        case(
            "no arguments at all",
            spend(10.0),
            "pay",
            None,
            Deny,
            "/tools/pay/limits/0/increment_from",
            Some("is missing"),
        ),
        case(
            "amount not a number",
            spend(10.0),
            "pay",
            Some(json!({"amount": "5"})),
            Deny,
            "/tools/pay/limits/0/increment_from",
            Some("is not a number"),
        ),
        case(
            "amount null",
            spend(10.0),
            "pay",
            Some(json!({"amount": null})),
            Deny,
            "/tools/pay/limits/0/increment_from",
            Some("is not a number"),
        ),
        case(
            "amount negative",
            spend(10.0),
            "pay",
            Some(json!({"amount": -1})),
            Deny,
            "/tools/pay/limits/0/increment_from",
            Some("is negative"),
        ),
        case(
            "a bad amount in the second limit",
            deny_with(json!({"pay": {"limits": [
                {"counter": "calls", "window": "day", "max": 5, "scope": "grant"},
                {"counter": "spend", "window": "day", "max": 5, "scope": "grant", "increment_from": "args.order.total"}]}})),
            "pay",
            Some(json!({"order": {"total": "lots"}})),
            Deny,
            "/tools/pay/limits/1/increment_from",
            Some("args.order.total is not a number"),
        ),
        case(
            "increment_from in all_tools",
            json!({"version": "1", "default": "allow", "all_tools": {"limits": [
                {"counter": "bytes", "window": "hour", "max": 100, "scope": "server", "increment_from": "args.size"}]}}),
            "upload",
            Some(json!({})),
            Deny,
            "/all_tools/limits/0/increment_from",
            Some("is missing"),
        ),
        case(
            "max 0 admits no call",
            deny_with(
                json!({"t": {"limits": [{"counter": "c", "window": "second", "max": 0, "scope": "grant"}]}}),
            ),
            "t",
            None,
            Deny,
            "/tools/t/limits/0",
            Some("rate limit c exceeded: at most 0 calls per second"),
        ),
    ];
    run(&cases);
}

#[test]
fn dry_run_forwards_everything_and_says_what_enforcing_would_do() {
    use Outcome::{Allow, ApprovalRequired, Deny, UnknownTool};
    let policy = json!({"version": "1", "default": "deny", "mode": "dry_run",
    "hide": ["secret"],
    "all_tools": {"deny_if": [{"path": "args.env", "op": "eq", "value": "prod"}]},
    "tools": {
        "drop": {"action": "deny", "reason": "destructive"},
        "pay": {"action": "require_approval"},
        "scan": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "grant"}]},
        "typed": {"arguments": {"required": ["n"]}},
        "echo": {}
    }});
    let p = || policy.clone();
    let cases = [
        case(
            "hidden",
            p(),
            "secret",
            None,
            Allow,
            "/hide",
            Some("hidden"),
        )
        .would(UnknownTool),
        case(
            "unlisted",
            p(),
            "other",
            None,
            Allow,
            "/default",
            Some("default deny"),
        )
        .would(UnknownTool),
        case(
            "denied",
            p(),
            "drop",
            None,
            Allow,
            "/tools/drop/action",
            Some("destructive"),
        )
        .would(Deny),
        case(
            "approval",
            p(),
            "pay",
            None,
            Allow,
            "/tools/pay/action",
            Some("approval"),
        )
        .would(ApprovalRequired),
        case(
            "schema",
            p(),
            "typed",
            Some(json!({})),
            Allow,
            "/tools/typed/arguments",
            Some("invalid arguments"),
        )
        .would(Deny),
        case(
            "condition",
            p(),
            "echo",
            Some(json!({"env": "prod"})),
            Allow,
            "/all_tools/deny_if/0",
            Some("deny_if"),
        )
        .would(Deny),
        case(
            "limit",
            p(),
            "scan",
            None,
            Allow,
            "/tools/scan/limits/0",
            Some("rate limit c exceeded"),
        )
        .prior(1)
        .would(Deny),
        case("allowed", p(), "echo", None, Allow, "/tools/echo", None),
        case(
            "first call within the limit",
            p(),
            "scan",
            None,
            Allow,
            "/tools/scan",
            None,
        ),
    ];
    run(&cases);

    let engine = engine_json(&policy);
    let listed = engine.policy();
    assert!(listed.dry_run());
    for tool in ["secret", "other", "drop", "echo"] {
        assert!(listed.visible(tool), "{tool}: a dry run lists every tool");
    }
    assert!(listed.visible_all());

    // A dry run still counts: calls within the limit take quota (and can give it back).
    let now = Instant::now();
    let first = decide(&engine, "scan", &ONE, now);
    assert!(
        first.would.is_none() && first.reservation.is_some(),
        "{first:?}"
    );
    assert_eq!(decide(&engine, "scan", &ONE, now).would, Some(Deny));
    first.reservation.unwrap().release();
    assert_eq!(decide(&engine, "scan", &ONE, now).would, None);
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

#[test]
fn engine_and_policy_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
    check::<Policy>();
    check::<Decision>();
    check::<Reservation>();
}

#[test]
fn issue_seed_decides_as_specified() {
    let engine = engine(ISSUE_SEED);
    let base = Instant::now();
    let tool = "start_security_scan";
    for i in 0..10 {
        let d = decide(&engine, tool, &ONE, base + Duration::from_millis(i * 100));
        assert_decision(&d, Outcome::Allow, "/tools/start_security_scan", None);
        assert!(
            d.reservation.is_some(),
            "a limited call carries its reservation"
        );
    }
    assert_decision(
        &decide(&engine, tool, &ONE, base + secs(2)),
        Outcome::Deny,
        "/tools/start_security_scan/limits/0",
        Some("rate limit start_security_scan_rate exceeded: at most 10 calls per minute"),
    );
    // Per grant: another workload has its own ten.
    let other = CallerScope {
        grant: "other-pod",
        ..ONE
    };
    for _ in 0..10 {
        assert!(is_allowed(&engine, tool, &other, base + secs(2)));
    }
    assert!(!is_allowed(&engine, tool, &other, base + secs(2)));
    // Per minute: a minute after the first calls, there is room again.
    assert!(is_allowed(&engine, tool, &ONE, base + secs(61)));
    for unknown in ["drop_cluster", "delete_everything", ""] {
        assert_decision(
            &decide(&engine, unknown, &ONE, base),
            Outcome::UnknownTool,
            "/default",
            Some(&format!(
                "tool {unknown} is not allowed by this policy (default deny)"
            )),
        );
    }
}

#[test]
fn seed_decisions() {
    let engine = engine(SEED);
    let now = Instant::now();
    assert_decision(
        &decide(&engine, "drop_cluster", &ONE, now),
        Outcome::Deny,
        "/tools/drop_cluster/action",
        Some("destructive"),
    );
    assert_decision(
        &decide(&engine, "start_security_scan", &ONE, now),
        Outcome::Allow,
        "/tools/start_security_scan",
        None,
    );
    assert_decision(
        &decide(&engine, "delete_everything", &ONE, now),
        Outcome::UnknownTool,
        "/default",
        Some("tool delete_everything is not allowed by this policy (default deny)"),
    );
    for _ in 1..10 {
        assert!(is_allowed(&engine, "start_security_scan", &ONE, now));
    }
    assert_decision(
        &decide(&engine, "start_security_scan", &ONE, now),
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
        &decide(&engine, "anything", &ONE, now),
        Outcome::Allow,
        "/default",
        None,
    );
    assert_decision(
        &decide(&engine, "read", &ONE, now),
        Outcome::Allow,
        "/tools/read",
        None,
    );
    assert_decision(
        &decide(&engine, "list", &ONE, now),
        Outcome::Allow,
        "/tools/list",
        None,
    );
    assert_decision(
        &decide(&engine, "wipe", &ONE, now),
        Outcome::Deny,
        "/tools/wipe/action",
        Some("tool wipe is denied by policy"),
    );
    assert_decision(
        &decide(&engine, "a/b~c", &ONE, now),
        Outcome::Deny,
        "/tools/a~1b~0c/action",
        Some("no slashes"),
    );
    // Unlimited calls carry no reservation.
    assert!(decide(&engine, "anything", &ONE, now).reservation.is_none());
}

/// The one visibility rule: `hide` and default-deny remove a tool from listings and make it
/// unknown when called; an explicit deny keeps it listed and refuses with the reason.
#[test]
fn hide_and_default_deny_make_tools_invisible_explicit_deny_does_not() {
    let e = engine(
        r#"{"version":"1","default":"deny","hide":["secret", "admin_*"],
            "tools":{"echo":{},"secret":{},"drop":{"action":"deny","reason":"no"},
                     "admin_x":{}}}"#,
    );
    let p = e.policy();
    assert!(p.visible("echo"));
    assert!(p.visible("drop"), "explicitly denied tools stay visible");
    assert!(!p.visible("secret"), "hidden even though listed");
    assert!(
        !p.visible("admin_x"),
        "hidden by a pattern even though listed"
    );
    assert!(!p.visible("other"), "unlisted under default deny");
    assert!(p.hides("admin_y") && !p.hides("echo") && !p.hides("other"));
    let now = Instant::now();
    assert_decision(
        &decide(&e, "secret", &ONE, now),
        Outcome::UnknownTool,
        "/hide",
        Some("tool secret is hidden by this policy"),
    );
    assert_decision(
        &decide(&e, "admin_x", &ONE, now),
        Outcome::UnknownTool,
        "/hide",
        Some("tool admin_x is hidden by this policy"),
    );
    assert_decision(
        &decide(&e, "drop", &ONE, now),
        Outcome::Deny,
        "/tools/drop/action",
        Some("no"),
    );

    let all = engine(r#"{"version":"1","default":"allow","hide":"*","tools":{"echo":{}}}"#);
    assert!(!all.policy().visible("echo"));
    assert!(!all.policy().visible("anything"));
    assert_eq!(
        decide(&all, "echo", &ONE, now).outcome,
        Outcome::UnknownTool
    );

    let open = engine(r#"{"version":"1","default":"allow"}"#);
    assert!(open.policy().visible("anything"));
}

// ---------------------------------------------------------------------------
// Sliding windows
// ---------------------------------------------------------------------------

#[test]
fn explicit_deny_wins_over_limits() {
    let engine = engine_with_tools(
        r#"{"t": {"action": "deny", "limits": [{"counter": "c", "window": "minute", "max": 5, "scope": "grant"}]}}"#,
    );
    let d = decide(&engine, "t", &ONE, Instant::now());
    assert_decision(
        &d,
        Outcome::Deny,
        "/tools/t/action",
        Some("tool t is denied by policy"),
    );
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
}

#[test]
fn refused_calls_take_no_quota() {
    // Refused by a condition or the schema: nothing is counted.
    let engine = engine_json(&deny_with(json!({"t": {
        "arguments": {"properties": {"n": {"type": "integer"}}},
        "deny_if": [{"path": "args.n", "op": "gt", "value": 5}],
        "limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "grant"}]}})));
    let now = Instant::now();
    assert_eq!(
        decide_args(&engine, "t", &json!({"n": "x"}), &ONE, now).outcome,
        Outcome::Deny
    );
    assert_eq!(
        decide_args(&engine, "t", &json!({"n": 6}), &ONE, now).outcome,
        Outcome::Deny
    );
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
    assert_eq!(
        decide_args(&engine, "t", &json!({"n": 1}), &ONE, now).outcome,
        Outcome::Allow
    );
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
fn named_windows() {
    for (window, length) in [
        ("second", secs(1)),
        ("minute", secs(60)),
        ("hour", secs(3600)),
        ("day", secs(86_400)),
    ] {
        let engine = engine_json(&deny_with(json!({"t": {"limits": [
            {"counter": "c", "window": window, "max": 1, "scope": "grant"}]}})));
        let base = Instant::now();
        assert!(is_allowed(&engine, "t", &ONE, base), "{window}");
        assert_decision(
            &decide(&engine, "t", &ONE, base + length),
            Outcome::Deny,
            "/tools/t/limits/0",
            Some(&format!(
                "rate limit c exceeded: at most 1 call per {window}"
            )),
        );
        assert!(
            is_allowed(&engine, "t", &ONE, base + length + Duration::from_nanos(1)),
            "{window}"
        );
    }
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
        &decide(&engine, "t", &ONE, base + secs(20)),
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
    let d = decide(&engine, "t", &ONE, Instant::now());
    assert_decision(
        &d,
        Outcome::Deny,
        "/tools/t/limits/0",
        Some("rate limit c exceeded: at most 0 calls per second"),
    );
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
}

#[test]
fn spend_quota_slides_too() {
    let engine = engine_json(&deny_with(json!({"pay": {"limits": [{"counter": "spend",
        "window": 10, "max": 100, "scope": "grant", "increment_from": "args.amount"}]}})));
    let base = Instant::now();
    let pay = |amount: f64, at: Duration| {
        decide_args(
            &engine,
            "pay",
            &json!({ "amount": amount }),
            &ONE,
            base + at,
        )
        .outcome
    };
    assert_eq!(pay(60.0, secs(0)), Outcome::Allow);
    assert_eq!(pay(30.0, secs(5)), Outcome::Allow);
    assert_eq!(pay(20.0, secs(9)), Outcome::Deny);
    assert_eq!(pay(10.0, secs(9)), Outcome::Allow);
    // The 60 ages out just after 10s; the 30 and 10 still count.
    assert_eq!(
        pay(61.0, secs(10) + Duration::from_millis(1)),
        Outcome::Deny
    );
    assert_eq!(
        pay(60.0, secs(10) + Duration::from_millis(1)),
        Outcome::Allow
    );
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
        &decide(&engine, "b", &ONE, base + Duration::from_millis(500)),
        Outcome::Deny,
        "/tools/b/limits/0",
        Some("rate limit shared exceeded: at most 1 call per second"),
    );
    // A second later b has room again; a's minute-long limit does not apply to b.
    assert!(is_allowed(&engine, "b", &ONE, base + secs(2)));
    // a sees b's call: two in the minute, one more allowed.
    assert!(is_allowed(&engine, "a", &ONE, base + secs(3)));
    assert_decision(
        &decide(&engine, "a", &ONE, base + secs(4)),
        Outcome::Deny,
        "/tools/a/limits/0",
        Some("rate limit shared exceeded: at most 3 calls per minute"),
    );
}

#[test]
fn different_grants_do_not_share() {
    let engine = engine(SEED);
    let now = Instant::now();
    let other = CallerScope {
        grant: "777",
        ..ONE
    };
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
fn scopes_key_counters_by_their_own_field() {
    let a = CallerScope {
        grant: "g1",
        process: "p1",
        session: "s1",
        namespace: "",
        service_account: "",
    };
    let variants = [
        ("same caller", a),
        ("other grant", CallerScope { grant: "g2", ..a }),
        ("other process", CallerScope { process: "p2", ..a }),
        ("other session", CallerScope { session: "s2", ..a }),
        (
            "other everything",
            CallerScope {
                grant: "g2",
                process: "p2",
                session: "s2",
                namespace: "",
                service_account: "",
            },
        ),
        // Keys of one scope never mix with another scope's: "p1" as a grant is not process p1.
        (
            "fields swapped",
            CallerScope {
                grant: "p1",
                process: "s1",
                session: "g1",
                namespace: "",
                service_account: "",
            },
        ),
    ];
    for scope in ["grant", "process", "session", "server"] {
        for (name, b) in variants {
            let engine = engine_json(&deny_with(json!({"t": {"limits": [
                {"counter": "c", "window": "minute", "max": 1, "scope": scope}]}})));
            let now = Instant::now();
            assert!(is_allowed(&engine, "t", &a, now), "{scope}");
            let shares = match scope {
                "grant" => b.grant == a.grant,
                "process" => b.process == a.process,
                "session" => b.session == a.session,
                _ => true,
            };
            let d = decide(&engine, "t", &b, now);
            if shares {
                assert_decision(
                    &d,
                    Outcome::Deny,
                    "/tools/t/limits/0",
                    Some("rate limit c exceeded: at most 1 call per minute"),
                );
            } else {
                assert_eq!(d.outcome, Outcome::Allow, "{scope}, {name}: {d:?}");
            }
        }
    }
}

#[test]
fn one_counter_name_in_two_scopes_counts_separately() {
    let engine = engine_json(&json!({"version": "1", "default": "allow",
        "all_tools": {"limits": [{"counter": "c", "window": "minute", "max": 3, "scope": "server"}]},
        "tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "grant"}]}}}));
    let now = Instant::now();
    let other = CallerScope {
        grant: "other",
        ..ONE
    };
    assert!(is_allowed(&engine, "t", &ONE, now));
    assert_eq!(decide(&engine, "t", &ONE, now).rule, "/tools/t/limits/0");
    assert!(is_allowed(&engine, "t", &other, now));
    // The server-wide counter has seen two calls; a third tool call by anyone fits.
    assert!(is_allowed(
        &engine,
        "u",
        &CallerScope {
            grant: "third",
            ..ONE
        },
        now
    ));
    assert_decision(
        &decide(&engine, "u", &ONE, now),
        Outcome::Deny,
        "/all_tools/limits/0",
        Some("rate limit c exceeded: at most 3 calls per minute"),
    );
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
            &decide(&engine, "both", &ONE, now),
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
        &decide(&engine, "wide_only", &ONE, now),
        Outcome::Deny,
        "/tools/wide_only/limits/0",
        Some("rate limit wide exceeded: at most 5 calls per minute"),
    );
}

#[test]
fn all_tools_and_tool_limits_reserve_all_or_none() {
    let engine = engine_json(&json!({"version": "1", "default": "allow",
        "all_tools": {"limits": [{"counter": "every", "window": "minute", "max": 4, "scope": "grant"}]},
        "tools": {"t": {"limits": [{"counter": "t", "window": "minute", "max": 1, "scope": "grant"}]}}}));
    let now = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, now));
    // Refused by its second limit (the tool's): the first (all_tools) must not be consumed.
    for _ in 0..10 {
        assert_eq!(decide(&engine, "t", &ONE, now).rule, "/tools/t/limits/0");
    }
    for i in 0..3 {
        assert!(is_allowed(&engine, "other", &ONE, now), "other call {i}");
    }
    assert_decision(
        &decide(&engine, "other", &ONE, now),
        Outcome::Deny,
        "/all_tools/limits/0",
        Some("rate limit every exceeded: at most 4 calls per minute"),
    );
    // Likewise a spend quota refused after a call-count limit admitted.
    let engine = engine_json(&deny_with(json!({"pay": {"limits": [
        {"counter": "calls", "window": "minute", "max": 3, "scope": "grant"},
        {"counter": "spend", "window": "minute", "max": 10, "scope": "grant", "increment_from": "args.amount"}]}})));
    let pay = |amount: u32| decide_args(&engine, "pay", &json!({ "amount": amount }), &ONE, now);
    assert_eq!(pay(8).outcome, Outcome::Allow);
    assert_eq!(pay(8).rule, "/tools/pay/limits/1");
    assert_eq!(pay(8).rule, "/tools/pay/limits/1");
    assert_eq!(pay(1).outcome, Outcome::Allow);
    assert_eq!(pay(1).outcome, Outcome::Allow);
    assert_eq!(pay(0).rule, "/tools/pay/limits/0");
}

#[test]
fn first_exhausted_limit_is_reported() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "x", "window": "minute", "max": 1, "scope": "grant"},
                           {"counter": "y", "window": "minute", "max": 1, "scope": "grant"}]}}"#,
    );
    let now = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, now));
    assert_eq!(decide(&engine, "t", &ONE, now).rule, "/tools/t/limits/0");
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
        decide(&engine, "t", &ONE, base + secs(5)).rule,
        "/tools/t/limits/0"
    );
    // A minute on, the per-minute limit has room but the hourly one only
    // has three more.
    let later = base + secs(120);
    for _ in 0..3 {
        assert!(is_allowed(&engine, "t", &ONE, later));
    }
    assert_eq!(decide(&engine, "t", &ONE, later).rule, "/tools/t/limits/1");
}

#[test]
fn calls_that_read_the_clock_out_of_order_still_count() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": 10, "max": 2, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    assert!(is_allowed(&engine, "t", &ONE, base + secs(5)));
    // Read the clock at 1 s, got the lock after the 5 s call: counted at 5 s.
    assert!(is_allowed(&engine, "t", &ONE, base + secs(1)));
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(3)));
    // Both admissions are logged at 5 s: [5 s, 15 s] still holds them.
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(12)));
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(15)));
    assert!(is_allowed(
        &engine,
        "t",
        &ONE,
        base + secs(15) + Duration::from_millis(1)
    ));
}

/// Window 1 s, max 2: admitted at 990 ms and 991 ms; a call that read the clock at 1995 ms is
/// admitted (both are over a second old by then, and are pruned); then a call that read the
/// clock 5 ms earlier, at 1990 ms, gets the lock. Deciding it at 1990 ms would need the pruned
/// entries; it is decided at 1995 ms instead.
#[test]
fn a_late_call_is_decided_at_the_latest_instant_seen() {
    // A caller that read the clock before a later caller took the lock is decided (and logged)
    // at the later instant: windows are then always evaluated at the newest instant, and
    // pruning by it can never drop what an older instant's window would need.
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": 1, "max": 2, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    let ms = Duration::from_millis;
    assert!(is_allowed(&engine, "t", &ONE, base + ms(990)));
    assert!(is_allowed(&engine, "t", &ONE, base + ms(991)));
    assert!(is_allowed(&engine, "t", &ONE, base + ms(1995)));
    let late = decide(&engine, "t", &ONE, base + ms(1990));
    assert_eq!(late.outcome, Outcome::Allow, "{late:?}");
    assert_eq!(
        late.reservation.as_ref().map(|r| r.at()),
        Some(base + ms(1995))
    );
    // [995 ms, 1995 ms] now holds two admissions: the next call at that instant is refused.
    assert_decision(
        &decide(&engine, "t", &ONE, base + ms(1993)),
        Outcome::Deny,
        "/tools/t/limits/0",
        Some("rate limit c exceeded: at most 2 calls per second"),
    );
}

#[test]
fn expired_logs_and_idle_callers_are_forgotten() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "second", "max": 100000, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    let grants: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    for grant in &grants {
        assert!(is_allowed(
            &engine,
            "t",
            &CallerScope { grant, ..ONE },
            base
        ));
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
        let _ = decide(&engine, "t", &ONE, base + secs(i));
    }
    assert_eq!(engine.with_counters(|c| c.log_len(0, ONE.grant)), 3);
}

// ---------------------------------------------------------------------------
// Reservations
// ---------------------------------------------------------------------------

#[test]
fn released_reservations_give_the_quota_back_once() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "grant"}]}}"#,
    );
    let now = Instant::now();
    let first = decide(&engine, "t", &ONE, now);
    assert_eq!(first.outcome, Outcome::Allow);
    let reservation = first.reservation.expect("a limited call is reserved");
    assert_eq!(decide(&engine, "t", &ONE, now).outcome, Outcome::Deny);
    reservation.release();
    let second = decide(&engine, "t", &ONE, now);
    assert_eq!(
        second.outcome,
        Outcome::Allow,
        "released quota is free again"
    );
    // Releasing again is harmless: it does not free the second call's slot.
    reservation.release();
    reservation.clone().release();
    assert_eq!(decide(&engine, "t", &ONE, now).outcome, Outcome::Deny);
    // Dropping a reservation keeps the admission.
    drop(second);
    assert_eq!(decide(&engine, "t", &ONE, now).outcome, Outcome::Deny);
}

#[test]
fn a_reservation_covers_every_limit_of_the_call() {
    let engine = engine_json(&json!({"version": "1", "default": "deny",
    "all_tools": {"limits": [{"counter": "all", "window": "minute", "max": 1, "scope": "server"}]},
    "tools": {
        "t": {"limits": [
            {"counter": "calls", "window": "minute", "max": 1, "scope": "session"},
            {"counter": "spend", "window": "minute", "max": 5, "scope": "grant", "increment_from": "args.n"}]},
        "u": {}
    }}));
    let now = Instant::now();
    let args = json!({"n": 5});
    let d = decide_args(&engine, "t", &args, &ONE, now);
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    assert_eq!(decide(&engine, "u", &ONE, now).rule, "/all_tools/limits/0");
    d.reservation.expect("reserved").release();
    // Every counter got its share back.
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), 0);
    assert_eq!(
        decide_args(&engine, "t", &args, &ONE, now).outcome,
        Outcome::Allow
    );
}

#[test]
fn releasing_after_the_window_passed_is_harmless() {
    let engine = engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": 1, "max": 1, "scope": "grant"}]}}"#,
    );
    let base = Instant::now();
    let old = decide(&engine, "t", &ONE, base).reservation.unwrap();
    assert!(is_allowed(&engine, "t", &ONE, base + secs(2)));
    old.release();
    assert!(!is_allowed(&engine, "t", &ONE, base + secs(2)));
}

// ---------------------------------------------------------------------------
// Reloads
// ---------------------------------------------------------------------------

fn one_limit(counter: &str, max: u32, scope: &str) -> Engine {
    engine_json(&one_limit_policy(counter, max, scope))
}

fn one_limit_policy(counter: &str, max: u32, scope: &str) -> Value {
    deny_with(json!({"t": {"limits": [
        {"counter": counter, "window": "minute", "max": max, "scope": scope}]}}))
}

fn reload(policy: &Value, previous: &Engine) -> Engine {
    Engine::reloaded(
        Policy::parse(&policy.to_string(), "policy.json").unwrap(),
        previous,
    )
}

#[test]
fn reload_keeps_counters_with_the_same_name_and_scope() {
    let now = Instant::now();
    let first = one_limit("c", 2, "grant");
    assert!(is_allowed(&first, "t", &ONE, now));
    assert!(is_allowed(&first, "t", &ONE, now));
    assert!(!is_allowed(&first, "t", &ONE, now));

    let same = reload(&one_limit_policy("c", 2, "grant"), &first);
    assert!(!is_allowed(&same, "t", &ONE, now), "the log survived");

    let raised = reload(&one_limit_policy("c", 3, "grant"), &same);
    assert!(is_allowed(&raised, "t", &ONE, now), "room for one more");
    assert!(!is_allowed(&raised, "t", &ONE, now));

    // The counter moves to all_tools: still the same name and scope.
    let moved = reload(
        &json!({"version": "1", "default": "allow", "all_tools": {"limits": [
            {"counter": "c", "window": "minute", "max": 3, "scope": "grant"}]}}),
        &raised,
    );
    assert_eq!(decide(&moved, "t", &ONE, now).rule, "/all_tools/limits/0");
}

#[test]
fn reload_resets_counters_whose_scope_or_name_changed() {
    let now = Instant::now();
    let first = one_limit("c", 1, "grant");
    assert!(is_allowed(&first, "t", &ONE, now));
    assert!(!is_allowed(&first, "t", &ONE, now));

    let server = reload(&one_limit_policy("c", 1, "server"), &first);
    assert!(
        is_allowed(&server, "t", &ONE, now),
        "a new scope starts empty"
    );
    assert!(!is_allowed(&server, "t", &ONE, now));

    let renamed = reload(&one_limit_policy("d", 1, "server"), &server);
    assert!(
        is_allowed(&renamed, "t", &ONE, now),
        "a new name starts empty"
    );

    // Back to grant scope: the grant log was dropped by the first reload.
    let back = reload(&one_limit_policy("c", 1, "grant"), &renamed);
    assert!(is_allowed(&back, "t", &ONE, now));
}

#[test]
fn a_reservation_taken_before_a_reload_is_released_into_the_new_engine() {
    let now = Instant::now();
    let first = one_limit("c", 1, "grant");
    let d = decide(&first, "t", &ONE, now);
    let reloaded = reload(&one_limit_policy("c", 1, "grant"), &first);
    assert!(!is_allowed(&reloaded, "t", &ONE, now));
    d.reservation.unwrap().release();
    assert!(is_allowed(&reloaded, "t", &ONE, now));
}

/// A call that picked up the engine before a reload may be decided after `Engine::reloaded`
/// ran (the interceptor holds an `Arc<Engine>` per request, and the reload builds the new
/// engine before swapping it in). It must still be decided by its own policy's limits: never
/// admitted past an exhausted counter, and never counted against another counter.
#[test]
fn the_replaced_engine_keeps_its_own_counters() {
    let now = Instant::now();
    let old = engine_json(&deny_with(json!({
        "a": {"limits": [{"counter": "ca", "window": "minute", "max": 1, "scope": "grant"}]},
        "b": {"limits": [{"counter": "cb", "window": "minute", "max": 1, "scope": "grant"}]}
    })));
    assert!(is_allowed(&old, "b", &ONE, now));
    assert!(!is_allowed(&old, "b", &ONE, now));
    // The new policy drops counter "ca": "cb" moves from index 1 to index 0.
    let new = reload(
        &deny_with(json!({
            "b": {"limits": [{"counter": "cb", "window": "minute", "max": 1, "scope": "grant"}]}
        })),
        &old,
    );
    assert!(!is_allowed(&new, "b", &ONE, now), "cb is exhausted");
    assert_decision(
        &decide(&old, "b", &ONE, now),
        Outcome::Deny,
        "/tools/b/limits/0",
        Some("rate limit cb exceeded: at most 1 call per minute"),
    );
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

#[test]
fn concurrent_callers_are_admitted_exactly_max_times() {
    let engine = Arc::new(engine_with_tools(
        r#"{"t": {"limits": [{"counter": "c", "window": "minute", "max": 10, "scope": "grant"}]}}"#,
    ));
    let threads = 100;
    let barrier = Barrier::new(threads);
    let decisions: Vec<Decision> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let engine = Arc::clone(&engine);
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    decide(&engine, "t", &ONE, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted = decisions
        .iter()
        .filter(|d| d.outcome == Outcome::Allow)
        .count();
    assert_eq!(admitted, 10);
    for d in decisions.iter().filter(|d| d.outcome != Outcome::Allow) {
        assert_decision(
            d,
            Outcome::Deny,
            "/tools/t/limits/0",
            Some("rate limit c exceeded: at most 10 calls per minute"),
        );
    }
}

// ---------------------------------------------------------------------------
// Explain
// ---------------------------------------------------------------------------

fn steps_contain(steps: &[String], words: &str) -> bool {
    steps.iter().any(|s| s.contains(words))
}

#[test]
fn explain_names_the_rule_and_every_check() {
    let engine = engine_json(&json!({"version": "1", "default": "deny",
        "all_tools": {"deny_if": [{"path": "args.env", "op": "eq", "value": "prod"}]},
        "tools": {"get_*": {
            "arguments": {"properties": {"id": {"type": "integer"}}},
            "deny_if": [{"path": "args.id", "op": "lt", "value": 0}],
            "require": [{"path": "args.id", "op": "exists"}],
            "limits": [{"counter": "gets", "window": "minute", "max": 5, "scope": "grant"}]
        }, "get_user": {}}}));
    let now = Instant::now();
    let args = json!({"id": 7, "env": "dev"});
    let call = Call {
        tool: "get_item",
        arguments: Some(&args),
    };
    let e = engine.explain(&call, &ONE, now);
    assert_decision(&e.decision, Outcome::Allow, "/tools/get_*", None);
    for words in [
        "/tools/get_*",
        "pattern \"get_*\" matches get_item",
        "arguments",
        "/all_tools/deny_if/0",
        "/tools/get_*/deny_if/0",
        "/tools/get_*/require/0",
        "/tools/get_*/limits/0",
        "counter gets",
        "allowed by /tools/get_*",
    ] {
        assert!(
            steps_contain(&e.steps, words),
            "{words:?} in {:#?}",
            e.steps
        );
    }

    let call = Call {
        tool: "get_user",
        arguments: Some(&args),
    };
    let e = engine.explain(&call, &ONE, now);
    assert!(
        steps_contain(&e.steps, "/tools/get_user: exact name"),
        "{:#?}",
        e.steps
    );

    // A refusal: the steps end at the check that decided.
    let bad = json!({"id": -1});
    let call = Call {
        tool: "get_item",
        arguments: Some(&bad),
    };
    let e = engine.explain(&call, &ONE, now);
    assert_eq!(e.decision.rule, "/tools/get_*/deny_if/0");
    assert!(steps_contain(&e.steps, "holds"), "{:#?}", e.steps);
    assert!(!steps_contain(&e.steps, "/require/0"), "{:#?}", e.steps);

    let e = engine.explain(
        &Call {
            tool: "put",
            arguments: None,
        },
        &ONE,
        now,
    );
    assert_eq!(e.decision.rule, "/default");
    assert!(steps_contain(&e.steps, "default is deny"), "{:#?}", e.steps);

    let hidden = engine_json(&json!({"version": "1", "default": "allow", "hide": ["h"]}));
    let e = hidden.explain(
        &Call {
            tool: "h",
            arguments: None,
        },
        &ONE,
        now,
    );
    assert!(steps_contain(&e.steps, "hide"), "{:#?}", e.steps);

    let dry = engine_json(&json!({"version": "1", "default": "deny", "mode": "dry_run"}));
    let e = dry.explain(
        &Call {
            tool: "x",
            arguments: None,
        },
        &ONE,
        now,
    );
    assert_eq!(e.decision.outcome, Outcome::Allow);
    assert_eq!(e.decision.would, Some(Outcome::UnknownTool));
    assert!(steps_contain(&e.steps, "dry_run"), "{:#?}", e.steps);

    let limited = one_limit("c", 1, "grant");
    let call = Call {
        tool: "t",
        arguments: None,
    };
    let _ = limited.decide_call(&call, &ONE, now);
    let e = limited.explain(&call, &ONE, now);
    assert_eq!(e.decision.rule, "/tools/t/limits/0");
    assert!(steps_contain(&e.steps, "has used 1 of 1"), "{:#?}", e.steps);
}

// ---------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------

const RICH_JSON: &str = r#"{
  "version": "1",
  "default": "deny",
  "hide": ["admin_*"],
  "all_tools": {
    "deny_if": [{"path": "args.env", "op": "eq", "value": "prod"}],
    "limits": [{"counter": "all", "window": "minute", "max": 6, "scope": "server"}]
  },
  "tools": {
    "start_security_scan": {"limits": [{"counter": "start_security_scan_rate", "window": "minute", "max": 2, "scope": "grant"}]},
    "drop_cluster": {"action": "deny", "reason": "destructive"},
    "pay": {
      "action": "allow",
      "arguments": {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]},
      "require": [{"any": [{"path": "args.amount", "op": "lte", "value": 100}, {"path": "args.ticket", "op": "regex", "value": "^T-[0-9]+$"}]}],
      "limits": [{"counter": "spend", "window": "day", "max": 150, "scope": "grant", "increment_from": "args.amount"}]
    },
    "get_*": {"deny_if": [{"path": "args.fields", "op": "contains", "value": "password"}]},
    "wire": {"action": "require_approval"}
  }
}"#;

const RICH_YAML: &str = r#"
version: "1"
default: deny
hide:
  - admin_*
all_tools:
  deny_if:
    - path: args.env
      op: eq
      value: prod
  limits:
    - {counter: all, window: minute, max: 6, scope: server}
tools:
  start_security_scan:
    limits:
      - counter: start_security_scan_rate
        window: minute
        max: 2
        scope: grant
  drop_cluster:
    action: deny
    reason: destructive
  pay:
    action: allow
    arguments:
      type: object
      properties:
        amount: {type: number}
      required: [amount]
    require:
      - any:
          - {path: args.amount, op: lte, value: 100}
          - {path: args.ticket, op: regex, value: "^T-[0-9]+$"}
    limits:
      - counter: spend
        window: day
        max: 150
        scope: grant
        increment_from: args.amount
  "get_*":
    deny_if:
      - {path: args.fields, op: contains, value: password}
  wire:
    action: require_approval
"#;

#[test]
fn yaml_and_json_policies_decide_identically() {
    let json_engine = engine(RICH_JSON);
    let yaml_engine =
        Engine::new(Policy::parse(RICH_YAML, "policy.yaml").unwrap_or_else(|e| panic!("{e}")));
    assert!(yaml_engine.policy().warnings().is_empty());
    let calls: Vec<(&str, Option<Value>)> = vec![
        ("admin_reset", None),
        ("unknown", None),
        ("drop_cluster", None),
        ("wire", None),
        ("start_security_scan", None),
        ("start_security_scan", Some(json!({"env": "prod"}))),
        ("start_security_scan", None),
        ("start_security_scan", None),
        ("pay", Some(json!({"amount": "x"}))),
        ("pay", Some(json!({"amount": 120}))),
        ("pay", Some(json!({"amount": 120, "ticket": "T-9"}))),
        ("pay", Some(json!({"amount": 40}))),
        ("pay", Some(json!({"amount": 20}))),
        ("get_user", Some(json!({"fields": ["name", "password"]}))),
        ("get_user", Some(json!({"fields": ["name"]}))),
        ("get_user", None),
        ("get_user", None),
    ];
    let now = Instant::now();
    let mut outcomes = Vec::new();
    for (tool, args) in &calls {
        let call = Call {
            tool,
            arguments: args.as_ref(),
        };
        let a = json_engine.decide_call(&call, &ONE, now);
        let b = yaml_engine.decide_call(&call, &ONE, now);
        assert_eq!(
            (a.outcome, &a.rule, &a.reason, a.would),
            (b.outcome, &b.rule, &b.reason, b.would),
            "{tool} {args:?}"
        );
        outcomes.push((tool, a.outcome, a.rule));
    }
    // The sequence exercises every kind of decision.
    let rules: Vec<&str> = outcomes.iter().map(|(_, _, r)| r.as_str()).collect();
    for rule in [
        "/hide",
        "/default",
        "/tools/drop_cluster/action",
        "/tools/wire/action",
        "/all_tools/deny_if/0",
        "/tools/start_security_scan/limits/0",
        "/tools/pay/arguments",
        "/tools/pay/require/0",
        "/tools/pay/limits/0",
        "/tools/get_*/deny_if/0",
        "/tools/get_*",
        "/all_tools/limits/0",
    ] {
        assert!(rules.contains(&rule), "{rule} not decided: {outcomes:?}");
    }
}

#[test]
fn an_argument_key_that_only_folds_to_a_checked_name_is_refused() {
    let policy = json!({"version": "1", "default": "allow",
    "all_tools": {"deny_if": [{"path": "args.target.host", "op": "eq", "value": "prod"}]},
    "tools": {
        "pay": {"arguments": {"type": "object", "properties": {"amount": {"type": "number", "maximum": 100}}},
                "limits": [{"counter": "spend", "window": "day", "max": 1000, "scope": "grant", "increment_from": "args.cost"}]}
    }});
    let e = engine_json(&policy);
    let now = Instant::now();
    let go = |tool: &str, args: Value| decide_args(&e, tool, &args, &ONE, now);
    assert_eq!(
        go("pay", json!({"amount": 5, "cost": 1})).outcome,
        Outcome::Allow
    );
    for (tool, args, key, rule) in [
        // A schema property: Go binds "Amount" to `amount` and pays 5000.
        (
            "pay",
            json!({"Amount": 5000, "cost": 1}),
            "\"Amount\"",
            "/tools/pay",
        ),
        // An increment_from path, spelt with the long s (U+017F).
        (
            "pay",
            json!({"amount": 1, "co\u{17f}t": 900}),
            "\"co\u{17f}t\"",
            "/tools/pay",
        ),
        // A nested condition path, under a default-allow tool.
        (
            "other",
            json!({"target": {"HOST": "prod"}}),
            "\"HOST\"",
            "/default",
        ),
        (
            "other",
            json!({"list": [{"Target": {}}]}),
            "\"Target\"",
            "/default",
        ),
    ] {
        let d = go(tool, args.clone());
        assert_eq!(d.outcome, Outcome::Deny, "{args}: {d:?}");
        assert_eq!(d.rule, rule, "{args}: {d:?}");
        let reason = d.reason.clone().unwrap_or_default();
        assert!(
            reason.contains(key) && reason.contains("letter case"),
            "{reason}"
        );
        assert!(
            !reason.contains("5000") && !reason.contains("prod"),
            "no values: {reason}"
        );
    }
    // Keys that fold to nothing the policy checks are the tool's business.
    assert_eq!(
        go("other", json!({"Anything": 1, "HOSTS": 2})).outcome,
        Outcome::Allow
    );
    // A policy that checks no argument refuses no key.
    let plain = engine_json(&deny_with(json!({"pay": {}})));
    let d = decide_args(&plain, "pay", &json!({"Amount": 1}), &ONE, now);
    assert_eq!(d.outcome, Outcome::Allow);
}

/// What a journal was told, in order.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl super::limits::Journal for Recorder {
    fn admitted(&self, counter: &str, scope: &str, key: &str, amount: f64, serial: u64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("+{serial} {counter} {scope} {key} {amount}"));
    }
    fn released(&self, serial: u64) {
        self.0.lock().unwrap().push(format!("-{serial}"));
    }
    fn rewrite(&self, live: &[(u64, super::limits::Restored)]) {
        let mut lines = self.0.lock().unwrap();
        lines.clear();
        for (serial, r) in live {
            lines.push(format!(
                "+{serial} {} {} {} {} age {:?}",
                r.counter, r.scope, r.key, r.amount, r.age
            ));
        }
    }
}

#[test]
fn journal_and_restore_keep_a_window_across_processes() {
    use super::limits::Restored;
    let policy = r#"{"version": "1", "default": "deny", "tools": {
        "scan": {"limits": [{"counter": "scan_rate", "window": "minute", "max": 4, "scope": "grant"}]}}}"#;
    let t0 = Instant::now();

    // A first process: every admission and release is journalled, in order.
    let first = engine(policy);
    let journal = std::sync::Arc::new(Recorder::default());
    first.set_journal(journal.clone());
    let d = decide(&first, "scan", &ONE, t0);
    assert!(d.reservation.is_some());
    assert!(decide(&first, "scan", &ONE, t0).reservation.is_some());
    if let Some(r) = d.reservation {
        r.release();
        r.release(); // idempotent: told once
    }
    assert_eq!(
        *journal.0.lock().unwrap(),
        [
            "+0 scan_rate grant 4242 1",
            "+1 scan_rate grant 4242 1",
            "-0"
        ]
    );

    // A second process rebuilt from what a journal kept: three admissions 10 s ago count, one
    // of another counter and one older than any window do not.
    let second = engine(policy);
    let again = std::sync::Arc::new(Recorder::default());
    second.set_journal(again.clone());
    let restored = |counter: &str, age: u64| Restored {
        counter: counter.into(),
        scope: "grant".into(),
        key: "4242".into(),
        amount: 1.0,
        age: secs(age),
    };
    let t1 = t0 + secs(3600);
    let n = second.restore(
        &[
            restored("scan_rate", 10),
            restored("scan_rate", 10),
            restored("scan_rate", 10),
            restored("gone", 10),
            restored("scan_rate", 600),
        ],
        t1,
    );
    assert_eq!(n, 3);
    assert_eq!(
        again.0.lock().unwrap().len(),
        3,
        "restored admissions are journalled anew"
    );
    assert!(is_allowed(&second, "scan", &ONE, t1));
    assert!(!is_allowed(&second, "scan", &ONE, t1), "4 of 4 used");
    // 10 s later the restored three leave the window (they were 10 s old at t1 + 50 s: 60 s).
    assert!(is_allowed(&second, "scan", &ONE, t1 + secs(51)));
    // Compaction keeps what still counts: the two admissions at t1 and t1 + 51 s.
    second.compact_journal(t1 + secs(52));
    assert_eq!(
        *again.0.lock().unwrap(),
        [
            "+3 scan_rate grant 4242 1 age 52s",
            "+4 scan_rate grant 4242 1 age 1s"
        ]
    );
}

// ---------------------------------------------------------------------------
// Usage and explanations that do not count
// ---------------------------------------------------------------------------

const TWO: CallerScope<'static> = CallerScope {
    grant: "7",
    process: "pid:18",
    session: "session:b",
    namespace: "",
    service_account: "",
};

/// `counter scope key rule used/max per window_secs`, one per entry.
fn usage_lines(engine: &Engine, now: Instant, max_entries: usize) -> Vec<String> {
    engine
        .usage(now, max_entries)
        .iter()
        .map(|u| {
            format!(
                "{} {} {} {} {}/{} per {}",
                u.counter, u.scope, u.key, u.rule, u.used, u.max, u.window_secs
            )
        })
        .collect()
}

fn usage_engine() -> Engine {
    engine_json(&json!({"version": "1", "default": "deny",
    "all_tools": {"limits": [{"counter": "all", "window": "minute", "max": 10, "scope": "server"}]},
    "tools": {
        "create_charge": {"limits": [
            {"counter": "calls", "window": "minute", "max": 4, "scope": "grant"},
            {"counter": "spend", "window": "hour", "max": 100, "scope": "grant", "increment_from": "args.amount"}]},
        "get_*": {"limits": [{"counter": "calls", "window": 10, "max": 2, "scope": "grant"}]}
    }}))
}

#[test]
fn usage_lists_each_limit_and_key_fullest_first() {
    let engine = usage_engine();
    let t0 = Instant::now();
    assert!(engine.usage(t0, 100).is_empty(), "nothing counted yet");
    for amount in [30, 20] {
        let d = decide_args(
            &engine,
            "create_charge",
            &json!({"amount": amount}),
            &ONE,
            t0,
        );
        assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    }
    assert!(is_allowed(&engine, "get_x", &TWO, t0));

    let all = [
        // 2 of 2: the fullest.
        "calls grant 4242 /tools/get_*/limits/0 2/2 per 10",
        // Ties at a half: by counter, then key.
        "calls grant 4242 /tools/create_charge/limits/0 2/4 per 60",
        "calls grant 7 /tools/get_*/limits/0 1/2 per 10",
        "spend grant 4242 /tools/create_charge/limits/1 50/100 per 3600",
        "all server  /all_tools/limits/0 3/10 per 60",
        "calls grant 7 /tools/create_charge/limits/0 1/4 per 60",
    ];
    let t1 = t0 + secs(1);
    assert_eq!(usage_lines(&engine, t1, 100), all);
    // Bounded: the fullest first.
    assert_eq!(usage_lines(&engine, t1, 2), all[..2]);
    assert_eq!(usage_lines(&engine, t1, 6), all);
    assert!(engine.usage(t1, 0).is_empty());

    // The pointer is the one a refusal by that limit names.
    let refused = decide(&engine, "get_y", &ONE, t1);
    assert_eq!(refused.outcome, Outcome::Deny);
    assert_eq!(refused.rule, engine.usage(t1, 1)[0].rule);

    // Once the 10 s window has passed, its limit has nothing left to report.
    assert_eq!(
        usage_lines(&engine, t0 + secs(11), 100),
        [
            "calls grant 4242 /tools/create_charge/limits/0 2/4 per 60",
            "spend grant 4242 /tools/create_charge/limits/1 50/100 per 3600",
            "all server  /all_tools/limits/0 3/10 per 60",
            "calls grant 7 /tools/create_charge/limits/0 1/4 per 60",
        ]
    );

    let first = serde_json::to_value(&engine.usage(t1, 1)[0]).unwrap();
    assert_eq!(
        first,
        json!({"counter": "calls", "scope": "grant", "key": "4242",
               "rule": "/tools/get_*/limits/0", "window_secs": 10.0, "max": 2.0, "used": 2.0})
    );
}

#[test]
fn usage_is_a_pure_read() {
    let engine = usage_engine();
    let t0 = Instant::now();
    assert!(is_allowed(&engine, "get_x", &ONE, t0));
    let keys = engine.with_counters(|c| c.tracked_keys());
    // Long after every window: nothing to report, and nothing pruned or forgotten either.
    assert!(engine.usage(t0 + secs(7200), 100).is_empty());
    assert_eq!(engine.with_counters(|c| c.tracked_keys()), keys);
    // Nor did the late instant move the store's clock: at t0 + 1 s the window still holds.
    assert!(is_allowed(&engine, "get_x", &ONE, t0 + secs(1)));
    assert!(!is_allowed(&engine, "get_x", &ONE, t0 + secs(1)));
}

#[test]
fn usage_of_an_engine_replaced_by_a_reload_finds_its_counters_by_name() {
    let before = one_limit_policy("c", 4, "grant");
    let old = engine_json(&before);
    let now = Instant::now();
    assert!(is_allowed(&old, "t", &ONE, now));
    // The new policy's first counter is another one: the old engine's indices are stale.
    let mut after = before.clone();
    after["all_tools"] =
        json!({"limits": [{"counter": "first", "window": "minute", "max": 9, "scope": "server"}]});
    let new = reload(&after, &old);
    let line = "c grant 4242 /tools/t/limits/0 1/4 per 60";
    assert_eq!(usage_lines(&old, now, 10), [line]);
    assert_eq!(usage_lines(&new, now, 10), [line]);
}

#[test]
fn explain_counts_like_decide_call_until_released() {
    let engine = one_limit("c", 1, "grant");
    let now = Instant::now();
    let call = Call {
        tool: "t",
        arguments: None,
    };
    let mut e = engine.explain(&call, &ONE, now);
    assert_eq!(e.decision.outcome, Outcome::Allow);
    assert!(decide(&engine, "t", &ONE, now).outcome == Outcome::Deny);
    e.decision.reservation.take().expect("reserved").release();
    assert!(is_allowed(&engine, "t", &ONE, now));
}

#[test]
fn explaining_without_counting_near_a_limit_takes_no_quota() {
    let engine = one_limit("c", 2, "grant");
    let journal = Arc::new(Recorder::default());
    engine.set_journal(journal.clone());
    let t0 = Instant::now();
    let call = Call {
        tool: "t",
        arguments: None,
    };
    assert!(is_allowed(&engine, "t", &ONE, t0));
    for _ in 0..2 {
        let e = engine.explain_dry(&call, &ONE, t0);
        assert_decision(&e.decision, Outcome::Allow, "/tools/t", None);
        assert!(e.decision.reservation.is_none());
        assert!(steps_contain(&e.steps, "has used 1 of 2"), "{:#?}", e.steps);
        assert!(
            steps_contain(&e.steps, "without counting"),
            "{:#?}",
            e.steps
        );
    }
    assert_eq!(journal.0.lock().unwrap().len(), 1, "only the decided call");
    // The last slot is still there, and then explaining says what the next call gets.
    assert!(is_allowed(&engine, "t", &ONE, t0));
    let e = engine.explain_dry(&call, &ONE, t0);
    let d = decide(&engine, "t", &ONE, t0);
    assert_decision(
        &e.decision,
        d.outcome,
        "/tools/t/limits/0",
        d.reason.as_deref(),
    );
    // A later instant does not move the store's clock: the window still holds at t0 + 1 s.
    let later = engine.explain_dry(&call, &ONE, t0 + secs(120));
    assert_eq!(later.decision.outcome, Outcome::Allow);
    assert!(!is_allowed(&engine, "t", &ONE, t0 + secs(1)));
    assert_eq!(journal.0.lock().unwrap().len(), 2);
}

#[test]
fn explaining_a_spend_without_counting_checks_the_amount() {
    let engine = engine_with_tools(
        r#"{"pay": {"limits": [{"counter": "spend", "window": "day", "max": 100, "scope": "grant", "increment_from": "args.amount"}]}}"#,
    );
    let now = Instant::now();
    let spend = |amount: u32| json!({"amount": amount});
    assert!(decide_args(&engine, "pay", &spend(60), &ONE, now).outcome == Outcome::Allow);
    let explain = |amount: u32| {
        let args = spend(amount);
        let call = Call {
            tool: "pay",
            arguments: Some(&args),
        };
        engine.explain_dry(&call, &ONE, now).decision
    };
    for _ in 0..3 {
        assert_eq!(explain(40).outcome, Outcome::Allow);
        assert_eq!(explain(41).rule, "/tools/pay/limits/0");
    }
    assert!(decide_args(&engine, "pay", &spend(40), &ONE, now).outcome == Outcome::Allow);
    assert_eq!(explain(1).outcome, Outcome::Deny);
}

/// A held call: its checks run before anyone is asked (limits only peeked), and its limits are
/// counted only when it is decided again after the approval.
#[test]
fn require_approval_checks_first_and_counts_only_when_approved() {
    let e = engine_json(&deny_with(json!({
        "pay": {
            "action": "require_approval",
            "approval": {"timeout": "20s", "remember": "5m"},
            "deny_if": [{"path": "args.amount", "op": "gt", "value": 100}],
            "limits": [{"counter": "pay", "window": "minute", "max": 1, "scope": "grant"}]
        }
    })));
    let t0 = Instant::now();
    let big = json!({"amount": 500});
    let d = decide_args(&e, "pay", &big, &ONE, t0);
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    assert!(d.approval.is_none());

    let small = json!({"amount": 5});
    let held = decide_args(&e, "pay", &small, &ONE, t0);
    assert_eq!(held.outcome, Outcome::ApprovalRequired, "{held:?}");
    assert_eq!(held.rule, "/tools/pay/action");
    assert!(held.reservation.is_none(), "nothing counted while held");
    let spec = held.approval.clone().map(|a| *a).unwrap_or_default();
    assert_eq!(spec.timeout, Some(secs(20)));
    assert_eq!(spec.remember, Some(secs(300)));
    // Held again: still room, since nothing was counted.
    assert_eq!(
        decide_args(&e, "pay", &small, &ONE, t0).outcome,
        Outcome::ApprovalRequired
    );

    let call = Call {
        tool: "pay",
        arguments: Some(&small),
    };
    let approved = e.decide_approved_call(&call, &ONE, t0);
    assert_eq!(approved.outcome, Outcome::Allow, "{approved:?}");
    assert!(approved.reservation.is_some(), "counted once approved");
    // The limit is now full: the next call is refused before anyone is asked, and an approval
    // given meanwhile does not pass the limit either.
    assert_eq!(
        decide_args(&e, "pay", &small, &ONE, t0).outcome,
        Outcome::Deny
    );
    assert_eq!(
        e.decide_approved_call(&call, &ONE, t0).outcome,
        Outcome::Deny
    );
}

#[test]
fn approval_field_only_on_require_approval() {
    let err = Policy::parse(
        &deny_with(json!({"pay": {"action": "allow", "approval": "user"}})).to_string(),
        "policy.json",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("applies only to a rule with action"), "{err}");
    let p = Policy::parse(
        &deny_with(json!({"pay": {"action": "require_approval", "approval": "user"}})).to_string(),
        "policy.json",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        p.warnings()
            .iter()
            .any(|w| w.pointer == "/tools/pay/approval" && w.message.contains("autonomous")),
        "{:?}",
        p.warnings()
    );
}
