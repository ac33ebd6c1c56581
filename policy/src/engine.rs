//! Deciding tool calls against a loaded policy.
//!
//! The order of the checks, each of which can decide the call:
//! 1. `hide` (the tool does not exist for this caller): `/hide`;
//! 2. the tool's rule, exact name first, then the pattern with the longest literal prefix; an
//!    unlisted tool under `default: deny` is unknown too: `/default`;
//! 3. the rule's `action` (`deny`, `require_approval`): `/tools/<name>/action`;
//! 4. the rule's `arguments` schema: `/tools/<name>/arguments`;
//! 5. `all_tools` then the rule's `deny_if` and `require`: `/all_tools/deny_if/0`, …;
//! 6. the limits of `all_tools` and of the rule, reserved together: `/tools/<name>/limits/1`;
//! 7. allowed: the rule's pointer, or `/default`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use serde_json::Value;

use super::condition::{Condition, WrongType};
use super::limits::{self, CounterStore, Reservation, Want};
use super::load::{Checks, Limit, ToolRule};
use super::schema::{location_or_root, Scope, ToolAction};
use super::{CallerScope, Decision, Outcome, Policy};

/// The arguments of a call that has none.
static NO_ARGUMENTS: LazyLock<Value> = LazyLock::new(|| Value::Object(serde_json::Map::new()));

/// A policy together with its quota state.
///
/// One engine is shared by every connection that uses the policy file, so that limits count
/// all of a workload's calls, whichever connection they come over.
#[derive(Debug)]
pub struct Engine {
    policy: Policy,
    /// All counters behind one lock, so that a call with several limits checks and records
    /// them as one step. Shared with the engines that replace this one on reload.
    counters: Arc<Mutex<CounterStore>>,
    /// The store's generation when this engine fitted it; a later reload refits the shared
    /// store, and this engine's counter indices must then be translated by name and scope.
    generation: u64,
}

/// One `tools/call` as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub tool: &'a str,
    /// `params.arguments`; `None` when the call has none (decided as `{}`).
    pub arguments: Option<&'a Value>,
}

/// A decision with the steps that led to it, for `policy explain`.
#[derive(Debug)]
pub struct Explanation {
    pub decision: Decision,
    /// One line per check, in order.
    pub steps: Vec<String>,
}

/// How much of a limit's counter one scope key has used, for metrics and `policy status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Usage {
    /// The counter's name.
    pub counter: String,
    /// The counter's scope: `grant`, `process`, `session` or `server`.
    pub scope: String,
    /// The scope key (who): a grant, a process, a session, or `""` for `server`.
    pub key: String,
    /// JSON Pointer to the limit, as a refusal by it names it: `/tools/<name>/limits/<i>` or
    /// `/all_tools/limits/<i>`.
    pub rule: String,
    pub window_secs: f64,
    pub max: f64,
    /// What the key has used within the window.
    pub used: f64,
}

/// Whether a decision counts the call against its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    /// Record the admission (and hand back a [`Reservation`]).
    Reserve,
    /// As `Reserve`, for a call an approver let through: `require_approval` passes.
    Approved,
    /// Only check whether there is room: nothing is recorded.
    Peek,
}

/// Collects explanation lines; the hot path uses [`Silent`], which compiles them away.
trait Trace {
    const ON: bool;
    fn step(&mut self, line: impl FnOnce() -> String);
}

struct Silent;

impl Trace for Silent {
    const ON: bool = false;
    #[inline(always)]
    fn step(&mut self, _: impl FnOnce() -> String) {}
}

impl Trace for Vec<String> {
    const ON: bool = true;
    fn step(&mut self, line: impl FnOnce() -> String) {
        self.push(line());
    }
}

impl Engine {
    /// An engine with empty quota logs.
    pub fn new(policy: Policy) -> Engine {
        let mut store = CounterStore::default();
        store.fit(&policy.counters);
        let generation = store.generation();
        Engine {
            policy,
            counters: Arc::new(Mutex::new(store)),
            generation,
        }
    }

