//! One MCP request body (a message or a batch), in named steps: parse it strictly, check its
//! `Mcp-Param-*` headers, decide every message against the caller's policy, audit each decision
//! before anything is forwarded, answer the refused messages, and forward the rest — the
//! answers are read on the way back ([`super::respond`]).

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, request::Parts, Method, Response, StatusCode};
use serde_json::Value;

use super::{
    choose::Chosen,
    conn::Conn,
    context::{RequestCtx, Routed},
    forward::identity_encoding,
    reply::{accepted, full, json_response},
    respond::{self, Batch, BatchElement, Exchange},
    session::{Pending, Session, SessionKey},
    upstream::Body,
};
use crate::{
    audit::{Aggregated, Event, Head, MessagePart, PolicyRef, Record, Refusal, Transport, Verdict},
    identity,
    mcp::{self, Kind, Message, Parsed},
    policy::{Call, CallerScope, Decision, Engine, Outcome},
};

/// What the policy said about one message.
pub(super) struct Judged {
    pub msg: Message,
    pub decision: Option<Decision>,
    /// The head of every record about this message.
    pub head: Arc<Head>,
    /// mcpwarden's own answer in place of a refusal (user approval's `input_required`).
    pub answer: Option<Vec<u8>>,
    /// An approved retry of a user approval: the server's own `requestState` and
    /// `inputResponses` to forward in place of mcpwarden's.
    pub round_trip: Option<(Option<Value>, Option<Value>)>,
}

impl Judged {
    fn refused(&self) -> bool {
        self.decision
            .as_ref()
            .is_some_and(|d| d.outcome != Outcome::Allow)
    }

    /// The rule's approval settings, when the policy holds this call for an approval.
    pub(super) fn held_for(&self) -> Option<&crate::policy::Approval> {
        self.decision
            .as_ref()
            .filter(|d| d.outcome == Outcome::ApprovalRequired)
            .and_then(|d| d.approval.as_deref())
    }
}

/// A request's scope keys (`grant`, `process`, `session`, `namespace`, `service_account`).
pub(super) struct ScopeKeys {
    pub grant: String,
    process: String,
    pub session: String,
    /// `session` names an MCP session (not the connection).
    pub in_session: bool,
    namespace: String,
    service_account: String,
}

impl ScopeKeys {
    pub(super) fn scope(&self) -> CallerScope<'_> {
        CallerScope {
            grant: &self.grant,
            process: &self.process,
            session: &self.session,
            namespace: &self.namespace,
            service_account: &self.service_account,
        }
    }
}

/// The messages of one body, sorted after their decisions were audited.
struct Plan {
    /// Per message, in the client's order: refused (with mcpwarden's answer) or forwarded.
    elements: Vec<BatchElement>,
    /// Positions of the forwarded messages.
    forwarded: Vec<usize>,
    /// A single approved retry of a user approval: its round-trip fields to forward.
    round_trip: Option<(Option<Value>, Option<Value>)>,
    /// Forwarded requests, waiting for their answers.
    calls: Vec<(Value, Pending)>,
}

impl Plan {
    fn refused_any(&self) -> bool {
        self.forwarded.len() < self.elements.len()
    }
}

/// The sessions one request belongs to (not the shared table, `session::Sessions`).
struct RequestSessions {
    /// HTTP+SSE: answers go on its GET stream.
    legacy: Option<Arc<Session>>,
    /// The `Mcp-Session-Id` session, when the server confirmed it.
    header: Option<(SessionKey, Arc<Session>)>,
}

impl RequestSessions {
    fn any(&self) -> Option<&Arc<Session>> {
        self.legacy
            .as_ref()
            .or(self.header.as_ref().map(|(_, s)| s))
    }
}

/// A body's messages, parsed and decided, before any is held, audited or forwarded.
pub(super) struct Decided {
    sessions: RequestSessions,
    batch: bool,
    transport: Transport,
    session_revision: Option<String>,
    chosen: Chosen,
    judged: Vec<Judged>,
    keys: ScopeKeys,
}

