//! A real, unmodified MCP client for the integration tests, run as a subprocess inside a test
//! cgroup. Prints `pid=<n>` first, always.
//!
//! ```text
//! mcp-client call URL TOOL JSONARGS [TOOL JSONARGS]...   rmcp client over Streamable HTTP:
//!     initialize, then each call; one JSON line per call: the CallToolResult, or
//!     {"error": {"code": N, "message": "...", "data": ...}} for a JSON-RPC error,
//!     {"error": {"transport": "...", "causes": [...]}} for anything else (causes: the messages
//!     of the error's source chain, where a TLS error shows), and
//!     {"init_error": "...", "causes": [...]} if initialize fails. http:// or https://, with
//!     rmcp's own default reqwest client (over TLS it offers ALPN h2 and http/1.1). The pseudo
//!     TOOL `@list` (its JSONARGS ignored) prints {"tools": [names]} from rmcp's tools/list.
//! mcp-client call-h1 URL TOOL JSONARGS...                the same with a reqwest client that
//!     speaks only HTTP/1.1 (ALPN http/1.1 over TLS).
//! mcp-client call-h2 URL TOOL JSONARGS...                the same with a reqwest client that
//!     speaks only HTTP/2 (ALPN h2 only over TLS; h2c prior knowledge over http://).
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
//! mcp-client peer-from LOCAL ADDR [URLPATH BODY]        `peer`, from the local address LOCAL
//!     (bound with SO_REUSEADDR first).
//! mcp-client peer-abort LOCAL ADDR                        `peer-from`, then close with a reset
//!     (SO_LINGER 0): the port is free again at once.
//! mcp-client keepalive URL BODY...                       several POSTs on one keep-alive
//!     connection, each after the previous response; one JSON line per response:
//!     {"status": N, "body": "..."} or {"no_response": "...", "received": "..."}.
//! mcp-client pipeline URL BODY...                        the same, all requests written at once.
//! mcp-client tcp-echo ADDR MSG                            sends MSG, half-closes, prints echo=,
//!     peer=, local=.
//! mcp-client udp-echo ADDR MSG                            connect()ed UDP socket: sends MSG,
//!     prints echo=, from= (recvfrom source) and peer= (getpeername).
//! mcp-client udp-sendto ADDR MSG                          unconnected UDP socket: sendto ADDR;
//!     prints sent=<n> or send-error=<message> (exit 1).
//! mcp-client raw-socket inet|packet                       socket(AF_INET, SOCK_RAW, IPPROTO_TCP)
//!     or socket(AF_PACKET, SOCK_RAW, 0); prints socket=ok or socket-error=<message> (exit 1).
//! mcp-client listen ADDR                                  bind and listen on ADDR; prints
//!     bound=<addr> or bind-error=<message> (exit 1).
//! mcp-client tls-raw ADDR SNI CAFILE METHOD PATH HOST BODY [HEADER: VALUE]...
//!     a hand-made TLS connection (roots: only CAFILE's certificates; SNI `-`: none, the
//!     certificate is checked against ADDR's IP) offering ALPN http/1.1, then one HTTP/1.1
//!     request with exactly `Host: HOST` and `Connection: close`. Prints tls=ok or
//!     tls-error=<message> (exit 3; also when the server rejects the client after the
//!     handshake, as a TLS 1.3 server demanding a client certificate does), then what is
//!     known of alpn=<protocol or none>, peer-cert-sha256=<hex of the leaf DER>,
//!     peer-cert-sans=<comma-separated DNS names and IPs>, then the response like raw-post.
//!     A failed TCP connect prints connect-error=<message> instead (exit 1).
//! mcp-client tls-handshakes ADDR SNI CAFILE N            N concurrent TLS handshakes (one
//!     thread each, released together), each closed after the handshake (close_notify, then
//!     reading until the server closes, at most 2 s, so that a rejection sent after the
//!     handshake counts). Prints ok=<n>, errors=<n>, first-error=<message> (if any, the
//!     lowest-numbered failing handshake), distinct-certs=<n>, and cert-sha256=<hex> for each
//!     distinct leaf certificate seen (sorted). Exit 3 if any handshake failed.
//! mcp-client script FILE                                 run a JSON script of raw HTTP/1.1 and
//!     SSE steps (any MCP transport byte for byte, keep-alive connections, SSE streams read in
//!     the background, requests written in pieces); one JSON line per step. The format is
//!     documented in `mcpwarden_tests::script` (tests/src/script.rs). Exit 2 if FILE is not a
//!     script.
//! ```
//!
//! Trust for `call*` comes from the environment: reqwest uses rustls-platform-verifier,
//! which on Linux loads its roots with rustls-native-certs, which reads only `SSL_CERT_FILE`
//! (PEM) and/or `SSL_CERT_DIR` when either is set, the system store otherwise. Note that
//! reqwest builds that verifier even for http:// URLs, so building the client fails when no
//! root at all can be loaded. rustls uses the ring provider, installed as the process default
//! at start (reqwest is built without one).
//!
//! The tokio runtime is single-threaded on purpose: every connect() is made by the main
//! thread, whose comm is "mcp-client", whichever way the agent reads the caller's comm.
//! (tls-handshakes is the exception: its connects are made by its N threads.)

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use mcpwarden_tests::rawhttp::{self, RawOutcome};

