//! `TestServer`: a real rmcp Streamable HTTP MCP server (stateless, JSON responses) with
//! per-tool call counters, on its own tokio runtime thread; plain HTTP/1.1, or TLS (rustls
//! with the ring provider) with HTTP/2 or HTTP/1.1 by ALPN.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler};
use serde_json::{json, Value};

use crate::tls::ServerCert;

/// The tools the test server offers.
pub const TOOLS: [&str; 5] = [
    "echo",
    "add",
    "start_security_scan",
    "drop_cluster",
    "secret_dump",
];

/// What reached the server.
#[derive(Default)]
pub struct Counters {
    /// tools/call requests by tool name (counted when the handler runs, whatever the outcome).
    calls: Mutex<HashMap<String, u64>>,
    /// HTTP requests on any path.
    http_requests: AtomicU64,
    /// Peer addresses of accepted TCP connections, in order.
    peers: Mutex<Vec<SocketAddr>>,
    /// TLS: negotiated ALPN protocol of each successful handshake, in order.
    alpns: Mutex<Vec<Option<String>>>,
    /// TLS: SNI host name of each successful handshake, in order.
    snis: Mutex<Vec<Option<String>>>,
    /// TLS: error of each failed handshake, in order.
    tls_errors: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct ToolServer {
    counters: Arc<Counters>,
}

fn schema(props: Value, required: &[&str]) -> Arc<JsonObject> {
    let v = json!({"type": "object", "properties": props, "required": required});
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!(),
    }
}

fn tool_list() -> Vec<Tool> {
    vec![
        Tool::new(
            "echo",
            "Echo the text back",
            schema(json!({"text": {"type": "string"}}), &["text"]),
        ),
        Tool::new(
            "add",
            "Add two numbers",
            schema(
                json!({"a": {"type": "number"}, "b": {"type": "number"}}),
                &["a", "b"],
            ),
        ),
        Tool::new(
            "start_security_scan",
            "Start a security scan of a cluster",
            schema(json!({"cluster": {"type": "string"}}), &["cluster"]),
        ),
        Tool::new(
            "drop_cluster",
            "Delete a cluster",
            schema(json!({"cluster": {"type": "string"}}), &["cluster"]),
        ),
        Tool::new("secret_dump", "Print the secrets", schema(json!({}), &[])),
    ]
}

fn str_arg<'a>(args: &'a JsonObject, key: &str) -> Result<&'a str, ErrorData> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ErrorData::invalid_params(format!("missing string argument `{key}`"), None))
}

fn num_arg(args: &JsonObject, key: &str) -> Result<serde_json::Number, ErrorData> {
    match args.get(key) {
        Some(Value::Number(n)) => Ok(n.clone()),
        _ => Err(ErrorData::invalid_params(
            format!("missing number argument `{key}`"),
            None,
        )),
    }
}

impl ServerHandler for ToolServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tool_list()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tool_list().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let name = request.name.to_string();
        *self
            .counters
            .calls
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_insert(0) += 1;
        let args = request.arguments.unwrap_or_default();
        let text = match name.as_str() {
            "echo" => str_arg(&args, "text")?.to_string(),
            "add" => {
                let (a, b) = (num_arg(&args, "a")?, num_arg(&args, "b")?);
                match (a.as_i64(), b.as_i64()) {
                    (Some(a), Some(b)) => (a + b).to_string(),
                    _ => (a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN))
                        .to_string(),
                }
            }
            "start_security_scan" => format!("scan started on {}", str_arg(&args, "cluster")?),
            "drop_cluster" => format!("dropped cluster {}", str_arg(&args, "cluster")?),
            "secret_dump" => "SECRET_TOKEN=do-not-leak-3141592653".to_string(),
            other => {
                return Err(ErrorData::invalid_params(
                    format!("Unknown tool: {other}"),
                    None,
                ))
            }
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

