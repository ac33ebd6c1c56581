//! Tests of loading: the seed policy and every kind of load error.

use super::load::escape_pointer_token;
use super::{Policy, PolicyError};

/// The example policy from the issue, verbatim.
pub(super) const SEED: &str = r#"{ "version": "1", "default": "deny",
  "tools": { "start_security_scan": { "limits": [ { "counter": "start_security_scan_rate", "window": "minute", "max": 10, "scope": "grant" } ] },
             "drop_cluster": { "action": "deny", "reason": "destructive" } } }
"#;

/// `sha256sum` of [`SEED`].
const SEED_SHA256: &str = "86167aff2ee7a61457eeebc048b2c2e5c96f92192a7125e78e46170b5d728c3d";

fn load_error(text: &str) -> PolicyError {
    match Policy::parse(text, "policy.json") {
        Ok(policy) => panic!("expected a load error, got {policy:?}"),
        Err(err) => err,
    }
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

#[test]
fn seed_parses_verbatim() {
    let policy = Policy::parse(SEED, "seed.json").unwrap();
    assert_eq!(policy.source().file, "seed.json");
    assert_eq!(policy.source().sha256, SEED_SHA256);
    assert!(!policy.default_allow);
    assert_eq!(policy.tools.len(), 2);

    let scan = &policy.tools["start_security_scan"];
    assert!(!scan.deny);
    assert_eq!(scan.pointer, "/tools/start_security_scan");
    assert_eq!(scan.limits.len(), 1);
    assert_eq!(scan.limits[0].max, 10);
    assert_eq!(scan.limits[0].window.to_string(), "minute");
    assert_eq!(policy.counters.len(), 1);
    assert_eq!(policy.counters[0].name, "start_security_scan_rate");

    let drop = &policy.tools["drop_cluster"];
    assert!(drop.deny);
    assert_eq!(drop.reason.as_deref(), Some("destructive"));
    assert!(drop.limits.is_empty());
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
    assert!(policy.tools.is_empty());
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
  "a": {"action": "deny", "deny_if": {}}
 }}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"deny_if\""), "unknown field `deny_if`");
}

#[test]
fn unknown_field_in_limit() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [
  {"counter": "c", "window": "minute", "max": 1, "scope": "grant", "burst": 2}
]}}}"#;
    let err = load_error(text);
    assert_error(&err, end_of(text, "\"burst\""), "unknown field `burst`");
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
        ("-1", "max must be a non-negative integer, not -1"),
        ("2.5", "expected a non-negative integer"),
        ("\"10\"", "expected a non-negative integer"),
    ] {
        let text = format!(
            r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"limits": [{{"counter": "c", "window": "minute", "max": {max}, "scope": "grant"}}]}}}}}}"#
        );
        let err = load_error(&text);
        assert_error(&err, end_of(&text, &format!("\"max\": {max}")), words);
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
fn later_scopes_are_not_supported_yet() {
    for scope in ["process", "session", "server", "cluster"] {
        let text = format!(
            "{{\"version\": \"1\", \"default\": \"deny\", \"tools\": {{\"a\": {{\"limits\": [\n  {{\"counter\": \"c\", \"window\": \"minute\", \"max\": 1, \"scope\": \"{scope}\"}}\n]}}}}}}"
        );
        let err = load_error(&text);
        assert_error(
            &err,
            end_of(&text, &format!("\"{scope}\"")),
            &format!("scope \"{scope}\" is not supported yet"),
        );
    }
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
fn increment_from_is_not_supported_yet() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"limits": [
  {"counter": "c", "window": "minute", "max": 1, "scope": "grant",
   "increment_from": "args.amount"}
]}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"args.amount\""),
        "\"increment_from\" is not supported yet",
    );
}

#[test]
fn require_approval_is_not_supported_yet() {
    let text = r#"{"version": "1", "default": "deny", "tools": {
  "pay": {"action": "require_approval"}
}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of(text, "\"require_approval\""),
        "action \"require_approval\" is not supported yet",
    );
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
    let text = r#"{"version": "1", "default": "deny", "tools": {"a": {"action": "allow", "action": "deny"}}}"#;
    let err = load_error(text);
    assert_error(
        &err,
        end_of_nth(text, "\"action\"", 1),
        "duplicate field `action`",
    );
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
}

#[test]
fn on_deny_is_an_alias_of_reason() {
    let text = r#"{"version": "1", "default": "deny", "tools": {"drop": {"action": "deny", "on_deny": "ask ops"}}}"#;
    let policy = Policy::parse(text, "p.json").unwrap();
    assert_eq!(policy.tools["drop"].reason.as_deref(), Some("ask ops"));
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
    for (field, value) in [("tools", "null"), ("limits", "null"), ("action", "null")] {
        let text = match field {
            "tools" => format!(r#"{{"version": "1", "default": "deny", "tools": {value}}}"#),
            _ => format!(
                r#"{{"version": "1", "default": "deny", "tools": {{"a": {{"{field}": {value}}}}}}}"#
            ),
        };
        let err = load_error(&text);
        assert!(err.message.contains("invalid type: null"), "{field}: {err}");
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
    let c = policy.counters.iter().find(|c| c.name == "c").unwrap();
    assert_eq!(c.retention, std::time::Duration::from_secs(3600));
    assert_eq!(c.capacity, 10);
    let d = policy.counters.iter().find(|c| c.name == "d").unwrap();
    assert_eq!(d.retention, std::time::Duration::from_secs(5));
    // Tool b names counter c twice but records it once.
    assert_eq!(policy.tools["b"].counters.len(), 1);
    assert_eq!(policy.tools["a"].counters.len(), 2);
}

#[test]
fn pointer_tokens_are_escaped() {
    assert_eq!(escape_pointer_token("plain"), "plain");
    assert_eq!(escape_pointer_token("a/b~c"), "a~1b~0c");
    assert_eq!(escape_pointer_token("~1"), "~01");
}
