//! The audit record, built in parts as the request path learns them: the caller once per
//! connection ([`CallerPart`]), the HTTP request once per request ([`RequestPart`]), the
//! message once per MCP message ([`MessagePart`]), and the decision or the answer once per
//! record. The parts a record shares with others are behind `Arc`s: a call's `request` record
//! and the `response` record that later closes it share one [`Head`], and a pending call holds
//! only that head, never a copy of a record.
//!
//! Fields that do not apply are left out of the line (`docs/audit.md` lists every event and
//! the fields it carries).

use std::sync::{Arc, LazyLock, OnceLock};

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
    /// The audit sink took records again after a stall (a full disk, a reader that stopped):
    /// for how long it did not, and what became of the records meanwhile (`stall`, `reason`).
    AuditStall,
    /// A peer of the admin socket refused: not root and not in the admin group (`pid`, `uid`,
    /// `reason`).
    AdminRefused,
    /// A step of a held call's approval (`approval.step`): requested, approved, denied (by
    /// whom: `approval.by`), timed out, abandoned, remembered, or a decision refused (an
    /// approver in the caller's own cgroup, pod or service account). The call's own
    /// `request` or `refused` record follows its decision.
    Approval,
}

/// The decision, as `policy` names its outcomes.
pub use crate::policy::Verdict;

/// What kind of refusal a `refused` record is (`kind`): the label of
/// `mcpwarden_refusals_total`, and a field log pipelines can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The policy refused a call (a rule, a limit, an unknown or hidden tool, an unresolved
    /// caller's binding).
    Policy,
    /// Not valid MCP or HTTP the interceptor will pass: bad JSON-RPC, bad headers, an encoding
    /// that cannot be inspected, a path or method not served.
    Malformed,
    /// A size or count limit: body, headers, batch, pending calls.
    TooLarge,
    /// A connection limit or a read deadline (`limits:`).
    Limit,
    /// TLS: an SNI not configured, a failed handshake, a Host naming another server.
    Tls,
    /// A connection without a redirect record, or to no configured server.
    Connection,
    /// Refused in the kernel: a bind to the interceptor's port, UDP or a raw socket.
    Kernel,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Policy,
        Refusal::Malformed,
        Refusal::TooLarge,
        Refusal::Limit,
        Refusal::Tls,
        Refusal::Connection,
        Refusal::Kernel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Policy => "policy",
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::Limit => "limit",
            Refusal::Tls => "tls",
            Refusal::Connection => "connection",
            Refusal::Kernel => "kernel",
        }
    }

    /// The kind of a refusal answered with HTTP `status` before any policy ran.
    pub fn for_status(status: u16) -> Refusal {
        match status {
            413 | 431 => Refusal::TooLarge,
            408 | 429 | 503 => Refusal::Limit,
            421 => Refusal::Tls,
            _ => Refusal::Malformed,
        }
    }
}

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
    /// The container the caller runs in, as its cgroup path names it (pod or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The caller's Kubernetes pod, once the node knows it.
    #[serde(flatten)]
    pub pod: PodSlot,
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
            container_id: caller.workload.container_id.clone(),
            pod: PodSlot::of(caller.pod.as_deref()),
            netns,
            sni: None,
            tls: None,
        }
    }
}

/// Which pod a caller runs in (Kubernetes' names: bounded by the API server).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodPart {
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
    pub service_account: String,
    /// The container's name, when the pod's status lists the caller's container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
}

impl PodPart {
    pub fn of(info: &crate::identity::PodInfo) -> PodPart {
        PodPart {
            pod: info.meta.name.clone(),
            namespace: info.meta.namespace.clone(),
            pod_uid: info.meta.uid.clone(),
            service_account: info.meta.service_account.clone(),
            container: info.meta.container.clone(),
            node: info.node.clone(),
        }
    }
}

/// A connection's pod, set once: when the pod becomes known only while a call waits for it,
/// the connection's records from then on name it.
#[derive(Debug, Clone, Default)]
pub struct PodSlot(OnceLock<Arc<PodPart>>);