/// How [`TestServer::start_tls`] serves TLS.
#[derive(Clone)]
pub struct TlsOpts {
    /// The certificate chain and key the server presents.
    pub cert: ServerCert,
    /// ALPN protocols the server accepts, in its order of preference, e.g.
    /// `[b"h2", b"http/1.1"]`. Empty: no ALPN (HTTP/1.1 is served). A client that offers only
    /// protocols not listed fails the handshake (rustls sends no_application_protocol).
    pub alpn: Vec<Vec<u8>>,
    /// Demand a client certificate issued by the server certificate's CA (`cert.ca`); a
    /// client without one fails the handshake (counted in [`TestServer::tls_failures`]).
    pub require_client_cert: bool,
    /// Added to rmcp's allowed Host list, e.g. the DNS names the certificate is for.
    pub extra_hosts: Vec<String>,
}

impl TlsOpts {
    /// `cert` with ALPN `h2`, `http/1.1`, no client certificate, no extra hosts.
    pub fn new(cert: ServerCert) -> TlsOpts {
        TlsOpts {
            cert,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            require_client_cert: false,
            extra_hosts: Vec::new(),
        }
    }
}

/// The rustls server configuration for `opts`, on the ring provider (not the process default).
fn tls_server_config(opts: &TlsOpts) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .expect("TLS versions for the ring provider");
    let builder = if opts.require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(opts.cert.ca.clone())
            .expect("add the test CA as client-certificate root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("build the client-certificate verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(opts.cert.chain.clone(), opts.cert.key.clone_key())
        .unwrap_or_else(|e| panic!("TestServer TLS certificate and key: {e}"));
    config.alpn_protocols = opts.alpn.clone();
    config
}

/// A real MCP server (rmcp `StreamableHttpService`, stateless mode with JSON responses, so a
/// raw POST of a `tools/call` without `initialize` is answered) at `http://ADDR/mcp`, or with
/// [`TestServer::start_tls`] at `https://ADDR/mcp` (HTTP/2 or HTTP/1.1 by ALPN).
/// Stops on drop.
pub struct TestServer {
    addr: SocketAddr,
    tls: bool,
    counters: Arc<Counters>,
    /// Stops the server when dropped.
    _server: crate::ServerThread,
}

impl TestServer {
    /// Serve on `addr` (port 0 picks a free port). `extra_hosts` are added to rmcp's allowed
    /// Host list (the host part of `addr` is always allowed).
    pub fn start(addr: SocketAddr) -> TestServer {
        Self::start_with_hosts(addr, &[])
    }

    pub fn start_with_hosts(addr: SocketAddr, extra_hosts: &[&str]) -> TestServer {
        let hosts: Vec<String> = extra_hosts.iter().map(|h| h.to_string()).collect();
        Self::launch(addr, &hosts, None, true)
    }

    /// Like [`Self::start`], but rmcp answers every request with an SSE stream (its
    /// `json_response` off), as rmcp servers do by default.
    pub fn start_sse(addr: SocketAddr) -> TestServer {
        Self::launch(addr, &[], None, false)
    }

