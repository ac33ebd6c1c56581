//! The invariants of the fuzz targets that read what workloads and servers send
//! (`agent/fuzz/fuzz_targets/{request_read,server_message,sse_split}.rs`): one function per
//! target, taking the fuzzer's bytes, panicking when an invariant breaks (a panic is a finding)
//! and otherwise returning a one-line summary of what the input was.
//!
//! Compiled only under `cargo fuzz` (which sets `--cfg fuzzing`) and for tests: the fuzz targets
//! call these functions, and the tests at the end of this file replay the committed seed corpora
//! (`agent/fuzz/corpus/<target>/`) through the very same functions in every `cargo test`, so a
//! crash input copied into a corpus directory stays checked without nightly or cargo-fuzz.
//!
//! Where an invariant needs an oracle (which objects of a server message are listings, what a
//! filtered listing must hold), the oracle is written from the documented rule, apart from the
//! code under test.

use std::collections::BTreeSet;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value};

use mcpwarden_json::fold_key;

use crate::{
    batch_subset, canonical_json, canonical_sha256, check_encoding, check_param_headers,
    headers::{protocol_version, routing_header},
    inspect, is_endpoint_path, is_method, looks_like_jsonrpc, normalize_path, parse_body,
    Designation, Kind, ListingRule, Message, ParseError, Parsed, SseEvent, SseSplitter,
    FILTERED_TTL_CAP_MS, HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, METHOD_HEADER,
    PARSE_ERROR, TOOLS_CALL,
};

// ---------------------------------------------------------------------------------------------
// request_read

/// A fuzz input read as a request: a first line (the request target), header lines
/// `Name: value` up to an empty line, then the body. Lines end in LF, with an optional CR
/// before it; header lines whose name or value `http` refuses are skipped, as a server would
/// never have handed them over.
pub struct RequestInput<'a> {
    pub target: String,
    pub headers: HeaderMap,
    pub body: &'a [u8],
}

/// Splits `data` as [`RequestInput`] describes.
pub fn decode_request(data: &[u8]) -> RequestInput<'_> {
    let (first, mut rest) = split_line(data);
    let target = String::from_utf8_lossy(first).into_owned();
    let mut headers = HeaderMap::new();
    let mut body: &[u8] = &[];
    while let Some(remaining) = rest {
        let (line, next) = split_line(remaining);
        if line.is_empty() {
            body = next.unwrap_or_default();
            break;
        }
        rest = next;
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    RequestInput {
        target,
        headers,
        body,
    }
}

/// The line at the start of `data` (without its LF and one CR before it) and what follows the
/// LF; `None` when there is no LF.
fn split_line(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    (line.strip_suffix(b"\r").unwrap_or(line), rest)
}

