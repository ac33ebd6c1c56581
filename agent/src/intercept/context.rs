//! What every step of one request needs, computed once when the request arrives: the server it
//! is for (by id), its target, the HTTP+SSE session its target names, and the request part of
//! its audit records.

use std::{sync::Arc, time::Instant};

use http::{header, request::Parts};

use super::{
    conn::Conn,
    server::Server,
    session::{Session, SessionKey},
};
use crate::{
    audit::{Head, HttpVersion, RequestPart},
    mcp,
};

/// A configured server and its id (its index in `Interceptor::servers`).
#[derive(Clone, Copy)]
pub(super) struct Routed<'a> {
    pub id: usize,
    pub server: &'a Server,
}

/// One request's context.
pub(super) struct RequestCtx<'a> {
    /// The server the request is for; None when several share the destination and the target
    /// names none of them.
    pub routed: Option<Routed<'a>>,
    /// Path and query, as the client sent them.
    pub target: String,
    /// The HTTP+SSE session whose POST endpoint the target is, if this agent saw it announced.
    pub legacy: Option<Arc<Session>>,
    /// The target is the server's endpoint path (or its HTTP+SSE POST endpoint).
    pub at_endpoint: bool,
    pub started: Instant,
    /// Caller, server and HTTP part of every record of this request.
    pub head: Arc<Head>,
}

impl Conn {
    /// Route a request: its server, its HTTP+SSE session, its records' head.
    pub(super) fn context(&self, parts: &Parts, started: Instant) -> RequestCtx<'_> {
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        let (routed, legacy, at_endpoint) = self.route(&target);
        let request = Arc::new(RequestPart {
            server: routed.map(|r| r.server.name.clone()),
            http_version: Some(if parts.version == http::Version::HTTP_2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            }),
            http_method: Some(parts.method.to_string()),
            path: Some(parts.uri.path().to_owned()),
        });
        RequestCtx {
            routed,
            target,
            legacy,
            at_endpoint,
            started,
            head: Arc::new(Head::request(&self.who, &request)),
        }
    }

    /// The configured server a request is for: the one whose endpoint path it names, else the
    /// only server at this destination, else the one that announced the HTTP+SSE session the
    /// target is the POST endpoint of. With it, that session and whether the target is the
    /// server's endpoint.
    fn route(&self, target: &str) -> (Option<Routed<'_>>, Option<Arc<Session>>, bool) {
        let mut here = self
            .servers_here()
            .map(|(id, server)| Routed { id, server });
        let only = match (here.next(), here.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        };
        let named = self
            .servers_here()
            .find(|(_, s)| mcp::is_endpoint_path(target, &s.path))
            .map(|(id, server)| Routed { id, server });
        match named.or(only) {
            Some(r) => {
                let legacy = self.legacy_session(r.id, target);
                let at = legacy.is_some() || mcp::is_endpoint_path(target, &r.server.path);
                (Some(r), legacy, at)
            }
            None => self
                .servers_here()
                .find_map(|(id, server)| {
                    let s = self.legacy_session(id, target)?;
                    Some((Some(Routed { id, server }), Some(s), true))
                })
                .unwrap_or((None, None, false)),
        }
    }

    /// The HTTP+SSE session a POST's target names, if this agent saw it announced.
    fn legacy_session(&self, server: usize, target: &str) -> Option<Arc<Session>> {
        if !self.shared.sessions.any_legacy() {
            return None;
        }
        let key = SessionKey {
            server,
            id: super::respond::legacy_session_id(target),
        };
        self.shared.sessions.get(&key).filter(|s| s.is_legacy())
    }

    /// The session an `Mcp-Session-Id` header names, if the server has confirmed it (a 2xx
    /// answer carrying it: see `respond`). Ids a client makes up create nothing, so the table
    /// cannot be flooded past the servers' own sessions.
    pub(super) fn header_session(
        &self,
        server: usize,
        headers: &http::HeaderMap,
    ) -> Option<(SessionKey, Arc<Session>)> {
        let id = headers.get("mcp-session-id")?.to_str().ok()?;
        let key = SessionKey {
            server,
            id: id.to_owned(),
        };
        let session = self.shared.sessions.get(&key)?;
        Some((key, session))
    }

    /// The origins an HTTP+SSE endpoint may name: every configured server's, this
    /// connection's destination (and SNI), and the origin the client addressed.
    pub(super) fn origins(&self, parts: &Parts) -> Vec<String> {
        let mut origins: Vec<String> = self
            .shared
            .servers
            .iter()
            .map(|s| s.origin.clone())
            .collect();
        let dst = self.dst;
        origins.push(dst.to_string().to_ascii_lowercase());
        if let Some(t) = self.tls.as_ref().and_then(|t| t.sni.as_ref()) {
            origins.push(format!("{t}:{}", dst.port()));
        }
        // The origin the client addressed (Host, or :authority), with its default port.
        if let Some(a) = authority(parts) {
            let port = a
                .port_u16()
                .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
            origins.push(format!("{}:{port}", a.host()).to_ascii_lowercase());
        }
        origins
    }
}

