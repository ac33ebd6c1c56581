//! A hand-written HTTP/1.1 POST over a std `TcpStream`, so tests see exactly the bytes that
//! came back (or that nothing came back). The response reader works over any `Read` stream,
//! so `mcp-client tls-raw` uses it over TLS as well.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `http://HOST:PORT/PATH` with an IP-literal host, split into (connect address, Host header
/// value, path).
pub fn parse_url(url: &str) -> (SocketAddr, String, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("only http:// URLs: {url}"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .unwrap_or_else(|e| panic!("URL authority {authority} is not IP:PORT: {e}"));
    (addr, authority.to_string(), path.to_string())
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    /// e.g. `HTTP/1.1 200 OK`
    pub status_line: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body bytes exactly (chunked transfer coding removed).
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// What happened to a request.
#[derive(Debug)]
pub enum RawOutcome {
    Response(RawResponse),
    /// The connection ended (EOF, reset or timeout) before a complete response head.
    NoResponse {
        received: Vec<u8>,
        reason: String,
    },
}

/// The request bytes of a POST of a JSON body, with MCP's Accept header and `Connection: close`.
pub fn post_request_bytes(
    host: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
) -> Vec<u8> {
    request_bytes(host, path, body, extra_headers, true)
}

/// The request bytes of a POST of a JSON body, with MCP's Accept header; `close` adds
/// `Connection: close`, otherwise the connection stays open for more requests.
pub fn request_bytes(
    host: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
    close: bool,
) -> Vec<u8> {
    method_request_bytes("POST", host, path, body, extra_headers, close)
}

/// [`request_bytes`] with another method than POST.
pub fn method_request_bytes(
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
    close: bool,
) -> Vec<u8> {
    let given = |name: &str| {
        extra_headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    // Defaults, unless the caller sets them (a request has one of each).
    if !given("content-type") {
        req.push_str("content-type: application/json\r\n");
    }
    if !given("accept") {
        req.push_str("accept: application/json, text/event-stream\r\n");
    }
    req.push_str(&format!("content-length: {}\r\n", body.len()));
    if close {
        req.push_str("connection: close\r\n");
    }
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut b = req.into_bytes();
    b.extend_from_slice(body);
    b
}

/// Several POSTs on one connection to `url`: one after the other, each sent once the previous
/// response has arrived (`pipelined` false), or all written at once before reading
/// (`pipelined` true). Returns one outcome per request, stopping at the first missing response.
pub fn post_many(
    url: &str,
    bodies: &[&[u8]],
    pipelined: bool,
    timeout: Duration,
) -> Vec<RawOutcome> {
    let (addr, host, path) = parse_url(url);
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            return vec![RawOutcome::NoResponse {
                received: Vec::new(),
                reason: format!("connect {addr}: {e}"),
            }]
        }
    };
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    if pipelined {
        let mut all = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            all.extend(request_bytes(&host, &path, b, &[], i + 1 == bodies.len()));
        }
        if let Err(e) = s.write_all(&all) {
            return vec![RawOutcome::NoResponse {
                received: Vec::new(),
                reason: format!("write: {e}"),
            }];
        }
    }
    for (i, b) in bodies.iter().enumerate() {
        if !pipelined {
            if let Err(e) = s.write_all(&request_bytes(&host, &path, b, &[], i + 1 == bodies.len()))
            {
                out.push(RawOutcome::NoResponse {
                    received: Vec::new(),
                    reason: format!("write: {e}"),
                });
                break;
            }
        }
        let r = read_response_buffered(&mut s, &mut pending);
        let stop = matches!(r, RawOutcome::NoResponse { .. });
        out.push(r);
        if stop {
            break;
        }
    }
    out
}

/// Send a POST on `stream` and read the response.
pub fn post_on(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
    timeout: Duration,
) -> RawOutcome {
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    if let Err(e) = stream.write_all(&post_request_bytes(host, path, body, extra_headers)) {
        return RawOutcome::NoResponse {
            received: Vec::new(),
            reason: format!("write: {e}"),
        };
    }
    read_response(stream)
}