const TIMEOUT: Duration = Duration::from_secs(30);

fn usage() -> ExitCode {
    eprintln!(
        "usage: mcp-client call URL TOOL JSONARGS [TOOL JSONARGS]... (TOOL @list: list tools) | call-h1 URL TOOL JSONARGS... | \
         call-h2 URL TOOL JSONARGS... | raw-post URL BODY [HEADER: VALUE]... | \
         raw-request METHOD URL BODY [HEADER: VALUE]... | keepalive URL BODY... | pipeline URL BODY... | \
         peer ADDR [URLPATH BODY] | tcp-echo ADDR MSG | udp-echo ADDR MSG | udp-sendto ADDR MSG | raw-socket inet|packet | listen ADDR | sse-get URL | raw-post-big URL BYTES | \
         tls-raw ADDR SNI|- CAFILE METHOD PATH HOST BODY [HEADER: VALUE]... | tls-handshakes ADDR SNI|- CAFILE N | \
         script FILE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // reqwest is built with rustls but without a crypto provider (rmcp's
    // reqwest-tls-no-provider): make ring the process default before any client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!("pid={}", std::process::id());
    let _ = std::io::stdout().flush();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let rest = &args[1..];
    let code = match cmd.as_str() {
        "call" if rest.len() >= 3 && rest.len() % 2 == 1 => {
            call(&rest[0], &rest[1..], HttpMode::Default)
        }
        "call-h1" if rest.len() >= 3 && rest.len() % 2 == 1 => {
            call(&rest[0], &rest[1..], HttpMode::Http1)
        }
        "call-h2" if rest.len() >= 3 && rest.len() % 2 == 1 => {
            call(&rest[0], &rest[1..], HttpMode::Http2)
        }
        "tls-raw" if rest.len() >= 7 => tls_raw(&rest[0], &rest[1], &rest[2], &rest[3..]),
        "tls-handshakes" if rest.len() == 4 => {
            tls_handshakes(&rest[0], &rest[1], &rest[2], &rest[3])
        }
        "raw-post" if rest.len() >= 2 => raw_request("POST", &rest[0], &rest[1], &rest[2..]),
        "raw-request" if rest.len() >= 3 => raw_request(&rest[0], &rest[1], &rest[2], &rest[3..]),
        "peer" if rest.len() == 1 || rest.len() == 3 => {
            peer(&rest[0], rest.get(1).zip(rest.get(2)))
        }
        "keepalive" if rest.len() >= 2 => many(&rest[0], &rest[1..], false),
        "pipeline" if rest.len() >= 2 => many(&rest[0], &rest[1..], true),
        "peer-from" if rest.len() == 2 || rest.len() == 4 => {
            peer_from(&rest[0], &rest[1], rest.get(2).zip(rest.get(3)), false)
        }
        "peer-abort" if rest.len() == 2 => peer_from(&rest[0], &rest[1], None, true),
        "tcp-echo" if rest.len() == 2 => tcp_echo(&rest[0], &rest[1]),
        "udp-echo" if rest.len() == 2 => udp_echo(&rest[0], &rest[1]),
        "udp-sendto" if rest.len() == 2 => udp_sendto(&rest[0], &rest[1]),
        "raw-socket" if rest.len() == 1 => raw_socket(&rest[0]),
        "listen" if rest.len() == 1 => listen(&rest[0]),
        "hold" if rest.len() == 1 => hold(&rest[0]),
        "load" if rest.len() == 3 => load(&rest[0], &rest[1], &rest[2]),
        "handover-peer" if rest.len() == 1 => handover_peer(&rest[0]),
        "sse-get" if rest.len() == 1 => sse_get(&rest[0]),
        "raw-post-big" if rest.len() == 2 => raw_post_big(&rest[0], &rest[1]),
        "script" if rest.len() == 1 => match mcpwarden_tests::script::run_file(&rest[0]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{}", serde_json::json!({ "error": e }));
                ExitCode::from(2)
            }
        },
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

/// `Name: value` arguments as (name, value) pairs.
fn parse_headers(headers: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .unwrap_or_else(|| panic!("header must be `Name: value`: {h}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn raw_request(method: &str, url: &str, body: &str, headers: &[String]) -> ExitCode {
    let headers = parse_headers(headers);
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

fn peer_from(local: &str, addr: &str, post: Option<(&String, &String)>, abort: bool) -> ExitCode {
    let (local, addr) = (parse_addr(local), parse_addr(addr));
    let connected = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let socket = if local.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }?;
            socket.set_reuseaddr(true)?;
            socket.bind(local)?;
            tokio::time::timeout(TIMEOUT, socket.connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })?
                .and_then(|s| s.into_std())
        });
    let mut s = match connected.and_then(|s| s.set_nonblocking(false).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error={e}");
            return ExitCode::from(1);
        }
    };
    let show = |r: std::io::Result<SocketAddr>| {
        r.map(|a| a.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    };
    println!("peer={}", show(s.peer_addr()));
    println!("local={}", show(s.local_addr()));
    let _ = std::io::stdout().flush();
    if abort {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt with a pointer to a linger struct of the given size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(s);
        return ExitCode::SUCCESS;
    }
    match post {
        None => ExitCode::SUCCESS,
        Some((path, body)) => print_outcome(rawhttp::post_on(
            &mut s,
            &addr.to_string(),
            path,
            body.as_bytes(),
            &[],
            TIMEOUT,
        )),
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

fn udp_sendto(addr: &str, msg: &str) -> ExitCode {
    let addr = parse_addr(addr);
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let s = UdpSocket::bind(bind).expect("bind udp");
    match s.send_to(msg.as_bytes(), addr) {
        Ok(n) => {
            println!("sent={n}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("send-error={e}");
            ExitCode::from(1)
        }
    }
}

fn raw_socket(kind: &str) -> ExitCode {
    let (family, proto) = match kind {
        "inet" => (libc::AF_INET, libc::IPPROTO_TCP),
        "packet" => (libc::AF_PACKET, 0),
        _ => return usage(),
    };
    // SAFETY: socket() with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, proto) };
    if fd < 0 {
        println!("socket-error={}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: fd was just returned by socket().
    unsafe { libc::close(fd) };
    println!("socket=ok");
    ExitCode::SUCCESS
}

/// CLIENTS concurrent clients, each making CALLS `tools/call` echo requests one after another
/// (plain JSON-RPC POSTs, as a stateless client sends them) on a keep-alive connection, with
/// every tenth on a new connection; prints `started`, then `ok=N failed=M` and the first
/// failures. A call fails unless it gets a 200 with its own result.
fn load(url: &str, clients: &str, calls: &str) -> ExitCode {
    let clients: usize = clients.parse().expect("CLIENTS");
    let calls: usize = calls.parse().expect("CALLS");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("started");
    let _ = std::io::stdout().flush();
    let failures = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let url = url.to_string();
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut client = reqwest::Client::builder().http1_only().build().expect("client");
                for i in 0..calls {
                    if i % 10 == 9 {
                        client = reqwest::Client::builder().http1_only().build().expect("client");
                    }
                    let id = c * 1_000_000 + i;
                    let text = format!("{c}-{i}");
                    let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"text": text}}});
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("accept", "application/json, text/event-stream")
                        .body(body.to_string())
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(r) if r.status().as_u16() == 200 => match r.text().await {
                            Ok(t) if t.contains(&format!("\"{text}\"")) => Ok(()),
                            Ok(t) => Err(format!("call {id}: unexpected answer {t}")),
                            Err(e) => Err(format!("call {id}: reading the answer: {e}")),
                        },
                        Ok(r) => Err(format!("call {id}: status {}", r.status())),
                        Err(e) => Err(format!("call {id}: {e:?}")),
                    };
                    if let Err(e) = outcome {
                        failures.push(e);
                    }
                }
                failures
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_else(|e| vec![format!("task: {e}")]));
        }
        all
    });
    println!(
        "ok={} failed={}",
        clients * calls - failures.len(),
        failures.len()
    );
    for f in failures.iter().take(5) {
        println!("failure={f}");
    }
    ExitCode::SUCCESS
}

