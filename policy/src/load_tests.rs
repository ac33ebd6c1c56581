//! Tests of loading: the seed policies, every kind of load error, and the
//! warnings of valid policies.

use std::time::Duration;

use super::load::escape_pointer_token;
use super::schema::ToolAction;
use super::{Policy, PolicyError};

/// A policy in the seed's style, with an explicit deny.
pub(super) const SEED: &str = r#"{ "version": "1", "default": "deny",
  "tools": { "start_security_scan": { "limits": [ { "counter": "start_security_scan_rate", "window": "minute", "max": 10, "scope": "grant" } ] },
             "drop_cluster": { "action": "deny", "reason": "destructive" } } }
"#;

/// The example policy from the issue, verbatim.
pub(super) const ISSUE_SEED: &str = r#"{"version":"1","default":"deny","tools":{"start_security_scan":{"limits":[{"counter":"start_security_scan_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;

/// `sha256sum` of [`SEED`].
const SEED_SHA256: &str = "86167aff2ee7a61457eeebc048b2c2e5c96f92192a7125e78e46170b5d728c3d";

fn load_error(text: &str) -> PolicyError {
    load_error_as(text, "policy.json")
}

fn load_error_as(text: &str, file: &str) -> PolicyError {
    match Policy::parse(text, file) {
        Ok(policy) => panic!("expected a load error, got {policy:?}"),
        Err(err) => err,
    }
}

fn parse(text: &str) -> Policy {
    Policy::parse(text, "policy.json").unwrap_or_else(|e| panic!("{e}"))
}

/// 1-based line and column of the last character of the `nth` (0-based)
/// occurrence of `needle` in `text`.
fn end_of_nth(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let (start, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} occurs fewer than {} times", nth + 1));
    let last = start + needle.len() - 1;
    let before = &text[..last];
    let line = before.matches('\n').count() + 1;
    let column = last - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
    (line, column)
}

fn end_of(text: &str, needle: &str) -> (usize, usize) {
    end_of_nth(text, needle, 0)
}

/// Asserts the error's position and that its message contains `words`.
fn assert_error(err: &PolicyError, at: (usize, usize), words: &str) {
    assert_eq!(err.file, "policy.json", "{err}");
    assert_eq!((err.line, err.column), at, "{err}");
    assert!(err.message.contains(words), "{err}");
    assert!(!err.message.contains(" at line "), "{err}");
}

/// A `default: deny` policy with one tool `a` whose single limit has `fields` (JSON members,
/// without braces), the limit on a line of its own.
fn limit_policy(fields: &str) -> String {
    format!(
        "{{\"version\": \"1\", \"default\": \"deny\", \"tools\": {{\"a\": {{\"limits\": [\n  {{{fields}}}\n]}}}}}}"
    )
}

#[test]
fn seed_parses_verbatim() {
    let policy = Policy::parse(SEED, "seed.json").unwrap();
    assert_eq!(policy.source().file, "seed.json");
    assert_eq!(policy.source().sha256, SEED_SHA256);
    assert!(!policy.default_allow);
    assert!(!policy.dry_run());
    assert_eq!(policy.rules.len(), 2);
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());

    let scan = policy.rule_for("start_security_scan").unwrap();
    assert_eq!(scan.action, ToolAction::Allow);
    assert_eq!(scan.pointer, "/tools/start_security_scan");
    assert_eq!(scan.checks.limits.len(), 1);
    assert_eq!(scan.checks.limits[0].max, 10.0);
    assert_eq!(scan.checks.limits[0].window.to_string(), "minute");
    assert!(scan.checks.limits[0].increment.is_none());
    assert_eq!(policy.counters.len(), 1);
    assert_eq!(policy.counters[0].name, "start_security_scan_rate");

    let drop = policy.rule_for("drop_cluster").unwrap();
    assert_eq!(drop.action, ToolAction::Deny);
    assert_eq!(drop.reason.as_deref(), Some("destructive"));
    assert!(drop.checks.limits.is_empty());
}

#[test]
fn issue_seed_parses_unchanged() {
    let policy = Policy::parse(ISSUE_SEED, "policy.json").unwrap();
    assert!(!policy.default_allow);
    assert_eq!(policy.rules.len(), 1);
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    assert!(policy.visible("start_security_scan"));
    assert!(!policy.visible("other"));
    assert!(!policy.hides("start_security_scan"));
}

#[test]
fn load_reads_file_and_hashes_its_bytes() {
    let path = std::env::temp_dir().join(format!("mcpwarden-policy-{}.json", std::process::id()));
    std::fs::write(&path, SEED).unwrap();
    let loaded = Policy::load(&path);
    std::fs::remove_file(&path).unwrap();
    let policy = loaded.unwrap();
    assert_eq!(policy.source().file, path.display().to_string());
    assert_eq!(policy.source().sha256, SEED_SHA256);
}

