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

use super::args::ArgPath;
use super::condition::Condition;
use super::glob::Pattern;

/// How deep `tools` patterns may nest: not at all; this bounds `hide` lists instead.
const MAX_HIDE_ENTRIES: usize = 65_536;

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
    /// Enforce, or only audit what would have been refused.
    #[serde(default)]
    pub mode: Mode,
    /// Tools removed from `tools/list` and answered as unknown when called.
    #[serde(default)]
    pub hide: Option<Hide>,
    /// Rules over every call.
    #[serde(default)]
    pub all_tools: Option<Object<AllTools>>,
    /// Rules per tool name or pattern, in file order.
    #[serde(default)]
    pub tools: ToolMap,
}

/// `all_tools`: rules every call must pass, whatever the tool.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AllTools {
    #[serde(default)]
    pub limits: Vec<Object<LimitSpec>>,
    #[serde(default)]
    pub deny_if: Vec<Condition>,
    #[serde(default)]
    pub require: Vec<Condition>,
}

/// The `mode` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Mode {
    #[default]
    Enforce,
    /// Forward everything; audit what enforcing would have refused.
    DryRun,
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"enforce\" or \"dry_run\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                match v {
                    "enforce" => Ok(Mode::Enforce),
                    "dry_run" => Ok(Mode::DryRun),
                    _ => Err(E::custom(format!(
                        "unknown mode {v:?}: expected \"enforce\" or \"dry_run\""
                    ))),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// The `hide` field: `"*"` (every tool) or a list of tool names and patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Hide {
    All,
    List(Vec<NameOrPattern>),
}

/// A tool name as written in `hide` or `tools`: exact, or a pattern with `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NameOrPattern {
    Name(String),
    Pattern(Pattern),
}

