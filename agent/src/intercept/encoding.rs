//! Compressed request bodies (`Content-Encoding`): decoded so the parser reads what the server
//! would, and forwarded decoded (without the header), so the server reads exactly the bytes
//! that were inspected: two decoders can never disagree about what was said.
//!
//! gzip (and `x-gzip`, every member), deflate (zlib, as HTTP defines it), br and zstd (one
//! frame) are read with the flate2, brotli-decompressor and ruzstd crates; several codings are
//! undone last first. The decoded body is bounded like any body, so a small compressed body
//! cannot expand without limit. Anything else is refused, never forwarded as it is.

use std::io::Read;

use http::{header, HeaderMap};

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A coding this agent cannot read (415).
    #[error("Content-Encoding {0:?} cannot be inspected; send the body uncompressed or as gzip, deflate, br or zstd")]
    Unsupported(String),
    /// The body is not valid in its coding (400).
    #[error("the compressed body could not be decoded: {0}")]
    Corrupt(String),
    /// Decoded, it exceeds the bound (413).
    #[error("the decoded request body exceeds the {0} byte limit; it was not forwarded")]
    TooLarge(usize),
}

impl DecodeError {
    /// The HTTP status a request refused for this gets.
    pub fn status(&self) -> http::StatusCode {
        match self {
            DecodeError::Unsupported(_) => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            DecodeError::Corrupt(_) => http::StatusCode::BAD_REQUEST,
            DecodeError::TooLarge(_) => http::StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

/// The codings of a request, in the order they were applied; empty for none or `identity`.
pub fn codings(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "identity")
        .collect()
}

/// Undo `codings` (applied in that order), producing at most `max` bytes.
pub fn decode(body: &[u8], codings: &[String], max: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = body.to_vec();
    for coding in codings.iter().rev() {
        data = decode_one(&data, coding, max)?;
    }
    Ok(data)
}

fn decode_one(data: &[u8], coding: &str, max: usize) -> Result<Vec<u8>, DecodeError> {
    let corrupt = |e: std::io::Error| DecodeError::Corrupt(format!("{coding}: {e}"));
    match coding {
        "gzip" | "x-gzip" => bounded(flate2::read::MultiGzDecoder::new(data), max).map_err(corrupt),
        "deflate" => bounded(flate2::read::ZlibDecoder::new(data), max).map_err(corrupt),
        "br" => bounded(brotli_decompressor::Decompressor::new(data, 4096), max).map_err(corrupt),
        "zstd" => {
            let mut source = data;
            let decoder = ruzstd::decoding::StreamingDecoder::new(&mut source)
                .map_err(|e| DecodeError::Corrupt(format!("zstd: {e}")))?;
            let out = bounded(decoder, max).map_err(corrupt)?;
            if !source.is_empty() {
                // More frames (or trailing bytes): refused rather than read one way or another.
                return Err(DecodeError::Corrupt(
                    "zstd: more than one frame in the body".into(),
                ));
            }
            Ok(out)
        }
        other => Err(DecodeError::Unsupported(other.to_owned())),
    }
    .and_then(|out| match out {
        Some(out) => Ok(out),
        None => Err(DecodeError::TooLarge(max)),
    })
}

/// Read everything, or `None` when there is more than `max`.
fn bounded(reader: impl Read, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut out)?;
    Ok((out.len() <= max).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const BODY: &[u8] =
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"secret_dump"}}"#;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn each_coding_and_a_stack_of_them() {
        let gz = gzip(BODY);
        assert_eq!(decode(&gz, &["gzip".into()], 1 << 20).unwrap(), BODY);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&gz).unwrap();
        let stacked = z.finish().unwrap();
        assert_eq!(
            decode(&stacked, &["gzip".into(), "deflate".into()], 1 << 20).unwrap(),
            BODY
        );
        // A second gzip member is read too, as servers read it.
        let mut two = gzip(&BODY[..10]);
        two.extend(gzip(&BODY[10..]));
        assert_eq!(decode(&two, &["gzip".into()], 1 << 20).unwrap(), BODY);
    }

    #[test]
    fn brotli_and_zstd() {
        // BODY as compressed by Google's brotli (Python bindings 1.2), quality 11.
        let br = hex("1b4d00808dd315f3a284750fa16d94fab2bcb118bc62104430993a2c7db00107eee37ab4e0203c720cbfc714fefef4dc33d1739515b4440802544864d0f271a0fd8c78fb78");
        assert_eq!(decode(&br, &["br".into()], 1 << 20).unwrap(), BODY);
        let zst =
            ruzstd::encoding::compress_to_vec(BODY, ruzstd::encoding::CompressionLevel::Fastest);
        assert_eq!(decode(&zst, &["zstd".into()], 1 << 20).unwrap(), BODY);
        let mut two = zst.clone();
        two.extend_from_slice(&zst);
        assert!(matches!(
            decode(&two, &["zstd".into()], 1 << 20),
            Err(DecodeError::Corrupt(_))
        ));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_bomb_is_stopped_at_the_bound() {
        let big = gzip(&vec![b' '; 10 << 20]);
        assert!(big.len() < 64 * 1024);
        assert_eq!(
            decode(&big, &["gzip".into()], 1 << 20),
            Err(DecodeError::TooLarge(1 << 20))
        );
    }

    #[test]
    fn unknown_and_corrupt_codings_are_refused() {
        assert!(matches!(
            decode(BODY, &["compress".into()], 1 << 20),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode(BODY, &["gzip".into()], 1 << 20),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(BODY, &["zstd".into()], 1 << 20),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[test]
    fn header_lists_are_read_in_order() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_ENCODING, "gzip, identity".parse().unwrap());
        h.append(header::CONTENT_ENCODING, "BR".parse().unwrap());
        assert_eq!(codings(&h), vec!["gzip".to_owned(), "br".to_owned()]);
    }
}
