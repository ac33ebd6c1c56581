//! The way back: every server message in a response is read before it reaches the client.
//!
//! - `application/json` bodies, and any other body of a 2xx answer but an event stream, are read
//!   whole (up to the answer bound), audited message by message, and `tools/list` results are
//!   filtered by the visibility rule;
//! - `text/event-stream` bodies are read event by event ([`SseBody`]), never whole: each event
//!   is passed on as soon as it is complete, byte for byte unless it carries a listing that
//!   had to be filtered. Server requests and notifications on the stream are audited; results
//!   complete the record of their call;
//! - a 2024-11-05 HTTP+SSE stream announces its POST endpoint in its first event: the endpoint
//!   must be on this origin (or a configured one), and the session is registered so that
//!   refusals of POSTed calls can be written into this stream, between two whole events;
//! - batch refusals are merged in order with the server's answers to the rest of the batch.
//!
//! Every call's record is closed exactly once: by its result, by the end of the exchange
//! (an HTTP error, a stream that ended first), by the client's `notifications/cancelled`, or by
//! the client going away.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::Value;

use super::{
    limits::{self, Charge, Collect},
    reply::{full, json_response},
    session::{ParamTable, Pending, Session, SessionKey, Sessions},
    upstream::Body,
};
use crate::{
    audit::{Event, Head, MessagePart, Record, Refusal, Transport, WorkerAudit},
    mcp::{self, Kind, ListingRule, ServerMessage, SseEvent, SseSplitter},
    policy::Policy,
};

/// The least bound on a JSON answer read whole, or on one SSE event: tool results can be much
/// larger than requests (file contents, query results), so answers get at least this much
/// whatever `max_body_bytes` is.
pub const MIN_RESPONSE_BOUND: usize = 16 << 20;

/// What the response to one forwarded request is read against.
pub struct Exchange {
    /// Caller, server and HTTP part shared by every record of this exchange.
    pub base: Arc<Head>,
    /// Requests forwarded in this exchange, waiting for their answers.
    pub calls: Vec<(Value, Pending)>,
    /// Refusals of batch elements, by position in the client's batch, and the ids of the
    /// forwarded elements in the same order: to merge the answers in the client's order.
    pub batch: Option<Batch>,
    pub engine: Arc<crate::policy::Engine>,
    /// Where `Mcp-Param-*` designations seen in listings are kept.
    pub params: Arc<ParamTable>,
    /// The session the request belongs to, if any (answers may arrive on other streams).
    pub session: Option<Arc<Session>>,
    pub sessions: Arc<Sessions>,
    pub server: usize,
    /// `host:port` origins an HTTP+SSE endpoint may name: this connection's and every
    /// configured server's.
    pub origins: Vec<String>,
    pub started: Instant,
    /// Bound on a JSON body or one SSE event.
    pub max: usize,
    /// The worker's buffered answer bytes, and their bound.
    pub answers: Arc<std::sync::atomic::AtomicUsize>,
    pub answers_max: usize,
    pub audit: Arc<WorkerAudit>,
    /// A GET: its stream may be a 2024-11-05 HTTP+SSE stream.
    pub get_stream: bool,
    /// Counts the SSE streams open.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The client's batch, element by element.
pub struct Batch {
    pub elements: Vec<BatchElement>,
}

pub enum BatchElement {
    /// Answered by mcpwarden with this JSON-RPC message (`None`: a refused notification).
    Refused(Option<Vec<u8>>),
    /// Forwarded; answered by the server if it has this id.
    Forwarded(Option<Value>),
}

/// JSON array text of whole JSON texts.
pub fn json_array<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (n, item) in items.into_iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

impl Batch {
    pub fn refusals(&self) -> impl Iterator<Item = &[u8]> {
        self.elements.iter().filter_map(|e| match e {
            BatchElement::Refused(v) => v.as_deref(),
            BatchElement::Forwarded(_) => None,
        })
    }

