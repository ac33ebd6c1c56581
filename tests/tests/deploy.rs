//! The Kubernetes manifests (deploy/kustomize/), checked offline: every kustomization renders
//! (`kubectl kustomize`), the result validates strictly against the Kubernetes 1.32 API schemas
//! (PyPI's `kubernetes-validate`, installed by `cargo xtask setup` into `<target>/venv-kv`), and
//! the agent's DaemonSet and RBAC keep the properties the design depends on (below, one check
//! each). The example's config.yaml and policy.json are loaded by the agent's own code. Needs no
//! root and no cluster; a missing tool fails the test, never skips it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde::Deserialize;
use serde_yaml_ng::Value;

/// The Kubernetes release whose API schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.32.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

fn kustomize_root() -> PathBuf {
    workspace().join("deploy/kustomize")
}

/// Where `cargo xtask setup` installs the validator: `<target>/venv-kv`, the target directory
/// being `CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
fn validator() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace().join(dir),
        _ => workspace().join("target"),
    };
    target.join("venv-kv/bin/kubernetes-validate")
}

/// Every directory under deploy/kustomize holding a kustomization, sorted.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        if ["kustomization.yaml", "kustomization.yml", "Kustomization"]
            .iter()
            .any(|name| dir.join(name).is_file())
        {
            out.push(dir.to_path_buf());
        }
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&kustomize_root(), &mut out);
    out
}

/// One kustomization, rendered.
struct Rendered {
    /// Relative to deploy/kustomize (`base`, `example`, ...).
    name: String,
    yaml: String,
    docs: Vec<Value>,
}

fn parse_docs(yaml: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn render(dir: &Path) -> Rendered {
    let name = dir
        .strip_prefix(kustomize_root())
        .unwrap_or(dir)
        .display()
        .to_string();
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({e}): the manifests are rendered with `kubectl kustomize`. \
                 Run `cargo xtask setup` (it checks for kubectl) and install kubectl 1.27 or later"
            )
        });
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    let docs = parse_docs(&yaml, &name);
    assert!(!docs.is_empty(), "{name}: renders no object");
    Rendered { name, yaml, docs }
}

/// Every kustomization, rendered once for all the tests of this file.
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let dirs = kustomizations();
        let names: Vec<String> = dirs
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for wanted in ["base", "example", "uninstall"] {
            assert!(
                names.iter().any(|n| n == wanted),
                "deploy/kustomize/{wanted} is missing (found {names:?})"
            );
        }
        dirs.iter().map(|d| render(d)).collect()
    })
}

fn rendered_named(name: &str) -> &'static Rendered {
    rendered()
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no kustomization {name}"))
}

