//! Unit tests for the `mcp` module, including every client-to-server POST in
//! the wire captures under `shared/fixtures/mcp-wire/`.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::*;

// ---------------------------------------------------------------------------
// Helpers

fn no_headers() -> HeaderMap {
    HeaderMap::new()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        map.append(name, HeaderValue::from_str(value).expect("header value"));
    }
    map
}

fn single(body: &str) -> Message {
    single_with(body, &no_headers())
}

fn single_with(body: &str, headers: &HeaderMap) -> Message {
    match parse_body(body.as_bytes(), headers) {
        Ok(Parsed::Single(message)) => message,
        other => panic!("expected one message from {body}, got {other:?}"),
    }
}

fn refused(body: &[u8]) -> ParseError {
    refused_with(body, &no_headers())
}

fn refused_with(body: &[u8], headers: &HeaderMap) -> ParseError {
    match parse_body(body, headers) {
        Err(err) => err,
        Ok(parsed) => panic!(
            "expected {} to be refused, got {parsed:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

fn assert_refused(body: &str, code: i64, id: Option<Value>, message_part: &str) -> ParseError {
    let err = refused(body.as_bytes());
    assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}: {err}");
    assert_eq!(err.code, code, "{body}: {err}");
    assert_eq!(err.id, id, "{body}: {err}");
    assert!(
        err.message.contains(message_part),
        "{body}: message {:?} lacks {message_part:?}",
        err.message
    );
    err
}

fn sha256_of(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn parse_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

// ---------------------------------------------------------------------------
// Wire captures

/// One HTTP request recovered from a capture.
struct Captured {
    method: String,
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Recovers the client-to-server requests of a capture, in the order they
/// were complete on the wire. Blocks are `>>> conn N c2s` or `<<< conn N s2c`
/// lines followed by the bytes read and one `\n`.
fn captured_requests(capture: &str) -> Vec<Captured> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut rest = capture;
    let mut current: Option<String> = None;
    let mut content = String::new();
    while !rest.is_empty() {
        let line_end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        let line = &rest[..line_end];
        rest = &rest[line_end..];
        if line.starts_with(">>> conn ") || line.starts_with("<<< conn ") {
            if let Some(marker) = current.take() {
                blocks.push((marker, std::mem::take(&mut content)));
            }
            current = Some(line.trim_end().to_owned());
        } else if current.is_some() {
            content.push_str(line);
        }
    }
    if let Some(marker) = current {
        blocks.push((marker, content));
    }

    let mut streams: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut requests = Vec::new();
    for (marker, mut bytes) in blocks {
        let Some(conn) = marker
            .strip_prefix(">>> conn ")
            .and_then(|rest| rest.strip_suffix(" c2s"))
        else {
            continue;
        };
        assert!(bytes.ends_with('\n'), "block without its separator");
        bytes.pop();
        let stream = streams.entry(conn.to_owned()).or_default();
        stream.extend_from_slice(bytes.as_bytes());
        while let Some(request) = take_request(stream) {
            requests.push(request);
        }
    }
    for (conn, rest) in streams {
        assert!(rest.is_empty(), "conn {conn}: incomplete request left over");
    }
    requests
}

/// Takes one complete HTTP/1.1 request off the front of `stream`.
fn take_request(stream: &mut Vec<u8>) -> Option<Captured> {
    let head_end = stream.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8(stream[..head_end].to_vec()).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?.to_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).expect("header name"),
            HeaderValue::from_str(value.trim()).expect("header value"),
        );
    }
    let length: usize = headers
        .get("content-length")
        .map_or(0, |v| v.to_str().expect("ascii").parse().expect("number"));
    let body_start = head_end + 4;
    if stream.len() < body_start + length {
        return None;
    }
    let body = stream[body_start..body_start + length].to_vec();
    stream.drain(..body_start + length);
    Some(Captured {
        method,
        target,
        headers,
        body,
    })
}

/// What one POST of the captured session should parse to.
struct Expected {
    kind: Kind,
    id: Option<i64>,
    method: &'static str,
    tool: Option<&'static str>,
}

const fn expect(
    kind: Kind,
    id: Option<i64>,
    method: &'static str,
    tool: Option<&'static str>,
) -> Expected {
    Expected {
        kind,
        id,
        method,
        tool,
    }
}

/// The session every capture records before 2026-07-28: initialize, list,
/// call add, call slow_echo, call the unknown tool.
const STATEFUL_SESSION: &[Expected] = &[
    expect(Kind::Request, Some(1), "initialize", None),
    expect(Kind::Notification, None, "notifications/initialized", None),
    expect(Kind::Request, Some(2), "tools/list", None),
    expect(Kind::Request, Some(3), "tools/call", Some("add")),
    expect(Kind::Request, Some(4), "tools/call", Some("slow_echo")),
    expect(Kind::Request, Some(5), "tools/call", Some("nope")),
];

/// The same session in revision 2026-07-28: no initialize.
const STATELESS_SESSION: &[Expected] = &[
    expect(Kind::Request, Some(1), "tools/list", None),
    expect(Kind::Request, Some(2), "tools/call", Some("add")),
    expect(Kind::Request, Some(3), "tools/call", Some("slow_echo")),
    expect(Kind::Request, Some(4), "tools/call", Some("nope")),
];

