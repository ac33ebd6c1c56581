//! Scenario 5b: the policy decision with a 1,000-rule policy of exact names, patterns, JSON
//! Schemas, conditions and limits (`crate::policygen`), in process.
//!
//! Each repeat starts `mcpwarden-bench-policy` (next to this binary), which loads the policy in
//! a fresh process (load time, RSS growth), checks that every call of the mix takes the path
//! its kind is named after, then makes the warm-up decisions and times the others one by one
//! with `Instant::now()` around `Engine::decide_call`. It runs before anything else of the
//! bench starts, so nothing competes for the cores.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::policyresult::PolicyResult;

/// Goal: the median decision takes at most this (µs).
pub const DECISION_GOAL_US: f64 = 2.0;

/// The measuring binary, built with this one (same package).
const BIN: &str = "mcpwarden-bench-policy";

#[derive(Debug, Clone, Default)]
pub struct PolicyFigures {
    /// One per repeat, each from a fresh process.
    pub runs: Vec<PolicyResult>,
}

pub fn run(repeats: usize, quick: bool) -> Result<PolicyFigures> {
    let exe = std::env::current_exe()?.with_file_name(BIN);
    if !exe.exists() {
        bail!(
            "{} is missing: build the bench package (cargo build --release -p mcpwarden-bench)",
            exe.display()
        );
    }
    let (warmup, decisions) = if quick {
        (1_000, 20_000)
    } else {
        (10_000, 200_000)
    };
    let mut runs = Vec::with_capacity(repeats);
    for r in 0..repeats {
        let mut cmd = Command::new(&exe);
        cmd.args(["--warmup", &warmup.to_string()])
            .args(["--decisions", &decisions.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("{cmd:?} failed ({}): {stdout}", out.status);
        }
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("{cmd:?} printed nothing"))?;
        let result: PolicyResult =
            serde_json::from_str(line).with_context(|| format!("{BIN} printed {line}"))?;
        eprintln!(
            "mcpwarden-bench: 5b policy decision, repeat {}: p50 {:.3} µs, p99 {:.3} µs, load {:.1} ms",
            r + 1,
            result.decisions.p50_us,
            result.decisions.p99_us,
            result.first_load_ms
        );
        runs.push(result);
    }
    Ok(PolicyFigures { runs })
}
