//! Understanding HTTP requests as MCP (JSON-RPC 2.0) messages.
//!
//! Pure functions over bytes, paths and headers: no sockets, no async. The
//! interceptor buffers a POST body (up to [`DEFAULT_MAX_BODY`] by default),
//! asks [`parse_body`] what it says, lets the policy decide each
//! `tools/call`, and then either forwards the original bytes unchanged or
//! answers with one of the bodies built here ([`denied_response`],
//! [`unknown_tool_response`], [`ParseError::response_body`]).
//!
//! The parser is strict on purpose. The bytes are forwarded as they are, so
//! any message that this module reads differently from the server is a way
//! around the policy. Whatever could be read two ways is refused rather than
//! guessed at:
//! - duplicate object keys anywhere in the document, and keys that differ
//!   only in letter case (Go's `encoding/json` matches fields that way);
//! - ids that are not a string or an integer, messages whose kind is unclear;
//! - `tools/call` without an id, a string `name`, or object `arguments`;
//! - 2026-07-28 routing headers (`Mcp-Method`, `Mcp-Name`) that disagree
//!   with the body.
//!
//! Other pieces: [`normalize_path`] and [`is_endpoint_path`] recognise the
//! endpoint however its path is spelt, and [`looks_like_jsonrpc`] spots
//! JSON-RPC sent elsewhere on the same origin.

mod charset;
mod headers;
mod params;
mod path;
mod probe;
mod response;
mod server;
mod sse;

#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzz_checks;

#[cfg(test)]
mod tests;

use std::fmt;

use mcpwarden_json as strict;
use serde_json::{Map, Value};

pub use charset::check_encoding;
pub use headers::{
    is_stateless_revision, META_PROTOCOL_VERSION, METHOD_HEADER, NAME_HEADER,
    PROTOCOL_VERSION_HEADER, STATELESS_REVISION,
};
pub use mcpwarden_json::{canonical_json, canonical_sha256, fold_key, sha256_hex};
pub use params::{designations, has_param_headers, Designation};
pub use path::{is_endpoint_path, normalize_path};
pub use probe::looks_like_jsonrpc;
pub use response::{
    denied_response, error_response, input_required_response, progress_notification,
    unknown_tool_response, with_round_trip, ParseError, HEADER_MISMATCH, INTERNAL_ERROR,
    INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR,
};
pub use server::{inspect, Filtered, Inspected, ListingRule, ServerMessage, FILTERED_TTL_CAP_MS};
pub use sse::{message_event, EventTooLarge, SseEvent, SseSplitter};

/// Default bound on a buffered POST body, in bytes.
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;

/// The method whose requests the policy decides.
pub const TOOLS_CALL: &str = "tools/call";

/// Whether `method` names `name` for some server: exactly, or but for letter case and
/// surrounding whitespace (which a lenient server might ignore).
pub fn is_method(method: &str, name: &str) -> bool {
    method == name || strict::fold_key(method.trim()) == strict::fold_key(name)
}

/// What a JSON-RPC message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has a `method` and an `id`: expects a response.
    Request,
    /// Has a `method` and no `id`.
    Notification,
    /// Has an `id`, no `method`, and exactly one of `result` and `error`
    /// (a client answering a server's request).
    Response,
}