impl NameOrPattern {
    fn new(text: &str) -> NameOrPattern {
        match Pattern::new(text) {
            Some(pattern) => NameOrPattern::Pattern(pattern),
            None => NameOrPattern::Name(text.to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for Hide {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Hide;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"*\" or an array of tool names and patterns")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Hide, E> {
                if v == "*" {
                    Ok(Hide::All)
                } else {
                    Err(E::custom(format!(
                        "hide must be \"*\" or an array of tool names and patterns, not the string {v:?}"
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Hide, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if name.is_empty() {
                        return Err(de::Error::custom("a hidden tool name must not be empty"));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!(
                            "tool {name:?} appears twice in \"hide\""
                        )));
                    }
                    if entries.len() == MAX_HIDE_ENTRIES {
                        return Err(de::Error::custom(format!(
                            "\"hide\" lists more than {MAX_HIDE_ENTRIES} entries"
                        )));
                    }
                    entries.push(NameOrPattern::new(&name));
                }
                Ok(Hide::List(entries))
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
/// tool name that appears twice instead of keeping the last one, and two
/// patterns that could both decide one name with equal precedence (the same
/// literal prefix length).
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
                let mut patterns: Vec<Pattern> = Vec::new();
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
                    if let Some(pattern) = Pattern::new(&name) {
                        if let Some(other) = patterns.iter().find(|other| {
                            other.prefix_len() == pattern.prefix_len() && other.overlaps(&pattern)
                        }) {
                            return Err(de::Error::custom(format!(
                                "patterns {:?} and {name:?} tie: both can match one tool name and \
                                 have literal prefixes of the same length, so neither wins; \
                                 list that tool exactly, or lengthen one prefix",
                                other.as_str()
                            )));
                        }
                        patterns.push(pattern);
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
#[derive(Debug, Default)]
pub(super) struct ToolRule {
    /// `None` when the file has no `action`: a listed tool is allowed.
    pub action: Option<ToolAction>,
    /// From `reason` or its alias `on_deny`.
    pub reason: Option<String>,
    /// The JSON Schema the call's `arguments` must match.
    pub arguments: Option<ArgSchema>,
    pub deny_if: Vec<Condition>,
    pub require: Vec<Condition>,
    pub limits: Vec<Object<LimitSpec>>,
    /// `approval`: how a `require_approval` call is approved.
    pub approval: Option<crate::Approval>,
}

/// The keys a tool rule may have.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum RuleField {
    Action,
    Reason,
    OnDeny,
    Arguments,
    DenyIf,
    Require,
    Limits,
    Approval,
}

const RULE_FIELDS: &[&str] = &[
    "action",
    "reason",
    "on_deny",
    "arguments",
    "deny_if",
    "require",
    "limits",
    "approval",
];

impl RuleField {
    fn name(&self) -> &'static str {
        match self {
            RuleField::Action => "action",
            RuleField::Reason => "reason",
            RuleField::OnDeny => "on_deny",
            RuleField::Arguments => "arguments",
            RuleField::DenyIf => "deny_if",
            RuleField::Require => "require",
            RuleField::Limits => "limits",
            RuleField::Approval => "approval",
        }
    }
}

/// Reads a field's value once; a second occurrence is an error at that key.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    key: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(key));
    }
    *slot = Some(map.next_value::<T>()?);
    Ok(())
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
                let (mut action, mut arguments, mut deny_if, mut require, mut limits) =
                    (None, None, None, None, None);
                let mut approval: Option<crate::Approval> = None;
                let mut reason: Option<(&'static str, String)> = None;
                while let Some(field) = map.next_key::<RuleField>()? {
                    let key = field.name();
                    match field {
                        RuleField::Action => once(&mut map, &mut action, key)?,
                        RuleField::Arguments => once(&mut map, &mut arguments, key)?,
                        RuleField::DenyIf => once(&mut map, &mut deny_if, key)?,
                        RuleField::Require => once(&mut map, &mut require, key)?,
                        RuleField::Limits => once(&mut map, &mut limits, key)?,
                        RuleField::Approval => once(&mut map, &mut approval, key)?,
                        RuleField::Reason | RuleField::OnDeny => {
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
                    }
                }
                if approval.is_some() && action != Some(ToolAction::RequireApproval) {
                    return Err(de::Error::custom(
                        "\"approval\" applies only to a rule with action \"require_approval\"",
                    ));
                }
                Ok(ToolRule {
                    action,
                    approval,
                    reason: reason.map(|(_, text)| text),
                    arguments,
                    deny_if: deny_if.unwrap_or_default(),
                    require: require.unwrap_or_default(),
                    limits: limits.unwrap_or_default(),
                })
            }
        }
        deserializer.deserialize_struct("ToolRule", RULE_FIELDS, V)
    }
}

/// A tool's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToolAction {
    Allow,
    Deny,
    RequireApproval,
}

impl<'de> Deserialize<'de> for ToolAction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ToolAction;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"allow\", \"deny\" or \"require_approval\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ToolAction, E> {
                match v {
                    "allow" => Ok(ToolAction::Allow),
                    "deny" => Ok(ToolAction::Deny),
                    "require_approval" => Ok(ToolAction::RequireApproval),
                    _ => Err(E::custom(format!(
                        "unknown action {v:?}: expected \"allow\", \"deny\" or \"require_approval\""
                    ))),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A tool's `arguments`: a JSON Schema (draft 2020-12 unless its `$schema` says otherwise),
/// checked against the meta-schema and compiled while the file is read. References are
/// resolved inside the schema only: nothing is fetched.
#[derive(Clone)]
pub(crate) struct ArgSchema(
    pub std::sync::Arc<jsonschema::Validator>,
    /// Every property name the schema mentions (see [`property_names`]).
    pub Vec<String>,
);

impl fmt::Debug for ArgSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ArgSchema(..)")
    }
}

impl<'de> Deserialize<'de> for ArgSchema {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let schema = serde_json::Value::deserialize(deserializer)?;
        if !(schema.is_object() || schema.is_boolean()) {
            return Err(de::Error::custom(
                "arguments must be a JSON Schema: an object (or true/false)",
            ));
        }
        let mut names = Vec::new();
        property_names(&schema, &mut names);
        jsonschema::draft202012::options()
            .build(&schema)
            .map(|v| ArgSchema(std::sync::Arc::new(v), names))
            .map_err(|e| {
                de::Error::custom(format!(
                    "arguments is not a valid JSON Schema (draft 2020-12): {} (at schema {})",
                    e.masked(),
                    location_or_root(e.schema_path().as_str())
                ))
            })
    }
}