impl PodSlot {
    pub fn of(info: Option<&crate::identity::PodInfo>) -> PodSlot {
        let slot = PodSlot::default();
        if let Some(info) = info {
            slot.set(info);
        }
        slot
    }

    /// Names the pod, unless one is named already.
    pub fn set(&self, info: &crate::identity::PodInfo) {
        if self.0.get().is_none() {
            let _ = self.0.set(Arc::new(PodPart::of(info)));
        }
    }

    pub fn get(&self) -> Option<&PodPart> {
        self.0.get().map(|p| &**p)
    }
}

impl Serialize for PodSlot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0.get() {
            Some(part) => part.serialize(s),
            None => s.serialize_map(Some(0))?.end(),
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
    /// `tools/call` to a server with `log_arguments: true`: `params.arguments`, with the value
    /// of every key containing a redaction term replaced by `"[redacted]"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
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
    /// `refused` records: what kind of refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Refusal>,
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
    /// `audit_stall`: the stall that ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallPart>,
    /// `approval`: which approval, which step, who decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPart>,
}

/// One step of an approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalPart {
    /// The approval's id (`mcpwarden approvals approve ID`); absent for a remembered approval
    /// and for approval by the client's user (nothing is held then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `requested`, `approved`, `denied`, `timed_out`, `abandoned`, `remembered`, `refused`.
    pub step: &'static str,
    /// `operator` or `user`.
    pub mode: &'static str,
    /// Who decided (approved, denied, refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<crate::approvals::Approver>,
    /// Approved: the same tool is approved for this caller for this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remember_s: Option<u64>,
}

/// How long the audit sink took no record, and what became of the records meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StallPart {
    /// Milliseconds from the first failed write to the first that went through again.
    pub ms: u64,
    /// The last error (`No space left on device (os error 28)`, …).
    pub error: String,
    /// Records refused meanwhile (`on_stall: deny`): their requests got 503.
    pub refused: u64,
    /// Records that went to the agent's standard error instead meanwhile, their calls
    /// forwarded (`on_stall: allow`).
    pub forwarded_unrecorded: u64,
}