/// One JSON-RPC message, as much of it as the policy and the audit log need.
#[derive(Clone, PartialEq)]
pub struct Message {
    /// What the message is.
    pub kind: Kind,
    /// The id (a string or an integer); `None` for notifications.
    pub id: Option<Value>,
    /// The method, with JSON escapes decoded; `None` for responses.
    pub method: Option<String>,
    /// `params.name` of a `tools/call` request, escapes decoded.
    pub tool: Option<String>,
    /// Top-level keys of `params.arguments` of a `tools/call`, sorted; empty
    /// when there are none.
    pub arg_keys: Vec<String>,
    /// Lowercase hex SHA-256 of the canonical JSON of `params.arguments`
    /// (see [`canonical_json`]); `None` when the call has no arguments.
    pub args_sha256: Option<String>,
    /// `params.arguments` of a `tools/call`, for rules on argument values.
    /// Never log it: the audit log records keys and the hash only, and the
    /// `Debug` output of a message leaves it out.
    pub arguments: Option<Value>,
    /// The request speaks revision 2026-07-28 or later (by its
    /// `MCP-Protocol-Version` header or `params._meta`), so results written
    /// for it carry `resultType`.
    pub stateless_2026: bool,
    /// The protocol revision the message names: its `MCP-Protocol-Version` header, else
    /// `params._meta`'s version (2026-07-28), else an initialize request's
    /// `params.protocolVersion`.
    pub revision: Option<String>,
    /// `params.requestId` of a `notifications/cancelled`.
    pub cancels: Option<Value>,
    /// A `tools/call`'s `params.requestState` (2026-07-28 multi-round-trip retry).
    pub request_state: Option<Value>,
    /// A `tools/call`'s `params.inputResponses`.
    pub input_responses: Option<Value>,
    /// A request's `params._meta.progressToken`.
    pub progress_token: Option<Value>,
    /// A 2026-07-28 request whose client declared elicitation in `params._meta`.
    pub elicitation: bool,
}

impl Message {
    /// A message with no method or tool call details yet.
    fn bare(kind: Kind, id: Option<Value>, stateless_2026: bool) -> Message {
        Message {
            kind,
            id,
            method: None,
            tool: None,
            arg_keys: Vec::new(),
            args_sha256: None,
            arguments: None,
            stateless_2026,
            revision: None,
            cancels: None,
            request_state: None,
            input_responses: None,
            progress_token: None,
            elicitation: false,
        }
    }

    /// Whether this is a `tools/call` request (the only kind the policy
    /// decides; a `tools/call` notification never gets this far). A method
    /// spelt `Tools/Call` or ` tools/call ` counts too: a lenient server could
    /// run it, so it is decided like the plain form.
    pub fn is_tool_call(&self) -> bool {
        self.kind == Kind::Request
            && self
                .method
                .as_deref()
                .is_some_and(|m| is_method(m, TOOLS_CALL))
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arguments = self.arguments.as_ref().map(|_| "<redacted>");
        f.debug_struct("Message")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("method", &self.method)
            .field("tool", &self.tool)
            .field("arg_keys", &self.arg_keys)
            .field("args_sha256", &self.args_sha256)
            .field("arguments", &arguments)
            .field("stateless_2026", &self.stateless_2026)
            .field("revision", &self.revision)
            .field("cancels", &self.cancels)
            .finish()
    }
}

/// A POST body: one message, or a batch (revision 2025-03-26).
// One per request body, moved once: its size does not matter; boxing would cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Parsed {
    /// A single JSON-RPC object.
    Single(Message),
    /// A non-empty JSON array of messages, in order.
    Batch(Vec<Message>),
}

impl Parsed {
    /// The messages, in order; one for [`Parsed::Single`].
    pub fn messages(&self) -> &[Message] {
        match self {
            Parsed::Single(message) => std::slice::from_ref(message),
            Parsed::Batch(messages) => messages,
        }
    }
}

/// Reads a POST body as JSON-RPC, refusing anything a server might read
/// differently.
///
/// # Errors
///
/// Refusals are answered with HTTP 400 and a JSON-RPC error carrying the
/// offending message's id when it could be read:
/// - -32700 `Parse error: …`: not UTF-8, not JSON (with `serde_json`'s
///   detail), or nested deeper than 128 levels;
/// - -32600 `Invalid Request: …`: duplicate keys, or keys equal but for
///   letter case, in any object; a top level that is not an object or a
///   non-empty array of objects; `jsonrpc` other than `"2.0"`; an `id` that
///   is not a string or integer; a non-string `method`; a message with
///   neither `method` nor the shape of a response; and `tools/call must carry
///   an id; it was not forwarded` for a `tools/call` notification;
/// - -32602 `Invalid params: …`: a `tools/call` whose `params` is not an
///   object with a string `name`, or whose `arguments` is present but not an
///   object;
/// - -32020 `Header mismatch: …`: an `Mcp-Method` or `Mcp-Name` header that
///   is repeated, malformed, or disagrees with the body (servers of revision
///   2026-07-28 refuse these too, and a server or gateway routing on the
///   header must not see another call than the policy did). Routing headers
///   on a batch are refused, as no single value can mirror it.
///
/// In a batch, every element is checked and the first error refuses the
/// whole body; its message names the element's index.
pub fn parse_body(body: &[u8], headers: &http::HeaderMap) -> Result<Parsed, ParseError> {
    let (text, parsed) = parse_messages(body, headers)?;
    // Checked last, so that a message's own errors (an id too large) are named first.
    if let Some(at) = strict::first_inexact_number(text) {
        let id = match parsed.messages() {
            [one] => one.id.clone(),
            _ => None,
        };
        return Err(ParseError::new(
            INVALID_REQUEST,
            format!(
                "Invalid Request: the number at byte {at} of the body is not held exactly by a \
                 64-bit integer or float (too large, too precise, or out of range), so a server \
                 could read another value than the policy compared; it was not forwarded"
            ),
            id,
        ));
    }
    Ok(parsed)
}