/// Connect to an agent's hand-over socket as a successor would, and report what came:
/// `handover-bytes=N` and `handover-fds=M` (descriptors passed with SCM_RIGHTS), or
/// `connect-error=…`.
fn handover_peer(path: &str) -> ExitCode {
    use std::os::fd::AsRawFd;
    let s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error={e}");
            return ExitCode::from(1);
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let (mut bytes, mut fds) = (0usize, 0usize);
    loop {
        let mut buf = [0u8; 4096];
        let mut control = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: recvmsg into the buffers above.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
        if n <= 0 {
            break;
        }
        bytes += n as usize;
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    fds += ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    println!("handover-bytes={bytes}");
    println!("handover-fds={fds}");
    ExitCode::SUCCESS
}

/// Connect to ADDR and keep the connection open: `connected local=… peer=…`, then, when it
/// ends, `ended=eof` or `ended=<error>`.
fn hold(addr: &str) -> ExitCode {
    use std::io::Read;
    let mut s = match TcpStream::connect(parse_addr(addr)) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error={e}");
            return ExitCode::from(1);
        }
    };
    let show = |a: std::io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    println!(
        "connected local={} peer={}",
        show(s.local_addr()),
        show(s.peer_addr())
    );
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                println!("ended=eof");
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) => {
                println!("ended={e}");
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn listen(addr: &str) -> ExitCode {
    match std::net::TcpListener::bind(parse_addr(addr)) {
        Ok(l) => {
            println!(
                "bound={}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("bind-error={e}");
            ExitCode::from(1)
        }
    }
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

/// The messages of the `source()` chain of `e` (for a TLS failure, reqwest's and rmcp's own
/// messages do not say what went wrong: the rustls error is a few sources down). rmcp's
/// `StreamableHttpError::Client` does not mark the reqwest error it holds as its source, so
/// the chain is followed into it by hand.
fn causes(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = error_source(e);
    while let Some(c) = next {
        out.push(c.to_string());
        next = error_source(c);
    }
    out
}

/// `e.source()`, or the reqwest error inside rmcp's `StreamableHttpError::Client`.
fn error_source<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    match e.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
        Some(StreamableHttpError::Client(inner)) => Some(inner),
        _ => e.source(),
    }
}

/// [`causes`] of an initialize error; rmcp does not mark the transport error it wraps as the
/// error's source, so follow it by hand.
fn init_causes(e: &rmcp::service::ClientInitializeError) -> Vec<String> {
    match e {
        rmcp::service::ClientInitializeError::TransportError { error, .. } => causes(error),
        other => causes(other),
    }
}

/// Which HTTP versions the `call*` subcommands' reqwest client may use.
#[derive(Clone, Copy)]
enum HttpMode {
    /// rmcp's default client (`StreamableHttpClientTransport::from_uri`): HTTP/1.1, or HTTP/2
    /// when ALPN chooses it.
    Default,
    /// `reqwest::ClientBuilder::http1_only()`: ALPN offers only http/1.1.
    Http1,
    /// `reqwest::ClientBuilder::http2_prior_knowledge()`: ALPN offers only h2; plain http://
    /// speaks h2c without upgrade.
    Http2,
}

fn call(url: &str, pairs: &[String], mode: HttpMode) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(call_async(url, pairs, mode))
}

