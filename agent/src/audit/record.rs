//! The audit record, built in parts as the request path learns them: the caller once per
//! connection ([`CallerPart`]), the HTTP request once per request ([`RequestPart`]), the
//! message once per MCP message ([`MessagePart`]), and the decision or the answer once per
//! record. The parts a record shares with others are behind `Arc`s: a call's `request` record
//! and the `response` record that later closes it share one [`Head`], and a pending call holds
//! only that head, never a copy of a record.
//!
//! Fields that do not apply are left out of the line (`docs/audit.md` lists every event and
//! the fields it carries).

use std::sync::{Arc, LazyLock};

use serde::Serialize;

/// Version of the record schema (`v`).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An MCP message the interceptor forwarded (after deciding it).
    Request,
    /// The upstream's answer to a forwarded MCP request.
    Response,
    /// A message or connection the interceptor refused; nothing was forwarded.
    Refused,
    /// An HTTP request that is not MCP (OAuth metadata, health checks, the SSE GET stream).
    NonMcp,
    /// A TLS connection forwarded untouched (`tls: passthrough`): nothing in it was inspected.
    Passthrough,
    /// A request or notification the server sent the client (on an SSE stream): sampling,
    /// elicitation, roots, ping, progress, list changes, cancellations.
    ServerMessage,
    /// A policy or config file was (re)loaded, or failed to load and the previous one stays in
    /// force (`reason` then holds `file:line:col: message`).
    PolicyReload,
    /// A connect to an endpoint from a network namespace the interceptor does not serve yet:
    /// refused in the kernel (EPERM), never sent direct. Once per namespace.
    UnpreparedNetns,
    /// A connection to an endpoint opened before the programs were attached (so never
    /// redirected, never inspected), reset at start so that the client's next attempt is;
    /// `reason` says whether the reset worked.
    PreexistingReset,
}

/// The decision, as `policy` names its outcomes.
pub use crate::policy::Verdict;

/// How a TLS connection was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// Terminated with a minted leaf, inspected, re-encrypted to the server.
    Terminated,
    /// Forwarded untouched (`tls: passthrough`).
    Passthrough,
}

/// The MCP transport a message came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Transport {
    /// 2024-11-05 HTTP+SSE: a GET stream and the POST endpoint it announced.
    #[serde(rename = "http+sse")]
    HttpSse,
    /// Streamable HTTP, 2025-03-26 to 2025-11-25.
    #[serde(rename = "streamable_http")]
    StreamableHttp,
    /// The 2026-07-28 stateless form.
    #[serde(rename = "stateless_http")]
    StatelessHttp,
}

/// The HTTP version of the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HttpVersion {
    #[serde(rename = "HTTP/1.1")]
    Http11,
    #[serde(rename = "HTTP/2")]
    Http2,
}

/// Which policy made a decision: a JSON Pointer only means something next to the file it points
/// into, and that file can change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub file: String,
    pub sha256: String,
}

/// Who: the connection's caller and where it was going. Filled once per connection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallerPart {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// The caller's network namespace: its inode, as `ls -l /proc/PID/ns/net` shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// The TLS server name the client asked for (terminated and passed-through connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Absent for plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

impl CallerPart {
    /// Who `caller` is, going to `dst`, from namespace `netns` (its inode).
    pub fn of(
        caller: &crate::identity::Caller,
        dst: Option<std::net::SocketAddr>,
        netns: Option<u64>,
    ) -> CallerPart {
        CallerPart {
            dst: dst.map(|d| d.to_string()),
            pid: Some(caller.pid),
            comm: Some(caller.comm.clone()),
            uid: Some(caller.uid),
            cgroup: caller.cgroup.as_deref().map(str::to_owned),
            cgroup_id: Some(caller.cgroup_id),
            netns,
            sni: None,
            tls: None,
        }
    }
}

/// What: the configured server and the HTTP request. Filled once per request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestPart {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_version: Option<HttpVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The query's keys, each value written `*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// One JSON-RPC message. Argument values are never written: their top-level keys and a sha256
/// of their canonical JSON are.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MessagePart {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arg_keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
}

/// What records of one request (or one message) share, immutable once built.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Head {
    #[serde(flatten)]
    pub caller: Option<Arc<CallerPart>>,
    #[serde(flatten)]
    pub request: Option<Arc<RequestPart>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The MCP revision the message was sent under, as far as it is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(flatten)]
    pub message: Option<MessagePart>,
}