impl Conn {
    pub(super) async fn handle_mcp(
        self: &Arc<Self>,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        parts: Parts,
        bytes: Bytes,
    ) -> Response<Body> {
        let sessions = RequestSessions {
            legacy: ctx.legacy.clone(),
            header: self.header_session(routed.id, &parts.headers),
        };
        let (batch, msgs) = match self.parse(ctx, routed, &parts, &bytes, &sessions) {
            Ok(parsed) => parsed,
            Err(refusal) => return *refusal,
        };
        let transport = if sessions.legacy.is_some() {
            Transport::HttpSse
        } else if msgs.iter().any(|m| m.stateless_2026) {
            Transport::StatelessHttp
        } else {
            Transport::StreamableHttp
        };
        let session_revision = sessions.any().and_then(|s| s.revision());
        let chosen = self.choose_policy(routed).await;
        let deciding = Instant::now();
        let keys = self.scope_keys(ctx, &chosen, &sessions);
        let judged = self.decide(
            ctx,
            routed,
            &chosen,
            &keys,
            msgs,
            transport,
            &session_revision,
        );
        self.shared.metrics.decided(deciding.elapsed());
        let decided = Decided {
            sessions,
            batch,
            transport,
            session_revision,
            chosen,
            judged,
            keys,
        };
        if self.waits_with_progress(&parts, &decided) {
            return self.finish_streaming(ctx, routed, parts, bytes, decided);
        }
        self.finish(ctx, routed, parts, bytes, decided, None).await
    }

    /// A single call held for an operator, whose Streamable HTTP client sent a progress token
    /// and reads SSE: it is answered on a stream at once, progress notifications while it
    /// waits, then the answer (its client would otherwise time out in silence).
    fn waits_with_progress(&self, parts: &Parts, d: &Decided) -> bool {
        let [j] = d.judged.as_slice() else {
            return false;
        };
        let Some(approval) = j.held_for() else {
            return false;
        };
        let asks_user = approval.mode == crate::policy::ApprovalMode::User
            && j.msg.stateless_2026
            && j.msg.elicitation
            && !d.batch;
        let reads_sse = parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")));
        !d.batch
            && !asks_user
            && d.sessions.legacy.is_none()
            && j.msg.progress_token.is_some()
            && reads_sse
    }