    /// The client's order: refusals where their elements were, the server's answers where
    /// theirs were (matched by id), then any answer that matched nothing. `answers` are the
    /// server's elements as it wrote them, with their ids; their bytes are kept.
    fn merge(&self, mut answers: Vec<(Option<Value>, Vec<u8>)>) -> Vec<u8> {
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(self.elements.len());
        for e in &self.elements {
            match e {
                BatchElement::Refused(Some(v)) => out.push(v.clone()),
                BatchElement::Refused(None) | BatchElement::Forwarded(None) => {}
                BatchElement::Forwarded(Some(id)) => {
                    if let Some(i) = answers.iter().position(|(a, _)| a.as_ref() == Some(id)) {
                        out.push(answers.remove(i).1);
                    }
                }
            }
        }
        out.extend(answers.into_iter().map(|(_, b)| b));
        json_array(out.iter().map(Vec::as_slice))
    }
}

/// The elements of a server's batch answer (or its one object), with their ids, bytes kept.
fn answer_elements(body: &[u8]) -> Vec<(Option<Value>, Vec<u8>)> {
    let id_of = |text: &str| {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.get("id").cloned())
    };
    match serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(body) {
        Ok(items) => items
            .into_iter()
            .map(|raw| (id_of(raw.get()), raw.get().as_bytes().to_vec()))
            .collect(),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let trimmed = text.trim();
            if trimmed.is_empty() {
                Vec::new()
            } else {
                vec![(id_of(trimmed), trimmed.as_bytes().to_vec())]
            }
        }
    }
}

impl Exchange {
    fn policy(&self) -> &Policy {
        self.engine.policy()
    }

    fn listing_ids(&self) -> Vec<Value> {
        let mut ids: Vec<Value> = self
            .calls
            .iter()
            .filter(|(_, p)| p.listing)
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(s) = &self.session {
            ids.extend(s.listing_ids());
        }
        ids
    }

    /// Whether the policy filters listings at all (then 2026-07-28 listings become private).
    fn per_caller(&self) -> bool {
        !self.policy().visible_all()
    }

