//! The lenient MCP servers (`tests/lenient/`, see `mcpwarden_tests::lenient`) are as lenient as
//! the bypass suite says, and their launcher works: plain HTTP/1.1 to each server on loopback,
//! no agent, no eBPF, no root. A missing toolchain fails these tests (never a skip, under
//! `CI=true` or not).

use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use mcpwarden_tests::rawhttp::{parse_url, read_response, RawOutcome, RawResponse};
use mcpwarden_tests::{free_addr, Lenient, LenientServer};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(20);

fn start(kind: Lenient) -> LenientServer {
    LenientServer::start(kind, free_addr(Ipv4Addr::LOCALHOST))
}

/// Send `method path` with these headers and `body` (framed by a `Content-Length` header, or
/// chunked in 7-byte chunks) and read the whole response.
fn exchange(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunked: bool,
) -> RawResponse {
    let (addr, host, path) = parse_url(url);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut bytes;
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        bytes = head.into_bytes();
        for chunk in body.chunks(7) {
            bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            bytes.extend_from_slice(chunk);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
    } else {
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        bytes = head.into_bytes();
        bytes.extend_from_slice(body);
    }
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).ok();
    s.set_write_timeout(Some(TIMEOUT)).ok();
    s.write_all(&bytes)
        .unwrap_or_else(|e| panic!("write to {url}: {e}"));
    match read_response(&mut s) {
        RawOutcome::Response(r) => r,
        RawOutcome::NoResponse { received, reason } => panic!(
            "no response from {url} ({reason}); received {:?}",
            String::from_utf8_lossy(&received)
        ),
    }
}

/// POST a JSON body with `Content-Type: application/json`.
fn post(url: &str, body: &[u8]) -> RawResponse {
    exchange(
        url,
        "POST",
        &[("Content-Type", "application/json")],
        body,
        false,
    )
}

/// `body` with this Content-Type.
fn post_as(url: &str, content_type: &str, body: &[u8]) -> RawResponse {
    exchange(url, "POST", &[("Content-Type", content_type)], body, false)
}

fn call_body(tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}})
        .to_string()
}

