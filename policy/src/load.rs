//! Loading a policy file and turning it into the form the engine uses.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::args::ArgPath;
use super::condition::Condition;
use super::folded::CheckedNames;
use super::glob::{Pattern, PatternIndex};
use super::schema::{
    self, ArgSchema, LimitSpec, Mode, NameOrPattern, Object, PolicyFile, Scope, ToolAction, Window,
};
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
    /// `mode: dry_run`: decide and audit, but forward everything.
    pub(super) dry_run: bool,
    /// Rules of `tools`, in file order.
    pub(super) rules: Vec<ToolRule>,
    /// Exact names, to their rule.
    pub(super) exact: HashMap<String, usize>,
    /// Patterns and their rule, the longest literal prefix first.
    pub(super) patterns: PatternIndex<usize>,
    /// `all_tools`.
    pub(super) all_tools: Checks,
    /// `hide: "*"`, or `"*"` in the list.
    pub(super) hide_all: bool,
    /// `hide: [names]`.
    pub(super) hidden: HashSet<String>,
    /// `hide: [patterns]`.
    pub(super) hidden_patterns: PatternIndex<()>,
    /// Every distinct counter (name and scope), indexed by [`Limit::counter`].
    pub(super) counters: Vec<Counter>,
    /// Rules that can never apply, found at load.
    pub(super) warnings: Vec<Warning>,
    /// Every argument name the policy checks, for refusing keys that only fold to one.
    pub(super) checked: CheckedNames,
}

/// Something in a policy that is valid but cannot do what it seems to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// JSON Pointer to the rule concerned.
    pub pointer: String,
    pub message: String,
}

/// The rule for one entry of `tools`.
#[derive(Debug, Clone)]
pub(super) struct ToolRule {
    /// JSON Pointer to this rule: `/tools/<escaped name>`.
    pub pointer: String,
    /// The name or pattern as written.
    pub name: String,
    pub action: ToolAction,
    /// `action: require_approval`: how it is approved (operator approval with the agent's
    /// defaults when the rule does not say).
    pub approval: crate::Approval,
    pub reason: Option<String>,
    pub arguments: Option<ArgSchema>,
    pub checks: Checks,
}

/// Argument conditions and limits, of one tool or of `all_tools`.
#[derive(Debug, Clone, Default)]
pub(super) struct Checks {
    /// `/tools/<name>` or `/all_tools`.
    pub pointer: String,
    pub deny_if: Vec<Condition>,
    pub require: Vec<Condition>,
    pub limits: Vec<Limit>,
}

/// One limit, in file order.
#[derive(Debug, Clone)]
pub(super) struct Limit {
    /// Index into [`Policy::counters`].
    pub counter: usize,
    pub window: Window,
    pub max: f64,
    /// `increment_from`; `None` adds 1 per call.
    pub increment: Option<ArgPath>,
}

/// A named counter in one scope, and how much of its log must be kept.
#[derive(Debug, Clone)]
pub(super) struct Counter {
    pub name: String,
    pub scope: Scope,
    /// The longest window of any limit using this counter: older admissions can no longer
    /// count against anything.
    pub retention: Duration,
    /// For counters that only ever add 1: the largest `max` of any limit using it (a limit
    /// only needs to know whether its newest `max` admissions all fall in its window). `None`
    /// when some limit adds `increment_from` values.
    pub capacity: Option<usize>,
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

    /// A policy that hides every tool, for callers no policy can be chosen for.
    pub fn hide_everything() -> Policy {
        let parsed = PolicyFile {
            version: schema::Version,
            default: schema::DefaultAction::Deny,
            mode: Mode::Enforce,
            hide: Some(schema::Hide::All),
            all_tools: None,
            tools: schema::ToolMap::default(),
        };
        compile(
            parsed,
            PolicySource {
                file: "(no policy: caller identity unresolved)".to_owned(),
                sha256: String::new(),
            },
        )
    }

    /// Parses policy bytes (a file already read); `file` names it, and its extension picks
    /// YAML or JSON.
    ///
    /// # Errors
    ///
    /// Bytes that are not a valid policy give an error with the offending position.
    pub fn parse_bytes(bytes: &[u8], file: &str) -> Result<Policy, PolicyError> {
        Self::from_bytes(bytes, file.to_owned())
    }

    /// Where this policy came from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Whether `hide` names the tool (or is `"*"`).
    pub fn hides(&self, tool: &str) -> bool {
        self.hide_all || self.hidden.contains(tool) || self.hidden_patterns.find(tool).is_some()
    }

    /// `mode: dry_run`: decisions are audited, everything is forwarded.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// Whether every tool is visible (nothing hidden, unlisted tools allowed, or a dry run):
    /// listings are then the same for every caller under this policy.
    pub fn visible_all(&self) -> bool {
        self.dry_run
            || (!self.hide_all
                && self.hidden.is_empty()
                && self.hidden_patterns.is_empty()
                && self.default_allow)
    }

