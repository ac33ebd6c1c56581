//! Argument conditions for tool rules: `deny_if` and `require`.
//!
//! A tool rule may carry `deny_if: [condition, ...]` (the call is denied if
//! ANY condition holds) and `require: [condition, ...]` (the call is denied
//! unless EVERY condition holds). A condition is one of
//!
//! - a test, `{"path": "args.amount", "op": "gt", "value": 100}`;
//! - `{"all": [condition, ...]}`: holds when every inner condition holds;
//! - `{"any": [condition, ...]}`: holds when some inner condition holds.
//!
//! `all` and `any` take non-empty arrays and nest at most 32 condition
//! objects deep (the outermost counts as 1).
//!
//! # Paths
//!
//! A path is `args` followed by one or more `.segment`s, walked from the
//! call's `arguments` object: `args.amount`, `args.items.0.id`. A segment made
//! only of ASCII digits indexes an array when the value reached so far is an
//! array (leading zeros are allowed: `01` is index 1), and is an ordinary key
//! when it is an object. Walking into anything else (a string, a number, a
//! missing key, an index past the end, a non-digit segment on an array)
//! means the path is missing. Keys that contain a dot cannot be addressed;
//! check such arguments with the JSON Schema `arguments` check instead.
//! Paths with control characters are rejected, so that a condition always
//! prints on one line.
//!
//! # Ops
//!
//! | op | value | holds when the argument |
//! |----|-------|-------------------------|
//! | `eq`, `neq` | any JSON | equals / differs from the value |
//! | `in`, `not_in` | non-empty array | equals some / no element |
//! | `lt`, `lte`, `gt`, `gte` | number | compares so against the value |
//! | `regex` | string (RE2 syntax) | is a string the regex matches somewhere |
//! | `contains` | any JSON | is a string containing the value (a string), or an array with an element equal to the value |
//! | `exists` | `true` (default) or `false` | is present (even if null) / is missing |
//!
//! Equality is JSON equality with numbers compared numerically: `1` equals
//! `1.0`; two integers are compared exactly (at any 64-bit magnitude), and an
//! integer is compared with a float as `f64`. Regexes are unanchored
//! searches: write `^...$` to match the whole string, `(?i)` to ignore case.
//!
//! # Missing paths and wrong types
//!
//! A missing path makes every op fail to hold (`neq` and `not_in` too), except
//! `exists`. Use `require` with `exists`, or the schema's `required`, to make
//! an argument mandatory.
//!
//! An argument of the wrong type (e.g. a string where `gt` needs a number, or
//! a number compared `eq` with a string) fails closed: the caller says how it
//! counts with [`WrongType`]; `deny_if` counts it as holding (deny) and
//! `require` as not holding (deny). `all` and `any` pass the same
//! [`WrongType`] to the conditions inside them.
//!
//! # Loading
//!
//! Every condition is checked and compiled while the policy is read: errors
//! come from inside the `Deserialize` impls, so the parser (serde_json,
//! serde_yaml_ng) attaches the line and column. Unknown and duplicate keys
//! are errors. A `value` is read strictly: duplicate object keys, non-finite
//! floats (YAML `.nan`, `.inf`), integers beyond 64 bits and nesting deeper
//! than 64 are errors rather than silently changed. A regex is compiled with
//! the `regex` crate (linear-time matching) and a 1 MiB size limit.

use std::cmp::Ordering;

use super::args::ArgPath;
use std::fmt::{self, Write as _};

use regex::{Regex, RegexBuilder};

thread_local! {
    /// Regexes compiled during the current policy load, by source: a policy that repeats one
    /// pattern in many rules compiles (and holds) it once. Cleared by [`sharing_regexes`].
    static REGEXES: std::cell::RefCell<Option<std::collections::HashMap<String, Regex>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `load` with regexes shared by source among the conditions it reads.
pub(crate) fn sharing_regexes<R>(load: impl FnOnce() -> R) -> R {
    REGEXES.with(|cache| *cache.borrow_mut() = Some(std::collections::HashMap::new()));
    let result = load();
    REGEXES.with(|cache| *cache.borrow_mut() = None);
    result
}

/// Compiles a condition's regex (linear-time RE2 syntax, bounded size), or takes the one
/// already compiled from the same source in this load. A `Regex` clone shares the program.
fn compile_regex(pattern: &str) -> Result<Regex, String> {
    let cached = REGEXES.with(|cache| {
        cache
            .borrow()
            .as_ref()
            .and_then(|c| c.get(pattern).cloned())
    });
    if let Some(regex) = cached {
        return Ok(regex);
    }
    let regex = RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|err| format!("op regex: invalid regex {pattern:?}: {err}"))?;
    REGEXES.with(|cache| {
        if let Some(c) = cache.borrow_mut().as_mut() {
            c.insert(pattern.to_owned(), regex.clone());
        }
    });
    Ok(regex)
}
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Number, Value};

/// How many condition objects deep `all` and `any` may nest (the outermost
/// condition counts as 1).
const MAX_DEPTH: usize = 32;

/// How deep a `value` may nest arrays and objects.
const MAX_VALUE_DEPTH: usize = 64;

/// A `value` is read strictly: duplicate object keys, non-finite floats (YAML `.nan`, `.inf`)
/// and integers beyond 64 bits are errors instead of being dropped or turned into null, and
/// nesting is capped at [`MAX_VALUE_DEPTH`].
const VALUE_OPTIONS: mcpwarden_json::Options = mcpwarden_json::Options {
    on_clash: mcpwarden_json::OnClash::RejectDuplicates,
    max_depth: Some(MAX_VALUE_DEPTH),
};

/// The most memory one compiled regex may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How many characters of an argument value `explain` shows.
const EXPLAIN_VALUE_CHARS: usize = 80;

/// The keys of a condition object, for error messages.
const KEYS: &[&str] = &["path", "op", "value", "all", "any"];

/// The ops, for error messages.
const OPS: &str = "eq, neq, in, not_in, lt, lte, gt, gte, regex, contains, exists";

/// One condition of `deny_if` or `require`, compiled at load.
///
/// Read it with serde (JSON or YAML); see the module documentation for the
/// format and semantics. [`Condition::holds`] decides a call, `Display`
/// writes the condition compactly as written (for audit reasons).
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    node: Node,
}

/// How a value of the wrong type counts: `deny_if` passes
/// `WrongType::Holds`, `require` passes `WrongType::Fails`, so that either
/// way the call is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WrongType {
    /// The test counts as holding.
    Holds,
    /// The test counts as not holding.
    Fails,
}

#[derive(Debug, Clone)]
enum Node {
    Test(Test),
    All(Vec<Condition>),
    Any(Vec<Condition>),
}

/// A `{path, op, value}` condition.
#[derive(Debug, Clone)]
struct Test {
    path: ArgPath,
    check: Check,
}

/// An op with its compiled value.
#[derive(Debug, Clone)]
enum Check {
    Eq(Value),
    Neq(Value),
    In(List),
    NotIn(List),
    Cmp(Cmp, Number),
    Regex(Regex),
    Contains(Value),
    /// `true`: holds when present; `false`: holds when missing.
    Exists(bool),
}

/// The value of `in` / `not_in`: a non-empty list and the JSON types in it.
#[derive(Debug, Clone)]
struct List {
    items: Vec<Value>,
    /// One bit per [`Kind`] present in `items`.
    kinds: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Lt,
    Lte,
    Gt,
    Gte,
}