/// [`parse_body`] but for its check of numbers; with the body as text.
fn parse_messages<'b>(
    body: &'b [u8],
    headers: &http::HeaderMap,
) -> Result<(&'b str, Parsed), ParseError> {
    let text = std::str::from_utf8(body).map_err(|err| {
        ParseError::new(
            PARSE_ERROR,
            format!("Parse error: the body is not valid UTF-8 ({err})"),
            None,
        )
    })?;
    let document = strict::parse(text)
        .map_err(|err| ParseError::new(PARSE_ERROR, format!("Parse error: {err}"), None))?;
    if let Some(clash) = &document.clash {
        return Err(clash_error(&document.value, clash));
    }
    let header_stateless = headers::header_is_stateless(headers);
    let header_revision = headers::protocol_version(headers);
    let with_revision = |mut m: Message| {
        if let Some(r) = &header_revision {
            m.revision = Some(r.clone());
        }
        m
    };
    match &document.value {
        Value::Object(object) => {
            let message = read_message(object, header_stateless, None)?;
            check_routing_headers(object, &message, headers)?;
            check_version_header(object, &message, header_revision.as_deref())?;
            Ok((text, Parsed::Single(with_revision(message))))
        }
        Value::Array(elements) if elements.is_empty() => Err(ParseError::new(
            INVALID_REQUEST,
            "Invalid Request: the batch is empty",
            None,
        )),
        Value::Array(elements) => {
            let mut messages = Vec::with_capacity(elements.len());
            for (index, element) in elements.iter().enumerate() {
                let Value::Object(object) = element else {
                    return Err(ParseError::new(
                        INVALID_REQUEST,
                        format!(
                            "Invalid Request: batch element {index} is {}, not a message object",
                            describe(element)
                        ),
                        None,
                    ));
                };
                messages.push(with_revision(read_message(
                    object,
                    header_stateless,
                    Some(index),
                )?));
            }
            refuse_routing_headers_on_batch(headers)?;
            Ok((text, Parsed::Batch(messages)))
        }
        other => Err(ParseError::new(
            INVALID_REQUEST,
            format!(
                "Invalid Request: the body is {}, not a JSON-RPC message object or batch array",
                describe(other)
            ),
            None,
        )),
    }
}

/// The elements `keep` (indices, ascending) of a batch that [`parse_body`] accepted, as a new
/// batch whose elements are the original bytes. `None` if the body is not such a batch.
pub fn batch_subset(body: &[u8], keep: &[usize]) -> Option<Vec<u8>> {
    let elements: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    out.push(b'[');
    for (n, &i) in keep.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(elements.get(i)?.get().as_bytes());
    }
    out.push(b']');
    Some(out)
}

