//! Serving one connection: plaintext HTTP, TLS terminated then HTTP, or passed through
//! untouched; HTTP/1.1 or h2 with hyper, each request handed to [`super::request`].

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::Response;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    conn::Conn,
    limits::{Activity, Cut, Timed, Tracked},
    terminate::{Next, HANDSHAKE_TIMEOUT},
};
use crate::audit::{Event, Refusal};

/// Every branch's future is boxed: the task is allocated at the size of its largest possible
/// state, and a TLS handshake or an HTTP/2 connection is several KiB that a plaintext
/// connection (or an idle SSE stream on one) should not carry.
pub(super) async fn serve_connection(conn: Conn, stream: std::net::TcpStream, peer: SocketAddr) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%peer, error = %e, "registering an accepted connection failed");
            return;
        }
    };
    let (plain, tls) = conn.schemes();
    if !tls {
        return Box::pin(serve_http(Arc::new(conn), stream, false, peer)).await;
    }
    if plain {
        // Names of both kinds share this address: the first byte tells TLS (a handshake
        // record, 0x16) from HTTP.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                return Box::pin(serve_http(Arc::new(conn), stream, false, peer)).await
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    match Box::pin(conn.terminate_or_pass(stream)).await {
        Next::Serve(conn, tls, h2) => Box::pin(serve_http(Arc::new(conn), tls, h2, peer)).await,
        Next::Pass(conn, stream, sni) => Box::pin(conn.pass_through(stream, sni)).await,
        Next::Done => {}
    }
}

/// Serve HTTP/1.1 (or h2, when ALPN chose it) on a client connection until it closes, under
/// the head and idle deadlines ([`limits::Timed`]; the head deadline is HTTP/1.1's only).
async fn serve_http<IO>(conn: Arc<Conn>, io: IO, h2: bool, peer: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let audit_conn = conn.clone();
    let limits = conn.shared.limits;
    let activity = Arc::new(Activity::new());
    let io = Timed::new(
        io,
        activity.clone(),
        (!h2).then(|| Duration::from_millis(limits.header_read_timeout_ms)),
        (limits.idle_timeout_ms > 0).then(|| Duration::from_millis(limits.idle_timeout_ms)),
    );
    let requests = activity.clone();
    let drain = conn.shared.drain.clone();
    let service = service_fn(move |req| {
        let conn = conn.clone();
        let in_flight = requests.request();
        async move {
            let (mut head, body) = conn.handle(req).await.into_parts();
            if !h2 && conn.shared.drain.is_draining() {
                // Handed over: the client's next request goes on a new connection, which the
                // new agent accepts.
                head.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            let body = Tracked {
                inner: body,
                _in_flight: in_flight,
            };
            Ok::<_, Infallible>(Response::from_parts(head, body))
        }
    });
    let result = if h2 {
        let mut served = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .serve_connection(TokioIo::new(io), service),
        );
        tokio::select! {
            r = served.as_mut() => r,
            () = drain.started() => {
                // GOAWAY: streams in flight finish, new ones go to a new connection.
                served.as_mut().graceful_shutdown();
                tokio::select! {
                    r = served.as_mut() => r,
                    () = drain.deadline() => return,
                }
            }
        }
    } else {
        let served = hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(io), service);
        tokio::select! {
            r = served => r,
            () = drain.deadline() => return,
        }
    };
    if activity.cut() == Some(Cut::HeaderTimeout) {
        let reason = format!(
            "the request head did not arrive within {} ms of its first byte \
             (limits.header_read_timeout_ms): the connection was closed",
            limits.header_read_timeout_ms
        );
        audit_conn.audit_repeated(
            "header_timeout",
            audit_conn
                .record(Event::Refused)
                .denied(reason)
                .kind(Refusal::Limit),
        );
        return;
    }
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() {
            // Bytes hyper could not read as HTTP (an h2c preface on HTTP/1.1, a malformed
            // head): nothing reached the service, nothing was forwarded; the caller is audited.
            let reason = if e.is_parse_version_h2() {
                "plaintext HTTP/2 (h2c prior knowledge) is refused: it would not be inspected"
                    .to_owned()
            } else {
                format!("malformed HTTP request: {e}")
            };
            audit_conn.write_audit(
                &audit_conn
                    .record(Event::Refused)
                    .denied(reason)
                    .kind(Refusal::Malformed),
            );
        }
        tracing::debug!(%peer, error = %e, "client connection ended");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::conn::rig::{conn, server};

    /// An h2 client learns `limits.h2_max_concurrent_streams` from the interceptor's SETTINGS
    /// (hyper then refuses streams beyond it with REFUSED_STREAM).
    #[tokio::test]
    async fn http2_connections_announce_the_stream_limit() {
        let c = conn("127.0.0.1:8080", vec![server("a", "/mcp")]);
        let want = c.shared.limits.h2_max_concurrent_streams as usize;
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let peer = "127.0.0.1:40000".parse().expect("an address");
        tokio::spawn(super::serve_http(Arc::new(c), server_io, true, peer));
        let (send, connection) = h2::client::handshake(client_io)
            .await
            .expect("h2 handshake");
        tokio::spawn(connection);
        let mut send = send.ready().await.expect("ready");
        // The server's SETTINGS arrive with its first frames: poll until they are applied.
        for _ in 0..100 {
            if send.current_max_send_streams() == want {
                break;
            }
            tokio::task::yield_now().await;
            send = send.ready().await.expect("ready");
        }
        assert_eq!(send.current_max_send_streams(), want);
        assert_eq!(want, 100, "the default");
    }
}
