//! Request-target normalisation, so that the configured MCP endpoint is
//! recognised however a client spells it.
//!
//! The comparison errs towards "this is the endpoint": a path that a server
//! might route to the endpoint must never look like some other path to us.

/// Normalises a request target for comparison with an endpoint path.
///
/// In order:
/// 1. an absolute-form target (`http://host:port/path`) loses its scheme and
///    authority, because servers route it by its path;
/// 2. the query string and fragment are dropped;
/// 3. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
///    decoded; other escapes are kept, with their hex digits in upper case;
/// 4. repeated `/` are collapsed and `.` and `..` segments resolved (`..`
///    never climbs above the root);
/// 5. a trailing `/` is dropped, except for the root itself;
/// 6. steps 3 and 4 are repeated until nothing changes: a malformed escape next to a decoded
///    character can spell a new escape (`/%%36d` → `/%6d` → `/m`), and a normalised path must
///    be its own normalisation, since endpoints are stored normalised and normalised again
///    when compared (found by the `request_read` fuzz target).
///
/// The result always starts with `/`. Used for both sides of the comparison.
pub fn normalize_path(path_and_query: &str) -> String {
    let mut normal = normalize_once(path_and_query);
    // Each pass that changes something decodes an escape or drops a segment (shorter), or
    // upper-cases escapes (once): this ends.
    loop {
        let again = normalize_once(&normal);
        if again == normal {
            return normal;
        }
        normal = again;
    }
}

/// Steps 1 to 5 of [`normalize_path`], once. On its own output (which starts with `/` and has
/// no `?` or `#`) only steps 3 and 4 can change anything.
fn normalize_once(path_and_query: &str) -> String {
    let target = strip_origin(path_and_query);
    let path = match target.find(['?', '#']) {
        Some(end) => &target[..end],
        None => target,
    };
    let decoded = decode_unreserved(path);

    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }

    let mut out = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether a request target names the MCP endpoint, after normalising both
/// with [`normalize_path`].
pub fn is_endpoint_path(path_and_query: &str, endpoint_path: &str) -> bool {
    normalize_path(path_and_query) == normalize_path(endpoint_path)
}

/// Drops `scheme://authority` from an absolute-form request target.
///
/// Anything that does not start with a syntactically valid scheme followed
/// by `://` is returned unchanged.
fn strip_origin(target: &str) -> &str {
    let Some(colon) = target.find("://") else {
        return target;
    };
    if !is_scheme(&target[..colon]) {
        return target;
    }
    let rest = &target[colon + 3..];
    match rest.find(['/', '?', '#']) {
        Some(path_start) => &rest[path_start..],
        None => "",
    }
}

/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` (RFC 3986, section 3.1).
fn is_scheme(candidate: &str) -> bool {
    let mut chars = candidate.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Decodes `%XX` escapes of unreserved characters and upper-cases the hex
/// digits of the escapes that stay encoded. Malformed escapes are kept as
/// they are.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        let (Some(high), Some(low)) = (hex_value(bytes.get(i + 1)), hex_value(bytes.get(i + 2)))
        else {
            i += 1;
            continue;
        };
        let decoded = high * 16 + low;
        // Everything before `i` is whole characters: `%` is ASCII.
        out.push_str(&path[copied..i]);
        if is_unreserved(decoded) {
            out.push(char::from(decoded));
        } else {
            out.push('%');
            out.push(hex_digit(decoded >> 4));
            out.push(hex_digit(decoded & 0x0f));
        }
        i += 3;
        copied = i;
    }
    out.push_str(&path[copied..]);
    out
}

fn hex_value(byte: Option<&u8>) -> Option<u8> {
    match byte? {
        b @ b'0'..=b'9' => Some(b - b'0'),
        b @ b'a'..=b'f' => Some(b - b'a' + 10),
        b @ b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(nibble & 0x0f)])
}

/// RFC 3986 unreserved characters.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}