    /// The engine for a reloaded `policy` that replaces `previous`: counters whose name and
    /// scope are unchanged keep their logs (and outstanding reservations); others start empty.
    pub fn reloaded(policy: Policy, previous: &Engine) -> Engine {
        let generation = {
            let mut store = limits::lock(&previous.counters);
            store.fit(&policy.counters);
            store.generation()
        };
        Engine {
            policy,
            counters: previous.counters.clone(),
            generation,
        }
    }

    /// From now on, tell `journal` of every admission and release of this engine's counters
    /// (and of the engines that replace it on reload: they share the store).
    pub fn set_journal(&self, journal: Arc<dyn limits::Journal>) {
        limits::lock(&self.counters).set_journal(journal);
    }

    /// Log admissions an earlier agent process made again (read back from its journal), as
    /// made `age` before `now`. Returns how many were logged.
    pub fn restore(&self, entries: &[limits::Restored], now: Instant) -> usize {
        limits::lock(&self.counters).restore(entries, now)
    }

    /// Hand the journal the admissions that still count, to replace what it holds.
    pub fn compact_journal(&self, now: Instant) {
        limits::lock(&self.counters).compact_journal(now);
    }

    /// The policy this engine enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides a `tools/call` by `caller` at `now`.
    ///
    /// An allowed call that is subject to limits is counted against them here, and the
    /// decision carries the [`Reservation`]: the caller releases it if the upstream certainly
    /// did not run the call, and otherwise drops it.
    #[must_use]
    pub fn decide_call(&self, call: &Call<'_>, caller: &CallerScope<'_>, now: Instant) -> Decision {
        self.dry_run(self.decide(call, caller, now, Count::Reserve, &mut Silent))
    }

    /// Decides again a call that was held for an approval and approved: `action:
    /// require_approval` now passes, everything else is decided as for any call against this
    /// (possibly reloaded) policy, and only now are its limits counted.
    #[must_use]
    pub fn decide_approved_call(
        &self,
        call: &Call<'_>,
        caller: &CallerScope<'_>,
        now: Instant,
    ) -> Decision {
        self.dry_run(self.decide(call, caller, now, Count::Approved, &mut Silent))
    }

    /// Like [`Engine::decide_call`], with a line per check saying what it found.
    ///
    /// Like `decide_call`, an allowed call with limits is counted: the decision's
    /// `reservation` holds the admission, which stays counted when dropped; give it back with
    /// `if let Some(r) = explanation.decision.reservation.take() { r.release() }`. To explain
    /// against a live engine without counting, use [`Engine::explain_dry`].
    pub fn explain(&self, call: &Call<'_>, caller: &CallerScope<'_>, now: Instant) -> Explanation {
        self.explain_counting(call, caller, now, Count::Reserve)
    }

    /// What the next call would get, without counting: [`Engine::explain`] against the live
    /// counters, where limits are only checked for room. Nothing is recorded (not even for a
    /// moment, so a concurrent call is never refused because of it), pruned or journalled, and
    /// the decision carries no reservation.
    pub fn explain_dry(
        &self,
        call: &Call<'_>,
        caller: &CallerScope<'_>,
        now: Instant,
    ) -> Explanation {
        self.explain_counting(call, caller, now, Count::Peek)
    }

    fn explain_counting(
        &self,
        call: &Call<'_>,
        caller: &CallerScope<'_>,
        now: Instant,
        count: Count,
    ) -> Explanation {
        let mut steps = Vec::new();
        let decision = self.dry_run(self.decide(call, caller, now, count, &mut steps));
        if let Some(would) = &decision.would {
            steps.push(format!(
                "mode dry_run: the call is forwarded; enforcing would have answered {would:?}"
            ));
        }
        Explanation { decision, steps }
    }

    /// In a dry run nothing is refused: the decision says what would have been.
    fn dry_run(&self, mut decision: Decision) -> Decision {
        if self.policy.dry_run && decision.outcome != Outcome::Allow {
            decision.would = Some(decision.outcome);
            decision.outcome = Outcome::Allow;
        }
        decision
    }

