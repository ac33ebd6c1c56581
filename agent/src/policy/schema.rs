//! The shape of `policy.json`, as serde types.
//!
//! Every value is checked while it is deserialized, inside the `Deserialize`
//! impls, so that serde_json attaches the line and column of the offending
//! key or value to the error. Structs reject unknown fields, and maps reject
//! duplicate keys. Nothing here is ever silently ignored or defaulted except
//! absent optional fields.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::time::Duration;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Scope names that later versions of the format define.
const LATER_SCOPES: [&str; 4] = ["process", "session", "server", "cluster"];

/// A derived struct that may only be written as a JSON object.
///
/// Derived `Deserialize` impls also accept an array of field values in field
/// order, which is not part of the format; this wrapper rejects that.
#[derive(Debug)]
pub(super) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(V(PhantomData))
    }
}

/// The whole file; read it as an `Object<PolicyFile>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    /// Checked to be "1"; carries no data.
    #[allow(dead_code)]
    pub version: Version,
    /// What happens to tools that `tools` does not list.
    pub default: DefaultAction,
    /// Tools removed from `tools/list` and answered as unknown when called.
    #[serde(default)]
    pub hide: Option<Hide>,
    /// Rules per tool name, in file order.
    #[serde(default)]
    pub tools: ToolMap,
}

/// The `hide` field: `"*"` (every tool) or a list of tool names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Hide {
    All,
    Names(Vec<String>),
}

impl<'de> Deserialize<'de> for Hide {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Hide;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"*\" or an array of tool names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Hide, E> {
                if v == "*" {
                    Ok(Hide::All)
                } else {
                    Err(E::custom(format!(
                        "hide must be \"*\" or an array of tool names, not the string {v:?}"
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Hide, A::Error> {
                let mut names: Vec<String> = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if name.is_empty() {
                        return Err(de::Error::custom("a hidden tool name must not be empty"));
                    }
                    if name.contains('*') {
                        return Err(de::Error::custom(format!(
                            "{name:?}: patterns in \"hide\" are not supported yet; use \"hide\": \"*\" to hide every tool, or list names"
                        )));
                    }
                    if names.contains(&name) {
                        return Err(de::Error::custom(format!(
                            "tool {name:?} appears twice in \"hide\""
                        )));
                    }
                    names.push(name);
                }
                Ok(Hide::Names(names))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The `version` field; only the string "1" is accepted.
#[derive(Debug)]
pub(super) struct Version;

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("the string \"1\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                if v == "1" {
                    Ok(Version)
                } else {
                    Err(E::custom(format!(
                        "unsupported version {v:?}: this agent reads version \"1\""
                    )))
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// The `default` field: what happens to tools the policy does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DefaultAction {
    Allow,
    Deny,
}

impl<'de> Deserialize<'de> for DefaultAction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DefaultAction;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"allow\" or \"deny\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DefaultAction, E> {
                match v {
                    "allow" => Ok(DefaultAction::Allow),
                    "deny" => Ok(DefaultAction::Deny),
                    _ => Err(E::custom(format!(
                        "unknown default {v:?}: expected \"allow\" or \"deny\""
                    ))),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// The `tools` object, kept in file order. Unlike a `HashMap`, it rejects a
/// tool name that appears twice instead of keeping the last one.
#[derive(Debug, Default)]
pub(super) struct ToolMap(pub Vec<(String, ToolRule)>);

impl<'de> Deserialize<'de> for ToolMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping tool names to rules")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolMap, A::Error> {
                let mut seen = HashSet::new();
                let mut tools = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    // Checked before the value is read, so the error points
                    // at the offending key.
                    if name.is_empty() {
                        return Err(de::Error::custom("tool name must not be empty"));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate tool {name:?} in \"tools\""
                        )));
                    }
                    let rule = map.next_value::<ToolRule>()?;
                    tools.push((name, rule));
                }
                Ok(ToolMap(tools))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// One entry of `tools`.
#[derive(Debug)]
pub(super) struct ToolRule {
    /// `None` when the file has no `action`: a listed tool is allowed.
    pub action: Option<ToolAction>,
    /// From `reason` or its alias `on_deny`.
    pub reason: Option<String>,
    pub limits: Vec<Object<LimitSpec>>,
}

/// The keys a tool rule may have.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum RuleField {
    Action,
    Reason,
    OnDeny,
    Limits,
}

impl RuleField {
    fn name(&self) -> &'static str {
        match self {
            RuleField::Action => "action",
            RuleField::Reason => "reason",
            RuleField::OnDeny => "on_deny",
            RuleField::Limits => "limits",
        }
    }
}

// Written by hand rather than derived so that `reason` and `on_deny` together
// are reported at the second of the two keys, like any other duplicate.
impl<'de> Deserialize<'de> for ToolRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolRule;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a tool rule object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolRule, A::Error> {
                let mut action = None;
                let mut reason: Option<(&'static str, String)> = None;
                let mut limits = None;
                while let Some(field) = map.next_key::<RuleField>()? {
                    match field {
                        RuleField::Action => {
                            if action.is_some() {
                                return Err(de::Error::duplicate_field("action"));
                            }
                            action = Some(map.next_value::<ToolAction>()?);
                        }
                        RuleField::Reason | RuleField::OnDeny => {
                            let key = field.name();
                            if let Some((first, _)) = &reason {
                                return Err(if *first == key {
                                    de::Error::duplicate_field(key)
                                } else {
                                    de::Error::custom(
                                        "\"reason\" and \"on_deny\" are the same field; \
                                         give only one of them",
                                    )
                                });
                            }
                            reason = Some((key, map.next_value::<Reason>()?.0));
                        }
                        RuleField::Limits => {
                            if limits.is_some() {
                                return Err(de::Error::duplicate_field("limits"));
                            }
                            limits = Some(map.next_value::<Vec<Object<LimitSpec>>>()?);
                        }
                    }
                }
                Ok(ToolRule {
                    action,
                    reason: reason.map(|(_, text)| text),
                    limits: limits.unwrap_or_default(),
                })
            }
        }
        deserializer.deserialize_struct("ToolRule", &["action", "reason", "on_deny", "limits"], V)
    }
}

