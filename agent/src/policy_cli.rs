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

/// The call `policy explain` asks about, and the caller's limit scope keys.
#[derive(Debug, Clone)]
pub struct Question {
    pub tool: String,
    pub arguments: Option<Value>,
    pub grant: String,
    pub process: String,
    pub session: String,
    pub namespace: String,
    pub service_account: String,
}

impl Question {
    /// From the command line: `--args` (a JSON object) and `--caller key=value`s.
    pub fn parse(tool: &str, args: Option<&str>, caller: &[String]) -> Result<Question> {
        let arguments: Option<Value> = match args {
            Some(text) => Some(serde_json::from_str(text).context("--args is not JSON")?),
            None => None,
        };
        let mut q = Question::new(tool, arguments)?;
        for kv in caller {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--caller {kv:?}: expected key=value");
            };
            let slot = match k {
                "grant" => &mut q.grant,
                "process" => &mut q.process,
                "session" => &mut q.session,
                "namespace" => &mut q.namespace,
                "service_account" => &mut q.service_account,
                _ => bail!(
                    "--caller {k:?}: the keys are grant, process, session, namespace and \
                     service_account (the limit scopes); \
                     bindings are chosen by the agent's config, not by one policy file"
                ),
            };
            *slot = v.to_owned();
        }
        Ok(q)
    }

    /// `tool` with `arguments` (a JSON object, if any), every scope key `explain`.
    pub fn new(tool: &str, arguments: Option<Value>) -> Result<Question> {
        if arguments.as_ref().is_some_and(|v| !v.is_object()) {
            bail!("--args must be a JSON object (the call's arguments)");
        }
        Ok(Question {
            tool: tool.to_owned(),
            arguments,
            grant: "explain".to_owned(),
            process: "explain".to_owned(),
            session: "explain".to_owned(),
            namespace: "explain".to_owned(),
            service_account: "explain".to_owned(),
        })
    }

    /// What `engine` decides, and why, as [`explanation_json`] writes it. Limits are checked
    /// against the engine's counters as they are, and nothing is counted: a live engine's
    /// quotas are untouched.
    pub fn answer(&self, engine: &Engine) -> Value {
        let explained = engine.explain_dry(
            &Call {
                tool: &self.tool,
                arguments: self.arguments.as_ref(),
            },
            &CallerScope {
                grant: &self.grant,
                process: &self.process,
                session: &self.session,
                namespace: &self.namespace,
                service_account: &self.service_account,
            },
            Instant::now(),
        );
        explanation_json(
            &self.tool,
            &explained.decision,
            engine.policy().source(),
            &explained.steps,
        )
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
    let question = Question::parse(tool, args, caller)?;
    print_explanation(&question.answer(&Engine::new(policy)), format);
    Ok(())
}

/// An explanation as `policy explain --format json` prints it (and the admin API answers).
pub fn explanation_json(
    tool: &str,
    d: &crate::policy::Decision,
    source: &crate::policy::PolicySource,
    steps: &[String],
) -> Value {
    json!({
        "tool": tool,
        "decision": outcome_name(d.outcome),
        "would": d.would.map(outcome_name),
        "rule": d.rule,
        "reason": d.reason,
        "policy": { "file": source.file, "sha256": source.sha256 },
        "steps": steps,
    })
}

/// Print an explanation (as [`explanation_json`] built it) in `format`.
pub fn print_explanation(v: &Value, format: Format) {
    match format {
        Format::Json => println!("{v}"),
        Format::Text => {
            let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            println!("decision: {}", text("decision"));
            if let Some(would) = v["would"].as_str() {
                println!("would:    {would} (mode dry_run)");
            }
            println!("rule:     {}", text("rule"));
            if let Some(reason) = v["reason"].as_str() {
                println!("reason:   {reason}");
            }
            println!(
                "policy:   {} (sha256 {})",
                v["policy"]["file"].as_str().unwrap_or(""),
                v["policy"]["sha256"].as_str().unwrap_or("")
            );
            println!("why:");
            for step in v["steps"].as_array().into_iter().flatten() {
                println!("  - {}", step.as_str().unwrap_or(""));
            }
        }
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::UnknownTool => "unknown_tool",
        Outcome::ApprovalRequired => "require_approval",
    }
}
