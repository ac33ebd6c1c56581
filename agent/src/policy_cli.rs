//! `mcpwarden policy check` and `mcpwarden policy explain`: the policy engine, offline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::policy::{Call, CallerScope, Engine, Outcome, Policy, PolicyError};

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Validates each file; prints errors as `file:line:col: message` with a hint, and warnings.
/// Returns whether every file loaded.
pub fn check(files: &[PathBuf], format: Format) -> bool {
    let mut ok = true;
    let mut reports = Vec::new();
    for file in files {
        match Policy::load(file) {
            Ok(policy) => {
                if format == Format::Text {
                    for w in policy.warnings() {
                        println!("{}: warning: {}: {}", file.display(), w.pointer, w.message);
                    }
                    println!(
                        "{}: ok ({} warning{})",
                        file.display(),
                        policy.warnings().len(),
                        if policy.warnings().len() == 1 {
                            ""
                        } else {
                            "s"
                        }
                    );
                }
                reports.push(json!({
                    "file": file.display().to_string(),
                    "ok": true,
                    "sha256": policy.source().sha256,
                    "errors": [],
                    "warnings": policy.warnings().iter().map(|w| json!({
                        "pointer": w.pointer, "message": w.message,
                    })).collect::<Vec<_>>(),
                }));
            }
            Err(e) => {
                ok = false;
                if format == Format::Text {
                    println!("{e}");
                    println!("  hint: {}", hint(&e));
                }
                reports.push(json!({
                    "file": e.file,
                    "ok": false,
                    "errors": [{
                        "line": e.line, "column": e.column, "message": e.message, "hint": hint(&e),
                    }],
                    "warnings": [],
                }));
            }
        }
    }
    if format == Format::Json {
        println!("{}", json!({ "ok": ok, "files": reports }));
    }
    ok
}

/// One line of advice for an error, by what it says.
fn hint(e: &PolicyError) -> &'static str {
    let m = e.message.as_str();
    if e.line == 0 {
        "check the path and that the agent can read it"
    } else if m.contains("unknown field") {
        "unknown keys are errors, so a typo never silently weakens a rule: check the spelling against the format in the README"
    } else if m.contains("duplicate") || m.contains("twice") {
        "each key may appear once: merge the two entries"
    } else if m.contains("tie") {
        "list that tool by its exact name, or make one pattern's literal prefix longer"
    } else if m.contains("JSON Schema") {
        "arguments must be a draft 2020-12 JSON Schema for the call's arguments object"
    } else if m.contains("path") {
        "condition and increment_from paths are dotted from args: \"args.amount\", \"args.items.0.id\""
    } else if m.contains("scope") {
        "scopes: grant (the workload), process, session, server (every caller on this node)"
    } else if m.contains("missing field") {
        "a policy needs \"version\": \"1\" and \"default\"; a limit needs counter, window, max and scope"
    } else if m.contains("EOF") || m.contains("expected") || m.contains("trailing") {
        "the file is not well-formed JSON (or YAML for .yaml/.yml): look just before this position"
    } else {
        "see the policy format in the README"
    }
}

/// Decides one call against a policy file and says why.
pub fn explain(
    file: &std::path::Path,
    tool: &str,
    args: Option<&str>,
    caller: &[String],
    format: Format,
) -> Result<()> {
    let policy = Policy::load(file)?;
    let arguments: Option<Value> = match args {
        Some(text) => {
            let v: Value = serde_json::from_str(text).context("--args is not JSON")?;
            if !v.is_object() {
                bail!("--args must be a JSON object (the call's arguments)");
            }
            Some(v)
        }
        None => None,
    };
    let (mut grant, mut process, mut session) = (
        "explain".to_owned(),
        "explain".to_owned(),
        "explain".to_owned(),
    );
    for kv in caller {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--caller {kv:?}: expected key=value");
        };
        match k {
            "grant" => grant = v.to_owned(),
            "process" => process = v.to_owned(),
            "session" => session = v.to_owned(),
            _ => bail!(
                "--caller {k:?}: the keys are grant, process and session (the limit scopes); \
                 bindings are chosen by the agent's config, not by one policy file"
            ),
        }
    }
    let engine = Engine::new(policy);
    let explained = engine.explain(
        &Call {
            tool,
            arguments: arguments.as_ref(),
        },
        &CallerScope {
            grant: &grant,
            process: &process,
            session: &session,
        },
        Instant::now(),
    );
    let d = &explained.decision;
    let source = engine.policy().source();
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "tool": tool,
                "decision": outcome_name(d.outcome),
                "would": d.would.map(outcome_name),
                "rule": d.rule,
                "reason": d.reason,
                "policy": { "file": source.file, "sha256": source.sha256 },
                "steps": explained.steps,
            })
        ),
        Format::Text => {
            println!("decision: {}", outcome_name(d.outcome));
            if let Some(would) = d.would {
                println!("would:    {} (mode dry_run)", outcome_name(would));
            }
            println!("rule:     {}", d.rule);
            if let Some(reason) = &d.reason {
                println!("reason:   {reason}");
            }
            println!("policy:   {} (sha256 {})", source.file, source.sha256);
            println!("why:");
            for step in &explained.steps {
                println!("  - {step}");
            }
        }
    }
    Ok(())
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::UnknownTool => "unknown_tool",
        Outcome::ApprovalRequired => "require_approval",
    }
}