    fn write(&self, rec: &Record) {
        if let Err(e) = self.audit.write_deferred(rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }

    /// A record of `event` about the server's message `method`/`id` on this exchange.
    fn server_record(&self, event: Event, method: Option<String>, id: Option<Value>) -> Record {
        let head = match (method, id) {
            (None, None) => self.base.clone(),
            (method, id) => Arc::new(self.base.with_message(MessagePart {
                method,
                id,
                ..MessagePart::default()
            })),
        };
        Record::new(event, head)
    }

    /// The record that closes the call `id` (of this exchange, else of its session), with the
    /// upstream's verdict.
    /// `None` when the call's record was closed already (by a cancellation, say).
    fn close(
        &mut self,
        id: &Value,
        status: Option<u16>,
        msg: Option<&ServerMessage>,
    ) -> Option<Record> {
        let local = self
            .calls
            .iter()
            .position(|(i, _)| i == id)
            .map(|pos| self.calls.remove(pos).1);
        let in_session = self.session.as_ref().and_then(|s| s.take_pending(id));
        let mut rec = match local.or(in_session) {
            Some(p) if !p.claim() => return None,
            Some(p) => {
                let mut rec = p.response();
                // A JSON-RPC error is the server saying it did not run the call.
                if msg.is_some_and(|m| m.error_code.is_some()) {
                    p.release_quota(&mut rec);
                }
                rec.answered(status, p.started)
            }
            None => self
                .server_record(Event::Response, None, Some(id.clone()))
                .because("answer to no call this agent forwarded")
                .answered(status, self.started),
        };
        if let Some(m) = msg {
            rec.is_error = Some(m.is_error);
            rec.error_code = m.error_code;
            rec.result_type = m.result_type.clone();
        }
        Some(rec)
    }

    /// Audit every message of an inspected body, and forget the calls it answered.
    fn record_messages(&mut self, inspected: &mcp::Inspected, status: u16) {
        self.params.learn(&inspected.designations);
        for m in &inspected.messages {
            match (m.kind, &m.id) {
                (Kind::Response, Some(id)) => {
                    if let (Some(v), Some(s)) = (&m.protocol_version, &self.session) {
                        s.set_revision(v.clone());
                    }
                    let Some(mut rec) = self.close(id, Some(status), Some(m)) else {
                        continue;
                    };
                    if let Some((_, f)) = inspected.filtered.iter().find(|(i, _)| i == id) {
                        rec.hidden_tools = Some(f.removed.clone());
                    }
                    self.write(&rec);
                }
                _ => {
                    let mut rec =
                        self.server_record(Event::ServerMessage, m.method.clone(), m.id.clone());
                    if m.kind == Kind::Response {
                        // An answer with a null or no id: its listing was filtered all the same.
                        if let Some((_, f)) = inspected.filtered.iter().find(|(i, _)| i.is_null()) {
                            rec.hidden_tools = Some(f.removed.clone());
                        }
                    }
                    self.write(&rec);
                }
            }
        }
        if let Some(why) = &inspected.unreadable {
            let rec = Record::new(Event::ServerMessage, self.base.clone())
                .because(format!("server message could not be read: {why}"));
            self.write(&rec);
        }
    }

    fn inspect(&self, text: &str) -> mcp::Inspected {
        let ids = self.listing_ids();
        let engine = self.engine.clone();
        let visible = move |t: &str| engine.policy().visible(t);
        mcp::inspect(
            text,
            &ListingRule {
                visible: &visible,
                listing_ids: &ids,
                per_caller: self.per_caller(),
            },
        )
    }

    /// Close every call of this exchange still open: `reason` says why no result came.
    /// `not_run`: the upstream certainly did not run them (an HTTP error), so their quota is
    /// given back.
    fn close_all(&mut self, status: Option<u16>, reason: &str, immediate: bool, not_run: bool) {
        for (id, p) in std::mem::take(&mut self.calls) {
            if let Some(s) = &self.session {
                s.take_pending(&id);
            }
            if !p.claim() {
                continue;
            }
            let mut rec = p.response();
            if not_run {
                p.release_quota(&mut rec);
            }
            let rec = rec.answered(status, p.started).because(reason);
            if immediate {
                if let Err(e) = self.audit.write(&rec) {
                    tracing::error!(error = %e, "writing an audit record failed");
                }
            } else {
                self.write(&rec);
            }
        }
    }

    /// Hand calls still open to the session: their answers may come on another stream
    /// (2025-11-25 resumption, HTTP+SSE). Without a session they are closed with `reason`.
    fn hand_over(&mut self, status: Option<u16>, reason: &str) {
        match &self.session {
            Some(s) => {
                for (id, p) in std::mem::take(&mut self.calls) {
                    if p.is_closed() {
                        continue;
                    }
                    if let Some(old) = s.add_pending(&id, p).filter(Pending::claim) {
                        let rec = old.response().because(
                            "no answer before the session's pending-call bound pushed it out",
                        );
                        self.write(&rec);
                    }
                }
            }
            None => self.close_all(status, reason, false, false),
        }
    }
}

/// Close the record of every call of a session that is ending.
pub fn close_session_calls(
    session: &Session,
    audit: &WorkerAudit,
    status: Option<u16>,
    reason: &str,
) {
    for p in session.drain_pending() {
        if !p.claim() {
            continue;
        }
        let rec = p.response().answered(status, p.started).because(reason);
        if let Err(e) = audit.write(&rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }
}

/// Whether a response is `text/event-stream`.
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// Read the server's response to a forwarded request.
pub async fn respond(resp: Response<Body>, mut ex: Exchange) -> Response<Body> {
    let status = resp.status();
    // A session starts to be tracked when the server confirms it: the initialize answer, or
    // (for sessions begun before this agent) any 2xx answer that names it.
    if let Some(id) = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|_| status.is_success())
    {
        if ex.session.is_none() {
            ex.session = Some(ex.sessions.streamable(SessionKey {
                server: ex.server,
                id: id.to_owned(),
            }));
        }
    }
    let encoded = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let sse = is_event_stream(resp.headers());
    // Anything else a 2xx carries is read as if it were JSON: a listing sent as `text/plain`
    // (or with no type) must not reach a lenient client unfiltered.
    let body_to_read =
        status.is_success() && status != StatusCode::ACCEPTED && status != StatusCode::NO_CONTENT;

    if body_to_read && encoded {
        // The request went out with `Accept-Encoding: identity`; a server that compresses
        // anyway cannot be read, so nothing of it reaches the client.
        ex.close_all(
            Some(status.as_u16()),
            "the server sent a compressed body that cannot be inspected; it was not forwarded",
            false,
            false,
        );
        return json_response(
            StatusCode::BAD_GATEWAY,
            mcp::error_response(
                None,
                mcp::INTERNAL_ERROR,
                "mcpwarden: the MCP server answered with a compressed body, which cannot be inspected; it was not forwarded",
            ),
        );
    }
    if status.is_success() && sse {
        let (mut head, body) = resp.into_parts();
        head.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(head, SseBody::new(body, ex).boxed());
    }
    if body_to_read {
        return json_body(resp, ex).await;
    }
    // No body to read: 202 (answers come on a stream), an HTTP error, anything else.
    if status == StatusCode::ACCEPTED {
        if let Some(batch) = &ex.batch {
            let any = batch.refusals().next().is_some();
            let refusals = json_array(batch.refusals());
            ex.hand_over(Some(status.as_u16()), "answered 202 with no result");
            if any {
                return json_response(StatusCode::OK, refusals);
            }
            return resp;
        }
        ex.hand_over(Some(status.as_u16()), "answered 202 with no result");
        return resp;
    }
    ex.close_all(
        Some(status.as_u16()),
        &format!("HTTP {} before any result", status.as_u16()),
        false,
        !status.is_success(),
    );
    resp
}

/// A JSON body: read whole, audited, listings filtered, batch refusals merged.
async fn json_body(resp: Response<Body>, mut ex: Exchange) -> Response<Body> {
    let status = resp.status().as_u16();
    let (mut head, body) = resp.into_parts();
    let held = ex.answers.clone();
    let mut charge = Charge::new(&held);
    let read = limits::collect(body, ex.max, &mut charge, ex.answers_max).await;
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            let (code, reason) = match e {
                Collect::OverBudget => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this worker already holds {} bytes of answers \
                         (limits.max_buffered_answer_bytes_per_worker): the answer was dropped",
                        ex.answers_max
                    ),
                ),
                Collect::TooLarge => (
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "the server's response could not be read whole: it exceeds {} bytes",
                        ex.max
                    ),
                ),
                Collect::Read(e) => (
                    StatusCode::BAD_GATEWAY,
                    format!("the server's response could not be read whole: {e}"),
                ),
            };
            ex.close_all(Some(status), &reason, false, false);
            return json_response(
                code,
                mcp::error_response(None, mcp::INTERNAL_ERROR, &format!("mcpwarden: {reason}")),
            );
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let inspected = ex.inspect(&text);
    ex.record_messages(&inspected, status);
    ex.hand_over(Some(status), "the response carried no answer to this call");
    let mut out = match &inspected.rewritten {
        Some(b) => Bytes::from(b.clone()),
        None => bytes,
    };
    if let Some(batch) = &ex.batch {
        out = Bytes::from(batch.merge(answer_elements(&out)));
    }
    if inspected.rewritten.is_some() || ex.batch.is_some() {
        head.headers.remove(header::CONTENT_LENGTH);
        if let Ok(v) = HeaderValue::from_str(&out.len().to_string()) {
            head.headers.insert(header::CONTENT_LENGTH, v);
        }
    }
    Response::from_parts(head, full(out))
}