/// The head of records about nothing in particular (a connection without a redirect record, a
/// policy reload).
static EMPTY: LazyLock<Arc<Head>> = LazyLock::new(Arc::default);

impl Head {
    /// The caller alone (connection-level records).
    pub fn caller(caller: &Arc<CallerPart>) -> Head {
        Head {
            caller: Some(caller.clone()),
            ..Head::default()
        }
    }

    /// The caller and the request.
    pub fn request(caller: &Arc<CallerPart>, request: &Arc<RequestPart>) -> Head {
        Head {
            caller: Some(caller.clone()),
            request: Some(request.clone()),
            ..Head::default()
        }
    }

    /// This head about one more message (sharing the caller and the request).
    pub fn with_message(&self, message: MessagePart) -> Head {
        Head {
            message: Some(message),
            ..self.clone()
        }
    }

    /// The id of the message, if any.
    pub fn id(&self) -> Option<&serde_json::Value> {
        self.message.as_ref().and_then(|m| m.id.as_ref())
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), `…` marking a cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A record whose line would be longer than this is written [`Record::clipped`].
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// What [`Record::clipped`] keeps of each string field and of each list.
const CLIP_FIELD: usize = 512;
const CLIP_LIST: usize = 64;

/// The notifications and responses of one batch, counted in one record instead of one each.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Aggregated {
    pub notifications: u64,
    pub responses: u64,
    /// The notifications' distinct methods, in order, at most [`AGGREGATED_METHODS`] (cut to
    /// 128 bytes each).
    pub methods: Vec<String>,
}

/// Methods an [`Aggregated`] record names at most.
pub const AGGREGATED_METHODS: usize = 16;

impl Aggregated {
    pub fn add(&mut self, notification: bool, method: Option<&str>) {
        if !notification {
            self.responses += 1;
            return;
        }
        self.notifications += 1;
        if let Some(m) = method {
            if self.methods.len() < AGGREGATED_METHODS && !self.methods.iter().any(|k| k == m) {
                self.methods.push(clip(m, 128));
            }
        }
    }
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub v: u32,
    pub ts: String,
    pub event: Event,
    #[serde(flatten)]
    pub head: Arc<Head>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// `mode: dry_run`: what enforcing would have decided, when it would have refused
    /// (`decision` is then `allow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would: Option<Verdict>,
    /// The config's binding that chose the policy (`/bindings/0`); absent for a server's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// Responses: the call's quota was given back, because the upstream certainly did not run
    /// it (connection failed, HTTP or JSON-RPC error before any result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_released: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Responses: a result with `isError: true`, or a JSON-RPC error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// Responses: the upstream's JSON-RPC error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    /// Responses (2026-07-28): `complete` or `input_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_type: Option<String>,
    /// Responses to `tools/list`: the tools removed for this caller by the visibility rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_tools: Option<Vec<String>>,
    /// Refusals a flood repeats (connection limits, timeouts) are written once a second per
    /// caller: how many like this one went unwritten since the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeats: Option<u64>,
    /// A batch's notifications and responses, audited in one record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregated: Option<Aggregated>,
    /// Set when string fields were cut (to 512 bytes) and lists (to 64 entries) because the
    /// whole line would have exceeded [`MAX_RECORD_BYTES`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clipped: Option<bool>,
}

impl Record {
    /// A record of `event` about what `head` describes, stamped now.
    pub fn new(event: Event, head: Arc<Head>) -> Self {
        Record {
            v: SCHEMA_VERSION,
            ts: now(),
            event,
            head,
            decision: None,
            rule: None,
            reason: None,
            policy: None,
            would: None,
            binding: None,
            quota_released: None,
            status: None,
            latency_ms: None,
            is_error: None,
            error_code: None,
            result_type: None,
            hidden_tools: None,
            repeats: None,
            aggregated: None,
            clipped: None,
        }
    }