/// The request reader, as `intercept::request` and `intercept::call` use it: the target through
/// [`normalize_path`] and [`is_endpoint_path`], the body through [`check_encoding`],
/// [`looks_like_jsonrpc`] and [`parse_body`], each message's decision inputs, and
/// [`batch_subset`] for batches whose refused elements are taken out.
///
/// Invariants (a panic is a finding):
/// - nothing panics;
/// - the normalised target starts with `/`, has no empty, `.` or `..` segment, no trailing
///   `/` but for the root, and is its own normalisation (the agent stores endpoint paths
///   normalised and normalises them again when it compares), so a target always names the
///   endpoint that is its normalised form;
/// - a body that [`parse_body`] accepts is JSON-RPC to [`looks_like_jsonrpc`] (else a body
///   sent off the endpoint path would be forwarded undecided) and passes [`check_encoding`]
///   without a Content-Type;
/// - every accepted message is consistent: its kind matches its id and method, a `tools/call`
///   request has a tool, argument keys are the sorted keys of the arguments, the arguments'
///   hash is that of their canonical JSON, which reads back to the same value with every
///   number exact; an `Mcp-Method` header equals the method; `MCP-Protocol-Version` is the
///   revision;
/// - an accepted batch re-cut with [`batch_subset`] (all elements, and a subset chosen by the
///   input) parses again to exactly those messages;
/// - a refusal is a 400 or 415 with a known JSON-RPC code, and its response body is JSON
///   carrying that code, that message and the id (or null).
pub fn request_read(data: &[u8]) -> String {
    let input = decode_request(data);
    check_target(&input.target);
    let (headers, body) = (&input.headers, input.body);
    let encoding = check_encoding(headers, body);
    if let Err(e) = &encoding {
        check_error(e);
    }
    let looks = looks_like_jsonrpc(body);
    let parsed = parse_body(body, headers);
    // What the agent does with the body, encoding checked first (`intercept::request`).
    let agent = match (&encoding, &parsed) {
        (Err(_), _) | (_, Err(_)) => "refuses",
        (Ok(()), Ok(_)) => "accepts",
    };
    let summary = match parsed {
        Ok(parsed) => {
            let shown = shown(body);
            assert!(
                looks,
                "parse_body accepted a body that looks_like_jsonrpc calls not JSON-RPC: {shown}"
            );
            if let Err(e) = check_encoding(&HeaderMap::new(), body) {
                panic!("parse_body accepted a body that check_encoding refuses ({e}): {shown}");
            }
            for message in parsed.messages() {
                check_message(message, headers, &shown);
            }
            if let Parsed::Single(message) = &parsed {
                check_single_headers(message, headers, &shown);
            }
            if let Parsed::Batch(messages) = &parsed {
                check_batch(body, headers, messages, data);
            }
            let tools: Vec<&str> = parsed
                .messages()
                .iter()
                .filter_map(|m| m.tool.as_deref())
                .collect();
            format!(
                "parse accepted {} message(s){}",
                parsed.messages().len(),
                if tools.is_empty() {
                    String::new()
                } else {
                    format!(", tools/call {tools:?}")
                }
            )
        }
        Err(e) => {
            check_error(&e);
            format!(
                "parse refused {}/{}: {}",
                e.status.as_u16(),
                e.code,
                e.message
            )
        }
    };
    let encoding = match encoding {
        Ok(()) => "encoding ok".to_owned(),
        Err(e) => format!("encoding refused {}", e.status.as_u16()),
    };
    format!(
        "{} -> {}; looks_like_jsonrpc {looks}; {encoding}; {summary}; agent {agent}",
        input.target.chars().take(60).collect::<String>(),
        normalize_path(&input.target)
    )
}

/// Invariants of [`normalize_path`] and [`is_endpoint_path`] on one target.
fn check_target(target: &str) {
    let normal = normalize_path(target);
    assert!(
        normal.starts_with('/'),
        "{target:?} normalised to {normal:?}"
    );
    if normal != "/" {
        assert!(
            normal[1..]
                .split('/')
                .all(|s| !matches!(s, "" | "." | "..")),
            "{target:?} normalised to {normal:?}, which keeps an empty, . or .. segment"
        );
    }
    let again = normalize_path(&normal);
    assert_eq!(
        again, normal,
        "normalize_path is not idempotent: {target:?} -> {normal:?} -> {again:?}, so the \
         target does not name an endpoint configured as itself"
    );
    assert!(
        is_endpoint_path(target, &normal),
        "{target:?} is not the endpoint {normal:?}"
    );
    // The endpoint the captures use: only for not panicking.
    let _ = is_endpoint_path(target, "/mcp");
}

