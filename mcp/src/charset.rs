//! Only UTF-8 bodies are read, and only as UTF-8.
//!
//! Servers decode a body in whatever encoding they are told or guess: Node's `raw-body` in the
//! `charset` the Content-Type names (UTF-7 and Latin-1 included), Python's `json.loads(bytes)`
//! in UTF-16 or UTF-32 when the first bytes say so. The same bytes then hold another message
//! than the one mcpwarden read, so any body that is not plainly UTF-8 is refused, whatever its
//! path and whether or not it looks like JSON-RPC.

use http::{header, HeaderMap, StatusCode};

use crate::response::{ParseError, PARSE_ERROR};

/// Refuses a request body that a server could decode as something other than UTF-8:
/// - 415 when there is more than one Content-Type header, or a `charset` parameter (any case,
///   quoted or not) other than `utf-8`;
/// - 415 when the body starts with a UTF-16 or UTF-32 byte-order mark, or has a zero byte among
///   its first four bytes (how Python tells UTF-16 and UTF-32 without a mark);
/// - 400 when the body is not valid UTF-8.
///
/// An empty body passes.
///
/// # Errors
///
/// The refusal, with JSON-RPC error -32700 (its message names no body content).
pub fn check_encoding(headers: &HeaderMap, body: &[u8]) -> Result<(), ParseError> {
    if body.is_empty() {
        return Ok(());
    }
    let unsupported = |detail: String| {
        let mut err = ParseError::new(
            PARSE_ERROR,
            format!(
                "Parse error: {detail}; only UTF-8 bodies are inspected, so it was not forwarded"
            ),
            None,
        );
        err.status = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        err
    };
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    if let Some(content_type) = types.next() {
        if types.next().is_some() {
            return Err(unsupported(
                "the request has more than one Content-Type header".to_owned(),
            ));
        }
        if let Some(charset) = foreign_charset(content_type.as_bytes()) {
            return Err(unsupported(format!(
                "the Content-Type names charset {charset}"
            )));
        }
    }
    let utf16_or_32 = [&[0xfe, 0xff][..], &[0xff, 0xfe]]
        .iter()
        .any(|bom| body.starts_with(bom))
        || body.iter().take(4).any(|&b| b == 0);
    if utf16_or_32 {
        return Err(unsupported(
            "the body is UTF-16 or UTF-32 (by its byte-order mark or its zero bytes)".to_owned(),
        ));
    }
    if let Err(err) = std::str::from_utf8(body) {
        return Err(ParseError::new(
            PARSE_ERROR,
            format!("Parse error: the body is not valid UTF-8 ({err}); it was not forwarded"),
            None,
        ));
    }
    Ok(())
}

/// The first `charset` parameter of a Content-Type value that is not `utf-8`, for the error
/// (quoted, at most 40 characters); a value that is not text counts as foreign.
fn foreign_charset(value: &[u8]) -> Option<String> {
    let Ok(value) = std::str::from_utf8(value) else {
        return Some("(not text)".to_owned());
    };
    value.split(';').skip(1).find_map(|param| {
        let (name, charset) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("charset") {
            return None;
        }
        let charset = charset.trim();
        let bare = charset
            .strip_prefix('"')
            .and_then(|c| c.strip_suffix('"'))
            .unwrap_or(charset)
            .trim();
        if bare.eq_ignore_ascii_case("utf-8") {
            return None;
        }
        let shown: String = charset.chars().take(40).collect();
        Some(format!("{shown:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(content_type: &[&str], body: &[u8]) -> Result<(), u16> {
        let mut headers = HeaderMap::new();
        for t in content_type {
            headers.append(header::CONTENT_TYPE, t.parse().expect("header"));
        }
        check_encoding(&headers, body).map_err(|e| e.status.as_u16())
    }

    #[test]
    fn utf8_passes_in_any_spelling_of_its_name() {
        let body = br#"{"jsonrpc":"2.0"}"#;
        for t in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
            "application/json; Charset = Utf-8 ",
        ] {
            assert_eq!(check(&[t], body), Ok(()), "{t}");
        }
        assert_eq!(check(&[], body), Ok(()));
        assert_eq!(
            check(&["application/json; charset=utf-7"], b""),
            Ok(()),
            "no body"
        );
    }

    #[test]
    fn other_charsets_and_encodings_are_refused() {
        let body = br#"{"jsonrpc":"2.0"}"#;
        for t in [
            "application/json; charset=utf-7",
            "application/json; charset=\"UTF-16LE\"",
            "application/json; charset=latin1",
            "application/json; charset=utf8",
            "application/json; charset=utf-8; charset=utf-7",
            "application/json; charset=",
        ] {
            assert_eq!(check(&[t], body), Err(415), "{t}");
        }
        assert_eq!(check(&["application/json", "text/plain"], body), Err(415));
        assert_eq!(check(&[], b"\xff\xfe{\x00\"\x00"), Err(415), "UTF-16LE BOM");
        assert_eq!(check(&[], b"\xfe\xff\x00{"), Err(415), "UTF-16BE BOM");
        assert_eq!(check(&[], b"{\x00\"\x00"), Err(415), "UTF-16LE, no BOM");
        assert_eq!(check(&[], b"\x00\x00\x00{"), Err(415), "UTF-32BE, no BOM");
        assert_eq!(check(&[], b"{\"a\":\"\xff\"}"), Err(400), "invalid UTF-8");
    }
}