#[test]
fn load_reads_yaml_files_by_extension() {
    for ext in ["yaml", "yml", "YAML"] {
        let path = std::env::temp_dir().join(format!(
            "mcpwarden-policy-{}-{ext}.{ext}",
            std::process::id()
        ));
        std::fs::write(&path, "version: \"1\"\ndefault: allow\nhide: [x]\n").unwrap();
        let loaded = Policy::load(&path);
        std::fs::remove_file(&path).unwrap();
        let policy = loaded.unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert!(policy.hides("x"), "{ext}");
        assert!(policy.visible("y"), "{ext}");
    }
}

#[test]
fn unreadable_file_is_an_error_at_line_zero() {
    let path = std::path::Path::new("/nonexistent/mcpwarden/policy.json");
    let err = Policy::load(path).unwrap_err();
    assert_eq!(err.file, "/nonexistent/mcpwarden/policy.json");
    assert_eq!((err.line, err.column), (0, 0));
    assert!(
        err.message.starts_with("cannot read policy file: "),
        "{err}"
    );
}

#[test]
fn error_display_is_file_line_column_message() {
    let err = load_error("{\"version\": \"1\",\n \"default\": \"maybe\"}");
    assert_eq!(
        err.to_string(),
        "policy.json:2:19: unknown default \"maybe\": expected \"allow\" or \"deny\""
    );
}

#[test]
fn minimal_policy_needs_no_tools() {
    let policy = Policy::parse(r#"{"version": "1", "default": "allow"}"#, "p.json").unwrap();
    assert!(policy.default_allow);
    assert!(policy.rules.is_empty());
    assert!(!policy.dry_run());
    assert!(policy.visible_all());
}

#[test]
fn mode_is_enforce_or_dry_run() {
    let enforce = parse(r#"{"version": "1", "default": "deny", "mode": "enforce"}"#);
    assert!(!enforce.dry_run());
    assert!(!enforce.visible("anything"));

    let dry = parse(r#"{"version": "1", "default": "deny", "mode": "dry_run", "hide": "*"}"#);
    assert!(dry.dry_run());
    // A dry run changes nothing on the wire: every tool stays listed.
    assert!(dry.visible("anything"));
    assert!(dry.visible_all());
    assert!(dry.hides("anything"));

    let text = r#"{"version": "1", "default": "deny", "mode": "audit"}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"audit\""), "unknown mode \"audit\"");
}

#[test]
fn unknown_top_level_field() {
    let text = "{\n  \"version\": \"1\",\n  \"default\": \"deny\",\n  \"hidden\": [\"x\"]\n}";
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"hidden\""), "unknown field `hidden`");
}

#[test]
fn unknown_field_in_tool_rule() {
    let text = r#"{"version": "1", "default": "deny",
 "tools": {
  "a": {"action": "deny", "deny_unless": {}}
 }}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"deny_unless\""),
        "unknown field `deny_unless`",
    );
}

#[test]
fn unknown_field_in_all_tools() {
    let text = r#"{"version": "1", "default": "deny",
 "all_tools": {"limits": [], "action": "deny"}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"action\""), "unknown field `action`");
}

#[test]
fn unknown_field_in_limit() {
    let text = limit_policy(
        r#""counter": "c", "window": "minute", "max": 1, "scope": "grant", "burst": 2"#,
    );
    let err = load_error(&text);
    assert_error(&err, end_of(&text, "\"burst\""), "unknown field `burst`");
}

#[test]
fn bad_window() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [
  {"counter": "c",
   "window": "fortnight", "max": 1, "scope": "grant"}
]}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"fortnight\""),
        "unknown window \"fortnight\"",
    );
}

#[test]
fn named_and_numeric_windows() {
    for (window, secs, shown) in [
        ("\"second\"", 1, "second"),
        ("\"minute\"", 60, "minute"),
        ("\"hour\"", 3600, "hour"),
        ("\"day\"", 86_400, "day"),
        ("1", 1, "second"),
        ("30", 30, "30 seconds"),
    ] {
        let text = limit_policy(&format!(
            r#""counter": "c", "window": {window}, "max": 1, "scope": "grant""#
        ));
        let policy = parse(&text);
        let limit = &policy.rule_for("a").unwrap().checks.limits[0];
        assert_eq!(
            limit.window.duration(),
            Duration::from_secs(secs),
            "{window}"
        );
        assert_eq!(limit.window.to_string(), shown, "{window}");
        assert_eq!(policy.counters[0].retention, Duration::from_secs(secs));
    }
}

#[test]
fn zero_negative_and_fractional_windows() {
    for (window, words) in [
        ("0", "positive number of seconds, not 0"),
        ("-5", "positive number of seconds, not -5"),
        ("1.5", "invalid type: floating point `1.5`"),
        ("null", "invalid type: null"),
    ] {
        let text = format!(
            r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"limits": [{{"counter": "c", "window": {window}, "max": 1, "scope": "grant"}}]}}}}}}"#
        );
        let err = load_error(&text);
        assert_error(&err, end_of(&text, &format!("\"window\": {window}")), words);
    }
}