/// The authority the client addressed: the URI's (h2 `:authority`, absolute form), else Host.
pub(super) fn authority(parts: &Parts) -> Option<http::uri::Authority> {
    parts.uri.authority().cloned().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
    })
}

/// The `MCP-Protocol-Version` header.
pub(super) fn mcp_header(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(mcp::PROTOCOL_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http::Request;

    use super::super::{
        conn::rig::{conn, server},
        session::SessionKey,
    };

    fn parts(target: &str) -> http::request::Parts {
        Request::post(target)
            .body(())
            .expect("a request")
            .into_parts()
            .0
    }

    /// (server name, at the endpoint) for a POST to `target`.
    fn routed(c: &super::Conn, target: &str) -> (Option<String>, bool) {
        let ctx = c.context(&parts(target), Instant::now());
        (ctx.routed.map(|r| r.server.name.clone()), ctx.at_endpoint)
    }

    #[test]
    fn the_path_names_the_server_else_the_only_one_else_none() {
        let one = conn("127.0.0.1:8080", vec![server("a", "/mcp")]);
        assert_eq!(routed(&one, "/mcp?x=1"), (Some("a".into()), true));
        assert_eq!(
            routed(&one, "/.well-known/oauth"),
            (Some("a".into()), false)
        );

        let two = conn(
            "127.0.0.1:8080",
            vec![server("a", "/a/mcp"), server("b", "/b/mcp")],
        );
        assert_eq!(routed(&two, "/b/mcp"), (Some("b".into()), true));
        assert_eq!(routed(&two, "/a/./mcp"), (Some("a".into()), true));
        assert_eq!(routed(&two, "/other"), (None, false));
    }

    #[test]
    fn an_announced_http_sse_endpoint_routes_to_the_server_that_announced_it() {
        let two = conn(
            "127.0.0.1:8080",
            vec![server("a", "/a/sse"), server("b", "/b/sse")],
        );
        let target = "/messages/?session_id=s1";
        assert_eq!(routed(&two, target), (None, false), "not announced yet");
        let (_session, _rx) = two.shared.sessions.legacy(SessionKey {
            server: 1,
            id: "s1".into(),
        });
        let ctx = two.context(&parts(target), Instant::now());
        assert_eq!(ctx.routed.map(|r| r.id), Some(1));
        assert!(ctx.at_endpoint && ctx.legacy.is_some());
    }

    #[test]
    fn the_request_part_is_built_once_and_shared() {
        let c = conn("127.0.0.1:8080", vec![server("a", "/mcp")]);
        let ctx = c.context(&parts("/mcp?q"), Instant::now());
        let request = ctx.head.request.as_ref().expect("request part");
        assert_eq!(request.server.as_deref(), Some("a"));
        assert_eq!(
            request.path.as_deref(),
            Some("/mcp"),
            "path without the query"
        );
        assert!(std::sync::Arc::ptr_eq(
            ctx.head.caller.as_ref().expect("caller part"),
            &c.who
        ));
        assert_eq!(ctx.target, "/mcp?q");
    }
}