/// The error for a document with clashing keys. The id is included unless
/// the clash is over the message's own `id`.
fn clash_error(root: &Value, clash: &strict::KeyClash) -> ParseError {
    let (message, message_depth) = match root {
        Value::Array(elements) => (
            clash
                .path
                .first()
                .and_then(|index| index.parse::<usize>().ok())
                .and_then(|index| elements.get(index)),
            1,
        ),
        other => (Some(other), 0),
    };
    let clash_is_on_id =
        clash.path.len() == message_depth && strict::fold_key(&clash.first) == "id";
    let id = if clash_is_on_id {
        None
    } else {
        message
            .and_then(|message| message.get("id"))
            .and_then(valid_id)
    };
    ParseError::new(
        INVALID_REQUEST,
        format!("Invalid Request: {}", clash.describe()),
        id,
    )
}

/// Reads and checks one message object. `batch_index` is the element's
/// position in a batch, for error messages.
fn read_message(
    object: &Map<String, Value>,
    header_stateless: bool,
    batch_index: Option<usize>,
) -> Result<Message, ParseError> {
    let at = match batch_index {
        Some(index) => format!("batch element {index}: "),
        None => String::new(),
    };

    let id = match object.get("id") {
        None => None,
        Some(raw) => match valid_id(raw) {
            Some(id) => Some(id),
            None => {
                return Err(ParseError::new(
                    INVALID_REQUEST,
                    format!(
                        "Invalid Request: {at}\"id\" must be a string or a 64-bit integer, not {}",
                        describe(raw)
                    ),
                    None,
                ))
            }
        },
    };
    let invalid_request = |detail: String| {
        ParseError::new(
            INVALID_REQUEST,
            format!("Invalid Request: {at}{detail}"),
            id.clone(),
        )
    };
    let params = object.get("params");
    let near_misses = [
        ("", Some(object), &MESSAGE_FIELDS[..]),
        ("params.", params.and_then(Value::as_object), PARAMS_FIELDS),
        (
            "params._meta.",
            params
                .and_then(|p| p.get("_meta"))
                .and_then(Value::as_object),
            PARAMS_FIELDS,
        ),
        (
            "error.",
            object.get("error").and_then(Value::as_object),
            &ERROR_FIELDS[..],
        ),
    ];
    for (prefix, members, fields) in near_misses {
        if let Some((key, field)) = members.and_then(|m| near_miss(m, fields)) {
            // The id is left out when it is the key in doubt.
            let id = if prefix.is_empty() && field == "id" {
                None
            } else {
                id.clone()
            };
            return Err(ParseError::new(
                INVALID_REQUEST,
                format!(
                    "Invalid Request: {at}key {} is not {prefix}{field} but a server that matches \
                     keys ignoring letter case reads it as that; it was not forwarded",
                    quoted(&format!("{prefix}{key}")),
                ),
                id,
            ));
        }
    }

    match object.get("jsonrpc") {
        Some(Value::String(version)) if version == "2.0" => {}
        _ => return Err(invalid_request("\"jsonrpc\" must be \"2.0\"".to_owned())),
    }

    let method = match object.get("method") {
        None => {
            if id.is_none() {
                return Err(invalid_request(
                    "a message without \"method\" must be a response with an \"id\"".to_owned(),
                ));
            }
            if object.contains_key("result") == object.contains_key("error") {
                return Err(invalid_request(
                    "a response must carry exactly one of \"result\" and \"error\"".to_owned(),
                ));
            }
            return Ok(Message::bare(Kind::Response, id, header_stateless));
        }
        Some(Value::String(method)) => method.clone(),
        Some(other) => {
            return Err(invalid_request(format!(
                "\"method\" must be a string, not {}",
                describe(other)
            )))
        }
    };

    let kind = if id.is_some() {
        Kind::Request
    } else {
        Kind::Notification
    };
    let mut message = Message::bare(kind, id, header_stateless || meta_is_stateless(params));

    if is_method(&method, TOOLS_CALL) {
        read_tool_call(params, &mut message, &at)?;
    }
    let param_str = |key: &str| {
        params
            .and_then(|p| p.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    message.revision = params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(META_PROTOCOL_VERSION))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            (method == "initialize")
                .then(|| param_str("protocolVersion"))
                .flatten()
        });
    if method == "notifications/cancelled" {
        message.cancels = params.and_then(|p| p.get("requestId")).cloned();
    }
    message.method = Some(method);
    Ok(message)
}

/// The members of a JSON-RPC message object.
const MESSAGE_FIELDS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

