use super::*;
use serde_json::json;

const H: WrongType = WrongType::Holds;
const F: WrongType = WrongType::Fails;

fn cond(text: &str) -> Condition {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{text}: {err}"))
}

/// Rows of (condition, args, how a wrong type counts, expected).
fn check(rows: &[(&str, &str, WrongType, bool)]) {
    for (i, (text, args, wrong, want)) in rows.iter().enumerate() {
        let condition = cond(text);
        let args: Value = serde_json::from_str(args).unwrap();
        let got = condition.holds(&args, *wrong);
        let (explained, why) = condition.explain(&args, *wrong);
        assert_eq!(got, *want, "row {i}: {text} on {args} ({wrong:?}): {why}");
        assert_eq!(explained, got, "row {i}: explain disagrees: {why}");
    }
}

/// The message and 1-based (line, column) of a JSON load error.
fn json_error(text: &str) -> (String, usize, usize) {
    match serde_json::from_str::<Condition>(text) {
        Ok(c) => panic!("{text} loaded as {c}"),
        Err(err) => (err.to_string(), err.line(), err.column()),
    }
}

fn yaml_error(text: &str) -> (String, usize, usize) {
    match serde_yaml_ng::from_str::<Condition>(text) {
        Ok(c) => panic!("{text} loaded as {c}"),
        Err(err) => {
            let at = err.location().map_or((0, 0), |l| (l.line(), l.column()));
            (err.to_string(), at.0, at.1)
        }
    }
}

/// Asserts a JSON load error's message and the position of the last
/// character of the `nth` occurrence of `at`.
fn assert_json_error(text: &str, at: &str, nth: usize, words: &str) {
    let (message, line, column) = json_error(text);
    assert!(message.contains(words), "{text}: {message}");
    let (start, _) = text
        .match_indices(at)
        .nth(nth)
        .unwrap_or_else(|| panic!("{at:?} not in {text}"));
    let last = start + at.len() - 1;
    let before = &text[..last];
    let want_line = before.matches('\n').count() + 1;
    let want_column = last - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
    assert_eq!(
        (line, column),
        (want_line, want_column),
        "{text}: {message}"
    );
}

/// Nests `inner` inside `levels` `all`s.
fn nested(levels: usize, inner: &str) -> String {
    let mut text = inner.to_owned();
    for _ in 0..levels {
        text = format!("{{\"all\": [{text}]}}");
    }
    text
}

