//! `TestServer`: a real rmcp Streamable HTTP MCP server (stateless, JSON responses) with
//! per-tool call counters, on its own tokio runtime thread.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

/// A real MCP server (rmcp `StreamableHttpService`, stateless mode with JSON responses, so a
/// raw POST of a `tools/call` without `initialize` is answered) at `http://ADDR/mcp`.
/// Stops on drop.
pub struct TestServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serve on `addr` (port 0 picks a free port). `extra_hosts` are added to rmcp's allowed
    /// Host list (the host part of `addr` is always allowed).
    pub fn start(addr: SocketAddr) -> TestServer {
        Self::start_with_hosts(addr, &[])
    }

    pub fn start_with_hosts(addr: SocketAddr, extra_hosts: &[&str]) -> TestServer {
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
        hosts.extend(extra_hosts.iter().map(|h| h.to_string()));
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .with_allowed_hosts(hosts);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c2 = counters.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mcp-server-{addr}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(serve(listener, config, c2, rx));
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
            })
            .expect("spawn server thread");
        TestServer {
            addr,
            counters,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/mcp`
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
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
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Resp = http::Response<BoxBody<Bytes, Infallible>>;

async fn serve(
    listener: std::net::TcpListener,
    config: StreamableHttpServerConfig,
    counters: Arc<Counters>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
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
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        let counters = counters.clone();
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
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    conns.abort_all();
}