/// Why an SSE stream is cut: what it carried cannot be let through.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("a second endpoint event on an HTTP+SSE stream")]
    SecondEndpoint,
    #[error("the HTTP+SSE endpoint {uri:?} is on another origin ({authority}), which is not a configured MCP endpoint: refused")]
    OtherOrigin { uri: String, authority: String },
    #[error("the HTTP+SSE endpoint {0:?} names another origin: refused")]
    NamesOtherOrigin(String),
}

/// HTTP+SSE state of a GET stream.
enum Legacy {
    /// No event yet: the first may be `endpoint`.
    Unknown,
    /// Not an HTTP+SSE stream.
    No,
    /// The announced session, and the events to inject into the stream.
    Yes(SessionKey, Arc<Session>, tokio::sync::mpsc::Receiver<Bytes>),
}

/// An SSE response body, passed on event by event.
pub struct SseBody {
    inner: Body,
    splitter: SseSplitter,
    out: VecDeque<Bytes>,
    ex: Exchange,
    legacy: Legacy,
    status: u16,
    /// The stream ended (normally or not): nothing more is read or closed on drop.
    done: bool,
    /// Counted open while this body lives.
    _open: crate::metrics::StreamGuard,
}

impl SseBody {
    fn new(inner: Body, ex: Exchange) -> SseBody {
        let mut out = VecDeque::new();
        if let Some(batch) = &ex.batch {
            for r in batch.refusals() {
                out.push_back(mcp::message_event(r));
            }
        }
        SseBody {
            _open: ex.metrics.sse_stream(),
            inner,
            splitter: SseSplitter::new(ex.max),
            out,
            legacy: if ex.get_stream {
                Legacy::Unknown
            } else {
                Legacy::No
            },
            status: 200,
            ex,
            done: false,
        }
    }