/// Invariants of one accepted message.
fn check_message(m: &Message, headers: &HeaderMap, shown: &str) {
    match m.kind {
        Kind::Request => assert!(
            m.id.is_some() && m.method.is_some(),
            "a request without id or method: {m:?} from {shown}"
        ),
        Kind::Notification => assert!(
            m.id.is_none() && m.method.is_some(),
            "a notification with an id or without a method: {m:?} from {shown}"
        ),
        Kind::Response => assert!(
            m.id.is_some() && m.method.is_none() && m.tool.is_none(),
            "a response with a method or a tool, or without an id: {m:?} from {shown}"
        ),
    }
    if let Some(id) = &m.id {
        assert!(
            id.is_string() || id.is_i64() || id.is_u64(),
            "id {id} is neither a string nor a 64-bit integer, from {shown}"
        );
    }
    let calls_tool = m
        .method
        .as_deref()
        .is_some_and(|x| is_method(x, TOOLS_CALL));
    assert!(
        !(calls_tool && m.kind == Kind::Notification),
        "a tools/call notification was accepted (it would be forwarded undecided): {shown}"
    );
    assert_eq!(
        m.is_tool_call(),
        calls_tool && m.kind == Kind::Request,
        "is_tool_call disagrees with the method: {m:?} from {shown}"
    );
    if m.is_tool_call() {
        assert!(m.tool.is_some(), "a tools/call without a tool: {shown}");
    } else {
        assert!(
            m.tool.is_none(),
            "a tool on a message that is not a tools/call: {shown}"
        );
    }
    match &m.arguments {
        Some(arguments) => {
            let Value::Object(object) = arguments else {
                panic!("arguments that are not an object: {shown}");
            };
            let mut keys: Vec<String> = object.keys().cloned().collect();
            keys.sort_unstable();
            assert_eq!(m.arg_keys, keys, "arg_keys from {shown}");
            assert_eq!(
                m.args_sha256.as_deref(),
                Some(canonical_sha256(arguments).as_str()),
                "args_sha256 from {shown}"
            );
            check_canonical(arguments, shown);
        }
        None => assert!(
            m.arg_keys.is_empty() && m.args_sha256.is_none(),
            "argument keys or hash without arguments: {m:?} from {shown}"
        ),
    }
    if let Some(revision) = protocol_version(headers) {
        assert_eq!(
            m.revision.as_deref(),
            Some(revision.as_str()),
            "the revision is not MCP-Protocol-Version, from {shown}"
        );
    }
    // The Mcp-Param-* check of call.rs, with every such header designating the argument of
    // its name: only for not panicking (whether the values agree is its unit tests' matter).
    let designations: Vec<Designation> = headers
        .keys()
        .filter_map(|k| k.as_str().strip_prefix("mcp-param-"))
        .map(|suffix| Designation {
            header: suffix.to_owned(),
            path: vec![suffix.to_owned()],
        })
        .collect();
    if m.is_tool_call() && !designations.is_empty() {
        let _ = check_param_headers(&designations, m, headers);
    }
}

/// The canonical JSON of accepted arguments reads back strictly to the same value, and every
/// number in it is exact (so the hash names what the policy compared).
fn check_canonical(arguments: &Value, shown: &str) {
    let text = canonical_json(arguments);
    let document = mcpwarden_json::parse(&text)
        .unwrap_or_else(|e| panic!("canonical JSON {text} does not parse ({e}), from {shown}"));
    assert!(
        document.clash.is_none(),
        "canonical JSON {text} has clashing keys, from {shown}"
    );
    assert_eq!(
        &document.value, arguments,
        "canonical JSON {text} reads back to another value, from {shown}"
    );
    assert_eq!(
        mcpwarden_json::first_inexact_number(&text),
        None,
        "canonical JSON {text} holds an inexact number, from {shown}"
    );
}

/// A single message agrees with its `Mcp-Method` header.
fn check_single_headers(m: &Message, headers: &HeaderMap, shown: &str) {
    if let Ok(Some(method)) = routing_header(headers, METHOD_HEADER) {
        assert_eq!(
            m.method.as_deref(),
            Some(method.as_str()),
            "accepted with Mcp-Method {method:?}: {shown}"
        );
    }
}

/// An accepted batch, re-cut as `call.rs` cuts it when some elements are refused.
fn check_batch(body: &[u8], headers: &HeaderMap, messages: &[Message], data: &[u8]) {
    let all: Vec<usize> = (0..messages.len()).collect();
    let mut rng = Rng::new(data);
    let some: Vec<usize> = all
        .iter()
        .copied()
        .filter(|_| rng.next() & 1 == 1)
        .collect();
    for keep in [all, some] {
        if keep.is_empty() {
            continue;
        }
        let Some(cut) = batch_subset(body, &keep) else {
            panic!(
                "batch_subset({keep:?}) refused an accepted batch: {}",
                shown(body)
            );
        };
        let expected: Vec<&Message> = keep.iter().map(|&i| &messages[i]).collect();
        match parse_body(&cut, headers) {
            Ok(Parsed::Batch(again)) => assert!(
                again.iter().eq(expected.iter().copied()),
                "batch_subset({keep:?}) of {} gave {}, which parses to other messages: \
                 {again:?} instead of {expected:?}",
                shown(body),
                shown(&cut)
            ),
            other => panic!(
                "batch_subset({keep:?}) of {} gave {}, which parses to {other:?}",
                shown(body),
                shown(&cut)
            ),
        }
    }
}