/// Connect to the URL's address and POST `body`.
pub fn post(
    url: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
    timeout: Duration,
) -> RawOutcome {
    request("POST", url, body, extra_headers, timeout)
}

/// Connect to the URL's address and send `body` with `method` (and `Connection: close`).
pub fn request(
    method: &str,
    url: &str,
    body: &[u8],
    extra_headers: &[(String, String)],
    timeout: Duration,
) -> RawOutcome {
    let (addr, host, path) = parse_url(url);
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            return RawOutcome::NoResponse {
                received: Vec::new(),
                reason: format!("connect {addr}: {e}"),
            }
        }
    };
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let bytes = method_request_bytes(method, &host, &path, body, extra_headers, true);
    if let Err(e) = s.write_all(&bytes) {
        return RawOutcome::NoResponse {
            received: Vec::new(),
            reason: format!("write: {e}"),
        };
    }
    read_response(&mut s)
}

/// Position of the next CRLF at or after `pos`, reading more as needed; None at EOF.
fn crlf_from(
    rest: &mut Vec<u8>,
    pos: usize,
    more: &mut impl FnMut(&mut Vec<u8>) -> bool,
) -> Option<usize> {
    loop {
        if let Some(i) = find(&rest[pos..], b"\r\n") {
            return Some(pos + i);
        }
        if !more(rest) {
            return None;
        }
    }
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// Read one HTTP/1.1 response from any byte stream (a `TcpStream`, or a TLS stream over one).
pub fn read_response<S: Read + ?Sized>(stream: &mut S) -> RawOutcome {
    read_response_buffered(stream, &mut Vec::new())
}

/// Read one HTTP/1.1 response, starting with the bytes in `pending` (read earlier from the
/// stream). On return, `pending` holds the bytes received after this response, which belong to
/// the next one (keep-alive and pipelining).
pub fn read_response_buffered<S: Read + ?Sized>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> RawOutcome {
    let mut buf = std::mem::take(pending);
    let mut chunk = [0u8; 8192];
    // Head.
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return RawOutcome::NoResponse {
                    received: buf,
                    reason: "EOF before response head".into(),
                }
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return RawOutcome::NoResponse {
                    received: buf,
                    reason: format!("read: {e}"),
                }
            }
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    // Everything after the head; `more` appends to it, false at EOF or error.
    let mut rest = buf[head_end + 4..].to_vec();
    let mut done = false;
    let mut more = |rest: &mut Vec<u8>| -> bool {
        if done {
            return false;
        }
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => {
                rest.extend_from_slice(&chunk[..n]);
                true
            }
            _ => {
                done = true;
                false
            }
        }
    };
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        *pending = rest;
        Vec::new()
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len && more(&mut rest) {}
        let body = rest[..len.min(rest.len())].to_vec();
        *pending = rest[len.min(rest.len())..].to_vec();
        body
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        let mut pos = 0;
        // Each chunk starts with its size line.
        while let Some(line_end) = crlf_from(&mut rest, pos, &mut more) {
            let size_str = String::from_utf8_lossy(&rest[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or(0);
            pos = line_end + 2;
            if size == 0 {
                // Trailer section: lines until an empty one.
                while let Some(end) = crlf_from(&mut rest, pos, &mut more) {
                    let empty = end == pos;
                    pos = end + 2;
                    if empty {
                        break;
                    }
                }
                break;
            }
            while rest.len() < pos + size + 2 && more(&mut rest) {}
            if rest.len() < pos + size {
                // Truncated chunk: keep what arrived and stop.
                body.extend_from_slice(&rest[pos.min(rest.len())..]);
                pos = rest.len();
                break;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos = (pos + size + 2).min(rest.len());
        }
        *pending = rest[pos.min(rest.len())..].to_vec();
        body
    } else {
        // Delimited by the end of the connection.
        while more(&mut rest) {}
        rest
    };
    RawOutcome::Response(RawResponse {
        status_line,
        status,
        headers,
        body,
    })
}