/// A JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// The outcome of one test before [`WrongType`] is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Missing,
    WrongType,
    Is(bool),
}

impl Kind {
    fn of(value: &Value) -> Kind {
        match value {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Bool,
            Value::Number(_) => Kind::Number,
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The type with an article, for messages: "a string".
    fn a(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

impl Cmp {
    fn accepts(self, order: Ordering) -> bool {
        match self {
            Cmp::Lt => order == Ordering::Less,
            Cmp::Lte => order != Ordering::Greater,
            Cmp::Gt => order == Ordering::Greater,
            Cmp::Gte => order != Ordering::Less,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Lte => "<=",
            Cmp::Gt => ">",
            Cmp::Gte => ">=",
        }
    }
}

impl List {
    fn has_kind(&self, kind: Kind) -> bool {
        self.kinds & kind.bit() != 0
    }

    fn contains(&self, value: &Value) -> bool {
        self.items.iter().any(|item| json_eq(item, value))
    }
}

/// A number as an exact integer, if it is one.
fn integer(n: &Number) -> Option<i128> {
    match n.as_u64() {
        Some(u) => Some(i128::from(u)),
        None => n.as_i64().map(i128::from),
    }
}

/// Compares two numbers: exactly when both are integers, else as `f64`.
/// `None` only if a number has no `f64` form (not possible for parsed JSON).
fn num_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    match (integer(a), integer(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// JSON equality with numbers compared by [`num_cmp`]; values of different
/// types are unequal. Recursion is bounded by the depth of the shallower
/// value, and condition values are at most [`MAX_VALUE_DEPTH`] deep.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => false,
    }
}

impl Check {
    fn op(&self) -> &'static str {
        match self {
            Check::Eq(_) => "eq",
            Check::Neq(_) => "neq",
            Check::In(_) => "in",
            Check::NotIn(_) => "not_in",
            Check::Cmp(Cmp::Lt, _) => "lt",
            Check::Cmp(Cmp::Lte, _) => "lte",
            Check::Cmp(Cmp::Gt, _) => "gt",
            Check::Cmp(Cmp::Gte, _) => "gte",
            Check::Regex(_) => "regex",
            Check::Contains(_) => "contains",
            Check::Exists(_) => "exists",
        }
    }

    /// Checks `value` against `op` and compiles it.
    fn new(op: Op, value: Option<Value>) -> Result<Check, String> {
        let name = op.name();
        let need = |value: Option<Value>| value.ok_or_else(|| format!("op {name} needs a value"));
        let cmp = |cmp: Cmp, value: Value| match value {
            Value::Number(n) => Ok(Check::Cmp(cmp, n)),
            other => Err(format!(
                "op {name} compares numbers: its value must be a number, not {}",
                Kind::of(&other).a()
            )),
        };
        let list = |value: Value| match value {
            Value::Array(items) if items.is_empty() => Err(format!(
                "op {name} needs a non-empty array of values, not an empty array"
            )),
            Value::Array(items) => {
                let kinds = items
                    .iter()
                    .fold(0, |bits, item| bits | Kind::of(item).bit());
                Ok(List { items, kinds })
            }
            other => Err(format!(
                "op {name} needs a non-empty array of values, not {}",
                Kind::of(&other).a()
            )),
        };
        match op {
            Op::Exists => match value {
                None => Ok(Check::Exists(true)),
                Some(Value::Bool(want)) => Ok(Check::Exists(want)),
                Some(other) => Err(format!(
                    "op exists takes value true or false (or no value), not {}",
                    Kind::of(&other).a()
                )),
            },
            Op::Eq => need(value).map(Check::Eq),
            Op::Neq => need(value).map(Check::Neq),
            Op::In => list(need(value)?).map(Check::In),
            Op::NotIn => list(need(value)?).map(Check::NotIn),
            Op::Lt => cmp(Cmp::Lt, need(value)?),
            Op::Lte => cmp(Cmp::Lte, need(value)?),
            Op::Gt => cmp(Cmp::Gt, need(value)?),
            Op::Gte => cmp(Cmp::Gte, need(value)?),
            Op::Regex => match need(value)? {
                Value::String(pattern) => compile_regex(&pattern).map(Check::Regex),
                other => Err(format!(
                    "op regex needs a string (a regular expression) as its value, not {}",
                    Kind::of(&other).a()
                )),
            },
            Op::Contains => need(value).map(Check::Contains),
        }
    }
}

impl Test {
    /// The test's outcome for the value found at the path (`None`: missing).
    /// Allocation-free.
    fn verdict(&self, found: Option<&Value>) -> Verdict {
        let Some(arg) = found else {
            return match self.check {
                Check::Exists(want) => Verdict::Is(!want),
                _ => Verdict::Missing,
            };
        };
        let same = |value: &Value| Kind::of(arg) == Kind::of(value);
        match &self.check {
            Check::Exists(want) => Verdict::Is(*want),
            Check::Eq(value) if same(value) => Verdict::Is(json_eq(arg, value)),
            Check::Neq(value) if same(value) => Verdict::Is(!json_eq(arg, value)),
            Check::In(list) if list.has_kind(Kind::of(arg)) => Verdict::Is(list.contains(arg)),
            Check::NotIn(list) if list.has_kind(Kind::of(arg)) => Verdict::Is(!list.contains(arg)),
            Check::Eq(_) | Check::Neq(_) | Check::In(_) | Check::NotIn(_) => Verdict::WrongType,
            Check::Cmp(cmp, limit) => match arg {
                Value::Number(n) => match num_cmp(n, limit) {
                    Some(order) => Verdict::Is(cmp.accepts(order)),
                    None => Verdict::WrongType,
                },
                _ => Verdict::WrongType,
            },
            Check::Regex(regex) => match arg {
                Value::String(s) => Verdict::Is(regex.is_match(s)),
                _ => Verdict::WrongType,
            },
            Check::Contains(value) => match (arg, value) {
                (Value::String(s), Value::String(needle)) => {
                    Verdict::Is(s.contains(needle.as_str()))
                }
                (Value::Array(items), _) => Verdict::Is(items.iter().any(|e| json_eq(e, value))),
                _ => Verdict::WrongType,
            },
        }
    }

    /// Writes why the test came out as it did (without the verdict).
    fn describe(&self, found: Option<&Value>, verdict: Verdict, out: &mut String) {
        let Some(arg) = found else {
            out.push_str("path missing");
            return;
        };
        let shown = show(arg);
        let kind = Kind::of(arg).a();
        let yes = verdict == Verdict::Is(true);
        let _ = match (&self.check, verdict) {
            (Check::Eq(value), Verdict::WrongType) | (Check::Neq(value), Verdict::WrongType) => {
                write!(out, "value is {kind}, not {}", Kind::of(value).a())
            }
            (Check::Eq(value), _) => {
                write!(out, "{shown} {} {value}", if yes { "==" } else { "!=" })
            }
            (Check::Neq(value), _) => {
                write!(out, "{shown} {} {value}", if yes { "!=" } else { "==" })
            }
            (Check::In(_) | Check::NotIn(_), Verdict::WrongType) => {
                write!(
                    out,
                    "value is {kind}, and the list has no {}",
                    kind_name(arg)
                )
            }
            (Check::In(_), _) => write!(
                out,
                "{shown} is {}in the list",
                if yes { "" } else { "not " }
            ),
            (Check::NotIn(_), _) => {
                write!(
                    out,
                    "{shown} is {}in the list",
                    if yes { "not " } else { "" }
                )
            }
            (Check::Cmp(_, _), Verdict::WrongType) => write!(out, "value is {kind}, not a number"),
            (Check::Cmp(cmp, limit), _) => {
                let not = if yes { "" } else { "is not " };
                write!(out, "{shown} {not}{} {limit}", cmp.symbol())
            }
            (Check::Regex(_), Verdict::WrongType) => write!(out, "value is {kind}, not a string"),
            (Check::Regex(_), _) => {
                write!(
                    out,
                    "{shown} {}",
                    if yes { "matches" } else { "does not match" }
                )
            }
            (Check::Contains(value), Verdict::WrongType) => match arg {
                Value::String(_) => write!(
                    out,
                    "value is a string, and a string can only contain a string, not {}",
                    Kind::of(value).a()
                ),
                _ => write!(out, "value is {kind}, not a string or an array"),
            },
            (Check::Contains(value), _) => {
                let does = if yes { "contains" } else { "does not contain" };
                write!(out, "{shown} {does} {value}")
            }
            (Check::Exists(_), _) => out.write_str("present"),
        };
    }
}

/// The bare type name, for "the list has no string".
fn kind_name(value: &Value) -> &'static str {
    match Kind::of(value) {
        Kind::Null => "null",
        Kind::Bool => "boolean",
        Kind::Number => "number",
        Kind::String => "string",
        Kind::Array => "array",
        Kind::Object => "object",
    }
}

/// An argument value as compact JSON, cut after [`EXPLAIN_VALUE_CHARS`]
/// characters.
fn show(value: &Value) -> String {
    let mut text = value.to_string();
    if let Some((cut, _)) = text.char_indices().nth(EXPLAIN_VALUE_CHARS) {
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

fn resolve(verdict: Verdict, wrong: WrongType) -> bool {
    match verdict {
        Verdict::Missing => false,
        Verdict::WrongType => wrong == WrongType::Holds,
        Verdict::Is(holds) => holds,
    }
}

impl Condition {
    /// Whether the condition holds for `args`, the call's `arguments` object
    /// (an absent `arguments` is passed as an empty object).
    ///
    /// A missing path does not hold (except for `exists`); a value of the
    /// wrong type counts as `wrong` says, also inside `all` and `any`. `all`
    /// and `any` stop at the first inner condition that decides them.
    ///
    /// Allocation-free (the `regex` crate sets up a per-thread matching cache
    /// on its first use and reuses it).
    pub fn holds(&self, args: &Value, wrong: WrongType) -> bool {
        match &self.node {
            Node::Test(test) => resolve(test.verdict(test.path.get(args)), wrong),
            Node::All(inner) => inner.iter().all(|c| c.holds(args, wrong)),
            Node::Any(inner) => inner.iter().any(|c| c.holds(args, wrong)),
        }
    }

    /// The same decision as [`Condition::holds`], plus one line saying why,
    /// for `policy explain`. The line shows argument values (cut to 80
    /// characters each), so it is for the operator, never the audit log:
    ///
    /// - `args.amount gt 100: 250 > 100, holds`
    /// - `args.currency in ["usd","eur"]: path missing, does not hold`
    /// - `args.amount lt 10: value is a string, not a number: wrong type, counts as holding`
    /// - `all(args.a exists: present, holds; args.b eq 1: 2 != 1, does not hold): does not hold`
    ///
    /// Unlike `holds`, `all` and `any` explain every inner condition.
    pub fn explain(&self, args: &Value, wrong: WrongType) -> (bool, String) {
        let mut out = String::new();
        let holds = self.explain_into(args, wrong, &mut out);
        (holds, out)
    }

    fn explain_into(&self, args: &Value, wrong: WrongType, out: &mut String) -> bool {
        let (name, inner, is_all) = match &self.node {
            Node::Test(test) => {
                let found = test.path.get(args);
                let verdict = test.verdict(found);
                let holds = resolve(verdict, wrong);
                let _ = write!(out, "{test}: ");
                test.describe(found, verdict, out);
                out.push_str(match (verdict, holds) {
                    (Verdict::WrongType, true) => ": wrong type, counts as holding",
                    (Verdict::WrongType, false) => ": wrong type, counts as not holding",
                    (_, true) => ", holds",
                    (_, false) => ", does not hold",
                });
                return holds;
            }
            Node::All(inner) => ("all(", inner, true),
            Node::Any(inner) => ("any(", inner, false),
        };
        out.push_str(name);
        let mut holds = is_all;
        for (i, condition) in inner.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            let one = condition.explain_into(args, wrong, out);
            holds = if is_all { holds && one } else { holds || one };
        }
        out.push_str(if holds {
            "): holds"
        } else {
            "): does not hold"
        });
        holds
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.check.op())?;
        match &self.check {
            Check::Eq(value) | Check::Neq(value) | Check::Contains(value) => write!(f, " {value}"),
            Check::In(list) | Check::NotIn(list) => {
                f.write_str(" [")?;
                for (i, item) in list.items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Check::Cmp(_, limit) => write!(f, " {limit}"),
            Check::Regex(regex) => write!(f, " {}", Value::from(regex.as_str())),
            Check::Exists(true) => Ok(()),
            Check::Exists(false) => f.write_str(" false"),
        }
    }
}

/// The condition as written, compact and without argument values, for the
/// audit reason: `args.amount gt 100`, `args.env in ["prod","staging"]`,
/// `args.name regex "^x"`, `args.a exists`, `args.a exists false`,
/// `all(args.a exists, any(args.b eq 1, args.c regex "^x"))`.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, inner) = match &self.node {
            Node::Test(test) => return fmt::Display::fmt(test, f),
            Node::All(inner) => ("all(", inner),
            Node::Any(inner) => ("any(", inner),
        };
        f.write_str(name)?;
        for (i, condition) in inner.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            fmt::Display::fmt(condition, f)?;
        }
        f.write_str(")")
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ConditionSeed { depth: 1 }.deserialize(deserializer)
    }
}

