//! The interceptor's own connection to the original destination.
//!
//! Each accepted client connection gets one upstream HTTP/1.1 connection, opened on its first
//! forwarded request and reopened if the server closes it. Requests on a client connection are
//! served one at a time (HTTP/1.1), so they reach the server in the client's order. The agent's
//! cgroup is exempt from redirection, so this connect() reaches the real server.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Mutex};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long to wait for the MCP server to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {dst}: {source}")]
    Http {
        dst: SocketAddr,
        source: hyper::Error,
    },
}

/// A lazily opened HTTP/1.1 connection to one destination.
pub struct Upstream {
    dst: SocketAddr,
    sender: Mutex<Option<SendRequest<Body>>>,
}

impl Upstream {
    pub fn new(dst: SocketAddr) -> Self {
        Upstream {
            dst,
            sender: Mutex::new(None),
        }
    }

    /// Send `req` (headers already cleaned) and return the response head with its body streaming.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let mut guard = self.sender.lock().await;
        let reusable = match guard.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            *guard = Some(self.connect().await?);
        }
        let sender = guard.as_mut().ok_or_else(|| UpstreamError::Connect {
            dst: self.dst,
            source: std::io::Error::other("no upstream connection"),
        })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Http {
                dst: self.dst,
                source,
            })
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.dst));
        let stream = match connect.await {
            Ok(result) => result.map_err(|source| UpstreamError::Connect {
                dst: self.dst,
                source,
            })?,
            Err(_) => {
                return Err(UpstreamError::Connect {
                    dst: self.dst,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                })
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Http {
                dst: self.dst,
                source,
            })?;
        let dst = self.dst;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%dst, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`. Everything
/// else — Host included — passes through untouched.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers_only(
    ) -> Result<(), http::header::InvalidHeaderValue> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse()?);
        h.insert(header::CONNECTION, "keep-alive, x-private".parse()?);
        h.insert("x-private", "1".parse()?);
        h.insert("keep-alive", "timeout=5".parse()?);
        h.insert(header::TRANSFER_ENCODING, "chunked".parse()?);
        h.insert("mcp-session-id", "abc".parse()?);
        h.insert(header::AUTHORIZATION, "Bearer t".parse()?);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "host", "mcp-session-id"]);
        Ok(())
    }
}