fn check_capture(capture: &str, endpoint: &str, expected: &[Expected], stateless: bool) {
    let posts: Vec<Captured> = captured_requests(capture)
        .into_iter()
        .filter(|request| request.method == "POST")
        .collect();
    assert_eq!(posts.len(), expected.len(), "number of POSTs");
    for (post, want) in posts.iter().zip(expected) {
        assert!(
            is_endpoint_path(&post.target, endpoint),
            "{} is not {endpoint}",
            post.target
        );
        assert!(looks_like_jsonrpc(&post.body));
        let message = match parse_body(&post.body, &post.headers) {
            Ok(Parsed::Single(message)) => message,
            other => panic!("{}: {other:?}", String::from_utf8_lossy(&post.body)),
        };
        assert_eq!(message.kind, want.kind);
        assert_eq!(message.id, want.id.map(Value::from));
        assert_eq!(message.method.as_deref(), Some(want.method));
        assert_eq!(message.tool.as_deref(), want.tool);
        assert_eq!(message.stateless_2026, stateless, "{message:?}");
        assert_eq!(message.is_tool_call(), want.tool.is_some());
        match want.tool {
            Some("add") => {
                assert_eq!(message.arg_keys, ["a", "b"]);
                assert_eq!(
                    message.args_sha256.as_deref(),
                    Some(sha256_of(r#"{"a":1,"b":2}"#).as_str())
                );
                assert_eq!(message.arguments, Some(json!({"a": 1, "b": 2})));
            }
            Some("slow_echo") => {
                assert_eq!(message.arg_keys, ["text"]);
                assert_eq!(
                    message.args_sha256.as_deref(),
                    Some(sha256_of(r#"{"text":"hi"}"#).as_str())
                );
            }
            Some("nope") => {
                assert!(message.arg_keys.is_empty());
                assert_eq!(
                    message.args_sha256.as_deref(),
                    Some(sha256_of("{}").as_str())
                );
            }
            _ => {
                assert!(message.arg_keys.is_empty());
                assert_eq!(message.args_sha256, None);
            }
        }
    }
}

#[test]
fn capture_2024_11_05_sse() {
    let capture = include_str!("../../../shared/fixtures/mcp-wire/py-2024-11-05-sse.txt");
    check_capture(capture, "/messages/", STATEFUL_SESSION, false);
}

#[test]
fn capture_2025_11_25_streamable_json() {
    let capture =
        include_str!("../../../shared/fixtures/mcp-wire/py-2025-11-25-streamable-json.txt");
    check_capture(capture, "/mcp", STATEFUL_SESSION, false);
}

#[test]
fn capture_2025_11_25_streamable_sse() {
    let capture = include_str!("../../../shared/fixtures/mcp-wire/py-2025-11-25-streamable.txt");
    check_capture(capture, "/mcp", STATEFUL_SESSION, false);
}

#[test]
fn capture_2026_07_28_is_stateless_and_its_routing_headers_match() {
    let capture = include_str!("../../../shared/fixtures/mcp-wire/py-2026-07-28.txt");
    check_capture(capture, "/mcp", STATELESS_SESSION, true);
    // The capture carries Mcp-Method on every POST and Mcp-Name on calls,
    // so the header checks above ran against real client output.
    let posts = captured_requests(capture);
    assert!(posts.iter().all(|p| p.headers.contains_key("mcp-method")));
    assert_eq!(
        posts
            .iter()
            .filter(|p| p.headers.contains_key("mcp-name"))
            .count(),
        3
    );
}

#[test]
fn capture_2026_07_28_stateless_from_meta_alone() {
    let capture = include_str!("../../../shared/fixtures/mcp-wire/py-2026-07-28.txt");
    for post in captured_requests(capture) {
        let message = single(std::str::from_utf8(&post.body).expect("UTF-8"));
        assert!(message.stateless_2026, "{message:?}");
    }
}

// ---------------------------------------------------------------------------
// Message shapes

#[test]
fn duplicate_keys_are_refused_at_every_depth() {
    let cases = [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#,
            Some(json!(1)),
            r#"duplicate key "method" in the object at /"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            Some(json!(1)),
            r#"duplicate key "name" in the object at /params"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1,"x":2}}}"#,
            Some(json!(1)),
            r#"duplicate key "x" in the object at /params/arguments"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":[{"y":{"z":1,"z":1}}]}}}"#,
            Some(json!(1)),
            r#"duplicate key "z" in the object at /params/arguments/x/0/y"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","_meta":{"k":1,"k":1}}}"#,
            Some(json!(1)),
            r#"duplicate key "k" in the object at /params/_meta"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
            None,
            r#"duplicate key "id""#,
        ),
        (
            r#"[{"jsonrpc":"2.0","id":7,"method":"ping"},{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"a","name":"b"}}]"#,
            Some(json!(8)),
            r#"duplicate key "name" in the object at /1/params"#,
        ),
        // Escapes are decoded before keys are compared.
        (
            r#"{"jsonrpc":"2.0","id":"q","method":"tools/call","params":{"name":"a","\u006eame":"b"}}"#,
            Some(json!("q")),
            r#"duplicate key "name""#,
        ),
    ];
    for (body, id, part) in cases {
        assert_refused(body, INVALID_REQUEST, id, part);
    }
}

#[test]
fn keys_differing_only_in_case_are_refused() {
    let cases = [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call"}"#,
            Some(json!(1)),
            r#"keys "method" and "METHOD""#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe","Name":"drop_cluster"}}"#,
            Some(json!(1)),
            r#"keys "name" and "Name" in the object at /params"#,
        ),
        // U+017F LATIN SMALL LETTER LONG S folds to "s" in Go.
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"},"param\u017f":{"name":"b"}}"#,
            Some(json!(1)),
            "differ only in letter case",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"amount":1,"AMOUNT":1000}}}"#,
            Some(json!(1)),
            r#"keys "amount" and "AMOUNT" in the object at /params/arguments"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"ID":2,"method":"ping"}"#,
            None,
            r#"keys "id" and "ID""#,
        ),
    ];
    for (body, id, part) in cases {
        assert_refused(body, INVALID_REQUEST, id, part);
    }
}