/// A refusal's status, code and response body.
fn check_error(e: &ParseError) {
    assert!(
        e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "status {} for {e}",
        e.status
    );
    assert!(
        [
            PARSE_ERROR,
            INVALID_REQUEST,
            INVALID_PARAMS,
            HEADER_MISMATCH
        ]
        .contains(&e.code),
        "unknown code in {e}"
    );
    if let Some(id) = &e.id {
        assert!(
            id.is_string() || id.is_i64() || id.is_u64(),
            "the refusal names id {id}, which is not one: {e}"
        );
    }
    let body = e.response_body();
    let document = mcpwarden_json::parse(&String::from_utf8_lossy(&body)).unwrap_or_else(|err| {
        panic!(
            "the refusal's body is not JSON ({err}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    let value = document.value;
    assert!(document.clash.is_none(), "clashing keys in {value}");
    assert_eq!(value["jsonrpc"], "2.0", "{value}");
    assert_eq!(value["id"], e.id.clone().unwrap_or(Value::Null), "{value}");
    assert_eq!(value["error"]["code"], e.code, "{value}");
    assert_eq!(value["error"]["message"], e.message.as_str(), "{value}");
}

// ---------------------------------------------------------------------------------------------
// server_message

/// The ids a fuzz input may name as its exchange's `tools/list` requests (flag bits 1 to 4).
fn candidate_ids() -> [Value; 4] {
    [
        Value::from(1),
        Value::from(2),
        Value::from("1"),
        Value::from("list"),
    ]
}

/// A fuzz input read as a server message and the rule to apply to it: a first line of
/// control bytes, then the body (decoded as `intercept::respond` decodes it: UTF-8 with
/// replacement). Control byte 0: bit 0 = `per_caller`, bits 1–4 = which of [`candidate_ids`]
/// are listing ids; the other control bytes: a tool whose name starts with one of them is
/// hidden.
pub struct ServerInput {
    pub per_caller: bool,
    pub listing_ids: Vec<Value>,
    pub hidden_first_bytes: BTreeSet<u8>,
    pub text: String,
}

impl ServerInput {
    pub fn decode(data: &[u8]) -> ServerInput {
        let (control, body) = match data.iter().position(|&b| b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (data, &[][..]),
        };
        let flags = control.first().copied().unwrap_or(0);
        let listing_ids = candidate_ids()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| flags & (2 << i) != 0)
            .map(|(_, id)| id)
            .collect();
        ServerInput {
            per_caller: flags & 1 != 0,
            listing_ids,
            hidden_first_bytes: control.iter().skip(1).copied().collect(),
            text: String::from_utf8_lossy(body).into_owned(),
        }
    }

    fn visible(&self, name: &str) -> bool {
        !name
            .as_bytes()
            .first()
            .is_some_and(|b| self.hidden_first_bytes.contains(b))
    }
}

/// The server-message reader and the `tools/list` filter: [`inspect`] with a rule built from
/// the input ([`ServerInput`]).
///
/// Invariants (a panic is a finding):
/// - nothing panics; there is one message per object of the body (the body, or the objects of
///   a batch), and the body is unreadable exactly when it is not strict JSON or holds no object;
/// - what goes to the client (the rewritten bytes, or else the original ones) parses as JSON,
///   and a rewritten body has no clashing keys;
/// - in it, every listing (a response whose id is a listing id, or whose `result.tools` is an
///   array of objects with string names) holds exactly the original entries that have a string
///   name the rule shows, in order, and so no hidden tool; a listing with clashing keys is
///   replaced by an error; the names removed are reported in order;
/// - for a per-caller rule, a listing carrying 2026-07-28 cache hints (keys compared as a
///   case-insensitive client compares them) is `cacheScope: private` with `ttlMs` at most
///   [`FILTERED_TTL_CAP_MS`], and no other spelling of those two keys is left;
/// - the body is rewritten exactly when one of these changes something: when nothing is hidden
///   the output is the input's bytes;
/// - a rewritten body inspected again with the same rule needs no rewriting.
pub fn server_message(data: &[u8]) -> String {
    let input = ServerInput::decode(data);
    let visible = |name: &str| input.visible(name);
    let rule = ListingRule {
        visible: &visible,
        listing_ids: &input.listing_ids,
        per_caller: input.per_caller,
    };
    let text = &input.text;
    let got = inspect(text, &rule);
    let shown_text = shown(text.as_bytes());

    let document = match mcpwarden_json::parse(text) {
        Ok(d) => d,
        Err(_) => {
            assert!(
                got.unreadable.is_some() && got.messages.is_empty(),
                "a body that is not JSON was read: {shown_text}"
            );
            // Replaced by errors exactly when the exchange expects a listing in it.
            match &got.rewritten {
                None => assert!(
                    input.listing_ids.is_empty(),
                    "an unreadable body that may hold a listing went out as it was: {shown_text}"
                ),
                Some(sent) => {
                    let sent: Value = serde_json::from_slice(sent).unwrap_or_else(|e| {
                        panic!("the replacement is not JSON ({e}): {shown_text}")
                    });
                    let answers = match &sent {
                        Value::Array(items) => items.clone(),
                        one => vec![one.clone()],
                    };
                    assert_eq!(answers.len(), input.listing_ids.len(), "{shown_text}");
                    assert!(
                        answers.iter().all(|a| a["error"].is_object()),
                        "{shown_text}"
                    );
                }
            }
            return "not JSON".to_owned();
        }
    };
    let clash = document.clash.is_some();
    let objects = objects(&document.value);
    assert_eq!(
        got.messages.len(),
        objects.len(),
        "one message per object: {shown_text}"
    );
    assert_eq!(
        got.unreadable.is_some(),
        objects.is_empty(),
        "unreadable {:?} for {shown_text}",
        got.unreadable
    );

    let sent = match &got.rewritten {
        Some(bytes) => String::from_utf8(bytes.clone())
            .unwrap_or_else(|e| panic!("a rewritten body that is not UTF-8 ({e})")),
        None => text.clone(),
    };
    let sent_document = mcpwarden_json::parse(&sent).unwrap_or_else(|e| {
        panic!(
            "what goes to the client is not JSON ({e}): {}",
            shown(sent.as_bytes())
        )
    });
    if got.rewritten.is_some() {
        assert!(
            sent_document.clash.is_none(),
            "a rewritten body with clashing keys: {sent}"
        );
    }
    let sent_objects = objects_at(&sent_document.value, &document.value);

    let mut expect_change = false;
    let mut expect_removed: Vec<String> = Vec::new();
    let mut listings = 0;
    for (position, original) in objects.iter().enumerate() {
        let listing_id = original
            .get("id")
            .is_some_and(|id| input.listing_ids.contains(id));
        let is_response = original.get("method").and_then(Value::as_str).is_none();
        if is_response && crate::server::folded_listing(original, listing_id) {
            // A listing a lenient client could read past the filter: replaced by an error.
            listings += 1;
            expect_change = true;
            let out = sent_objects[position];
            assert!(
                out.get("result").is_none() && out.get("error").is_some(),
                "an ambiguous listing went out as {} from {shown_text}",
                Value::Object(out.clone())
            );
            continue;
        }
        if !is_listing(original, &input.listing_ids) {
            continue;
        }
        listings += 1;
        let out = sent_objects[position];
        if clash {
            expect_change = true;
            assert!(
                out.get("result").is_none() && out.get("error").is_some(),
                "a listing with clashing keys went out as {} from {shown_text}",
                Value::Object(out.clone())
            );
            continue;
        }
        let Some(result) = original.get("result").and_then(Value::as_object) else {
            continue;
        };
        let out_result = out.get("result").and_then(Value::as_object);
        if let Some(Value::Array(tools)) = result.get("tools") {
            let kept: Vec<&Value> = tools
                .iter()
                .filter(|t| t.get("name").and_then(Value::as_str).is_some_and(visible))
                .collect();
            for tool in tools {
                match tool.get("name").and_then(Value::as_str) {
                    Some(name) if visible(name) => {}
                    Some(name) => expect_removed.push(name.to_owned()),
                    None => expect_removed.push(String::new()),
                }
            }
            expect_change |= kept.len() != tools.len();
            let out_tools = out_result.and_then(|r| r.get("tools"));
            let Some(Value::Array(out_tools)) = out_tools else {
                panic!("a listing lost its tools: {sent} from {shown_text}");
            };
            assert!(
                out_tools.iter().eq(kept.iter().copied()),
                "the listing went out with {out_tools:?} instead of {kept:?}, from {shown_text}"
            );
        }
        // Hints are read as a case-insensitive client reads them (`cacheSCope` is cacheScope).
        let is = |key: &str, field: &str| fold_key(key) == fold_key(field);
        let variant = |key: &str| {
            ["cacheScope", "ttlMs"]
                .iter()
                .any(|f| key != *f && is(key, f))
        };
        let hints = result.keys().any(|k| {
            ["resultType", "cacheScope", "ttlMs"]
                .iter()
                .any(|f| is(k, f))
        });
        if input.per_caller && hints {
            let private = result.get("cacheScope").and_then(Value::as_str) == Some("private");
            let capped = result
                .get("ttlMs")
                .and_then(Value::as_u64)
                .is_some_and(|t| t <= FILTERED_TTL_CAP_MS);
            expect_change |= !private || !capped || result.keys().any(|k| variant(k));
            let out_result = out_result.unwrap_or_else(|| panic!("a listing lost its result"));
            assert!(
                !out_result.keys().any(|k| variant(k)),
                "a per-caller listing went out with a cache hint in another case: {sent}"
            );
            assert_eq!(
                out_result.get("cacheScope").and_then(Value::as_str),
                Some("private"),
                "a per-caller listing went out without cacheScope private: {sent}"
            );
            let ttl = out_result.get("ttlMs").and_then(Value::as_u64);
            assert!(
                ttl.is_some_and(|t| t <= FILTERED_TTL_CAP_MS),
                "a per-caller listing went out with ttlMs {ttl:?}: {sent}"
            );
        }
    }
    let removed: Vec<String> = got
        .filtered
        .iter()
        .flat_map(|(_, f)| f.removed.iter().cloned())
        .collect();
    assert_eq!(
        removed, expect_removed,
        "the names reported removed, from {shown_text}"
    );
    assert_eq!(
        got.rewritten.is_some(),
        expect_change,
        "rewritten {} though the rule changes {} (hidden first bytes {:?}, per caller {}): \
         {shown_text}",
        got.rewritten.is_some(),
        if expect_change {
            "something"
        } else {
            "nothing"
        },
        input.hidden_first_bytes,
        input.per_caller
    );
    if got.rewritten.is_some() {
        let again = inspect(&sent, &rule);
        assert!(
            again.rewritten.is_none(),
            "filtering the filtered body changed it again: {sent} -> {}",
            String::from_utf8_lossy(again.rewritten.as_deref().unwrap_or_default())
        );
    }
    format!(
        "{} message(s), {listings} listing(s), removed {removed:?}, {}",
        got.messages.len(),
        if got.rewritten.is_some() {
            "rewritten"
        } else {
            "forwarded as it is"
        }
    )
}

/// The objects `inspect` reads as messages: the body, or the object elements of a batch.
fn objects(value: &Value) -> Vec<&Map<String, Value>> {
    match value {
        Value::Object(o) => vec![o],
        Value::Array(items) => items.iter().filter_map(Value::as_object).collect(),
        _ => Vec::new(),
    }
}

/// The objects of `sent` at the positions of the objects of `original` (`inspect` rewrites
/// objects in place, so the shapes agree).
fn objects_at<'v>(sent: &'v Value, original: &Value) -> Vec<&'v Map<String, Value>> {
    match (sent, original) {
        (Value::Object(o), Value::Object(_)) => vec![o],
        (Value::Array(out), Value::Array(items)) => {
            assert_eq!(out.len(), items.len(), "a batch changed length");
            items
                .iter()
                .zip(out)
                .filter(|(item, _)| item.is_object())
                .map(|(_, out)| {
                    out.as_object()
                        .unwrap_or_else(|| panic!("a message became {out}"))
                })
                .collect()
        }
        // A scalar holds no message; it is forwarded as it is.
        (sent, other) if !other.is_object() && !other.is_array() => {
            assert_eq!(sent, other, "a body that is no message was changed");
            Vec::new()
        }
        _ => panic!("the body changed shape: {sent}"),
    }
}