    /// This record with every string a client or server chose cut to [`CLIP_FIELD`] bytes and
    /// every list to [`CLIP_LIST`] entries: a line of bounded size, whatever was sent.
    pub fn clipped(&self) -> Record {
        let text = |s: &Option<String>| s.as_deref().map(|t| clip(t, CLIP_FIELD));
        let list = |l: &Option<Vec<String>>| {
            l.as_ref().map(|items| {
                items
                    .iter()
                    .take(CLIP_LIST)
                    .map(|t| clip(t, CLIP_FIELD))
                    .collect()
            })
        };
        let head = &*self.head;
        let request = head.request.as_ref().map(|r| {
            Arc::new(RequestPart {
                server: text(&r.server),
                http_version: r.http_version,
                http_method: text(&r.http_method),
                path: text(&r.path),
                query: text(&r.query),
            })
        });
        let caller = head.caller.as_ref().map(|c| {
            Arc::new(CallerPart {
                comm: text(&c.comm),
                cgroup: text(&c.cgroup),
                sni: text(&c.sni),
                dst: text(&c.dst),
                ..(**c).clone()
            })
        });
        let message = head.message.as_ref().map(|m| MessagePart {
            method: text(&m.method),
            id: m.id.as_ref().map(|id| match id {
                serde_json::Value::String(s) => serde_json::Value::String(clip(s, CLIP_FIELD)),
                other => other.clone(),
            }),
            tool: text(&m.tool),
            arg_keys: list(&m.arg_keys),
            args_sha256: m.args_sha256.clone(),
        });
        Record {
            head: Arc::new(Head {
                caller,
                request,
                transport: head.transport,
                revision: text(&head.revision),
                message,
            }),
            rule: text(&self.rule),
            reason: text(&self.reason),
            binding: text(&self.binding),
            result_type: text(&self.result_type),
            hidden_tools: list(&self.hidden_tools),
            clipped: Some(true),
            ..self.clone()
        }
    }

    /// A record of `event` with nothing known of caller or request.
    pub fn bare(event: Event) -> Self {
        Record::new(event, EMPTY.clone())
    }

    /// Refused, and why.
    pub fn denied(mut self, reason: impl Into<String>) -> Self {
        self.decision = Some(Verdict::Deny);
        self.reason = Some(reason.into());
        self
    }

    /// With `reason`.
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The answer's HTTP status (if any) and the time since `started`.
    pub fn answered(mut self, status: Option<u16>, started: std::time::Instant) -> Self {
        self.status = status;
        self.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        self
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn keys(rec: &Record) -> Vec<String> {
        let v = serde_json::to_value(rec).expect("a record serialises");
        let object = v.as_object().expect("an object");
        assert!(object.values().all(|v| !v.is_null()), "no null field: {v}");
        object.keys().cloned().collect()
    }

    #[test]
    fn parts_flatten_into_one_line_and_absent_fields_are_left_out() {
        let caller = Arc::new(CallerPart {
            dst: Some("10.0.0.5:8080".into()),
            pid: Some(1),
            tls: Some(Tls::Terminated),
            ..CallerPart::default()
        });
        let request = Arc::new(RequestPart {
            server: Some("tools".into()),
            http_version: Some(HttpVersion::Http2),
            ..RequestPart::default()
        });
        let head = Head {
            transport: Some(Transport::HttpSse),
            ..Head::request(&caller, &request)
        }
        .with_message(MessagePart {
            tool: Some("echo".into()),
            ..MessagePart::default()
        });
        let rec = Record::new(Event::Refused, Arc::new(head)).denied("no");
        let mut want = [
            "v",
            "ts",
            "event",
            "dst",
            "pid",
            "tls",
            "server",
            "http_version",
            "transport",
            "tool",
            "decision",
            "reason",
        ]
        .map(str::to_owned)
        .to_vec();
        want.sort();
        assert_eq!(keys(&rec), want);
        let v = serde_json::to_value(&rec).expect("a record serialises");
        assert_eq!(v["tls"], "terminated");
        assert_eq!(v["http_version"], "HTTP/2");
        assert_eq!(v["transport"], "http+sse");
        assert_eq!(v["decision"], "deny");
        assert_eq!(
            keys(&Record::bare(Event::PolicyReload)),
            ["event", "ts", "v"]
        );
    }

    #[test]
    fn a_message_head_shares_the_caller_and_request_parts() {
        let caller = Arc::new(CallerPart::default());
        let request = Arc::new(RequestPart::default());
        let base = Head::request(&caller, &request);
        let head = base.with_message(MessagePart::default());
        assert!(Arc::ptr_eq(head.caller.as_ref().expect("caller"), &caller));
        assert!(Arc::ptr_eq(
            head.request.as_ref().expect("request"),
            &request
        ));
    }
}