    fn decide<T: Trace>(
        &self,
        call: &Call<'_>,
        caller: &CallerScope<'_>,
        now: Instant,
        count: Count,
        trace: &mut T,
    ) -> Decision {
        let tool = call.tool;
        let policy = &self.policy;
        if policy.hides(tool) {
            trace.step(|| format!("hide: {tool} is hidden"));
            return refuse(
                Outcome::UnknownTool,
                "/hide".to_owned(),
                format!("tool {tool} is hidden by this policy"),
            );
        }
        let args = call.arguments.unwrap_or(&NO_ARGUMENTS);
        let Some(rule) = policy.rule_for(tool) else {
            if !policy.default_allow {
                trace.step(|| format!("no rule names {tool}, and default is deny"));
                return refuse(
                    Outcome::UnknownTool,
                    "/default".to_owned(),
                    format!("tool {tool} is not allowed by this policy (default deny)"),
                );
            }
            trace.step(|| format!("no rule names {tool}; default is allow"));
            if let Some(refusal) = near_miss(policy, args, "/default", trace) {
                return refusal;
            }
            return self.check(
                &[&policy.all_tools],
                args,
                caller,
                (now, count),
                trace,
                "/default",
            );
        };
        trace.step(|| {
            if rule.name == tool {
                format!("rule {}: exact name", rule.pointer)
            } else {
                format!(
                    "rule {}: pattern {:?} matches {tool}",
                    rule.pointer, rule.name
                )
            }
        });
        match rule.action {
            ToolAction::Deny => {
                trace.step(|| "action: deny".to_owned());
                return refuse(
                    Outcome::Deny,
                    format!("{}/action", rule.pointer),
                    rule.reason
                        .clone()
                        .unwrap_or_else(|| format!("tool {tool} is denied by policy")),
                );
            }
            ToolAction::RequireApproval if count == Count::Approved => {
                trace.step(|| "action: require_approval, and approved".to_owned());
            }
            ToolAction::RequireApproval => {
                trace.step(|| "action: require_approval".to_owned());
                // Nobody is asked to approve a call its checks would refuse: they run first,
                // limits only checked for room (counted once approved).
                let checked = near_miss(policy, args, &rule.pointer, trace)
                    .or_else(|| check_schema(rule, tool, args, trace))
                    .unwrap_or_else(|| {
                        self.check(
                            &[&policy.all_tools, &rule.checks],
                            args,
                            caller,
                            (now, Count::Peek),
                            trace,
                            &rule.pointer,
                        )
                    });
                if checked.outcome != Outcome::Allow {
                    // Worded as the same refusal after an approval would be.
                    return checked.with_reason_prefix(&rule.pointer, rule.reason.as_deref());
                }
                let mut held = refuse(
                    Outcome::ApprovalRequired,
                    format!("{}/action", rule.pointer),
                    rule.reason
                        .clone()
                        .unwrap_or_else(|| format!("tool {tool} requires approval")),
                );
                held.approval = Some(Box::new(rule.approval.clone()));
                return held;
            }
            ToolAction::Allow => {}
        }
        if let Some(refusal) = near_miss(policy, args, &rule.pointer, trace) {
            return refusal;
        }
        if let Some(refusal) = check_schema(rule, tool, args, trace) {
            return refusal;
        }
        self.check(
            &[&policy.all_tools, &rule.checks],
            args,
            caller,
            (now, count),
            trace,
            &rule.pointer,
        )
        .with_reason_prefix(&rule.pointer, rule.reason.as_deref())
    }

    /// Conditions, then limits, of `all_tools` and the rule; allowed with `allow_rule` when
    /// all pass.
    fn check<T: Trace>(
        &self,
        sets: &[&Checks],
        args: &Value,
        caller: &CallerScope<'_>,
        (now, count): (Instant, Count),
        trace: &mut T,
        allow_rule: &str,
    ) -> Decision {
        for checks in sets {
            if let Some(refusal) = check_conditions(checks, args, trace) {
                return refusal;
            }
        }
        let reservation = match self.reserve(sets, args, caller, now, count, trace) {
            Ok(reservation) => reservation,
            Err(refusal) => return refusal,
        };
        trace.step(|| format!("allowed by {allow_rule}"));
        Decision {
            outcome: Outcome::Allow,
            would: None,
            rule: allow_rule.to_owned(),
            reason: None,
            reservation,
            approval: None,
        }
    }