#[test]
fn bad_max() {
    for (max, words) in [
        ("-1", "max must not be negative, not -1"),
        ("-0.5", "max must be a non-negative number, not -0.5"),
        ("\"10\"", "expected a non-negative number"),
        ("null", "invalid type: null"),
        ("9007199254740993", "too large"),
    ] {
        let text = format!(
            r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"limits": [{{"counter": "c", "window": "minute", "max": {max}, "scope": "grant"}}]}}}}}}"#
        );
        let err = load_error(&text);
        assert_error(&err, end_of(&text, &format!("\"max\": {max}")), words);
    }
}

#[test]
fn fractional_and_zero_max_are_accepted() {
    // Spend quotas add argument values, so a fractional max makes sense.
    for (max, want) in [("2.5", 2.5), ("0", 0.0), ("0.0", 0.0), ("1e3", 1000.0)] {
        let text = limit_policy(&format!(
            r#""counter": "c", "window": "minute", "max": {max}, "scope": "grant""#
        ));
        let policy = parse(&text);
        assert_eq!(policy.rule_for("a").unwrap().checks.limits[0].max, want);
    }
}

#[test]
fn empty_counter_name() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [{"counter": "", "window": "minute", "max": 1, "scope": "grant"}]}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"counter\": \"\""),
        "counter name must not be empty",
    );
}

#[test]
fn process_session_and_server_scopes_are_accepted() {
    for scope in ["grant", "process", "session", "server"] {
        let text = limit_policy(&format!(
            r#""counter": "c", "window": "minute", "max": 1, "scope": "{scope}""#
        ));
        let policy = parse(&text);
        assert_eq!(policy.counters.len(), 1);
        assert_eq!(policy.counters[0].scope.as_str(), scope);
    }
}

#[test]
fn cluster_scope_needs_redis() {
    let text = limit_policy(r#""counter": "c", "window": "minute", "max": 1, "scope": "cluster""#);
    let err = load_error(&text);
    assert_error(&err, end_of(&text, "\"cluster\""), "Redis");
    assert!(err.message.contains("scope \"cluster\""), "{err}");
}

#[test]
fn unknown_scope() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "galaxy"}]}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"galaxy\""),
        "unknown scope \"galaxy\": expected \"grant\"",
    );
}

#[test]
fn missing_scope() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [{"counter": "c", "window": "minute", "max": 1}]}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "1}"), "missing field `scope`");
}

#[test]
fn increment_from_is_accepted() {
    let text = limit_policy(
        r#""counter": "c", "window": "minute", "max": 1, "scope": "grant",
   "increment_from": "args.amount""#,
    );
    let policy = parse(&text);
    let limit = &policy.rule_for("a").unwrap().checks.limits[0];
    assert_eq!(
        limit.increment.as_ref().map(|p| p.as_str()),
        Some("args.amount")
    );
    // A spend quota's log is not bounded by max: its amounts can be fractions.
    assert_eq!(policy.counters[0].capacity, None);
}

#[test]
fn bad_increment_from() {
    for (path, words) in [
        ("\"amount\"", "must be \"args.\""),
        ("\"args\"", "must be \"args.\""),
        ("\"args..x\"", "empty segment"),
        ("\"args.x.\"", "empty segment"),
        ("5", "invalid type: integer `5`"),
    ] {
        let text = limit_policy(&format!(
            r#""counter": "c", "window": "minute", "max": 1, "scope": "grant", "increment_from": {path}"#
        ));
        let err = load_error(&text);
        // Checked once the string is read: reported at its end or just after it.
        let (line, column) = end_of(&text, path);
        assert_eq!(err.line, line, "{err}");
        assert!(
            (column..=column + 1).contains(&err.column),
            "{err}: want column {column}"
        );
        assert!(err.message.contains(words), "{err}");
    }
}

#[test]
fn require_approval_is_accepted() {
    let text = r#"{"version": "1", "default": "deny", "tools": {
  "pay": {"action": "require_approval", "reason": "a human must confirm payments"}
}}"#;
    let policy = parse(text);
    let pay = policy.rule_for("pay").unwrap();
    assert_eq!(pay.action, ToolAction::RequireApproval);
    assert_eq!(pay.reason.as_deref(), Some("a human must confirm payments"));
    assert!(policy.visible("pay"));
}

#[test]
fn unknown_action() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"pay": {"action": "maybe"}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"maybe\""), "unknown action \"maybe\"");
}

#[test]
fn duplicate_tool() {
    let text = r#"{"version": "1", "default": "allow", "tools": {
  "drop_cluster": {"action": "deny"},
  "scan": {},
  "drop_cluster": {"action": "allow"}
}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of_nth(text, "\"drop_cluster\"", 1),
        "duplicate tool \"drop_cluster\"",
    );
}

#[test]
fn duplicate_top_level_field() {
    let text = "{\"version\": \"1\",\n \"default\": \"deny\",\n \"default\": \"allow\"}";
    let err = load_error(text);
    assert_error(
        &err,
        end_of_nth(text, "\"default\"", 1),
        "duplicate field `default`",
    );
}

