//! Loading a policy file and turning it into the form the engine uses.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::schema::{self, Object, PolicyFile, ToolAction, Window};
use super::PolicyError;

/// Where a policy came from, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// The file name as given to [`Policy::load`] or [`Policy::parse`].
    pub file: String,
    /// SHA-256 of the file's bytes, as lowercase hex.
    pub sha256: String,
}

/// A parsed and validated policy. Immutable once loaded.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) source: PolicySource,
    /// Whether unlisted tools are allowed.
    pub(super) default_allow: bool,
    pub(super) tools: HashMap<String, ToolRule>,
    /// `hide: "*"`.
    pub(super) hide_all: bool,
    /// `hide: [names]`.
    pub(super) hidden: std::collections::HashSet<String>,
    /// Every distinct counter name, indexed by [`Limit::counter`].
    pub(super) counters: Vec<Counter>,
}

/// The rule for one listed tool.
#[derive(Debug, Clone)]
pub(super) struct ToolRule {
    /// JSON Pointer to this rule: `/tools/<escaped name>`.
    pub pointer: String,
    pub deny: bool,
    pub reason: Option<String>,
    pub limits: Vec<Limit>,
    /// The distinct counters that `limits` use, so that an admitted call is
    /// recorded once per counter even if two limits name the same one.
    pub counters: Vec<usize>,
}

/// One limit of a tool, in file order.
#[derive(Debug, Clone)]
pub(super) struct Limit {
    /// Index into [`Policy::counters`].
    pub counter: usize,
    pub window: Window,
    pub max: u64,
}

/// A named counter and how much of its log must be kept.
#[derive(Debug, Clone)]
pub(super) struct Counter {
    pub name: String,
    /// The longest window of any limit using this counter: older admissions
    /// can no longer count against anything.
    pub retention: Duration,
    /// The largest `max` of any limit using this counter: a limit only needs
    /// to know whether its newest `max` admissions all fall in its window, so
    /// older entries beyond this many can be dropped.
    pub capacity: usize,
}

impl Policy {
    /// Reads and parses a policy file.
    ///
    /// # Errors
    ///
    /// A file that cannot be read gives an error with line and column 0; a
    /// file that is not a valid policy, one with the offending position.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display().to_string();
        match std::fs::read(path) {
            Ok(bytes) => Self::from_bytes(&bytes, file),
            Err(err) => Err(PolicyError {
                file,
                line: 0,
                column: 0,
                message: format!("cannot read policy file: {err}"),
            }),
        }
    }

    /// Parses policy text; `file` names it in errors and in
    /// [`Policy::source`].
    ///
    /// # Errors
    ///
    /// Text that is not a valid policy gives an error with the offending
    /// position.
    pub fn parse(text: &str, file: &str) -> Result<Policy, PolicyError> {
        Self::from_bytes(text.as_bytes(), file.to_owned())
    }

    /// Where this policy came from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Whether `hide` names the tool (or is `"*"`).
    pub fn hides(&self, tool: &str) -> bool {
        self.hide_all || self.hidden.contains(tool)
    }

    /// Whether every tool is visible (nothing hidden, unlisted tools allowed): listings are
    /// then the same for every caller under this policy.
    pub fn visible_all(&self) -> bool {
        !self.hide_all && self.hidden.is_empty() && self.default_allow
    }

    /// The visibility rule: a tool appears in `tools/list` unless `hide` names it or the policy
    /// does not list it and denies by default. Tools denied explicitly stay visible, so the
    /// model can learn the reason when it calls them.
    pub fn visible(&self, tool: &str) -> bool {
        !self.hides(tool) && (self.default_allow || self.tools.contains_key(tool))
    }

    fn from_bytes(bytes: &[u8], file: String) -> Result<Policy, PolicyError> {
        let parsed: PolicyFile = match serde_json::from_slice::<Object<PolicyFile>>(bytes) {
            Ok(Object(parsed)) => parsed,
            Err(err) => return Err(json_error(file, &err)),
        };
        let source = PolicySource {
            file,
            sha256: lowercase_hex(&Sha256::digest(bytes)),
        };
        Ok(compile(parsed, source))
    }
}

/// Turns the validated file into lookup tables: counters get indices, and
/// each tool's pointer and distinct counters are worked out once.
fn compile(parsed: PolicyFile, source: PolicySource) -> Policy {
    let mut counters: Vec<Counter> = Vec::new();
    let mut counter_ids: HashMap<String, usize> = HashMap::new();
    let mut tools = HashMap::with_capacity(parsed.tools.0.len());

    for (name, rule) in parsed.tools.0 {
        let mut limits = Vec::with_capacity(rule.limits.len());
        let mut used = Vec::new();
        for Object(spec) in rule.limits {
            let id = *counter_ids
                .entry(spec.counter.0.clone())
                .or_insert_with(|| {
                    let id = counters.len();
                    counters.push(Counter {
                        name: spec.counter.0.clone(),
                        retention: Duration::ZERO,
                        capacity: 0,
                    });
                    id
                });
            if let Some(counter) = counters.get_mut(id) {
                counter.retention = counter.retention.max(spec.window.duration());
                let max = usize::try_from(spec.max.0).unwrap_or(usize::MAX);
                counter.capacity = counter.capacity.max(max);
            }
            if !used.contains(&id) {
                used.push(id);
            }
            limits.push(Limit {
                counter: id,
                window: spec.window,
                max: spec.max.0,
            });
        }
        let rule = ToolRule {
            pointer: format!("/tools/{}", escape_pointer_token(&name)),
            deny: rule.action == Some(ToolAction::Deny),
            reason: rule.reason,
            limits,
            counters: used,
        };
        tools.insert(name, rule);
    }

    let (hide_all, hidden) = match parsed.hide {
        Some(schema::Hide::All) => (true, Default::default()),
        Some(schema::Hide::Names(names)) => (false, names.into_iter().collect()),
        None => (false, Default::default()),
    };
    Policy {
        source,
        default_allow: parsed.default == schema::DefaultAction::Allow,
        tools,
        hide_all,
        hidden,
        counters,
    }
}

/// Escapes one JSON Pointer reference token (RFC 6901): `~` becomes `~0`
/// and `/` becomes `~1`, in that order.
pub(super) fn escape_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Converts a serde_json error into a [`PolicyError`], keeping the position
/// and dropping serde_json's own " at line L column C" suffix.
///
/// serde_json reports a value of the wrong type that starts with `[` or `{`
/// one column early, which is column 0 at the start of a line; that is
/// reported as column 1, keeping columns 1-based.
fn json_error(file: String, err: &serde_json::Error) -> PolicyError {
    let (line, column) = (err.line(), err.column());
    let text = err.to_string();
    let suffix = format!(" at line {line} column {column}");
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
    PolicyError {
        file,
        line,
        column: if line > 0 { column.max(1) } else { column },
        message,
    }
}

fn lowercase_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