/// The text of a tools/call result.
fn result_text(r: &RawResponse) -> String {
    assert_eq!(
        r.status,
        200,
        "{} {:?}",
        r.status_line,
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no result text in {v}"))
        .to_string()
}

/// Assert that `server` executed exactly `tool` once, and nothing else.
fn assert_ran_only(server: &LenientServer, tool: &str) -> Value {
    let ran = server.executed();
    assert_eq!(
        ran.len(),
        1,
        "lenient-{} executed {ran:?}, expected {tool} once",
        server.kind()
    );
    assert_eq!(ran[0].0, tool, "lenient-{} executed {ran:?}", server.kind());
    assert_eq!(server.calls(tool), 1);
    ran[0].1.clone()
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn utf32le(s: &str) -> Vec<u8> {
    s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect()
}

/// `s` in UTF-7 with every character in one base64 block (`+…-`): not one ASCII letter of
/// the JSON is left readable.
fn utf7_all(s: &str) -> Vec<u8> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = s.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let mut out = vec![b'+'];
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
    out.push(b'-');
    out
}

// ---------------------------------------------------------------------------------------------
// Every kind.

#[test]
fn every_kind_serves_mcp_and_executes_echo() {
    for kind in Lenient::ALL {
        let server = start(kind);
        let url = server.url("/mcp");
        let init = post(
            &url,
            br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        );
        assert_eq!(init.status, 200, "{kind}: {}", init.status_line);
        assert!(
            init.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{kind}: {:?}",
            init.headers
        );
        let result = &init.json()["result"];
        assert_eq!(result["protocolVersion"], "2025-03-26", "{kind}: {result}");
        assert_eq!(result["serverInfo"]["name"], format!("lenient-{kind}"));
        assert_eq!(result["capabilities"], json!({"tools": {}}), "{kind}");

        let notified = post(
            &url,
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        );
        assert_eq!(notified.status, 202, "{kind}: {}", notified.status_line);
        assert!(notified.body.is_empty(), "{kind}");

        let list = post(&url, br#"{"jsonrpc":"2.0","id":"l","method":"tools/list"}"#).json();
        assert_eq!(list["id"], "l", "{kind}");
        let names: Vec<&str> = list["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{kind}: no tools in {list}"))
            .iter()
            .map(|t| t["name"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "echo",
                "secret_dump",
                "start_security_scan",
                "drop_cluster",
                "transfer"
            ],
            "{kind}"
        );

        let ping = post(&url, br#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#).json();
        assert_eq!(
            ping,
            json!({"jsonrpc": "2.0", "id": 7, "result": {}}),
            "{kind}"
        );

        assert!(
            server.executed().is_empty(),
            "{kind}: {:?}",
            server.executed()
        );
        let r = post(&url, call_body("echo", json!({"text": "hi"})).as_bytes());
        assert_eq!(result_text(&r), format!("{kind} ran echo"));
        assert_eq!(
            server.executed(),
            vec![("echo".to_string(), json!({"text": "hi"}))],
            "{kind}"
        );
        assert_eq!(server.calls("echo"), 1, "{kind}");
        assert_eq!(server.calls("secret_dump"), 0, "{kind}");
        assert!(
            server
                .requests()
                .iter()
                .all(|r| r["method"] == "POST" && r["path"] == "/mcp"),
            "{kind}: {:?}",
            server.requests()
        );
        assert_eq!(
            server.requests().len(),
            5,
            "{kind}: {:?}",
            server.requests()
        );
    }
}

#[test]
fn every_kind_answers_batches_in_order() {
    for kind in Lenient::ALL {
        let server = start(kind);
        let body = format!(
            r#"[{{"jsonrpc":"2.0","method":"notifications/initialized"}},{},{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"transfer","arguments":{{"amount":5}}}}}}]"#,
            call_body("echo", json!({"text": "a"}))
        );
        let r = post(&server.url("/mcp"), body.as_bytes());
        assert_eq!(r.status, 200, "{kind}: {}", r.status_line);
        let out = r.json();
        let out = out
            .as_array()
            .unwrap_or_else(|| panic!("{kind}: not an array: {out}"));
        assert_eq!(out.len(), 2, "{kind}: {out:?}");
        assert_eq!(out[0]["id"], 1);
        assert_eq!(out[1]["id"], 2);
        assert_eq!(
            out[1]["result"]["content"][0]["text"],
            format!("{kind} ran transfer")
        );
        assert_eq!(
            server.executed(),
            vec![
                ("echo".to_string(), json!({"text": "a"})),
                ("transfer".to_string(), json!({"amount": 5})),
            ],
            "{kind}"
        );
        let only_notes = post(
            &server.url("/mcp"),
            br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":9,"result":{}}]"#,
        );
        assert_eq!(only_notes.status, 202, "{kind}: {}", only_notes.status_line);
    }
}

#[test]
fn every_kind_answers_every_path_and_method() {
    for kind in Lenient::ALL {
        let server = start(kind);
        for (i, (method, path)) in [("PUT", "/anything"), ("PATCH", "/"), ("DELETE", "/a/b?c=d")]
            .into_iter()
            .enumerate()
        {
            let r = exchange(
                &server.url(path),
                method,
                &[("Content-Type", "application/json")],
                call_body("echo", json!({"n": i})).as_bytes(),
                false,
            );
            assert_eq!(
                result_text(&r),
                format!("{kind} ran echo"),
                "{kind} {method} {path}"
            );
        }
        assert_eq!(server.calls("echo"), 3, "{kind}: {:?}", server.executed());
        let seen: Vec<(String, String)> = server
            .requests()
            .iter()
            .map(|r| {
                (
                    r["method"].as_str().unwrap_or_default().to_string(),
                    r["path"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("PUT", "/anything"), ("PATCH", "/"), ("DELETE", "/a/b?c=d")]
                .map(|(m, p)| (m.to_string(), p.to_string())),
            "{kind}"
        );
    }
}

#[test]
fn every_kind_refuses_what_does_not_parse() {
    for kind in Lenient::ALL {
        let server = start(kind);
        let r = post(
            &server.url("/mcp"),
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call""#,
        );
        assert_eq!(r.status, 400, "{kind}: {}", r.status_line);
        let v = r.json();
        assert_eq!(v["error"]["code"], -32700, "{kind}: {v}");
        assert_eq!(v["id"], Value::Null, "{kind}: {v}");
        assert!(server.executed().is_empty(), "{kind}");
    }
}

#[test]
fn every_kind_last_duplicate_key_wins() {
    for kind in Lenient::ALL {
        let server = start(kind);
        let r = post(
            &server.url("/mcp"),
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"secret_dump"}}"#,
        );
        assert_eq!(result_text(&r), format!("{kind} ran secret_dump"));
        assert_ran_only(&server, "secret_dump");
    }
}

#[test]
fn launcher_reports_a_port_0_address_and_drop_stops_the_server() {
    for kind in Lenient::ALL {
        let server = LenientServer::start(kind, "127.0.0.1:0".parse().unwrap());
        let addr = server.addr();
        assert_ne!(addr.port(), 0, "{kind}");
        let r = post(&server.url("/mcp"), call_body("echo", json!({})).as_bytes());
        assert_eq!(result_text(&r), format!("{kind} ran echo"));
        let dir = server.dir().to_path_buf();
        assert!(dir.join("executions.jsonl").exists(), "{kind}");
        drop(server);
        assert!(!dir.exists(), "{kind}: {} left behind", dir.display());
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "{kind}: still listening on {addr} after drop"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Go: encoding/json into structs.

#[test]
fn go_matches_keys_case_insensitively() {
    let server = start(Lenient::Go);
    let r = exchange(
        &server.url("/anything"),
        "PUT",
        &[("Content-Type", "application/json")],
        br#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","PARAMS":{"NAME":"secret_dump","arguments":{}}}"#,
        false,
    );
    assert_eq!(result_text(&r), "go ran secret_dump");
    assert_eq!(assert_ran_only(&server, "secret_dump"), json!({}));
}

#[test]
fn go_binds_argument_keys_of_a_typed_tool_case_insensitively() {
    // transfer reads its arguments into a struct: "Amount" is its amount.
    let server = start(Lenient::Go);
    let r = post(
        &server.url("/mcp"),
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"Amount":5000}}}"#,
    );
    assert_eq!(result_text(&r), "go ran transfer");
    assert_eq!(
        assert_ran_only(&server, "transfer"),
        json!({"amount": 5000})
    );
}

#[test]
fn go_folds_the_long_s_and_the_kelvin_sign() {
    // encoding/json's key folding maps U+017F (ſ) to s and U+212A (K) to k.
    let server = start(Lenient::Go);
    let r = post(
        &server.url("/mcp"),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"param\u{17f}\":{\"name\":\"secret_dump\",\"argument\u{17f}\":{\"a\":1}}}".as_bytes(),
    );
    assert_eq!(result_text(&r), "go ran secret_dump");
    assert_eq!(assert_ran_only(&server, "secret_dump"), json!({"a": 1}));
    let r = post(
        &server.url("/mcp"),
        br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"drop_cluster","arguments":{"\u212aey":"v"}}}"#,
    );
    assert_eq!(result_text(&r), "go ran drop_cluster");
    // Arguments are a map: their keys are kept as sent (folding is for struct fields only).
    assert_eq!(server.executed()[1].1, json!({"\u{212a}ey": "v"}));
}