/// The members of a JSON-RPC error object.
const ERROR_FIELDS: [&str; 3] = ["code", "message", "data"];

/// Members of `params` (and of `params._meta`) that say what a request does, in any MCP
/// revision: a key that is one of these but for letter case is refused (see [`near_miss`]).
const PARAMS_FIELDS: &[&str] = &[
    "name",
    "arguments",
    "_meta",
    "uri",
    "requestId",
    "protocolVersion",
    "capabilities",
    "clientInfo",
    "cursor",
    "progressToken",
    "reason",
    "level",
    "ref",
    "argument",
    "task",
    "requestState",
    "inputResponses",
    META_PROTOCOL_VERSION,
    META_CLIENT_CAPABILITIES,
];

/// The first key of `members` that is not one of `fields` but equals one when case-folded
/// ([`strict::fold_key`]: `METHOD`, `ſession` and the Kelvin sign count), with that field.
///
/// Go's `encoding/json` binds such a key to the field, so a server reads `{"Method":…}` as a
/// request where the policy saw a response, or `{"NAME":…}` as the tool's name. Two keys that
/// clash are refused by the strict reader already; this refuses the key that appears alone.
pub(crate) fn near_miss<'k>(
    members: &'k Map<String, Value>,
    fields: &[&'static str],
) -> Option<(&'k str, &'static str)> {
    members.keys().find_map(|key| {
        if fields.contains(&key.as_str()) {
            return None;
        }
        let folded = strict::fold_key(key);
        fields
            .iter()
            .find(|field| folded.eq_ignore_ascii_case(field))
            .map(|field| (key.as_str(), *field))
    })
}

/// Checks a `tools/call` request and fills in its tool and arguments. `at`
/// prefixes error messages with the batch element, if any.
fn read_tool_call(
    params: Option<&Value>,
    message: &mut Message,
    at: &str,
) -> Result<(), ParseError> {
    if message.id.is_none() {
        return Err(ParseError::new(
            INVALID_REQUEST,
            format!("{at}tools/call must carry an id; it was not forwarded"),
            None,
        ));
    }
    let invalid_params = |detail: &str| {
        ParseError::new(
            INVALID_PARAMS,
            format!("Invalid params: {at}tools/call {detail}"),
            message.id.clone(),
        )
    };
    let Some(Value::Object(params)) = params else {
        return Err(invalid_params("params must be an object"));
    };
    let tool = match params.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(invalid_params("params.name must be a string")),
        None => return Err(invalid_params("params.name is missing")),
    };
    let arguments = match params.get("arguments") {
        None => None,
        Some(Value::Object(arguments)) => Some(arguments),
        Some(_) => return Err(invalid_params("params.arguments must be an object")),
    };
    if let Some(arguments) = arguments {
        let mut keys: Vec<String> = arguments.keys().cloned().collect();
        keys.sort_unstable();
        let arguments = Value::Object(arguments.clone());
        message.arg_keys = keys;
        message.args_sha256 = Some(canonical_sha256(&arguments));
        message.arguments = Some(arguments);
    }
    message.tool = Some(tool);
    message.request_state = params.get("requestState").cloned();
    message.input_responses = params.get("inputResponses").cloned();
    if let Some(Value::Object(meta)) = params.get("_meta") {
        message.progress_token = meta.get("progressToken").cloned();
        message.elicitation = meta
            .get(META_CLIENT_CAPABILITIES)
            .and_then(|c| c.get("elicitation"))
            .is_some_and(|e| !e.is_null());
    }
    Ok(())
}

/// Where a 2026-07-28 request's `params._meta` declares the client's capabilities.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

/// A copy of `raw` if it is a valid JSON-RPC id for MCP: a string or an
/// integer that fits in 64 bits.
fn valid_id(raw: &Value) -> Option<Value> {
    match raw {
        Value::String(_) => Some(raw.clone()),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(raw.clone()),
        _ => None,
    }
}

/// Whether `params._meta` names a stateless protocol revision.
fn meta_is_stateless(params: Option<&Value>) -> bool {
    params
        .and_then(|params| params.get("_meta"))
        .and_then(|meta| meta.get(META_PROTOCOL_VERSION))
        .and_then(Value::as_str)
        .is_some_and(is_stateless_revision)
}

