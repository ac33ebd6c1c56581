//! The last step of the flow: one JSON line for every MCP message the interceptor sees, and for
//! every decision, written before anything it gates is forwarded.
//!
//! [`record`] is what a line says, built in parts (caller once per connection, request once per
//! request, message and decision once per message); [`sink`] is where lines go: reopened on
//! SIGUSR1 or when its path is renamed or removed, rotated by size if configured, bounded in how
//! long a record waits for it (`audit.stall_ms`, `audit.on_stall`). Argument values are written
//! only for servers with `log_arguments: true`, redacted; otherwise their top-level keys and a
//! sha256 of their canonical JSON are. No HTTP header value is ever written. The fields of each
//! event are listed in `docs/audit.md`.

mod record;
mod sink;

pub use record::{
    clip, now, Aggregated, CallerPart, Event, Head, HttpVersion, MessagePart, PolicyRef, Record,
    Refusal, RequestPart, Tls, Transport, Verdict, SCHEMA_VERSION,
};
pub use record::{ApprovalPart, StallPart};
pub use sink::{
    redacted, AuditLog, Observer, OnStall, Options, Rotate, SinkKind, SinkState, SinkStats,
    WorkerAudit, DEFAULT_REDACT_KEYS, DEFAULT_STALL, DEFER_AT_MOST, REDACTED, WATCH_INTERVAL,
    WRITE_LATENCY_BOUNDS,
};