/// A tool's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToolAction {
    Allow,
    Deny,
}

impl<'de> Deserialize<'de> for ToolAction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ToolAction;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"allow\" or \"deny\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ToolAction, E> {
                match v {
                    "allow" => Ok(ToolAction::Allow),
                    "deny" => Ok(ToolAction::Deny),
                    "require_approval" => Err(E::custom(
                        "action \"require_approval\" is not supported yet",
                    )),
                    _ => Err(E::custom(format!(
                        "unknown action {v:?}: expected \"allow\" or \"deny\""
                    ))),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// The text of `reason` / `on_deny`; must not be empty, since it is what the
/// agent is told.
struct Reason(String);

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Reason;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Reason, E> {
                if v.trim().is_empty() {
                    Err(E::custom("reason must not be empty"))
                } else {
                    Ok(Reason(v.to_owned()))
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// One entry of a tool's `limits`; read it as an `Object<LimitSpec>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitSpec {
    pub counter: CounterName,
    pub window: Window,
    pub max: Max,
    /// Checked to be "grant"; carries no data yet.
    #[allow(dead_code)]
    pub scope: Scope,
    /// Spend quotas are a later feature; present only to reject it clearly.
    #[serde(
        default,
        rename = "increment_from",
        deserialize_with = "reject_increment_from"
    )]
    _increment_from: (),
}

/// A limit's `counter`: a non-empty name. Limits with the same name share one
/// log of admitted calls.
#[derive(Debug)]
pub(super) struct CounterName(pub String);

impl<'de> Deserialize<'de> for CounterName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CounterName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty counter name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CounterName, E> {
                if v.is_empty() {
                    Err(E::custom("counter name must not be empty"))
                } else {
                    Ok(CounterName(v.to_owned()))
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A limit's `window`: a named unit or a positive number of seconds. Windows
/// slide; they are not aligned to the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Window {
    Second,
    Minute,
    Hour,
    Day,
    Seconds(NonZeroU64),
}

impl Window {
    /// The window's length.
    pub fn duration(self) -> Duration {
        match self {
            Window::Second => Duration::from_secs(1),
            Window::Minute => Duration::from_secs(60),
            Window::Hour => Duration::from_secs(60 * 60),
            Window::Day => Duration::from_secs(24 * 60 * 60),
            Window::Seconds(n) => Duration::from_secs(n.get()),
        }
    }
}

/// Renders as it reads after "per": "minute", "second", "30 seconds".
impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Window::Second => f.write_str("second"),
            Window::Minute => f.write_str("minute"),
            Window::Hour => f.write_str("hour"),
            Window::Day => f.write_str("day"),
            Window::Seconds(n) if n.get() == 1 => f.write_str("second"),
            Window::Seconds(n) => write!(f, "{n} seconds"),
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Window;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"second\", \"minute\", \"hour\", \"day\" or a positive number of seconds",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Window, E> {
                match v {
                    "second" => Ok(Window::Second),
                    "minute" => Ok(Window::Minute),
                    "hour" => Ok(Window::Hour),
                    "day" => Ok(Window::Day),
                    _ => Err(E::custom(format!(
                        "unknown window {v:?}: expected \"second\", \"minute\", \"hour\", \
                         \"day\" or a positive number of seconds"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Window, E> {
                NonZeroU64::new(v)
                    .map(Window::Seconds)
                    .ok_or_else(|| E::custom("window must be a positive number of seconds, not 0"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Window, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "window must be a positive number of seconds, not {v}"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A limit's `max`: how many calls one window admits; 0 admits none.
#[derive(Debug, Clone, Copy)]
pub(super) struct Max(pub u64);

impl<'de> Deserialize<'de> for Max {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Max;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Max, E> {
                Ok(Max(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Max, E> {
                u64::try_from(v)
                    .map(Max)
                    .map_err(|_| E::custom(format!("max must be a non-negative integer, not {v}")))
            }
        }
        deserializer.deserialize_u64(V)
    }
}

/// A limit's `scope`: whose calls share a log. Only `grant` (per calling
/// workload) exists in this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Grant,
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scope;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"grant\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scope, E> {
                if v == "grant" {
                    Ok(Scope::Grant)
                } else if LATER_SCOPES.contains(&v) {
                    Err(E::custom(format!(
                        "scope {v:?} is not supported yet: only \"grant\" is"
                    )))
                } else {
                    Err(E::custom(format!(
                        "unknown scope {v:?}: expected \"grant\""
                    )))
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Fails on any value of `increment_from`. The error is raised by the visitor
/// while serde_json is reading the value, so it carries that value's position.
fn reject_increment_from<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    deserializer.deserialize_any(NotSupportedYet("increment_from"))
}

/// A visitor that rejects whatever value it is given, naming the field.
struct NotSupportedYet(&'static str);

impl NotSupportedYet {
    fn error<E: de::Error>(&self) -> E {
        E::custom(format!("{:?} is not supported yet", self.0))
    }
}

impl<'de> Visitor<'de> for NotSupportedYet {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "no {:?} field (not supported yet)", self.0)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.error())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.error())
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.error())
    }
}