/// Reads one condition object `depth` objects deep (the outermost is 1).
struct ConditionSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ConditionSeed {
    type Value = Condition;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Condition, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ConditionSeed {
    type Value = Condition;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a condition: an object with path, op and value, or with all or any")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Condition, A::Error> {
        if self.depth > MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "conditions nest more than {MAX_DEPTH} deep"
            )));
        }
        let mut path: Option<ArgPath> = None;
        let mut op: Option<Op> = None;
        let mut value: Option<Value> = None;
        let mut group: Option<(Key, Vec<Condition>)> = None;
        while let Some(key) = map.next_key::<Key>()? {
            let seen = match key {
                Key::Path => path.is_some(),
                Key::Op => op.is_some(),
                Key::Value => value.is_some(),
                Key::All | Key::Any => group.as_ref().is_some_and(|(k, _)| *k == key),
            };
            if seen {
                return Err(de::Error::custom(format_args!(
                    "duplicate field `{}`",
                    key.name()
                )));
            }
            match key {
                Key::Path | Key::Op | Key::Value => {
                    if let Some((group_key, _)) = &group {
                        return Err(mixed(*group_key));
                    }
                }
                Key::All | Key::Any => {
                    if let Some((other, _)) = &group {
                        return Err(de::Error::custom(format_args!(
                            "a condition has `all` or `any`, not both; nest one inside the other (`{}` is already here)",
                            other.name()
                        )));
                    }
                    if path.is_some() || op.is_some() || value.is_some() {
                        return Err(mixed(key));
                    }
                }
            }
            match key {
                Key::Path => path = Some(map.next_value::<ArgPath>()?),
                Key::Op => op = Some(map.next_value::<Op>()?),
                Key::Value => {
                    let reader = mcpwarden_json::Reader::new(VALUE_OPTIONS);
                    value = Some(map.next_value_seed(reader.seed())?);
                }
                Key::All | Key::Any => {
                    let inner = map.next_value_seed(ListSeed {
                        depth: self.depth + 1,
                        key,
                    })?;
                    group = Some((key, inner));
                }
            }
        }
        match group {
            Some((Key::Any, inner)) => Ok(Condition {
                node: Node::Any(inner),
            }),
            Some((_, inner)) => Ok(Condition {
                node: Node::All(inner),
            }),
            None => {
                let path = path.ok_or_else(|| {
                    de::Error::custom(
                        "missing field `path`: a condition is {path, op, value}, {all: [...]} or {any: [...]}",
                    )
                })?;
                let op = op.ok_or_else(|| {
                    de::Error::custom(format_args!(
                        "missing field `op` for path {:?}; the ops are {OPS}",
                        path.as_str()
                    ))
                })?;
                let check = Check::new(op, value).map_err(de::Error::custom)?;
                Ok(Condition {
                    node: Node::Test(Test { path, check }),
                })
            }
        }
    }
}