    /// Read one whole event; push what the client gets. Err: the stream must stop here.
    fn event(&mut self, ev: SseEvent) -> Result<(), Cut> {
        if matches!(self.legacy, Legacy::Unknown) {
            if ev.event.as_deref() == Some("endpoint") {
                self.endpoint(&ev)?;
                self.out.push_back(ev.raw);
                return Ok(());
            }
            if ev.data.is_some() {
                self.legacy = Legacy::No;
            }
        }
        let Some(data) = ev.data.as_deref().filter(|d| !d.trim().is_empty()) else {
            // Priming events, comments, retry: nothing to read.
            self.out.push_back(ev.raw);
            return Ok(());
        };
        if ev.event.as_deref() == Some("endpoint") {
            return Err(Cut::SecondEndpoint);
        }
        let inspected = self.ex.inspect(data);
        self.ex.record_messages(&inspected, self.status);
        match inspected.rewritten {
            None => self.out.push_back(ev.raw),
            Some(json) => {
                let mut e = Vec::with_capacity(json.len() + 64);
                if let Some(id) = &ev.id {
                    e.extend_from_slice(b"id: ");
                    e.extend_from_slice(id.as_bytes());
                    e.push(b'\n');
                }
                if let Some(t) = &ev.event {
                    e.extend_from_slice(b"event: ");
                    e.extend_from_slice(t.as_bytes());
                    e.push(b'\n');
                }
                e.extend_from_slice(b"data: ");
                e.extend_from_slice(&json);
                e.extend_from_slice(b"\n\n");
                self.out.push_back(Bytes::from(e));
            }
        }
        Ok(())
    }

    /// The first event of an HTTP+SSE stream: where to POST. Checked and registered.
    fn endpoint(&mut self, ev: &SseEvent) -> Result<(), Cut> {
        let uri = ev.data.as_deref().unwrap_or_default().trim();
        if let Some(rest) = uri.split_once("://").map(|(_, r)| r) {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let authority = authority.to_ascii_lowercase();
            if !self.ex.origins.contains(&authority) {
                return Err(Cut::OtherOrigin {
                    uri: uri.to_owned(),
                    authority,
                });
            }
        } else if uri.starts_with("//") {
            return Err(Cut::NamesOtherOrigin(uri.to_owned()));
        }
        let key = SessionKey {
            server: self.ex.server,
            id: legacy_session_id(uri),
        };
        let (session, rx) = self.ex.sessions.legacy(key.clone());
        self.ex.session = Some(session.clone());
        self.ex.base = Arc::new(Head {
            transport: Some(Transport::HttpSse),
            ..(*self.ex.base).clone()
        });
        let rec = self
            .ex
            .server_record(Event::ServerMessage, Some("endpoint".into()), None)
            .because(format!("HTTP+SSE session announced: POST endpoint {uri}"));
        self.ex.write(&rec);
        self.legacy = Legacy::Yes(key, session, rx);
        Ok(())
    }

    fn refuse_stream(&mut self, reason: String) {
        let rec = Record::new(Event::Refused, self.ex.base.clone())
            .denied(&*reason)
            .kind(Refusal::Malformed);
        if let Err(e) = self.ex.audit.write(&rec) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
        tracing::warn!(reason, "SSE stream cut");
        self.ex.close_all(Some(self.status), &reason, true, false);
    }

    fn finish(&mut self, clean: bool) {
        if self.done {
            return;
        }
        self.done = true;
        if self.splitter.pending() > 0 {
            let rec = Record::new(Event::ServerMessage, self.ex.base.clone()).because(format!(
                "the stream ended inside an event ({} bytes); clients discard it and so did mcpwarden",
                self.splitter.pending()
            ));
            let _ = self.ex.audit.write(&rec);
        }
        if clean {
            self.ex
                .hand_over(Some(self.status), "the stream ended before the result");
        } else {
            self.ex.close_all(
                Some(self.status),
                "the client disconnected before the result",
                true,
                false,
            );
        }
        if let Legacy::Yes(key, session, _) = &self.legacy {
            // The session's answers could only come on this stream.
            self.ex.sessions.remove(key, Some(session));
            let reason = if clean {
                "the HTTP+SSE stream ended before the result"
            } else {
                "the client closed its HTTP+SSE stream before the result"
            };
            close_session_calls(session, &self.ex.audit, Some(self.status), reason);
        }
    }
}