#[test]
fn a_syntax_error_wins_over_a_duplicate_key() {
    assert_refused(
        r#"{"jsonrpc":"2.0","id":1,"id":1,"method":"ping""#,
        PARSE_ERROR,
        None,
        "Parse error: EOF",
    );
}

#[test]
fn escaped_method_and_tool_names_are_decoded() {
    let message = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"\u0074ools/call","params":{"\u006eame":"drop\u005fcluster","arguments":{}}}"#,
    );
    assert_eq!(message.method.as_deref(), Some("tools/call"));
    assert_eq!(message.tool.as_deref(), Some("drop_cluster"));
    assert!(message.is_tool_call());
}

#[test]
fn a_message_with_method_is_a_request_whatever_else_it_carries() {
    let message = single(
        r#"{"jsonrpc":"2.0","id":9,"result":{},"method":"tools/call","params":{"name":"drop_cluster"}}"#,
    );
    assert_eq!(message.kind, Kind::Request);
    assert_eq!(message.tool.as_deref(), Some("drop_cluster"));
    assert_eq!(message.args_sha256, None);
    assert_eq!(message.arguments, None);

    let message = single(r#"{"jsonrpc":"2.0","error":{"code":1,"message":"x"},"method":"ping"}"#);
    assert_eq!(message.kind, Kind::Notification);
    assert_eq!(message.id, None);

    // Without an id, a response-shaped tools/call is a notification: refused.
    assert_refused(
        r#"{"jsonrpc":"2.0","result":{},"method":"tools/call","params":{"name":"x"}}"#,
        INVALID_REQUEST,
        None,
        "tools/call must carry an id",
    );
}

#[test]
fn responses_need_an_id_and_exactly_one_outcome() {
    let message = single(r#"{"jsonrpc":"2.0","id":"s-1","result":{"action":"accept"}}"#);
    assert_eq!(message.kind, Kind::Response);
    assert_eq!(message.id, Some(json!("s-1")));
    assert_eq!(message.method, None);
    let message = single(r#"{"jsonrpc":"2.0","id":4,"error":{"code":-1,"message":"no"}}"#);
    assert_eq!(message.kind, Kind::Response);

    assert_refused(
        r#"{"jsonrpc":"2.0","id":4,"result":{},"error":{"code":-1,"message":"no"}}"#,
        INVALID_REQUEST,
        Some(json!(4)),
        "exactly one of",
    );
    assert_refused(
        r#"{"jsonrpc":"2.0","id":4}"#,
        INVALID_REQUEST,
        Some(json!(4)),
        "exactly one of",
    );
    assert_refused(
        r#"{"jsonrpc":"2.0","result":{}}"#,
        INVALID_REQUEST,
        None,
        "must be a response with an \"id\"",
    );
}

#[test]
fn ids_must_be_strings_or_integers() {
    for id in [
        "null",
        "1.5",
        "1e3",
        "1.0",
        "true",
        "{}",
        "[]",
        "18446744073709551616",
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        assert_refused(&body, INVALID_REQUEST, None, "\"id\" must be a string or");
    }
    for (id, value) in [
        (r#""abc""#, json!("abc")),
        ("0", json!(0)),
        ("-3", json!(-3)),
        ("18446744073709551615", json!(u64::MAX)),
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        assert_eq!(single(&body).id, Some(value));
    }
}

#[test]
fn jsonrpc_must_be_2_0() {
    for field in [
        "",
        r#""jsonrpc":"1.0","#,
        r#""jsonrpc":2.0,"#,
        r#""jsonrpc":null,"#,
    ] {
        let body = format!(r#"{{{field}"id":3,"method":"ping"}}"#);
        assert_refused(
            &body,
            INVALID_REQUEST,
            Some(json!(3)),
            r#""jsonrpc" must be "2.0""#,
        );
    }
}

#[test]
fn method_must_be_a_string() {
    assert_refused(
        r#"{"jsonrpc":"2.0","id":3,"method":5}"#,
        INVALID_REQUEST,
        Some(json!(3)),
        r#""method" must be a string, not a number"#,
    );
    assert_refused(
        r#"{"jsonrpc":"2.0","id":3,"method":null,"result":{}}"#,
        INVALID_REQUEST,
        Some(json!(3)),
        r#""method" must be a string, not null"#,
    );
}

#[test]
fn tools_call_without_id_is_refused() {
    let err = assert_refused(
        r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"add","arguments":{}}}"#,
        INVALID_REQUEST,
        None,
        "",
    );
    assert_eq!(
        err.message,
        "tools/call must carry an id; it was not forwarded"
    );
    // Other notifications are fine.
    assert_eq!(
        single(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#)
            .kind,
        Kind::Notification
    );
}

#[test]
fn tools_call_needs_object_params_with_a_string_name() {
    let cases = [
        ("", "params must be an object"),
        (r#","params":null"#, "params must be an object"),
        (r#","params":["add"]"#, "params must be an object"),
        (r#","params":{}"#, "params.name is missing"),
        (r#","params":{"arguments":{}}"#, "params.name is missing"),
        (r#","params":{"name":null}"#, "params.name must be a string"),
        (
            r#","params":{"name":["add"]}"#,
            "params.name must be a string",
        ),
        (
            r#","params":{"name":"add","arguments":null}"#,
            "params.arguments must be an object",
        ),
        (
            r#","params":{"name":"add","arguments":[1,2]}"#,
            "params.arguments must be an object",
        ),
        (
            r#","params":{"name":"add","arguments":"a=1"}"#,
            "params.arguments must be an object",
        ),
    ];
    for (params, part) in cases {
        let body = format!(r#"{{"jsonrpc":"2.0","id":"c","method":"tools/call"{params}}}"#);
        let err = assert_refused(&body, INVALID_PARAMS, Some(json!("c")), part);
        assert!(
            err.message.starts_with("Invalid params: "),
            "{}",
            err.message
        );
    }
}

#[test]
fn batches_are_non_empty_arrays_of_messages() {
    let body = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}},
                   {"jsonrpc":"2.0","method":"notifications/initialized"},
                   {"jsonrpc":"2.0","id":"r","result":{}}]"#;
    let Ok(Parsed::Batch(messages)) = parse_body(body.as_bytes(), &no_headers()) else {
        panic!("expected a batch");
    };
    let kinds: Vec<Kind> = messages.iter().map(|m| m.kind).collect();
    assert_eq!(kinds, [Kind::Request, Kind::Notification, Kind::Response]);
    assert_eq!(messages[0].tool.as_deref(), Some("add"));
    assert_eq!(messages[0].arg_keys, ["a"]);

    assert_refused("[]", INVALID_REQUEST, None, "the batch is empty");
    assert_refused(" [ ] ", INVALID_REQUEST, None, "the batch is empty");
    assert_refused("[1]", INVALID_REQUEST, None, "batch element 0 is a number");
    assert_refused(
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},[{"jsonrpc":"2.0","id":2,"method":"ping"}]]"#,
        INVALID_REQUEST,
        None,
        "batch element 1 is an array",
    );
    assert_refused(
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{}}]"#,
        INVALID_PARAMS,
        Some(json!(2)),
        "Invalid params: batch element 1: tools/call params.name is missing",
    );
    assert_refused(
        r#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"a"}}]"#,
        INVALID_REQUEST,
        None,
        "batch element 0: tools/call must carry an id",
    );
}

#[test]
fn top_level_must_be_an_object_or_array() {
    for body in ["1", r#""tools/call""#, "null", "true"] {
        assert_refused(body, INVALID_REQUEST, None, "not a JSON-RPC message object");
    }
}

#[test]
fn malformed_json_is_a_parse_error() {
    for body in [
        &b""[..],
        b"   ",
        b"{",
        b"{\"jsonrpc\":\"2.0\",}",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"} x",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}{}",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{\"x\":NaN}}",
        b"\xef\xbb\xbf{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"\\ud800\"}}",
    ] {
        let err = refused(body);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code, PARSE_ERROR, "{err}");
        assert!(err.message.starts_with("Parse error: "), "{err}");
        assert_eq!(err.id, None);
    }
    let err = refused(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xffng\"}");
    assert_eq!(err.code, PARSE_ERROR);
    assert!(err.message.contains("not valid UTF-8"), "{err}");
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let depth = 100_000;
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{{"x":{}{}}}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let err = refused(body.as_bytes());
    assert_eq!(err.code, PARSE_ERROR);
    assert!(err.message.contains("recursion limit"), "{err}");
}

#[test]
fn stateless_2026_follows_the_header_or_meta() {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}}"#;
    let message = single_with(body, &headers(&[("MCP-Protocol-Version", "2026-07-28")]));
    assert!(message.stateless_2026);
    let message = single_with(body, &headers(&[("mcp-protocol-version", "2027-01-05")]));
    assert!(message.stateless_2026);
    let message = single_with(body, &headers(&[("Mcp-Protocol-Version", "2025-11-25")]));
    assert!(!message.stateless_2026);
    assert!(!single(body).stateless_2026);

    let with_meta = |version: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"_meta":{{"io.modelcontextprotocol/protocolVersion":"{version}"}}}}}}"#
        )
    };
    assert!(single(&with_meta("2026-07-28")).stateless_2026);
    assert!(!single(&with_meta("2025-06-18")).stateless_2026);

    // Responses take the header only.
    let response = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
    assert!(
        single_with(
            response,
            &headers(&[("mcp-protocol-version", "2026-07-28")])
        )
        .stateless_2026
    );
}