#[test]
fn duplicate_field_in_tool_rule() {
    for field in [
        "action",
        "arguments",
        "deny_if",
        "require",
        "limits",
        "reason",
    ] {
        let value = match field {
            "action" => "\"allow\"",
            "reason" => "\"x\"",
            "arguments" => "{}",
            _ => "[]",
        };
        let text = format!(
            r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"{field}": {value}, "{field}": {value}}}}}}}"#
        );
        let err = load_error(&text);
        assert_error(
            &err,
            end_of_nth(&text, &format!("\"{field}\""), 1),
            &format!("duplicate field `{field}`"),
        );
    }
}

#[test]
fn duplicate_field_in_limit() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [
  {"counter": "c", "window": "minute", "max": 1, "max": 100, "scope": "grant"}
]}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of_nth(text, "\"max\"", 1),
        "duplicate field `max`",
    );
}

#[test]
fn missing_version() {
    let text = "{\n  \"default\": \"deny\"\n}\n";
    let err = load_error(text);
    assert_error(&err, (3, 1), "missing field `version`");
}

#[test]
fn missing_default() {
    let text = r#"{"version": "1"}"#;
    let err = load_error(text);
    assert_error(&err, (1, 16), "missing field `default`");
}

#[test]
fn wrong_version() {
    let text = "{\"default\": \"deny\",\n \"version\": \"2\"}";
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"2\""), "unsupported version \"2\"");

    let text = r#"{"version": 1, "default": "deny"}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "1"), "expected the string \"1\"");
}

#[test]
fn reason_and_on_deny_together() {
    let text = r#"{"version": "1", "default": "deny", "tools": {
  "drop": {"action": "deny", "reason": "destructive",
           "on_deny": "no"}
}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"on_deny\""), "give only one of them");

    // Either order.
    let text = r#"{"version": "1", "default": "deny", "tools": {"drop": {"on_deny": "no", "reason": "x"}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"reason\""), "give only one of them");

    // And each of them twice is a plain duplicate.
    let text = r#"{"version": "1", "default": "deny", "tools": {"drop": {"on_deny": "no", "on_deny": "x"}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of_nth(text, "\"on_deny\"", 1),
        "duplicate field `on_deny`",
    );
}

#[test]
fn on_deny_is_an_alias_of_reason() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"drop": {"action": "deny", "on_deny": "ask ops"}}}"#;
    let policy = Policy::parse(text, "p.json").unwrap();
    assert_eq!(
        policy.rule_for("drop").unwrap().reason.as_deref(),
        Some("ask ops")
    );
}

#[test]
fn empty_reason_and_empty_tool_name() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"drop": {"reason": " "}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\" \""), "reason must not be empty");

    let text = r#"{"version": "1", "default": "deny", "tools": {"": {}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"\""), "tool name must not be empty");
}

#[test]
fn null_is_not_an_absent_field() {
    for (field, words) in [
        ("tools", "invalid type: null"),
        ("limits", "invalid type: null"),
        ("action", "invalid type: null"),
        ("deny_if", "invalid type: null"),
        ("require", "invalid type: null"),
        ("arguments", "must be a JSON Schema"),
    ] {
        let value = "null";
        let text = match field {
            "tools" => format!(r#"{{"version": "1", "default": "deny", "tools": {value}}}"#),
            _ => format!(
                r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"{field}": {value}}}}}}}"#
            ),
        };
        let err = load_error(&text);
        assert!(err.message.contains(words), "{field}: {err}");
    }
}

#[test]
fn syntax_errors_have_positions() {
    let text = "{\"version\": \"1\",\n \"default\": \"deny\",\n}";
    let err = load_error(text);
    assert_eq!((err.line, err.column), (3, 1), "{err}");
    assert!(err.message.contains("trailing comma"), "{err}");

    let text = "{\"version\": \"1\", \"default\": \"deny\"} {}";
    let err = load_error(text);
    assert_eq!((err.line, err.column), end_of(text, "} {"), "{err}");
    assert!(err.message.contains("trailing characters"), "{err}");

    // Derived structs would take an array of field values; the format does not.
    let text = r#"["1", "deny"]"#;
    let err = load_error(text);
    assert_eq!((err.line, err.column), (1, 1), "{err}");
    assert_eq!(err.message, "invalid type: sequence, expected an object");

    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [["c", "minute", 1, "grant"]]}}}"#;
    let err = load_error(text);
    assert_eq!(err.message, "invalid type: sequence, expected an object");

    let text = r#"{"version": "1", "default": "deny", "all_tools": ["x"]}"#;
    let err = load_error(text);
    assert_eq!(err.message, "invalid type: sequence, expected an object");

    let text = r#"{"version": "1", "default": "deny", "tools": {"a": []}}"#;
    let err = load_error(text);
    assert_eq!(
        err.message,
        "invalid type: sequence, expected a tool rule object"
    );
}

