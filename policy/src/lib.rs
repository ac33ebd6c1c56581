//! Policy decisions for MCP tool calls.
//!
//! This crate reads PolicyLayer's `policy.json` format (JSON, or YAML with
//! the same structure) and decides, call by call, whether a workload may run a
//! tool. It does no I/O apart from reading the policy file in
//! [`Policy::load`]; callers pass the current time in, so decisions are
//! deterministic and testable. Which policy applies to which caller is
//! [`bindings`]; reloading files is the agent's `reload` module.
//!
//! The pieces:
//! - [`Policy`]: the parsed, validated, immutable policy. Loading is strict:
//!   any unknown field, bad value or duplicate key is an error that names the
//!   file, line and column, so a typo never silently weakens enforcement.
//! - [`Engine`]: a policy plus the rate-limit state shared by every
//!   connection that uses it. [`Engine::decide_call`] returns a [`Decision`].
//!
//! Every decision names the rule that made it as a JSON Pointer (RFC 6901)
//! into the policy file, for the audit log.

mod approval;
mod args;
pub mod bindings;
mod condition;
mod engine;
mod folded;
mod glob;
mod limits;
mod load;
mod schema;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod window_props;

pub use approval::{parse_duration, Approval, ApprovalMode};
pub use engine::{Call, Engine, Explanation, Usage};
pub use limits::{Journal, Reservation, Restored};
pub use load::{Policy, PolicySource, Warning};

/// SHA-256 of `bytes` as lowercase hex: how the audit log names a file's version.
pub use mcpwarden_json::sha256_hex;

/// A policy file that could not be read or is not valid.
///
/// `line` and `column` are 1-based and point at (or just after) the offending
/// key or value. When the file could not be read at all, both are 0 and the
/// message says why.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    /// The file name as given to [`Policy::load`] or [`Policy::parse`].
    pub file: String,
    /// 1-based line, or 0 when the file could not be read.
    pub line: usize,
    /// 1-based column, or 0 when the file could not be read.
    pub column: usize,
    /// What is wrong, without the position.
    pub message: String,
}

/// Who is making a call, as far as limit scopes are concerned.
///
/// Each field is the key of one scope: calls with the same key share a
/// counter's log, calls with different keys do not. The `server` scope has
/// one key for every caller.
#[derive(Debug, Clone, Copy)]
pub struct CallerScope<'a> {
    /// `grant`: the calling workload (its pod when known, else its cgroup).
    pub grant: &'a str,
    /// `process`: the calling process.
    pub process: &'a str,
    /// `session`: the MCP session id, or the connection for revisions
    /// without sessions.
    pub session: &'a str,
    /// `namespace`: the caller's Kubernetes namespace (its `grant` when it is not in a
    /// known pod).
    pub namespace: &'a str,
    /// `service_account`: the caller's namespace and service account (its `grant` when it
    /// is not in a known pod).
    pub service_account: &'a str,
}

/// What the caller should do with a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the call.
    Allow,
    /// The tool is hidden, or not listed while the policy denies by default:
    /// answer as if the tool did not exist (JSON-RPC error -32602 "Unknown
    /// tool"), as it is also absent from `tools/list`.
    UnknownTool,
    /// The tool is denied explicitly, its arguments fail a check, or a limit
    /// is exhausted: answer with a tool result that has `isError` set and
    /// carries the reason.
    Deny,
    /// `action: require_approval`, and the call passes every other check (checked without
    /// counting): the caller holds it for an approval ([`Decision::approval`] says whose),
    /// and decides it again with [`Engine::decide_approved_call`] once approved.
    ApprovalRequired,
}

impl Outcome {
    /// How the audit log names this outcome.
    pub fn verdict(self) -> Verdict {
        match self {
            Outcome::Allow => Verdict::Allow,
            Outcome::Deny | Outcome::UnknownTool => Verdict::Deny,
            Outcome::ApprovalRequired => Verdict::RequireApproval,
        }
    }
}

/// A decision as the audit log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// `action: require_approval`: held for an approval (or refused when none came).
    RequireApproval,
}

/// The outcome of one call, the rule that decided it, and why.
#[derive(Debug, Clone)]
pub struct Decision {
    /// What to do with the call.
    pub outcome: Outcome,
    /// JSON Pointer to the deciding rule in the policy file, e.g.
    /// `/tools/drop_cluster/action`, `/tools/scan/limits/0` or `/default`.
    pub rule: String,
    /// Text for the agent and the audit log; `None` when the call is allowed.
    pub reason: Option<String>,
    /// `mode: dry_run` only: what enforcing would have done, when that is not
    /// to allow (`outcome` is then `Allow`).
    pub would: Option<Outcome>,
    /// The quota this call took, when it is allowed and limited.
    pub reservation: Option<Reservation>,
    /// [`Outcome::ApprovalRequired`]: how the rule wants it approved.
    pub approval: Option<Box<Approval>>,
}