/// Runs the validator on `yaml` (written to a temporary file): Ok with its output when it exits
/// 0 having validated every one of `count` objects, and printed no warning (a kind it has no
/// schema for is only a warning) nor error.
fn validate(yaml: &str, count: usize, label: &str) -> Result<String, String> {
    let validator = validator();
    if !validator.is_file() {
        panic!(
            "{} is missing: run `cargo xtask setup`, which installs kubernetes-validate there",
            validator.display()
        );
    }
    let file = std::env::temp_dir().join(format!(
        "mcpwarden-deploy-{}-{}.yaml",
        std::process::id(),
        label.replace('/', "-")
    ));
    std::fs::write(&file, yaml).expect("writing the rendered manifests");
    let out = Command::new(&validator)
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): run `cargo xtask setup`",
            validator.display()
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| ["WARN", "ERROR", "FATAL"].iter().any(|p| l.starts_with(p)))
        .collect();
    if !out.status.success() || !complaints.is_empty() || passed != count {
        return Err(format!(
            "kubernetes-validate --kubernetes-version {KUBERNETES_VERSION} --strict: exit {}, \
             {passed} of {count} objects passed:\n{text}",
            out.status
        ));
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Reading the rendered objects.

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn find_mut<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(v: &Value) -> BTreeSet<String> {
    seq(v)
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// Every container of a pod template's spec, init containers included.
fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    seq(&pod["containers"])
        .iter()
        .chain(seq(&pod["initContainers"]))
}

fn agent(docs: &[Value]) -> Result<&Value, String> {
    find(docs, "DaemonSet", "mcpwarden").ok_or_else(|| "no DaemonSet mcpwarden".to_owned())
}

fn agent_pod(docs: &[Value]) -> Result<&Value, String> {
    Ok(&agent(docs)?["spec"]["template"]["spec"])
}

fn agent_container(docs: &[Value]) -> Result<&Value, String> {
    seq(&agent_pod(docs)?["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("mcpwarden"))
        .ok_or_else(|| "the DaemonSet has no container `mcpwarden`".to_owned())
}

// ---------------------------------------------------------------------------------------------
// The invariants of the agent's manifests: each a check of its own, with what it protects.

type Check = fn(&[Value]) -> Result<(), String>;

const AGENT_INVARIANTS: &[(&str, Check)] = &[
    (
        "the DaemonSet uses the node's network namespace (hostNetwork: true)",
        |docs| match agent_pod(docs)?["hostNetwork"].as_bool() {
            Some(true) => Ok(()),
            other => Err(format!("hostNetwork is {other:?}")),
        },
    ),
    (
        "the DaemonSet sees the node's processes (hostPID: true)",
        |docs| match agent_pod(docs)?["hostPID"].as_bool() {
            Some(true) => Ok(()),
            other => Err(format!("hostPID is {other:?}")),
        },
    ),
    (
        "no container declares `ports` (each would be a hostPort; old and new pods share the metrics socket)",
        |docs| {
            let with_ports: Vec<String> = docs
                .iter()
                .filter(|d| d["kind"].as_str() == Some("DaemonSet"))
                .flat_map(|d| containers(&d["spec"]["template"]["spec"]))
                .filter(|c| !c["ports"].is_null())
                .map(|c| c["name"].as_str().unwrap_or("?").to_owned())
                .collect();
            if with_ports.is_empty() {
                Ok(())
            } else {
                Err(format!("containers with ports: {with_ports:?}"))
            }
        },
    ),
    (
        "updates hand over: RollingUpdate with maxSurge 1 and maxUnavailable 0",
        |docs| {
            let strategy = &agent(docs)?["spec"]["updateStrategy"];
            let rolling = &strategy["rollingUpdate"];
            let is = |v: &Value, n: i64| v.as_i64() == Some(n) || v.as_str() == Some(&n.to_string());
            if strategy["type"].as_str() == Some("RollingUpdate")
                && is(&rolling["maxSurge"], 1)
                && is(&rolling["maxUnavailable"], 0)
            {
                Ok(())
            } else {
                Err(format!("updateStrategy is {strategy:?}"))
            }
        },
    ),
    (
        "the node CA Secret volume has defaultMode 0400",
        |docs| {
            let volume = seq(&agent_pod(docs)?["volumes"])
                .iter()
                .find(|v| v["secret"]["secretName"].as_str() == Some("mcpwarden-node-ca"))
                .ok_or("no volume of the Secret mcpwarden-node-ca")?;
            match volume["secret"]["defaultMode"].as_u64() {
                Some(0o400) => Ok(()),
                other => Err(format!("defaultMode is {other:?}, not 256 (0400)")),
            }
        },
    ),
    (
        "the ClusterRole mcpwarden grants exactly get/list/watch on pods and endpointslices",
        |docs| {
            let role = find(docs, "ClusterRole", "mcpwarden").ok_or("no ClusterRole mcpwarden")?;
            if !role["aggregationRule"].is_null() {
                return Err("it has an aggregationRule".into());
            }
            let mut granted = BTreeSet::new();
            for rule in seq(&role["rules"]) {
                let keys: BTreeSet<String> = rule
                    .as_mapping()
                    .map(|m| m.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                let allowed: BTreeSet<String> = ["apiGroups", "resources", "verbs"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                if !keys.is_subset(&allowed) {
                    return Err(format!("a rule has {keys:?}"));
                }
                let verbs: Vec<String> = strings(&rule["verbs"]).into_iter().collect();
                if verbs != ["get", "list", "watch"] {
                    return Err(format!("a rule grants verbs {verbs:?}"));
                }
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        granted.insert((group.clone(), resource));
                    }
                }
            }
            let expected: BTreeSet<(String, String)> = [
                (String::new(), "pods".to_owned()),
                ("discovery.k8s.io".to_owned(), "endpointslices".to_owned()),
            ]
            .into();
            if granted == expected {
                Ok(())
            } else {
                Err(format!("it grants {granted:?}"))
            }
        },
    ),
    (
        "the ClusterRole mcpwarden-node-taint grants only get and patch on nodes",
        |docs| {
            let role = find(docs, "ClusterRole", "mcpwarden-node-taint")
                .ok_or("no ClusterRole mcpwarden-node-taint")?;
            let rules = seq(&role["rules"]);
            let ok = rules.len() == 1
                && strings(&rules[0]["apiGroups"]) == BTreeSet::from([String::new()])
                && strings(&rules[0]["resources"]) == BTreeSet::from(["nodes".to_owned()])
                && strings(&rules[0]["verbs"])
                    == BTreeSet::from(["get".to_owned(), "patch".to_owned()])
                && rules[0]["resourceNames"].is_null();
            if ok {
                Ok(())
            } else {
                Err(format!("its rules are {rules:?}"))
            }
        },
    ),
    (
        "the node patch is narrowed by the ValidatingAdmissionPolicy mcpwarden-node-taint, bound with Deny",
        |docs| {
            let policy = find(docs, "ValidatingAdmissionPolicy", "mcpwarden-node-taint")
                .ok_or("no ValidatingAdmissionPolicy mcpwarden-node-taint")?;
            let binding = find(docs, "ValidatingAdmissionPolicyBinding", "mcpwarden-node-taint")
                .ok_or("no ValidatingAdmissionPolicyBinding mcpwarden-node-taint")?;
            if policy["spec"]["failurePolicy"].as_str() != Some("Fail") {
                return Err("failurePolicy is not Fail".into());
            }
            if binding["spec"]["policyName"].as_str() != Some("mcpwarden-node-taint")
                || strings(&binding["spec"]["validationActions"]) != BTreeSet::from(["Deny".to_owned()])
            {
                return Err(format!("the binding is {:?}", binding["spec"]));
            }
            let text = serde_yaml_ng::to_string(&policy["spec"]).unwrap_or_default();
            for needle in [
                "system:serviceaccount:mcpwarden:mcpwarden",
                "authentication.kubernetes.io/node-name",
                "mcpwarden.io/agent-not-ready",
            ] {
                if !text.contains(needle) {
                    return Err(format!("its spec never mentions {needle}"));
                }
            }
            Ok(())
        },
    ),
    (
        "the Namespace mcpwarden is labelled pod-security.kubernetes.io/enforce: privileged",
        |docs| {
            let ns = find(docs, "Namespace", "mcpwarden").ok_or("no Namespace mcpwarden")?;
            match ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str() {
                Some("privileged") => Ok(()),
                other => Err(format!("the label is {other:?}")),
            }
        },
    ),
    (
        "the config ConfigMap is mounted whole at /etc/mcpwarden, without subPath (reloads see the ..data swap)",
        |docs| {
            let pod = agent_pod(docs)?;
            let volume = seq(&pod["volumes"])
                .iter()
                .find(|v| v["configMap"]["name"].as_str() == Some("mcpwarden-config"))
                .ok_or("no volume of the ConfigMap mcpwarden-config")?;
            let name = volume["name"].as_str().ok_or("a volume without a name")?;
            let mounts: Vec<&Value> = containers(pod)
                .flat_map(|c| seq(&c["volumeMounts"]))
                .filter(|m| m["name"].as_str() == Some(name))
                .collect();
            if mounts.is_empty() {
                return Err(format!("volume {name} is mounted nowhere"));
            }
            for m in mounts {
                if !m["subPath"].is_null() || !m["subPathExpr"].is_null() {
                    return Err(format!("mounted with a subPath: {m:?}"));
                }
                if m["mountPath"].as_str() != Some("/etc/mcpwarden") {
                    return Err(format!("mounted at {:?}", m["mountPath"]));
                }
            }
            Ok(())
        },
    ),
    (
        "NODE_NAME comes from the downward API's spec.nodeName",
        |docs| {
            let env = seq(&agent_container(docs)?["env"]);
            let node = env
                .iter()
                .find(|e| e["name"].as_str() == Some("NODE_NAME"))
                .ok_or("no NODE_NAME in the agent's env")?;
            match node["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => Ok(()),
                other => Err(format!("NODE_NAME's fieldRef is {other:?}")),
            }
        },
    ),
    (
        "dnsPolicy is ClusterFirstWithHostNet (Service names resolve from the host network)",
        |docs| match agent_pod(docs)?["dnsPolicy"].as_str() {
            Some("ClusterFirstWithHostNet") => Ok(()),
            other => Err(format!("dnsPolicy is {other:?}")),
        },
    ),
    (
        "the DaemonSet tolerates every taint (operator: Exists, no key)",
        |docs| {
            let tolerations = seq(&agent_pod(docs)?["tolerations"]);
            if tolerations
                .iter()
                .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null())
            {
                Ok(())
            } else {
                Err(format!("tolerations are {tolerations:?}"))
            }
        },
    ),
    (
        "priorityClassName is system-node-critical",
        |docs| match agent_pod(docs)?["priorityClassName"].as_str() {
            Some("system-node-critical") => Ok(()),
            other => Err(format!("priorityClassName is {other:?}")),
        },
    ),
    (
        "the agent is not privileged and starts from no capability (drop ALL)",
        |docs| {
            let sc = &agent_container(docs)?["securityContext"];
            if sc["privileged"].as_bool() != Some(false) {
                return Err(format!("privileged is {:?}", sc["privileged"]));
            }
            if strings(&sc["capabilities"]["drop"]) != BTreeSet::from(["ALL".to_owned()]) {
                return Err(format!("drop is {:?}", sc["capabilities"]["drop"]));
            }
            Ok(())
        },
    ),
    (
        "terminationGracePeriodSeconds outlasts drain_seconds (30) and the approval timeout (45 s)",
        |docs| match agent_pod(docs)?["terminationGracePeriodSeconds"].as_i64() {
            Some(n) if n > 46 => Ok(()),
            other => Err(format!("terminationGracePeriodSeconds is {other:?}")),
        },
    ),
    (
        "the CRD approvals.mcpwarden.io serves Approval v1alpha1, namespaced, with a status subresource and a structural schema",
        |docs| approval_crd(docs).map(|_| ()),
    ),
    (
        "the Role mcpwarden-approvals grants exactly create/get/list/watch/delete on approvals and patch on approvals/status, to the agent",
        |docs| {
            let role = find(docs, "Role", "mcpwarden-approvals").ok_or("no Role mcpwarden-approvals")?;
            if role["metadata"]["namespace"].as_str() != Some("mcpwarden") {
                return Err(format!("its namespace is {:?}", role["metadata"]["namespace"]));
            }
            let granted = grants(role)?;
            let expected: BTreeSet<(String, String, String)> = [
                ("approvals", "create"),
                ("approvals", "get"),
                ("approvals", "list"),
                ("approvals", "watch"),
                ("approvals", "delete"),
                ("approvals/status", "patch"),
            ]
            .iter()
            .map(|(r, v)| ("mcpwarden.io".to_owned(), r.to_string(), v.to_string()))
            .collect();
            if granted != expected {
                return Err(format!("it grants {granted:?}"));
            }
            let binding = find(docs, "RoleBinding", "mcpwarden-approvals")
                .ok_or("no RoleBinding mcpwarden-approvals")?;
            let subjects = seq(&binding["subjects"]);
            let to_agent = subjects.len() == 1
                && subjects[0]["kind"].as_str() == Some("ServiceAccount")
                && subjects[0]["name"].as_str() == Some("mcpwarden")
                && subjects[0]["namespace"].as_str() == Some("mcpwarden");
            if binding["metadata"]["namespace"].as_str() != Some("mcpwarden")
                || binding["roleRef"]["kind"].as_str() != Some("Role")
                || binding["roleRef"]["name"].as_str() != Some("mcpwarden-approvals")
                || !to_agent
            {
                return Err(format!("the RoleBinding is {binding:?}"));
            }
            Ok(())
        },
    ),
    (
        "the ValidatingAdmissionPolicy mcpwarden-approvals checks decidedBy and keeps the agent's fields, bound with Deny",
        |docs| {
            let text = bound_policy(docs, "mcpwarden-approvals", &["approvals"], &["CREATE", "UPDATE"])?;
            // The approver's fields, those an UPDATE may change.
            let policy = find(docs, "ValidatingAdmissionPolicy", "mcpwarden-approvals")
                .ok_or("no policy")?;
            let fields = seq(&policy["spec"]["variables"])
                .iter()
                .find(|v| v["name"].as_str() == Some("approverFields"))
                .and_then(|v| v["expression"].as_str())
                .ok_or("no variable approverFields")?;
            if fields.replace(' ', "") != "['decision','decidedBy','decisionReason','for']" {
                return Err(format!("approverFields is {fields}"));
            }
            for needle in [
                "request.userInfo.username",
                "approverFields",
                "decisionReason",
                "oldObject.spec",
                "'refused'",
                "mcpwarden.io/node",
                "system:serviceaccount:mcpwarden:mcpwarden",
            ] {
                if !text.contains(needle) {
                    return Err(format!("its spec never mentions {needle}"));
                }
            }
            Ok(())
        },
    ),
    (
        "the ValidatingAdmissionPolicy mcpwarden-approvals-node keeps each agent to its own node's approvals, bound with Deny",
        |docs| {
            let text = bound_policy(
                docs,
                "mcpwarden-approvals-node",
                &["approvals", "approvals/status"],
                &["CREATE", "UPDATE", "DELETE"],
            )?;
            for needle in [
                "system:serviceaccount:mcpwarden:mcpwarden",
                "authentication.kubernetes.io/node-name",
                "spec['node']",
            ] {
                if !text.contains(needle) {
                    return Err(format!("its spec never mentions {needle}"));
                }
            }
            Ok(())
        },
    ),
];

/// Every (apiGroup, resource, verb) a Role or ClusterRole grants; a rule with anything but
/// apiGroups, resources and verbs (resourceNames, nonResourceURLs) is an error.
fn grants(role: &Value) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut granted = BTreeSet::new();
    for rule in seq(&role["rules"]) {
        let keys: BTreeSet<String> = rule
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if !keys
            .iter()
            .all(|k| ["apiGroups", "resources", "verbs"].contains(&k.as_str()))
        {
            return Err(format!("a rule has {keys:?}"));
        }
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    Ok(granted)
}

/// A ValidatingAdmissionPolicy with failurePolicy Fail, matching exactly `resources` of
/// mcpwarden.io for exactly `operations`, bound (a binding of the same name) with Deny; its spec
/// as YAML text.
fn bound_policy(
    docs: &[Value],
    name: &str,
    resources: &[&str],
    operations: &[&str],
) -> Result<String, String> {
    let policy = find(docs, "ValidatingAdmissionPolicy", name)
        .ok_or_else(|| format!("no ValidatingAdmissionPolicy {name}"))?;
    let binding = find(docs, "ValidatingAdmissionPolicyBinding", name)
        .ok_or_else(|| format!("no ValidatingAdmissionPolicyBinding {name}"))?;
    if policy["spec"]["failurePolicy"].as_str() != Some("Fail") {
        return Err("failurePolicy is not Fail".into());
    }
    if binding["spec"]["policyName"].as_str() != Some(name)
        || strings(&binding["spec"]["validationActions"]) != BTreeSet::from(["Deny".to_owned()])
        || !binding["spec"]["paramRef"].is_null()
    {
        return Err(format!("the binding is {:?}", binding["spec"]));
    }
    let rules = seq(&policy["spec"]["matchConstraints"]["resourceRules"]);
    let want = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let ok = rules.len() == 1
        && strings(&rules[0]["apiGroups"]) == want(&["mcpwarden.io"])
        && strings(&rules[0]["resources"]) == want(resources)
        && strings(&rules[0]["operations"]) == want(operations);
    if !ok {
        return Err(format!("its resourceRules are {rules:?}"));
    }
    if seq(&policy["spec"]["validations"]).is_empty() {
        return Err("it has no validations".into());
    }
    Ok(serde_yaml_ng::to_string(&policy["spec"]).unwrap_or_default())
}

/// The CRD of `Approval`, checked: its names, scope, one version served and stored with a status
/// subresource, a structural schema (every field typed, or explicitly free-form) with the
/// approver's fields and the agent's states.
fn approval_crd(docs: &[Value]) -> Result<&Value, String> {
    let crd = find(docs, "CustomResourceDefinition", "approvals.mcpwarden.io")
        .ok_or("no CustomResourceDefinition approvals.mcpwarden.io")?;
    let spec = &crd["spec"];
    let names = &spec["names"];
    if spec["group"].as_str() != Some("mcpwarden.io")
        || spec["scope"].as_str() != Some("Namespaced")
        || names["kind"].as_str() != Some("Approval")
        || names["plural"].as_str() != Some("approvals")
        || names["singular"].as_str() != Some("approval")
    {
        return Err(format!("group, scope or names: {spec:?}"));
    }
    let versions = seq(&spec["versions"]);
    let [version] = versions else {
        return Err(format!("{} versions", versions.len()));
    };
    if version["name"].as_str() != Some("v1alpha1")
        || version["served"].as_bool() != Some(true)
        || version["storage"].as_bool() != Some(true)
    {
        return Err(format!("the version is {:?}", version["name"]));
    }
    if version["subresources"]["status"].is_null() {
        return Err("no status subresource".into());
    }
    let schema = &version["schema"]["openAPIV3Schema"];
    structural(schema, "openAPIV3Schema")?;
    let spec_fields = &schema["properties"]["spec"]["properties"];
    for field in [
        "node",
        "server",
        "tool",
        "caller",
        "argKeys",
        "argsSha256",
        "arguments",
        "rule",
        "reason",
        "expiresAt",
        "decision",
        "decidedBy",
        "decisionReason",
        "for",
    ] {
        if spec_fields[field].is_null() {
            return Err(format!("spec.{field} is not in the schema"));
        }
    }
    if strings(&spec_fields["decision"]["enum"])
        != BTreeSet::from(["approve".to_owned(), "deny".to_owned()])
    {
        return Err(format!(
            "spec.decision's enum is {:?}",
            spec_fields["decision"]["enum"]
        ));
    }
    let states = strings(&schema["properties"]["status"]["properties"]["state"]["enum"]);
    for state in [
        "pending",
        "approved",
        "denied",
        "timed_out",
        "abandoned",
        "refused",
    ] {
        if !states.contains(state) {
            return Err(format!("status.state cannot be {state}"));
        }
    }
    Ok(crd)
}

/// A structural schema: every node has a type, or is explicitly free-form
/// (x-kubernetes-preserve-unknown-fields); no type is `object` without properties unless
/// free-form.
fn structural(schema: &Value, at: &str) -> Result<(), String> {
    let free = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
    if schema["type"].is_null() && !free {
        return Err(format!("{at} has no type"));
    }
    if schema["type"].as_str() == Some("object") && schema["properties"].is_null() && !free {
        return Err(format!("{at} is an object without properties"));
    }
    if let Some(props) = schema["properties"].as_mapping() {
        for (k, v) in props {
            structural(v, &format!("{at}.{}", k.as_str().unwrap_or("?")))?;
        }
    }
    if !schema["items"].is_null() {
        structural(&schema["items"], &format!("{at}[]"))?;
    }
    Ok(())
}

/// The invariants `docs` breaks, each as `invariant: why`.
fn agent_violations(docs: &[Value]) -> Vec<String> {
    AGENT_INVARIANTS
        .iter()
        .filter_map(|(name, check)| check(docs).err().map(|why| format!("{name}: {why}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_kustomization_renders_and_validates() {
    let mut failures = Vec::new();
    for r in rendered() {
        match validate(&r.yaml, r.docs.len(), &r.name) {
            Ok(_) => eprintln!(
                "{}: {} objects valid for Kubernetes {KUBERNETES_VERSION}",
                r.name,
                r.docs.len()
            ),
            Err(e) => failures.push(format!("{}: {e}", r.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_validator_rejects_what_the_api_server_would() {
    // A field the DaemonSet schema does not have: --strict must reject it (without --strict it
    // would pass unnoticed), so a passing validation above means something.
    let example = rendered_named("example");
    let mut docs = example.docs.clone();
    let ds = find_mut(&mut docs, "DaemonSet", "mcpwarden");
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let yaml: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap()))
        .collect();
    let err = validate(&yaml, docs.len(), "example-mutated")
        .expect_err("a misspelt field passed the validator");
    assert!(
        err.contains("hostNetwrok"),
        "the validator's complaint does not name the field: {err}"
    );
}

#[test]
fn agent_manifests_keep_their_invariants() {
    let with_agent: Vec<&Rendered> = rendered()
        .iter()
        .filter(|r| find(&r.docs, "DaemonSet", "mcpwarden").is_some())
        .collect();
    let names: Vec<&str> = with_agent.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains(&"base") && names.contains(&"example"),
        "the agent's DaemonSet should render from base and example (it does from {names:?})"
    );
    for r in with_agent {
        for (name, check) in AGENT_INVARIANTS {
            if let Err(why) = check(&r.docs) {
                panic!("deploy/kustomize/{}: {name}: {why}", r.name);
            }
        }
    }
}

#[test]
fn the_invariant_checks_catch_violations() {
    let example = &rendered_named("example").docs;
    assert_eq!(agent_violations(example), Vec::<String>::new());
    // Each mutation breaks one invariant; the checks must say which.
    type Mutation = fn(&mut [Value]);
    let mutations: &[(&str, &str, Mutation)] = &[
        (
            "a container port",
            "no container declares `ports`",
            |docs| {
                let ds = find_mut(docs, "DaemonSet", "mcpwarden");
                ds["spec"]["template"]["spec"]["containers"][0]["ports"] =
                    serde_yaml_ng::from_str("[{containerPort: 9478}]").unwrap();
            },
        ),
        (
            "maxUnavailable 1",
            "maxSurge 1 and maxUnavailable 0",
            |docs| {
                let ds = find_mut(docs, "DaemonSet", "mcpwarden");
                ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = Value::from(1);
            },
        ),
        ("a subPath on the config mount", "without subPath", |docs| {
            let ds = find_mut(docs, "DaemonSet", "mcpwarden");
            let mounts = ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                .as_sequence_mut()
                .unwrap();
            let config = mounts
                .iter_mut()
                .find(|m| m["mountPath"].as_str() == Some("/etc/mcpwarden"))
                .unwrap();
            config["subPath"] = Value::from("config.yaml");
        }),
        (
            "secrets in the ClusterRole",
            "exactly get/list/watch on pods and endpointslices",
            |docs| {
                let role = find_mut(docs, "ClusterRole", "mcpwarden");
                role["rules"].as_sequence_mut().unwrap().push(
                    serde_yaml_ng::from_str(
                        r#"{apiGroups: [""], resources: [secrets], verbs: [get, list, watch]}"#,
                    )
                    .unwrap(),
                );
            },
        ),
        ("a CA mode of 0644", "defaultMode 0400", |docs| {
            let ds = find_mut(docs, "DaemonSet", "mcpwarden");
            for v in ds["spec"]["template"]["spec"]["volumes"]
                .as_sequence_mut()
                .unwrap()
            {
                if !v["secret"].is_null() {
                    v["secret"]["defaultMode"] = Value::from(0o644);
                }
            }
        }),
        ("no hostNetwork", "hostNetwork: true", |docs| {
            let ds = find_mut(docs, "DaemonSet", "mcpwarden");
            ds["spec"]["template"]["spec"]["hostNetwork"] = Value::Bool(false);
        }),
        (
            "patch on approvals for the agent",
            "mcpwarden-approvals grants exactly",
            |docs| {
                let role = find_mut(docs, "Role", "mcpwarden-approvals");
                role["rules"][0]["verbs"]
                    .as_sequence_mut()
                    .unwrap()
                    .push(Value::from("patch"));
            },
        ),
        (
            "no status subresource",
            "with a status subresource",
            |docs| {
                let crd = find_mut(docs, "CustomResourceDefinition", "approvals.mcpwarden.io");
                crd["spec"]["versions"][0]["subresources"] = Value::Null;
            },
        ),
        (
            "an untyped field in the schema",
            "structural schema",
            |docs| {
                let crd = find_mut(docs, "CustomResourceDefinition", "approvals.mcpwarden.io");
                let props = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
                    ["properties"]["spec"]["properties"];
                props["extra"] = serde_yaml_ng::from_str("{description: untyped}").unwrap();
            },
        ),
        (
            "the approvals policy in Warn",
            "mcpwarden-approvals checks decidedBy",
            |docs| {
                let b = find_mut(
                    docs,
                    "ValidatingAdmissionPolicyBinding",
                    "mcpwarden-approvals",
                );
                b["spec"]["validationActions"] = serde_yaml_ng::from_str("[Warn]").unwrap();
            },
        ),
    ];
    for (what, invariant, mutate) in mutations {
        let mut docs = example.clone();
        mutate(&mut docs);
        let found = agent_violations(&docs);
        assert!(
            found.iter().any(|v| v.contains(invariant)),
            "with {what}, the checks should report \"{invariant}\"; they report {found:?}"
        );
        assert_eq!(
            found.len(),
            1,
            "with {what}, only one invariant should break: {found:?}"
        );
    }
}

/// Is `path` at or below `dir` (whole components)?
fn below(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

#[test]
fn example_config_fits_the_daemonset() {
    let docs = &rendered_named("example").docs;
    let config_map =
        find(docs, "ConfigMap", "mcpwarden-config").expect("ConfigMap mcpwarden-config");
    let data = &config_map["data"];
    let text = data["config.yaml"]
        .as_str()
        .expect("config.yaml in the ConfigMap");
    let config: Value = serde_yaml_ng::from_str(text).expect("config.yaml is YAML");
    let container = agent_container(docs).unwrap();
    let mounts: Vec<(String, bool)> = seq(&container["volumeMounts"])
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap_or_default().to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|(dir, _)| below(path, dir))
            .max_by_key(|(dir, _)| dir.len())
            .cloned()
    };

    // The command line reads this file.
    let args: Vec<&str> = seq(&container["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/mcpwarden/config.yaml"]),
        "the agent is not started with --config /etc/mcpwarden/config.yaml: {args:?}"
    );
    assert_eq!(
        args.first(),
        Some(&"run"),
        "the agent's args start with `run`: {args:?}"
    );

    // Paths the agent writes are on writable mounts, paths it reads on mounts at all.
    let writes = [
        ("state_dir", config["state_dir"].as_str()),
        ("bpffs_dir", config["bpffs_dir"].as_str()),
        ("audit.path", config["audit"]["path"].as_str()),
        ("admin.socket", config["admin"]["socket"].as_str()),
    ];
    for (key, path) in writes {
        let path = path.unwrap_or_else(|| panic!("config.yaml sets no {key}"));
        match mount_of(path) {
            Some((_, false)) => {}
            Some((dir, true)) => panic!("{key} {path} is on the read-only mount {dir}"),
            None => panic!("{key} {path} is on no volume: it would be lost with the pod"),
        }
    }
    let mut reads = vec![
        ("ca.cert", config["ca"]["cert"].as_str().map(str::to_owned)),
        ("ca.key", config["ca"]["key"].as_str().map(str::to_owned)),
    ];
    reads.extend(
        seq(&config["netns_dirs"])
            .iter()
            .map(|d| ("netns_dirs", d.as_str().map(str::to_owned))),
    );
    for (key, path) in reads {
        let path = path.unwrap_or_else(|| panic!("config.yaml sets no {key}"));
        assert!(mount_of(&path).is_some(), "{key} {path} is on no volume");
    }
    assert!(
        below(
            config["ca"]["cert"].as_str().unwrap_or_default(),
            "/etc/mcpwarden-ca"
        ),
        "the CA comes from the node-CA Secret's mount"
    );
    assert_eq!(
        config["agent_cgroup"].as_str(),
        Some("self"),
        "agent_cgroup: self"
    );
    assert!(
        config["cgroup"].is_null(),
        "cgroup: left at the default (the cgroup2 root)"
    );
    assert_eq!(
        config["kubernetes"]["remove_taint"].as_str(),
        Some("mcpwarden.io/agent-not-ready"),
        "the agent removes the taint the admission policy allows it to remove"
    );

    // Every policy a server names is in the ConfigMap, beside config.yaml.
    let servers = seq(&config["servers"]);
    assert!(!servers.is_empty(), "config.yaml has no servers");
    for s in servers {
        let policy = s["policy"].as_str().expect("a server without a policy");
        assert!(
            !data[policy].is_null(),
            "server {:?}: its policy {policy} is not in the ConfigMap",
            s["name"]
        );
    }
}

#[test]
fn example_policy_passes_policy_check() {
    let policy = kustomize_root().join("example/policy.json");
    let out = Command::new(env!("CARGO_BIN_EXE_mcpwarden-agent"))
        .args(["policy", "check", "--format", "json"])
        .arg(&policy)
        .output()
        .expect("running mcpwarden policy check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mcpwarden policy check {}: {text}{}",
        policy.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&text).expect("policy check --format json");
    let file = &report["files"][0];
    assert_eq!(file["ok"], true, "the example policy is invalid: {text}");
    assert_eq!(
        file["warnings"].as_array().map(Vec::len),
        Some(0),
        "mcpwarden policy check warns about the example policy: {text}"
    );
}

#[test]
fn example_config_loads() {
    let path = kustomize_root().join("example/config.yaml");
    let config = mcpwarden::config::Config::assemble(mcpwarden::config::Flags {
        config: Some(path.clone()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the agent refuses {}: {e:#}", path.display()));
    assert_eq!(config.servers.len(), 2);
    assert_eq!(config.agent_cgroup, Path::new("self"));
    assert_eq!(config.bpffs_dir, Path::new("/sys/fs/bpf/mcpwarden"));
    assert_eq!(
        config.operate.admin_socket,
        Path::new("/run/mcpwarden/admin.sock")
    );
}

#[test]
fn uninstall_runs_mcpwarden_uninstall_on_every_node() {
    let docs = &rendered_named("uninstall").docs;
    let ds = find(docs, "DaemonSet", "mcpwarden-uninstall").expect("DaemonSet mcpwarden-uninstall");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(
        seq(&pod["tolerations"])
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null()),
        "the uninstall DaemonSet must reach every node the agent ran on (tolerate every taint)"
    );
    let init = seq(&pod["initContainers"]);
    assert_eq!(init.len(), 1, "one init container runs mcpwarden uninstall");
    let args: Vec<&str> = seq(&init[0]["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args.first(),
        Some(&"uninstall"),
        "the init container runs `mcpwarden uninstall`: {args:?}"
    );
    assert_eq!(
        init[0]["image"]
            .as_str()
            .map(|i| i.split(':').next().unwrap()),
        agent_container(&rendered_named("example").docs).unwrap()["image"]
            .as_str()
            .map(|i| i.split(':').next().unwrap()),
        "the same image as the agent's"
    );
    let mounts: BTreeSet<String> = seq(&init[0]["volumeMounts"])
        .iter()
        .filter_map(|m| m["mountPath"].as_str().map(str::to_owned))
        .collect();
    assert!(
        mounts.contains("/sys/fs/bpf") && mounts.contains("/var/lib/mcpwarden"),
        "the uninstall container needs bpffs and the state dir: {mounts:?}"
    );
    assert!(containers(pod).all(|c| c["ports"].is_null()), "no ports");
    assert!(
        find(docs, "DaemonSet", "mcpwarden").is_none(),
        "the uninstall kustomization must not bring the agent back"
    );
}

#[test]
fn the_example_grants_approvers_patch_on_approvals_only() {
    let docs = &rendered_named("example").docs;
    let role = find(docs, "Role", "mcpwarden-approver").expect("Role mcpwarden-approver");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("mcpwarden"));
    let granted = grants(role).unwrap_or_else(|e| panic!("Role mcpwarden-approver: {e}"));
    let expected: BTreeSet<(String, String, String)> = ["get", "list", "watch", "patch"]
        .iter()
        .map(|v| {
            (
                "mcpwarden.io".to_owned(),
                "approvals".to_owned(),
                v.to_string(),
            )
        })
        .collect();
    assert_eq!(
        granted, expected,
        "approvers read and patch approvals; no status, create or delete"
    );
    // Bound by the installer to their own approvers: the example binds nobody.
    assert!(
        !docs
            .iter()
            .any(|d| d["roleRef"]["name"].as_str() == Some("mcpwarden-approver")),
        "the example must not bind mcpwarden-approver to anyone"
    );
}

#[test]
fn approvals_print_what_an_approver_decides_on() {
    let docs = &rendered_named("base").docs;
    let crd = approval_crd(docs).unwrap_or_else(|e| panic!("{e}"));
    let columns: Vec<(String, String)> =
        seq(&crd["spec"]["versions"][0]["additionalPrinterColumns"])
            .iter()
            .filter(|c| c["priority"].as_i64().unwrap_or(0) == 0)
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_owned(),
                    c["jsonPath"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
    for path in [
        ".spec.node",
        ".spec.tool",
        ".spec.caller.pod",
        ".spec.decision",
        ".status.state",
        ".metadata.creationTimestamp",
    ] {
        assert!(
            columns.iter().any(|(_, p)| p == path),
            "no printer column shows {path}: {columns:?}"
        );
    }
    assert!(
        seq(&crd["spec"]["names"]["shortNames"])
            .iter()
            .any(|n| n.as_str() == Some("mcpa")),
        "short name mcpa"
    );
}

#[test]
fn uninstalling_removes_the_approval_crd() {
    // `kubectl delete -k deploy/kustomize/example` (the uninstall's first step) deletes what the
    // example renders: the CRD, and with it every Approval, must be among it.
    let example = &rendered_named("example").docs;
    assert!(find(
        example,
        "CustomResourceDefinition",
        "approvals.mcpwarden.io"
    )
    .is_some());
    for name in ["mcpwarden-approvals", "mcpwarden-approvals-node"] {
        assert!(
            find(example, "ValidatingAdmissionPolicy", name).is_some(),
            "{name}"
        );
        assert!(
            find(example, "ValidatingAdmissionPolicyBinding", name).is_some(),
            "{name}"
        );
    }
    // ... and the uninstall kustomization does not bring it back.
    let uninstall = &rendered_named("uninstall").docs;
    assert!(
        !uninstall
            .iter()
            .any(|d| d["kind"].as_str() == Some("CustomResourceDefinition")
                || d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.contains("approv"))),
        "the uninstall kustomization creates approval objects again"
    );
}
