//! mcpwarden: transparent MCP policy enforcement for every AI agent on a host.
//!
//! Data flows one way, one module per step:
//! `redirect` (eBPF: which connections come to us, and who made them; `netns` serves each
//! network namespace: listeners inside it, upstream sockets made in it) →
//! `intercept` (accept, recover the original destination, forward over HTTP) →
//! `mcp` (understand the HTTP request as MCP/JSON-RPC; no sockets) →
//! `policy` (decide; no I/O) →
//! `audit` (record every message and decision).
//! `config` reads the settings, `app` assembles the pieces and runs them, `cli` is the command
//! line (`audit_tail` is `mcpwarden audit tail`, the audit log made readable). Beside the flow,
//! read-only: `metrics` counts what the audit records say (and two things `intercept` tells
//! it), `admin` serves the admin socket and the metrics listener, `control` is what they read
//! of the running agent. The demo is `mcpwarden-demo`, in the `tests/` crate.
//!
//! `mcp` and `policy` are crates of their own (`mcpwarden-mcp`, `mcpwarden-policy`), re-exported
//! here under their old module names: the compiler keeps them free of sockets, of async and of
//! each other.

pub mod admin;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod audit_tail;
pub mod ca;
pub mod cli;
pub mod config;
pub mod control;
pub mod handover;
pub mod identity;
pub mod intercept;
pub mod journal;
pub mod k8s;
pub mod metrics;
pub use mcpwarden_mcp as mcp;
pub mod netns;
pub use mcpwarden_policy as policy;
pub mod policy_cli;
pub mod redirect;
pub mod reload;