#[test]
fn go_last_duplicate_wins_on_any_path_and_method() {
    let server = start(Lenient::Go);
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"secret_dump"}}"#;
    assert_eq!(
        result_text(&post(&server.url("/mcp"), body)),
        "go ran secret_dump"
    );
    let r = exchange(
        &server.url("/anything"),
        "PUT",
        &[("Content-Type", "application/json")],
        body,
        false,
    );
    assert_eq!(result_text(&r), "go ran secret_dump");
    // Across spellings too: the last of "name" and "Name" wins.
    let r = post(
        &server.url("/mcp"),
        br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","Name":"drop_cluster"}}"#,
    );
    assert_eq!(result_text(&r), "go ran drop_cluster");
    let names: Vec<String> = server.executed().into_iter().map(|(t, _)| t).collect();
    assert_eq!(names, ["secret_dump", "secret_dump", "drop_cluster"]);
}

#[test]
fn go_turns_invalid_utf8_into_replacement_characters() {
    let server = start(Lenient::Go);
    let r = post(
        &server.url("/mcp"),
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"secret_dump\xff\",\"arguments\":{\"k\xfe\":\"v\xc3\"}}}",
    );
    assert_eq!(result_text(&r), "go ran secret_dump\u{fffd}");
    assert_eq!(
        assert_ran_only(&server, "secret_dump\u{fffd}"),
        json!({"k\u{fffd}": "v\u{fffd}"})
    );
}

#[test]
fn go_compares_method_names_case_sensitively() {
    // As the Go SDK does: the decoded value is compared as is; "TOOLS/CALL" is some other
    // method (answered `{}`), not a tools/call.
    let server = start(Lenient::Go);
    let r = post(
        &server.url("/mcp"),
        br#"{"jsonrpc":"2.0","id":1,"method":"TOOLS/CALL","params":{"name":"secret_dump"}}"#,
    );
    assert_eq!(r.json()["result"], json!({}));
    assert!(server.executed().is_empty(), "{:?}", server.executed());
}

// ---------------------------------------------------------------------------------------------
// Node: raw-body with the Content-Type charset (iconv-lite), then JSON.parse.