    /// The visibility rule: a tool appears in `tools/list` unless `hide` names it or the policy
    /// does not list it (by name or pattern) and denies by default. Tools denied explicitly stay
    /// visible, so the model can learn the reason when it calls them. A dry run changes nothing
    /// on the wire, so every tool stays visible.
    pub fn visible(&self, tool: &str) -> bool {
        self.dry_run || (!self.hides(tool) && (self.default_allow || self.rule_for(tool).is_some()))
    }

    /// Rules that are valid but can never apply, or apply less than they seem to.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// The tool names the policy spells out: keys of `tools` and entries of `hide` that are not
    /// patterns (a pattern is a name with a `*`, the only wildcard: `?` and `[...]` are
    /// ordinary characters), sorted and without duplicates. A bounded set, for labels.
    pub fn listed_tools(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .exact
            .keys()
            .chain(self.hidden.iter())
            .cloned()
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether the policy only audits (`mode: dry_run`).
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The rule that decides calls to `tool`: its exact entry, else the matching pattern with
    /// the longest literal prefix.
    pub(super) fn rule_for(&self, tool: &str) -> Option<&ToolRule> {
        let index = match self.exact.get(tool) {
            Some(&index) => index,
            None => *self.patterns.find(tool)?,
        };
        self.rules.get(index)
    }

    fn from_bytes(bytes: &[u8], file: String) -> Result<Policy, PolicyError> {
        super::condition::sharing_regexes(|| Self::read(bytes, file))
    }

    fn read(bytes: &[u8], file: String) -> Result<Policy, PolicyError> {
        let parsed: PolicyFile = if is_yaml(&file) {
            match serde_yaml_ng::from_slice::<Object<PolicyFile>>(bytes) {
                Ok(Object(parsed)) => parsed,
                Err(err) => return Err(yaml_error(file, &err)),
            }
        } else {
            // A byte-order mark (editors on Windows write one) is not JSON, but it is not
            // ambiguous either: it is skipped, and columns on line 1 count from after it.
            let json = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            match serde_json::from_slice::<Object<PolicyFile>>(json) {
                Ok(Object(parsed)) => parsed,
                Err(err) => return Err(json_error(file, &err)),
            }
        };
        let source = PolicySource {
            file,
            sha256: super::sha256_hex(bytes),
        };
        Ok(compile(parsed, source))
    }
}

/// YAML by the file name's extension (`.yaml`, `.yml`); JSON otherwise.
fn is_yaml(file: &str) -> bool {
    let lower = file.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

/// Turns the validated file into lookup tables: counters get indices, patterns an order, and
/// each rule its pointer.
fn compile(parsed: PolicyFile, source: PolicySource) -> Policy {
    let mut counters = Counters::default();
    let all_tools = parsed.all_tools.map(|Object(a)| a).unwrap_or_default();
    let all_tools = Checks {
        pointer: "/all_tools".to_owned(),
        deny_if: all_tools.deny_if,
        require: all_tools.require,
        limits: counters.limits(all_tools.limits),
    };
    let mut rules = Vec::with_capacity(parsed.tools.0.len());
    let mut exact = HashMap::new();
    let mut patterns = Vec::new();
    for (name, rule) in parsed.tools.0 {
        let pointer = format!("/tools/{}", escape_pointer_token(&name));
        let index = rules.len();
        match Pattern::new(&name) {
            Some(pattern) => patterns.push((pattern, index)),
            None => {
                exact.insert(name.clone(), index);
            }
        }
        rules.push(ToolRule {
            action: rule.action.unwrap_or(ToolAction::Allow),
            approval: rule.approval.unwrap_or_default(),
            reason: rule.reason,
            arguments: rule.arguments,
            checks: Checks {
                pointer: pointer.clone(),
                deny_if: rule.deny_if,
                require: rule.require,
                limits: counters.limits(rule.limits),
            },
            pointer,
            name,
        });
    }
    // Longest literal prefix first; patterns that tie on length never overlap (checked at
    // load), so the order among them does not matter.
    let patterns = PatternIndex::new(patterns);

    let (mut hide_all, mut hidden, mut hidden_patterns) = (false, HashSet::new(), Vec::new());
    match parsed.hide {
        Some(schema::Hide::All) => hide_all = true,
        Some(schema::Hide::List(entries)) => {
            for entry in entries {
                match entry {
                    NameOrPattern::Name(name) => {
                        hidden.insert(name);
                    }
                    NameOrPattern::Pattern(p) if p.as_str().bytes().all(|b| b == b'*') => {
                        hide_all = true;
                    }
                    NameOrPattern::Pattern(p) => hidden_patterns.push((p, ())),
                }
            }
        }
        None => {}
    }
    let checked = CheckedNames::new(&all_tools, &rules);
    let mut policy = Policy {
        checked,
        source,
        default_allow: parsed.default == schema::DefaultAction::Allow,
        dry_run: parsed.mode == Mode::DryRun,
        rules,
        exact,
        patterns,
        all_tools,
        hide_all,
        hidden,
        hidden_patterns: PatternIndex::new(hidden_patterns),
        counters: counters.list,
        warnings: Vec::new(),
    };
    policy.warnings = warnings(&policy);
    policy
}

/// Gives each distinct (counter name, scope) an index.
#[derive(Default)]
struct Counters {
    list: Vec<Counter>,
}

impl Counters {
    fn limits(&mut self, specs: Vec<Object<LimitSpec>>) -> Vec<Limit> {
        specs
            .into_iter()
            .map(|Object(spec)| {
                let counter = self.id(&spec);
                Limit {
                    counter,
                    window: spec.window,
                    max: spec.max.0,
                    increment: spec.increment_from.map(|i| i.0),
                }
            })
            .collect()
    }

    fn id(&mut self, spec: &LimitSpec) -> usize {
        let name = &spec.counter.0;
        let id = match self
            .list
            .iter()
            .position(|c| c.name == *name && c.scope == spec.scope)
        {
            Some(id) => id,
            None => {
                self.list.push(Counter {
                    name: name.clone(),
                    scope: spec.scope,
                    retention: Duration::ZERO,
                    capacity: Some(0),
                });
                self.list.len() - 1
            }
        };
        if let Some(counter) = self.list.get_mut(id) {
            counter.retention = counter.retention.max(spec.window.duration());
            counter.capacity = match (counter.capacity, &spec.increment_from) {
                (Some(capacity), None) => {
                    // Capacity of a unit counter: enough entries to fill the largest window.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let max = spec.max.0.ceil().min(usize::MAX as f64) as usize;
                    Some(capacity.max(max))
                }
                _ => None,
            };
        }
        id
    }
}

/// Rules that can never apply, for `policy check` and the load log.
fn warnings(policy: &Policy) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |pointer: &str, message: String| {
        out.push(Warning {
            pointer: pointer.to_owned(),
            message,
        });
    };
    for rule in &policy.rules {
        let hidden = match Pattern::new(&rule.name) {
            None => policy.hides(&rule.name),
            Some(pattern) => {
                policy.hide_all
                    || policy
                        .hidden_patterns
                        .iter()
                        .any(|(h, ())| h.covers(&pattern))
            }
        };
        if hidden {
            warn(
                &rule.pointer,
                "never applies: every tool it names is hidden by \"hide\", and hidden tools are refused as unknown first"
                    .to_owned(),
            );
            continue;
        }
        let checks = &rule.checks;
        let has_checks = rule.arguments.is_some()
            || !checks.deny_if.is_empty()
            || !checks.require.is_empty()
            || !checks.limits.is_empty();
        if rule.action == ToolAction::Deny && has_checks {
            warn(
                &rule.pointer,
                "its arguments, deny_if, require and limits never apply: action \"deny\" decides first"
                    .to_owned(),
            );
        }
        if rule.action == ToolAction::RequireApproval
            && rule.approval.mode == crate::ApprovalMode::User
        {
            warn(
                &format!("{}/approval", rule.pointer),
                "approval by the client's user: an autonomous client can answer its own \
                 elicitation, so this approves nothing unless a human answers for that client \
                 (older revisions, and clients without elicitation, get operator approval)"
                    .to_owned(),
            );
        }
        if Pattern::new(&rule.name).is_none() {
            for (pattern, _) in policy.patterns.iter() {
                if pattern.matches(&rule.name) {
                    warn(
                        &rule.pointer,
                        format!(
                            "also matches pattern {:?}, whose rules do not apply to it: an exact name beats a pattern",
                            pattern.as_str()
                        ),
                    );
                }
            }
        }
    }
    for (pointer, checks) in std::iter::once(("/all_tools".to_owned(), &policy.all_tools))
        .chain(policy.rules.iter().map(|r| (r.pointer.clone(), &r.checks)))
    {
        for (index, limit) in checks.limits.iter().enumerate() {
            if limit.max <= 0.0 {
                warn(
                    &format!("{pointer}/limits/{index}"),
                    "max 0 admits nothing: every call it applies to is denied".to_owned(),
                );
            }
        }
    }
    out
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

/// Converts a serde_yaml_ng error into a [`PolicyError`], like [`json_error`].
fn yaml_error(file: String, err: &serde_yaml_ng::Error) -> PolicyError {
    let text = err.to_string();
    match err.location() {
        Some(l) => {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            PolicyError {
                file,
                line: l.line().max(1),
                column: l.column().max(1),
                message: text.strip_suffix(&suffix).unwrap_or(&text).to_owned(),
            }
        }
        None => PolicyError {
            file,
            line: 1,
            column: 1,
            message: text,
        },
    }
}
