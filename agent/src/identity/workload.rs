//! What a cgroup path says of the workload in it: the Kubernetes pod (by UID), the container
//! runtime and the container id.
//!
//! Written by hand: the layouts are a handful of naming conventions of kubelet and the runtimes
//! (no library parses them), and the parse must never fail — a path it does not recognise only
//! means less is known of the caller.
//!
//! Layouts (cgroup v2, and the unified hierarchy of hybrid hosts, both relative to their mount):
//! - kubelet, systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/<leaf>`; Guaranteed pods sit directly under
//!   `kubepods.slice` (`kubepods-pod<uid>.slice`);
//! - kubelet, cgroupfs driver: `/kubepods/burstable/pod<uid>/<leaf>`, `/kubepods/pod<uid>/<leaf>`;
//! - leaves: containerd `cri-containerd-<id>.scope` (systemd) or `<id>` (cgroupfs), CRI-O
//!   `crio-<id>.scope` (and `crio-conmon-<id>.scope`, the monitor, not the container), Docker
//!   `docker-<id>.scope` or `/docker/<id>`, Podman `libpod-<id>.scope`; the systemd driver may
//!   also write `…pod<uid>.slice:cri-containerd:<id>`;
//! - inside a cgroup namespace the same paths appear below `/..` (`/../../pod<uid>/<id>`).

/// The container runtime that named a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    Podman,
}

/// What a cgroup path says of the workload in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// The pod's UID, with dashes (`3f1c2a9e-8d4b-…`), when the path is below a kubepods pod.
    pub pod_uid: Option<String>,
    pub runtime: Option<Runtime>,
    /// The container id (64 hex digits for the runtimes above).
    pub container_id: Option<String>,
    /// The path up to the segment that names the pod (`/kubepods.slice/…-pod<uid>.slice`): the
    /// directory whose owner says whether kubelet made it (see `identity::Resolver`).
    pub pod_dir: Option<String>,
}

/// Reads a cgroup path (relative to the cgroup2 mount, or as `/proc/PID/cgroup` shows it).
pub fn parse(path: &str) -> Workload {
    let mut w = Workload::default();
    let mut below_kubepods = false;
    let mut prefix = String::with_capacity(path.len());
    for segment in path.split('/') {
        if segment.is_empty() {
            continue;
        }
        prefix.push('/');
        prefix.push_str(segment);
        // Inside a cgroup namespace, the path climbs out of the namespace's root first: what
        // follows is a pod's when it names one (the kubepods part is above the root).
        if segment == ".." {
            below_kubepods = true;
            continue;
        }
        // `…pod<uid>.slice:cri-containerd:<id>`: the pod part, then the leaf.
        let (head, tail) = match segment.split_once(':') {
            Some((head, tail)) => (head, Some(tail)),
            None => (segment, None),
        };
        if let Some(uid) = pod_uid(head, below_kubepods) {
            w.pod_uid = Some(uid);
            w.pod_dir = Some(prefix.clone());
            w.runtime = None;
            w.container_id = None;
            if let Some(tail) = tail {
                leaf(tail.replace(':', "-").as_str(), &mut w, true);
            }
            continue;
        }
        if head.contains("kubepods") {
            below_kubepods = true;
            continue;
        }
        let in_pod = w.pod_uid.is_some();
        leaf(segment, &mut w, in_pod);
    }
    w
}

