//! Reading conditions: the `Deserialize` impls, which check and compile each condition while
//! the policy is read, so that the parser attaches the line and column to every error.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::{Check, Condition, Node, Op, Test, KEYS, MAX_DEPTH, OPS, VALUE_OPTIONS};
use crate::args::ArgPath;

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