/// The transport for `call*`. Http1/Http2 use a client configured like rmcp's default one
/// (no idle pooling) except that redirects are not followed at all.
fn call_transport(
    url: &str,
    mode: HttpMode,
) -> Result<rmcp::transport::StreamableHttpClientTransport<reqwest::Client>, String> {
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::transport::StreamableHttpClientTransport;

    let builder = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none());
    let builder = match mode {
        HttpMode::Default => return Ok(StreamableHttpClientTransport::from_uri(url.to_string())),
        HttpMode::Http1 => builder.http1_only(),
        HttpMode::Http2 => builder.http2_prior_knowledge(),
    };
    let client = builder
        .build()
        .map_err(|e| format!("build reqwest client: {e}"))?;
    Ok(StreamableHttpClientTransport::with_client(
        client,
        StreamableHttpClientTransportConfig::with_uri(url.to_string()),
    ))
}

async fn call_async(url: &str, pairs: &[String], mode: HttpMode) -> ExitCode {
    use rmcp::model::{CallToolRequestParams, ClientConfig, JsonObject};
    use rmcp::service::ServiceError;
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

    let transport = match call_transport(url, mode) {
        Ok(t) => t,
        Err(e) => {
            println!("{}", serde_json::json!({"init_error": e}));
            return ExitCode::from(1);
        }
    };
    let client = match tokio::time::timeout(TIMEOUT, ClientConfig::default().serve(transport)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            println!(
                "{}",
                serde_json::json!({"init_error": e.to_string(), "causes": init_causes(&e)})
            );
            return ExitCode::from(1);
        }
        Err(_) => {
            println!("{}", serde_json::json!({"init_error": "timeout"}));
            return ExitCode::from(1);
        }
    };
    let mut code = ExitCode::SUCCESS;
    for (tool, args) in calls {
        if tool == "@list" {
            // Not a call: print the names rmcp's tools/list gives (every page).
            let line = match tokio::time::timeout(TIMEOUT, client.list_all_tools()).await {
                Ok(Ok(tools)) => serde_json::json!({
                    "tools": tools.iter().map(|t| t.name.to_string()).collect::<Vec<_>>()
                }),
                Ok(Err(e)) => {
                    code = ExitCode::from(1);
                    serde_json::json!({"error": {"list": e.to_string()}})
                }
                Err(_) => {
                    code = ExitCode::from(1);
                    serde_json::json!({"error": {"list": "timeout"}})
                }
            };
            println!("{line}");
            let _ = std::io::stdout().flush();
            continue;
        }
        let params = CallToolRequestParams::new(tool).with_arguments(args);
        let line = match tokio::time::timeout(TIMEOUT, client.call_tool(params)).await {
            Ok(Ok(result)) => serde_json::to_value(&result).expect("serialize CallToolResult"),
            Ok(Err(ServiceError::McpError(e))) => {
                serde_json::json!({"error": {"code": e.code.0, "message": e.message, "data": e.data}})
            }
            Ok(Err(other)) => {
                code = ExitCode::from(1);
                serde_json::json!({"error": {"transport": other.to_string(), "causes": causes(&other)}})
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

/// A rustls client configuration on the ring provider that trusts only the certificates in
/// the PEM file `cafile`.
fn tls_config(cafile: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(cafile)
        .unwrap_or_else(|e| panic!("read CA file {cafile}: {e}"));
    for cert in certs {
        let cert = cert.unwrap_or_else(|e| panic!("bad PEM certificate in {cafile}: {e}"));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("bad CA certificate in {cafile}: {e}"));
    }
    assert!(!roots.is_empty(), "no certificate in CA file {cafile}");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(rustls::DEFAULT_VERSIONS)
    .expect("TLS versions for the ring provider")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The name to verify the server's certificate against: `-` is ADDR's IP (rustls sends no SNI
/// for an IP address), anything else is the SNI host name.
fn tls_server_name(sni: &str, addr: SocketAddr) -> ServerName<'static> {
    if sni == "-" {
        ServerName::IpAddress(addr.ip().into())
    } else {
        ServerName::try_from(sni.to_string())
            .unwrap_or_else(|e| panic!("bad SNI name {sni:?}: {e}"))
    }
}

/// Whether an I/O error from a rustls stream is a TLS error (a received alert, a bad record),
/// rather than a plain socket error or end of stream.
fn is_tls_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// Drive the handshake of `conn` over `tcp` to its end, including sending the client's last
/// flight.
fn handshake(conn: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> std::io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

/// Connect to `addr` and start (not yet handshake) a TLS client connection for `name`.
fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Result<(rustls::ClientConnection, TcpStream), String> {
    let tcp =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT)).ok();
    tcp.set_write_timeout(Some(TIMEOUT)).ok();
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| format!("TLS client connection: {e}"))?;
    Ok((conn, tcp))
}

/// The subject alternative names of a DER certificate, comma-separated: DNS names and IP
/// addresses as such, other kinds as x509-parser displays them.
fn cert_sans(der: &[u8]) -> String {
    use x509_parser::extensions::GeneralName;
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert,
        Err(e) => return format!("error: {e}"),
    };
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.clone(),
        Ok(None) => return String::new(),
        Err(e) => return format!("error: {e}"),
    };
    sans.iter()
        .map(|name| match name {
            GeneralName::DNSName(n) => n.to_string(),
            GeneralName::IPAddress(b) => match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string(),
                16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string(),
                _ => format!("{name}"),
            },
            other => format!("{other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A stream that remembers the first TLS error it returned from `read` (rustls reports a
/// received alert as an `InvalidData` I/O error, which `rawhttp` turns into a mere reason
/// string).
struct TlsErrorSpy<S> {
    inner: S,
    first_tls_error: Option<String>,
}

impl<S: Read> Read for TlsErrorSpy<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        if let Err(e) = &r {
            if self.first_tls_error.is_none() && is_tls_error(e) {
                self.first_tls_error = Some(e.to_string());
            }
        }
        r
    }
}

