//! Forwarding to the original destination: the request shaped for the upstream in one place
//! (its URI, version and hop-by-hop headers), sent over the worker's pools, the answer's head
//! cleaned.

use std::time::Instant;

use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;

use super::{
    conn::Conn,
    reply::{json_response, plain_response},
    upstream::{strip_hop_by_hop, Body, TlsKey},
};
use crate::{audit::Record, mcp};

/// A request that could not be forwarded.
pub(super) struct Failed {
    /// What the client gets (502, or 400 for a target that cannot be written).
    pub response: Response<Body>,
    /// Why, for the audit record.
    pub reason: String,
    /// The request certainly never reached the server.
    pub not_sent: bool,
}

impl Failed {
    /// `upstream failed (HTTP 502 from mcpwarden): …`, as response records say.
    pub fn audit_reason(&self) -> String {
        format!(
            "upstream failed (HTTP {} from mcpwarden): {}",
            self.response.status(),
            self.reason
        )
    }
}

/// Ask for an uncompressed answer: a compressed one could not be read.
pub(super) fn identity_encoding(headers: &mut http::HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// The 503 for a request whose records could not be written.
fn audit_unavailable(id: Option<&serde_json::Value>) -> Response<Body> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        mcp::error_response(
            id,
            -32603,
            "mcpwarden cannot write its audit log; the request was not forwarded",
        ),
    )
}

impl Conn {
    /// Write a record that must reach the kernel before its request is forwarded; on failure the
    /// request is not forwarded and the client gets a 503 carrying a JSON-RPC error for `id`.
    pub(super) fn audit_before_forwarding(
        &self,
        rec: &Record,
        id: Option<&serde_json::Value>,
    ) -> Result<(), Box<Response<Body>>> {
        self.audit.write(rec).map_err(|e| {
            tracing::error!(error = %e, "audit write failed: refusing to forward");
            Box::new(audit_unavailable(id))
        })
    }

    /// [`Conn::audit_before_forwarding`] for several records, in one write.
    pub(super) fn audit_all_before_forwarding(
        &self,
        recs: &[Record],
        id: Option<&serde_json::Value>,
    ) -> Result<(), Box<Response<Body>>> {
        match recs {
            [] => Ok(()),
            [one] => self.audit_before_forwarding(one, id),
            many => self.audit.write_all(many).map_err(|e| {
                tracing::error!(error = %e, "audit write failed: refusing to forward");
                Box::new(audit_unavailable(id))
            }),
        }
    }

    /// Forward and write `rec` (with status and latency) once the response head arrives.
    pub(super) async fn forward(
        &self,
        rec: Record,
        parts: Parts,
        body: Body,
        started: Instant,
    ) -> Response<Body> {
        let result = self.send(parts, body).await;
        match result {
            Ok(resp) => {
                let rec = rec.answered(Some(resp.status().as_u16()), started);
                self.write_audit_deferred(&rec);
                resp
            }
            Err(failed) => {
                let rec = rec.answered(None, started).because(failed.audit_reason());
                self.write_audit_deferred(&rec);
                failed.response
            }
        }
    }

    /// The URI the upstream request is written with. Plaintext: `http://DST/path` (the pool keys
    /// on it; origin form goes on the wire and Host stays the client's). TLS: `https://AUTHORITY
    /// /path`, the client's own authority (h2 takes `:authority` from it; HTTP/1.1 writes origin
    /// form and keeps the client's Host).
    fn upstream_uri(&self, parts: &Parts) -> Result<Uri, http::Error> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let builder = match &self.tls {
            None => Uri::builder()
                .scheme("http")
                .authority(self.dst.to_string()),
            Some(tls) => {
                let authority = parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_else(|| match &tls.sni {
                        Some(n) => n.clone(),
                        None => self.dst.to_string(),
                    });
                Uri::builder().scheme("https").authority(authority)
            }
        };
        builder.path_and_query(pq).build()
    }

    /// Send to the original destination. Same protocol both sides for TLS (the client chose it
    /// from what the server speaks); HTTP/1.1 to plaintext servers.
    pub(super) async fn send(
        &self,
        mut parts: Parts,
        body: Body,
    ) -> Result<Response<Body>, Failed> {
        strip_hop_by_hop(&mut parts.headers);
        parts.uri = match self.upstream_uri(&parts) {
            Ok(uri) => uri,
            Err(e) => {
                return Err(Failed {
                    response: plain_response(
                        StatusCode::BAD_REQUEST,
                        "mcpwarden: bad request target\n",
                    ),
                    reason: format!("bad request target: {e}"),
                    not_sent: true,
                })
            }
        };
        let result = match &self.tls {
            None => {
                parts.version = http::Version::HTTP_11;
                self.upstream
                    .send(&self.netns, Request::from_parts(parts, body))
                    .await
            }
            Some(tls) => {
                parts.version = if tls.h2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                };
                let key = TlsKey {
                    netns: self.netns.cookie,
                    dst: self.dst,
                    sni: tls.sni.clone(),
                    server: tls.server,
                    h2: tls.h2,
                };
                self.upstream
                    .send_tls(
                        &self.netns,
                        key,
                        &tls.client,
                        Request::from_parts(parts, body),
                    )
                    .await
            }
        };
        match result {
            Ok(resp) => {
                let (mut head, body) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                Ok(Response::from_parts(head, body.boxed()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "forwarding failed");
                Err(Failed {
                    response: plain_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("mcpwarden: the MCP server could not be reached: {e}\n"),
                    ),
                    reason: e.to_string(),
                    not_sent: e.not_sent(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Request;

    use super::super::{
        conn::{rig, TlsSession},
        upstream::{upstream_roots, TlsClient},
    };

    fn uri(c: &super::Conn, target: &str, host: Option<&str>) -> String {
        let mut req = Request::get(target);
        if let Some(h) = host {
            req = req.header(http::header::HOST, h);
        }
        let parts = req.body(()).expect("a request").into_parts().0;
        c.upstream_uri(&parts).expect("a URI").to_string()
    }

    #[test]
    fn plaintext_goes_to_the_original_destination_whatever_the_target_names() {
        let c = rig::conn("10.0.0.5:8080", vec![rig::server("a", "/mcp")]);
        assert_eq!(
            uri(&c, "/mcp?x=1", Some("evil")),
            "http://10.0.0.5:8080/mcp?x=1"
        );
        assert_eq!(
            uri(&c, "http://evil.example/mcp", None),
            "http://10.0.0.5:8080/mcp",
            "absolute form: only its path and query are kept"
        );
    }

    #[test]
    fn tls_keeps_the_clients_authority_else_its_sni_else_the_address() {
        let mut c = rig::conn("10.0.0.5:443", vec![rig::server("a", "/mcp")]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(upstream_roots(&[], None).expect("system roots"));
        let client = Arc::new(TlsClient::new(provider, roots).expect("a TLS client"));
        c.terminated(TlsSession {
            sni: Some("tools.example".into()),
            h2: false,
            server: 0,
            client: client.clone(),
        });
        assert_eq!(
            uri(&c, "/mcp", Some("tools.example")),
            "https://tools.example/mcp"
        );
        assert_eq!(
            uri(&c, "https://tools.example:8443/mcp", None),
            "https://tools.example:8443/mcp"
        );
        c.terminated(TlsSession {
            sni: None,
            h2: false,
            server: 0,
            client,
        });
        assert_eq!(uri(&c, "/mcp", None), "https://10.0.0.5:443/mcp");
    }
}