/// The property names a schema mentions, at any depth: keys of `properties`,
/// `dependentRequired`, `dependentSchemas` and `dependencies`, and the names listed in
/// `required` and `dependentRequired`. Generous on purpose (a `properties` key inside an `enum`
/// value counts too): the names only ever make the engine refuse more.
fn property_names(schema: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let strings = |items: &Vec<Value>, out: &mut Vec<String>| {
        out.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
    };
    match schema {
        Value::Object(map) => {
            for (keyword, value) in map {
                match (keyword.as_str(), value) {
                    ("properties" | "dependentSchemas", Value::Object(props)) => {
                        out.extend(props.keys().cloned());
                    }
                    ("dependentRequired" | "dependencies", Value::Object(props)) => {
                        out.extend(props.keys().cloned());
                        for listed in props.values().filter_map(Value::as_array) {
                            strings(listed, out);
                        }
                    }
                    ("required", Value::Array(items)) => strings(items, out),
                    _ => {}
                }
                property_names(value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| property_names(v, out)),
        _ => {}
    }
}

/// A JSON Pointer as text, with the empty pointer (the root) spelt `/`.
pub(crate) fn location_or_root(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/"
    } else {
        pointer
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
    pub scope: Scope,
    /// Adds this argument's value instead of 1 (spend quotas).
    #[serde(default)]
    pub increment_from: Option<IncrementFrom>,
}

/// `increment_from`: `args.<path>` of a number.
#[derive(Debug)]
pub(super) struct IncrementFrom(pub ArgPath);

impl<'de> Deserialize<'de> for IncrementFrom {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ArgPath::parse(&text)
            .map(IncrementFrom)
            .map_err(|e| de::Error::custom(format!("increment_from: {e}")))
    }
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

/// A limit's `max`: how much one window admits (calls, or the sum of `increment_from`
/// values); 0 admits nothing that counts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Max(pub f64);

impl<'de> Deserialize<'de> for Max {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Max;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Max, E> {
                // Beyond 2^53 the sum of a window is no longer exact; nobody needs such a limit.
                if v > (1 << 53) {
                    return Err(E::custom(format!("max {v} is too large (at most 2^53)")));
                }
                #[allow(clippy::cast_precision_loss)] // exact below 2^53, checked above
                Ok(Max(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Max, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("max must not be negative, not {v}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Max, E> {
                if v.is_finite() && (0.0..=9_007_199_254_740_992.0).contains(&v) {
                    Ok(Max(v))
                } else {
                    Err(E::custom(format!(
                        "max must be a non-negative number, not {v}"
                    )))
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The scopes a limit may name, as an error lists them.
const SCOPES: &str =
    "\"grant\", \"process\", \"session\", \"namespace\", \"service_account\" or \"server\"";

/// A limit's `scope`: whose calls share a counter's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    /// The calling workload: its pod when known, else its cgroup.
    Grant,
    /// The calling process.
    Process,
    /// The MCP session (per connection when the revision has no sessions).
    Session,
    /// The caller's Kubernetes namespace (else, outside a known pod, like `grant`).
    Namespace,
    /// The caller's namespace and service account (else like `grant`).
    ServiceAccount,
    /// Every caller on this node.
    Server,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Grant => "grant",
            Scope::Process => "process",
            Scope::Session => "session",
            Scope::Namespace => "namespace",
            Scope::ServiceAccount => "service_account",
            Scope::Server => "server",
        }
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scope;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(SCOPES)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scope, E> {
                match v {
                    "grant" => Ok(Scope::Grant),
                    "process" => Ok(Scope::Process),
                    "session" => Ok(Scope::Session),
                    "namespace" => Ok(Scope::Namespace),
                    "service_account" => Ok(Scope::ServiceAccount),
                    "server" => Ok(Scope::Server),
                    "cluster" => Err(E::custom(
                        "scope \"cluster\" needs a counter store shared by every node (Redis), \
                         which this version does not have; use \"server\" for a per-node limit",
                    )),
                    _ => Err(E::custom(format!("unknown scope {v:?}: expected {SCOPES}"))),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}
