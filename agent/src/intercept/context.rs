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
    audit::{clip, Head, HttpVersion, RequestPart},
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
    /// The target's path, normalised once ([`mcp::normalize_path`]): what endpoint paths and
    /// `passthrough_paths` (both stored normalised) are compared with.
    pub normal_path: String,
    /// The HTTP+SSE session whose POST endpoint the target is, if this agent saw it announced.
    pub legacy: Option<Arc<Session>>,
    /// The target is the server's endpoint path (or its HTTP+SSE POST endpoint).
    pub at_endpoint: bool,
    /// The one authority the request names (URI or `:authority`, and Host, which must agree),
    /// or why it names none that can be trusted.
    pub authority: Result<Option<http::uri::Authority>, String>,
    /// On plaintext: the authority names none of the servers at this address.
    pub unknown_host: bool,
    pub started: Instant,
    /// Caller, server and HTTP part of every record of this request.
    pub head: Arc<Head>,
}

/// A request's context without its borrow of the connection, to finish the request in a task
/// of its own (a held call whose client reads progress on an SSE stream).
pub(super) struct DetachedCtx {
    routed: Option<usize>,
    target: String,
    normal_path: String,
    legacy: Option<Arc<Session>>,
    at_endpoint: bool,
    authority: Result<Option<http::uri::Authority>, String>,
    unknown_host: bool,
    started: Instant,
    head: Arc<Head>,
}

impl RequestCtx<'_> {
    pub(super) fn detach(&self) -> DetachedCtx {
        DetachedCtx {
            routed: self.routed.map(|r| r.id),
            target: self.target.clone(),
            normal_path: self.normal_path.clone(),
            legacy: self.legacy.clone(),
            at_endpoint: self.at_endpoint,
            authority: self.authority.clone(),
            unknown_host: self.unknown_host,
            started: self.started,
            head: self.head.clone(),
        }
    }
}

