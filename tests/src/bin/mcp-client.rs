//! A real, unmodified MCP client for the integration tests, run as a subprocess inside a test
//! cgroup. Prints `pid=<n>` first, always.
//!
//! ```text
//! mcp-client call URL TOOL JSONARGS [TOOL JSONARGS]...   rmcp client over Streamable HTTP:
//!     initialize, then each call; one JSON line per call: the CallToolResult, or
//!     {"error": {"code": N, "message": "...", "data": ...}} for a JSON-RPC error,
//!     {"error": {"transport": "..."}} for anything else.
//! mcp-client raw-post URL BODY [HEADER: VALUE]...        one hand-written HTTP/1.1 POST:
//!     prints status=<status line>, header=<name: value> lines, body-len=<n>, then the body bytes.
//! mcp-client raw-request METHOD URL BODY [HEADER: VALUE]... the same with another method.
//! mcp-client raw-post-big URL BYTES                      raw-post of an echo tools/call padded
//!     to at least BYTES bytes (larger than a command line can carry).
//! mcp-client sse-get URL                                 GET an SSE stream; prints
//!     status=<status line>, then event=<data> for each `data:` line as soon as it arrives.
//! mcp-client peer ADDR [URLPATH BODY]                     TCP connect; prints peer= and local=
//!     (getpeername, getsockname); with URLPATH and BODY, POSTs BODY on that connection and
//!     prints the response like raw-post.
//! mcp-client keepalive URL BODY...                       several POSTs on one keep-alive
//!     connection, each after the previous response; one JSON line per response:
//!     {"status": N, "body": "..."} or {"no_response": "...", "received": "..."}.
//! mcp-client pipeline URL BODY...                        the same, all requests written at once.
//! mcp-client tcp-echo ADDR MSG                            sends MSG, half-closes, prints echo=,
//!     peer=, local=.
//! mcp-client udp-echo ADDR MSG                            connect()ed UDP socket: sends MSG,
//!     prints echo=, from= (recvfrom source) and peer= (getpeername).
//! ```
//!
//! The tokio runtime is single-threaded on purpose: every connect() is made by the main
//! thread, whose comm is "mcp-client", whichever way the agent reads the caller's comm.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use mcpwarden_tests::rawhttp::{self, RawOutcome};

const TIMEOUT: Duration = Duration::from_secs(30);

