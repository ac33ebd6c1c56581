//! Tool-name patterns: `*` matches any run of characters (including none); every other
//! character matches itself.
//!
//! Written here rather than taken from a glob crate because the policy needs two things glob
//! libraries do not give: an order between patterns (a longer literal prefix wins) and a test
//! of whether two patterns can match a common name (two patterns that tie on prefix length and
//! overlap make the policy ambiguous, which is a load error). Tool names have no path
//! separators, so `*` is the only wildcard; `?` and `[...]` are ordinary characters.

use std::collections::HashMap;

/// One pattern from `tools` or `hide`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    text: String,
    /// Bytes before the first `*`: the precedence key.
    prefix_len: usize,
}

impl Pattern {
    /// `Some` when `text` contains a `*`; names without one are exact names, not patterns.
    pub fn new(text: &str) -> Option<Pattern> {
        let prefix_len = text.find('*')?;
        Some(Pattern {
            text: text.to_owned(),
            prefix_len,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How many characters precede the first `*` (in bytes): of two matching patterns, the one
    /// with the longer literal prefix wins.
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        matches(self.text.as_bytes(), name.as_bytes())
    }

    /// Whether some name matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        overlap(self.text.as_bytes(), other.text.as_bytes())
    }

    /// Whether every name `other` matches, this pattern matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        covers(self.text.as_bytes(), other.text.as_bytes())
    }
}

/// One prefix length and, for each literal prefix of that length, its patterns.
type Group<T> = (usize, HashMap<String, Vec<(Pattern, T)>>);

/// Patterns indexed by literal prefix, for lookups that cost a hash per distinct prefix length
/// rather than a match per pattern.
#[derive(Debug, Clone)]
pub(crate) struct PatternIndex<T> {
    /// By prefix length, longest first: each maps a literal prefix to its patterns.
    groups: Vec<Group<T>>,
    /// Every pattern, longest prefix first.
    all: Vec<(Pattern, T)>,
}

impl<T: Clone> PatternIndex<T> {
    pub fn new(mut patterns: Vec<(Pattern, T)>) -> PatternIndex<T> {
        patterns.sort_by_key(|(p, _)| std::cmp::Reverse(p.prefix_len()));
        let mut groups: Vec<Group<T>> = Vec::new();
        for (pattern, value) in &patterns {
            let len = pattern.prefix_len();
            if groups.last().is_none_or(|(l, _)| *l != len) {
                groups.push((len, HashMap::new()));
            }
            if let Some((_, by_prefix)) = groups.last_mut() {
                let prefix = pattern.text.get(..len).unwrap_or_default().to_owned();
                by_prefix
                    .entry(prefix)
                    .or_default()
                    .push((pattern.clone(), value.clone()));
            }
        }
        PatternIndex {
            groups,
            all: patterns,
        }
    }
}

impl<T> PatternIndex<T> {
    /// The value of the matching pattern with the longest literal prefix.
    pub fn find(&self, name: &str) -> Option<&T> {
        for (len, by_prefix) in &self.groups {
            let Some(prefix) = name.get(..*len) else {
                continue;
            };
            if let Some(candidates) = by_prefix.get(prefix) {
                if let Some((_, value)) = candidates.iter().find(|(p, _)| p.matches(name)) {
                    return Some(value);
                }
            }
        }
        None
    }