impl DetachedCtx {
    /// The context again, borrowing `conn` (the connection it was detached from).
    pub(super) fn attach(self, conn: &Conn) -> RequestCtx<'_> {
        RequestCtx {
            routed: self.routed.and_then(|id| {
                conn.shared
                    .servers
                    .get(id)
                    .map(|server| Routed { id, server })
            }),
            target: self.target,
            normal_path: self.normal_path,
            legacy: self.legacy,
            at_endpoint: self.at_endpoint,
            authority: self.authority,
            unknown_host: self.unknown_host,
            started: self.started,
            head: self.head,
        }
    }
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
        let authority = request_authority(parts);
        let named = authority.as_ref().ok().and_then(Option::as_ref);
        let normal_path = mcp::normalize_path(&target);
        let (routed, legacy, at_endpoint, unknown_host) = self.route(&target, &normal_path, named);
        let request = Arc::new(RequestPart {
            server: routed.map(|r| r.server.name.clone()),
            http_version: Some(if parts.version == http::Version::HTTP_2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            }),
            http_method: Some(parts.method.to_string()),
            path: Some(clip(parts.uri.path(), self.shared.limits.audit_path_bytes)),
            query: parts
                .uri
                .query()
                .map(|q| clip(&masked_query(q), self.shared.limits.audit_path_bytes)),
        });
        RequestCtx {
            routed,
            target,
            normal_path,
            legacy,
            at_endpoint,
            authority,
            unknown_host,
            started,
            head: Arc::new(Head::request(&self.who, &request)),
        }
    }

    /// The configured server a request is for: the one whose endpoint path it names, else the
    /// only server at this destination, else the one that announced the HTTP+SSE session the
    /// target is the POST endpoint of. With it, that session and whether the target is the
    /// server's endpoint.
    ///
    /// On plaintext the servers considered are those the authority names (by host and port),
    /// or all of them when it names this address itself or there is none; the last value is
    /// true when it names none of them. On TLS the SNI has already narrowed them.
    fn route(
        &self,
        target: &str,
        normal_path: &str,
        authority: Option<&http::uri::Authority>,
    ) -> (Option<Routed<'_>>, Option<Arc<Session>>, bool, bool) {
        let named_by_host = |s: &Server| match authority {
            Some(a) if self.tls.is_none() => names_server(a, s, self.dst),
            _ => true,
        };
        let candidates = || {
            self.servers_here()
                .filter(|(_, s)| named_by_host(s))
                .map(|(id, server)| Routed { id, server })
        };
        let mut here = candidates();
        let only = match (here.next(), here.next()) {
            (Some(one), None) => Some(one),
            (None, _) => return (None, None, false, true),
            _ => None,
        };
        // Two servers with this endpoint path (told apart by Host only) and no Host naming one:
        // neither.
        let mut by_path = candidates().filter(|r| r.server.path == normal_path);
        let named = match (by_path.next(), by_path.next()) {
            (Some(one), None) => Some(one),
            (Some(_), Some(_)) => return (None, None, false, false),
            _ => None,
        };
        match named.or(only) {
            Some(r) => {
                let legacy = self.legacy_session(r.id, target);
                let at = legacy.is_some() || r.server.path == normal_path;
                (Some(r), legacy, at, false)
            }
            None => candidates()
                .find_map(|r| {
                    let s = self.legacy_session(r.id, target)?;
                    Some((Some(r), Some(s), true, false))
                })
                .unwrap_or((None, None, false, false)),
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
            .flat_map(|s| {
                std::iter::once(s.origin.clone())
                    .chain(s.aliases.iter().map(|a| format!("{a}:{}", s.port)))
            })
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

/// The one authority a request names. It can be written in the request target (absolute
/// form), in h2's `:authority` (both end up in the URI) and in Host headers (h2 may carry one
/// too); servers differ in which they read, so they must all agree:
/// - more than one Host header is refused (RFC 9112 §3.2);
/// - a Host that is not a plain `host[:port]` (no user info) is refused;
/// - a URI authority and a Host that name different hosts or ports (the scheme's default
///   port filled in) are refused (RFC 9113 §8.3.1 makes such an h2 request malformed).
///
/// `Ok(None)`: the request names no authority (HTTP/1.0 without Host).
pub(super) fn request_authority(parts: &Parts) -> Result<Option<http::uri::Authority>, String> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header".to_owned());
    }
    let host = match host {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|h| !h.contains('@') && !h.is_empty())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .ok_or_else(|| "the Host header is not a valid host[:port]".to_owned())?,
        ),
    };
    let target = parts.uri.authority().cloned();
    if target.as_ref().is_some_and(|a| a.as_str().contains('@')) {
        return Err("the request target carries user info".to_owned());
    }
    let default_port = match parts.uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match (target, host) {
        (Some(t), Some(h)) => {
            let same = t.host().eq_ignore_ascii_case(h.host())
                && t.port_u16().unwrap_or(default_port) == h.port_u16().unwrap_or(default_port);
            if same {
                Ok(Some(t))
            } else {
                Err(
                    "the request target (or :authority) and the Host header name different \
                     authorities"
                        .to_owned(),
                )
            }
        }
        (t, h) => Ok(t.or(h)),
    }
}

/// Whether a plaintext request's authority names `server` at `dst`: its host (or the address
/// itself, which names every server there) and, when given, its port.
fn names_server(
    authority: &http::uri::Authority,
    server: &Server,
    dst: std::net::SocketAddr,
) -> bool {
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port_ok = |port: u16| authority.port_u16().is_none_or(|p| p == port);
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical() == dst.ip().to_canonical())
    {
        return port_ok(dst.port());
    }
    server.is_named(host) && port_ok(server.port)
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

