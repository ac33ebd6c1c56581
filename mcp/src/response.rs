//! JSON-RPC bodies written by mcpwarden itself: refusals of tool calls and
//! errors for messages that were not forwarded.
//!
//! Every body is built by hand in a fixed field order, so the bytes do not
//! depend on how `serde_json` is configured in the build.

use std::fmt;

use serde_json::Value;

use mcpwarden_json::{write_string, write_value};

/// JSON-RPC "Parse error": the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC "Invalid Request": JSON, but not a valid message.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC "Invalid params"; also what servers answer for an unknown tool.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC "Internal error": mcpwarden could not pass on what the server sent.
pub const INTERNAL_ERROR: i64 = -32603;
/// MCP 2026-07-28 "header mismatch": the routing headers disagree with the
/// body.
pub const HEADER_MISMATCH: i64 = -32020;

/// Why a POST body was not forwarded, and how to answer it.
#[derive(Debug, Clone)]
pub struct ParseError {
    /// HTTP status of the answer.
    pub status: http::StatusCode,
    /// JSON-RPC error code.
    pub code: i64,
    /// JSON-RPC error message, for the client and the audit log.
    pub message: String,
    /// The id of the offending message, when one could be read.
    pub id: Option<Value>,
}

impl ParseError {
    pub(crate) fn new(code: i64, message: impl Into<String>, id: Option<Value>) -> Self {
        Self {
            status: http::StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            id,
        }
    }

    /// The JSON-RPC error response: `{"jsonrpc":"2.0","id":…,"error":{"code":…,"message":…}}`
    /// with the message's id, or `null` when none could be read.
    pub fn response_body(&self) -> Vec<u8> {
        error_response(self.id.as_ref(), self.code, &self.message)
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HTTP {}, JSON-RPC error {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ParseError {}

/// Answer to a call of a hidden tool, as if the tool did not exist:
/// error -32602 `Unknown tool: <name>`.
pub fn unknown_tool_response(id: &Value, tool: &str) -> Vec<u8> {
    error_response(Some(id), INVALID_PARAMS, &format!("Unknown tool: {tool}"))
}

/// Answer to a denied call: a tool result with `isError` set, which clients
/// hand to the model, carrying the reason and an instruction not to retry.
///
/// `{"jsonrpc":"2.0","id":…,"result":{"content":[{"type":"text","text":"Denied by mcpwarden policy: <reason>. Do not retry this call."}],"isError":true}}`,
/// with `"resultType":"complete"` after `isError` when the request speaks
/// revision 2026-07-28 or later. Trailing whitespace and full stops of the
/// reason are dropped so the sentence ends once; an empty reason is left out.
pub fn denied_response(id: &Value, reason: &str, stateless_2026: bool) -> Vec<u8> {
    let reason = reason.trim_end().trim_end_matches('.').trim_end();
    let text = if reason.is_empty() {
        "Denied by mcpwarden policy. Do not retry this call.".to_owned()
    } else {
        format!("Denied by mcpwarden policy: {reason}. Do not retry this call.")
    };
    let mut out = String::from(r#"{"jsonrpc":"2.0","id":"#);
    write_value(id, &mut out);
    out.push_str(r#","result":{"content":[{"type":"text","text":"#);
    write_string(&text, &mut out);
    out.push_str(r#"}],"isError":true"#);
    if stateless_2026 {
        out.push_str(r#","resultType":"complete""#);
    }
    out.push_str("}}");
    out.into_bytes()
}

/// A JSON-RPC error response:
/// `{"jsonrpc":"2.0","id":…,"error":{"code":…,"message":…}}`, with `null`
/// for a missing id.
pub fn error_response(id: Option<&Value>, code: i64, message: &str) -> Vec<u8> {
    let mut out = String::from(r#"{"jsonrpc":"2.0","id":"#);
    match id {
        Some(id) => write_value(id, &mut out),
        None => out.push_str("null"),
    }
    out.push_str(r#","error":{"code":"#);
    out.push_str(&code.to_string());
    out.push_str(r#","message":"#);
    write_string(message, &mut out);
    out.push_str("}}");
    out.into_bytes()
}

/// A 2026-07-28 multi-round-trip result asking the client for input:
/// `{"jsonrpc":"2.0","id":…,"result":{"resultType":"input_required","inputRequests":…,"requestState":…}}`.
pub fn input_required_response(id: &Value, input_requests: &Value, request_state: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "resultType": "input_required",
            "inputRequests": input_requests,
            "requestState": request_state,
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `notifications/progress` for a request that sent a `progressToken`.
pub fn progress_notification(token: &Value, progress: u64, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": token, "progress": progress, "message": message}
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A single `tools/call` body with its `params.requestState` and `params.inputResponses`
/// replaced (`None` removes them): the approved retry of a call that waited for its client's
/// user, forwarded as the original call. The rest of the message is the value that was
/// parsed and decided. `None`: not a single message with object params.
pub fn with_round_trip(
    body: &[u8],
    request_state: Option<&Value>,
    input_responses: Option<&Value>,
) -> Option<Vec<u8>> {
    let mut msg: Value = serde_json::from_slice(body).ok()?;
    let params = msg.get_mut("params")?.as_object_mut()?;
    for (key, value) in [
        ("requestState", request_state),
        ("inputResponses", input_responses),
    ] {
        match value {
            Some(v) => {
                params.insert(key.to_owned(), v.clone());
            }
            None => {
                params.remove(key);
            }
        }
    }
    serde_json::to_vec(&msg).ok()
}
