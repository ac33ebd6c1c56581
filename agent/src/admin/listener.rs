//! The metrics listener: TCP (`--metrics-listen`, the host's loopback by default), serving only
//! `GET /metrics` (Prometheus text format), `GET /healthz` and `GET /readyz`. Nothing on it
//! changes the agent. During an upgrade it is handed over with the interceptor's listeners, so
//! two agents never need the port at once; the old one stops accepting on it when the new one
//! is ready.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::health::Health;
use crate::metrics::Metrics;

/// A client has this long to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;

/// Serve `listener` until `stop` is notified (a successor took it over) or the task is aborted.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    stop: Arc<tokio::sync::Notify>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok((
        addr,
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let stream = tokio::select! {
                    () = stop.notified() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics listener accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let metrics = metrics.clone();
                let health = health.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (metrics, health) = (metrics.clone(), health.clone());
                        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                        async move {
                            // A scrape counts map entries (syscalls): off the control plane's
                            // thread, which also runs the interceptor's accept loop.
                            let reply = tokio::task::spawn_blocking(move || {
                                answer(&method, &path, &metrics, &health)
                            })
                            .await
                            .unwrap_or_else(|_| {
                                text(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    "text/plain; charset=utf-8",
                                    "the scrape failed\n".into(),
                                )
                            });
                            Ok::<_, Infallible>(reply)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }),
    ))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
    }
    r
}

fn answer(
    method: &Method,
    path: &str,
    metrics: &Arc<Metrics>,
    health: &Health,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match path {
        "/metrics" => match metrics.encode() {
            Ok(body) => text(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                "encoding the metrics failed\n".into(),
            ),
        },
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let report = health.check();
            let mut body = String::new();
            for c in &report.checks {
                body.push_str(&format!(
                    "[{}] {}: {}\n",
                    if c.ok { "+" } else { "-" },
                    c.name,
                    c.detail
                ));
            }
            body.push_str(if report.ready {
                "ready\n"
            } else {
                "not ready\n"
            });
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "only /metrics, /healthz and /readyz are served here\n".into(),
        ),
    }
}