#[test]
fn routing_headers_must_match_the_body() {
    let call = r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"drop_cluster","arguments":{}}}"#;
    let ok = |pairs: &[(&str, &str)]| {
        let message = single_with(call, &headers(pairs));
        assert_eq!(message.tool.as_deref(), Some("drop_cluster"));
    };
    ok(&[("Mcp-Method", "tools/call"), ("Mcp-Name", "drop_cluster")]);
    // "drop_cluster" in the Base64 sentinel form.
    ok(&[("mcp-name", "=?base64?ZHJvcF9jbHVzdGVy?=")]);

    let mismatch = |pairs: &[(&str, &str)], part: &str| {
        let err = refused_with(call.as_bytes(), &headers(pairs));
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code, HEADER_MISMATCH, "{err}");
        assert_eq!(err.id, Some(json!(6)));
        assert!(err.message.contains(part), "{err}");
    };
    mismatch(&[("Mcp-Method", "tools/list")], "Mcp-Method differs");
    mismatch(&[("Mcp-Name", "add")], "Mcp-Name differs from params.name");
    mismatch(&[("Mcp-Name", "=?base64?YWRk?=")], "Mcp-Name differs");
    mismatch(
        &[("Mcp-Name", "=?base64?ZHJvcF9jbHVzdGVy?")],
        "Mcp-Name differs",
    );
    mismatch(&[("Mcp-Name", "=?base64?ZHJvcF9jbHVzdGVy=?=")], "not valid");
    mismatch(
        &[("Mcp-Name", "=?base64?ZHJvcF9jbHVzdGVz?=")],
        "Mcp-Name differs",
    );
    mismatch(
        &[("Mcp-Name", "=?base64?ZHJvcF9jbHVzdGVy?=x")],
        "Mcp-Name differs",
    );
    mismatch(
        &[("Mcp-Name", "=?BASE64?ZHJvcF9jbHVzdGVy?=")],
        "Mcp-Name differs",
    );
    // No value of the header or the body is quoted in the error.
    for pairs in [[("Mcp-Name", "add")], [("Mcp-Method", "tools/list")]] {
        let err = refused_with(call.as_bytes(), &headers(&pairs));
        for value in ["add", "drop_cluster", "tools/list"] {
            assert!(!err.message.contains(value), "{err}");
        }
    }

    // Base64 must be canonical: "YR==" carries non-zero unused bits, though
    // a lenient decoder reads it as "a".
    let call_a = r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"a"}}"#;
    single_with(call_a, &headers(&[("Mcp-Name", "=?base64?YQ==?=")]));
    let err = refused_with(
        call_a.as_bytes(),
        &headers(&[("Mcp-Name", "=?base64?YR==?=")]),
    );
    assert_eq!(err.code, HEADER_MISMATCH);
    assert!(err.message.contains("not valid"), "{err}");
    let err = refused_with(
        call_a.as_bytes(),
        &headers(&[("Mcp-Name", "=?base64?YQ?=")]),
    );
    assert!(err.message.contains("not valid"), "{err}");
    // Valid Base64 that is not UTF-8.
    let err = refused_with(
        call_a.as_bytes(),
        &headers(&[("Mcp-Name", "=?base64?/w==?=")]),
    );
    assert!(err.message.contains("not valid"), "{err}");
    mismatch(
        &[("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/call")],
        "more than one mcp-method",
    );

    let prompt = r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#;
    let err = refused_with(prompt.as_bytes(), &headers(&[("Mcp-Name", "q")]));
    assert_eq!(err.code, HEADER_MISMATCH);
    let read = r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}"#;
    single_with(read, &headers(&[("Mcp-Name", "file:///a")]));

    let response = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
    let err = refused_with(response.as_bytes(), &headers(&[("Mcp-Method", "ping")]));
    assert_eq!(err.code, HEADER_MISMATCH);

    let batch = format!("[{call}]");
    let err = refused_with(batch.as_bytes(), &headers(&[("Mcp-Method", "tools/call")]));
    assert_eq!(err.code, HEADER_MISMATCH);
    assert!(err.message.contains("batch"), "{err}");
}

