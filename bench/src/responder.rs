//! The bench's MCP server: the smallest thing that answers a Streamable HTTP `tools/call`
//! correctly, so that the server is never what the bench measures.
//!
//! - POST with a JSON-RPC request → 200 `application/json` with a result for the same id;
//! - POST of a `tools/call` of the tool [`PROGRESS_TOOL`] → 200 `text/event-stream`: `steps`
//!   (argument, default [`DEFAULT_STEPS`]) `notifications/progress` events for the request's
//!   `_meta.progressToken` (its id when there is none), then the result event for its id, and
//!   the stream ends. Each event is flushed on its own, as a server that reports progress while
//!   it works does (scenario 7a);
//! - GET with `Accept: text/event-stream` (the standalone stream) → 200 `text/event-stream`,
//!   one comment line, then nothing until the client goes away (scenario 7b);
//! - a notification or response → 202; anything else → 405. No sessions.
//!
//! With a certificate it serves TLS, offering h2 and http/1.1 in ALPN as a real server behind
//! TLS would (HTTP/1.1 when the client offers no ALPN, as nginx does to its upstreams).

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The tool whose call is answered with an SSE stream of progress events.
pub const PROGRESS_TOOL: &str = "progress";
/// Progress events before the result when the call does not say (`arguments.steps`).
pub const DEFAULT_STEPS: u64 = 5;
/// What a standalone GET stream sends before it falls idle.
pub const PRIMING: &str = ": mcpwarden-bench stream open\n\n";

type Reply = Response<Either<Full<Bytes>, Sse>>;

/// An SSE response body: its events one frame each, yielding between frames so that hyper
/// writes each on its own; then the end of the stream, or (`open`) nothing more until the
/// connection goes away.
pub struct Sse {
    events: VecDeque<Bytes>,
    flushed: bool,
    open: bool,
}

impl Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.flushed {
            // Pending makes hyper flush what it has written; the wake brings it straight back.
            self.flushed = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.events.pop_front() {
            Some(event) => {
                self.flushed = false;
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            // Idle: never woken; the connection's end drops the body.
            None if self.open => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.open && self.events.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn sse(events: VecDeque<Bytes>, open: bool) -> Reply {
    let mut resp = Response::new(Either::Right(Sse {
        events,
        // The first event goes with the head.
        flushed: true,
        open,
    }));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn accepts_sse(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

async fn answer(req: Request<Incoming>) -> Reply {
    if req.method() == Method::GET && accepts_sse(&req) {
        return sse(
            VecDeque::from([Bytes::from_static(PRIMING.as_bytes())]),
            true,
        );
    }
    if req.method() != Method::POST {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let (Some(id), Some(method)) = (msg.get("id"), msg.get("method")) else {
        return status(StatusCode::ACCEPTED);
    };
    let result = result_for(id);
    let params = &msg["params"];
    if method == "tools/call" && params["name"] == PROGRESS_TOOL {
        let steps = params["arguments"]["steps"]
            .as_u64()
            .unwrap_or(DEFAULT_STEPS);
        let token = params["_meta"].get("progressToken").unwrap_or(id);
        return sse(progress_events(token, steps, &result), false);
    }
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(result))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The JSON-RPC result every call gets.
pub fn result_for(id: &serde_json::Value) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"ok"}}],"isError":false}}}}"#
    )
}

/// The events of a `progress` call's answer: `steps` progress notifications for `token`, then
/// `result`.
pub fn progress_events(token: &serde_json::Value, steps: u64, result: &str) -> VecDeque<Bytes> {
    let mut events: VecDeque<Bytes> = (1..=steps)
        .map(|i| {
            Bytes::from(format!(
                "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":{token},\"progress\":{i},\"total\":{steps}}}}}\n\n"
            ))
        })
        .collect();
    events.push_back(Bytes::from(format!("event: message\ndata: {result}\n\n")));
    events
}

fn status(code: StatusCode) -> Reply {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    *resp.status_mut() = code;
    resp
}

/// Serve on `addr` until killed (TLS when `tls` is given); prints `listening ADDR` once bound.
pub async fn serve(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("listening {}", listener.local_addr()?);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("responder: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_http1(TokioIo::new(stream)).await,
                Some(acceptor) => {
                    // A failed handshake (a probe that hung up, a client that went away) ends
                    // the connection, nothing else.
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service_fn(service))
                            .await;
                    } else {
                        serve_http1(TokioIo::new(tls)).await;
                    }
                }
            }
        });
    }
}

async fn service(req: Request<Incoming>) -> Result<Response<Either<Full<Bytes>, Sse>>, Infallible> {
    Ok(answer(req).await)
}

async fn serve_http1<IO>(io: TokioIo<IO>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service_fn(service))
        .await;
}