/// Checks `Mcp-Method` and `Mcp-Name` against a single message, when present.
fn check_routing_headers(
    object: &Map<String, Value>,
    message: &Message,
    headers: &http::HeaderMap,
) -> Result<(), ParseError> {
    let mismatch = |detail: String| {
        ParseError::new(
            HEADER_MISMATCH,
            format!("Header mismatch: {detail}"),
            message.id.clone(),
        )
    };

    if let Some(header) = headers::routing_header(headers, METHOD_HEADER).map_err(&mismatch)? {
        match &message.method {
            Some(method) if *method == header => {}
            Some(_) => {
                return Err(mismatch(
                    "Mcp-Method differs from the body's method".to_owned(),
                ))
            }
            None => {
                return Err(mismatch(
                    "Mcp-Method is set on a message without a method".to_owned(),
                ))
            }
        }
    }

    if let Some(header) = headers::routing_header(headers, NAME_HEADER).map_err(&mismatch)? {
        let field = match message.method.as_deref() {
            Some(TOOLS_CALL | "prompts/get") => Some("name"),
            Some("resources/read") => Some("uri"),
            _ => None,
        };
        if let Some(field) = field {
            let body = object
                .get("params")
                .and_then(|params| params.get(field))
                .and_then(Value::as_str);
            // Values are not quoted: a name can be a resource URI holding a token.
            match body {
                Some(body) if body == header => {}
                Some(_) => return Err(mismatch(format!("Mcp-Name differs from params.{field}"))),
                None => {
                    return Err(mismatch(format!(
                        "Mcp-Name is set but params.{field} is missing"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// In 2026-07-28 the version travels twice, in `MCP-Protocol-Version` and in `params._meta`;
/// servers refuse a request where they differ (-32020), and so does mcpwarden, so that no
/// server reads one revision where the policy read another.
fn check_version_header(
    object: &Map<String, Value>,
    message: &Message,
    header: Option<&str>,
) -> Result<(), ParseError> {
    let meta = object
        .get("params")
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(META_PROTOCOL_VERSION))
        .and_then(Value::as_str);
    match (header, meta) {
        (Some(h), Some(m)) if h != m => Err(ParseError::new(
            HEADER_MISMATCH,
            format!(
                "Header mismatch: MCP-Protocol-Version is {} but params._meta names {}",
                quoted(h),
                quoted(m)
            ),
            message.id.clone(),
        )),
        _ => Ok(()),
    }
}

/// Checks a `tools/call`'s `Mcp-Param-*` headers against its arguments, given the tool's
/// designations (see [`designations`]): -32020 on any disagreement.
///
/// # Errors
///
/// A header that differs from its argument, is missing for a present argument, is present for
/// an absent one, or names no designated parameter.
pub fn check_param_headers(
    designations: &[Designation],
    message: &Message,
    headers: &http::HeaderMap,
) -> Result<(), ParseError> {
    params::check(designations, message.arguments.as_ref(), headers).map_err(|detail| {
        ParseError::new(
            HEADER_MISMATCH,
            format!("Header mismatch: {detail}"),
            message.id.clone(),
        )
    })
}

/// Refuses `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*` on a batch.
fn refuse_routing_headers_on_batch(headers: &http::HeaderMap) -> Result<(), ParseError> {
    if params::has_param_headers(headers) {
        return Err(ParseError::new(
            HEADER_MISMATCH,
            "Header mismatch: Mcp-Param-* headers are set on a batch",
            None,
        ));
    }
    for name in [METHOD_HEADER, NAME_HEADER] {
        if headers.contains_key(name) {
            return Err(ParseError::new(
                HEADER_MISMATCH,
                format!("Header mismatch: {name} is set on a batch"),
                None,
            ));
        }
    }
    Ok(())
}

/// A JSON string literal, for quoting untrusted text in error messages.
fn quoted(text: &str) -> String {
    let mut out = String::new();
    mcpwarden_json::write_string(text, &mut out);
    out
}

/// The JSON type of a value, for error messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
