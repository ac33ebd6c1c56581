//! The 1,000-rule policy of scenario 5b (and of criterion's `policy/decide_1000_rules`), and the
//! calls decided against it.
//!
//! Shared as source: the `mcpwarden-bench-policy` binary and agent/benches/hot_path.rs both
//! include this file with `#[path]` (the agent crate cannot depend on the bench crate), so it
//! uses std alone and builds the JSON text by hand. Deterministic: no randomness.
//!
//! `default: deny`, and `tools` holds, in this order:
//! - `tool_0000` … `tool_0799`, exact names (800):
//!   - i % 8 == 3 (100 rules): an `arguments` JSON Schema (an object of 3–5 typed properties,
//!     `required`, a `minimum`/`maximum`, a `pattern`, an `enum`, `additionalProperties:
//!     false`), two `deny_if` (`amount gt 100`; `any` of `env in [prod, staging]` and `target
//!     regex ^db-`) and one `require` (`target exists`);
//!   - i % 50 == 10 (16): `action: deny` with a reason;
//!   - i % 4 == 1 (200): two `deny_if` (`amount gt 100`, `mode eq "destructive"`); of these,
//!     i % 20 == 13 (40) also have a limit of 10^9 calls per second, in `grant` scope (in
//!     `server` scope for every other one), which never refuses during a run;
//!   - i % 4 == 2 and not denied (192): one `require`, an `all` of `user regex
//!     ^[a-z][a-z0-9_]*$` and `count lte 50`;
//!   - the other 292: `{}`, allowed as they are.
//! - `ns000_read_*` … `ns099_read_*` (100 patterns; odd namespaces `require` `path regex
//!   ^/srv/`) and `ns000_*` … `ns099_*` (100 patterns; every fifth namespace denied, the others
//!   a `deny_if` `any` of `env in [prod, staging]` and `target regex ^db-`). Each literal
//!   prefix is distinct, so no two patterns tie.
//!
//! plus `hide` (three patterns and a name) and `all_tools` with one `deny_if` (`sudo eq true`).

use std::fmt::Write as _;

/// Exact tool names in the policy: `tool_0000` … `tool_0799`.
pub const EXACT: usize = 800;
/// Namespaces, two patterns each.
pub const NAMESPACES: usize = 100;
/// Rules in `tools`.
pub const RULES: usize = EXACT + 2 * NAMESPACES;

/// Calls per round of the mix; [`call_mix`] returns [`MIX_ROUNDS`] rounds.
const SCHEDULE: [usize; 16] = [0, 4, 2, 0, 1, 4, 0, 5, 3, 0, 4, 1, 7, 2, 8, 6];
/// Rounds of [`SCHEDULE`] in the mix, each with other tool names.
pub const MIX_ROUNDS: usize = 64;

/// What the engine must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Allow,
    UnknownTool,
    Deny,
}

/// The kinds of call in the mix: (label, outcome). Weights are their counts in [`SCHEDULE`].
pub const KINDS: [(&str, Expected); 9] = [
    (
        "exact name with schema + deny_if + require, allowed",
        Expected::Allow,
    ),
    (
        "exact name with deny_if or require, allowed",
        Expected::Allow,
    ),
    ("exact name without checks, allowed", Expected::Allow),
    (
        "exact name with deny_if + a rate limit, allowed",
        Expected::Allow,
    ),
    ("pattern (± require / deny_if), allowed", Expected::Allow),
    ("schema fails, denied", Expected::Deny),
    (
        "deny_if holds / action deny / all_tools, denied",
        Expected::Deny,
    ),
    (
        "not in the policy (default deny): unknown",
        Expected::UnknownTool,
    ),
    ("hidden: unknown", Expected::UnknownTool),
];

/// One call of the mix.
#[derive(Debug, Clone)]
pub struct MixCall {
    /// Index into [`KINDS`].
    pub kind: usize,
    pub tool: String,
    /// `params.arguments` as JSON text; `None`: the call has none.
    pub arguments: Option<String>,
}

impl MixCall {
    pub fn expected(&self) -> Expected {
        KINDS[self.kind].1
    }
}

pub fn tool_name(i: usize) -> String {
    format!("tool_{i:04}")
}

/// A tool with an `arguments` schema (`m` < 100).
pub fn schema_tool(m: usize) -> usize {
    8 * (m % 100) + 3
}