    /// Reserves every limit of `sets` together, or refuses naming the first without room;
    /// with [`Count::Peek`], only checks that there is room.
    fn reserve<T: Trace>(
        &self,
        sets: &[&Checks],
        args: &Value,
        caller: &CallerScope<'_>,
        now: Instant,
        count: Count,
        trace: &mut T,
    ) -> Result<Option<Reservation>, Decision> {
        let limits = sets
            .iter()
            .flat_map(|c| c.limits.iter().enumerate().map(move |(i, l)| (*c, i, l)));
        let mut wants = Vec::new();
        let mut owners = Vec::new();
        for (checks, index, limit) in limits {
            let amount = match &limit.increment {
                None => 1.0,
                Some(path) => {
                    match path.get(args).and_then(Value::as_f64) {
                        Some(v) if v >= 0.0 && v.is_finite() => v,
                        found => {
                            let what = match (path.get(args), found) {
                                (None, _) => "is missing",
                                (Some(_), None) => "is not a number",
                                _ => "is negative",
                            };
                            trace.step(|| {
                                format!("limit {}/limits/{index}: {path} {what}", checks.pointer)
                            });
                            return Err(refuse(
                            Outcome::Deny,
                            format!("{}/limits/{index}/increment_from", checks.pointer),
                            format!("argument {path} {what}: it is what this call spends of quota {}", self.counter_name(limit.counter)),
                        ));
                        }
                    }
                }
            };
            let scope = self.policy.counters.get(limit.counter).map(|c| c.scope);
            wants.push(Want {
                counter: limit.counter,
                key: match scope {
                    Some(Scope::Grant) | None => caller.grant,
                    Some(Scope::Process) => caller.process,
                    Some(Scope::Session) => caller.session,
                    Some(Scope::Namespace) => caller.namespace,
                    Some(Scope::ServiceAccount) => caller.service_account,
                    Some(Scope::Server) => "",
                },
                window: limit.window.duration(),
                max: limit.max,
                amount,
            });
            owners.push((checks, index, limit));
        }
        if wants.is_empty() {
            return Ok(None);
        }
        let mut store = limits::lock(&self.counters);
        if store.generation() != self.generation {
            // A reload refitted the store after this engine was taken: find each counter by
            // name and scope; one the new policy dropped no longer limits anything.
            let mut kept = Vec::with_capacity(wants.len());
            let mut kept_owners = Vec::with_capacity(owners.len());
            for (mut want, owner) in wants.into_iter().zip(owners) {
                let found = self
                    .policy
                    .counters
                    .get(want.counter)
                    .and_then(|c| store.find(&c.name, c.scope));
                if let Some(id) = found {
                    want.counter = id;
                    kept.push(want);
                    kept_owners.push(owner);
                }
            }
            wants = kept;
            owners = kept_owners;
        }
        if T::ON {
            for (want, (checks, index, limit)) in wants.iter().zip(&owners) {
                let used = store.used(want.counter, want.key, want.window, now);
                trace.step(|| {
                    format!(
                        "limit {}/limits/{index}: counter {} ({} scope) has used {used} of {} per {}; this call adds {}",
                        checks.pointer,
                        self.counter_name(limit.counter),
                        self.policy.counters.get(limit.counter).map_or("", |c| c.scope.as_str()),
                        limit.max,
                        limit.window,
                        want.amount
                    )
                });
            }
        }
        let admitted = match count {
            Count::Reserve | Count::Approved => store.try_reserve(&self.counters, &wants, now),
            Count::Peek => store.would_admit(&wants, now).map(|()| {
                trace.step(|| "limits have room; explained without counting this call".to_owned());
                None
            }),
        };
        match admitted {
            Ok(reservation) => Ok(reservation),
            Err(failed) => {
                let Some((checks, index, limit)) = owners.get(failed) else {
                    return Err(refuse(
                        Outcome::Deny,
                        "/".to_owned(),
                        "quota exceeded".to_owned(),
                    ));
                };
                let name = self.counter_name(limit.counter);
                let reason = match &limit.increment {
                    None => {
                        let calls = if limit.max == 1.0 { "call" } else { "calls" };
                        format!(
                            "rate limit {name} exceeded: at most {} {calls} per {}",
                            limit.max, limit.window
                        )
                    }
                    Some(path) => format!(
                        "quota {name} exceeded: at most {} of {path} per {}",
                        limit.max, limit.window
                    ),
                };
                Err(refuse(
                    Outcome::Deny,
                    format!("{}/limits/{index}", checks.pointer),
                    reason,
                ))
            }
        }
    }

