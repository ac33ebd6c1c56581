//! The interceptor's own connections to original destinations: one keep-alive pool for the
//! whole agent (hyper-util's client), keyed by destination address.
//!
//! A request is sent to the address recovered from the redirect map, written in absolute form
//! (`http://ADDR/path`) only so that the pool can key on it; the client writes origin form on the
//! wire and leaves the Host header the client sent untouched (`set_host(false)`). Requests on one
//! client connection are served one at a time (HTTP/1.1), so they reach the server in the
//! client's order; idle client connections hold no upstream connection. The agent's cgroup is
//! exempt from redirection, so these connect()s reach the real servers.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long to wait for an MCP server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle upstream connections are closed after this long (servers commonly time out at 60-120 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per destination.
const POOL_MAX_IDLE_PER_DST: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("bad request target for {dst}: {source}")]
    Uri {
        dst: SocketAddr,
        source: http::Error,
    },
    #[error("HTTP exchange with {dst}: {source}")]
    Http {
        dst: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
}

/// The shared upstream connection pool.
pub struct Upstream {
    client: Client<HttpConnector, Body>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_DST)
            .http1_preserve_header_case(true)
            .set_host(false)
            .build(connector);
        Upstream { client }
    }

    /// Send `req` (origin-form target, headers already cleaned) to `dst` and return the response
    /// head with its body streaming.
    pub async fn send(
        &self,
        dst: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pq = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(dst.to_string())
            .path_and_query(pq)
            .build()
            .map_err(|source| UpstreamError::Uri { dst, source })?;
        self.client
            .request(req)
            .await
            .map_err(|source| UpstreamError::Http { dst, source })
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