#[test]
fn shared_counters_take_the_longest_window_and_largest_max() {
    let text = r#"{"version": "1", "default": "deny", "tools": {
  "a": {"limits": [{"counter": "c", "window": "minute", "max": 10, "scope": "grant"},
                   {"counter": "d", "window": 5, "max": 1, "scope": "grant"}]},
  "b": {"limits": [{"counter": "c", "window": "hour", "max": 3, "scope": "grant"},
                   {"counter": "c", "window": "second", "max": 2, "scope": "grant"}]}
}}"#;
    let policy = Policy::parse(text, "p.json").unwrap();
    assert_eq!(policy.counters.len(), 2);
    let c = policy.counters.iter().position(|c| c.name == "c").unwrap();
    assert_eq!(policy.counters[c].retention, Duration::from_secs(3600));
    assert_eq!(policy.counters[c].capacity, Some(10));
    let d = policy.counters.iter().position(|c| c.name == "d").unwrap();
    assert_eq!(policy.counters[d].retention, Duration::from_secs(5));
    assert_eq!(policy.counters[d].capacity, Some(1));
    // Tool b names counter c twice: both limits use the one counter.
    let b: Vec<usize> = policy
        .rule_for("b")
        .unwrap()
        .checks
        .limits
        .iter()
        .map(|l| l.counter)
        .collect();
    assert_eq!(b, vec![c, c]);
    let a: Vec<usize> = policy
        .rule_for("a")
        .unwrap()
        .checks
        .limits
        .iter()
        .map(|l| l.counter)
        .collect();
    assert_eq!(a, vec![c, d]);
}

#[test]
fn one_counter_name_in_two_scopes_is_two_counters() {
    let text = r#"{"version": "1", "default": "deny",
 "all_tools": {"limits": [{"counter": "c", "window": "minute", "max": 10, "scope": "server"}]},
 "tools": {"a": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "grant"}]}}}"#;
    let policy = parse(text);
    assert_eq!(policy.counters.len(), 2);
    let scopes: Vec<&str> = policy.counters.iter().map(|c| c.scope.as_str()).collect();
    assert!(
        scopes.contains(&"server") && scopes.contains(&"grant"),
        "{scopes:?}"
    );
}

#[test]
fn pointer_tokens_are_escaped() {
    assert_eq!(escape_pointer_token("plain"), "plain");
    assert_eq!(escape_pointer_token("a/b~c"), "a~1b~0c");
    assert_eq!(escape_pointer_token("~1"), "~01");
    let policy = parse(r#"{"version": "1", "default": "deny", "tools": {"a/b~c": {}}}"#);
    assert_eq!(policy.rule_for("a/b~c").unwrap().pointer, "/tools/a~1b~0c");
}

#[test]
fn hide_accepts_names_patterns_and_star() {
    let policy = parse(
        r#"{"version": "1", "default": "allow", "hide": ["secret", "admin_*", "*_internal"]}"#,
    );
    for (tool, hidden) in [
        ("secret", true),
        ("secret2", false),
        ("admin_drop", true),
        ("admin_", true),
        ("admin", false),
        ("db_internal", true),
        ("db_internals", false),
        ("echo", false),
    ] {
        assert_eq!(policy.hides(tool), hidden, "{tool}");
        assert_eq!(policy.visible(tool), !hidden, "{tool}");
    }
    assert!(!policy.visible_all());

    for text in [
        r#"{"version": "1", "default": "allow", "hide": "*"}"#,
        r#"{"version": "1", "default": "allow", "hide": ["x", "*"]}"#,
        r#"{"version": "1", "default": "allow", "hide": ["**"]}"#,
    ] {
        let policy = parse(text);
        for tool in ["x", "anything", ""] {
            assert!(policy.hides(tool), "{text}: {tool}");
            assert!(!policy.visible(tool), "{text}: {tool}");
        }
    }

    let policy = parse(r#"{"version": "1", "default": "allow", "hide": []}"#);
    assert!(!policy.hides("x"));
    assert!(policy.visible_all());
}

#[test]
fn hide_must_be_star_or_a_list_of_names() {
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
            r#"{"version":"1","default":"deny","hide":{"a":1}}"#,
            "invalid type",
        ),
    ] {
        let err = Policy::parse(text, "p.json").expect_err(text);
        assert!(err.to_string().contains(needle), "{text}: {err}");
        assert!(err.line >= 1 && err.column >= 1, "{err}");
    }
}

#[test]
fn visibility_follows_default_rules_and_patterns() {
    let policy = parse(
        r#"{"version": "1", "default": "deny", "hide": ["get_secret"],
            "tools": {"get_*": {}, "drop": {"action": "deny"}, "pay": {"action": "require_approval"}}}"#,
    );
    assert!(policy.visible("get_user"), "a pattern lists it");
    assert!(!policy.visible("get_secret"), "hidden beats listed");
    assert!(
        policy.visible("drop"),
        "explicitly denied tools stay visible"
    );
    assert!(policy.visible("pay"));
    assert!(!policy.visible("put_user"), "unlisted under default deny");
    assert!(!policy.visible_all());
}

