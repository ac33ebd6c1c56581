//! The bench's MCP server: the smallest thing that answers a Streamable HTTP `tools/call`
//! correctly, so that the server is never what the bench measures.
//!
//! POST with a JSON-RPC request → 200 `application/json` with a result for the same id;
//! a notification or response → 202; anything else → 405. No sessions, no SSE.
//!
//! With a certificate it serves TLS, offering h2 and http/1.1 in ALPN as a real server behind
//! TLS would (HTTP/1.1 when the client offers no ALPN, as nginx does to its upstreams).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

async fn answer(req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let (Some(id), Some(_method)) = (msg.get("id"), msg.get("method")) else {
        return status(StatusCode::ACCEPTED);
    };
    let out = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"ok"}}],"isError":false}}}}"#
    );
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
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

async fn service(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