impl Record {
    /// A record of `event` about what `head` describes, stamped now.
    pub fn new(event: Event, head: Arc<Head>) -> Self {
        Record {
            v: SCHEMA_VERSION,
            ts: now(),
            event,
            kind: None,
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
            stall: None,
            approval: None,
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
            // Bounded by nothing but the body: left out of a clipped line.
            arguments: None,
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

    /// A refusal of `kind`.
    pub fn kind(mut self, kind: Refusal) -> Self {
        self.kind = Some(kind);
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

    /// A record of each event with the fields docs/audit.md says it carries, serialised and
    /// checked against docs/audit.schema.json (which has `additionalProperties: false`: a field
    /// added here and not to the schema fails). The match has no wildcard: a new event needs a
    /// typical record here, and the schema an entry.
    #[test]
    fn a_record_of_every_event_matches_the_schema() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/audit.schema.json"))
                .expect("docs/audit.schema.json is JSON");
        let validator = jsonschema::draft202012::options()
            .build(&schema)
            .expect("docs/audit.schema.json is a valid JSON Schema");
        let sha = |c: char| c.to_string().repeat(64);
        let caller = Arc::new(CallerPart {
            dst: Some("10.0.0.5:8080".into()),
            pid: Some(48213),
            comm: Some("python3".into()),
            uid: Some(1000),
            cgroup: Some("/system.slice/agent.service".into()),
            cgroup_id: Some(7342),
            netns: Some(4026531840),
            ..CallerPart::default()
        });
        let tls_caller = Arc::new(CallerPart {
            sni: Some("mcp.example.com".into()),
            tls: Some(Tls::Terminated),
            ..(*caller).clone()
        });
        let request = Arc::new(RequestPart {
            server: Some("tools".into()),
            http_version: Some(HttpVersion::Http11),
            http_method: Some("POST".into()),
            path: Some("/mcp".into()),
            query: Some("session_id=*".into()),
        });
        let exchange = Head {
            transport: Some(Transport::StreamableHttp),
            revision: Some("2025-06-18".into()),
            ..Head::request(&caller, &request)
        };
        let call = Arc::new(exchange.with_message(MessagePart {
            method: Some("tools/call".into()),
            id: Some(7.into()),
            tool: Some("start_security_scan".into()),
            arg_keys: Some(vec!["target".into()]),
            args_sha256: Some(sha('a')),
            ..MessagePart::default()
        }));
        let policy = || PolicyRef {
            file: "/etc/mcpwarden/policy.json".into(),
            sha256: sha('b'),
        };
        let typical = |event: Event| -> Vec<Record> {
            match event {
                Event::Request => {
                    let mut allowed = Record::new(event, call.clone());
                    allowed.decision = Some(Verdict::Allow);
                    allowed.rule = Some("/tools/start_security_scan".into());
                    allowed.policy = Some(policy());
                    allowed.binding = Some("/bindings/1".into());
                    let logged = Arc::new(exchange.with_message(MessagePart {
                        arguments: Some(
                            serde_json::json!({"target": "prod", "token": "[redacted]"}),
                        ),
                        ..call.message.clone().unwrap_or_default()
                    }));
                    let mut with_arguments = Record::new(event, logged);
                    with_arguments.decision = Some(Verdict::Allow);
                    with_arguments.rule = Some("/tools/start_security_scan".into());
                    with_arguments.policy = Some(policy());
                    let mut dry_run = allowed.clone().because("destructive");
                    dry_run.would = Some(Verdict::Deny);
                    let listing = Arc::new(exchange.with_message(MessagePart {
                        method: Some("tools/list".into()),
                        id: Some("c-1".into()),
                        ..MessagePart::default()
                    }));
                    let mut other = Record::new(event, listing);
                    other.decision = Some(Verdict::Allow);
                    let mut batch = Record::new(event, Arc::new(exchange.clone()));
                    batch.decision = Some(Verdict::Allow);
                    batch.aggregated = Some(Aggregated {
                        notifications: 2,
                        responses: 1,
                        methods: vec!["notifications/progress".into()],
                    });
                    vec![allowed, with_arguments, dry_run, other, batch]
                }
                Event::Response => {
                    let mut answered = Record::new(event, call.clone());
                    answered.status = Some(200);
                    answered.latency_ms = Some(42.871304);
                    answered.is_error = Some(true);
                    answered.error_code = Some(-32602);
                    answered.result_type = Some("complete".into());
                    answered.quota_released = Some(true);
                    let mut listing = Record::new(event, call.clone());
                    listing.status = Some(200);
                    listing.latency_ms = Some(3.4);
                    listing.is_error = Some(false);
                    listing.hidden_tools = Some(vec!["drop_database".into()]);
                    let cancelled = Record::new(event, call.clone())
                        .because("cancelled by the client (notifications/cancelled)");
                    vec![answered, listing, cancelled]
                }
                Event::Refused => {
                    let mut by_policy = Record::new(event, call.clone())
                        .denied("destructive")
                        .kind(Refusal::Policy);
                    by_policy.rule = Some("/tools/drop_cluster/action".into());
                    by_policy.policy = Some(policy());
                    by_policy.decision = Some(Verdict::RequireApproval);
                    let mut too_large =
                        Record::new(event, Arc::new(Head::request(&tls_caller, &request)))
                            .denied("body too large")
                            .kind(Refusal::TooLarge);
                    too_large.status = Some(413);
                    too_large.repeats = Some(3);
                    too_large.clipped = Some(true);
                    vec![
                        Record::bare(event)
                            .denied("no redirect record for the connection")
                            .kind(Refusal::Connection),
                        by_policy,
                        too_large,
                    ]
                }
                Event::NonMcp => vec![Record::new(event, Arc::new(exchange.clone()))],
                Event::Passthrough => {
                    let passing = Arc::new(CallerPart {
                        tls: Some(Tls::Passthrough),
                        ..(*tls_caller).clone()
                    });
                    let head = Head {
                        request: Some(Arc::new(RequestPart {
                            server: Some("partner".into()),
                            ..RequestPart::default()
                        })),
                        ..Head::caller(&passing)
                    };
                    let mut rec = Record::new(event, Arc::new(head))
                        .because("tls: passthrough — forwarded untouched, not inspected");
                    rec.decision = Some(Verdict::Allow);
                    vec![rec]
                }
                Event::ServerMessage => {
                    let head = exchange.with_message(MessagePart {
                        method: Some("sampling/createMessage".into()),
                        id: Some(serde_json::json!({"any": "value"})),
                        ..MessagePart::default()
                    });
                    vec![Record::new(event, Arc::new(head))]
                }
                Event::PolicyReload => {
                    let mut rec = Record::bare(event).because("loaded: in force from now on");
                    rec.policy = Some(policy());
                    let mut failed = Record::bare(event)
                        .because("/p.json:0:0: cannot read policy file: gone (not loaded: the previous version stays in force)");
                    failed.policy = Some(PolicyRef {
                        file: "/p.json".into(),
                        sha256: String::new(),
                    });
                    vec![rec, failed]
                }
                Event::UnpreparedNetns => vec![Record::new(event, Arc::new(Head::caller(&caller)))
                    .denied("connect from a network namespace not served yet")],
                Event::PreexistingReset => {
                    vec![Record::new(event, Arc::new(Head::caller(&caller)))
                        .because("a connection opened before mcpwarden attached was reset")]
                }
                Event::AuditStall => {
                    let mut rec = Record::bare(event).because("the audit log took records again");
                    rec.stall = Some(StallPart {
                        ms: 1500,
                        error: "No space left on device (os error 28)".into(),
                        refused: 3,
                        forwarded_unrecorded: 0,
                    });
                    vec![rec]
                }
                Event::AdminRefused => {
                    let peer = Arc::new(CallerPart {
                        pid: Some(4242),
                        uid: Some(1000),
                        ..CallerPart::default()
                    });
                    vec![Record::new(event, Arc::new(Head::caller(&peer)))
                        .because("not root and not in the admin group")]
                }
                Event::Approval => {
                    let mut requested = Record::new(event, call.clone());
                    requested.rule = Some("/tools/drop_cluster/action".into());
                    requested.approval = Some(ApprovalPart {
                        id: Some("7k3m9q2x".into()),
                        step: "requested",
                        mode: "operator",
                        by: None,
                        remember_s: None,
                    });
                    let mut approved = Record::new(event, call.clone()).because("change ticket 42");
                    approved.approval = Some(ApprovalPart {
                        id: Some("7k3m9q2x".into()),
                        step: "approved",
                        mode: "operator",
                        by: Some(crate::approvals::Approver {
                            uid: Some(1000),
                            gids: vec![1000, 27],
                            pid: Some(4242),
                            claimed_as: Some("alice".into()),
                            ..crate::approvals::Approver::default()
                        }),
                        remember_s: Some(600),
                    });
                    vec![requested, approved]
                }
            }
        };
        let events = [
            Event::Request,
            Event::Response,
            Event::Refused,
            Event::NonMcp,
            Event::Passthrough,
            Event::ServerMessage,
            Event::PolicyReload,
            Event::UnpreparedNetns,
            Event::PreexistingReset,
            Event::AuditStall,
            Event::AdminRefused,
            Event::Approval,
        ];
        for event in events {
            for record in typical(event) {
                let line = serde_json::to_value(&record).expect("a record serialises");
                let errors: Vec<String> = validator
                    .iter_errors(&line)
                    .map(|e| format!("{e} (at {})", e.instance_path().as_str()))
                    .collect();
                assert!(errors.is_empty(), "{event:?}: {errors:?}\n{line}");
                // The clipped form of a record is a record too.
                let clipped = serde_json::to_value(record.clipped()).expect("serialises");
                assert!(validator.is_valid(&clipped), "{event:?} clipped: {clipped}");
            }
        }
        // And what the schema refuses, it refuses: a request that is not allowed.
        let mut denied_request = Record::new(Event::Request, call.clone()).denied("no");
        denied_request.rule = Some("/default".into());
        denied_request.policy = Some(policy());
        let line = serde_json::to_value(&denied_request).expect("serialises");
        assert!(!validator.is_valid(&line), "{line}");
    }
}