#[test]
fn exact_names_beat_patterns_and_longer_prefixes_win() {
    let policy = parse(
        r#"{"version": "1", "default": "deny", "tools": {
            "*": {"action": "deny"},
            "get_*": {},
            "get_secret_*": {"action": "deny"},
            "get_secret_ok": {}
        }}"#,
    );
    let rule = |tool: &str| policy.rule_for(tool).map(|r| r.pointer.as_str());
    assert_eq!(rule("get_secret_ok"), Some("/tools/get_secret_ok"));
    assert_eq!(rule("get_secret_key"), Some("/tools/get_secret_*"));
    assert_eq!(rule("get_user"), Some("/tools/get_*"));
    assert_eq!(rule("get_x"), Some("/tools/get_*"));
    assert_eq!(rule("put_x"), Some("/tools/*"));
    assert_eq!(rule("anything"), Some("/tools/*"));
}

#[test]
fn tied_patterns_are_a_load_error() {
    for (tools, second) in [
        // Same prefix "get_", and "get_a_b" matches both.
        (r#""get_*_b": {}, "get_*a*": {}"#, "\"get_*a*\""),
        // Prefix "" on both; "a_b" matches both.
        (r#""*_b": {}, "*a*": {}"#, "\"*a*\""),
        (r#""*": {}, "*x": {"action": "deny"}"#, "\"*x\""),
        (r#""a*": {}, "a*": {}"#, "\"a*\""),
    ] {
        let text =
            format!("{{\"version\": \"1\", \"default\": \"deny\", \"tools\": {{\n  {tools}\n}}}}");
        let err = load_error(&text);
        let occurrence = usize::from(tools.matches(second).count() > 1);
        if occurrence == 1 {
            // The same pattern twice is reported as a duplicate.
            assert_error(&err, end_of_nth(&text, second, 1), "duplicate tool");
        } else {
            assert_error(&err, end_of(&text, second), "tie");
        }
    }
}

#[test]
fn patterns_that_cannot_tie_load() {
    for tools in [
        // Same prefix length, no common name.
        r#""get_*": {}, "put_*": {"action": "deny"}"#,
        r#""get_*_x": {}, "get_*_y": {}"#,
        // Overlapping, different prefix lengths: the longer one wins.
        r#""*": {"action": "deny"}, "get_*": {}"#,
        r#""g*": {}, "get_*": {"action": "deny"}"#,
    ] {
        let text = format!(r#"{{"version": "1", "default": "deny", "tools": {{{tools}}}}}"#);
        Policy::parse(&text, "policy.json").unwrap_or_else(|e| panic!("{tools}: {e}"));
    }
}

#[test]
fn arguments_must_be_a_valid_json_schema() {
    let ok = parse(
        r##"{"version": "1", "default": "deny", "tools": {
            "a": {"arguments": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
                                "required": ["n"], "additionalProperties": false}},
            "b": {"arguments": true},
            "c": {"arguments": {"$defs": {"pos": {"minimum": 0}}, "properties": {"n": {"$ref": "#/$defs/pos"}}}}
        }}"##,
    );
    assert!(ok.rule_for("a").unwrap().arguments.is_some());

    for (schema, words) in [
        (r#"{"type": "nonsense"}"#, "not a valid JSON Schema"),
        (r#"{"minimum": "zero"}"#, "not a valid JSON Schema"),
        (r#"{"required": "n"}"#, "not a valid JSON Schema"),
        ("[1, 2]", "must be a JSON Schema"),
        ("\"object\"", "must be a JSON Schema"),
        ("5", "must be a JSON Schema"),
    ] {
        let text = format!(
            "{{\"version\": \"1\", \"default\": \"deny\", \"tools\": {{\"a\": {{\n \"arguments\": {schema}}}}}}}"
        );
        let err = load_error(&text);
        assert!(err.message.contains(words), "{schema}: {err}");
        // Reported at the schema: its line, at or just after its end.
        assert_eq!(err.line, 2, "{schema}: {err}");
        assert!(err.column >= end_of(&text, schema).1, "{schema}: {err}");
    }
}

#[test]
fn condition_errors_have_positions() {
    for (condition, needle, words) in [
        (
            r#"{"path": "args.a", "op": "approx", "value": 1}"#,
            "\"approx\"",
            "unknown op \"approx\"",
        ),
        (
            r#"{"path": "amount", "op": "eq", "value": 1}"#,
            "\"amount\"",
            "must be \"args.\"",
        ),
        (
            r#"{"path": "args.a", "op": "gt", "value": "x"}"#,
            "\"x\"",
            "must be a number",
        ),
        (
            r#"{"path": "args.a", "op": "regex", "value": "("}"#,
            "\"(\"",
            "invalid regex",
        ),
        (
            r#"{"path": "args.a", "op": "in", "value": []}"#,
            "[]",
            "non-empty array",
        ),
    ] {
        for list in ["deny_if", "require"] {
            let text = format!(
                "{{\"version\": \"1\", \"default\": \"deny\", \"tools\": {{\"a\": {{\n \"{list}\": [{condition}]}}}}}}"
            );
            let err = load_error(&text);
            assert!(err.message.contains(words), "{list} {condition}: {err}");
            assert_eq!(err.line, 2, "{list} {condition}: {err}");
            assert!(
                err.column >= end_of(&text, needle).1,
                "{list} {condition}: {err}"
            );
        }
    }
    let text = r#"{"version": "1", "default": "deny", "all_tools": {"deny_if": [{"path": "args.a", "op": "eq", "value": 1, "extra": 2}]}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"extra\""), "unknown field `extra`");
}

#[test]
fn all_tools_is_read() {
    let policy = parse(
        r#"{"version": "1", "default": "allow", "all_tools": {
            "limits": [{"counter": "all", "window": "second", "max": 5, "scope": "server"}],
            "deny_if": [{"path": "args.env", "op": "eq", "value": "prod"}],
            "require": [{"any": [{"path": "args.ticket", "op": "exists"}, {"path": "args.dry", "op": "eq", "value": true}]}]
        }}"#,
    );
    assert_eq!(policy.all_tools.pointer, "/all_tools");
    assert_eq!(policy.all_tools.limits.len(), 1);
    assert_eq!(policy.all_tools.deny_if.len(), 1);
    assert_eq!(policy.all_tools.require.len(), 1);
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
}

#[test]
fn yaml_policy_reads_like_json() {
    let yaml = r#"
version: "1"
default: deny
mode: enforce
hide: ["admin_*"]
all_tools:
  deny_if:
    - {path: args.env, op: eq, value: prod}
tools:
  start_security_scan:
    limits:
      - counter: start_security_scan_rate
        window: minute
        max: 10
        scope: grant
  drop_cluster:
    action: deny
    on_deny: destructive
"#;
    let policy = Policy::parse(yaml, "policy.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert!(!policy.default_allow);
    assert!(policy.hides("admin_x"));
    assert_eq!(policy.all_tools.deny_if.len(), 1);
    let scan = policy.rule_for("start_security_scan").unwrap();
    assert_eq!(scan.checks.limits[0].max, 10.0);
    assert_eq!(
        policy.rule_for("drop_cluster").unwrap().reason.as_deref(),
        Some("destructive")
    );
    assert_eq!(policy.source().file, "policy.yaml");
    // The file's bytes are hashed, whatever the format.
    assert_eq!(policy.source().sha256.len(), 64);
}

#[test]
fn yaml_errors_have_line_and_column() {
    // An unknown value on line 3.
    let text = "version: \"1\"\n# comment\ndefault: maybe\n";
    let err = load_error_as(text, "p.yml");
    assert_eq!(err.file, "p.yml");
    assert_eq!(err.line, 3, "{err}");
    assert!(err.column >= 1, "{err}");
    assert!(err.message.contains("unknown default \"maybe\""), "{err}");
    assert!(!err.message.contains(" at line "), "{err}");

    // An unknown field inside a tool rule, on line 5 column 5.
    let text = "version: \"1\"\ndefault: deny\ntools:\n  a:\n    acton: deny\n";
    let err = load_error_as(text, "p.yaml");
    assert_eq!((err.line, err.column), (5, 5), "{err}");
    assert!(err.message.contains("unknown field `acton`"), "{err}");

    // Syntax: a tab-indented mapping is not YAML.
    let text = "version: \"1\"\ndefault: deny\ntools:\n\ta: {}\n";
    let err = load_error_as(text, "p.yaml");
    assert!(err.line >= 3 && err.column >= 1, "{err}");

    // The cluster scope is refused in YAML too.
    let text = "version: \"1\"\ndefault: deny\ntools:\n  a:\n    limits:\n      - {counter: c, window: 5, max: 1, scope: cluster}\n";
    let err = load_error_as(text, "p.yaml");
    assert_eq!(err.line, 6, "{err}");
    assert!(err.message.contains("Redis"), "{err}");

    // A duplicate key is an error, not "last one wins". serde_yaml_ng places errors found
    // by a mapping's visitor at the start of that mapping, and the message names the path.
    let text = "version: \"1\"\ndefault: deny\ndefault: allow\n";
    let err = load_error_as(text, "p.yaml");
    assert!(err.line >= 1 && err.column >= 1, "{err}");
    assert!(err.message.contains("duplicate field `default`"), "{err}");
    let text = "version: \"1\"\ndefault: deny\ntools:\n  a:\n    action: deny\n    action: allow\n";
    let err = load_error_as(text, "p.yaml");
    assert_eq!((err.line, err.column), (5, 5), "{err}");
    assert!(
        err.message.contains("tools.a: duplicate field `action`"),
        "{err}"
    );

    // JSON is chosen by any other name, so YAML text there fails.
    let err = load_error_as("version: \"1\"\ndefault: deny\n", "policy.txt");
    assert_eq!((err.line, err.column), (1, 1), "{err}");
}

fn warning_pointers(text: &str) -> Vec<(String, String)> {
    parse(text)
        .warnings()
        .iter()
        .map(|w| (w.pointer.clone(), w.message.clone()))
        .collect()
}

#[test]
fn warnings_of_rules_that_never_apply() {
    // (policy, pointer, words in the message)
    let rows: &[(&str, &str, &str)] = &[
        (
            r#"{"version": "1", "default": "deny", "hide": ["secret"], "tools": {"secret": {}}}"#,
            "/tools/secret",
            "hidden",
        ),
        (
            r#"{"version": "1", "default": "deny", "hide": ["get_*"], "tools": {"get_user": {}}}"#,
            "/tools/get_user",
            "hidden",
        ),
        (
            r#"{"version": "1", "default": "deny", "hide": ["get_*"], "tools": {"get_user_*": {}}}"#,
            "/tools/get_user_*",
            "hidden",
        ),
        (
            r#"{"version": "1", "default": "deny", "hide": "*", "tools": {"echo": {}}}"#,
            "/tools/echo",
            "hidden",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"d": {"action": "deny",
                "limits": [{"counter": "c", "window": 1, "max": 1, "scope": "grant"}]}}}"#,
            "/tools/d",
            "never apply",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"d": {"action": "deny",
                "deny_if": [{"path": "args.a", "op": "exists"}]}}}"#,
            "/tools/d",
            "never apply",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"d": {"action": "deny",
                "require": [{"path": "args.a", "op": "exists"}]}}}"#,
            "/tools/d",
            "never apply",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"d": {"action": "require_approval",
                "approval": {"mode": "user"}}}}"#,
            "/tools/d/approval",
            "autonomous client",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"get_*": {"action": "deny"}, "get_user": {}}}"#,
            "/tools/get_user",
            "also matches pattern \"get_*\"",
        ),
        (
            r#"{"version": "1", "default": "deny", "tools": {"t": {"limits": [
                {"counter": "c", "window": 1, "max": 1, "scope": "grant"},
                {"counter": "z", "window": 1, "max": 0, "scope": "grant"}]}}}"#,
            "/tools/t/limits/1",
            "max 0",
        ),
        (
            r#"{"version": "1", "default": "allow", "all_tools": {"limits": [
                {"counter": "z", "window": 1, "max": 0, "scope": "server"}]}}"#,
            "/all_tools/limits/0",
            "max 0",
        ),
    ];
    for (text, pointer, words) in rows {
        let warnings = warning_pointers(text);
        assert!(
            warnings
                .iter()
                .any(|(p, m)| p == pointer && m.contains(words)),
            "{text}: want {pointer} {words:?}, got {warnings:?}"
        );
    }
}

