//! Paths into a call's arguments: `args.amount`, `args.items.0.id`.

use std::fmt;

use serde_json::Value;

/// A dotted path from `args`, split into segments at load.
///
/// A segment of ASCII digits indexes an array when the value there is an array, and is a key
/// when it is an object. Keys that contain a dot cannot be addressed; the `arguments` JSON
/// Schema can check those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ArgPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    key: String,
    /// The key read as an array index, when it is one.
    index: Option<usize>,
}

impl ArgPath {
    /// Parses `args.<segment>[.<segment>...]`.
    ///
    /// # Errors
    ///
    /// A path that does not start with `args.` or has an empty segment.
    pub fn parse(text: &str) -> Result<ArgPath, String> {
        let Some(rest) = text.strip_prefix("args.") else {
            return Err(format!(
                "path {text:?} must be \"args.\" and an argument name, e.g. \"args.amount\": rules test the call's arguments"
            ));
        };
        if text.chars().any(char::is_control) {
            return Err(format!("path {text:?} contains a control character"));
        }
        let mut segments = Vec::new();
        for key in rest.split('.') {
            if key.is_empty() {
                return Err(format!("path {text:?} has an empty segment"));
            }
            let index = if key.bytes().all(|b| b.is_ascii_digit()) {
                key.parse::<usize>().ok()
            } else {
                None
            };
            segments.push(Segment {
                key: key.to_owned(),
                index,
            });
        }
        Ok(ArgPath {
            text: text.to_owned(),
            segments,
        })
    }

    /// The value at this path in `args`, or `None` when some segment is missing.
    pub fn get<'a>(&self, args: &'a Value) -> Option<&'a Value> {
        let mut here = args;
        for segment in &self.segments {
            here = match here {
                Value::Object(map) => map.get(&segment.key)?,
                Value::Array(items) => items.get(segment.index?)?,
                _ => return None,
            };
        }
        Some(here)
    }

    /// The keys the path names, in order (index segments included, as text).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().map(|s| s.key.as_str())
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ArgPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::ArgPath;
    use serde_json::json;

    #[test]
    fn walks_objects_and_arrays() {
        let args = json!({"amount": 5, "items": [{"id": "a"}, {"id": "b"}], "m": {"0": "zero"}});
        let get = |p: &str| ArgPath::parse(p).ok().and_then(|p| p.get(&args).cloned());
        assert_eq!(get("args.amount"), Some(json!(5)));
        assert_eq!(get("args.items.1.id"), Some(json!("b")));
        assert_eq!(get("args.items.2.id"), None);
        assert_eq!(get("args.m.0"), Some(json!("zero")));
        assert_eq!(get("args.amount.x"), None);
        assert_eq!(get("args.items.x"), None);
    }

    #[test]
    fn refuses_bad_paths() {
        for bad in ["amount", "args", "args.", "args..x", "args.x.", "arg.x", ""] {
            assert!(ArgPath::parse(bad).is_err(), "{bad}");
        }
    }
}
