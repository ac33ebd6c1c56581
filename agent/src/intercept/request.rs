//! One HTTP request: the checks every request passes (the TLS name, transfer codings, tunnels),
//! its body read whole and decoded, and the classification — MCP (to [`super::call`]), a request
//! with no body (GET streams, DELETE), or another request, forwarded after its audit record.
//!
//! What is MCP: a POST to a configured endpoint path (query ignored, path normalised), or to the
//! POST endpoint an HTTP+SSE stream announced, must parse as JSON-RPC or it is refused; any other
//! request whose body is JSON-RPC is MCP too. Every request body is buffered (up to `max_body`),
//! decoded if compressed ([`super::encoding`]: forwarded decoded) and inspected before anything
//! is forwarded. Upgrade and CONNECT are refused: they would open tunnels past the parser.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, request::Parts, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    conn::Conn,
    context::{mcp_header, RequestCtx},
    encoding,
    forward::identity_encoding,
    limits::{self, Charge, Collect},
    reply::{full, json_response, refused_plain},
    respond::{self, Exchange},
    upstream::Body,
};
use crate::{
    audit::{Event, Head, Record, Refusal, Transport},
    mcp,
};

/// Why a request body could not be read whole.
enum BodyError {
    Read(hyper::Error),
    TooLarge,
    ConnectionFull,
    TimedOut,
}