#[test]
fn eq() {
    let prod = r#"{"path": "args.env", "op": "eq", "value": "prod"}"#;
    let one = r#"{"path": "args.n", "op": "eq", "value": 1}"#;
    let one_f = r#"{"path": "args.n", "op": "eq", "value": 1.0}"#;
    let max = r#"{"path": "args.n", "op": "eq", "value": 18446744073709551615}"#;
    let min = r#"{"path": "args.n", "op": "eq", "value": -9223372036854775808}"#;
    let null = r#"{"path": "args.n", "op": "eq", "value": null}"#;
    let yes = r#"{"path": "args.n", "op": "eq", "value": true}"#;
    let arr = r#"{"path": "args.n", "op": "eq", "value": [1, "a"]}"#;
    let obj = r#"{"path": "args.n", "op": "eq", "value": {"a": 1, "b": [2]}}"#;
    check(&[
        (prod, r#"{"env": "prod"}"#, F, true),
        (prod, r#"{"env": "dev"}"#, H, false),
        (prod, r#"{"env": "Prod"}"#, H, false),
        (prod, r#"{}"#, H, false),
        (prod, r#"{}"#, F, false),
        (prod, r#"{"env": 1}"#, H, true),
        (prod, r#"{"env": 1}"#, F, false),
        (prod, r#"{"env": null}"#, H, true),
        (prod, r#"{"env": ["prod"]}"#, F, false),
        (one, r#"{"n": 1}"#, F, true),
        (one, r#"{"n": 1.0}"#, F, true),
        (one, r#"{"n": 1e0}"#, F, true),
        (one, r#"{"n": 1.5}"#, H, false),
        (one, r#"{"n": "1"}"#, H, true),
        (one, r#"{"n": "1"}"#, F, false),
        (one_f, r#"{"n": 1}"#, F, true),
        (max, r#"{"n": 18446744073709551615}"#, F, true),
        (max, r#"{"n": 18446744073709551614}"#, H, false),
        (min, r#"{"n": -9223372036854775808}"#, F, true),
        (min, r#"{"n": -9223372036854775807}"#, H, false),
        (null, r#"{"n": null}"#, F, true),
        (null, r#"{"n": 0}"#, H, true),
        (null, r#"{"n": 0}"#, F, false),
        (null, r#"{}"#, H, false),
        (yes, r#"{"n": true}"#, F, true),
        (yes, r#"{"n": false}"#, H, false),
        (yes, r#"{"n": 1}"#, F, false),
        (arr, r#"{"n": [1.0, "a"]}"#, F, true),
        (arr, r#"{"n": [1, "b"]}"#, H, false),
        (arr, r#"{"n": [1]}"#, H, false),
        (arr, r#"{"n": ["a", 1]}"#, H, false),
        (obj, r#"{"n": {"b": [2.0], "a": 1}}"#, F, true),
        (obj, r#"{"n": {"a": 1}}"#, H, false),
        (obj, r#"{"n": {"a": 1, "b": [2], "c": 3}}"#, H, false),
        (obj, r#"{"n": {"a": "1", "b": [2]}}"#, H, false),
    ]);
}

#[test]
fn mixed_integer_and_float_compare_exactly() {
    // 2^53 + 1 has no f64 form; it is still more than the float 2^53, as a server holding
    // integers exactly reads it.
    let big = r#"{"path": "args.n", "op": "eq", "value": 9007199254740993}"#;
    let at_most = r#"{"path": "args.n", "op": "lte", "value": 9007199254740992.0}"#;
    let over = r#"{"path": "args.n", "op": "gt", "value": 9007199254740992.0}"#;
    let half = r#"{"path": "args.n", "op": "lt", "value": 2.5}"#;
    check(&[
        (big, r#"{"n": 9007199254740992.0}"#, F, false),
        (big, r#"{"n": 9007199254740992}"#, H, false),
        (big, r#"{"n": 9007199254740993}"#, F, true),
        (at_most, r#"{"n": 9007199254740993}"#, F, false),
        (at_most, r#"{"n": 9007199254740992}"#, F, true),
        (over, r#"{"n": 9007199254740993}"#, F, true),
        (half, r#"{"n": 2}"#, F, true),
        (half, r#"{"n": 3}"#, F, false),
        (half, r#"{"n": -3}"#, F, true),
        (
            r#"{"path": "args.n", "op": "gt", "value": -2.5}"#,
            r#"{"n": -2}"#,
            F,
            true,
        ),
        (
            r#"{"path": "args.n", "op": "gt", "value": -2.5}"#,
            r#"{"n": -3}"#,
            F,
            false,
        ),
        (
            r#"{"path": "args.n", "op": "lt", "value": 1e300}"#,
            r#"{"n": 18446744073709551615}"#,
            F,
            true,
        ),
        (
            r#"{"path": "args.n", "op": "gt", "value": -1e300}"#,
            r#"{"n": -9223372036854775808}"#,
            F,
            true,
        ),
    ]);
}

#[test]
fn neq() {
    let prod = r#"{"path": "args.env", "op": "neq", "value": "prod"}"#;
    let one = r#"{"path": "args.n", "op": "neq", "value": 1}"#;
    check(&[
        (prod, r#"{"env": "dev"}"#, F, true),
        (prod, r#"{"env": "prod"}"#, H, false),
        (prod, r#"{}"#, H, false),
        (prod, r#"{}"#, F, false),
        (prod, r#"{"env": 7}"#, H, true),
        (prod, r#"{"env": 7}"#, F, false),
        (prod, r#"{"env": null}"#, F, false),
        (one, r#"{"n": 1.0}"#, F, false),
        (one, r#"{"n": 2}"#, F, true),
        (one, r#"{"n": -1}"#, F, true),
    ]);
}

#[test]
fn in_and_not_in() {
    let envs = r#"{"path": "args.env", "op": "in", "value": ["prod", "staging"]}"#;
    let mixed = r#"{"path": "args.v", "op": "in", "value": [1, "a", null]}"#;
    let not = r#"{"path": "args.env", "op": "not_in", "value": ["prod", "staging"]}"#;
    let not_nums = r#"{"path": "args.v", "op": "not_in", "value": [1, 2]}"#;
    check(&[
        (envs, r#"{"env": "prod"}"#, F, true),
        (envs, r#"{"env": "staging"}"#, F, true),
        (envs, r#"{"env": "dev"}"#, H, false),
        (envs, r#"{}"#, H, false),
        (envs, r#"{}"#, F, false),
        (envs, r#"{"env": 1}"#, H, true),
        (envs, r#"{"env": 1}"#, F, false),
        (envs, r#"{"env": ["prod"]}"#, H, true),
        (mixed, r#"{"v": 1.0}"#, F, true),
        (mixed, r#"{"v": "a"}"#, F, true),
        (mixed, r#"{"v": null}"#, F, true),
        (mixed, r#"{"v": "b"}"#, H, false),
        (mixed, r#"{"v": 2}"#, H, false),
        (mixed, r#"{"v": true}"#, H, true),
        (mixed, r#"{"v": true}"#, F, false),
        (not, r#"{"env": "dev"}"#, F, true),
        (not, r#"{"env": "prod"}"#, H, false),
        (not, r#"{}"#, H, false),
        (not, r#"{}"#, F, false),
        (not, r#"{"env": 5}"#, H, true),
        (not, r#"{"env": 5}"#, F, false),
        (not_nums, r#"{"v": 1.0}"#, F, false),
        (not_nums, r#"{"v": 3}"#, F, true),
        (not_nums, r#"{"v": "1"}"#, F, false),
    ]);
}

#[test]
fn comparisons() {
    let gt = r#"{"path": "args.amount", "op": "gt", "value": 100}"#;
    let gte = r#"{"path": "args.amount", "op": "gte", "value": 100}"#;
    let lt = r#"{"path": "args.amount", "op": "lt", "value": 10}"#;
    let lte = r#"{"path": "args.amount", "op": "lte", "value": 10}"#;
    let lt_half = r#"{"path": "args.amount", "op": "lt", "value": 0.5}"#;
    let gt_big = r#"{"path": "args.n", "op": "gt", "value": 18446744073709551614}"#;
    let lt_min = r#"{"path": "args.n", "op": "lt", "value": -9223372036854775807}"#;
    check(&[
        (gt, r#"{"amount": 250}"#, F, true),
        (gt, r#"{"amount": 100}"#, H, false),
        (gt, r#"{"amount": 100.0}"#, H, false),
        (gt, r#"{"amount": 100.5}"#, F, true),
        (gt, r#"{"amount": -250}"#, H, false),
        (gt, r#"{}"#, H, false),
        (gt, r#"{}"#, F, false),
        (gt, r#"{"amount": "250"}"#, H, true),
        (gt, r#"{"amount": "250"}"#, F, false),
        (gt, r#"{"amount": null}"#, H, true),
        (gt, r#"{"amount": null}"#, F, false),
        (gte, r#"{"amount": 100}"#, F, true),
        (gte, r#"{"amount": 99.999}"#, H, false),
        (lt, r#"{"amount": 9}"#, F, true),
        (lt, r#"{"amount": 10}"#, H, false),
        (lt, r#"{"amount": -1}"#, F, true),
        (lt, r#"{"amount": [1]}"#, H, true),
        (lte, r#"{"amount": 10}"#, F, true),
        (lte, r#"{"amount": 10.0}"#, F, true),
        (lte, r#"{"amount": 10.000001}"#, H, false),
        (lt_half, r#"{"amount": 0}"#, F, true),
        (lt_half, r#"{"amount": 1}"#, H, false),
        (gt_big, r#"{"n": 18446744073709551615}"#, F, true),
        (gt_big, r#"{"n": 18446744073709551614}"#, H, false),
        (gt_big, r#"{"n": -9223372036854775808}"#, H, false),
        (lt_min, r#"{"n": -9223372036854775808}"#, F, true),
        (lt_min, r#"{"n": 18446744073709551615}"#, H, false),
    ]);
}

#[test]
fn regex() {
    let start = r#"{"path": "args.s", "op": "regex", "value": "^x"}"#;
    let anywhere = r#"{"path": "args.s", "op": "regex", "value": "b"}"#;
    let whole = r#"{"path": "args.s", "op": "regex", "value": "^b$"}"#;
    let nocase = r#"{"path": "args.s", "op": "regex", "value": "(?i)^drop\\s+table"}"#;
    let unicode = r#"{"path": "args.s", "op": "regex", "value": "^\\w+$"}"#;
    check(&[
        (start, r#"{"s": "xy"}"#, F, true),
        (start, r#"{"s": "yx"}"#, H, false),
        (start, r#"{}"#, H, false),
        (start, r#"{}"#, F, false),
        (start, r#"{"s": 5}"#, H, true),
        (start, r#"{"s": 5}"#, F, false),
        (start, r#"{"s": null}"#, H, true),
        (start, r#"{"s": ["xy"]}"#, F, false),
        (anywhere, r#"{"s": "abc"}"#, F, true),
        (whole, r#"{"s": "abc"}"#, H, false),
        (whole, r#"{"s": "b"}"#, F, true),
        (nocase, r#"{"s": "DROP  Table users"}"#, F, true),
        (nocase, r#"{"s": "select"}"#, H, false),
        (unicode, r#"{"s": "héllo"}"#, F, true),
    ]);
}

#[test]
fn contains() {
    let word = r#"{"path": "args.s", "op": "contains", "value": "world"}"#;
    let empty = r#"{"path": "args.s", "op": "contains", "value": ""}"#;
    let two = r#"{"path": "args.s", "op": "contains", "value": 2}"#;
    let obj = r#"{"path": "args.s", "op": "contains", "value": {"id": 1}}"#;
    check(&[
        (word, r#"{"s": "hello world"}"#, F, true),
        (word, r#"{"s": "hello"}"#, H, false),
        (word, r#"{"s": "World"}"#, H, false),
        (word, r#"{}"#, H, false),
        (word, r#"{}"#, F, false),
        (word, r#"{"s": ["world"]}"#, F, true),
        (word, r#"{"s": ["hello world"]}"#, H, false),
        (word, r#"{"s": [1, null, "world"]}"#, F, true),
        (word, r#"{"s": []}"#, H, false),
        (word, r#"{"s": 5}"#, H, true),
        (word, r#"{"s": 5}"#, F, false),
        (word, r#"{"s": {"world": 1}}"#, H, true),
        (word, r#"{"s": {"world": 1}}"#, F, false),
        (word, r#"{"s": null}"#, H, true),
        (empty, r#"{"s": ""}"#, F, true),
        (two, r#"{"s": [1, 2.0, 3]}"#, F, true),
        (two, r#"{"s": [1, "2", 3]}"#, H, false),
        (two, r#"{"s": "123"}"#, H, true),
        (two, r#"{"s": "123"}"#, F, false),
        (obj, r#"{"s": [{"id": 2}, {"id": 1.0}]}"#, F, true),
        (obj, r#"{"s": [{"id": 1, "x": 0}]}"#, H, false),
    ]);
}

#[test]
fn exists() {
    let present = r#"{"path": "args.a.b", "op": "exists"}"#;
    let explicit = r#"{"path": "args.a.b", "op": "exists", "value": true}"#;
    let absent = r#"{"path": "args.a.b", "op": "exists", "value": false}"#;
    check(&[
        (present, r#"{"a": {"b": 1}}"#, F, true),
        (present, r#"{"a": {"b": null}}"#, F, true),
        (present, r#"{"a": {}}"#, H, false),
        (present, r#"{"a": 5}"#, H, false),
        (present, r#"{}"#, H, false),
        (explicit, r#"{"a": {"b": "x"}}"#, F, true),
        (explicit, r#"{}"#, H, false),
        (absent, r#"{}"#, F, true),
        (absent, r#"{"a": null}"#, F, true),
        (absent, r#"{"a": {"b": null}}"#, H, false),
        (absent, r#"{"a": {"b": false}}"#, H, false),
    ]);
}

#[test]
fn paths_and_array_indexing() {
    let id = r#"{"path": "args.items.0.id", "op": "eq", "value": "a"}"#;
    let second = r#"{"path": "args.items.1", "op": "exists"}"#;
    let leading_zero = r#"{"path": "args.items.01", "op": "eq", "value": 2}"#;
    let huge = r#"{"path": "args.m.99999999999999999999999", "op": "exists"}"#;
    let minus = r#"{"path": "args.m.-1", "op": "exists"}"#;
    let plus = r#"{"path": "args.m.+1", "op": "exists"}"#;
    let into_string = r#"{"path": "args.s.0", "op": "exists"}"#;
    let key = r#"{"path": "args.items.x", "op": "exists"}"#;
    check(&[
        (id, r#"{"items": [{"id": "a"}]}"#, F, true),
        (id, r#"{"items": [{"id": "b"}, {"id": "a"}]}"#, H, false),
        (id, r#"{"items": []}"#, H, false),
        (id, r#"{"items": {"0": {"id": "a"}}}"#, F, true),
        (id, r#"{"items": "a"}"#, H, false),
        (id, r#"{"items": [[{"id": "a"}]]}"#, H, false),
        (second, r#"{"items": [1, 2]}"#, F, true),
        (second, r#"{"items": [1]}"#, H, false),
        (leading_zero, r#"{"items": [1, 2]}"#, F, true),
        (leading_zero, r#"{"items": {"01": 2}}"#, F, true),
        (leading_zero, r#"{"items": {"1": 2}}"#, H, false),
        (huge, r#"{"m": [1]}"#, H, false),
        (huge, r#"{"m": {"99999999999999999999999": 1}}"#, F, true),
        (minus, r#"{"m": [1]}"#, H, false),
        (minus, r#"{"m": {"-1": 1}}"#, F, true),
        (plus, r#"{"m": [1, 2]}"#, H, false),
        (plus, r#"{"m": {"+1": 1}}"#, F, true),
        (into_string, r#"{"s": "abc"}"#, H, false),
        (into_string, r#"{"s": null}"#, H, false),
        (key, r#"{"items": [1]}"#, H, false),
        (key, r#"{"items": {"x": 1}}"#, F, true),
        // A top-level non-object never has the key.
        (key, r#"null"#, H, false),
    ]);
}

#[test]
fn all_and_any() {
    let both = r#"{"all": [
            {"path": "args.a", "op": "exists"},
            {"path": "args.b", "op": "eq", "value": 1}]}"#;
    let either = r#"{"any": [
            {"path": "args.a", "op": "exists"},
            {"path": "args.b", "op": "eq", "value": 1}]}"#;
    let nested = r#"{"all": [
            {"path": "args.a", "op": "exists"},
            {"any": [
                {"path": "args.b", "op": "eq", "value": 1},
                {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#;
    let absent_or_small = r#"{"any": [
            {"path": "args.n", "op": "exists", "value": false},
            {"path": "args.n", "op": "lte", "value": 10}]}"#;
    check(&[
        (both, r#"{"a": 0, "b": 1}"#, F, true),
        (both, r#"{"a": 0, "b": 2}"#, H, false),
        (both, r#"{"b": 1}"#, H, false),
        (both, r#"{"a": 0, "b": "1"}"#, H, true),
        (both, r#"{"a": 0, "b": "1"}"#, F, false),
        (either, r#"{"a": 0}"#, F, true),
        (either, r#"{"b": 1}"#, F, true),
        (either, r#"{"b": 2}"#, H, false),
        (either, r#"{}"#, H, false),
        (either, r#"{"b": "1"}"#, H, true),
        (either, r#"{"b": "1"}"#, F, false),
        (nested, r#"{"a": 0, "c": "xyz"}"#, F, true),
        (nested, r#"{"a": 0, "b": 1}"#, F, true),
        (nested, r#"{"a": 0, "b": 2, "c": "y"}"#, H, false),
        (nested, r#"{"b": 1, "c": "x"}"#, H, false),
        (nested, r#"{"a": 0, "c": 7}"#, H, true),
        (nested, r#"{"a": 0, "c": 7}"#, F, false),
        (absent_or_small, r#"{}"#, F, true),
        (absent_or_small, r#"{"n": 3}"#, F, true),
        (absent_or_small, r#"{"n": 30}"#, H, false),
        (absent_or_small, r#"{"n": "3"}"#, F, false),
    ]);
}

#[test]
fn depth_limit() {
    let leaf = r#"{"path": "args.a", "op": "exists"}"#;
    let deepest = cond(&nested(MAX_DEPTH - 1, leaf));
    assert!(deepest.holds(&json!({"a": 1}), F));
    let text = nested(MAX_DEPTH, leaf);
    assert_json_error(&text, "{", MAX_DEPTH, "conditions nest more than 32 deep");

    let mut value = String::from("1");
    for _ in 0..MAX_VALUE_DEPTH {
        value = format!("[{value}]");
    }
    let ok = format!(r#"{{"path": "args.a", "op": "eq", "value": {value}}}"#);
    assert_eq!(cond(&ok).to_string().matches('[').count(), MAX_VALUE_DEPTH);
    let deep = format!(r#"{{"path": "args.a", "op": "eq", "value": [{value}]}}"#);
    assert_json_error(&deep, "[", MAX_VALUE_DEPTH, "more than 64 deep");
}

#[test]
fn json_load_errors() {
    let rows: &[(&str, &str, usize, &str)] = &[
            (
                r#"{"path": "args.a", "op": "foo", "value": 1}"#,
                "\"foo\"",
                0,
                "unknown op \"foo\"; the ops are eq, neq, in, not_in, lt, lte, gt, gte, regex, contains, exists",
            ),
            (
                "{\n  \"path\": \"args.a\",\n  \"op\": \"lt\",\n  \"value\": \"x\"\n}",
                "}",
                0,
                "op lt compares numbers: its value must be a number, not a string",
            ),
            (
                r#"{"path": "args", "op": "exists"}"#,
                "\"args\"",
                0,
                "path \"args\" must be \"args.\" and an argument name",
            ),
            (r#"{"path": "arg.x", "op": "exists"}"#, "\"arg.x\"", 0, "must be \"args.\""),
            (r#"{"path": "argsx", "op": "exists"}"#, "\"argsx\"", 0, "must be \"args.\""),
            (r#"{"path": "x.args.a", "op": "exists"}"#, "\"x.args.a\"", 0, "must be"),
            (r#"{"path": "", "op": "exists"}"#, "\"\"", 0, "must be \"args.\""),
            (
                r#"{"path": "args..x", "op": "exists"}"#,
                "\"args..x\"",
                0,
                "path \"args..x\" has an empty segment",
            ),
            (r#"{"path": "args.x.", "op": "exists"}"#, "\"args.x.\"", 0, "empty segment"),
            (r#"{"path": "args.", "op": "exists"}"#, "\"args.\"", 0, "empty segment"),
            (
                r#"{"path": "args.a\nb", "op": "exists"}"#,
                "\"args.a\\nb\"",
                0,
                "path \"args.a\\nb\" contains a control character",
            ),
            (r#"{"path": 5, "op": "exists"}"#, "5", 0, "invalid type: integer `5`"),
            (r#"{"path": "args.a", "op": ["eq"]}"#, "\"op\": ", 0, "invalid type: sequence"),
            (
                r#"{"path": "args.a", "op": "eq", "vlue": 1}"#,
                "\"vlue\"",
                0,
                "unknown field `vlue`, expected one of `path`, `op`, `value`, `all`, `any`",
            ),
            (
                r#"{"path": "args.a", "path": "args.b", "op": "exists"}"#,
                "\"path\"",
                1,
                "duplicate field `path`",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}], "all": []}"#,
                "\"all\"",
                1,
                "duplicate field `all`",
            ),
            (
                r#"{"path": "args.a", "op": "eq", "value": 1, "value": 2}"#,
                "\"value\"",
                1,
                "duplicate field `value`",
            ),
            (
                r#"{"path": "args.a", "all": [{"path": "args.a", "op": "exists"}]}"#,
                "\"all\"",
                0,
                "a condition has either `all` or path/op/value, not both",
            ),
            (
                r#"{"any": [{"path": "args.a", "op": "exists"}], "op": "eq"}"#,
                "\"op\"",
                1,
                "a condition has either `any` or path/op/value, not both",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}], "any": []}"#,
                "\"any\"",
                0,
                "a condition has `all` or `any`, not both",
            ),
            (r#"{"all": []}"#, "]", 0, "`all` needs at least one condition"),
            (r#"{"any": {}}"#, "\"any\": ", 0, "a non-empty array of conditions for `any`"),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": []}]}"#,
                "]",
                0,
                "`any` needs at least one condition",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}, {"path": "args.b"}]}"#,
                "}",
                1,
                "missing field `op` for path \"args.b\"",
            ),
            (r#"{"op": "eq", "value": 1}"#, "}", 0, "missing field `path`"),
            (r#"{}"#, "}", 0, "missing field `path`"),
            (r#"{"all": [[1]]}"#, "\"all\": [", 0, "invalid type: sequence, expected a condition"),
            (r#"{"any": ["args.a"]}"#, "\"args.a\"", 0, "invalid type: string"),
            (r#"{"path": "args.a", "op": "eq"}"#, "}", 0, "op eq needs a value"),
            (r#"{"path": "args.a", "op": "contains"}"#, "}", 0, "op contains needs a value"),
            (r#"{"path": "args.a", "op": "in", "value": []}"#, "}", 0, "op in needs a non-empty array"),
            (
                r#"{"path": "args.a", "op": "not_in", "value": "prod"}"#,
                "}",
                0,
                "op not_in needs a non-empty array of values, not a string",
            ),
            (r#"{"path": "args.a", "op": "gte", "value": null}"#, "}", 0, "op gte compares numbers"),
            (r#"{"path": "args.a", "op": "gt", "value": "100"}"#, "}", 0, "op gt compares numbers"),
            (
                r#"{"path": "args.a", "op": "regex", "value": 5}"#,
                "}",
                0,
                "op regex needs a string (a regular expression) as its value, not a number",
            ),
            (
                r#"{"path": "args.a", "op": "regex", "value": "a("}"#,
                "}",
                0,
                "op regex: invalid regex \"a(\": regex parse error",
            ),
            (
                r#"{"path": "args.a", "op": "regex", "value": "(?:a{1000}){1000}"}"#,
                "\"}",
                0,
                "exceeds size limit",
            ),
            (
                r#"{"path": "args.a", "op": "exists", "value": "yes"}"#,
                "}",
                0,
                "op exists takes value true or false (or no value), not a string",
            ),
            (r#"{"path": "args.a", "op": "exists", "value": null}"#, "}", 0, "not null"),
            (
                r#"{"path": "args.a", "op": "eq", "value": {"k": 1, "k": 2}}"#,
                "\"k\"",
                1,
                "duplicate key \"k\" in value",
            ),
        ];
    for (text, at, nth, words) in rows {
        assert_json_error(text, at, *nth, words);
    }
}

#[test]
fn yaml_load_errors() {
    let rows: &[(&str, (usize, usize), &str)] = &[
        (
            "path: args.a\nop: foo\nvalue: 1\n",
            (2, 5),
            "unknown op \"foo\"; the ops are eq, neq",
        ),
        (
            "all:\n  - path: args.a\n    op: eq\n    vlue: 1\n",
            (4, 5),
            "unknown field `vlue`, expected one of `path`, `op`, `value`, `all`, `any`",
        ),
        (
            "any:\n  - path: args..a\n    op: exists\n",
            (2, 11),
            "path \"args..a\" has an empty segment",
        ),
        (
            "path: args.a\nop: eq\nvalue: .nan\n",
            (3, 8),
            "NaN is not a JSON number: numbers must be finite",
        ),
        (
            "path: args.a\nop: lt\nvalue: -.inf\n",
            (3, 8),
            "-inf is not a JSON number",
        ),
        ("all: []\n", (1, 6), "`all` needs at least one condition"),
    ];
    for (text, at, words) in rows {
        let (message, line, column) = yaml_error(text);
        assert!(message.contains(words), "{text}: {message}");
        assert_eq!((line, column), *at, "{text}: {message}");
    }
    // Checks made when the object ends point at the object.
    let (message, line, column) = yaml_error("path: args.a\nop: gt\nvalue: x\n");
    assert!(message.contains("op gt compares numbers"), "{message}");
    assert_eq!((line, column), (1, 1), "{message}");
}

#[test]
fn yaml_loads() {
    let text = "any:\n  - path: args.env\n    op: in\n    value: [prod, staging]\n  - all:\n      - path: args.amount\n        op: gte\n        value: 1.5e3\n      - path: args.note\n        op: exists\n        value: false\n";
    let condition: Condition = serde_yaml_ng::from_str(text).unwrap();
    assert_eq!(
        condition.to_string(),
        r#"any(args.env in ["prod","staging"], all(args.amount gte 1500.0, args.note exists false))"#
    );
    assert!(condition.holds(&json!({"env": "prod"}), F));
    assert!(condition.holds(&json!({"amount": 1500}), F));
    assert!(!condition.holds(&json!({"amount": 1500, "note": "x"}), F));
    assert!(!condition.holds(&json!({"amount": 1499}), F));
}

#[test]
fn display() {
    let rows = [
        (
            r#"{"path": "args.amount", "op": "gt", "value": 100}"#,
            "args.amount gt 100",
        ),
        (
            r#"{"path": "args.env", "op": "in", "value": ["prod", "staging"]}"#,
            r#"args.env in ["prod","staging"]"#,
        ),
        (
            r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": [{"path": "args.b", "op": "eq", "value": 1}, {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#,
            r#"all(args.a exists, any(args.b eq 1, args.c regex "^x"))"#,
        ),
        (
            r#"{"path": "args.a", "op": "exists", "value": false}"#,
            "args.a exists false",
        ),
        (
            r#"{"path": "args.a", "op": "exists", "value": true}"#,
            "args.a exists",
        ),
        (
            r#"{"path": "args.n", "op": "neq", "value": 1.0}"#,
            "args.n neq 1.0",
        ),
        (
            r#"{"path": "args.n", "op": "lte", "value": -3}"#,
            "args.n lte -3",
        ),
        (
            r#"{"path": "args.s", "op": "regex", "value": "\\d+\"$"}"#,
            r#"args.s regex "\\d+\"$""#,
        ),
        (
            r#"{"path": "args.s", "op": "contains", "value": {"id": [1, null]}}"#,
            r#"args.s contains {"id":[1,null]}"#,
        ),
        (
            r#"{"path": "args.s", "op": "not_in", "value": [1]}"#,
            "args.s not_in [1]",
        ),
    ];
    for (text, shown) in rows {
        assert_eq!(cond(text).to_string(), shown);
    }
}

#[test]
fn explain() {
    let gt = cond(r#"{"path": "args.amount", "op": "gt", "value": 100}"#);
    let currency = cond(r#"{"path": "args.currency", "op": "in", "value": ["usd", "eur"]}"#);
    let lt = cond(r#"{"path": "args.amount", "op": "lt", "value": 10}"#);
    let env = cond(r#"{"path": "args.env", "op": "neq", "value": "prod"}"#);
    let note = cond(r#"{"path": "args.note", "op": "exists", "value": false}"#);
    let rows = [
        (
            &gt,
            json!({"amount": 250}),
            H,
            true,
            "args.amount gt 100: 250 > 100, holds",
        ),
        (
            &gt,
            json!({"amount": 50}),
            H,
            false,
            "args.amount gt 100: 50 is not > 100, does not hold",
        ),
        (
            &currency,
            json!({}),
            F,
            false,
            r#"args.currency in ["usd","eur"]: path missing, does not hold"#,
        ),
        (
            &currency,
            json!({"currency": "gbp"}),
            F,
            false,
            r#"args.currency in ["usd","eur"]: "gbp" is not in the list, does not hold"#,
        ),
        (
            &currency,
            json!({"currency": 1}),
            F,
            false,
            r#"args.currency in ["usd","eur"]: value is a number, and the list has no number: wrong type, counts as not holding"#,
        ),
        (
            &lt,
            json!({"amount": "5"}),
            H,
            true,
            "args.amount lt 10: value is a string, not a number: wrong type, counts as holding",
        ),
        (
            &env,
            json!({"env": "prod"}),
            H,
            false,
            r#"args.env neq "prod": "prod" == "prod", does not hold"#,
        ),
        (
            &note,
            json!({}),
            F,
            true,
            "args.note exists false: path missing, holds",
        ),
        (
            &note,
            json!({"note": null}),
            F,
            false,
            "args.note exists false: present, does not hold",
        ),
    ];
    for (condition, args, wrong, holds, why) in rows {
        assert_eq!(condition.explain(&args, wrong), (holds, why.to_owned()));
    }

    let nested = cond(
        r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": [{"path": "args.b", "op": "eq", "value": 1}, {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#,
    );
    assert_eq!(
            nested.explain(&json!({"a": 0, "b": 2, "c": "xy"}), F),
            (
                true,
                r#"all(args.a exists: present, holds; any(args.b eq 1: 2 != 1, does not hold; args.c regex "^x": "xy" matches, holds): holds): holds"#
                    .to_owned()
            )
        );

    let long = "é".repeat(200);
    let (holds, why) = cond(r#"{"path": "args.s", "op": "contains", "value": "x"}"#)
        .explain(&json!({ "s": long }), H);
    assert!(!holds);
    let shown = format!("\"{}...", "é".repeat(EXPLAIN_VALUE_CHARS - 1));
    assert_eq!(
        why,
        format!(r#"args.s contains "x": {shown} does not contain "x", does not hold"#)
    );
}

#[test]
fn keys_may_come_in_any_order() {
    let condition = cond(r#"{"value": [1, 2], "op": "in", "path": "args.n"}"#);
    assert_eq!(condition.to_string(), "args.n in [1,2]");
    assert!(condition.holds(&json!({"n": 2}), F));
}
