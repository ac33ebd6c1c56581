//! Which policy applies to which caller.
//!
//! Each server has a default policy (`servers[].policy`). The config's `bindings` is an ordered
//! list of `{match, policy}`; the first binding whose selector matches the caller (and the
//! server, when it names one) decides which policy file applies. Selectors:
//! - Kubernetes `namespace`, pod `labels`, `service_account`, `container` — known once the
//!   caller's pod metadata is;
//! - `cgroup`: a glob over the caller's cgroup path (`*` stays within one path segment, `**`
//!   crosses them);
//! - `uid` and `comm` (the process name). These are conveniences, not security boundaries: a
//!   process can rename itself, and a uid is shared by everything that runs as it.
//!
//! A binding that needs pod metadata for a caller in a pod whose metadata is not known yet
//! cannot be passed over (that could give the caller a weaker policy): the choice is then
//! [`Choice::Unresolved`], and the interceptor waits for the metadata, then refuses.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::{Decision, Engine, Outcome};

/// A policy file's current engine; reloading the file swaps it.
pub type EngineSlot = ArcSwap<Engine>;

/// What the node knows of a caller's pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    /// The pod's UID: the `grant` scope key of its callers.
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The container the calling process runs in, when known.
    pub container: Option<String>,
}

/// Whether the caller runs in a pod, and what is known of it.
#[derive(Debug, Clone, Copy)]
pub enum PodFacts<'a> {
    /// Not in a Kubernetes pod (by its cgroup): pod selectors never match.
    NotAPod,
    /// In a pod whose metadata is not known yet.
    Pending,
    Known(&'a PodMeta),
}

/// What selectors look at.
#[derive(Debug, Clone, Copy)]
pub struct CallerFacts<'a> {
    pub uid: u32,
    pub comm: &'a str,
    /// Relative to the cgroup2 mount (`/kubepods.slice/...`), when the cgroup still exists.
    pub cgroup: Option<&'a str>,
    pub pod: PodFacts<'a>,
}

/// A binding's `match`. Every field given must match; an empty selector matches everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Only calls to the server of this name.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub cgroup: Option<CgroupGlob>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
}

/// A glob over cgroup paths, compiled when the config is read.
#[derive(Clone)]
pub struct CgroupGlob {
    text: String,
    matcher: globset::GlobMatcher,
}

impl PartialEq for CgroupGlob {
    fn eq(&self, other: &CgroupGlob) -> bool {
        self.text == other.text
    }
}

impl Eq for CgroupGlob {}

impl fmt::Debug for CgroupGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CgroupGlob({:?})", self.text)
    }
}

impl CgroupGlob {
    /// # Errors
    ///
    /// A pattern globset cannot compile, or one that does not start with `/`.
    pub fn new(text: &str) -> Result<CgroupGlob, String> {
        if !text.starts_with('/') {
            return Err(format!(
                "cgroup pattern {text:?} must start with \"/\": it is matched against the path below the cgroup2 mount"
            ));
        }
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("cgroup pattern {text:?}: {e}"))?;
        Ok(CgroupGlob {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The directory every match lies in or below: the pattern up to the last `/` before its
    /// first glob character (`/a/b` for `/a/b/*.scope`, the pattern itself when it has none).
    pub fn literal_prefix(&self) -> &str {
        match self.text.find(['*', '?', '[', '{']) {
            None => &self.text,
            Some(i) => match self.text[..i].rfind('/') {
                Some(0) | None => "/",
                Some(j) => &self.text[..j],
            },
        }
    }
}

impl<'de> Deserialize<'de> for CgroupGlob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        CgroupGlob::new(&text).map_err(de::Error::custom)
    }
}

/// Whether a selector matches a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Yes,
    No,
    /// Everything else matches, but the pod selectors cannot be checked yet.
    Unresolved,
}

impl Selector {
    /// Whether the selector looks at pod metadata.
    pub fn needs_pod(&self) -> bool {
        self.namespace.is_some()
            || !self.labels.is_empty()
            || self.service_account.is_some()
            || self.container.is_some()
    }

