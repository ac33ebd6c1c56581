//! The strict JSON reader: builds a `serde_json::Value` from any serde
//! deserializer and deals with object keys that a server might read
//! differently from us.
//!
//! `serde_json::Value` keeps the last of two equal keys; other parsers keep
//! the first, and Go's `encoding/json` matches keys to fields ignoring letter
//! case. A document in which one object has two keys that are equal, or equal
//! but for letter case, can therefore mean one thing to the policy and another
//! to the server. Two ways to deal with them ([`OnClash`]):
//! - the MCP parser ([`parse`]) records the first such clash and carries on,
//!   so that a syntax error later in the document still wins (it is reported
//!   as a parse error) and the message id can still be read for the error
//!   response; the caller then refuses the document;
//! - the policy loader refuses an exact duplicate at once, so that the
//!   parser attaches the line and column to the error.
//!
//! Either way, non-finite floats (YAML `.nan`, `.inf`) and integers beyond
//! 64 bits are errors instead of being dropped or turned into null, and
//! nesting may be capped ([`Options::max_depth`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::canonical::write_string;

/// Two keys of one object that a server may not tell apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClash {
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
pub struct StrictDocument {
    /// The document; of two clashing keys only the first is kept.
    pub value: Value,
    pub clash: Option<KeyClash>,
}

/// Parses one JSON document (surrounding whitespace allowed), recording key
/// clashes. Errors are syntax errors, including nesting deeper than
/// `serde_json`'s limit of 128 levels.
pub fn parse(text: &str) -> Result<StrictDocument, serde_json::Error> {
    let reader = Reader::new(Options {
        on_clash: OnClash::Record,
        max_depth: None,
    });
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = reader.seed().deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(StrictDocument {
        value,
        clash: reader.into_clash(),
    })
}

/// Folds a key the way a case-insensitive matcher would: each character to
/// one representative of its case class (`METHOD`, `Method` and `method` fold
/// alike, as do `ſ` and `s`, and the Kelvin sign and `k`). It errs towards
/// folding more characters together than Go does, which only refuses more.
pub fn fold_key(key: &str) -> String {
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

/// What the reader does with two keys of one object that a server may not
/// tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClash {
    /// Keys that are equal, or equal but for letter case (see [`fold_key`]):
    /// the first such pair in the document is recorded ([`Reader::into_clash`]),
    /// the second key and its value are dropped, and reading carries on.
    Record,
    /// An exact duplicate key is the error `duplicate key "k" in value`. Keys
    /// that differ in letter case are different keys.
    RejectDuplicates,
}

/// How strictly a [`Reader`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub on_clash: OnClash,
    /// How deep arrays and objects may nest (the value read counts as 1); deeper
    /// is the error `value nests arrays and objects more than N deep`. `None`
    /// sets no cap of its own (`serde_json` stops at 128 levels anyway).
    pub max_depth: Option<usize>,
}

/// One strict read: its options and, for [`OnClash::Record`], where it is and
/// the first clash so far. Read a value with [`Reader::seed`].
#[derive(Debug)]
pub struct Reader {
    options: Options,
    /// Keys and indices from the root to the value being read (only kept for
    /// [`OnClash::Record`]).
    path: RefCell<Vec<String>>,
    clash: RefCell<Option<KeyClash>>,
}

impl Reader {
    /// A reader with nothing read yet.
    pub fn new(options: Options) -> Reader {
        Reader {
            options,
            path: RefCell::new(Vec::new()),
            clash: RefCell::new(None),
        }
    }

    /// The seed that reads one value, at depth 1.
    pub fn seed(&self) -> ValueSeed<'_> {
        ValueSeed {
            reader: self,
            depth: 1,
        }
    }

    /// The first key clash recorded ([`OnClash::Record`] only).
    pub fn into_clash(self) -> Option<KeyClash> {
        self.clash.into_inner()
    }

    fn recording(&self) -> bool {
        self.options.on_clash == OnClash::Record
    }

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

/// Reads one value `depth` arrays and objects deep, as its [`Reader`] says.
#[derive(Clone, Copy)]
pub struct ValueSeed<'r> {
    reader: &'r Reader,
    depth: usize,
}

