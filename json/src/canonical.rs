//! Canonical JSON text, used to hash tool arguments and to write refusal
//! bodies byte for byte the same whatever features `serde_json` is built with.
//!
//! The form: no whitespace, object keys sorted by Unicode code point (the
//! byte order of their UTF-8), numbers as `serde_json` prints them, strings
//! escaped as `serde_json` escapes them (`"`, `\`, and control characters;
//! everything else literal UTF-8). It is written out here rather than
//! delegated to `serde_json::to_string`, because the order of a
//! `serde_json::Map` depends on the `preserve_order` feature, which any crate
//! in the build can switch on.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The canonical JSON text of a value (see the module documentation).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

/// Lowercase hex SHA-256 of the canonical JSON text of a value.
pub fn canonical_sha256(value: &Value) -> String {
    sha256_hex(canonical_json(value).as_bytes())
}

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(digest.len() * 2);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends the canonical text of `value` to `out`.
///
/// Recursion depth is that of the value; values parsed by this module are at
/// most 128 levels deep (`serde_json`'s limit) when read as JSON text.
pub fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => out.push_str(&number.to_string()),
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(map, out),
    }
}

fn write_object(map: &Map<String, Value>, out: &mut String) {
    write_entries(map.iter().collect(), out);
}

/// Writes object entries sorted by key, whatever order they come in.
fn write_entries(mut entries: Vec<(&String, &Value)>, out: &mut String) {
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (index, (key, item)) in entries.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        write_string(key, out);
        out.push(':');
        write_value(item, out);
    }
    out.push('}');
}

/// Appends `text` as a JSON string literal, escaped as `serde_json` does.
pub fn write_string(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let code = u32::from(c);
                out.push_str("\\u00");
                out.push(char::from(HEX[(code >> 4) as usize]));
                out.push(char::from(HEX[(code & 0x0f) as usize]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serde_json::Map` is sorted already unless `preserve_order` is on, so
    /// the sort is checked on entries given in the wrong order.
    #[test]
    fn entries_are_sorted_by_code_point_whatever_the_map_order() {
        let (z, a, upper, accented) = (
            "z".to_owned(),
            "a".to_owned(),
            "B".to_owned(),
            "\u{e9}".to_owned(),
        );
        let one = Value::from(1);
        let mut out = String::new();
        write_entries(
            vec![(&accented, &one), (&z, &one), (&a, &one), (&upper, &one)],
            &mut out,
        );
        assert_eq!(out, "{\"B\":1,\"a\":1,\"z\":1,\"\u{e9}\":1}");
    }
}