fn tls_raw(addr: &str, sni: &str, cafile: &str, req: &[String]) -> ExitCode {
    let [method, path, host, body, headers @ ..] = req else {
        return usage();
    };
    let addr = parse_addr(addr);
    let headers = parse_headers(headers);
    let config = tls_config(cafile, &[b"http/1.1"]);
    let (mut conn, mut tcp) = match tls_connect(addr, config, tls_server_name(sni, addr)) {
        Ok(c) => c,
        Err(e) => {
            println!("connect-error={e}");
            return ExitCode::from(1);
        }
    };
    let mut tls_error = handshake(&mut conn, &mut tcp).err().map(|e| e.to_string());
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let mut outcome = None;
    if tls_error.is_none() {
        let bytes =
            rawhttp::method_request_bytes(method, host, path, body.as_bytes(), &headers, true);
        let mut stream = TlsErrorSpy {
            inner: rustls::StreamOwned::new(conn, tcp),
            first_tls_error: None,
        };
        let r = match stream
            .inner
            .write_all(&bytes)
            .and_then(|_| stream.inner.flush())
        {
            Ok(()) => rawhttp::read_response(&mut stream),
            Err(e) if is_tls_error(&e) => {
                stream.first_tls_error = Some(e.to_string());
                RawOutcome::NoResponse {
                    received: Vec::new(),
                    reason: format!("write: {e}"),
                }
            }
            Err(e) => RawOutcome::NoResponse {
                received: Vec::new(),
                reason: format!("write: {e}"),
            },
        };
        // A server that rejects the client after the client's side of the handshake is done
        // (TLS 1.3 client authentication) answers the request with an alert.
        match (r, stream.first_tls_error) {
            (RawOutcome::NoResponse { .. }, Some(e)) => tls_error = Some(e),
            (r, _) => outcome = Some(r),
        }
    }
    match &tls_error {
        None => println!("tls=ok"),
        Some(e) => println!("tls-error={e}"),
    }
    if alpn.is_some() || leaf.is_some() {
        println!("alpn={}", alpn.as_deref().unwrap_or("none"));
    }
    if let Some(leaf) = &leaf {
        println!("peer-cert-sha256={}", mcpwarden_tests::sha256_hex(leaf));
        println!("peer-cert-sans={}", cert_sans(leaf));
    }
    let _ = std::io::stdout().flush();
    match outcome {
        Some(r) if tls_error.is_none() => print_outcome(r),
        _ => ExitCode::from(3),
    }
}

