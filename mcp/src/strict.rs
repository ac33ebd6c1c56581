//! A strict JSON reader: builds a `serde_json::Value` and reports the first
//! object key that a server might read differently from us.
//!
//! `serde_json::Value` keeps the last of two equal keys; other parsers keep
//! the first, and Go's `encoding/json` matches keys to fields ignoring letter
//! case. A document in which one object has two keys that are equal, or equal
//! but for letter case, can therefore mean one thing to the policy and another
//! to the server, so the caller refuses it. The reader records the first such
//! clash and carries on, so that a syntax error later in the document still
//! wins (it is reported as a parse error) and the message id can still be
//! read for the error response.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::canonical::write_string;

/// Two keys of one object that a server may not tell apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyClash {
    /// Path from the document root to the object holding both keys: object
    /// keys and array indices.
    pub path: Vec<String>,
    /// The key seen first.
    pub first: String,
    /// The key seen second; equal to `first` for an exact duplicate.
    pub second: String,
}

impl KeyClash {
    /// A sentence naming the keys and where they are, as a JSON Pointer.
    pub fn describe(&self) -> String {
        let mut pointer = String::new();
        for segment in &self.path {
            pointer.push('/');
            pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
        }
        if pointer.is_empty() {
            pointer.push('/');
        }
        let mut first = String::new();
        write_string(&self.first, &mut first);
        if self.first == self.second {
            format!("duplicate key {first} in the object at {pointer}")
        } else {
            let mut second = String::new();
            write_string(&self.second, &mut second);
            format!(
                "keys {first} and {second} in the object at {pointer} differ only in letter case, \
                 and some servers treat them as one key"
            )
        }
    }
}

/// A parsed document and the first key clash in it, if any.
#[derive(Debug)]
pub(crate) struct StrictDocument {
    /// The document; of two clashing keys only the first is kept.
    pub value: Value,
    pub clash: Option<KeyClash>,
}

/// Parses one JSON document (surrounding whitespace allowed), recording key
/// clashes. Errors are syntax errors, including nesting deeper than
/// `serde_json`'s limit of 128 levels.
pub(crate) fn parse(text: &str) -> Result<StrictDocument, serde_json::Error> {
    let state = State::default();
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = Seed { state: &state }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(StrictDocument {
        value,
        clash: state.clash.into_inner(),
    })
}

/// Folds a key the way a case-insensitive matcher would: each character to
/// one representative of its case class (`METHOD`, `Method` and `method` fold
/// alike, as do `ſ` and `s`, and the Kelvin sign and `k`). It errs towards
/// folding more characters together than Go does, which only refuses more.
pub(crate) fn fold_key(key: &str) -> String {
    key.chars().map(fold_char).collect()
}

fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    let upper = single(c.to_uppercase()).unwrap_or(c);
    single(upper.to_lowercase()).unwrap_or(upper)
}

/// The only item of an iterator, or `None` when it has zero or several.
fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
    let first = chars.next()?;
    match chars.next() {
        Some(_) => None,
        None => Some(first),
    }
}

#[derive(Default)]
struct State {
    /// Keys and indices from the root to the value being read.
    path: RefCell<Vec<String>>,
    clash: RefCell<Option<KeyClash>>,
}

impl State {
    fn enter(&self, segment: String) {
        self.path.borrow_mut().push(segment);
    }

    fn leave(&self) {
        self.path.borrow_mut().pop();
    }

    fn record(&self, first: &str, second: &str) {
        let mut clash = self.clash.borrow_mut();
        if clash.is_none() {
            *clash = Some(KeyClash {
                path: self.path.borrow().clone(),
                first: first.to_owned(),
                second: second.to_owned(),
            });
        }
    }
}

#[derive(Clone, Copy)]
struct Seed<'s> {
    state: &'s State,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            self.state.enter(items.len().to_string());
            let item = seq.next_element_seed(self);
            self.state.leave();
            match item? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        // Folded key -> the key as written, to name both sides of a clash.
        let mut folded: HashMap<String, String> = HashMap::new();
        while let Some(key) = access.next_key::<String>()? {
            let folded_key = fold_key(&key);
            let fresh = if map.contains_key(&key) {
                self.state.record(&key, &key);
                false
            } else if let Some(earlier) = folded.get(&folded_key) {
                self.state.record(earlier, &key);
                false
            } else {
                folded.insert(folded_key, key.clone());
                true
            };
            self.state.enter(key.clone());
            let value = access.next_value_seed(self);
            self.state.leave();
            let value = value?;
            if fresh {
                map.insert(key, value);
            }
        }
        Ok(Value::Object(map))
    }
}
