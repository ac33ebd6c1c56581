//! A cheap test of whether a POST body that did not go to the MCP endpoint is
//! JSON-RPC all the same (a server mounted at an unexpected path, a path
//! spelt in a way the normaliser does not know).
//!
//! A wrong "no" lets a tool call through unchecked, a wrong "yes" only sends
//! a body through the strict parser, so every doubt is resolved towards
//! "yes".

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use mcpwarden_json::fold_key;

/// Whether a POST body looks like a JSON-RPC message or batch.
///
/// After optional JSON whitespace the body must open an object or an array.
/// It is then read as JSON, and the answer is `true` when the object, or any
/// object element of the array, has a top-level key `jsonrpc` or `method`.
/// Keys are compared as a case-insensitive server would (`METHOD` counts).
///
/// Doubtful bodies count as JSON-RPC:
/// - every element of a batch is looked at, not only the first, since a
///   server answers each element on its own, and so are the elements of arrays
///   nested in a batch (`[[{"method":…}]]`), which a lenient server might
///   flatten;
/// - an object or array that cannot be read to its end before one of those
///   keys was found (`NaN`, nesting beyond the parser's limit, bad UTF-8 in a
///   string) counts, because a more lenient server parser might accept it and
///   the strict parser will refuse it anyway;
/// - the body is first decoded as Python's `json.loads` decodes bytes: a
///   UTF-8 byte-order mark is skipped, and UTF-16 and UTF-32 (told by a BOM
///   or by the pattern of zero bytes at the start) are transcoded.
///
/// A complete JSON value followed by more text (such as newline-delimited
/// JSON whose first object has neither key) does not count: no server reads
/// it as a single message.
pub fn looks_like_jsonrpc(body: &[u8]) -> bool {
    let Some(text) = decode_like_python(body) else {
        return false;
    };
    let first = text
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if !matches!(first, Some(b'{' | b'[')) {
        return false;
    }

    let found = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(&text);
    let read = Probe { found: &found }.deserialize(&mut deserializer);
    // A found key stops the reader with an error; any other error means the
    // value could not be read to its end.
    found.get() || read.is_err()
}

/// The body as UTF-8 bytes, decoded as Python's `json.detect_encoding`
/// would choose; `None` when a UTF-16 or UTF-32 body is truncated.
fn decode_like_python(body: &[u8]) -> Option<Cow<'_, [u8]>> {
    if let Some(rest) = body.strip_prefix(&[0x00, 0x00, 0xfe, 0xff]) {
        return utf32(rest, false);
    }
    if let Some(rest) = body.strip_prefix(&[0xff, 0xfe, 0x00, 0x00]) {
        return utf32(rest, true);
    }
    if let Some(rest) = body.strip_prefix(&[0xfe, 0xff]) {
        return utf16(rest, false);
    }
    if let Some(rest) = body.strip_prefix(&[0xff, 0xfe]) {
        return utf16(rest, true);
    }
    if let Some(rest) = body.strip_prefix(&[0xef, 0xbb, 0xbf]) {
        return Some(Cow::Borrowed(rest));
    }
    if body.len() >= 4 {
        if body[0] == 0 {
            return if body[1] != 0 {
                utf16(body, false)
            } else {
                utf32(body, false)
            };
        }
        if body[1] == 0 {
            return if body[2] != 0 || body[3] != 0 {
                utf16(body, true)
            } else {
                utf32(body, true)
            };
        }
    }
    Some(Cow::Borrowed(body))
}

/// Transcodes UTF-16 to UTF-8; lone surrogates become U+FFFD (Python keeps
/// them, but they cannot spell a key we look for).
fn utf16(bytes: &[u8], little_endian: bool) -> Option<Cow<'static, [u8]>> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let units = bytes.chunks_exact(2).map(|pair| {
        let pair = [pair[0], pair[1]];
        if little_endian {
            u16::from_le_bytes(pair)
        } else {
            u16::from_be_bytes(pair)
        }
    });
    let text: String = char::decode_utf16(units)
        .map(|unit| unit.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    Some(Cow::Owned(text.into_bytes()))
}

/// Transcodes UTF-32 to UTF-8; invalid scalar values become U+FFFD.
fn utf32(bytes: &[u8], little_endian: bool) -> Option<Cow<'static, [u8]>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let text: String = bytes
        .chunks_exact(4)
        .map(|quad| {
            let quad = [quad[0], quad[1], quad[2], quad[3]];
            let scalar = if little_endian {
                u32::from_le_bytes(quad)
            } else {
                u32::from_be_bytes(quad)
            };
            char::from_u32(scalar).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect();
    Some(Cow::Owned(text.into_bytes()))
}

/// Reads a value looking for the JSON-RPC keys in objects at the top level, or inside a
/// top-level array (a batch) and arrays nested in it; values inside objects are skipped.
#[derive(Clone, Copy)]
struct Probe<'f> {
    found: &'f Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The elements of a batch are probed as messages, and so are the elements of an array
        // inside a batch (`[[{...}]]`): no spec server reads that as a message, but a lenient
        // one might flatten it, and in doubt it is JSON-RPC (the strict parser refuses it).
        // Arrays inside messages are not looked into.
        let element = Probe { found: self.found };
        while seq.next_element_seed(element)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(key) = access.next_key::<String>()? {
            let folded = fold_key(&key);
            if folded == "jsonrpc" || folded == "method" {
                self.found.set(true);
                // Stop reading: the answer is known.
                return Err(serde::de::Error::custom("found a JSON-RPC key"));
            }
            access.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}
