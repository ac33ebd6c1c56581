//! Fuzzes the policy loader, `Policy::parse`, under both of the names that select its formats:
//! "fuzz.json" (JSON) and "fuzz.yaml" (YAML).
//!
//! A panic is a finding: one inside the loader, or one of the invariants of [`check`] failing.
//! `cargo xtask fuzz [--seconds N]` runs it; `tests/tests/policy_corpus.rs` replays the seed corpus
//! (`corpus/policy_load/`) through a copy of [`check`] in every `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcpwarden_policy::Policy;

fuzz_target!(|data: &[u8]| {
    // `Policy::parse` takes text; bytes that are not UTF-8 never reach it.
    if let Ok(text) = std::str::from_utf8(data) {
        check(text, "fuzz.json");
        check(text, "fuzz.yaml");
    }
});

/// Parses `text` as `file` and panics when the outcome breaks an invariant:
/// - an error names `file` first in its Display (`file:line:col: message`) and has a 1-based
///   position inside the text: line and column ≥ 1 (0/0 is only for files that cannot be read),
///   line ≤ the number of lines + 1;
/// - a success is deterministic: parsing the same text again gives the same `source()`.
///
/// Mirrored in tests/tests/policy_corpus.rs; keep the two the same.
fn check(text: &str, file: &str) {
    match Policy::parse(text, file) {
        Ok(policy) => {
            let again = Policy::parse(text, file)
                .unwrap_or_else(|e| panic!("{file}: parsed once, then failed: {e}"));
            assert_eq!(policy.source().file, file, "{file}: source().file");
            assert_eq!(
                policy.source().sha256,
                again.source().sha256,
                "{file}: the same text gave two different sha256"
            );
        }
        Err(err) => {
            let shown = err.to_string();
            assert!(
                err.line >= 1 && err.column >= 1,
                "{file}: position {}:{} is not 1-based: {shown}",
                err.line,
                err.column
            );
            let lines = line_count(text);
            assert!(
                err.line <= lines + 1,
                "{file}: line {} is past the end of a {lines}-line text: {shown}",
                err.line
            );
            assert!(
                shown.starts_with(&format!("{file}:")),
                "{file}: the message does not start with the file name: {shown}"
            );
        }
    }
}

/// Lines as `str::lines` counts them, but breaking at every line break a JSON or YAML parser may
/// count: LF, CRLF, a lone CR, and YAML 1.1's NEL, LS and PS (libyaml counts those).
fn line_count(text: &str) -> usize {
    let mut breaks = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                breaks += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => breaks += 1,
            _ => {}
        }
    }
    let ends_with_break = text.ends_with(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']);
    breaks + usize::from(!text.is_empty() && !ends_with_break)
}
