//! `docs/audit.schema.json`, the JSON Schema of one audit line, checked against every line the
//! agents of the integration tests write (see `impl Drop for Agent`) and against the demo's.

use std::path::Path;
use std::sync::LazyLock;

/// The schema's text, as the tests were built with it.
pub const AUDIT_SCHEMA: &str = include_str!("../../docs/audit.schema.json");

/// Compiled once per test process.
static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let schema: serde_json::Value =
        serde_json::from_str(AUDIT_SCHEMA).expect("docs/audit.schema.json is not JSON");
    jsonschema::draft202012::options()
        .should_validate_formats(false)
        .build(&schema)
        .unwrap_or_else(|e| panic!("docs/audit.schema.json is not a valid JSON Schema: {e}"))
});

/// Why `line` is not a valid audit record (every violation, one per line), or `Ok`.
pub fn check_audit_line(line: &str) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let errors: Vec<String> = VALIDATOR
        .iter_errors(&value)
        .map(|e| {
            let at = e.instance_path().as_str();
            format!(
                "{} (at {}, schema {})",
                e,
                if at.is_empty() { "/" } else { at },
                e.schema_path().as_str()
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Every line of the audit file at `path` that does not match the schema, as
/// `FILE:LINE: message\n  the line`. A missing file has none (the agent wrote elsewhere, or
/// never started). Only complete lines are read: an agent sharing the file (a hand-over's other
/// agent) may be in the middle of writing the last one.
pub fn audit_file_problems(path: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &[][..],
    };
    let text = String::from_utf8_lossy(complete);
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .filter_map(|(i, line)| {
            check_audit_line(line).err().map(|e| {
                format!(
                    "{}:{}: audit line does not match docs/audit.schema.json: {e}\n  {line}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Panics, naming every line that does not match the schema, unless the thread is already
/// panicking (a panic in a panicking `Drop` aborts the test process): then it prints them.
pub fn assert_audit_file_matches_schema(path: &Path) {
    let problems = audit_file_problems(path);
    if problems.is_empty() {
        return;
    }
    let message = format!(
        "{} audit line(s) of {} do not match docs/audit.schema.json:\n{}",
        problems.len(),
        path.display(),
        problems.join("\n")
    );
    if std::thread::panicking() {
        eprintln!("{message}");
    } else {
        panic!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"v":1,"ts":"2026-05-14T09:21:07.412Z","event":"request","dst":"10.0.0.5:8080","pid":48213,"comm":"python3","uid":1000,"cgroup":"/system.slice/agent.service","cgroup_id":7342,"server":"tools","http_version":"HTTP/1.1","http_method":"POST","path":"/mcp","transport":"streamable_http","revision":"2025-06-18","method":"tools/call","id":7,"tool":"start_security_scan","arg_keys":["target"],"args_sha256":"ca4d49ee6ed48d1008a9f82bb7470ebeeff95f1a33853fedfa573191eaac49d4","decision":"allow","rule":"/tools/start_security_scan","policy":{"file":"/etc/mcpwarden/policy.json","sha256":"72993b6cb83904d39a8c73bd0651aa6251288ede5dbc2c7bcbdc54cc5bbf5d77"}}"#;

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v[field] = value;
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn the_documented_example_matches() {
        check_audit_line(GOOD).unwrap();
    }

    #[test]
    fn every_example_line_of_docs_audit_md_matches() {
        let doc = include_str!("../../docs/audit.md");
        let examples: Vec<&str> = doc.lines().filter(|l| l.starts_with("{\"v\":1,")).collect();
        assert!(
            examples.len() >= 20,
            "found only {} examples",
            examples.len()
        );
        for line in examples {
            if let Err(e) = check_audit_line(line) {
                panic!("docs/audit.md example does not match: {e}\n{line}");
            }
        }
    }

    #[test]
    fn an_unknown_field_is_rejected() {
        let err =
            check_audit_line(&with("argument_values", serde_json::json!({"a": 1}))).unwrap_err();
        assert!(err.contains("argument_values"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_rejected() {
        let err = check_audit_line(&with("pid", serde_json::json!("48213"))).unwrap_err();
        assert!(err.contains("/pid"), "{err}");
        check_audit_line(&with("latency_ms", serde_json::json!(null))).unwrap_err();
        check_audit_line(&with("decision", serde_json::json!("maybe"))).unwrap_err();
        check_audit_line(&with("v", serde_json::json!(2))).unwrap_err();
        check_audit_line(&with("ts", serde_json::json!("2026-05-14 09:21:07"))).unwrap_err();
        check_audit_line(&with("event", serde_json::json!("requested"))).unwrap_err();
    }

    #[test]
    fn a_file_with_a_bad_line_panics_naming_file_and_line() {
        let dir = crate::TempDir::new("schema-file");
        let path = dir.path().join("audit.jsonl");
        let bad = with("undocumented", serde_json::json!(1));
        // The last line, without its newline, is not read (it may be being written).
        std::fs::write(&path, format!("{GOOD}\n\n{bad}\n{{\"v\":")).unwrap();
        let problems = audit_file_problems(&path);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let want = format!("{}:3: ", path.display());
        assert!(problems[0].starts_with(&want), "{}", problems[0]);
        assert!(problems[0].contains("undocumented"), "{}", problems[0]);
        let panic = std::panic::catch_unwind(|| assert_audit_file_matches_schema(&path))
            .expect_err("a bad line panics");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains(&want), "{message}");
        std::fs::write(&path, format!("{GOOD}\n")).unwrap();
        assert_audit_file_matches_schema(&path);
        assert!(audit_file_problems(&dir.path().join("none.jsonl")).is_empty());
    }

    #[test]
    fn what_an_event_always_carries_is_required() {
        // A request always has its decision, and it is allow.
        check_audit_line(&without("decision")).unwrap_err();
        check_audit_line(&with("decision", serde_json::json!("deny"))).unwrap_err();
        // A tools/call request names its rule.
        check_audit_line(&without("rule")).unwrap_err();
        // A refusal says why.
        let refused =
            r#"{"v":1,"ts":"2026-05-14T09:20:55.310Z","event":"refused","decision":"deny"}"#;
        let err = check_audit_line(refused).unwrap_err();
        assert!(err.contains("reason"), "{err}");
        check_audit_line(&without("v")).unwrap_err();
        check_audit_line("[1]").unwrap_err();
        check_audit_line("{\"v\":1,").unwrap_err();
    }
}
