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

/// Compares two numbers exactly: integers as integers, an integer and a float without
/// rounding the integer to `f64` (2^53 + 1 is more than 2^53 as a float), floats as `f64`.
/// `None` only if a number has no `f64` form (not possible for parsed JSON).
fn num_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    match (integer(a), integer(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        (Some(x), None) => int_float_cmp(x, b.as_f64()?),
        (None, Some(y)) => int_float_cmp(y, a.as_f64()?).map(Ordering::reverse),
        (None, None) => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// An integer against a float, exactly.
fn int_float_cmp(x: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Every i128 that JSON gives (64 bits) lies well inside ±2^100.
    const BOUND: f64 = 1e30;
    if f >= BOUND {
        return Some(Ordering::Less);
    }
    if f <= -BOUND {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    // |floor| < 1e30 < 2^127, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    let whole = floor as i128;
    Some(match x.cmp(&whole) {
        Ordering::Equal if f > floor => Ordering::Less,
        other => other,
    })
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
    /// Every argument path this condition reads, inner conditions included.
    pub fn paths<'a>(&'a self, out: &mut Vec<&'a ArgPath>) {
        match &self.node {
            Node::Test(test) => out.push(&test.path),
            Node::All(inner) | Node::Any(inner) => inner.iter().for_each(|c| c.paths(out)),
        }
    }

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

mod parse;
#[cfg(test)]
mod tests;
