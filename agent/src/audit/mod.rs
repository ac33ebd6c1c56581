//! The last step of the flow: one JSON line for every MCP message the interceptor sees, and for
//! every decision, written before anything it gates is forwarded.
//!
//! [`record`] is what a line says, built in parts (caller once per connection, request once per
//! request, message and decision once per message); [`sink`] is where lines go. Argument values
//! are never written; their top-level keys and a sha256 of their canonical JSON are. The fields of
//! each event are listed in `docs/audit.md`.

mod record;
mod sink;

pub use record::{
    clip, now, Aggregated, CallerPart, Event, Head, HttpVersion, MessagePart, PolicyRef, Record,
    RequestPart, Tls, Transport, Verdict, SCHEMA_VERSION,
};
pub use sink::{AuditLog, WorkerAudit, DEFAULT_STALL, DEFER_AT_MOST};
