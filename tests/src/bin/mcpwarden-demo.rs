//! `mcpwarden-demo` (what `cargo xtask demo` runs): the whole chain on loopback, with nothing to
//! configure.
//!
//! Starts a sample MCP server (rmcp, Streamable HTTP) on 127.0.0.1, writes a sample policy, runs
//! the agent (`mcpwarden::app::Agent`) attached to a fresh cgroup, and starts an unmodified MCP
//! client (rmcp) inside that cgroup. The client makes an allowed, a denied, an unlisted and two
//! rate-limited calls; the audit log prints as it happens, one line per call, as
//! `mcpwarden audit tail --follow` prints it (`mcpwarden::audit_tail`). Everything the demo
//! creates is removed when it ends. It lives here, not in the agent, so that rmcp and reqwest
//! stay out of the production binary.
//!
//! ```text
//! mcpwarden-demo              the demo (needs root)
//! mcpwarden-demo client URL   its MCP client: started by the demo, in the redirected cgroup
//! ```
//!
//! `MCPWARDEN_DEMO_AUDIT=FILE` keeps the audit log (JSON Lines) in FILE instead of the demo's
//! temporary directory.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use mcpwarden::{
    app::Agent,
    config::{Config, EndpointUrl, Server},
    redirect::cgroup,
};
use rmcp::{
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolRequestParams, ClientConfig, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::{
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{
            session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
        },
        StreamableHttpClientTransport,
    },
    ServerHandler, ServiceExt,
};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let client_url = match args.as_slice() {
        [] => None,
        [cmd, url] if cmd == "client" => Some(url.clone()),
        _ => {
            eprintln!("usage: mcpwarden-demo            run the demo (needs root)\n       mcpwarden-demo client URL  the demo's MCP client");
            return ExitCode::from(2);
        }
    };
    // rmcp's HTTP client uses reqwest built without a crypto provider of its own; the agent's
    // TLS configs name ring explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn")),
        )
        .init();
    // The sample server and the agent's control plane share this runtime.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcpwarden-demo: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match client_url {
            None => run().await,
            Some(url) => client(&url).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpwarden-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sample policy: PolicyLayer's format, as a user would write it.