/// The error for a condition with both `all`/`any` and `path`/`op`/`value`.
fn mixed<E: de::Error>(group: Key) -> E {
    E::custom(format_args!(
        "a condition has either `{0}` or path/op/value, not both; put the test inside `{0}`",
        group.name()
    ))
}

/// Reads the array of an `all` or `any`.
struct ListSeed {
    /// The depth of the conditions inside.
    depth: usize,
    key: Key,
}

impl<'de> DeserializeSeed<'de> for ListSeed {
    type Value = Vec<Condition>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed {
    type Value = Vec<Condition>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a non-empty array of conditions for `{}`",
            self.key.name()
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut inner = Vec::new();
        while let Some(condition) = seq.next_element_seed(ConditionSeed { depth: self.depth })? {
            inner.push(condition);
        }
        if inner.is_empty() {
            return Err(de::Error::custom(format_args!(
                "`{}` needs at least one condition",
                self.key.name()
            )));
        }
        Ok(inner)
    }
}

/// A key of a condition object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Path,
    Op,
    Value,
    All,
    Any,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Path => "path",
            Key::Op => "op",
            Key::Value => "value",
            Key::All => "all",
            Key::Any => "any",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of the keys path, op, value, all, any")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                match v {
                    "path" => Ok(Key::Path),
                    "op" => Ok(Key::Op),
                    "value" => Ok(Key::Value),
                    "all" => Ok(Key::All),
                    "any" => Ok(Key::Any),
                    other => Err(E::unknown_field(other, KEYS)),
                }
            }
        }
        deserializer.deserialize_identifier(V)
    }
}