    /// How full each limit is: for every limit of the policy and every scope key with
    /// something counted within its window at `now`, one entry; the fullest (`used / max`)
    /// first, ties by counter then key then rule, at most `max_entries` of them.
    ///
    /// A pure read under one hold of the counters' lock: nothing is recorded or pruned. Keys
    /// whose admissions all fall outside a limit's window are not listed for that limit.
    pub fn usage(&self, now: Instant, max_entries: usize) -> Vec<Usage> {
        if max_entries == 0 {
            return Vec::new();
        }
        let policy = &self.policy;
        let limits: Vec<(String, &Limit)> = std::iter::once(&policy.all_tools)
            .chain(policy.rules.iter().map(|r| &r.checks))
            .flat_map(|checks| {
                checks.limits.iter().enumerate().map(move |(index, limit)| {
                    (format!("{}/limits/{index}", checks.pointer), limit)
                })
            })
            .collect();
        let store = limits::lock(&self.counters);
        // (fullness, index into `limits`, key, used), borrowing the keys from the store.
        let mut found: Vec<(f64, usize, &str, f64)> = Vec::new();
        for (at, (_, limit)) in limits.iter().enumerate() {
            let Some(counter) = policy.counters.get(limit.counter) else {
                continue;
            };
            let id = if store.generation() == self.generation {
                Some(limit.counter)
            } else {
                // A reload refitted the store: find the counter by name and scope, as
                // deciding does.
                store.find(&counter.name, counter.scope)
            };
            let Some(id) = id else {
                continue;
            };
            for (key, used) in store.usage(id, limit.window.duration(), now) {
                let fullness = if limit.max > 0.0 {
                    used / limit.max
                } else {
                    f64::INFINITY
                };
                found.push((fullness, at, key, used));
            }
        }
        let name = |at: usize| {
            limits
                .get(at)
                .map_or("", |(_, l)| self.counter_name(l.counter))
        };
        let rule = |at: usize| limits.get(at).map_or("", |(r, _)| r.as_str());
        let order = |a: &(f64, usize, &str, f64), b: &(f64, usize, &str, f64)| {
            b.0.total_cmp(&a.0)
                .then_with(|| name(a.1).cmp(name(b.1)))
                .then_with(|| a.2.cmp(b.2))
                .then_with(|| rule(a.1).cmp(rule(b.1)))
        };
        if found.len() > max_entries {
            found.select_nth_unstable_by(max_entries - 1, order);
            found.truncate(max_entries);
        }
        found.sort_unstable_by(order);
        found
            .into_iter()
            .filter_map(|(_, at, key, used)| {
                let (rule, limit) = limits.get(at)?;
                let counter = policy.counters.get(limit.counter)?;
                Some(Usage {
                    counter: counter.name.clone(),
                    scope: counter.scope.as_str().to_owned(),
                    key: key.to_owned(),
                    rule: rule.clone(),
                    window_secs: limit.window.duration().as_secs_f64(),
                    max: limit.max,
                    used,
                })
            })
            .collect()
    }

    fn counter_name(&self, id: usize) -> &str {
        self.policy.counters.get(id).map_or("", |c| c.name.as_str())
    }

