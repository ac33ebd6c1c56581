//! Numbers that two parsers could read as different values.
//!
//! The policy compares numbers as `serde_json` holds them: 64-bit integers exactly, anything
//! else as the nearest `f64`. A server may hold them otherwise (a decimal type, a big integer,
//! a parser with other rounding), so a literal is only safe when every reasonable reader gets
//! the value the policy compared: an integer that fits 64 bits, or a float literal that is the
//! shortest form of its `f64` (trailing zeros aside). `1e400`, `100.0000000000000001` and
//! `18446744073709551616` are not.
//!
//! Written by hand because no JSON library reports the literal text of every number without
//! switching `serde_json` to arbitrary precision for the whole process.

/// The byte offset of the first number literal in `text` (a JSON document that parsed) whose
/// value is not held exactly by `serde_json`; `None` when every number is exact.
pub fn first_inexact_number(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                if !exact(&text[start..i]) {
                    return Some(start);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Whether a JSON number literal is held exactly (see the module documentation).
fn exact(literal: &str) -> bool {
    if !literal.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok();
    }
    match literal.parse::<f64>() {
        Ok(v) if v.is_finite() => decimal(literal) == decimal(&format!("{v:e}")),
        Ok(_) => false,
        // Not a number the parser accepted; the parser has refused it already.
        Err(_) => true,
    }
}

/// A decimal literal as (negative, significant digits, exponent of the last digit), so that
/// `1.50`, `15e-1` and `0.15e1` are equal; zero is `(false, "", 0)` whatever its sign.
/// `None` for an exponent beyond `i64`.
fn decimal(literal: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() {
        return Some((false, String::new(), 0));
    }
    let fraction_len = i64::try_from(fraction.len()).ok()?;
    let trailing = i64::try_from(digits.len() - trimmed.len()).ok()?;
    let exponent = exponent.checked_sub(fraction_len)?.checked_add(trailing)?;
    Some((negative, trimmed.to_owned(), exponent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_numbers_pass() {
        for text in [
            "0",
            "-0",
            "12",
            "-9223372036854775808",
            "18446744073709551615",
            "0.1",
            "1.5e3",
            "1500.0",
            "0.30000000000000004",
            "-2.5E-3",
            "1e308",
            "5e-324",
            "0.0",
            "-0.0",
        ] {
            assert!(exact(text), "{text}");
        }
        assert_eq!(
            first_inexact_number(
                r#"{"a":[1,2.5,{"b":-3e2}],"s":"1e400 \" 9.99999999999999999999"}"#
            ),
            None,
            "numbers in strings are text"
        );
    }

    #[test]
    fn numbers_a_server_could_read_otherwise_are_found() {
        for text in [
            "1e400",
            "-1e400",
            "100.0000000000000001",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e-400",
            "0.1000000000000000055511151231257827",
            "9007199254740993.0",
            "1e99999999999999999999",
        ] {
            assert!(!exact(text), "{text}");
        }
        let doc = r#"{"amount": 100.0000000000000001}"#;
        assert_eq!(first_inexact_number(doc), Some(11));
        let doc = r#"{"s":"\\", "n":[1e400]}"#;
        assert_eq!(
            first_inexact_number(doc),
            Some(16),
            "an escaped backslash ends no string"
        );
    }
}