impl Conn {
    /// Serve one request.
    pub(super) async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let ctx = self.context(&parts, started);
        if let Some(refusal) = self.check(&ctx, &parts) {
            return refusal;
        }
        if let Ok(Some(authority)) = &ctx.authority {
            self.forward_authority(&mut parts, authority);
        }
        if parts.method != Method::POST && body.is_end_stream() {
            // No body to inspect: the SSE GET stream, DELETE, OAuth metadata, health checks.
            return self.forward_bodiless(&ctx, parts, body.boxed()).await;
        }
        // Every body is inspected, whatever the method: none reaches the server unread. The
        // charge holds its bytes against the connection's budget until the request is done.
        let (bytes, _charge) = match self.read_body(&ctx, &mut parts, body).await {
            Ok(b) => b,
            Err(refusal) => return *refusal,
        };
        if let Err(e) = mcp::check_encoding(&parts.headers, &bytes) {
            let mut rec = Record::new(Event::Refused, ctx.head.clone())
                .denied(&*e.message)
                .kind(Refusal::for_status(e.status.as_u16()));
            rec.status = Some(e.status.as_u16());
            self.write_audit(&rec);
            return json_response(e.status, e.response_body());
        }
        // A body to the endpoint must be MCP, whatever the method; elsewhere, a body that any
        // lenient reading could take for JSON-RPC is decided like one, and any other body is
        // forwarded only to a path the operator listed in `passthrough_paths`.
        if !ctx.at_endpoint && !mcp::looks_like_jsonrpc(&bytes) {
            if !self.passthrough(&ctx) {
                let msg = "this request carries a body that is not JSON-RPC to a path that is \
                           neither the MCP endpoint nor one of the server's passthrough_paths: \
                           it was not forwarded";
                return self.refuse_plain(&ctx, StatusCode::FORBIDDEN, msg);
            }
            return self.forward_non_mcp(&ctx, parts, full(bytes)).await;
        }
        match ctx.routed {
            Some(routed) => self.handle_mcp(&ctx, routed, parts, bytes).await,
            None => {
                let msg = "this address serves several MCP endpoints and the request path names none of them: \
                           no policy applies, so it was not forwarded";
                self.write_audit(
                    &Record::new(Event::Refused, ctx.head.clone())
                        .denied(msg)
                        .kind(Refusal::Malformed),
                );
                json_response(
                    StatusCode::BAD_REQUEST,
                    mcp::error_response(None, -32600, msg),
                )
            }
        }
    }

    /// What every request must pass before its body is read: one authority, naming a server
    /// here (and the TLS name it came under), no transfer coding but chunked, no tunnel.
    fn check(&self, ctx: &RequestCtx<'_>, parts: &Parts) -> Option<Response<Body>> {
        if let Err(why) = &ctx.authority {
            let msg = format!("{why}: servers differ in which they read, so it was not forwarded");
            return Some(self.refuse_plain(ctx, StatusCode::BAD_REQUEST, &msg));
        }
        if ctx.unknown_host {
            return Some(self.refuse_plain(
                ctx,
                StatusCode::MISDIRECTED_REQUEST,
                "the Host header names none of the MCP servers configured at this address: no \
                 policy applies, so it was not forwarded",
            ));
        }
        if let Some(refusal) = self.misdirected(ctx) {
            return Some(refusal);
        }
        let transfer_codings = parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| !t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if transfer_codings {
            return Some(self.refuse_plain(
                ctx,
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not accepted: the body could not be inspected",
            ));
        }
        if parts.method == Method::CONNECT || parts.headers.contains_key(header::UPGRADE) {
            return Some(self.refuse_plain(
                ctx,
                StatusCode::FORBIDDEN,
                "Upgrade and CONNECT requests to an MCP endpoint are refused: they would open a tunnel past the policy",
            ));
        }
        None
    }

    /// The request goes on with exactly the authority that was checked: one Host header
    /// carrying it (HTTP/1.1 upstreams), or none beside `:authority` (h2 upstreams).
    fn forward_authority(&self, parts: &mut Parts, authority: &http::uri::Authority) {
        parts.headers.remove(header::HOST);
        let h2_upstream = self.tls.as_ref().is_some_and(|t| t.h2);
        if !h2_upstream {
            if let Ok(value) = http::HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, value);
            }
        }
    }

    /// Whether the target is one of the server's `passthrough_paths` (of any server here when
    /// the request names none of them).
    fn passthrough(&self, ctx: &RequestCtx<'_>) -> bool {
        let path = &ctx.normal_path;
        let listed = |server: &super::server::Server| {
            server
                .passthrough_paths
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == p,
                })
        };
        match ctx.routed {
            Some(r) => listed(r.server),
            None => self.servers_here().any(|(_, s)| listed(s)),
        }
    }

    /// On a terminated connection, a request must be for the server the TLS name was: Host (or
    /// :authority) naming another server is domain fronting, answered 421.
    fn misdirected(&self, ctx: &RequestCtx<'_>) -> Option<Response<Body>> {
        let tls = self.tls.as_ref()?;
        // The authority checked once in the context (Host and target agree by now).
        let host = ctx
            .authority
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|a| {
                a.host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            });
        let expected = match &tls.sni {
            Some(n) => n.clone(),
            None => self.dst.ip().to_string(),
        };
        if host.as_deref() == Some(expected.as_str()) {
            return None;
        }
        Some(self.refuse_plain(
            ctx,
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this connection is for {expected} but the request names {}: send it on a connection to that server",
                host.as_deref().unwrap_or("no host")
            ),
        ))
    }

    /// The whole body, bounded (its own size, the connection's buffered bytes, the body read
    /// timeout), decoded if compressed (and then forwarded decoded: the server reads exactly
    /// what the policy read). Err: the refusal, audited.
    async fn read_body(
        &self,
        ctx: &RequestCtx<'_>,
        parts: &mut Parts,
        body: Incoming,
    ) -> Result<(Bytes, Charge<'_>), Box<Response<Body>>> {
        let max = self.shared.max_body;
        let limit = &self.shared.limits;
        let mut charge = Charge::new(&self.buffered);
        let collect = limits::collect(
            body,
            max,
            &mut charge,
            limit.max_buffered_bytes_per_connection,
        );
        let timeout = std::time::Duration::from_millis(limit.body_read_timeout_ms);
        let read = match tokio::time::timeout(timeout, collect).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(Collect::Read(e))) => Err(BodyError::Read(e)),
            Ok(Err(Collect::TooLarge)) => Err(BodyError::TooLarge),
            Ok(Err(Collect::OverBudget)) => Err(BodyError::ConnectionFull),
            Err(_) => Err(BodyError::TimedOut),
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(e) => {
                let (status, msg) = match e {
                    BodyError::TooLarge => (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body exceeds the {max} byte limit; it was not forwarded"),
                    ),
                    BodyError::ConnectionFull => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "this connection already buffers {} bytes of request bodies \
                             (limits.max_buffered_bytes_per_connection); it was not forwarded",
                            limit.max_buffered_bytes_per_connection
                        ),
                    ),
                    BodyError::TimedOut => (
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request body did not arrive within {} ms \
                             (limits.body_read_timeout_ms); it was not forwarded",
                            limit.body_read_timeout_ms
                        ),
                    ),
                    BodyError::Read(e) => (
                        StatusCode::BAD_REQUEST,
                        format!("reading the request body failed: {e}"),
                    ),
                };
                let mut rec = Record::new(Event::Refused, ctx.head.clone())
                    .denied(&*msg)
                    .kind(Refusal::for_status(status.as_u16()));
                rec.status = Some(status.as_u16());
                self.write_audit(&rec);
                return Err(Box::new(json_response(
                    status,
                    mcp::error_response(None, -32600, &msg),
                )));
            }
        };
        let codings = encoding::codings(&parts.headers);
        if codings.is_empty() {
            return Ok((bytes, charge));
        }
        match encoding::decode(&bytes, &codings, max) {
            Ok(decoded) => {
                parts.headers.remove(header::CONTENT_ENCODING);
                parts.headers.remove(header::CONTENT_LENGTH);
                Ok((Bytes::from(decoded), charge))
            }
            Err(e) => Err(Box::new(self.refuse_plain(ctx, e.status(), &e.to_string()))),
        }
    }

    /// Refuse a request before it is read as MCP, with a text answer and its audit record.
    pub(super) fn refuse_plain(
        &self,
        ctx: &RequestCtx<'_>,
        status: StatusCode,
        reason: &str,
    ) -> Response<Body> {
        let mut rec = Record::new(Event::Refused, ctx.head.clone())
            .denied(reason)
            .kind(Refusal::for_status(status.as_u16()));
        rec.status = Some(status.as_u16());
        self.write_audit(&rec);
        refused_plain(status, reason)
    }

    /// Forward a request that carries no MCP message, audited before it goes.
    async fn forward_non_mcp(
        &self,
        ctx: &RequestCtx<'_>,
        parts: Parts,
        body: Body,
    ) -> Response<Body> {
        let head = ctx.head.clone();
        if let Err(refusal) = self.audit_before_forwarding(&Record::new(Event::NonMcp, head), None)
        {
            return *refusal;
        }
        let rec = Record::new(Event::Response, ctx.head.clone());
        self.forward(rec, parts, body, ctx.started).await
    }

    /// A request without a body. GET streams are read like any server message (a 2024-11-05
    /// HTTP+SSE stream, a Streamable HTTP standalone or resumed stream); DELETE ends a session.
    async fn forward_bodiless(
        &self,
        ctx: &RequestCtx<'_>,
        mut parts: Parts,
        body: Body,
    ) -> Response<Body> {
        let session = ctx
            .routed
            .and_then(|r| self.header_session(r.id, &parts.headers));
        let head = match &session {
            Some((_, s)) => Arc::new(Head {
                transport: Some(Transport::StreamableHttp),
                revision: s.revision().or_else(|| mcp_header(&parts.headers)),
                ..(*ctx.head).clone()
            }),
            None => ctx.head.clone(),
        };
        if let Err(refusal) =
            self.audit_before_forwarding(&Record::new(Event::NonMcp, head.clone()), None)
        {
            return *refusal;
        }
        let (Some(routed), true) = (ctx.routed, parts.method == Method::GET) else {
            if let (Some((key, s)), true) = (&session, parts.method == Method::DELETE) {
                self.shared.sessions.remove(key, Some(s));
                respond::close_session_calls(
                    s,
                    &self.audit,
                    None,
                    "the client ended the session (DELETE) before the result",
                );
            }
            let rec = Record::new(Event::Response, ctx.head.clone());
            return self.forward(rec, parts, body, ctx.started).await;
        };
        identity_encoding(&mut parts.headers);
        // A stream's listings are filtered with the caller's policy (everything hidden when
        // the caller could not be identified).
        let engine = self.choose_policy(routed).await.engine;
        let exchange = Exchange {
            get_stream: true,
            ..self.exchange(ctx, routed, &parts, engine, head, session.map(|s| s.1))
        };
        match self.send(parts, body).await {
            // MCP answers a GET with an event stream (or 405); anything else (OAuth metadata, a
            // health check) carries no MCP message and is passed on as it is.
            Ok(resp) if respond::is_event_stream(resp.headers()) => {
                respond::respond(resp, exchange).await
            }
            Ok(resp) => {
                let rec = Record::new(Event::Response, exchange.base.clone())
                    .answered(Some(resp.status().as_u16()), ctx.started);
                self.write_audit_deferred(&rec);
                resp
            }
            Err(failed) => {
                let rec = Record::new(Event::Response, exchange.base.clone())
                    .because(format!("upstream failed: {}", failed.reason));
                self.write_audit_deferred(&rec);
                failed.response
            }
        }
    }
}