impl<'de> Deserialize<'de> for ArgPath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ArgPath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path such as \"args.amount\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ArgPath, E> {
                ArgPath::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// An op as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Neq,
    In,
    NotIn,
    Lt,
    Lte,
    Gt,
    Gte,
    Regex,
    Contains,
    Exists,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Regex => "regex",
            Op::Contains => "contains",
            Op::Exists => "exists",
        }
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Op;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an op, one of {OPS}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Op, E> {
                Ok(match v {
                    "eq" => Op::Eq,
                    "neq" => Op::Neq,
                    "in" => Op::In,
                    "not_in" => Op::NotIn,
                    "lt" => Op::Lt,
                    "lte" => Op::Lte,
                    "gt" => Op::Gt,
                    "gte" => Op::Gte,
                    "regex" => Op::Regex,
                    "contains" => Op::Contains,
                    "exists" => Op::Exists,
                    other => {
                        return Err(E::custom(format_args!(
                            "unknown op {other:?}; the ops are {OPS}"
                        )))
                    }
                })
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H: WrongType = WrongType::Holds;
    const F: WrongType = WrongType::Fails;

    fn cond(text: &str) -> Condition {
        serde_json::from_str(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    /// Rows of (condition, args, how a wrong type counts, expected).
    fn check(rows: &[(&str, &str, WrongType, bool)]) {
        for (i, (text, args, wrong, want)) in rows.iter().enumerate() {
            let condition = cond(text);
            let args: Value = serde_json::from_str(args).unwrap();
            let got = condition.holds(&args, *wrong);
            let (explained, why) = condition.explain(&args, *wrong);
            assert_eq!(got, *want, "row {i}: {text} on {args} ({wrong:?}): {why}");
            assert_eq!(explained, got, "row {i}: explain disagrees: {why}");
        }
    }

    /// The message and 1-based (line, column) of a JSON load error.
    fn json_error(text: &str) -> (String, usize, usize) {
        match serde_json::from_str::<Condition>(text) {
            Ok(c) => panic!("{text} loaded as {c}"),
            Err(err) => (err.to_string(), err.line(), err.column()),
        }
    }

    fn yaml_error(text: &str) -> (String, usize, usize) {
        match serde_yaml_ng::from_str::<Condition>(text) {
            Ok(c) => panic!("{text} loaded as {c}"),
            Err(err) => {
                let at = err.location().map_or((0, 0), |l| (l.line(), l.column()));
                (err.to_string(), at.0, at.1)
            }
        }
    }

    /// Asserts a JSON load error's message and the position of the last
    /// character of the `nth` occurrence of `at`.
    fn assert_json_error(text: &str, at: &str, nth: usize, words: &str) {
        let (message, line, column) = json_error(text);
        assert!(message.contains(words), "{text}: {message}");
        let (start, _) = text
            .match_indices(at)
            .nth(nth)
            .unwrap_or_else(|| panic!("{at:?} not in {text}"));
        let last = start + at.len() - 1;
        let before = &text[..last];
        let want_line = before.matches('\n').count() + 1;
        let want_column = last - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
        assert_eq!(
            (line, column),
            (want_line, want_column),
            "{text}: {message}"
        );
    }

    /// Nests `inner` inside `levels` `all`s.
    fn nested(levels: usize, inner: &str) -> String {
        let mut text = inner.to_owned();
        for _ in 0..levels {
            text = format!("{{\"all\": [{text}]}}");
        }
        text
    }

    #[test]
    fn eq() {
        let prod = r#"{"path": "args.env", "op": "eq", "value": "prod"}"#;
        let one = r#"{"path": "args.n", "op": "eq", "value": 1}"#;
        let one_f = r#"{"path": "args.n", "op": "eq", "value": 1.0}"#;
        let max = r#"{"path": "args.n", "op": "eq", "value": 18446744073709551615}"#;
        let min = r#"{"path": "args.n", "op": "eq", "value": -9223372036854775808}"#;
        let null = r#"{"path": "args.n", "op": "eq", "value": null}"#;
        let yes = r#"{"path": "args.n", "op": "eq", "value": true}"#;
        let arr = r#"{"path": "args.n", "op": "eq", "value": [1, "a"]}"#;
        let obj = r#"{"path": "args.n", "op": "eq", "value": {"a": 1, "b": [2]}}"#;
        check(&[
            (prod, r#"{"env": "prod"}"#, F, true),
            (prod, r#"{"env": "dev"}"#, H, false),
            (prod, r#"{"env": "Prod"}"#, H, false),
            (prod, r#"{}"#, H, false),
            (prod, r#"{}"#, F, false),
            (prod, r#"{"env": 1}"#, H, true),
            (prod, r#"{"env": 1}"#, F, false),
            (prod, r#"{"env": null}"#, H, true),
            (prod, r#"{"env": ["prod"]}"#, F, false),
            (one, r#"{"n": 1}"#, F, true),
            (one, r#"{"n": 1.0}"#, F, true),
            (one, r#"{"n": 1e0}"#, F, true),
            (one, r#"{"n": 1.5}"#, H, false),
            (one, r#"{"n": "1"}"#, H, true),
            (one, r#"{"n": "1"}"#, F, false),
            (one_f, r#"{"n": 1}"#, F, true),
            (max, r#"{"n": 18446744073709551615}"#, F, true),
            (max, r#"{"n": 18446744073709551614}"#, H, false),
            (min, r#"{"n": -9223372036854775808}"#, F, true),
            (min, r#"{"n": -9223372036854775807}"#, H, false),
            (null, r#"{"n": null}"#, F, true),
            (null, r#"{"n": 0}"#, H, true),
            (null, r#"{"n": 0}"#, F, false),
            (null, r#"{}"#, H, false),
            (yes, r#"{"n": true}"#, F, true),
            (yes, r#"{"n": false}"#, H, false),
            (yes, r#"{"n": 1}"#, F, false),
            (arr, r#"{"n": [1.0, "a"]}"#, F, true),
            (arr, r#"{"n": [1, "b"]}"#, H, false),
            (arr, r#"{"n": [1]}"#, H, false),
            (arr, r#"{"n": ["a", 1]}"#, H, false),
            (obj, r#"{"n": {"b": [2.0], "a": 1}}"#, F, true),
            (obj, r#"{"n": {"a": 1}}"#, H, false),
            (obj, r#"{"n": {"a": 1, "b": [2], "c": 3}}"#, H, false),
            (obj, r#"{"n": {"a": "1", "b": [2]}}"#, H, false),
        ]);
    }

    #[test]
    fn mixed_integer_and_float_compare_as_f64() {
        // 2^53 + 1 has no f64 form: next to a float it rounds to 2^53.
        let big = r#"{"path": "args.n", "op": "eq", "value": 9007199254740993}"#;
        check(&[
            (big, r#"{"n": 9007199254740992.0}"#, F, true),
            (big, r#"{"n": 9007199254740992}"#, H, false),
        ]);
    }

    #[test]
    fn neq() {
        let prod = r#"{"path": "args.env", "op": "neq", "value": "prod"}"#;
        let one = r#"{"path": "args.n", "op": "neq", "value": 1}"#;
        check(&[
            (prod, r#"{"env": "dev"}"#, F, true),
            (prod, r#"{"env": "prod"}"#, H, false),
            (prod, r#"{}"#, H, false),
            (prod, r#"{}"#, F, false),
            (prod, r#"{"env": 7}"#, H, true),
            (prod, r#"{"env": 7}"#, F, false),
            (prod, r#"{"env": null}"#, F, false),
            (one, r#"{"n": 1.0}"#, F, false),
            (one, r#"{"n": 2}"#, F, true),
            (one, r#"{"n": -1}"#, F, true),
        ]);
    }

    #[test]
    fn in_and_not_in() {
        let envs = r#"{"path": "args.env", "op": "in", "value": ["prod", "staging"]}"#;
        let mixed = r#"{"path": "args.v", "op": "in", "value": [1, "a", null]}"#;
        let not = r#"{"path": "args.env", "op": "not_in", "value": ["prod", "staging"]}"#;
        let not_nums = r#"{"path": "args.v", "op": "not_in", "value": [1, 2]}"#;
        check(&[
            (envs, r#"{"env": "prod"}"#, F, true),
            (envs, r#"{"env": "staging"}"#, F, true),
            (envs, r#"{"env": "dev"}"#, H, false),
            (envs, r#"{}"#, H, false),
            (envs, r#"{}"#, F, false),
            (envs, r#"{"env": 1}"#, H, true),
            (envs, r#"{"env": 1}"#, F, false),
            (envs, r#"{"env": ["prod"]}"#, H, true),
            (mixed, r#"{"v": 1.0}"#, F, true),
            (mixed, r#"{"v": "a"}"#, F, true),
            (mixed, r#"{"v": null}"#, F, true),
            (mixed, r#"{"v": "b"}"#, H, false),
            (mixed, r#"{"v": 2}"#, H, false),
            (mixed, r#"{"v": true}"#, H, true),
            (mixed, r#"{"v": true}"#, F, false),
            (not, r#"{"env": "dev"}"#, F, true),
            (not, r#"{"env": "prod"}"#, H, false),
            (not, r#"{}"#, H, false),
            (not, r#"{}"#, F, false),
            (not, r#"{"env": 5}"#, H, true),
            (not, r#"{"env": 5}"#, F, false),
            (not_nums, r#"{"v": 1.0}"#, F, false),
            (not_nums, r#"{"v": 3}"#, F, true),
            (not_nums, r#"{"v": "1"}"#, F, false),
        ]);
    }

    #[test]
    fn comparisons() {
        let gt = r#"{"path": "args.amount", "op": "gt", "value": 100}"#;
        let gte = r#"{"path": "args.amount", "op": "gte", "value": 100}"#;
        let lt = r#"{"path": "args.amount", "op": "lt", "value": 10}"#;
        let lte = r#"{"path": "args.amount", "op": "lte", "value": 10}"#;
        let lt_half = r#"{"path": "args.amount", "op": "lt", "value": 0.5}"#;
        let gt_big = r#"{"path": "args.n", "op": "gt", "value": 18446744073709551614}"#;
        let lt_min = r#"{"path": "args.n", "op": "lt", "value": -9223372036854775807}"#;
        check(&[
            (gt, r#"{"amount": 250}"#, F, true),
            (gt, r#"{"amount": 100}"#, H, false),
            (gt, r#"{"amount": 100.0}"#, H, false),
            (gt, r#"{"amount": 100.5}"#, F, true),
            (gt, r#"{"amount": -250}"#, H, false),
            (gt, r#"{}"#, H, false),
            (gt, r#"{}"#, F, false),
            (gt, r#"{"amount": "250"}"#, H, true),
            (gt, r#"{"amount": "250"}"#, F, false),
            (gt, r#"{"amount": null}"#, H, true),
            (gt, r#"{"amount": null}"#, F, false),
            (gte, r#"{"amount": 100}"#, F, true),
            (gte, r#"{"amount": 99.999}"#, H, false),
            (lt, r#"{"amount": 9}"#, F, true),
            (lt, r#"{"amount": 10}"#, H, false),
            (lt, r#"{"amount": -1}"#, F, true),
            (lt, r#"{"amount": [1]}"#, H, true),
            (lte, r#"{"amount": 10}"#, F, true),
            (lte, r#"{"amount": 10.0}"#, F, true),
            (lte, r#"{"amount": 10.000001}"#, H, false),
            (lt_half, r#"{"amount": 0}"#, F, true),
            (lt_half, r#"{"amount": 1}"#, H, false),
            (gt_big, r#"{"n": 18446744073709551615}"#, F, true),
            (gt_big, r#"{"n": 18446744073709551614}"#, H, false),
            (gt_big, r#"{"n": -9223372036854775808}"#, H, false),
            (lt_min, r#"{"n": -9223372036854775808}"#, F, true),
            (lt_min, r#"{"n": 18446744073709551615}"#, H, false),
        ]);
    }

    #[test]
    fn regex() {
        let start = r#"{"path": "args.s", "op": "regex", "value": "^x"}"#;
        let anywhere = r#"{"path": "args.s", "op": "regex", "value": "b"}"#;
        let whole = r#"{"path": "args.s", "op": "regex", "value": "^b$"}"#;
        let nocase = r#"{"path": "args.s", "op": "regex", "value": "(?i)^drop\\s+table"}"#;
        let unicode = r#"{"path": "args.s", "op": "regex", "value": "^\\w+$"}"#;
        check(&[
            (start, r#"{"s": "xy"}"#, F, true),
            (start, r#"{"s": "yx"}"#, H, false),
            (start, r#"{}"#, H, false),
            (start, r#"{}"#, F, false),
            (start, r#"{"s": 5}"#, H, true),
            (start, r#"{"s": 5}"#, F, false),
            (start, r#"{"s": null}"#, H, true),
            (start, r#"{"s": ["xy"]}"#, F, false),
            (anywhere, r#"{"s": "abc"}"#, F, true),
            (whole, r#"{"s": "abc"}"#, H, false),
            (whole, r#"{"s": "b"}"#, F, true),
            (nocase, r#"{"s": "DROP  Table users"}"#, F, true),
            (nocase, r#"{"s": "select"}"#, H, false),
            (unicode, r#"{"s": "héllo"}"#, F, true),
        ]);
    }

    #[test]
    fn contains() {
        let word = r#"{"path": "args.s", "op": "contains", "value": "world"}"#;
        let empty = r#"{"path": "args.s", "op": "contains", "value": ""}"#;
        let two = r#"{"path": "args.s", "op": "contains", "value": 2}"#;
        let obj = r#"{"path": "args.s", "op": "contains", "value": {"id": 1}}"#;
        check(&[
            (word, r#"{"s": "hello world"}"#, F, true),
            (word, r#"{"s": "hello"}"#, H, false),
            (word, r#"{"s": "World"}"#, H, false),
            (word, r#"{}"#, H, false),
            (word, r#"{}"#, F, false),
            (word, r#"{"s": ["world"]}"#, F, true),
            (word, r#"{"s": ["hello world"]}"#, H, false),
            (word, r#"{"s": [1, null, "world"]}"#, F, true),
            (word, r#"{"s": []}"#, H, false),
            (word, r#"{"s": 5}"#, H, true),
            (word, r#"{"s": 5}"#, F, false),
            (word, r#"{"s": {"world": 1}}"#, H, true),
            (word, r#"{"s": {"world": 1}}"#, F, false),
            (word, r#"{"s": null}"#, H, true),
            (empty, r#"{"s": ""}"#, F, true),
            (two, r#"{"s": [1, 2.0, 3]}"#, F, true),
            (two, r#"{"s": [1, "2", 3]}"#, H, false),
            (two, r#"{"s": "123"}"#, H, true),
            (two, r#"{"s": "123"}"#, F, false),
            (obj, r#"{"s": [{"id": 2}, {"id": 1.0}]}"#, F, true),
            (obj, r#"{"s": [{"id": 1, "x": 0}]}"#, H, false),
        ]);
    }

    #[test]
    fn exists() {
        let present = r#"{"path": "args.a.b", "op": "exists"}"#;
        let explicit = r#"{"path": "args.a.b", "op": "exists", "value": true}"#;
        let absent = r#"{"path": "args.a.b", "op": "exists", "value": false}"#;
        check(&[
            (present, r#"{"a": {"b": 1}}"#, F, true),
            (present, r#"{"a": {"b": null}}"#, F, true),
            (present, r#"{"a": {}}"#, H, false),
            (present, r#"{"a": 5}"#, H, false),
            (present, r#"{}"#, H, false),
            (explicit, r#"{"a": {"b": "x"}}"#, F, true),
            (explicit, r#"{}"#, H, false),
            (absent, r#"{}"#, F, true),
            (absent, r#"{"a": null}"#, F, true),
            (absent, r#"{"a": {"b": null}}"#, H, false),
            (absent, r#"{"a": {"b": false}}"#, H, false),
        ]);
    }

    #[test]
    fn paths_and_array_indexing() {
        let id = r#"{"path": "args.items.0.id", "op": "eq", "value": "a"}"#;
        let second = r#"{"path": "args.items.1", "op": "exists"}"#;
        let leading_zero = r#"{"path": "args.items.01", "op": "eq", "value": 2}"#;
        let huge = r#"{"path": "args.m.99999999999999999999999", "op": "exists"}"#;
        let minus = r#"{"path": "args.m.-1", "op": "exists"}"#;
        let plus = r#"{"path": "args.m.+1", "op": "exists"}"#;
        let into_string = r#"{"path": "args.s.0", "op": "exists"}"#;
        let key = r#"{"path": "args.items.x", "op": "exists"}"#;
        check(&[
            (id, r#"{"items": [{"id": "a"}]}"#, F, true),
            (id, r#"{"items": [{"id": "b"}, {"id": "a"}]}"#, H, false),
            (id, r#"{"items": []}"#, H, false),
            (id, r#"{"items": {"0": {"id": "a"}}}"#, F, true),
            (id, r#"{"items": "a"}"#, H, false),
            (id, r#"{"items": [[{"id": "a"}]]}"#, H, false),
            (second, r#"{"items": [1, 2]}"#, F, true),
            (second, r#"{"items": [1]}"#, H, false),
            (leading_zero, r#"{"items": [1, 2]}"#, F, true),
            (leading_zero, r#"{"items": {"01": 2}}"#, F, true),
            (leading_zero, r#"{"items": {"1": 2}}"#, H, false),
            (huge, r#"{"m": [1]}"#, H, false),
            (huge, r#"{"m": {"99999999999999999999999": 1}}"#, F, true),
            (minus, r#"{"m": [1]}"#, H, false),
            (minus, r#"{"m": {"-1": 1}}"#, F, true),
            (plus, r#"{"m": [1, 2]}"#, H, false),
            (plus, r#"{"m": {"+1": 1}}"#, F, true),
            (into_string, r#"{"s": "abc"}"#, H, false),
            (into_string, r#"{"s": null}"#, H, false),
            (key, r#"{"items": [1]}"#, H, false),
            (key, r#"{"items": {"x": 1}}"#, F, true),
            // A top-level non-object never has the key.
            (key, r#"null"#, H, false),
        ]);
    }

    #[test]
    fn all_and_any() {
        let both = r#"{"all": [
            {"path": "args.a", "op": "exists"},
            {"path": "args.b", "op": "eq", "value": 1}]}"#;
        let either = r#"{"any": [
            {"path": "args.a", "op": "exists"},
            {"path": "args.b", "op": "eq", "value": 1}]}"#;
        let nested = r#"{"all": [
            {"path": "args.a", "op": "exists"},
            {"any": [
                {"path": "args.b", "op": "eq", "value": 1},
                {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#;
        let absent_or_small = r#"{"any": [
            {"path": "args.n", "op": "exists", "value": false},
            {"path": "args.n", "op": "lte", "value": 10}]}"#;
        check(&[
            (both, r#"{"a": 0, "b": 1}"#, F, true),
            (both, r#"{"a": 0, "b": 2}"#, H, false),
            (both, r#"{"b": 1}"#, H, false),
            (both, r#"{"a": 0, "b": "1"}"#, H, true),
            (both, r#"{"a": 0, "b": "1"}"#, F, false),
            (either, r#"{"a": 0}"#, F, true),
            (either, r#"{"b": 1}"#, F, true),
            (either, r#"{"b": 2}"#, H, false),
            (either, r#"{}"#, H, false),
            (either, r#"{"b": "1"}"#, H, true),
            (either, r#"{"b": "1"}"#, F, false),
            (nested, r#"{"a": 0, "c": "xyz"}"#, F, true),
            (nested, r#"{"a": 0, "b": 1}"#, F, true),
            (nested, r#"{"a": 0, "b": 2, "c": "y"}"#, H, false),
            (nested, r#"{"b": 1, "c": "x"}"#, H, false),
            (nested, r#"{"a": 0, "c": 7}"#, H, true),
            (nested, r#"{"a": 0, "c": 7}"#, F, false),
            (absent_or_small, r#"{}"#, F, true),
            (absent_or_small, r#"{"n": 3}"#, F, true),
            (absent_or_small, r#"{"n": 30}"#, H, false),
            (absent_or_small, r#"{"n": "3"}"#, F, false),
        ]);
    }

    #[test]
    fn depth_limit() {
        let leaf = r#"{"path": "args.a", "op": "exists"}"#;
        let deepest = cond(&nested(MAX_DEPTH - 1, leaf));
        assert!(deepest.holds(&json!({"a": 1}), F));
        let text = nested(MAX_DEPTH, leaf);
        assert_json_error(&text, "{", MAX_DEPTH, "conditions nest more than 32 deep");

        let mut value = String::from("1");
        for _ in 0..MAX_VALUE_DEPTH {
            value = format!("[{value}]");
        }
        let ok = format!(r#"{{"path": "args.a", "op": "eq", "value": {value}}}"#);
        assert_eq!(cond(&ok).to_string().matches('[').count(), MAX_VALUE_DEPTH);
        let deep = format!(r#"{{"path": "args.a", "op": "eq", "value": [{value}]}}"#);
        assert_json_error(&deep, "[", MAX_VALUE_DEPTH, "more than 64 deep");
    }

    #[test]
    fn json_load_errors() {
        let rows: &[(&str, &str, usize, &str)] = &[
            (
                r#"{"path": "args.a", "op": "foo", "value": 1}"#,
                "\"foo\"",
                0,
                "unknown op \"foo\"; the ops are eq, neq, in, not_in, lt, lte, gt, gte, regex, contains, exists",
            ),
            (
                "{\n  \"path\": \"args.a\",\n  \"op\": \"lt\",\n  \"value\": \"x\"\n}",
                "}",
                0,
                "op lt compares numbers: its value must be a number, not a string",
            ),
            (
                r#"{"path": "args", "op": "exists"}"#,
                "\"args\"",
                0,
                "path \"args\" must be \"args.\" and an argument name",
            ),
            (r#"{"path": "arg.x", "op": "exists"}"#, "\"arg.x\"", 0, "must be \"args.\""),
            (r#"{"path": "argsx", "op": "exists"}"#, "\"argsx\"", 0, "must be \"args.\""),
            (r#"{"path": "x.args.a", "op": "exists"}"#, "\"x.args.a\"", 0, "must be"),
            (r#"{"path": "", "op": "exists"}"#, "\"\"", 0, "must be \"args.\""),
            (
                r#"{"path": "args..x", "op": "exists"}"#,
                "\"args..x\"",
                0,
                "path \"args..x\" has an empty segment",
            ),
            (r#"{"path": "args.x.", "op": "exists"}"#, "\"args.x.\"", 0, "empty segment"),
            (r#"{"path": "args.", "op": "exists"}"#, "\"args.\"", 0, "empty segment"),
            (
                r#"{"path": "args.a\nb", "op": "exists"}"#,
                "\"args.a\\nb\"",
                0,
                "path \"args.a\\nb\" contains a control character",
            ),
            (r#"{"path": 5, "op": "exists"}"#, "5", 0, "invalid type: integer `5`"),
            (r#"{"path": "args.a", "op": ["eq"]}"#, "\"op\": ", 0, "invalid type: sequence"),
            (
                r#"{"path": "args.a", "op": "eq", "vlue": 1}"#,
                "\"vlue\"",
                0,
                "unknown field `vlue`, expected one of `path`, `op`, `value`, `all`, `any`",
            ),
            (
                r#"{"path": "args.a", "path": "args.b", "op": "exists"}"#,
                "\"path\"",
                1,
                "duplicate field `path`",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}], "all": []}"#,
                "\"all\"",
                1,
                "duplicate field `all`",
            ),
            (
                r#"{"path": "args.a", "op": "eq", "value": 1, "value": 2}"#,
                "\"value\"",
                1,
                "duplicate field `value`",
            ),
            (
                r#"{"path": "args.a", "all": [{"path": "args.a", "op": "exists"}]}"#,
                "\"all\"",
                0,
                "a condition has either `all` or path/op/value, not both",
            ),
            (
                r#"{"any": [{"path": "args.a", "op": "exists"}], "op": "eq"}"#,
                "\"op\"",
                1,
                "a condition has either `any` or path/op/value, not both",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}], "any": []}"#,
                "\"any\"",
                0,
                "a condition has `all` or `any`, not both",
            ),
            (r#"{"all": []}"#, "]", 0, "`all` needs at least one condition"),
            (r#"{"any": {}}"#, "\"any\": ", 0, "a non-empty array of conditions for `any`"),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": []}]}"#,
                "]",
                0,
                "`any` needs at least one condition",
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}, {"path": "args.b"}]}"#,
                "}",
                1,
                "missing field `op` for path \"args.b\"",
            ),
            (r#"{"op": "eq", "value": 1}"#, "}", 0, "missing field `path`"),
            (r#"{}"#, "}", 0, "missing field `path`"),
            (r#"{"all": [[1]]}"#, "\"all\": [", 0, "invalid type: sequence, expected a condition"),
            (r#"{"any": ["args.a"]}"#, "\"args.a\"", 0, "invalid type: string"),
            (r#"{"path": "args.a", "op": "eq"}"#, "}", 0, "op eq needs a value"),
            (r#"{"path": "args.a", "op": "contains"}"#, "}", 0, "op contains needs a value"),
            (r#"{"path": "args.a", "op": "in", "value": []}"#, "}", 0, "op in needs a non-empty array"),
            (
                r#"{"path": "args.a", "op": "not_in", "value": "prod"}"#,
                "}",
                0,
                "op not_in needs a non-empty array of values, not a string",
            ),
            (r#"{"path": "args.a", "op": "gte", "value": null}"#, "}", 0, "op gte compares numbers"),
            (r#"{"path": "args.a", "op": "gt", "value": "100"}"#, "}", 0, "op gt compares numbers"),
            (
                r#"{"path": "args.a", "op": "regex", "value": 5}"#,
                "}",
                0,
                "op regex needs a string (a regular expression) as its value, not a number",
            ),
            (
                r#"{"path": "args.a", "op": "regex", "value": "a("}"#,
                "}",
                0,
                "op regex: invalid regex \"a(\": regex parse error",
            ),
            (
                r#"{"path": "args.a", "op": "regex", "value": "(?:a{1000}){1000}"}"#,
                "\"}",
                0,
                "exceeds size limit",
            ),
            (
                r#"{"path": "args.a", "op": "exists", "value": "yes"}"#,
                "}",
                0,
                "op exists takes value true or false (or no value), not a string",
            ),
            (r#"{"path": "args.a", "op": "exists", "value": null}"#, "}", 0, "not null"),
            (
                r#"{"path": "args.a", "op": "eq", "value": {"k": 1, "k": 2}}"#,
                "\"k\"",
                1,
                "duplicate key \"k\" in value",
            ),
        ];
        for (text, at, nth, words) in rows {
            assert_json_error(text, at, *nth, words);
        }
    }

    #[test]
    fn yaml_load_errors() {
        let rows: &[(&str, (usize, usize), &str)] = &[
            (
                "path: args.a\nop: foo\nvalue: 1\n",
                (2, 5),
                "unknown op \"foo\"; the ops are eq, neq",
            ),
            (
                "all:\n  - path: args.a\n    op: eq\n    vlue: 1\n",
                (4, 5),
                "unknown field `vlue`, expected one of `path`, `op`, `value`, `all`, `any`",
            ),
            (
                "any:\n  - path: args..a\n    op: exists\n",
                (2, 11),
                "path \"args..a\" has an empty segment",
            ),
            (
                "path: args.a\nop: eq\nvalue: .nan\n",
                (3, 8),
                "NaN is not a JSON number: numbers must be finite",
            ),
            (
                "path: args.a\nop: lt\nvalue: -.inf\n",
                (3, 8),
                "-inf is not a JSON number",
            ),
            ("all: []\n", (1, 6), "`all` needs at least one condition"),
        ];
        for (text, at, words) in rows {
            let (message, line, column) = yaml_error(text);
            assert!(message.contains(words), "{text}: {message}");
            assert_eq!((line, column), *at, "{text}: {message}");
        }
        // Checks made when the object ends point at the object.
        let (message, line, column) = yaml_error("path: args.a\nop: gt\nvalue: x\n");
        assert!(message.contains("op gt compares numbers"), "{message}");
        assert_eq!((line, column), (1, 1), "{message}");
    }

    #[test]
    fn yaml_loads() {
        let text = "any:\n  - path: args.env\n    op: in\n    value: [prod, staging]\n  - all:\n      - path: args.amount\n        op: gte\n        value: 1.5e3\n      - path: args.note\n        op: exists\n        value: false\n";
        let condition: Condition = serde_yaml_ng::from_str(text).unwrap();
        assert_eq!(
            condition.to_string(),
            r#"any(args.env in ["prod","staging"], all(args.amount gte 1500.0, args.note exists false))"#
        );
        assert!(condition.holds(&json!({"env": "prod"}), F));
        assert!(condition.holds(&json!({"amount": 1500}), F));
        assert!(!condition.holds(&json!({"amount": 1500, "note": "x"}), F));
        assert!(!condition.holds(&json!({"amount": 1499}), F));
    }

    #[test]
    fn display() {
        let rows = [
            (
                r#"{"path": "args.amount", "op": "gt", "value": 100}"#,
                "args.amount gt 100",
            ),
            (
                r#"{"path": "args.env", "op": "in", "value": ["prod", "staging"]}"#,
                r#"args.env in ["prod","staging"]"#,
            ),
            (
                r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": [{"path": "args.b", "op": "eq", "value": 1}, {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#,
                r#"all(args.a exists, any(args.b eq 1, args.c regex "^x"))"#,
            ),
            (
                r#"{"path": "args.a", "op": "exists", "value": false}"#,
                "args.a exists false",
            ),
            (
                r#"{"path": "args.a", "op": "exists", "value": true}"#,
                "args.a exists",
            ),
            (
                r#"{"path": "args.n", "op": "neq", "value": 1.0}"#,
                "args.n neq 1.0",
            ),
            (
                r#"{"path": "args.n", "op": "lte", "value": -3}"#,
                "args.n lte -3",
            ),
            (
                r#"{"path": "args.s", "op": "regex", "value": "\\d+\"$"}"#,
                r#"args.s regex "\\d+\"$""#,
            ),
            (
                r#"{"path": "args.s", "op": "contains", "value": {"id": [1, null]}}"#,
                r#"args.s contains {"id":[1,null]}"#,
            ),
            (
                r#"{"path": "args.s", "op": "not_in", "value": [1]}"#,
                "args.s not_in [1]",
            ),
        ];
        for (text, shown) in rows {
            assert_eq!(cond(text).to_string(), shown);
        }
    }

    #[test]
    fn explain() {
        let gt = cond(r#"{"path": "args.amount", "op": "gt", "value": 100}"#);
        let currency = cond(r#"{"path": "args.currency", "op": "in", "value": ["usd", "eur"]}"#);
        let lt = cond(r#"{"path": "args.amount", "op": "lt", "value": 10}"#);
        let env = cond(r#"{"path": "args.env", "op": "neq", "value": "prod"}"#);
        let note = cond(r#"{"path": "args.note", "op": "exists", "value": false}"#);
        let rows = [
            (
                &gt,
                json!({"amount": 250}),
                H,
                true,
                "args.amount gt 100: 250 > 100, holds",
            ),
            (
                &gt,
                json!({"amount": 50}),
                H,
                false,
                "args.amount gt 100: 50 is not > 100, does not hold",
            ),
            (
                &currency,
                json!({}),
                F,
                false,
                r#"args.currency in ["usd","eur"]: path missing, does not hold"#,
            ),
            (
                &currency,
                json!({"currency": "gbp"}),
                F,
                false,
                r#"args.currency in ["usd","eur"]: "gbp" is not in the list, does not hold"#,
            ),
            (
                &currency,
                json!({"currency": 1}),
                F,
                false,
                r#"args.currency in ["usd","eur"]: value is a number, and the list has no number: wrong type, counts as not holding"#,
            ),
            (
                &lt,
                json!({"amount": "5"}),
                H,
                true,
                "args.amount lt 10: value is a string, not a number: wrong type, counts as holding",
            ),
            (
                &env,
                json!({"env": "prod"}),
                H,
                false,
                r#"args.env neq "prod": "prod" == "prod", does not hold"#,
            ),
            (
                &note,
                json!({}),
                F,
                true,
                "args.note exists false: path missing, holds",
            ),
            (
                &note,
                json!({"note": null}),
                F,
                false,
                "args.note exists false: present, does not hold",
            ),
        ];
        for (condition, args, wrong, holds, why) in rows {
            assert_eq!(condition.explain(&args, wrong), (holds, why.to_owned()));
        }

        let nested = cond(
            r#"{"all": [{"path": "args.a", "op": "exists"}, {"any": [{"path": "args.b", "op": "eq", "value": 1}, {"path": "args.c", "op": "regex", "value": "^x"}]}]}"#,
        );
        assert_eq!(
            nested.explain(&json!({"a": 0, "b": 2, "c": "xy"}), F),
            (
                true,
                r#"all(args.a exists: present, holds; any(args.b eq 1: 2 != 1, does not hold; args.c regex "^x": "xy" matches, holds): holds): holds"#
                    .to_owned()
            )
        );

        let long = "é".repeat(200);
        let (holds, why) = cond(r#"{"path": "args.s", "op": "contains", "value": "x"}"#)
            .explain(&json!({ "s": long }), H);
        assert!(!holds);
        let shown = format!("\"{}...", "é".repeat(EXPLAIN_VALUE_CHARS - 1));
        assert_eq!(
            why,
            format!(r#"args.s contains "x": {shown} does not contain "x", does not hold"#)
        );
    }

    #[test]
    fn keys_may_come_in_any_order() {
        let condition = cond(r#"{"value": [1, 2], "op": "in", "path": "args.n"}"#);
        assert_eq!(condition.to_string(), "args.n in [1,2]");
        assert!(condition.holds(&json!({"n": 2}), F));
    }
}