const DEMO_POLICY: &str = r#"{
  "version": "1",
  "default": "deny",
  "tools": {
    "echo": {},
    "start_security_scan": {
      "limits": [ { "counter": "start_security_scan_rate", "window": "minute", "max": 1, "scope": "grant" } ]
    },
    "drop_cluster": { "action": "deny", "reason": "destructive" }
  }
}
"#;

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct TextArg {
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct ClusterArg {
    cluster: String,
}

/// The sample MCP server's tools.
#[derive(Debug, Clone)]
struct SampleServer {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl SampleServer {
    #[tool(description = "Echo the text back")]
    fn echo(&self, Parameters(TextArg { text }): Parameters<TextArg>) -> String {
        text
    }

    #[tool(description = "Start a security scan of a cluster")]
    fn start_security_scan(
        &self,
        Parameters(ClusterArg { cluster }): Parameters<ClusterArg>,
    ) -> String {
        format!("scan of {cluster} started")
    }

    #[tool(description = "Delete a cluster")]
    fn drop_cluster(&self, Parameters(ClusterArg { cluster }): Parameters<ClusterArg>) -> String {
        format!("cluster {cluster} dropped")
    }

    #[tool(description = "Dump every secret")]
    fn dump_secrets(&self) -> String {
        "s3cr3t".to_owned()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SampleServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// Serve the sample server's Streamable HTTP endpoint at `/mcp` on `listener` until dropped.
async fn serve_sample(listener: TcpListener) {
    let service: StreamableHttpService<SampleServer, LocalSessionManager> =
        StreamableHttpService::new(
            || {
                Ok(SampleServer {
                    tool_router: SampleServer::tool_router(),
                })
            },
            Default::default(),
            StreamableHttpServerConfig::default(),
        );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let service = service.clone();
                    async move {
                        if req.uri().path() != "/mcp" {
                            let mut not_found = http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"not found\n",
                                ))
                                .map_err(|never| match never {})
                                .boxed(),
                            );
                            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
                            return Ok::<_, Infallible>(not_found);
                        }
                        Ok(service.handle(req).await)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

use http_body_util::BodyExt as _;

/// Removes the demo's files and cgroups, and moves the demo process back where it came from.
struct Cleanup {
    home_cgroup: Option<PathBuf>,
    cgroups: Vec<PathBuf>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(home) = &self.home_cgroup {
            let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
        }
        for cg in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(cg);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cgroup this process is in now, from /proc/self/cgroup (`0::/path`).
fn current_cgroup(mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

async fn run() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads eBPF programs and creates cgroups: run it as root (cargo xtask demo does)");
    }
    let mount = cgroup::cgroup2_mount()?;
    let tag = format!("mcpwarden-demo-{}", std::process::id());
    let clients = mount.join(&tag);
    let agent_cg = mount.join(format!("{tag}-agent"));
    let dir = std::env::temp_dir().join(&tag);
    let _cleanup = Cleanup {
        home_cgroup: current_cgroup(&mount),
        cgroups: vec![clients.clone(), agent_cg.clone()],
        dir: dir.clone(),
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&clients).with_context(|| format!("creating {}", clients.display()))?;
    let policy = dir.join("policy.json");
    std::fs::write(&policy, DEMO_POLICY)?;

    // The audit log: a file, followed and printed one line per call while the demo runs.
    let audit = match std::env::var_os("MCPWARDEN_DEMO_AUDIT") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => dir.join("audit.jsonl"),
    };

    let server = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let server_task = tokio::spawn(serve_sample(server));
    let url = format!("http://{server_addr}/mcp");

    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0)), "[::1]:0".parse()?],
        audit: audit.clone(),
        audit_stall: mcpwarden::audit::DEFAULT_STALL,
        audit_options: Default::default(),
        cgroup: clients.clone(),
        agent_cgroup: agent_cg.clone(),
        // The demo's clients share the agent's network namespace: no pins to watch.
        netns_dirs: Vec::new(),
        raw_sockets: Default::default(),
        // The demo's programs go with it: nothing is pinned, and its own (empty) bpffs
        // directory keeps it clear of an installed agent's pins.
        failure_mode: mcpwarden::config::FailureMode::Open,
        bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
        layout_salt: String::new(),
        drain: std::time::Duration::from_secs(mcpwarden::config::DEFAULT_DRAIN_SECONDS),
        max_body_bytes: mcpwarden::mcp::DEFAULT_MAX_BODY,
        workers: 1,
        servers: vec![Server {
            name: "demo".into(),
            url: EndpointUrl::parse(&url).map_err(anyhow::Error::msg)?,
            policy: policy.clone(),
            tls: Default::default(),
            upstream_ca: None,
            passthrough_paths: Vec::new(),
            scope: None,
            log_arguments: false,
        }],
        // A plaintext demo needs no CA; the state dir would only be used for https servers.
        ca: mcpwarden::ca::CaSettings {
            state_dir: dir.join("state"),
            ..Default::default()
        },
        tls_prewarm: true,
        bindings: Vec::new(),
        identity_wait: std::time::Duration::from_millis(
            mcpwarden::config::DEFAULT_IDENTITY_WAIT_MS,
        ),
        limits: Default::default(),
        // No config file: a reload re-reads the policy file only.
        flags: mcpwarden::config::Flags::default(),
        // Its own admin socket; no metrics listener (nothing to scrape a demo).
        approvals: mcpwarden::approvals::Settings::default(),
        kubernetes: mcpwarden::k8s::Settings {
            mode: mcpwarden::k8s::Mode::Off,
            ..Default::default()
        },
        operate: mcpwarden::config::Operate {
            admin_socket: dir.join("admin.sock"),
            admin_group: None,
            metrics_listen: None,
        },
    };
    println!("mcpwarden demo");
    println!("  sample MCP server : {url}");
    println!("  policy            : {}", policy.display());
    println!("{DEMO_POLICY}");
    let agent = Agent::start(&config).await?;
    println!(
        "  agent             : interceptor on {:?}, attached to {}",
        agent.listen,
        clients.display()
    );
    println!(
        "  client            : an unmodified rmcp client in {}, dialling {url}\n",
        clients.display()
    );
    println!(
        "audit log ({}: one line per call, as it happens; `mcpwarden audit tail --follow` prints it so):",
        audit.display()
    );
    let tail = follow_audit(&audit);

    let exe = std::env::current_exe().context("finding the mcpwarden-demo binary")?;
    let procs = clients.join("cgroup.procs");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("client")
        .arg(&url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: pre_exec runs in the forked child before exec; it only writes to a file.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let status = tokio::time::timeout(Duration::from_secs(60), cmd.status())
        .await
        .context("the demo client did not finish within 60 s")??;
    agent.stop().await;
    tail.finish().await;
    server_task.abort();
    if !status.success() {
        bail!("the demo client failed: {status}");
    }
    println!("\ndemo finished: the programs are detached and the demo cgroups removed");
    Ok(())
}