/// A query with every value replaced by `*`: values can be tokens or session ids.
fn masked_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) => format!("{key}=*"),
            None => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
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

    #[test]
    fn a_service_is_named_by_its_host_and_its_short_names_only() {
        let mut s = server("tools.mcp.svc.cluster.local", "/mcp");
        s.aliases = crate::config::host_aliases("tools.mcp.svc.cluster.local");
        let dst: std::net::SocketAddr = "10.1.0.5:9000".parse().expect("an address");
        let names = |a: &str| super::names_server(&a.parse().expect("an authority"), &s, dst);
        assert!(names("tools.mcp.svc.cluster.local:80"));
        assert!(names("TOOLS.mcp:80"));
        assert!(names("tools.mcp.svc"));
        assert!(names("10.1.0.5:9000"), "the backend's own address");
        assert!(!names("tools.other:80"));
        assert!(!names("tools:80"), "a bare name could be any namespace's");
        assert!(!names("tools.mcp:81"));
    }

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

    fn with_headers(target: &str, version: http::Version, hosts: &[&str]) -> http::request::Parts {
        let mut req = Request::post(target).version(version);
        for h in hosts {
            req = req.header(http::header::HOST, *h);
        }
        req.body(()).expect("a request").into_parts().0
    }

    #[test]
    fn the_authority_must_be_written_once_and_agree_everywhere() {
        use http::Version;
        let one = |target: &str, hosts: &[&str]| {
            super::request_authority(&with_headers(target, Version::HTTP_11, hosts))
                .map(|a| a.map(|a| a.to_string()))
        };
        assert_eq!(one("/mcp", &["tools:8080"]), Ok(Some("tools:8080".into())));
        assert_eq!(one("/mcp", &[]), Ok(None));
        assert_eq!(
            one("http://Tools:80/mcp", &["tools"]),
            Ok(Some("Tools:80".into())),
            "case and the default port aside, the same authority"
        );
        for (target, hosts, why) in [
            ("/mcp", &["a", "b"][..], "more than one Host"),
            ("/mcp", &["a", "a"][..], "more than one Host"),
            ("/mcp", &["user@a"][..], "not a valid host"),
            ("/mcp", &["a b"][..], "not a valid host"),
            ("http://a/mcp", &["b"][..], "different authorities"),
            ("http://a:81/mcp", &["a"][..], "different authorities"),
            ("http://u@a/mcp", &["a"][..], "user info"),
        ] {
            let err = one(target, hosts).expect_err(target);
            assert!(err.contains(why), "{target} {hosts:?}: {err}");
        }
        // h2: `:authority` is the URI's; a `host` header beside it must name the same.
        let h2 = with_headers(
            "https://tools.example/mcp",
            Version::HTTP_2,
            &["evil.example"],
        );
        assert!(super::request_authority(&h2).is_err());
    }

    #[test]
    fn on_plaintext_the_host_chooses_among_servers_and_must_name_one() {
        let mut a = server("a", "/mcp");
        a.host = "tools.internal".into();
        a.port = 8080;
        let mut b = server("b", "/mcp");
        b.host = "other.internal".into();
        b.port = 8080;
        let c = conn("10.0.0.5:8080", vec![a, b]);
        let route = |hosts: &[&str]| {
            let ctx = c.context(
                &with_headers("/mcp", http::Version::HTTP_11, hosts),
                Instant::now(),
            );
            (ctx.routed.map(|r| r.server.name.clone()), ctx.unknown_host)
        };
        assert_eq!(route(&["tools.internal:8080"]), (Some("a".into()), false));
        assert_eq!(route(&["OTHER.internal"]), (Some("b".into()), false));
        assert_eq!(route(&["evil.example"]), (None, true));
        assert_eq!(
            route(&["tools.internal:9999"]),
            (None, true),
            "another port"
        );
        // The address itself names every server there: the path must then tell.
        assert_eq!(route(&["10.0.0.5:8080"]), (None, false));
    }

    #[test]
    fn audited_paths_are_clipped_and_query_values_masked() {
        let c = conn("127.0.0.1:8080", vec![server("a", "/mcp")]);
        let long = format!("/mcp/{}", "é".repeat(40));
        let target = format!("{long}?session_id=s3cr3t&flag&token=abc");
        let ctx = c.context(&parts(&target), Instant::now());
        let request = ctx.head.request.as_ref().expect("request part");
        let path = request.path.as_deref().unwrap_or_default();
        assert!(
            path.len() <= 64 + "…".len() && path.ends_with('…'),
            "{path}"
        );
        assert_eq!(request.query.as_deref(), Some("session_id=*&flag&token=*"));
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