/// The pod UID a kubepods segment names: `kubepods-…-pod<uid>.slice` (systemd, `_` for `-`) or
/// `pod<uid>` below a `kubepods` segment (cgroupfs).
fn pod_uid(segment: &str, below_kubepods: bool) -> Option<String> {
    // `contains`: a kubelet with a cgroup root of its own prefixes it (kind: `kubelet-kubepods-…`).
    let candidate = if segment.contains("kubepods") {
        let at = segment.rfind("-pod")?;
        segment[at + 4..].strip_suffix(".slice")?
    } else if below_kubepods {
        segment.strip_prefix("pod")?
    } else {
        return None;
    };
    let uid = candidate.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A UUID as Kubernetes writes pod UIDs (8-4-4-4-12 hex digits), or the 32 hex digits kubelet
/// gives static pods (the hash of their manifest).
fn is_uid(s: &str) -> bool {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return true;
    }
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A leaf naming a container: sets the runtime and id it names. `in_pod`: a bare id (cgroupfs
/// driver) is the container only below a pod.
fn leaf(segment: &str, w: &mut Workload, in_pod: bool) {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let prefixed = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ];
    // The CRI-O monitor process (`crio-conmon-<id>.scope`) is not the container.
    if name.starts_with("crio-conmon-") || name.starts_with("libpod-conmon-") {
        return;
    }
    for (prefix, runtime) in prefixed {
        if let Some(id) = name.strip_prefix(prefix).filter(|id| is_container_id(id)) {
            w.runtime = Some(runtime);
            w.container_id = Some(id.to_owned());
            return;
        }
    }
    if is_container_id(name) && (in_pod || w.runtime == Some(Runtime::Docker)) {
        w.container_id = Some(name.to_owned());
    } else if name == "docker" {
        // cgroupfs Docker: `/docker/<id>`.
        w.runtime = Some(Runtime::Docker);
    }
}

/// Container ids are 64 hex digits; shorter runs of at least 12 are accepted (some tools
/// abbreviate), anything else is not an id.
fn is_container_id(s: &str) -> bool {
    (12..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c2a9e-8d4b-4c1e-9a7f-0b5e6d2c1a44";
    const UID_: &str = "3f1c2a9e_8d4b_4c1e_9a7f_0b5e6d2c1a44";
    const ID: &str = "5d1e0c8b7a6f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d";

    fn w(pod: Option<&str>, runtime: Option<Runtime>, id: Option<&str>) -> Workload {
        Workload {
            pod_uid: pod.map(str::to_owned),
            runtime,
            container_id: id.map(str::to_owned),
            pod_dir: None,
        }
    }

    #[test]
    fn every_runtime_and_driver_layout_is_read() {
        use Runtime::*;
        let table: Vec<(String, Workload)> = vec![
            // containerd, systemd driver, each QoS class.
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            // containerd, cgroupfs driver: a bare id below the pod.
            (format!("/kubepods/burstable/pod{UID}/{ID}"), w(Some(UID), None, Some(ID))),
            (format!("/kubepods/pod{UID}/{ID}"), w(Some(UID), None, Some(ID))),
            // The systemd driver's `slice:runtime:id` form.
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"),
             w(Some(UID), Some(Containerd), Some(ID))),
            // CRI-O: the container, and its monitor (not a container).
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"),
             w(Some(UID), Some(Crio), Some(ID))),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"),
             w(Some(UID), None, None)),
            // Docker (cri-dockerd) under kubelet, and plain Docker with either driver.
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"),
             w(Some(UID), Some(Docker), Some(ID))),
            (format!("/system.slice/docker-{ID}.scope"), w(None, Some(Docker), Some(ID))),
            (format!("/docker/{ID}"), w(None, Some(Docker), Some(ID))),
            // Podman.
            (format!("/machine.slice/libpod-{ID}.scope/container"), w(None, Some(Podman), Some(ID))),
            (format!("/machine.slice/libpod-conmon-{ID}.scope"), w(None, None, None)),
            // Seen from inside a cgroup namespace.
            (format!("/../../pod{UID}/{ID}"), w(Some(UID), None, Some(ID))),
            (format!("/../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            // kind: kubelet's cgroup root `/kubelet` with the systemd driver.
            (format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            (format!("/kubelet/kubepods/burstable/pod{UID}/{ID}"), w(Some(UID), None, Some(ID))),
            // A static pod: its UID is the hash of its manifest.
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3c9d2e8b7a61544c2d1e0f9a8b7c6d.slice/cri-containerd-{ID}.scope"),
             w(Some("0f3c9d2e8b7a61544c2d1e0f9a8b7c6d"), Some(Containerd), Some(ID))),
            // Below a test's or a nested attach point.
            (format!("/mcpwarden-tests/t1/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
             w(Some(UID), Some(Containerd), Some(ID))),
            // The pod's own cgroup (the sandbox's processes sit in a leaf of their own).
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
             w(Some(UID), None, None)),
            // Not workloads.
            ("/system.slice/sshd.service".into(), w(None, None, None)),
            ("/user.slice/user-1000.slice/session-3.scope".into(), w(None, None, None)),
            ("/kubepods.slice".into(), w(None, None, None)),
            ("/".into(), w(None, None, None)),
            ("/user.slice/pod-ish".into(), w(None, None, None)),
            // A pod segment that is not a UID is not a pod.
            ("/kubepods/burstable/podnotauid/abc".into(), w(None, None, None)),
            ("/kubepods.slice/kubepods-pod1234.slice".into(), w(None, None, None)),
        ];
        for (path, want) in table {
            let got = parse(&path);
            assert_eq!(
                Workload {
                    pod_dir: None,
                    ..got.clone()
                },
                want,
                "{path}"
            );
            // The pod's directory is the path up to the segment naming the pod.
            if let Some(dir) = &got.pod_dir {
                assert!(path.starts_with(dir.as_str()), "{path}: {dir}");
                let uid = got.pod_uid.clone().unwrap_or_default();
                let last = dir.rsplit('/').next().unwrap_or_default();
                assert!(
                    last.contains(&uid.replace('-', "_")) || last.contains(&uid),
                    "{dir}"
                );
            }
            assert_eq!(got.pod_dir.is_some(), got.pod_uid.is_some(), "{path}");
        }
    }

    #[test]
    fn a_bare_hex_leaf_outside_a_pod_is_not_a_container() {
        assert_eq!(parse(&format!("/system.slice/{ID}")), Workload::default());
    }
}