impl ValueSeed<'_> {
    fn inner(self) -> Self {
        ValueSeed {
            reader: self.reader,
            depth: self.depth + 1,
        }
    }

    fn check_depth<E: de::Error>(&self) -> Result<(), E> {
        match self.reader.options.max_depth {
            Some(max) if self.depth > max => Err(E::custom(format_args!(
                "value nests arrays and objects more than {max} deep"
            ))),
            _ => Ok(()),
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(i) = i64::try_from(v) {
            Ok(Value::from(i))
        } else if let Ok(u) = u64::try_from(v) {
            Ok(Value::from(u))
        } else {
            Err(E::custom(format_args!(
                "integer {v} is out of range: integers must fit 64 bits"
            )))
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(u) => Ok(Value::from(u)),
            Err(_) => Err(E::custom(format_args!(
                "integer {v} is out of range: integers must fit 64 bits"
            ))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        match Number::from_f64(v) {
            Some(n) => Ok(Value::Number(n)),
            None => Err(E::custom(format_args!(
                "{v} is not a JSON number: numbers must be finite"
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.check_depth()?;
        let recording = self.reader.recording();
        let mut items = Vec::new();
        loop {
            if recording {
                self.reader.enter(items.len().to_string());
            }
            let item = seq.next_element_seed(self.inner());
            if recording {
                self.reader.leave();
            }
            match item? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        self.check_depth()?;
        match self.reader.options.on_clash {
            OnClash::Record => self.record_clashes(access),
            OnClash::RejectDuplicates => {
                let mut object = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if object.contains_key(&key) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate key {key:?} in value"
                        )));
                    }
                    let item = access.next_value_seed(self.inner())?;
                    object.insert(key, item);
                }
                Ok(Value::Object(object))
            }
        }
    }
}

impl ValueSeed<'_> {
    /// The rest of `visit_map` for [`OnClash::Record`].
    fn record_clashes<'de, A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let reader = self.reader;
        let mut map = Map::new();
        // Folded key -> the key as written, to name both sides of a clash.
        let mut folded: HashMap<String, String> = HashMap::new();
        while let Some(key) = access.next_key::<String>()? {
            let folded_key = fold_key(&key);
            let fresh = if map.contains_key(&key) {
                reader.record(&key, &key);
                false
            } else if let Some(earlier) = folded.get(&folded_key) {
                reader.record(earlier, &key);
                false
            } else {
                folded.insert(folded_key, key.clone());
                true
            };
            reader.enter(key.clone());
            let value = access.next_value_seed(self.inner());
            reader.leave();
            let value = value?;
            if fresh {
                map.insert(key, value);
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, on_clash: OnClash, max_depth: Option<usize>) -> Result<Value, String> {
        let reader = Reader::new(Options {
            on_clash,
            max_depth,
        });
        let mut deserializer = serde_json::Deserializer::from_str(text);
        reader
            .seed()
            .deserialize(&mut deserializer)
            .map_err(|err| err.to_string())
    }

    #[test]
    fn record_keeps_the_first_key_and_names_the_first_clash() {
        let document = parse(r#"{"a":[{"id":1,"ID":2}],"b":1,"b":2}"#).unwrap();
        assert_eq!(
            document.value,
            serde_json::json!({"a": [{"id": 1}], "b": 1})
        );
        let clash = document.clash.unwrap();
        assert_eq!(clash.path, ["a", "0"]);
        assert_eq!((clash.first.as_str(), clash.second.as_str()), ("id", "ID"));
    }

    #[test]
    fn reject_duplicates_refuses_exact_duplicates_only() {
        let err = read(r#"{"k":1,"k":2}"#, OnClash::RejectDuplicates, None).unwrap_err();
        assert!(err.starts_with("duplicate key \"k\" in value"), "{err}");
        let value = read(r#"{"k":1,"K":2}"#, OnClash::RejectDuplicates, None).unwrap();
        assert_eq!(value, serde_json::json!({"k": 1, "K": 2}));
    }

    #[test]
    fn depth_is_capped_when_asked() {
        assert!(read("[[1]]", OnClash::RejectDuplicates, Some(2)).is_ok());
        let err = read("[[[1]]]", OnClash::RejectDuplicates, Some(2)).unwrap_err();
        assert!(
            err.starts_with("value nests arrays and objects more than 2 deep"),
            "{err}"
        );
        assert!(read("[[[1]]]", OnClash::Record, None).is_ok());
    }
}
