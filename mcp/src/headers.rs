//! The MCP request headers this module reads: the protocol version, and the
//! routing headers of revision 2026-07-28 that mirror fields of the body.
//!
//! Header names are matched case-insensitively (`http::HeaderMap` stores
//! them in lower case).

use http::HeaderMap;

/// `MCP-Protocol-Version`.
pub const PROTOCOL_VERSION_HEADER: &str = "mcp-protocol-version";
/// `Mcp-Method`: mirrors the JSON-RPC `method`.
pub const METHOD_HEADER: &str = "mcp-method";
/// `Mcp-Name`: mirrors `params.name` of `tools/call` and `prompts/get`, and
/// `params.uri` of `resources/read`.
pub const NAME_HEADER: &str = "mcp-name";
/// The first revision of the stateless protocol, whose results carry
/// `resultType`.
pub const STATELESS_REVISION: &str = "2026-07-28";
/// The `params._meta` key that carries the protocol version in 2026-07-28.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// Whether a protocol revision is 2026-07-28 or later. Revisions are ISO
/// dates and compare as strings.
pub fn is_stateless_revision(revision: &str) -> bool {
    revision >= STATELESS_REVISION
}

/// Whether any `MCP-Protocol-Version` header names a stateless revision.
pub(crate) fn header_is_stateless(headers: &HeaderMap) -> bool {
    headers
        .get_all(PROTOCOL_VERSION_HEADER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| is_stateless_revision(value.trim()))
}

/// The `MCP-Protocol-Version` header, when there is exactly one and it is text.
pub(crate) fn protocol_version(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(PROTOCOL_VERSION_HEADER).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok().map(|v| v.trim().to_owned())
}

/// The decoded value of a routing header: `Ok(None)` when absent, `Err` with
/// a reason when it is repeated, not ASCII, or a malformed Base64 sentinel.
pub(crate) fn routing_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("more than one {name} header"));
    }
    let text = value
        .to_str()
        .map_err(|_| format!("the {name} header is not visible ASCII"))?;
    decode_header_value(text)
        .map(Some)
        .ok_or_else(|| format!("the {name} header is not valid `=?base64?…?=` text"))
}

/// Decodes a header value that may use the `=?base64?{value}?=` form for
/// text that cannot travel in a header as it is. The markers are
/// case-sensitive, the payload is standard, padded Base64 of UTF-8.
pub(crate) fn decode_header_value(value: &str) -> Option<String> {
    match value
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    {
        Some(payload) => String::from_utf8(decode_base64(payload)?).ok(),
        None => Some(value.to_owned()),
    }
}

/// Strict standard Base64: padded to a multiple of four, `=` only at the end,
/// unused bits zero. `None` for anything else.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let padding = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if padding > 2 {
        return None;
    }
    let data = &bytes[..bytes.len() - padding];
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in data {
        // At most 12 bits are pending, so 14 bits of buffer suffice.
        buffer = ((buffer << 6) | u32::from(sextet(byte)?)) & 0x3fff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
        }
    }
    // Leftover bits (2 or 4) must be zero for the encoding to be canonical.
    if buffer & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

fn sextet(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}