    /// Whether calls by `caller` to `server` match.
    pub fn matches(&self, server: &str, caller: &CallerFacts<'_>) -> Match {
        let plain = self.server.as_deref().is_none_or(|s| s == server)
            && self.uid.is_none_or(|u| u == caller.uid)
            && self.comm.as_deref().is_none_or(|c| c == caller.comm)
            && self
                .cgroup
                .as_ref()
                .is_none_or(|g| caller.cgroup.is_some_and(|path| g.matches(path)));
        if !plain {
            return Match::No;
        }
        if !self.needs_pod() {
            return Match::Yes;
        }
        match caller.pod {
            PodFacts::NotAPod => Match::No,
            PodFacts::Pending => Match::Unresolved,
            PodFacts::Known(pod) => {
                let ok = self.namespace.as_deref().is_none_or(|n| n == pod.namespace)
                    && self
                        .labels
                        .iter()
                        .all(|(k, v)| pod.labels.get(k).is_some_and(|have| have == v))
                    && self
                        .service_account
                        .as_deref()
                        .is_none_or(|s| s == pod.service_account)
                    && self
                        .container
                        .as_deref()
                        .is_none_or(|c| pod.container.as_deref().is_none_or(|have| have == c));
                match (ok, &self.container, &pod.container) {
                    (false, _, _) => Match::No,
                    // The pod is known but not yet which of its containers calls (its status
                    // lists a container's id shortly after it starts): not passed over.
                    (true, Some(_), None) => Match::Unresolved,
                    (true, _, _) => Match::Yes,
                }
            }
        }
    }
}

/// One entry of `bindings`.
#[derive(Debug)]
pub struct Binding {
    pub selector: Selector,
    pub policy: PathBuf,
    pub slot: Arc<EngineSlot>,
}

/// Every server's default policy and the bindings, swapped whole when the config reloads.
#[derive(Debug)]
pub struct Routing {
    /// By server index (the config's order).
    pub defaults: Vec<Arc<EngineSlot>>,
    pub bindings: Vec<Binding>,
    /// How long a call may wait for its caller's pod metadata.
    pub identity_wait: Duration,
}

/// The policy that applies to one call.
#[derive(Debug)]
pub enum Choice {
    /// `binding` is the index of the binding that chose it; `None` for the server's default.
    Engine {
        engine: Arc<Engine>,
        binding: Option<usize>,
    },
    /// Binding `binding` needs pod metadata that is not known yet.
    Unresolved { binding: usize },
}

impl Routing {
    /// The first binding that matches, else the server's default.
    pub fn choose(&self, server: usize, server_name: &str, caller: &CallerFacts<'_>) -> Choice {
        for (index, binding) in self.bindings.iter().enumerate() {
            match binding.selector.matches(server_name, caller) {
                Match::Yes => {
                    return Choice::Engine {
                        engine: binding.slot.load_full(),
                        binding: Some(index),
                    }
                }
                Match::No => {}
                Match::Unresolved => return Choice::Unresolved { binding: index },
            }
        }
        match self.defaults.get(server) {
            Some(slot) => Choice::Engine {
                engine: slot.load_full(),
                binding: None,
            },
            // A server index out of range is a programming error; refuse rather than guess.
            None => Choice::Unresolved {
                binding: usize::MAX,
            },
        }
    }
}

impl Routing {
    /// The decision for every call of a caller whose pod metadata binding `binding` needs was
    /// not known within `identity_wait`: refused, never decided by another policy.
    pub fn unresolved(&self, binding: usize) -> Decision {
        let pointer = format!("/bindings/{binding}");
        Decision {
            outcome: Outcome::Deny,
            reason: Some(format!(
                "caller identity unresolved: binding {binding} selects on pod metadata, \
                 which was not known within {} ms",
                self.identity_wait.as_millis()
            )),
            rule: pointer,
            would: None,
            reservation: None,
            approval: None,
        }
    }
}

/// The policy applied to callers whose identity could not be resolved: every tool hidden.
pub fn unresolved_engine() -> Arc<Engine> {
    static UNRESOLVED: std::sync::LazyLock<Arc<Engine>> =
        std::sync::LazyLock::new(|| Arc::new(Engine::new(super::Policy::hide_everything())));
    UNRESOLVED.clone()
}