fn usage() -> ExitCode {
    eprintln!(
        "usage: mcp-client call URL TOOL JSONARGS [TOOL JSONARGS]... | raw-post URL BODY [HEADER: VALUE]... | \
         raw-request METHOD URL BODY [HEADER: VALUE]... | keepalive URL BODY... | pipeline URL BODY... | \
         peer ADDR [URLPATH BODY] | tcp-echo ADDR MSG | udp-echo ADDR MSG | sse-get URL | raw-post-big URL BYTES"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    println!("pid={}", std::process::id());
    let _ = std::io::stdout().flush();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let rest = &args[1..];
    let code = match cmd.as_str() {
        "call" if rest.len() >= 3 && rest.len() % 2 == 1 => call(&rest[0], &rest[1..]),
        "raw-post" if rest.len() >= 2 => raw_request("POST", &rest[0], &rest[1], &rest[2..]),
        "raw-request" if rest.len() >= 3 => raw_request(&rest[0], &rest[1], &rest[2], &rest[3..]),
        "peer" if rest.len() == 1 || rest.len() == 3 => {
            peer(&rest[0], rest.get(1).zip(rest.get(2)))
        }
        "keepalive" if rest.len() >= 2 => many(&rest[0], &rest[1..], false),
        "pipeline" if rest.len() >= 2 => many(&rest[0], &rest[1..], true),
        "tcp-echo" if rest.len() == 2 => tcp_echo(&rest[0], &rest[1]),
        "udp-echo" if rest.len() == 2 => udp_echo(&rest[0], &rest[1]),
        "sse-get" if rest.len() == 1 => sse_get(&rest[0]),
        "raw-post-big" if rest.len() == 2 => raw_post_big(&rest[0], &rest[1]),
        _ => return usage(),
    };
    let _ = std::io::stdout().flush();
    code
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

fn print_outcome(outcome: RawOutcome) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match outcome {
        RawOutcome::Response(r) => {
            let _ = writeln!(out, "status={}", r.status_line);
            for (k, v) in &r.headers {
                let _ = writeln!(out, "header={k}: {v}");
            }
            let _ = writeln!(out, "body-len={}", r.body.len());
            let _ = out.write_all(&r.body);
            ExitCode::SUCCESS
        }
        RawOutcome::NoResponse { received, reason } => {
            let _ = writeln!(out, "no-response={reason}");
            let _ = writeln!(out, "received-len={}", received.len());
            let _ = out.write_all(&received);
            ExitCode::from(3)
        }
    }
}

fn many(url: &str, bodies: &[String], pipelined: bool) -> ExitCode {
    let bodies: Vec<&[u8]> = bodies.iter().map(|b| b.as_bytes()).collect();
    let mut code = ExitCode::SUCCESS;
    for outcome in rawhttp::post_many(url, &bodies, pipelined, TIMEOUT) {
        let line = match outcome {
            RawOutcome::Response(r) => serde_json::json!({
                "status": r.status,
                "body": String::from_utf8_lossy(&r.body),
            }),
            RawOutcome::NoResponse { received, reason } => {
                code = ExitCode::from(3);
                serde_json::json!({"no_response": reason, "received": String::from_utf8_lossy(&received)})
            }
        };
        println!("{line}");
    }
    code
}

fn raw_request(method: &str, url: &str, body: &str, headers: &[String]) -> ExitCode {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .unwrap_or_else(|| panic!("header must be `Name: value`: {h}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    print_outcome(rawhttp::request(
        method,
        url,
        body.as_bytes(),
        &headers,
        TIMEOUT,
    ))
}

/// Connect and print what the socket reports as its peer and local addresses (`getpeername`,
/// `getsockname`), or `connect-error=…`.
fn connect_and_report(addr: SocketAddr) -> Option<TcpStream> {
    let s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error={e}");
            return None;
        }
    };
    let show = |r: std::io::Result<SocketAddr>| {
        r.map(|a| a.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    };
    println!("peer={}", show(s.peer_addr()));
    println!("local={}", show(s.local_addr()));
    Some(s)
}

fn peer(addr: &str, post: Option<(&String, &String)>) -> ExitCode {
    let addr = parse_addr(addr);
    let Some(mut s) = connect_and_report(addr) else {
        return ExitCode::from(1);
    };
    let _ = std::io::stdout().flush();
    match post {
        None => ExitCode::SUCCESS,
        Some((path, body)) => {
            let host = addr.to_string();
            print_outcome(rawhttp::post_on(
                &mut s,
                &host,
                path,
                body.as_bytes(),
                &[],
                TIMEOUT,
            ))
        }
    }
}

fn tcp_echo(addr: &str, msg: &str) -> ExitCode {
    let addr = parse_addr(addr);
    let Some(mut s) = connect_and_report(addr) else {
        return ExitCode::from(1);
    };
    s.set_read_timeout(Some(TIMEOUT)).ok();
    if let Err(e) = s
        .write_all(msg.as_bytes())
        .and_then(|_| s.shutdown(std::net::Shutdown::Write))
    {
        println!("write-error={e}");
        return ExitCode::from(1);
    }
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {
            println!("echo={}", String::from_utf8_lossy(&buf));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("read-error={e}");
            println!("echo={}", String::from_utf8_lossy(&buf));
            ExitCode::from(1)
        }
    }
}

