//! A rule's `approval`: who approves a `require_approval` call and for how long it may wait.
//!
//! ```json
//! "drop_cluster": { "action": "require_approval",
//!                   "approval": { "timeout": "30s", "remember": "10m", "show_arguments": true } }
//! "deploy":       { "action": "require_approval", "approval": "user" }
//! ```

use std::{fmt, time::Duration};

use serde::{
    de::{self, MapAccess, Visitor},
    Deserialize, Deserializer,
};

/// Who decides a held call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApprovalMode {
    /// An operator, through the agent (CLI, `Approval` resource).
    #[default]
    Operator,
    /// The client's own user, inside the protocol (2026-07-28 elicitation); other clients fall
    /// back to [`ApprovalMode::Operator`].
    User,
}

/// How a `require_approval` call is approved. Absent fields take the agent's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Approval {
    pub mode: ApprovalMode,
    /// How long the call is held before it is refused ("approval timed out").
    pub timeout: Option<Duration>,
    /// An approval also approves the same tool for the same caller for this long.
    pub remember: Option<Duration>,
    /// Whether approvers see the argument values (else only their keys and hash).
    pub show_arguments: bool,
}

/// `"45s"`, `"10m"`, `"1h"`, or a number of seconds; positive, at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a duration: expected e.g. \"45s\", \"10m\", \"1h\"")
    })?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(|| {
        format!("{text:?} is not a duration: expected a number followed by s, m or h")
    })?;
    if secs == 0 || secs > 86_400 {
        return Err(format!(
            "{text:?}: a duration must be between 1 second and 24 hours"
        ));
    }
    Ok(Duration::from_secs(secs))
}

struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"45s\", \"10m\" or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                parse_duration(&v.to_string()).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                parse_duration(&v.to_string()).map(Dur).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn mode(v: &str) -> Result<ApprovalMode, String> {
    match v {
        "operator" => Ok(ApprovalMode::Operator),
        "user" => Ok(ApprovalMode::User),
        _ => Err(format!(
            "unknown approval mode {v:?}: expected \"operator\" or \"user\""
        )),
    }
}

impl<'de> Deserialize<'de> for Approval {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Approval;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"operator\", \"user\", or an object with mode, timeout, remember, show_arguments")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Approval, E> {
                Ok(Approval {
                    mode: mode(v).map_err(E::custom)?,
                    ..Approval::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Approval, A::Error> {
                let mut out = Approval::default();
                let mut seen: Vec<String> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if seen.contains(&key) {
                        return Err(de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    match key.as_str() {
                        "mode" => {
                            out.mode =
                                mode(&map.next_value::<String>()?).map_err(de::Error::custom)?;
                        }
                        "timeout" => out.timeout = Some(map.next_value::<Dur>()?.0),
                        "remember" => out.remember = Some(map.next_value::<Dur>()?.0),
                        "show_arguments" => out.show_arguments = map.next_value()?,
                        _ => {
                            return Err(de::Error::unknown_field(
                                &key,
                                &["mode", "timeout", "remember", "show_arguments"],
                            ))
                        }
                    }
                    seen.push(key);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["0s", "", "m", "10d", "-1s", "25h", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn string_or_object() -> Result<(), serde_json::Error> {
        let a: Approval = serde_json::from_str("\"user\"")?;
        assert_eq!(a.mode, ApprovalMode::User);
        let a: Approval =
            serde_json::from_str(r#"{"timeout":"30s","remember":"10m","show_arguments":true}"#)?;
        assert_eq!(
            a,
            Approval {
                mode: ApprovalMode::Operator,
                timeout: Some(Duration::from_secs(30)),
                remember: Some(Duration::from_secs(600)),
                show_arguments: true
            }
        );
        assert!(serde_json::from_str::<Approval>(r#"{"timeot":"30s"}"#).is_err());
        assert!(serde_json::from_str::<Approval>("\"boss\"").is_err());
        assert!(serde_json::from_str::<Approval>(r#"{"mode":"user","mode":"user"}"#).is_err());
        Ok(())
    }
}