/// A tool with only `deny_if` (no limit) (`m` < 40).
pub fn deny_if_tool(m: usize) -> usize {
    20 * (m % 40) + 1
}

/// A tool with only `require` (`m` < 40).
pub fn require_tool(m: usize) -> usize {
    20 * (m % 40) + 2
}

/// A tool without checks (`m` < 100).
pub fn plain_tool(m: usize) -> usize {
    8 * (m % 100) + 7
}

/// A tool with `deny_if` and a rate limit (`m` < 40).
pub fn limited_tool(m: usize) -> usize {
    20 * (m % 40) + 13
}

/// A tool with `action: deny` (`m` < 16).
pub fn denied_tool(m: usize) -> usize {
    50 * (m % 16) + 10
}

/// Properties of the schema of tool `i` (3, 4 or 5).
fn schema_props(i: usize) -> usize {
    3 + (i / 8) % 3
}

const CONDITION_ANY: &str = r#"{"any":[{"path":"args.env","op":"in","value":["prod","staging"]},{"path":"args.target","op":"regex","value":"^db-"}]}"#;

fn schema(i: usize) -> String {
    let mut props = String::from(
        r#""target":{"type":"string","pattern":"^[a-z0-9-]{1,40}$"},"amount":{"type":"number","minimum":0,"maximum":10000},"env":{"type":"string","enum":["dev","staging","prod"]}"#,
    );
    if schema_props(i) >= 4 {
        props.push_str(r#","dry_run":{"type":"boolean"}"#);
    }
    if schema_props(i) >= 5 {
        props.push_str(
            r#","tags":{"type":"array","items":{"type":"string","maxLength":32},"maxItems":8}"#,
        );
    }
    format!(
        r#"{{"type":"object","properties":{{{props}}},"required":["target","amount"],"additionalProperties":false}}"#
    )
}

fn exact_rule(i: usize) -> String {
    let name = tool_name(i);
    if i % 8 == 3 {
        return format!(
            r#"{{"arguments":{},"deny_if":[{{"path":"args.amount","op":"gt","value":100}},{CONDITION_ANY}],"require":[{{"path":"args.target","op":"exists"}}]}}"#,
            schema(i)
        );
    }
    if i % 50 == 10 {
        return format!(
            r#"{{"action":"deny","reason":"{name} changes production state; ask an operator"}}"#
        );
    }
    let mut fields = Vec::new();
    if i % 4 == 1 {
        fields.push(
            r#""deny_if":[{"path":"args.amount","op":"gt","value":100},{"path":"args.mode","op":"eq","value":"destructive"}]"#
                .to_owned(),
        );
    }
    if i % 4 == 2 {
        fields.push(
            r#""require":[{"all":[{"path":"args.user","op":"regex","value":"^[a-z][a-z0-9_]*$"},{"path":"args.count","op":"lte","value":50}]}]"#
                .to_owned(),
        );
    }
    if i % 20 == 13 {
        let scope = if (i / 20).is_multiple_of(2) {
            "grant"
        } else {
            "server"
        };
        fields.push(format!(
            r#""limits":[{{"counter":"{name}_rate","window":"second","max":1000000000,"scope":"{scope}"}}]"#
        ));
    }
    format!("{{{}}}", fields.join(","))
}

/// The policy: see the module documentation. Loads with `Policy::parse` as JSON.
pub fn thousand_rule_policy() -> String {
    let mut o = String::with_capacity(256 * 1024);
    o.push_str(r#"{"version":"1","default":"deny","#);
    o.push_str(r#""hide":["internal_*","debug_*","*_secret","legacy_export"],"#);
    o.push_str(r#""all_tools":{"deny_if":[{"path":"args.sudo","op":"eq","value":true}]},"#);
    o.push_str(r#""tools":{"#);
    let mut first = true;
    let mut entry = |o: &mut String, name: &str, rule: &str| {
        if !first {
            o.push(',');
        }
        first = false;
        let _ = write!(o, "\n\"{name}\":{rule}");
    };
    for i in 0..EXACT {
        entry(&mut o, &tool_name(i), &exact_rule(i));
    }
    for n in 0..NAMESPACES {
        let rule = if n % 2 == 1 {
            r#"{"require":[{"path":"args.path","op":"regex","value":"^/srv/"}]}"#.to_owned()
        } else {
            "{}".to_owned()
        };
        entry(&mut o, &format!("ns{n:03}_read_*"), &rule);
    }
    for n in 0..NAMESPACES {
        let rule = if n.is_multiple_of(5) {
            format!(r#"{{"action":"deny","reason":"namespace ns{n:03} is retired"}}"#)
        } else {
            format!(r#"{{"deny_if":[{CONDITION_ANY}]}}"#)
        };
        entry(&mut o, &format!("ns{n:03}_*"), &rule);
    }
    o.push_str("\n}}\n");
    o
}

/// Valid arguments for schema tool `i`, passing its conditions.
fn schema_args(i: usize, m: usize) -> String {
    let mut a = format!(
        r#"{{"target":"web-{}","amount":{},"env":"dev""#,
        m % 40,
        (m * 7) % 100
    );
    if schema_props(i) >= 4 {
        a.push_str(r#","dry_run":false"#);
    }
    if schema_props(i) >= 5 {
        a.push_str(r#","tags":["nightly","eu-west"]"#);
    }
    a.push('}');
    a
}

/// The calls of the mix, in the order they are made: [`MIX_ROUNDS`] rounds of [`SCHEDULE`],
/// each call of a kind naming the next tool of that kind.
pub fn call_mix() -> Vec<MixCall> {
    let mut seen = [0usize; KINDS.len()];
    let mut out = Vec::with_capacity(MIX_ROUNDS * SCHEDULE.len());
    for _ in 0..MIX_ROUNDS {
        for &kind in &SCHEDULE {
            let m = seen[kind];
            seen[kind] += 1;
            let (tool, arguments) = call(kind, m);
            out.push(MixCall {
                kind,
                tool,
                arguments,
            });
        }
    }
    out
}

/// The `m`-th call of `kind`.
fn call(kind: usize, m: usize) -> (String, Option<String>) {
    let some = |s: &str| Some(s.to_owned());
    match kind {
        0 => {
            let i = schema_tool(m * 37);
            (tool_name(i), Some(schema_args(i, m)))
        }
        1 if m.is_multiple_of(2) => (
            tool_name(deny_if_tool(m * 7)),
            some(r#"{"amount":10,"mode":"read"}"#),
        ),
        1 => (
            tool_name(require_tool(m * 7)),
            some(r#"{"user":"alice","count":5}"#),
        ),
        2 => (tool_name(plain_tool(m * 13)), None),
        3 => (
            tool_name(limited_tool(m)),
            some(r#"{"amount":5,"mode":"read"}"#),
        ),
        4 => {
            let n = (m * 17) % NAMESPACES;
            match m % 3 {
                0 => (
                    format!("ns{n:03}_read_logs"),
                    (n % 2 == 1).then(|| r#"{"path":"/srv/data/app.log"}"#.to_owned()),
                ),
                // Namespaces that are not denied.
                _ => {
                    let n = if n.is_multiple_of(5) { n + 1 } else { n };
                    (
                        format!("ns{n:03}_deploy_service"),
                        some(r#"{"env":"dev","target":"web-3"}"#),
                    )
                }
            }
        }
        5 => {
            let i = schema_tool(m * 11);
            let bad = match m % 3 {
                0 => r#"{"target":"web-1","amount":20000,"env":"dev"}"#,
                1 => r#"{"target":"DB Prod!","amount":5,"env":"dev"}"#,
                _ => r#"{"target":"web-1","env":"dev"}"#,
            };
            (tool_name(i), some(bad))
        }
        6 => match m % 4 {
            0 => (
                tool_name(deny_if_tool(m)),
                some(r#"{"amount":500,"mode":"read"}"#),
            ),
            1 => {
                let i = schema_tool(m);
                let mut a = schema_args(i, m);
                a = a.replace(r#""env":"dev""#, r#""env":"prod""#);
                (tool_name(i), Some(a))
            }
            2 => (tool_name(plain_tool(m)), some(r#"{"sudo":true}"#)),
            _ => (tool_name(denied_tool(m)), None),
        },
        7 => match m % 2 {
            0 => (tool_name(EXACT + m % 200), None),
            _ => (format!("unlisted_tool_{m}"), some(r#"{"x":1}"#)),
        },
        _ => match m % 4 {
            0 => (format!("internal_dump_{m}"), None),
            1 => ("debug_trace".to_owned(), None),
            2 => (format!("vault_{m}_secret"), None),
            _ => (
                "legacy_export".to_owned(),
                some(r#"{"since":"2024-01-01"}"#),
            ),
        },
    }
}