// ---------------------------------------------------------------------------
// Canonical hashing

#[test]
fn canonical_json_sorts_keys_and_drops_whitespace() {
    let value: Value = serde_json::from_str(
        "{ \"b\" : [ 1 , { \"z\" : null , \"a\" : true } ] , \"a\" : \"x\\n\\u0001\\\"\u{e9}\" , \"c\": -2.5e0 }",
    )
    .expect("JSON");
    assert_eq!(
        canonical_json(&value),
        "{\"a\":\"x\\n\\u0001\\\"\u{e9}\",\"b\":[1,{\"a\":true,\"z\":null}],\"c\":-2.5}"
    );
}

#[test]
fn args_hash_is_stable_under_reordering_and_whitespace() {
    let a = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"b":{"y":[1,2],"x":"s"},"a":1}}}"#,
    );
    let b = single(
        "{ \"params\" : {\n \"arguments\" : { \"a\" : 1 ,\n\t\"b\" : { \"x\" : \"s\" , \"y\" : [ 1 , 2 ] } },\r\n \"name\" : \"t\" }, \"method\" : \"tools/call\", \"id\" : 2, \"jsonrpc\" : \"2.0\" }",
    );
    let expected = sha256_of(r#"{"a":1,"b":{"x":"s","y":[1,2]}}"#);
    assert_eq!(a.args_sha256.as_deref(), Some(expected.as_str()));
    assert_eq!(a.args_sha256, b.args_sha256);
    assert_eq!(a.arg_keys, ["a", "b"]);

    let c = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"b":{"y":[2,1],"x":"s"},"a":1}}}"#,
    );
    assert_ne!(a.args_sha256, c.args_sha256);
}

