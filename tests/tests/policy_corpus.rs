//! The policy loader's fuzz corpus (`agent/fuzz/corpus/policy_load/`), replayed through the fuzz
//! target's invariants in every `cargo test`, so that CI checks them without nightly or
//! cargo-fuzz (`cargo xtask fuzz` runs the fuzzer itself). Needs no root.

use std::path::{Path, PathBuf};

use mcpwarden::policy::Policy;

/// The seed example that must always load.
const SEED: &str = "valid_seed_rate_limit.json";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/fuzz/corpus/policy_load")
}

// `check` and `line_count` mirror agent/fuzz/fuzz_targets/policy_load.rs; keep the two the same.
// A crate shared by the fuzz target and this test is not worth it for ~20 lines: the fuzz crate
// lives in its own workspace (nightly, libFuzzer) and would need a third one to depend on.

/// Parses `text` as `file` and panics when the outcome breaks an invariant:
/// - an error names `file` first in its Display (`file:line:col: message`) and has a 1-based
///   position inside the text: line and column ≥ 1 (0/0 is only for files that cannot be read),
///   line ≤ the number of lines + 1;
/// - a success is deterministic: parsing the same text again gives the same `source()`.
///
/// Returns what happened, for the test's output.
fn check(text: &str, file: &str) -> String {
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
            "ok".to_owned()
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
            format!("error {shown}")
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

#[test]
fn line_count_counts_every_kind_of_line_break() {
    assert_eq!(line_count(""), 0);
    assert_eq!(line_count("a"), 1);
    assert_eq!(line_count("a\n"), 1);
    assert_eq!(line_count("a\nb"), 2);
    assert_eq!(line_count("a\r\nb\r\n"), 2);
    assert_eq!(line_count("a\rb\rc"), 3);
    assert_eq!(line_count("a\u{2028}b\u{85}"), 2);
    assert_eq!(line_count("\n\n"), 2);
}

#[test]
fn every_corpus_file_keeps_the_loader_invariants() {
    let dir = corpus_dir();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|path| path.is_file())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "{} has no files", dir.display());

    let mut checked = 0;
    for path in &entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // The fuzz target skips input that is not UTF-8 (Policy::parse takes &str); so does this.
        let Ok(text) = std::str::from_utf8(&bytes) else {
            println!("{name}: not UTF-8, skipped as the fuzz target skips it");
            continue;
        };
        for file in ["fuzz.json", "fuzz.yaml"] {
            println!("{name} as {file}: {}", check(text, file));
        }
        checked += 1;
    }
    println!(
        "{checked} of {} corpus files checked as JSON and as YAML: every error 1-based, inside the \
         text and prefixed with its file name; every success deterministic",
        entries.len()
    );
    assert!(checked > 0, "no UTF-8 file in {}", dir.display());
}

#[test]
fn the_seed_example_loads() {
    let path = corpus_dir().join(SEED);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let policy =
        Policy::parse(&text, "fuzz.json").unwrap_or_else(|e| panic!("{SEED} must load: {e}"));
    println!(
        "{SEED} loads as fuzz.json (sha256 {})",
        policy.source().sha256
    );
}