    /// The rate-limit state, for tests that look at memory use.
    #[cfg(test)]
    pub(super) fn with_counters<T>(&self, f: impl FnOnce(&CounterStore) -> T) -> T {
        f(&limits::lock(&self.counters))
    }
}

/// Refuses a call with an argument key that only folds to a name the policy checks (see
/// [`super::folded`]); `rule` is the rule that would have decided it.
fn near_miss<T: Trace>(
    policy: &Policy,
    args: &Value,
    rule: &str,
    trace: &mut T,
) -> Option<Decision> {
    let (key, name) = policy.checked.near_miss(args)?;
    trace.step(|| format!("argument key {key:?} folds to {name:?}, which this policy checks"));
    Some(refuse(
        Outcome::Deny,
        rule.to_owned(),
        format!(
            "argument key {} differs only in letter case from {}, which this policy checks: a \
             server that matches keys ignoring case would read it as that",
            quote(key),
            quote(name)
        ),
    ))
}

/// A JSON string literal of `text`, for keys in reasons.
fn quote(text: &str) -> String {
    let mut out = String::new();
    mcpwarden_json::write_string(text, &mut out);
    out
}

/// The rule's `arguments` schema; a violation names the failing argument and keyword, never
/// the value (the audit log must not hold argument values).
fn check_schema<T: Trace>(
    rule: &ToolRule,
    tool: &str,
    args: &Value,
    trace: &mut T,
) -> Option<Decision> {
    let schema = rule.arguments.as_ref()?;
    if schema.0.is_valid(args) {
        trace.step(|| "arguments: match the schema".to_owned());
        return None;
    }
    let detail = schema
        .0
        .iter_errors(args)
        .next()
        .map(|e| {
            format!(
                "argument {} fails the schema at {}: {}",
                location_or_root(e.instance_path().as_str()),
                location_or_root(e.schema_path().as_str()),
                e.masked()
            )
        })
        .unwrap_or_else(|| "the arguments do not match the schema".to_owned());
    trace.step(|| format!("arguments: {detail}"));
    Some(refuse(
        Outcome::Deny,
        format!("{}/arguments", rule.pointer),
        format!("invalid arguments for {tool}: {detail}"),
    ))
}

/// `deny_if` (any holds: denied; a wrong type holds) then `require` (every one must hold; a
/// wrong type fails).
fn check_conditions<T: Trace>(checks: &Checks, args: &Value, trace: &mut T) -> Option<Decision> {
    let lists: [(&str, &[Condition], WrongType, bool); 2] = [
        ("deny_if", &checks.deny_if, WrongType::Holds, true),
        ("require", &checks.require, WrongType::Fails, false),
    ];
    for (field, conditions, wrong, denies_when) in lists {
        for (index, condition) in conditions.iter().enumerate() {
            let holds = if T::ON {
                let (holds, why) = condition.explain(args, wrong);
                trace.step(|| format!("{}/{field}/{index}: {why}", checks.pointer));
                holds
            } else {
                condition.holds(args, wrong)
            };
            if holds == denies_when {
                let verdict = if denies_when {
                    "holds"
                } else {
                    "does not hold"
                };
                return Some(refuse(
                    Outcome::Deny,
                    format!("{}/{field}/{index}", checks.pointer),
                    format!("{field} condition {verdict}: {condition}"),
                ));
            }
        }
    }
    None
}

fn refuse(outcome: Outcome, rule: String, reason: String) -> Decision {
    Decision {
        outcome,
        would: None,
        rule,
        reason: Some(reason),
        reservation: None,
        approval: None,
    }
}

impl Decision {
    /// Prefixes the reason of a refusal made by the tool's rule (`pointer` and below) with that
    /// rule's own `reason`, when it has one; refusals by `all_tools` keep theirs.
    fn with_reason_prefix(mut self, pointer: &str, prefix: Option<&str>) -> Decision {
        let own = self
            .rule
            .strip_prefix(pointer)
            .is_some_and(|rest| rest.starts_with('/'));
        if let (true, Some(prefix), Some(reason)) = (own, prefix, &self.reason) {
            self.reason = Some(format!("{prefix} ({reason})"));
        }
        self
    }
}