/// The documented rule: a response (no string `method`) with any id (null or none too) that is one of the
/// exchange's listing ids, or whose `result.tools` is an array of objects with string names.
fn is_listing(object: &Map<String, Value>, listing_ids: &[Value]) -> bool {
    let is_response = object.get("method").and_then(Value::as_str).is_none();
    let id = object.get("id").unwrap_or(&Value::Null);
    let shaped = match object.get("result").and_then(|r| r.get("tools")) {
        Some(Value::Array(tools)) => tools
            .iter()
            .all(|t| t.get("name").is_some_and(Value::is_string)),
        _ => false,
    };
    is_response && (listing_ids.contains(id) || shaped)
}

// ---------------------------------------------------------------------------------------------
// sse_split

/// The SSE splitter, fed the input whole and cut in several ways (every byte, every two bytes,
/// after every CR, and at cut points derived from the input).
///
/// Invariants (a panic is a finding):
/// - nothing panics, and with a limit above the input's length nothing is too large;
/// - the events' bytes, concatenated, followed by the bytes still held (an unfinished event)
///   are the input, byte for byte: nothing is lost, reordered or altered;
/// - every event ends in its blank line (CR or LF), and split alone it is the same event;
/// - every way of cutting the input gives the same events and leaves the same bytes held;
/// - a limit is enforced: fed whole, the splitter refuses exactly when it would have to hold
///   more than the limit;
/// - an event mcpwarden writes ([`crate::message_event`]) carrying one line of data is read
///   back as one `message` event with that data, byte for byte.
pub fn sse_split(data: &[u8]) -> String {
    let (whole, held) = split(data, &[data.len()]);
    let shown_data = shown(data);
    let mut concatenated: Vec<u8> = whole.iter().flat_map(|e| e.raw.to_vec()).collect();
    assert_eq!(
        concatenated.len() + held,
        data.len(),
        "{} event byte(s) + {held} held for {} input bytes: {shown_data}",
        concatenated.len(),
        data.len()
    );
    concatenated.extend_from_slice(&data[data.len() - held..]);
    assert!(
        concatenated == data,
        "the events' bytes are not the input's: {shown_data}"
    );
    for (i, event) in whole.iter().enumerate() {
        assert!(
            event.raw.ends_with(b"\n") || event.raw.ends_with(b"\r"),
            "event {i} does not end in a blank line: {event:?}"
        );
        // A later event that starts with a byte-order mark reads otherwise at a stream's start.
        if i == 0 || !event.raw.starts_with(b"\xEF\xBB\xBF") {
            let (alone, left) = split(&event.raw, &[event.raw.len()]);
            assert!(
                left == 0 && alone.len() == 1 && alone[0] == *event,
                "event {i} split alone gives {alone:?} (+{left} held) instead of {event:?}"
            );
        }
        if let Some(data) = &event.data {
            if !data.contains(['\r', '\n']) {
                let written = crate::message_event(data.as_bytes());
                let (read, left) = split(&written, &[written.len()]);
                assert!(
                    left == 0
                        && read.len() == 1
                        && read[0].raw == written
                        && read[0].data.as_deref() == Some(data.as_str())
                        && read[0].is_message(),
                    "message_event({data:?}) reads back as {read:?}"
                );
            }
        }
    }

    let mut rng = Rng::new(data);
    let mut random: Vec<usize> = (0..1 + rng.next() % 8)
        .map(|_| (rng.next() % (data.len() as u64 + 1)) as usize)
        .collect();
    random.push(data.len());
    random.sort_unstable();
    let cuts: [(&str, Vec<usize>); 4] = [
        ("every byte", (1..=data.len()).collect()),
        (
            "every two bytes",
            (2..=data.len() + 1)
                .step_by(2)
                .map(|c| c.min(data.len()))
                .collect(),
        ),
        (
            "after every CR",
            data.iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\r')
                .map(|(i, _)| i + 1)
                .chain([data.len()])
                .collect(),
        ),
        ("derived from the input", random),
    ];
    for (how, cuts) in &cuts {
        let (events, left) = split(data, cuts);
        assert!(
            events == whole && left == held,
            "cut {how} ({cuts:?}), the events differ from the input's read whole: {events:?} \
             (+{left} held) instead of {whole:?} (+{held} held), for {shown_data}"
        );
    }

    // Before the end of the stream the splitter also holds an event whose blank line is a
    // lone CR at the very end (it waits to see whether a LF follows).
    let mut unbounded = SseSplitter::new(usize::MAX);
    let _ = unbounded.push(data);
    let holding = unbounded.pending();
    let limit = (rng.next() % (data.len() as u64 + 2)) as usize;
    let pushed = SseSplitter::new(limit).push(data);
    assert_eq!(
        pushed.is_err(),
        holding > limit,
        "limit {limit} with {holding} byte(s) held: {pushed:?}"
    );

    format!(
        "{} event(s) ({} message), {held} byte(s) held",
        whole.len(),
        whole.iter().filter(|e| e.is_message()).count()
    )
}