    /// Serve MCP over TLS on `addr` (port 0 picks a free port): each accepted connection does
    /// a TLS handshake with `opts.cert`, then is served with HTTP/2 when ALPN chose `h2`,
    /// HTTP/1.1 otherwise. Records each successful handshake's ALPN ([`Self::alpns`]) and
    /// SNI ([`Self::snis`]) and counts failed ones ([`Self::tls_failures`]). The allowed Host
    /// list is that of [`Self::start`] plus `opts.extra_hosts`.
    pub fn start_tls(addr: SocketAddr, opts: TlsOpts) -> TestServer {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_server_config(&opts)));
        Self::launch(addr, &opts.extra_hosts, Some(acceptor), true)
    }

    fn launch(
        addr: SocketAddr,
        extra_hosts: &[String],
        tls: Option<tokio_rustls::TlsAcceptor>,
        json: bool,
    ) -> TestServer {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("TestServer bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let mut hosts: Vec<String> = vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
            addr.ip().to_string(),
        ];
        hosts.extend(extra_hosts.iter().cloned());
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(json)
            .with_sse_keep_alive(None)
            .with_allowed_hosts(hosts);
        let c2 = counters.clone();
        let is_tls = tls.is_some();
        let server = crate::ServerThread::spawn(format!("mcp-server-{addr}"), move |rx| {
            serve(listener, config, c2, rx, tls)
        });
        TestServer {
            addr,
            tls: is_tls,
            counters,
            _server: server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/mcp`, or `https://ADDR/mcp` for a server started with [`Self::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/mcp", self.addr)
    }

    /// `https://{host}:{port}/mcp` with this server's port (an IPv6 `host` is bracketed).
    pub fn https_url(&self, host: &str) -> String {
        let port = self.addr.port();
        if host.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("https://[{host}]:{port}/mcp")
        } else {
            format!("https://{host}:{port}/mcp")
        }
    }

    /// Assert that no call of `tool` reached the server.
    pub fn assert_not_reached(&self, tool: &str) {
        assert_eq!(self.calls(tool), 0, "{tool} reached the server");
    }

    /// How many times tools/call for `tool` reached the server.
    pub fn calls(&self, tool: &str) -> u64 {
        self.counters
            .calls
            .lock()
            .unwrap()
            .get(tool)
            .copied()
            .unwrap_or(0)
    }

    /// All tools/call counts.
    pub fn all_calls(&self) -> HashMap<String, u64> {
        self.counters.calls.lock().unwrap().clone()
    }

    /// HTTP requests that reached the server (any method, any path).
    pub fn http_requests(&self) -> u64 {
        self.counters.http_requests.load(Ordering::SeqCst)
    }

    /// Peer addresses of the TCP connections the server accepted.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.counters.peers.lock().unwrap().clone()
    }

    /// TLS servers: the ALPN protocol negotiated on each successful handshake, in order
    /// (`None`: no ALPN agreed, served as HTTP/1.1).
    pub fn alpns(&self) -> Vec<Option<String>> {
        self.counters.alpns.lock().unwrap().clone()
    }

    /// TLS servers: the SNI host name the client sent on each successful handshake, in order
    /// (`None`: no SNI, e.g. a client connecting to an IP address).
    pub fn snis(&self) -> Vec<Option<String>> {
        self.counters.snis.lock().unwrap().clone()
    }

    /// TLS servers: how many accepted connections failed the TLS handshake (including a
    /// client without the required certificate, and handshakes not done within 10 s).
    pub fn tls_failures(&self) -> u64 {
        self.counters.tls_errors.lock().unwrap().len() as u64
    }

    /// TLS servers: the error of each failed handshake, in order.
    pub fn tls_errors(&self) -> Vec<String> {
        self.counters.tls_errors.lock().unwrap().clone()
    }
}

type Resp = http::Response<BoxBody<Bytes, Infallible>>;

/// How long a TLS client may take to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve(
    listener: std::net::TcpListener,
    config: StreamableHttpServerConfig,
    counters: Arc<Counters>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let c = counters.clone();
    let service: StreamableHttpService<ToolServer, NeverSessionManager> =
        StreamableHttpService::new(
            move || {
                Ok(ToolServer {
                    counters: c.clone(),
                })
            },
            Arc::new(NeverSessionManager::default()),
            config,
        );
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                counters.peers.lock().unwrap().push(peer);
                let service = service.clone();
                let counters = counters.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let c = counters.clone();
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        let counters = c.clone();
                        async move {
                            counters.http_requests.fetch_add(1, Ordering::SeqCst);
                            let resp: Resp = if req.uri().path() == "/mcp" {
                                service.handle(req).await
                            } else {
                                http::Response::builder()
                                    .status(http::StatusCode::NOT_FOUND)
                                    .body(Full::new(Bytes::from_static(b"Not Found")).boxed())
                                    .unwrap()
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let Some(acceptor) = tls else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                        return;
                    };
                    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            counters.tls_errors.lock().unwrap().push(e.to_string());
                            return;
                        }
                        Err(_) => {
                            counters.tls_errors.lock().unwrap().push("handshake timeout".into());
                            return;
                        }
                    };
                    let (_, session) = stream.get_ref();
                    let alpn = session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    let sni = session.server_name().map(str::to_string);
                    let h2 = alpn.as_deref() == Some("h2");
                    counters.alpns.lock().unwrap().push(alpn);
                    counters.snis.lock().unwrap().push(sni);
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        }
    }
    conns.abort_all();
}