    /// [`Conn::finish`] in a task of its own, its answer written on an SSE stream returned now.
    /// The stream's reader going (the client disconnected) drops the task: a held call is then
    /// given up, exactly as when a request's connection closes.
    fn finish_streaming(
        self: &Arc<Self>,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        parts: Parts,
        bytes: Bytes,
        decided: Decided,
    ) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let conn = self.clone();
        let detached = ctx.detach();
        let server = routed.id;
        let call_id = decided.judged.first().and_then(|j| j.msg.id.clone());
        tokio::spawn(async move {
            let ctx = detached.attach(&conn);
            let Some(routed) = conn.shared.servers.get(server).map(|server_ref| Routed {
                id: server,
                server: server_ref,
            }) else {
                return;
            };
            let sink = super::hold::ProgressSink::Stream(tx.clone());
            let work = conn.finish(&ctx, routed, parts, bytes, decided, Some(sink));
            // The reader going ends the task at any point: while held, while forwarding, or
            // while the answer streams (which then stops being read from the server).
            tokio::select! {
                () = async {
                    let resp = work.await;
                    respond::pump_as_events(resp, &tx, call_id.as_ref()).await;
                } => {}
                () = tx.closed() => {}
            }
        });
        respond::event_stream(rx)
    }

    /// Steps 2b to 5: held calls approved (or not), every decision audited, refusals answered,
    /// the rest forwarded and its answer read.
    async fn finish(
        &self,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        mut parts: Parts,
        bytes: Bytes,
        decided: Decided,
        sink: Option<super::hold::ProgressSink>,
    ) -> Response<Body> {
        let Decided {
            sessions,
            batch,
            transport,
            session_revision,
            chosen,
            judged,
            keys,
        } = decided;
        let (chosen, judged) = if judged.iter().any(|j| j.held_for().is_some()) {
            let sink = sink.or_else(|| {
                sessions
                    .legacy
                    .clone()
                    .map(super::hold::ProgressSink::Legacy)
            });
            self.approve_held(
                routed,
                chosen,
                judged,
                sessions.legacy.is_none() && !batch,
                sink.as_ref(),
                &keys,
            )
            .await
        } else {
            (chosen, judged)
        };
        let plan = match self.audit_decisions(&chosen, judged, &sessions, ctx.started) {
            Ok(plan) => plan,
            Err(refusal) => return *refusal,
        };
        if let Some(answer) = self.answer_alone(&plan, batch, &sessions) {
            return answer;
        }

        // What goes on: the body as it came, or the batch without its refused elements, or an
        // approved retry as the original call.
        let rewritten = match &plan.round_trip {
            Some((state, responses)) => Some((
                mcp::with_round_trip(&bytes, state.as_ref(), responses.as_ref()),
                "the approved call could not be rewritten",
            )),
            None if plan.refused_any() => Some((
                mcp::batch_subset(&bytes, &plan.forwarded),
                "the batch could not be split",
            )),
            None => None,
        };
        let body = match rewritten {
            None => bytes,
            Some((Some(b), _)) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Bytes::from(b)
            }
            Some((None, why)) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    mcp::error_response(
                        None,
                        mcp::INVALID_REQUEST,
                        &format!("Invalid Request: {why}"),
                    ),
                )
            }
        };
        identity_encoding(&mut parts.headers);
        let base = Arc::new(Head {
            transport: Some(transport),
            revision: session_revision,
            ..(*ctx.head).clone()
        });
        let refused_any = plan.refused_any();
        let Plan {
            elements, calls, ..
        } = plan;
        let batch =
            (batch && sessions.legacy.is_none() && refused_any).then_some(Batch { elements });
        let session = sessions.any().cloned();
        // The session holds the calls too: HTTP+SSE answers come on the GET stream (possibly
        // before the POST's 202), Streamable HTTP ones may come on a resumed stream, and a
        // cancellation arrives in another POST.
        if let Some(s) = &session {
            for (id, p) in &calls {
                s.add_pending(id, p.clone());
            }
        }
        let exchange = Exchange {
            calls,
            batch,
            ..self.exchange(ctx, routed, &parts, chosen.engine.clone(), base, session)
        };
        match self.send(parts, full(body)).await {
            Ok(resp) => respond::respond(resp, exchange).await,
            Err(failed) => {
                let reason = failed.audit_reason();
                let status = failed.response.status().as_u16();
                for (id, p) in exchange.calls {
                    if let Some(s) = &exchange.session {
                        s.take_pending(&id);
                    }
                    if !p.claim() {
                        continue;
                    }
                    let mut rec = Record::new(Event::Response, p.head.clone());
                    // The request never reached the server: the calls did not run.
                    if failed.not_sent {
                        p.release_quota(&mut rec);
                    }
                    let rec = rec.answered(Some(status), ctx.started).because(&*reason);
                    self.write_audit_deferred(&rec);
                }
                failed.response
            }
        }
    }

    /// Step 1: the body, strictly parsed, and its `Mcp-Param-*` headers checked. Err: the
    /// refusal, audited (and on HTTP+SSE, answered on the stream).
    fn parse(
        &self,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        parts: &Parts,
        bytes: &[u8],
        sessions: &RequestSessions,
    ) -> Result<(bool, Vec<Message>), Box<Response<Body>>> {
        let parsed = match mcp::parse_body(bytes, &parts.headers) {
            Ok(p) => p,
            Err(e) => {
                let head = Head {
                    transport: Some(if sessions.legacy.is_some() {
                        Transport::HttpSse
                    } else {
                        Transport::StreamableHttp
                    }),
                    message: Some(MessagePart {
                        id: e.id.clone(),
                        ..MessagePart::default()
                    }),
                    ..(*ctx.head).clone()
                };
                self.write_audit(
                    &Record::new(Event::Refused, Arc::new(head))
                        .denied(e.message.clone())
                        .kind(Refusal::Malformed),
                );
                if let (Some(s), Some(_)) = (&sessions.legacy, &e.id) {
                    // An HTTP+SSE client reads answers on its stream only.
                    if s.inject(mcp::message_event(&e.response_body())) {
                        return Err(Box::new(accepted()));
                    }
                }
                return Err(Box::new(json_response(e.status, e.response_body())));
            }
        };
        Ok(match parsed {
            Parsed::Single(m) => {
                if let Err(e) = check_param_headers(routed, &m, &parts.headers) {
                    let head = ctx.head.with_message(message_part(&m));
                    self.write_audit(
                        &Record::new(Event::Refused, Arc::new(head))
                            .denied(e.message.clone())
                            .kind(Refusal::Malformed),
                    );
                    return Err(Box::new(json_response(e.status, e.response_body())));
                }
                (false, vec![m])
            }
            Parsed::Batch(ms) if ms.len() > self.shared.limits.max_batch => {
                let msg = format!(
                    "Invalid Request: the batch has {} messages, more than the {} accepted \
                     (limits.max_batch); it was not forwarded",
                    ms.len(),
                    self.shared.limits.max_batch
                );
                let mut rec = Record::new(Event::Refused, ctx.head.clone())
                    .denied(&*msg)
                    .kind(Refusal::TooLarge);
                rec.status = Some(StatusCode::PAYLOAD_TOO_LARGE.as_u16());
                self.write_audit(&rec);
                return Err(Box::new(json_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    mcp::error_response(None, mcp::INVALID_REQUEST, &msg),
                )));
            }
            Parsed::Batch(ms) => (true, ms),
        })
    }

    /// The caller's scope keys for this request.
    fn scope_keys(
        &self,
        ctx: &RequestCtx<'_>,
        chosen: &Chosen,
        sessions: &RequestSessions,
    ) -> ScopeKeys {
        let caller = &self.caller;
        let pod = chosen.pod.as_deref().map(|p| &p.meta);
        let grant = caller.grant_key(pod);
        let (namespace, service_account) = match pod {
            Some(pod) => (
                identity::namespace_key(pod),
                identity::service_account_key(pod),
            ),
            // A pod not known yet (the API server unreachable): one shared count for all such
            // callers, never a fresh one per cgroup that a namespace quota would not see.
            None if chosen.in_pod => (
                identity::UNKNOWN_NAMESPACE.to_owned(),
                identity::UNKNOWN_SERVICE_ACCOUNT.to_owned(),
            ),
            None => (grant.clone(), grant.clone()),
        };
        // Revisions without sessions count a `session` limit per connection.
        let session = match (&sessions.header, &sessions.legacy) {
            (Some((key, _)), _) => identity::session_key(&key.id),
            (None, Some(_)) => identity::session_key(&ctx.target),
            (None, None) => identity::connection_key(self.id),
        };
        ScopeKeys {
            grant,
            process: caller.process_key(),
            in_session: sessions.header.is_some() || sessions.legacy.is_some(),
            session,
            namespace,
            service_account,
        }
    }

    /// Step 2: every tool call decided against the chosen policy, at one instant, under the
    /// caller's scope keys; each message gets the head of its records. A cancellation also
    /// gives up the cancelled call's approval, if it is held.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        chosen: &Chosen,
        keys: &ScopeKeys,
        msgs: Vec<Message>,
        transport: Transport,
        session_revision: &Option<String>,
    ) -> Vec<Judged> {
        let scope = keys.scope();
        let now = Instant::now();
        msgs.into_iter()
            .map(|msg| {
                if let Some(cancelled) = &msg.cancels {
                    // Without a session the cancellation comes on another connection than the
                    // held call: any of this caller's calls on this server with that id.
                    let session = keys.in_session.then_some(keys.session.as_str());
                    self.shared.approvals.cancel(
                        &keys.grant,
                        &routed.server.name,
                        session,
                        &cancelled.to_string(),
                    );
                }
                let decision = match (msg.is_tool_call(), &msg.tool, &chosen.unresolved) {
                    (true, Some(_), Some(refusal)) => Some(refusal.clone()),
                    (true, Some(tool), None) => Some(chosen.engine.decide_call(
                        &Call {
                            tool,
                            arguments: msg.arguments.as_ref(),
                        },
                        &scope,
                        now,
                    )),
                    _ => None,
                };
                let revision = msg
                    .revision
                    .clone()
                    .or_else(|| session_revision.clone())
                    .or_else(|| {
                        (transport == Transport::StreamableHttp).then(|| "2025-03-26".to_owned())
                    });
                let head = Head {
                    transport: Some(transport),
                    revision,
                    message: Some(MessagePart {
                        // `log_arguments: true` servers only, redacted.
                        arguments: self.audit.arguments(
                            ctx.routed.map(|r| r.server.name.as_str()),
                            msg.arguments.as_ref().filter(|_| msg.tool.is_some()),
                        ),
                        ..message_part(&msg)
                    }),
                    ..(*ctx.head).clone()
                };
                Judged {
                    msg,
                    decision,
                    head: Arc::new(head),
                    answer: None,
                    round_trip: None,
                }
            })
            .collect()
    }

    /// Step 3: every decision audited — refusals at once, forwarded messages before they go
    /// (a failed write refuses the request) — and the messages sorted into what mcpwarden
    /// answers and what it forwards.
    fn audit_decisions(
        &self,
        chosen: &Chosen,
        judged: Vec<Judged>,
        sessions: &RequestSessions,
        started: Instant,
    ) -> Result<Plan, Box<Response<Body>>> {
        let batch = judged.len() > 1;
        let mut plan = Plan {
            elements: Vec::with_capacity(judged.len()),
            forwarded: Vec::new(),
            calls: Vec::new(),
            round_trip: None,
        };
        // Every decision record reaches the kernel before the request is forwarded: a batch's
        // in one write. A batch's notifications and responses share one record.
        let mut records = Vec::new();
        let mut shared: Option<(Arc<Head>, Aggregated)> = None;
        let first_id = judged.iter().find_map(|j| j.msg.id.clone());
        for (index, j) in judged.into_iter().enumerate() {
            if j.refused() {
                self.write_audit(&decision_record(Event::Refused, chosen, &j));
                plan.elements.push(BatchElement::Refused(refusal(&j)));
                continue;
            }
            if batch && j.msg.kind != Kind::Request {
                let (_, agg) = shared.get_or_insert_with(|| {
                    let head = Arc::new(Head {
                        message: None,
                        ..(*j.head).clone()
                    });
                    (head, Aggregated::default())
                });
                agg.add(j.msg.kind == Kind::Notification, j.msg.method.as_deref());
            } else {
                records.push(decision_record(Event::Request, chosen, &j));
            }
            if let (Some(cancelled), Some(s)) = (&j.msg.cancels, sessions.any()) {
                self.close_cancelled(s, cancelled);
            }
            plan.elements.push(BatchElement::Forwarded(
                j.msg.id.clone().filter(|_| j.msg.kind == Kind::Request),
            ));
            plan.forwarded.push(index);
            if !batch {
                plan.round_trip = j.round_trip.clone();
            }
            if let (Kind::Request, Some(id)) = (j.msg.kind, &j.msg.id) {
                let listing = j
                    .msg
                    .method
                    .as_deref()
                    .is_some_and(|m| mcp::is_method(m, "tools/list"));
                let quota = j.decision.as_ref().and_then(|d| d.reservation.clone());
                plan.calls.push((
                    id.clone(),
                    Pending::new(j.head.clone(), started, listing, quota),
                ));
            }
        }
        if let Some((head, agg)) = shared {
            let mut rec = Record::new(Event::Request, head);
            rec.decision = Some(Verdict::Allow);
            rec.aggregated = Some(agg);
            records.push(rec);
        }
        self.audit_all_before_forwarding(&records, first_id.as_ref())?;
        Ok(plan)
    }

    /// Step 4: when nothing is forwarded (or on HTTP+SSE, whatever is refused), mcpwarden
    /// answers: in the POST's response, or on the HTTP+SSE stream, where the client reads its
    /// answers. None: the rest goes to the server.
    fn answer_alone(
        &self,
        plan: &Plan,
        batch: bool,
        sessions: &RequestSessions,
    ) -> Option<Response<Body>> {
        if let Some(s) = &sessions.legacy {
            // HTTP+SSE: every answer goes on the stream; the POST itself only gets 202.
            for e in &plan.elements {
                if let BatchElement::Refused(Some(answer)) = e {
                    if !s.inject(mcp::message_event(answer)) {
                        tracing::warn!("the HTTP+SSE stream of this session is gone or full: refusal answered in the POST body");
                        return Some(json_response(StatusCode::OK, answer.clone()));
                    }
                }
            }
            return plan.forwarded.is_empty().then(accepted);
        }
        if !plan.forwarded.is_empty() {
            return None;
        }
        // Nothing forwarded: mcpwarden answers alone, with the bytes it wrote.
        let mut refusals = plan
            .elements
            .iter()
            .filter_map(|e| match e {
                BatchElement::Refused(v) => v.as_deref(),
                BatchElement::Forwarded(_) => None,
            })
            .peekable();
        if refusals.peek().is_none() {
            return Some(accepted());
        }
        let body = if batch {
            respond::json_array(refusals)
        } else {
            refusals.next().map(<[u8]>::to_vec).unwrap_or_default()
        };
        Some(json_response(StatusCode::OK, body))
    }

    /// The client cancelled a call: its record is closed now (its answer, if any still
    /// comes, is no longer awaited).
    fn close_cancelled(&self, session: &Session, id: &Value) {
        if let Some(p) = session.pending(id).filter(Pending::claim) {
            let rec = Record::new(Event::Response, p.head.clone())
                .answered(None, p.started)
                .because("cancelled by the client (notifications/cancelled)");
            self.write_audit_deferred(&rec);
        }
    }

    /// What the answer to a forwarded request is read against.
    pub(super) fn exchange(
        &self,
        ctx: &RequestCtx<'_>,
        routed: Routed<'_>,
        parts: &Parts,
        engine: Arc<Engine>,
        base: Arc<Head>,
        session: Option<Arc<Session>>,
    ) -> Exchange {
        // Only a GET's stream can announce an HTTP+SSE endpoint, whose origin is checked.
        let origins = if parts.method == Method::GET {
            self.origins(parts)
        } else {
            Vec::new()
        };
        Exchange {
            base,
            calls: Vec::new(),
            batch: None,
            engine,
            params: routed.server.params.clone(),
            session,
            sessions: self.shared.sessions.clone(),
            server: routed.id,
            origins,
            started: ctx.started,
            max: self.shared.max_body.max(respond::MIN_RESPONSE_BOUND),
            answers: self.upstream.answers.clone(),
            answers_max: self.shared.limits.max_buffered_answer_bytes_per_worker,
            audit: self.audit.clone(),
            get_stream: false,
            metrics: self.shared.metrics.clone(),
        }
    }
}