#[test]
fn node_decodes_a_utf7_body() {
    let server = start(Lenient::Node);
    let body = call_body("secret_dump", json!({})).replace('"', "+ACI-");
    assert!(!body.contains('"'));
    let r = post_as(
        &server.url("/mcp"),
        "application/json; charset=utf-7",
        body.as_bytes(),
    );
    assert_eq!(result_text(&r), "node ran secret_dump");
    assert_ran_only(&server, "secret_dump");

    // Not one readable letter: the whole body in one base64 block.
    let body = utf7_all(&call_body("drop_cluster", json!({"cluster": "prod"})));
    assert!(!body.windows(4).any(|w| w == b"drop"));
    let r = post_as(
        &server.url("/mcp"),
        "application/json; charset=UTF-7",
        &body,
    );
    assert_eq!(result_text(&r), "node ran drop_cluster");
    assert_eq!(
        server.executed()[1],
        ("drop_cluster".to_string(), json!({"cluster": "prod"}))
    );
}

#[test]
fn node_decodes_a_utf16le_body() {
    let server = start(Lenient::Node);
    let r = post_as(
        &server.url("/mcp"),
        "application/json; charset=utf-16le",
        &utf16le(&call_body("secret_dump", json!({"x": "é"}))),
    );
    assert_eq!(result_text(&r), "node ran secret_dump");
    assert_eq!(assert_ran_only(&server, "secret_dump"), json!({"x": "é"}));
}

#[test]
fn node_decodes_latin1_and_drops_a_utf8_bom() {
    let server = start(Lenient::Node);
    // latin1: the byte 0xE9 is "é".
    let mut body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"t":""#.to_vec();
    body.extend_from_slice(b"\xe9\"}}}");
    let r = post_as(
        &server.url("/mcp"),
        "application/json; charset=latin1",
        &body,
    );
    assert_eq!(result_text(&r), "node ran echo");
    let mut body = b"\xef\xbb\xbf".to_vec();
    body.extend_from_slice(call_body("secret_dump", json!({})).as_bytes());
    let r = post(&server.url("/mcp"), &body);
    assert_eq!(result_text(&r), "node ran secret_dump");
    assert_eq!(
        server.executed(),
        vec![
            ("echo".to_string(), json!({"t": "é"})),
            ("secret_dump".to_string(), json!({})),
        ]
    );
    // A charset iconv-lite does not know: 415, nothing executed.
    let r = post_as(
        &server.url("/mcp"),
        "application/json; charset=klingon",
        call_body("secret_dump", json!({})).as_bytes(),
    );
    assert_eq!(r.status, 415, "{}", r.status_line);
    assert_eq!(server.calls("secret_dump"), 1);
}

// ---------------------------------------------------------------------------------------------
// Python: json.loads on the raw bytes.

#[test]
fn python_detects_utf16le_with_a_bom() {
    let server = start(Lenient::Python);
    let mut body = vec![0xff, 0xfe];
    body.extend(utf16le(&call_body("secret_dump", json!({"x": "é"}))));
    let r = post(&server.url("/mcp"), &body);
    assert_eq!(result_text(&r), "python ran secret_dump");
    assert_eq!(assert_ran_only(&server, "secret_dump"), json!({"x": "é"}));
}

#[test]
fn python_detects_utf32_without_a_bom() {
    let server = start(Lenient::Python);
    let body = utf32le(&call_body("secret_dump", json!({})));
    assert_eq!(&body[..4], b"{\0\0\0");
    let r = post(&server.url("/mcp"), &body);
    assert_eq!(result_text(&r), "python ran secret_dump");
    assert_ran_only(&server, "secret_dump");
}

#[test]
fn python_skips_a_utf8_bom() {
    let server = start(Lenient::Python);
    let mut body = b"\xef\xbb\xbf".to_vec();
    body.extend_from_slice(call_body("secret_dump", json!({})).as_bytes());
    let r = post(&server.url("/mcp"), &body);
    assert_eq!(result_text(&r), "python ran secret_dump");
    assert_ran_only(&server, "secret_dump");
}

#[test]
fn python_reads_chunked_bodies_and_accepts_nan() {
    let server = start(Lenient::Python);
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":NaN}}}"#;
    let r = exchange(
        &server.url("/mcp"),
        "POST",
        &[("Content-Type", "application/json")],
        body,
        true,
    );
    assert_eq!(result_text(&r), "python ran transfer");
    // The log keeps to standard JSON: NaN is written as the string "nan".
    assert_eq!(
        assert_ran_only(&server, "transfer"),
        json!({"amount": "nan"})
    );
}
