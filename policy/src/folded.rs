//! Argument keys that a case-insensitive server would read as a name the policy checks.
//!
//! Go's `encoding/json` binds `{"Amount": 5000}` to a field tagged `amount`. A policy that
//! checks `args.amount` sees no `amount` in that call (a missing path, or a schema property
//! left out), while the server reads 5000. So a call whose arguments hold, at any depth, a key
//! that equals a checked name only when case-folded is refused. Two keys of one object that
//! fold alike are refused by the MCP parser already; this catches the key that appears alone.
//!
//! The names are the policy's, not one rule's: a key near any checked name is refused for every
//! tool, which may refuse a call that one rule alone would not, never the other way round.

use std::collections::{HashMap, HashSet};

use mcpwarden_json::fold_key;
use serde_json::Value;

use super::load::{Checks, ToolRule};

/// The names a policy checks: condition paths, `increment_from` paths, schema properties.
#[derive(Debug, Clone, Default)]
pub(crate) struct CheckedNames {
    exact: HashSet<String>,
    /// Folded form to one name that folds to it, for the reason.
    folded: HashMap<String, String>,
}

impl CheckedNames {
    pub fn new(all_tools: &Checks, rules: &[ToolRule]) -> CheckedNames {
        let mut names = CheckedNames::default();
        let mut paths = Vec::new();
        for checks in std::iter::once(all_tools).chain(rules.iter().map(|r| &r.checks)) {
            for condition in checks.deny_if.iter().chain(&checks.require) {
                condition.paths(&mut paths);
            }
            paths.extend(checks.limits.iter().filter_map(|l| l.increment.as_ref()));
        }
        for key in paths.iter().flat_map(|p| p.keys()) {
            names.add(key);
        }
        for schema in rules.iter().filter_map(|r| r.arguments.as_ref()) {
            for name in &schema.1 {
                names.add(name);
            }
        }
        names
    }

    fn add(&mut self, name: &str) {
        if self.exact.insert(name.to_owned()) {
            self.folded
                .entry(fold_key(name))
                .or_insert_with(|| name.to_owned());
        }
    }

    /// The first key in `args` (depth first) that is not a checked name but folds to one, with
    /// that name.
    pub fn near_miss<'a>(&'a self, args: &'a Value) -> Option<(&'a str, &'a str)> {
        if self.folded.is_empty() {
            return None;
        }
        match args {
            Value::Object(map) => map.iter().find_map(|(key, value)| {
                let near = (!self.exact.contains(key))
                    .then(|| self.folded.get(&fold_key(key)))
                    .flatten();
                match near {
                    Some(name) => Some((key.as_str(), name.as_str())),
                    None => self.near_miss(value),
                }
            }),
            Value::Array(items) => items.iter().find_map(|v| self.near_miss(v)),
            _ => None,
        }
    }
}