/// The events of `data` fed in pieces ending at `cuts` (ascending, the last one `data.len()`),
/// with the stream then ended, and the bytes still held.
fn split(data: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, usize) {
    let mut splitter = SseSplitter::new(usize::MAX);
    let mut events = Vec::new();
    let mut from = 0;
    for &to in cuts {
        let piece = &data[from..to.max(from)];
        from = to.max(from);
        events.extend(
            splitter
                .push(piece)
                .unwrap_or_else(|e| panic!("no limit, yet {e}")),
        );
    }
    events.extend(splitter.finish());
    (events, splitter.pending())
}

// ---------------------------------------------------------------------------------------------
// Shared

/// Bytes for a panic message: lossy text, at most 2,000 characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(2000).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// A small deterministic generator seeded by the input, for choices (cut points, subsets)
/// that must be the same every time one input is replayed.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Rng {
        // FNV-1a.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(hash)
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// Every file of `agent/fuzz/corpus/<target>/`, sorted, with its name.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../agent/fuzz/corpus")
            .join(target);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| {
                entry
                    .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                    .path()
            })
            .filter(|path| path.is_file())
            .collect();
        paths.sort();
        assert!(!paths.is_empty(), "{} has no seeds", dir.display());
        paths
            .into_iter()
            .map(|path| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                (name, bytes)
            })
            .collect()
    }

    /// Replays a corpus through its target's check; returns (name, summary) per seed.
    fn replay(target: &str, check: fn(&[u8]) -> String) -> Vec<(String, String)> {
        let seeds = corpus(target);
        let out: Vec<(String, String)> = seeds
            .iter()
            .map(|(name, bytes)| {
                let summary = check(bytes);
                println!("{target}/{name}: {summary}");
                (name.clone(), summary)
            })
            .collect();
        println!("{target}: {} seed(s), every invariant held", out.len());
        out
    }

    /// Seeds named `accept_*` must be accepted by the agent (encoding and parser) and
    /// `refuse_*` refused: the corpus says what each bypass class is expected to meet, and a
    /// change of behaviour shows here.
    #[test]
    fn request_read_corpus_keeps_the_invariants() {
        for (name, summary) in replay("request_read", request_read) {
            if name.starts_with("accept_") {
                assert!(summary.ends_with("; agent accepts"), "{name}: {summary}");
            }
            if name.starts_with("refuse_") {
                assert!(summary.ends_with("; agent refuses"), "{name}: {summary}");
            }
        }
    }

    /// Seeds named `filtered_*` must be rewritten, `untouched_*` forwarded as they are.
    #[test]
    fn server_message_corpus_keeps_the_invariants() {
        for (name, summary) in replay("server_message", server_message) {
            if name.starts_with("filtered_") {
                assert!(summary.ends_with("rewritten"), "{name}: {summary}");
            }
            if name.starts_with("untouched_") {
                assert!(summary.ends_with("as it is"), "{name}: {summary}");
            }
        }
    }

    #[test]
    fn sse_split_corpus_keeps_the_invariants() {
        replay("sse_split", sse_split);
    }

    #[test]
    fn inputs_decode_as_documented() {
        let input = decode_request(
            b"/mcp?x=1\r\nContent-Type: application/json\r\nBad Name: x\r\nMcp-Method:  tools/call \r\n\r\n{}\n",
        );
        assert_eq!(input.target, "/mcp?x=1");
        assert_eq!(input.headers.len(), 2, "{:?}", input.headers);
        assert_eq!(input.headers["mcp-method"], "tools/call");
        assert_eq!(input.body, b"{}\n");
        let input = decode_request(b"/only-a-target");
        assert_eq!((input.headers.len(), input.body), (0, &b""[..]));

        let input = ServerInput::decode(b"\x05sx\n{}");
        assert!(input.per_caller);
        assert_eq!(input.listing_ids, vec![Value::from(2)]);
        assert!(!input.visible("secret") && !input.visible("x") && input.visible("echo"));
        assert!(input.visible(""), "a name without a first byte is shown");
        assert_eq!(input.text, "{}");
    }
}