/// `Mcp-Param-*` headers of a call must mirror its arguments as the tool's listing
/// designated. A call whose tool was never seen in a listing cannot be checked: it passes
/// (the server still checks; the policy decides on the body either way).
fn check_param_headers(
    routed: Routed<'_>,
    m: &Message,
    headers: &http::HeaderMap,
) -> Result<(), mcp::ParseError> {
    let Some(tool) = m.tool.as_deref().filter(|_| m.is_tool_call()) else {
        return Ok(());
    };
    match routed.server.params.get(tool) {
        Some(d) => mcp::check_param_headers(&d, m, headers),
        None if mcp::has_param_headers(headers) => {
            tracing::debug!(
                tool,
                "Mcp-Param-* headers on a call whose tool's listing was not seen: not checked"
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// The message part of a record: what it is, never its argument values (`decide` adds them,
/// redacted, for a server with `log_arguments: true`).
fn message_part(msg: &Message) -> MessagePart {
    let tool = msg.tool.is_some();
    MessagePart {
        method: msg.method.clone(),
        id: msg.id.clone(),
        tool: msg.tool.clone(),
        arg_keys: tool.then(|| msg.arg_keys.clone()),
        args_sha256: msg.args_sha256.clone().filter(|_| tool),
        arguments: None,
    }
}

/// The record of a message's decision (allowed messages that are not tool calls: `allow`).
fn decision_record(event: Event, chosen: &Chosen, j: &Judged) -> Record {
    let mut rec = Record::new(event, j.head.clone());
    if event == Event::Refused {
        rec.kind = Some(Refusal::Policy);
    }
    rec.decision = Some(Verdict::Allow);
    if let Some(d) = &j.decision {
        rec.decision = Some(d.outcome.verdict());
        rec.would = d.would.map(Outcome::verdict);
        rec.rule = Some(d.rule.clone());
        rec.reason = d.reason.clone();
        rec.binding = chosen.binding.clone();
        if chosen.unresolved.is_none() {
            let src = chosen.engine.policy().source();
            rec.policy = Some(PolicyRef {
                file: src.file.clone(),
                sha256: src.sha256.clone(),
            });
        }
    }
    rec
}

/// mcpwarden's answer to a refused message (`None` for a notification: nothing to answer).
fn refusal(j: &Judged) -> Option<Vec<u8>> {
    let id = j.msg.id.as_ref()?;
    if let Some(answer) = &j.answer {
        return Some(answer.clone());
    }
    let body = match &j.decision {
        Some(d) if d.outcome == Outcome::UnknownTool => {
            mcp::unknown_tool_response(id, j.msg.tool.as_deref().unwrap_or(""))
        }
        Some(d) => mcp::denied_response(
            id,
            d.reason.as_deref().unwrap_or("denied"),
            j.msg.stateless_2026,
        ),
        None => return None,
    };
    Some(body)
}