/// Whether a cgroup path is a Kubernetes pod's (kubelet's cgroupfs and systemd layouts).
/// The systemd layout names the pod slice `kubepods-<qos>-pod<uid>.slice`; the cgroupfs layout
/// has a `pod<uid>` directory below `kubepods`.
pub fn is_pod_cgroup(path: &str) -> bool {
    let mut below_kubepods = false;
    for segment in path.split('/') {
        // `contains`: a kubelet with a cgroup root of its own prefixes it (`kubelet-kubepods`).
        if segment.contains("kubepods") {
            if segment.contains("-pod") {
                return true;
            }
            below_kubepods = true;
        } else if below_kubepods && segment.len() > 3 && segment.starts_with("pod") {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(comm: &'a str, cgroup: Option<&'a str>, pod: PodFacts<'a>) -> CallerFacts<'a> {
        CallerFacts {
            uid: 1000,
            comm,
            cgroup,
            pod,
        }
    }

    fn selector(yaml: &str) -> Selector {
        match serde_yaml_ng::from_str(yaml) {
            Ok(s) => s,
            Err(e) => panic!("{yaml}: {e}"),
        }
    }

    #[test]
    fn plain_selectors() {
        let s = selector("{uid: 1000, comm: python3, cgroup: /agents/*.scope}");
        let cg = Some("/agents/a.scope");
        assert_eq!(
            s.matches("x", &facts("python3", cg, PodFacts::NotAPod)),
            Match::Yes
        );
        assert_eq!(
            s.matches("x", &facts("node", cg, PodFacts::NotAPod)),
            Match::No
        );
        assert_eq!(
            s.matches(
                "x",
                &facts("python3", Some("/agents/a/b.scope"), PodFacts::NotAPod)
            ),
            Match::No,
            "* stays within a segment"
        );
        assert_eq!(
            s.matches("x", &facts("python3", None, PodFacts::NotAPod)),
            Match::No
        );
        let deep = selector("{cgroup: /kubepods.slice/**}");
        assert_eq!(
            deep.matches(
                "x",
                &facts("a", Some("/kubepods.slice/p/c"), PodFacts::Pending)
            ),
            Match::Yes
        );
        let server = selector("{server: tools}");
        assert_eq!(
            server.matches("tools", &facts("a", None, PodFacts::NotAPod)),
            Match::Yes
        );
        assert_eq!(
            server.matches("other", &facts("a", None, PodFacts::NotAPod)),
            Match::No
        );
        assert_eq!(
            selector("{}").matches("x", &facts("a", None, PodFacts::Pending)),
            Match::Yes
        );
    }

    #[test]
    fn pod_selectors() {
        let s = selector(
            "{namespace: pay, labels: {app: agent}, service_account: bot, container: main}",
        );
        let mut pod = PodMeta {
            namespace: "pay".into(),
            name: "p".into(),
            uid: "u".into(),
            labels: BTreeMap::from([("app".into(), "agent".into()), ("x".into(), "y".into())]),
            service_account: "bot".into(),
            container: Some("main".into()),
        };
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::Yes
        );
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Pending)),
            Match::Unresolved
        );
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::NotAPod)),
            Match::No
        );
        // The container not known yet: a container selector waits; without one the pod decides.
        pod.container = None;
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::Unresolved
        );
        assert_eq!(
            selector("{labels: {app: agent}}")
                .matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::Yes
        );
        pod.container = Some("side".into());
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::No
        );
        pod.container = Some("main".into());
        pod.labels.remove("app");
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::No
        );
        pod.container = None;
        assert_eq!(
            s.matches("x", &facts("a", None, PodFacts::Known(&pod))),
            Match::No,
            "a label that fails decides before the container is known"
        );
        // A plain selector that fails decides before pod metadata is needed.
        let s = selector("{comm: python3, namespace: pay}");
        assert_eq!(
            s.matches("x", &facts("node", None, PodFacts::Pending)),
            Match::No
        );
    }

    #[test]
    fn bad_selectors_are_load_errors() {
        for (yaml, needle) in [
            ("{cgroup: relative/x}", "must start with"),
            ("{cgroup: \"/a/[\"}", "cgroup pattern"),
            ("{colour: red}", "unknown field"),
            ("{uid: -1}", "uid"),
        ] {
            let err = match serde_yaml_ng::from_str::<Selector>(yaml) {
                Ok(_) => panic!("{yaml} loaded"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn literal_prefixes() -> Result<(), String> {
        for (glob, prefix) in [
            ("/a/b/*.scope", "/a/b"),
            ("/a/b", "/a/b"),
            ("/**", "/"),
            ("/user.slice/**", "/user.slice"),
            ("/a/b?c/d", "/a"),
            ("/x{y,z}", "/"),
        ] {
            assert_eq!(CgroupGlob::new(glob)?.literal_prefix(), prefix, "{glob}");
        }
        Ok(())
    }

    #[test]
    fn pod_cgroups() {
        assert!(is_pod_cgroup(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-ab.scope"
        ));
        assert!(is_pod_cgroup("/kubepods/burstable/pod1234/abcd"));
        assert!(is_pod_cgroup(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod12.slice/cri-containerd-ab.scope"
        ));
        assert!(!is_pod_cgroup("/system.slice/sshd.service"));
        assert!(!is_pod_cgroup("/kubepods.slice"));
        assert!(!is_pod_cgroup("/user.slice/pod-ish"));
    }
}