/// The session key of an HTTP+SSE endpoint URI: its `session_id` (Python SDK) or `sessionId`
/// (TypeScript SDK) query parameter, else the whole URI.
pub fn legacy_session_id(uri: &str) -> String {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "session_id" || k == "sessionId").then(|| v.to_owned())
        })
        .unwrap_or_else(|| uri.to_owned())
}

impl Drop for SseBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away.
        self.finish(false);
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Legacy::Yes(_, _, rx) = &mut this.legacy {
                if let Poll::Ready(Some(ev)) = rx.poll_recv(cx) {
                    this.out.push_back(ev);
                    continue;
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers: nothing to read in them.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let events = match this.splitter.push(&frame) {
                        Ok(ev) => ev,
                        Err(e) => {
                            this.refuse_stream(format!("{e}: the stream was cut"));
                            this.done = true;
                            return Poll::Ready(None);
                        }
                    };
                    for ev in events {
                        if let Err(reason) = this.event(ev) {
                            this.refuse_stream(reason.to_string());
                            this.done = true;
                            // Whatever was complete before the refused event still goes out.
                            break;
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish(true);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    // An event whose blank line was a lone CR ends with the stream.
                    if let Some(ev) = this.splitter.finish() {
                        if let Err(reason) = this.event(ev) {
                            this.refuse_stream(reason.to_string());
                            this.done = true;
                            continue;
                        }
                    }
                    this.finish(true)
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_session_ids() {
        assert_eq!(legacy_session_id("/messages/?session_id=abc"), "abc");
        assert_eq!(legacy_session_id("/messages?x=1&sessionId=def#f"), "def");
        assert_eq!(legacy_session_id("/m"), "/m");
    }

    #[test]
    fn batch_merge_keeps_the_clients_order() {
        let b = Batch {
            elements: vec![
                BatchElement::Forwarded(Some(Value::from(1))),
                BatchElement::Refused(Some(br#"{"id":2,"refused":true}"#.to_vec())),
                BatchElement::Forwarded(None),
                BatchElement::Forwarded(Some(Value::from(3))),
            ],
        };
        let merged = b.merge(answer_elements(
            br#"[{"id":3,"x":[1, 2]} ,{"id":1},{"id":9}]"#,
        ));
        assert_eq!(
            String::from_utf8(merged).unwrap(),
            r#"[{"id":1},{"id":2,"refused":true},{"id":3,"x":[1, 2]},{"id":9}]"#,
            "order and bytes kept"
        );
    }
}

#[cfg(test)]
mod stream_tests {
    //! The SSE body against a scripted upstream: events pass whole and in order, listings are
    //! filtered, HTTP+SSE refusals land between whole events, foreign endpoints cut the stream,
    //! and every call's record is closed.

    use super::*;
    use crate::audit::AuditLog;
    use crate::policy::{Engine, Policy};
    use http_body_util::BodyExt;

    /// An upstream body fed by the test.
    struct ChanBody(tokio::sync::mpsc::UnboundedReceiver<Result<Frame<Bytes>, hyper::Error>>);

    impl http_body::Body for ChanBody {
        type Data = Bytes;
        type Error = hyper::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            self.0.poll_recv(cx)
        }
    }

    struct Rig {
        audit: Arc<WorkerAudit>,
        ex: Exchange,
        log: std::path::PathBuf,
        tx: tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, hyper::Error>>,
        body: Body,
    }

    fn rig(name: &str, get_stream: bool, calls: &[(i64, &str)]) -> Rig {
        let dir =
            std::env::temp_dir().join(format!("mcpwarden-respond-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let audit = WorkerAudit::new(Arc::new(AuditLog::open(&log).unwrap()));
        let policy = Policy::parse(
            r#"{"version":"1","default":"deny","tools":{"echo":{},"drop":{"action":"deny"}}}"#,
            "p.json",
        )
        .unwrap();
        let calls = calls
            .iter()
            .map(|(id, method)| {
                let head = Head::default().with_message(MessagePart {
                    id: Some(Value::from(*id)),
                    method: Some((*method).to_owned()),
                    ..MessagePart::default()
                });
                (
                    Value::from(*id),
                    Pending::new(
                        Arc::new(head),
                        Instant::now(),
                        *method == "tools/list",
                        None,
                    ),
                )
            })
            .collect();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Rig {
            audit: audit.clone(),
            ex: Exchange {
                base: Arc::default(),
                calls,
                batch: None,
                engine: Arc::new(Engine::new(policy)),
                params: Arc::default(),
                session: None,
                sessions: Arc::default(),
                server: 0,
                origins: vec!["127.0.0.1:9".into()],
                started: Instant::now(),
                max: 1 << 16,
                answers: Arc::default(),
                answers_max: 1 << 20,
                audit,
                get_stream,
                metrics: Arc::new(crate::metrics::Metrics::new(
                    1,
                    Vec::new(),
                    &[],
                    crate::admin::health::Health::default(),
                )),
            },
            log,
            tx,
            body: ChanBody(rx).boxed(),
        }
    }

    fn records(audit: &WorkerAudit, path: &std::path::Path) -> Vec<Value> {
        audit.flush().unwrap();
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn next(body: &mut SseBody) -> Option<Bytes> {
        body.frame().await.map(|f| f.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn events_split_anywhere_pass_whole_and_listings_are_filtered() {
        let r = rig("split", false, &[(1, "tools/list"), (2, "tools/call")]);
        let mut body = SseBody::new(r.body, r.ex);
        let stream = concat!(
            ": c\n\n",
            "event: message\nid: 5\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"echo\"},{\"name\":\"hidden\"}]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":2,\n",
            "data: \"result\":{\"content\":[],\"isError\":true}}\n\n",
        );
        for b in stream.as_bytes().chunks(3) {
            r.tx.send(Ok(Frame::data(Bytes::copy_from_slice(b))))
                .unwrap();
        }
        drop(r.tx);
        let mut got = Vec::new();
        while let Some(b) = next(&mut body).await {
            got.push(String::from_utf8(b.to_vec()).unwrap());
        }
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], ": c\n\n");
        assert!(got[1].starts_with("event: message\nid: 5\n"), "{got:?}");
        assert!(
            got[2].contains("\"echo\"") && !got[2].contains("hidden"),
            "{got:?}"
        );
        assert!(got[3].contains("isError"), "{got:?}");
        drop(body);
        let recs = records(&r.audit, &r.log);
        let listing = recs.iter().find(|r| r["id"] == 1).unwrap();
        assert_eq!(listing["hidden_tools"], serde_json::json!(["hidden"]));
        let call = recs.iter().find(|r| r["id"] == 2).unwrap();
        assert_eq!(call["is_error"], true);
        assert!(recs
            .iter()
            .any(|r| r["event"] == "server_message" && r["method"] == "notifications/progress"));
    }

    /// Only a server's 2xx answer makes a session tracked: ids a client makes up (answered
    /// 404) create nothing.
    #[tokio::test]
    async fn only_a_confirmed_session_is_tracked() {
        for (status, tracked) in [(StatusCode::NOT_FOUND, 0), (StatusCode::OK, 1)] {
            let r = rig("confirm", false, &[]);
            let sessions = r.ex.sessions.clone();
            let mut resp = Response::new(full(Bytes::from_static(b"{}")));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert("mcp-session-id", HeaderValue::from_static("made-up"));
            let _ = respond(resp, r.ex).await;
            assert_eq!(sessions.count(), tracked, "{status}");
        }
    }

    /// A listing sent with another content type is read and filtered all the same.
    #[tokio::test]
    async fn a_listing_in_text_plain_is_filtered_too() {
        let r = rig("plain", false, &[(1, "tools/list")]);
        let listing =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"},{"name":"hidden"}]}}"#;
        let mut resp = Response::new(full(Bytes::from_static(listing.as_bytes())));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let out = respond(resp, r.ex).await;
        let body = out.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"]["tools"], serde_json::json!([{"name": "echo"}]));
    }

    /// A listing answered with a null id is filtered, and its record names what was hidden.
    #[tokio::test]
    async fn a_listing_with_a_null_id_is_filtered_and_audited() {
        let r = rig("null-id", false, &[]);
        let listing =
            r#"{"jsonrpc":"2.0","id":null,"result":{"tools":[{"name":"echo"},{"name":"hidden"}]}}"#;
        let resp = Response::new(full(Bytes::from_static(listing.as_bytes())));
        let out = respond(resp, r.ex).await;
        let body = out.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"]["tools"], serde_json::json!([{"name": "echo"}]));
        let recs = records(&r.audit, &r.log);
        let rec = recs
            .iter()
            .find(|r| r["event"] == "server_message")
            .expect("a server_message record");
        assert_eq!(rec["hidden_tools"], serde_json::json!(["hidden"]), "{rec}");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_closes_the_calls_record() {
        let r = rig("gone", false, &[(7, "tools/call")]);
        let mut body = SseBody::new(r.body, r.ex);
        r.tx.send(Ok(Frame::data(Bytes::from_static(
            b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
        ))))
        .unwrap();
        assert!(next(&mut body).await.is_some());
        drop(body);
        let recs = records(&r.audit, &r.log);
        let closed = recs.iter().find(|r| r["id"] == 7).expect("record closed");
        assert_eq!(
            closed["reason"],
            "the client disconnected before the result"
        );
    }

    #[tokio::test]
    async fn http_sse_refusals_go_between_whole_events() {
        let r = rig("legacy", true, &[]);
        let sessions = r.ex.sessions.clone();
        let mut body = SseBody::new(r.body, r.ex);
        r.tx.send(Ok(Frame::data(Bytes::from_static(
            b"event: endpoint\ndata: /messages/?session_id=abc\n\n",
        ))))
        .unwrap();
        assert!(next(&mut body)
            .await
            .unwrap()
            .starts_with(b"event: endpoint"));
        let session = sessions
            .get(&SessionKey {
                server: 0,
                id: "abc".into(),
            })
            .expect("session registered");
        // Half an event from the server, then a refusal to inject: it must wait.
        r.tx.send(Ok(Frame::data(Bytes::from_static(
            b"event: message\ndata: {\"jsonrpc\":\"2.0\",",
        ))))
        .unwrap();
        assert!(session.inject(mcp::message_event(b"{\"refusal\":1}")));
        let first = next(&mut body).await.unwrap();
        assert_eq!(&first[..], b"event: message\ndata: {\"refusal\":1}\n\n");
        r.tx.send(Ok(Frame::data(Bytes::from_static(
            b"\"method\":\"ping\",\"id\":9}\n\n",
        ))))
        .unwrap();
        let second = next(&mut body).await.unwrap();
        assert_eq!(
            &second[..],
            b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":9}\n\n"
        );
        drop(body);
        assert!(!session.inject(Bytes::from_static(b"x")), "stream gone");
    }

    #[tokio::test]
    async fn an_endpoint_on_another_origin_cuts_the_stream() {
        let r = rig("foreign", true, &[]);
        let mut body = SseBody::new(r.body, r.ex);
        r.tx.send(Ok(Frame::data(Bytes::from_static(
            b"event: endpoint\ndata: http://127.0.0.254:9/messages/?session_id=x\n\n",
        ))))
        .unwrap();
        assert!(next(&mut body).await.is_none(), "nothing forwarded");
        drop(body);
        let recs = records(&r.audit, &r.log);
        assert!(recs
            .iter()
            .any(|r| r["event"] == "refused"
                && r["reason"].as_str().unwrap().contains("another origin")));
    }
}

/// A `text/event-stream` answer whose events come from `rx`; it ends when every sender is
/// gone.
pub(super) fn event_stream(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, hyper::Error>(Frame::data(event)), rx))
    });
    let mut resp = Response::new(http_body_util::StreamBody::new(frames).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// An answer (the server's, already read through [`respond`], or mcpwarden's own) written as
/// events on a stream that was answered before it was known: an SSE body frame by frame, a
/// JSON body as one `message` event, anything else as a JSON-RPC error for `id`.
pub(super) async fn pump_as_events(
    resp: Response<Body>,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    id: Option<&Value>,
) {
    let status = resp.status();
    let kind = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let mut body = resp.into_body();
    if status.is_success() && kind.starts_with("text/event-stream") {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    return;
                }
            }
        }
        return;
    }
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let json = if status.is_success() && kind.starts_with("application/json") && !bytes.is_empty() {
        bytes.to_vec()
    } else {
        mcp::error_response(
            id,
            mcp::INTERNAL_ERROR,
            &format!("the call's answer was HTTP {status}, which this stream cannot carry"),
        )
    };
    let _ = tx.send(mcp::message_event(&json)).await;
}
