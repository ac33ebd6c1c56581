//! Deciding tool calls against a loaded policy.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::limits::CounterStore;
use super::load::ToolRule;
use super::{CallerScope, Decision, Outcome, Policy};

/// A policy together with its rate-limit state.
///
/// One engine is shared by every connection that uses the policy, so that
/// limits count all of a workload's calls, whichever connection they come
/// over.
#[derive(Debug)]
pub struct Engine {
    policy: Policy,
    /// All counters behind one lock, so that a call with several limits
    /// checks and records them as one step.
    counters: Mutex<CounterStore>,
}

impl Engine {
    /// An engine with empty rate-limit logs.
    pub fn new(policy: Policy) -> Engine {
        let counters = Mutex::new(CounterStore::new(&policy.counters));
        Engine { policy, counters }
    }

    /// The policy this engine enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides a `tools/call` of `tool` by `caller` at `now`.
    ///
    /// An allowed call that is subject to limits is counted against them
    /// here: the caller must forward it (or account for it as made).
    #[must_use]
    pub fn decide_call(&self, tool: &str, caller: &CallerScope<'_>, now: Instant) -> Decision {
        if self.policy.hides(tool) {
            return Decision {
                outcome: Outcome::UnknownTool,
                rule: "/hide".to_owned(),
                reason: Some(format!("tool {tool} is hidden by this policy")),
            };
        }
        let Some(rule) = self.policy.tools.get(tool) else {
            return self.decide_unlisted(tool);
        };
        if rule.deny {
            return Decision {
                outcome: Outcome::Deny,
                rule: format!("{}/action", rule.pointer),
                reason: Some(
                    rule.reason
                        .clone()
                        .unwrap_or_else(|| format!("tool {tool} is denied by policy")),
                ),
            };
        }
        if rule.limits.is_empty() {
            return allow(rule.pointer.clone());
        }
        self.decide_limited(rule, caller, now)
    }

    /// A tool the policy does not list: the default decides.
    fn decide_unlisted(&self, tool: &str) -> Decision {
        if self.policy.default_allow {
            allow("/default".to_owned())
        } else {
            Decision {
                outcome: Outcome::UnknownTool,
                rule: "/default".to_owned(),
                reason: Some(format!(
                    "tool {tool} is not allowed by this policy (default deny)"
                )),
            }
        }
    }

    /// A listed, allowed tool with limits: admitted only if every limit has
    /// room, and then counted against all of them.
    fn decide_limited(&self, rule: &ToolRule, caller: &CallerScope<'_>, now: Instant) -> Decision {
        // Only the `grant` scope exists so far, so its key is the only one.
        let key = caller.grant;
        let admitted = self
            .counters
            .lock()
            // `try_admit` does not panic, so the store behind a poisoned lock
            // is still consistent; failing closed here would deny everything.
            .unwrap_or_else(PoisonError::into_inner)
            .try_admit(&rule.limits, &rule.counters, key, now);
        match admitted {
            Ok(()) => allow(rule.pointer.clone()),
            Err(index) => {
                let reason = rule.limits.get(index).map(|limit| {
                    let counter = self
                        .policy
                        .counters
                        .get(limit.counter)
                        .map_or("", |c| c.name.as_str());
                    let calls = if limit.max == 1 { "call" } else { "calls" };
                    format!(
                        "rate limit {counter} exceeded: at most {} {calls} per {}",
                        limit.max, limit.window
                    )
                });
                Decision {
                    outcome: Outcome::Deny,
                    rule: format!("{}/limits/{index}", rule.pointer),
                    reason,
                }
            }
        }
    }

    /// The rate-limit state, for tests that look at memory use.
    #[cfg(test)]
    pub(super) fn with_counters<T>(&self, f: impl FnOnce(&CounterStore) -> T) -> T {
        f(&self.counters.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn allow(rule: String) -> Decision {
    Decision {
        outcome: Outcome::Allow,
        rule,
        reason: None,
    }
}
