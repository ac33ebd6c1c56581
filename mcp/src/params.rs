//! `Mcp-Param-{Name}` headers (2026-07-28): a tool's `inputSchema` may mark a property with
//! `x-mcp-header: "Name"`, and clients then mirror that argument into the header so that
//! intermediaries can route on it. A header that says something other than the body could send
//! a call one way past a router and decide it another way at the server, so the two must agree:
//! servers refuse a disagreement with -32020, and so does mcpwarden, before forwarding.
//!
//! Designations are learnt from the `tools/list` results that pass through the agent (the only
//! place they are published); a call to a tool whose listing was never seen cannot be checked.
//! Only properties reachable through `properties` chains count, as the specification says.

use http::HeaderMap;
use serde_json::Value;

use super::headers::decode_header_value;

/// `Mcp-Param-` in lower case, as `http::HeaderMap` stores names.
pub const PARAM_HEADER_PREFIX: &str = "mcp-param-";

/// One mirrored argument: the header (lower case, without the prefix) and the argument's path
/// below `arguments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designation {
    pub header: String,
    pub path: Vec<String>,
}

/// The designations of one tool definition (an element of `result.tools`).
pub fn designations(tool: &Value) -> Vec<Designation> {
    let mut out = Vec::new();
    if let Some(schema) = tool.get("inputSchema") {
        walk(schema, &mut Vec::new(), &mut out, 0);
    }
    out
}

fn walk(schema: &Value, path: &mut Vec<String>, out: &mut Vec<Designation>, depth: usize) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    if depth > 32 {
        return;
    }
    for (name, prop) in props {
        path.push(name.clone());
        if let Some(header) = prop.get("x-mcp-header").and_then(Value::as_str) {
            out.push(Designation {
                header: header.to_ascii_lowercase(),
                path: path.clone(),
            });
        }
        walk(prop, path, out, depth + 1);
        path.pop();
    }
}

/// Whether the request carries any `Mcp-Param-*` header.
pub fn has_param_headers(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().starts_with(PARAM_HEADER_PREFIX))
}

/// Checks the `Mcp-Param-*` headers of a call against its arguments. `Err` says what differs.
pub fn check(
    designations: &[Designation],
    arguments: Option<&Value>,
    headers: &HeaderMap,
) -> Result<(), String> {
    for name in headers.keys() {
        let Some(suffix) = name.as_str().strip_prefix(PARAM_HEADER_PREFIX) else {
            continue;
        };
        if !designations.iter().any(|d| d.header == suffix) {
            return Err(format!(
                "Mcp-Param-{suffix} names no parameter this tool mirrors into a header"
            ));
        }
    }
    for d in designations {
        let value = arguments.and_then(|a| d.path.iter().try_fold(a, |v, k| v.get(k)));
        let value = value.filter(|v| !v.is_null());
        let header_name = format!("{PARAM_HEADER_PREFIX}{}", d.header);
        let mut values = headers.get_all(header_name.as_str()).iter();
        let header = values.next();
        if values.next().is_some() {
            return Err(format!("more than one Mcp-Param-{} header", d.header));
        }
        let arg = d.path.join(".");
        match (value, header) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(format!(
                    "Mcp-Param-{} is set but arguments.{arg} is absent",
                    d.header
                ))
            }
            (Some(_), None) => {
                return Err(format!(
                    "arguments.{arg} is set but its Mcp-Param-{} header is missing",
                    d.header
                ))
            }
            (Some(v), Some(h)) => {
                let text = h
                    .to_str()
                    .ok()
                    .and_then(decode_header_value)
                    .ok_or_else(|| format!("Mcp-Param-{} is not valid header text", d.header))?;
                if !agrees(v, &text) {
                    // Neither value is quoted: arguments never reach a reason or a log.
                    return Err(format!(
                        "Mcp-Param-{} differs from arguments.{arg}",
                        d.header
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A header value against the argument it mirrors: strings exactly, booleans as `true`/`false`,
/// integers numerically (`42` and `42.0` agree).
fn agrees(value: &Value, header: &str) -> bool {
    match value {
        Value::String(s) => s == header,
        Value::Bool(b) => header == if *b { "true" } else { "false" },
        Value::Number(n) => match (n.as_i64(), header.parse::<i64>().ok()) {
            (Some(a), Some(b)) => a == b,
            _ => match (n.as_f64(), header.parse::<f64>().ok()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn mirrored_arguments_must_agree() {
        let tool = json!({"name":"deploy","inputSchema":{"type":"object","properties":{
            "region":{"type":"string","x-mcp-header":"Region"},
            "opts":{"type":"object","properties":{"dry":{"type":"boolean","x-mcp-header":"Dry"}}},
            "n":{"type":"integer","x-mcp-header":"N"}}}});
        let d = designations(&tool);
        assert_eq!(d.len(), 3);
        let args = json!({"region":"eu-1","opts":{"dry":true},"n":42});
        let ok = headers(&[
            ("mcp-param-region", "eu-1"),
            ("Mcp-Param-Dry", "true"),
            ("mcp-param-n", "42"),
        ]);
        assert_eq!(check(&d, Some(&args), &ok), Ok(()));
        let b64 = headers(&[
            ("mcp-param-region", "=?base64?ZXUtMQ==?="),
            ("Mcp-Param-Dry", "true"),
            ("mcp-param-n", "42"),
        ]);
        assert_eq!(check(&d, Some(&args), &b64), Ok(()));
        for (pairs, needle) in [
            (
                vec![
                    ("mcp-param-region", "us-1"),
                    ("mcp-param-dry", "true"),
                    ("mcp-param-n", "42"),
                ],
                "Mcp-Param-Region differs from arguments.region",
            ),
            (
                vec![("mcp-param-dry", "true"), ("mcp-param-n", "42")],
                "header is missing",
            ),
            (
                vec![
                    ("mcp-param-region", "eu-1"),
                    ("mcp-param-dry", "true"),
                    ("mcp-param-n", "42"),
                    ("mcp-param-other", "x"),
                ],
                "names no parameter",
            ),
            (
                vec![
                    ("mcp-param-region", "eu-1"),
                    ("mcp-param-dry", "false"),
                    ("mcp-param-n", "42"),
                ],
                "Dry",
            ),
        ] {
            let err = check(&d, Some(&args), &headers(&pairs)).unwrap_err();
            assert!(
                err.to_ascii_lowercase()
                    .contains(&needle.to_ascii_lowercase()),
                "{err}"
            );
        }
        let absent = json!({"opts":{"dry":true},"n":1});
        let err = check(
            &d,
            Some(&absent),
            &headers(&[
                ("mcp-param-region", "eu-1"),
                ("mcp-param-dry", "true"),
                ("mcp-param-n", "1"),
            ]),
        )
        .unwrap_err();
        assert!(err.contains("absent"), "{err}");
    }
}