#[test]
fn args_hash_is_absent_without_arguments() {
    let message = single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#);
    assert_eq!(message.args_sha256, None);
    assert!(message.arg_keys.is_empty());
    let message =
        single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"arguments":{"a":1}}}"#);
    assert_eq!(message.args_sha256, None);
    assert_eq!(message.arguments, None);
}

#[test]
fn debug_output_leaves_argument_values_out() {
    let message = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"password":"hunter2"}}}"#,
    );
    let debug = format!("{message:?}");
    assert!(debug.contains("password"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

// ---------------------------------------------------------------------------
// Paths

#[test]
fn normalize_path_cases() {
    let cases = [
        ("/mcp", "/mcp"),
        ("/mcp/", "/mcp"),
        ("//mcp", "/mcp"),
        ("/a/../mcp", "/mcp"),
        ("/%6dcp", "/mcp"),
        ("/%6Dcp", "/mcp"),
        ("/mcp?x=1", "/mcp"),
        ("/mcp#frag", "/mcp"),
        ("/mcp/?x=/../a", "/mcp"),
        ("/./mcp/.", "/mcp"),
        ("/../../mcp", "/mcp"),
        ("/%2e%2E/mcp", "/mcp"),
        ("/a/%2f/mcp", "/a/%2F/mcp"),
        ("/mcp%3Fx", "/mcp%3Fx"),
        ("/m%zzcp%", "/m%zzcp%"),
        ("", "/"),
        ("/", "/"),
        ("?x", "/"),
        ("mcp", "/mcp"),
        ("http://127.0.0.1:8000/mcp/?q", "/mcp"),
        ("HTTP://host", "/"),
        ("/a://b", "/a:/b"),
        ("/messages/?session_id=c66df448", "/messages"),
        // A malformed escape and a decoded character that spell a new escape: normalised
        // until nothing changes (request_read fuzz target, corpus/request_read/
        // accept_path_escape_spelt_by_decoding).
        ("/%6d%%3670", "/mg0"),
        ("/%%36d%%36%33p", "/mcp"),
        ("/x/%2%45%2%45/mcp", "/mcp"),
    ];
    for (input, expected) in cases {
        assert_eq!(normalize_path(input), expected, "normalize_path({input:?})");
        assert_eq!(
            normalize_path(expected),
            expected,
            "normalize_path({expected:?})"
        );
    }
}

#[test]
fn is_endpoint_path_compares_normalised_paths() {
    assert!(is_endpoint_path("/mcp", "/mcp"));
    assert!(is_endpoint_path("//mcp/?a=b", "/mcp"));
    assert!(is_endpoint_path("/%6dcp", "/mcp/"));
    assert!(is_endpoint_path("/x/../mcp", "mcp"));
    assert!(!is_endpoint_path("/mcpx", "/mcp"));
    assert!(!is_endpoint_path("/MCP", "/mcp"));
    assert!(!is_endpoint_path("/api/mcp", "/mcp"));
    assert!(!is_endpoint_path("/", "/mcp"));
}

// ---------------------------------------------------------------------------
// looks_like_jsonrpc

fn utf16(text: &str, little_endian: bool, bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let units = (if bom { Some(0xfeffu16) } else { None })
        .into_iter()
        .chain(text.encode_utf16());
    for unit in units {
        if little_endian {
            out.extend_from_slice(&unit.to_le_bytes());
        } else {
            out.extend_from_slice(&unit.to_be_bytes());
        }
    }
    out
}

fn utf32_le(text: &str) -> Vec<u8> {
    text.chars()
        .flat_map(|c| u32::from(c).to_le_bytes())
        .collect()
}

#[test]
fn looks_like_jsonrpc_finds_messages() {
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
    let yes: Vec<Vec<u8>> = vec![
        call.into(),
        br#"{"method":"tools/call"}"#.to_vec(),
        br#"{"x":{"deep":[1,2,{"a":null}]},"jsonrpc":1}"#.to_vec(),
        format!(" \r\n\t{call}").into(),
        format!("[{call}]").into(),
        format!(r#"[1,{{"a":2}},{call}]"#).into(),
        // Nested batches: no spec server reads them, a lenient one might flatten them.
        format!("[[{call}]]").into(),
        b"[1,2,[{\"method\":\"x\"}]]".to_vec(),
        br#"{"METHOD":"tools/call"}"#.to_vec(),
        br#"{"\u006dethod":"tools/call"}"#.to_vec(),
        // Found before the document turns out to be broken.
        br#"{"method":"tools/call","params":{"x":NaN}}"#.to_vec(),
        // Unreadable before any key was found: counted, the parser refuses it.
        br#"{"x":NaN,"method":"tools/call"}"#.to_vec(),
        br#"{"x":"#.to_vec(),
        b"{\"x\":\"\xff\",\"method\":\"tools/call\"}".to_vec(),
        [&b"\xef\xbb\xbf"[..], call.as_bytes()].concat(),
        utf16(call, true, false),
        utf16(call, false, false),
        utf16(call, true, true),
        utf16(call, false, true),
        utf32_le(call),
    ];
    for body in yes {
        assert!(
            looks_like_jsonrpc(&body),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn looks_like_jsonrpc_ignores_other_bodies() {
    let no: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"   ".to_vec(),
        b"a=1&method=tools%2Fcall".to_vec(),
        br#""method""#.to_vec(),
        b"123".to_vec(),
        br#"{"foo":1,"bar":[{"method":"x"}]}"#.to_vec(),
        br#"{"params":{"jsonrpc":"2.0"}}"#.to_vec(),
        b"{}".to_vec(),
        b"[[1,2],[3,{\"a\":4}]]".to_vec(),
        b"{\"a\":1}\n{\"method\":\"x\"}\n".to_vec(),
        b"\x00\x00\x00\x05hello".to_vec(),
        b"<?xml version=\"1.0\"?><method/>".to_vec(),
        utf16(r#"{"foo":1}"#, true, true),
        // Without a BOM, told by its zero bytes: read as UTF-16, not as UTF-8.
        utf16(r#"{"foo":1}"#, true, false),
        utf16(r#"{"foo":1}"#, false, false),
        b"\xff\xfe{".to_vec(),
    ];
    for body in no {
        assert!(
            !looks_like_jsonrpc(&body),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

// ---------------------------------------------------------------------------
// Refusal bodies

#[test]
fn unknown_tool_response_bytes() {
    let body = unknown_tool_response(&json!(5), "drop_cluster");
    assert_eq!(
        std::str::from_utf8(&body).expect("UTF-8"),
        r#"{"jsonrpc":"2.0","id":5,"error":{"code":-32602,"message":"Unknown tool: drop_cluster"}}"#
    );
    let value = parse_json(&body);
    assert_eq!(value["jsonrpc"], "2.0");
    assert_eq!(value["id"], 5);
    assert_eq!(value["error"]["code"], -32602);
    assert_eq!(value["error"]["message"], "Unknown tool: drop_cluster");

    let body = unknown_tool_response(&json!("a\"b"), "t\u{1}\\");
    let value = parse_json(&body);
    assert_eq!(value["id"], "a\"b");
    assert_eq!(value["error"]["message"], "Unknown tool: t\u{1}\\");
}

#[test]
fn denied_response_bytes() {
    let body = denied_response(&json!(3), "calls to drop_cluster are not allowed", false);
    assert_eq!(
        std::str::from_utf8(&body).expect("UTF-8"),
        r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"Denied by mcpwarden policy: calls to drop_cluster are not allowed. Do not retry this call."}],"isError":true}}"#
    );
    let value = parse_json(&body);
    assert_eq!(value["result"]["isError"], true);
    assert!(value["result"].get("resultType").is_none());

    let body = denied_response(&json!("x-1"), "limit \"calls\" exhausted.", true);
    assert_eq!(
        std::str::from_utf8(&body).expect("UTF-8"),
        r#"{"jsonrpc":"2.0","id":"x-1","result":{"content":[{"type":"text","text":"Denied by mcpwarden policy: limit \"calls\" exhausted. Do not retry this call."}],"isError":true,"resultType":"complete"}}"#
    );
    let value = parse_json(&body);
    assert_eq!(value["id"], "x-1");
    assert_eq!(value["result"]["resultType"], "complete");
    assert_eq!(value["result"]["content"][0]["type"], "text");
    assert_eq!(
        value["result"]["content"][0]["text"],
        "Denied by mcpwarden policy: limit \"calls\" exhausted. Do not retry this call."
    );

    let value = parse_json(&denied_response(&json!(1), "  ", false));
    assert_eq!(
        value["result"]["content"][0]["text"],
        "Denied by mcpwarden policy. Do not retry this call."
    );
}

#[test]
fn error_response_bytes() {
    assert_eq!(
        error_response(None, -32600, "Invalid Request: x"),
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request: x"}}"#
    );
    assert_eq!(
        error_response(Some(&json!(u64::MAX)), 1, "m"),
        br#"{"jsonrpc":"2.0","id":18446744073709551615,"error":{"code":1,"message":"m"}}"#
    );
}

#[test]
fn parse_error_response_carries_the_id() {
    let err = refused(br#"{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{"name":1}}"#);
    let value = parse_json(&err.response_body());
    assert_eq!(value["jsonrpc"], "2.0");
    assert_eq!(value["id"], "abc");
    assert_eq!(value["error"]["code"], INVALID_PARAMS);
    assert_eq!(value["error"]["message"], err.message.as_str());
    assert_eq!(
        err.to_string(),
        "HTTP 400, JSON-RPC error -32602: Invalid params: tools/call params.name must be a string"
    );

    let err = refused(b"{");
    let value = parse_json(&err.response_body());
    assert_eq!(value["id"], Value::Null);
    assert_eq!(value["error"]["code"], PARSE_ERROR);
}

#[test]
fn version_header_and_meta_must_agree() {
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let m = single_with(body, &headers(&[("MCP-Protocol-Version", "2026-07-28")]));
    assert_eq!(m.revision.as_deref(), Some("2026-07-28"));
    let err = refused_with(
        body.as_bytes(),
        &headers(&[("MCP-Protocol-Version", "2025-11-25")]),
    );
    assert_eq!(err.code, HEADER_MISMATCH, "{err}");
    assert_eq!(err.id, Some(json!(3)));
    // An initialize proposes its version in params, not _meta: no mismatch to find.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}"#;
    assert_eq!(single(init).revision.as_deref(), Some("2025-06-18"));
    let cancel =
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"a"}}"#;
    assert_eq!(single(cancel).cancels, Some(json!("a")));
}

#[test]
fn batch_subset_keeps_element_bytes() {
    let body = br#"[ {"jsonrpc":"2.0","id":1,"method":"a"} , {"jsonrpc":"2.0", "id":2,"method":"b"},{"jsonrpc":"2.0","method":"n"}]"#;
    assert_eq!(
        super::batch_subset(body, &[1, 2]).unwrap(),
        br#"[{"jsonrpc":"2.0", "id":2,"method":"b"},{"jsonrpc":"2.0","method":"n"}]"#.to_vec()
    );
}

/// A method spelt another way is decided like the plain form: a lenient server could run it.
#[test]
fn tools_call_spelt_another_way_is_still_a_call() {
    for method in ["Tools/Call", "TOOLS/CALL", " tools/call ", "tools/call\t"] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"{}","params":{{"name":"secret_dump"}}}}"#,
            method.replace('\t', "\\t")
        );
        let m = single(&body);
        assert!(m.is_tool_call(), "{method:?}");
        assert_eq!(m.tool.as_deref(), Some("secret_dump"));
    }
    assert!(
        !single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/called","params":{}}"#).is_tool_call()
    );
    // And like the plain form, a notification of it is refused.
    let err = refused_with(
        br#"{"jsonrpc":"2.0","method":"TOOLS/call","params":{"name":"x"}}"#,
        &headers(&[]),
    );
    assert_eq!(err.code, INVALID_REQUEST, "{err}");
}

#[test]
fn a_key_that_is_a_member_only_when_case_folded_is_refused_even_alone() {
    // Go's encoding/json binds each of these to the member it folds to.
    for (body, key) in [
        (r#"{"jsonrpc":"2.0","id":1,"result":{},"Method":"tools/call","params":{"name":"x"}}"#, "\"Method\""),
        (r#"{"jsonrpc":"2.0","ID":1,"method":"tools/call","params":{"name":"x"}}"#, "\"ID\""),
        (r#"{"JSONRPC":"2.0","id":1,"method":"ping"}"#, "\"JSONRPC\""),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"x"}}"#, "\"Params\""),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"x"}}"#, "\"params.NAME\""),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","Arguments":{}}}"#, "\"params.Arguments\""),
        // Long s (U+017F) folds to s, the Kelvin sign (U+212A) to k.
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progre\u017fsToken":1}}}"#, "params._meta."),
        ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"x\",\"_meta\":{\"progressto\u{212A}en\":1}}}", "params._meta."),
        (r#"{"jsonrpc":"2.0","id":1,"error":{"Code":1,"message":"m"}}"#, "\"error.Code\""),
    ] {
        let err = refused(body.as_bytes());
        assert_eq!(err.code, INVALID_REQUEST, "{body}: {err}");
        assert!(err.message.contains(key), "{body}: {err}");
        assert!(err.message.contains("ignoring letter case"), "{err}");
    }
    // The id is kept unless it is the key in doubt.
    let err = refused(br#"{"jsonrpc":"2.0","id":3,"method":"x","Params":{}}"#);
    assert_eq!(err.id, Some(json!(3)));
    let err = refused(br#"{"jsonrpc":"2.0","iD":3,"method":"x"}"#);
    assert_eq!(err.id, None);
    // Keys that fold to nothing we read are the message's own business.
    single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"Name":1,"ID":2}},"extra":1}"#,
    );
}

#[test]
fn a_number_no_64_bit_value_holds_exactly_is_refused() {
    // serde_json itself refuses a float beyond f64.
    let err = refused(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"amount":1e400}}}"#);
    assert_eq!(err.code, PARSE_ERROR, "{err}");
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"amount":100.0000000000000001}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":18446744073709551616}}}"#,
    ] {
        let err = refused(body.as_bytes());
        assert_eq!(err.code, INVALID_REQUEST, "{body}: {err}");
        assert_eq!(err.id, Some(json!(1)), "{err}");
        assert!(err.message.contains("not held exactly"), "{err}");
        assert!(
            !err.message.contains("1e400") && !err.message.contains("100.0"),
            "{err}"
        );
    }
    single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":0.1,"b":-2.5e-3,"c":18446744073709551615}}}"#,
    );
}