fn raw_post_big(url: &str, bytes: &str) -> ExitCode {
    let Ok(n) = bytes.parse::<usize>() else {
        return usage();
    };
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x".repeat(n)}}});
    print_outcome(rawhttp::post(
        url,
        body.to_string().as_bytes(),
        &[],
        TIMEOUT,
    ))
}

/// Read an SSE stream as it arrives, printing each `data:` line at once (stdout is flushed per
/// line), so a test can tell an event delivered while the stream is open from one held back.
/// Chunked framing is not decoded: chunk-size lines never start with `data:`.
fn sse_get(url: &str) -> ExitCode {
    use std::io::BufRead;
    let (addr, host, path) = rawhttp::parse_url(url);
    let Some(mut s) = connect_and_report(addr) else {
        return ExitCode::from(1);
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n");
    if let Err(e) = s.write_all(request.as_bytes()) {
        println!("write-error={e}");
        return ExitCode::from(1);
    }
    s.set_read_timeout(Some(TIMEOUT)).ok();
    let mut lines = std::io::BufReader::new(s).lines();
    if let Some(Ok(status)) = lines.next() {
        println!("status={}", status.trim_end());
    }
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data:") {
            println!("event={}", data.trim());
            let _ = std::io::stdout().flush();
        }
    }
    ExitCode::SUCCESS
}

fn udp_echo(addr: &str, msg: &str) -> ExitCode {
    let addr = parse_addr(addr);
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).expect("bind udp");
    if let Err(e) = s.connect(addr) {
        println!("connect-error={e}");
        return ExitCode::from(1);
    }
    println!(
        "peer={}",
        s.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    if let Err(e) = s.send(msg.as_bytes()) {
        println!("send-error={e}");
        return ExitCode::from(1);
    }
    let mut buf = [0u8; 65536];
    // recv_from on a connected UDP socket also reports the source address.
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            println!("echo={}", String::from_utf8_lossy(&buf[..n]));
            println!("from={from}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("recv-error={e}");
            ExitCode::from(1)
        }
    }
}

fn call(url: &str, pairs: &[String]) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(call_async(url, pairs))
}

async fn call_async(url: &str, pairs: &[String]) -> ExitCode {
    use rmcp::model::{CallToolRequestParams, ClientConfig, JsonObject};
    use rmcp::service::ServiceError;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::ServiceExt;

    let mut calls: Vec<(String, JsonObject)> = Vec::new();
    for pair in pairs.chunks(2) {
        let args: serde_json::Value = serde_json::from_str(&pair[1])
            .unwrap_or_else(|e| panic!("JSONARGS for {} is not JSON: {e}", pair[0]));
        let serde_json::Value::Object(map) = args else {
            panic!("JSONARGS for {} must be an object", pair[0])
        };
        calls.push((pair[0].clone(), map));
    }

    let transport = StreamableHttpClientTransport::from_uri(url.to_string());
    let client = match tokio::time::timeout(TIMEOUT, ClientConfig::default().serve(transport)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            println!("{}", serde_json::json!({"init_error": e.to_string()}));
            return ExitCode::from(1);
        }
        Err(_) => {
            println!("{}", serde_json::json!({"init_error": "timeout"}));
            return ExitCode::from(1);
        }
    };
    let mut code = ExitCode::SUCCESS;
    for (tool, args) in calls {
        let params = CallToolRequestParams::new(tool).with_arguments(args);
        let line = match tokio::time::timeout(TIMEOUT, client.call_tool(params)).await {
            Ok(Ok(result)) => serde_json::to_value(&result).expect("serialize CallToolResult"),
            Ok(Err(ServiceError::McpError(e))) => {
                serde_json::json!({"error": {"code": e.code.0, "message": e.message, "data": e.data}})
            }
            Ok(Err(other)) => {
                code = ExitCode::from(1);
                serde_json::json!({"error": {"transport": other.to_string()}})
            }
            Err(_) => {
                code = ExitCode::from(1);
                serde_json::json!({"error": {"transport": "timeout"}})
            }
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.cancel()).await;
    code
}