#[test]
fn no_warnings_for_rules_that_apply() {
    for text in [
        SEED,
        ISSUE_SEED,
        // Hidden by a pattern that does not cover the whole tool pattern.
        r#"{"version": "1", "default": "deny", "hide": ["get_user_*"], "tools": {"get_*": {}}}"#,
        // A denied tool with only a reason.
        r#"{"version": "1", "default": "deny", "tools": {"d": {"action": "deny", "reason": "no"}}}"#,
        // An exact name no pattern matches.
        r#"{"version": "1", "default": "deny", "tools": {"get_*": {}, "put_user": {}}}"#,
        r#"{"version": "1", "default": "allow", "all_tools": {"limits": [
            {"counter": "z", "window": 1, "max": 0.5, "scope": "server", "increment_from": "args.n"}]}}"#,
    ] {
        let warnings = warning_pointers(text);
        assert!(warnings.is_empty(), "{text}: {warnings:?}");
    }
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let text = "\u{feff}{\"version\":\"1\",\"default\":\"deny\"}";
    let policy = match Policy::parse(text, "bom.json") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(policy.source().sha256, crate::sha256_hex(text.as_bytes()));
    let err = match Policy::parse("\u{feff}{\"version\":\"2\"}", "bom.json") {
        Ok(_) => panic!("version 2 loaded"),
        Err(e) => e,
    };
    assert_eq!((err.line, err.column), (1, 14), "{err}");
}

#[test]
fn listed_tools_are_the_literal_names_of_tools_and_hide() {
    let policy = parse(
        r#"{"version": "1", "default": "deny",
            "hide": ["secret", "admin_*", "echo", "what?", "[x]"],
            "tools": {"echo": {}, "get_*": {}, "a/b~c": {"action": "deny"}, "*": {}, "zap": {}}}"#,
    );
    // `*` is the only wildcard: `?` and `[...]` are ordinary characters.
    assert_eq!(
        policy.listed_tools(),
        ["[x]", "a/b~c", "echo", "secret", "what?", "zap"]
    );
    let all = parse(r#"{"version": "1", "default": "allow", "hide": "*", "tools": {"b": {}}}"#);
    assert_eq!(all.listed_tools(), ["b"]);
    assert!(parse(r#"{"version": "1", "default": "allow"}"#)
        .listed_tools()
        .is_empty());
}