fn tls_handshakes(addr: &str, sni: &str, cafile: &str, n: &str) -> ExitCode {
    let Ok(n) = n.parse::<usize>() else {
        return usage();
    };
    let addr = parse_addr(addr);
    let config = tls_config(cafile, &[b"http/1.1"]);
    let name = tls_server_name(sni, addr);
    let start = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (config, name, start) = (config.clone(), name.clone(), start.clone());
            std::thread::spawn(move || -> Result<Vec<u8>, String> {
                start.wait();
                let (mut conn, mut tcp) = tls_connect(addr, config, name)?;
                handshake(&mut conn, &mut tcp).map_err(|e| e.to_string())?;
                let leaf = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec())
                    .ok_or("no peer certificate")?;
                // Close, and read until the server closes too, so that an alert it sends
                // after the handshake (TLS 1.3 client authentication) is seen.
                conn.send_close_notify();
                tcp.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
                let _ = stream.flush();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) if is_tls_error(&e) => return Err(e.to_string()),
                        Err(_) => break,
                    }
                }
                Ok(leaf)
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut certs = std::collections::BTreeSet::new();
    for t in threads {
        match t.join() {
            Ok(Ok(leaf)) => {
                ok += 1;
                certs.insert(mcpwarden_tests::sha256_hex(&leaf));
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("handshake thread panicked".to_string()),
        }
    }
    println!("ok={ok}");
    println!("errors={}", errors.len());
    if let Some(e) = errors.first() {
        println!("first-error={e}");
    }
    println!("distinct-certs={}", certs.len());
    for c in &certs {
        println!("cert-sha256={c}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}