/// The audit log printed as it grows, on a thread of its own; stopped when dropped.
struct Tail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

fn follow_audit(path: &Path) -> Tail {
    use mcpwarden::audit_tail;
    println!("{}", audit_tail::header());
    let opts = audit_tail::Options {
        file: Some(path.to_owned()),
        follow: true,
        color: audit_tail::ColorWhen::Auto.enabled(),
        poll: Duration::from_millis(50),
        ..Default::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = tokio::task::spawn_blocking(move || {
        audit_tail::run(&opts, &mut std::io::stdout(), Some(&flag))
    });
    Tail {
        stop,
        thread: Some(thread),
    }
}

impl Tail {
    /// Print what is left (the agent has stopped: its last records are written) and stop.
    async fn finish(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return;
        };
        match thread.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("mcpwarden-demo: reading the audit log: {e}"),
            Err(e) => eprintln!("mcpwarden-demo: the audit log reader failed: {e}"),
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The demo's client: plain rmcp, no knowledge of mcpwarden.
async fn client(url: &str) -> Result<()> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()),
    );
    let client = ClientConfig::default()
        .serve(transport)
        .await
        .context("connecting to the MCP server")?;
    let calls: [(&str, serde_json::Value, &str); 5] = [
        ("echo", serde_json::json!({"text": "hello"}), "allowed"),
        (
            "drop_cluster",
            serde_json::json!({"cluster": "prod"}),
            "denied by the policy",
        ),
        (
            "dump_secrets",
            serde_json::json!({}),
            "not in the policy: hidden under default deny",
        ),
        (
            "start_security_scan",
            serde_json::json!({"cluster": "prod"}),
            "allowed, first of 1 per minute",
        ),
        (
            "start_security_scan",
            serde_json::json!({"cluster": "staging"}),
            "rate-limited",
        ),
    ];
    for (tool, args, expect) in calls {
        let serde_json::Value::Object(map) = args else {
            continue;
        };
        let outcome = match client
            .call_tool(CallToolRequestParams::new(tool).with_arguments(map))
            .await
        {
            Ok(result) => {
                let text: Vec<String> = result
                    .content
                    .iter()
                    .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                    .collect();
                let kind = if result.is_error == Some(true) {
                    "tool error"
                } else {
                    "ok"
                };
                format!("{kind}: {}", text.join(" "))
            }
            Err(e) => format!("JSON-RPC error: {e}"),
        };
        println!("client: call {tool:<20} (expect {expect}) -> {outcome}");
    }
    let _ = client.cancel().await;
    Ok(())
}