    /// Every pattern, longest literal prefix first.
    pub fn iter(&self) -> impl Iterator<Item = &(Pattern, T)> {
        self.all.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

impl<T: Clone> Default for PatternIndex<T> {
    fn default() -> Self {
        PatternIndex::new(Vec::new())
    }
}

/// Iterative wildcard match with single backtracking point: linear in practice, and
/// O(len(pattern) × len(name)) at worst. No recursion, so no stack depth concerns.
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if name.get(n) == Some(&c) => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// Whether `a` and `b` have a common match.
fn overlap(a: &[u8], b: &[u8]) -> bool {
    relate(a, b, false)
}

/// Whether pattern `a` matches every name pattern `b` matches: `b`'s stars stand for arbitrary
/// text, so each must be swallowed by a star of `a`.
fn covers(a: &[u8], b: &[u8]) -> bool {
    relate(a, b, true)
}

/// A dynamic programme over (position in a, position in b). A star of `a` may absorb a
/// character or a star of `b`; when `covering`, `b`'s stars are text that only a star of `a`
/// can absorb, else a star of `b` may absorb `a`'s characters too.
fn relate(a: &[u8], b: &[u8], covering: bool) -> bool {
    let (la, lb) = (a.len(), b.len());
    // reach[i][j]: the relation holds between the suffixes a[i..] and b[j..].
    let mut reach = vec![vec![false; lb + 1]; la + 1];
    for i in (0..=la).rev() {
        for j in (0..=lb).rev() {
            let value = match (a.get(i), b.get(j)) {
                (None, None) => true,
                (Some(b'*'), _) => cell(&reach, i + 1, j) || (j < lb && cell(&reach, i, j + 1)),
                (_, Some(b'*')) if !covering => {
                    (i < la && cell(&reach, i + 1, j)) || cell(&reach, i, j + 1)
                }
                (Some(x), Some(y)) => *y != b'*' && x == y && cell(&reach, i + 1, j + 1),
                _ => false,
            };
            if let Some(slot) = reach.get_mut(i).and_then(|row| row.get_mut(j)) {
                *slot = value;
            }
        }
    }
    cell(&reach, 0, 0)
}

fn cell(reach: &[Vec<bool>], i: usize, j: usize) -> bool {
    reach
        .get(i)
        .and_then(|row| row.get(j))
        .copied()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    fn p(text: &str) -> Pattern {
        Pattern::new(text).unwrap_or_else(|| panic!("{text} is a pattern"))
    }

    #[test]
    fn exact_names_are_not_patterns() {
        assert!(Pattern::new("get_user").is_none());
        assert_eq!(p("get_*").prefix_len(), 4);
        assert_eq!(p("*").prefix_len(), 0);
        assert_eq!(p("a*b*").prefix_len(), 1);
    }

    #[test]
    fn matching() {
        let rows: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("get_*", "get_user", true),
            ("get_*", "get_", true),
            ("get_*", "get", false),
            ("get_*", "xget_user", false),
            ("*_admin", "drop_admin", true),
            ("*_admin", "drop_admin2", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("a*b*c", "abcbc", true),
            ("**", "x", true),
            ("a?b*", "a?bz", true),
            ("a?b*", "axbz", false),
        ];
        for (pattern, name, want) in rows {
            assert_eq!(p(pattern).matches(name), *want, "{pattern} vs {name}");
        }
    }

    #[test]
    fn overlapping() {
        let rows: &[(&str, &str, bool)] = &[
            ("get_*", "put_*", false),
            ("get_*", "g*", true),
            ("get_*_x", "get_*_y", false),
            ("get_*", "*_user", true),
            ("a*", "*b", true),
            ("*", "abc*", true),
            ("ab*", "ac*", false),
            ("*x*", "*y*", true),
            ("a*c", "ab*", true),
            ("a*c", "b*", false),
        ];
        for (a, b, want) in rows {
            assert_eq!(p(a).overlaps(&p(b)), *want, "{a} ∩ {b}");
            assert_eq!(p(b).overlaps(&p(a)), *want, "{b} ∩ {a}");
        }
    }

    #[test]
    fn the_index_finds_the_longest_prefix() {
        let index = super::PatternIndex::new(vec![
            (p("*"), 0),
            (p("get_*"), 1),
            (p("get_user_*"), 2),
            (p("put_*_x"), 3),
            (p("put_*_y"), 4),
        ]);
        assert_eq!(index.find("get_user_name"), Some(&2));
        assert_eq!(
            index.find("put_a_y"),
            Some(&4),
            "same prefix, the one that matches"
        );
        assert_eq!(index.find("get_"), Some(&1));
        assert_eq!(index.find("put_a_x"), Some(&3));
        assert_eq!(index.find("put_a_z"), Some(&0));
        assert_eq!(index.find("delete"), Some(&0));
        assert_eq!(index.find("é"), Some(&0));
        let none: super::PatternIndex<u8> = super::PatternIndex::new(vec![(p("a*"), 1)]);
        assert_eq!(none.find("b"), None);
        assert_eq!(none.iter().count(), 1);
    }

    #[test]
    fn covering() {
        let rows: &[(&str, &str, bool)] = &[
            ("*", "get_*", true),
            ("get_*", "*", false),
            ("get_*", "get_user_*", true),
            ("get_*", "g*", false),
            ("*_x", "a*_x", true),
            ("a*", "a*", true),
            ("a*b", "a*", false),
        ];
        for (a, b, want) in rows {
            assert_eq!(p(a).covers(&p(b)), *want, "{a} ⊇ {b}");
        }
    }
}
