//! cgroup v2 plumbing: where the unified hierarchy is mounted, which cgroup a path names, and
//! moving the agent into its own cgroup. (Which cgroup an id names is `identity`'s.)
//!
//! The mount point is read from /proc/mounts (it is /sys/fs/cgroup on most hosts, but
//! /sys/fs/cgroup/unified on hybrid hosts): never assume either.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// The first cgroup2 mount in /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    parse_cgroup2_mount(&mounts).ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup2 filesystem is mounted (see /proc/mounts); mcpwarden needs cgroup v2"
        )
    })
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        let fstype = fields.next()?;
        // /proc/mounts escapes spaces and friends as octal (\040).
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(target)))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The inode of one of `pid`'s namespaces (`/proc/PID/ns/KIND`), if readable.
fn namespace_of(pid: &str, kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// Whether this process runs in a mount namespace other than the host's init's (a container
/// with the host's PID namespace: PID 1 is the host's init). False when PID 1's namespaces
/// cannot be read: then there is nothing to compare with.
pub fn in_container() -> bool {
    match (namespace_of("self", "mnt"), namespace_of("1", "mnt")) {
        (Some(own), Some(init)) => own != init,
        _ => false,
    }
}

/// In a container, runtimes give the process a cgroup namespace of its own (cgroup v2): its
/// cgroup path reads `/` and callers' paths are relative to it. The agent needs the host's
/// view (its own cgroup, the attach point, callers' pods), so it joins the cgroup namespace of
/// the host's init (PID 1, with the host's PID namespace; needs CAP_SYS_ADMIN). Namespaces are
/// per thread: call this before any thread is started. Returns whether it moved.
pub fn join_host_cgroup_namespace() -> Result<bool> {
    let (Some(own), Some(init)) = (namespace_of("self", "cgroup"), namespace_of("1", "cgroup"))
    else {
        return Ok(false);
    };
    if own == init {
        return Ok(false);
    }
    let file = fs::File::open("/proc/1/ns/cgroup")
        .context("opening /proc/1/ns/cgroup (the host's cgroup namespace; hostPID is needed)")?;
    // SAFETY: setns on a descriptor this function owns; it changes only the calling thread's
    // cgroup namespace, and no other thread exists yet.
    let rc = unsafe {
        libc::setns(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::CLONE_NEWCGROUP,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("joining the host's cgroup namespace (CAP_SYS_ADMIN is needed)");
    }
    Ok(true)
}

/// A cgroup given on the command line: absolute, or relative to the cgroup2 mount. Relative paths
/// may not climb out of the mount.
pub fn resolve(mount: &Path, given: &Path) -> Result<PathBuf> {
    if given
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("cgroup {} must not contain '..'", given.display());
    }
    if given.is_absolute() {
        if !given.starts_with(mount) {
            bail!(
                "cgroup {} is not below the cgroup2 mount {}",
                given.display(),
                mount.display()
            );
        }
        return Ok(given.to_path_buf());
    }
    Ok(mount.join(given))
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn id_of(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir)
        .with_context(|| format!("reading cgroup {}", dir.display()))?
        .ino())
}

/// The ids of `dir` and of every cgroup below it (at most [`MAX_WALK`] directories).
pub fn ids_below(dir: &Path) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if out.len() >= MAX_WALK {
            break;
        }
        if let Ok(m) = fs::metadata(&d) {
            out.insert(m.ino());
        }
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// The cgroup directory of process `pid` (`self` for this one), from `/proc/PID/cgroup`.
pub fn of_process(mount: &Path, pid: &str) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow::anyhow!("process {pid} is in no cgroup v2 ({file})"))?;
    Ok(mount.join(rel.trim().trim_start_matches('/')))
}

/// Create `dir` if needed and move this whole process (every thread) into it.
pub fn join(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the agent into cgroup {}", dir.display()))
}

/// A cgroup subtree that a user other than root can change: a directory, or its
/// `cgroup.procs`, that a non-root user owns or may write (systemd's `user@UID.service`
/// delegation, or a hand-made `chown`). Such a user can create cgroups there and move their
/// processes between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegated {
    /// Relative to the cgroup2 mount, with a leading `/`.
    pub path: String,
    pub uid: u32,
}

/// Directories walked at most when looking for delegated subtrees.
const MAX_WALK: usize = 200_000;

/// Every delegated subtree below `mount` (the topmost one of each branch).
pub fn delegated_subtrees(mount: &Path) -> Vec<Delegated> {
    let mut out = Vec::new();
    let mut stack = vec![mount.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = stack.pop() {
        walked += 1;
        if walked > MAX_WALK {
            break;
        }
        if let Some(uid) = writable_by_user(&dir) {
            out.push(Delegated {
                path: relative(mount, &dir),
                uid,
            });
            continue;
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The uid of a non-root user that may change this cgroup (u32::MAX when group- or
/// other-writable by anyone).
fn writable_by_user(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(dir).ok()?;
    if meta.uid() != 0 {
        return Some(meta.uid());
    }
    let procs = fs::metadata(dir.join("cgroup.procs")).ok()?;
    if procs.uid() != 0 {
        return Some(procs.uid());
    }
    let mode = procs.permissions().mode();
    let group_writable = mode & 0o020 != 0 && procs.gid() != 0;
    let other_writable = mode & 0o002 != 0;
    (group_writable || other_writable).then_some(u32::MAX)
}

fn relative(mount: &Path, dir: &Path) -> String {
    match dir.strip_prefix(mount) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_owned(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// Where processes matching `glob` (a binding's `cgroup` selector) could be put by a non-root
/// user: the delegated subtree it can match in, if any — including the subtree systemd creates
/// for any user who logs in later (`/user.slice/user-UID.slice/user@UID.service`). `mount`
/// is walked for the cgroups that exist below each subtree now.
pub fn delegation_conflict(
    glob: &crate::policy::bindings::CgroupGlob,
    delegated: &[Delegated],
    mount: &Path,
) -> Option<Delegated> {
    let prefix_text = glob.literal_prefix();
    // systemd delegates /user.slice/user-UID.slice/user@UID.service to each user who logs in.
    let uid = prefix_text
        .strip_prefix("/user.slice/user-")
        .and_then(|rest| rest.split(".slice").next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(65532);
    let future = Delegated {
        path: format!("/user.slice/user-{uid}.slice/user@{uid}.service"),
        uid,
    };
    let prefix = Path::new(prefix_text);
    delegated
        .iter()
        .chain(std::iter::once(&future))
        .find(|d| {
            let root = Path::new(&d.path);
            // Every match lies below the prefix: below a delegated subtree, all are the user's.
            if prefix.starts_with(root) {
                return true;
            }
            if !root.starts_with(prefix) {
                return false;
            }
            probes(&d.path).iter().any(|p| glob.matches(p))
                || existing_below(mount, &d.path)
                    .iter()
                    .any(|p| glob.matches(p))
        })
        .cloned()
}

/// Paths a user could create at and below a delegated subtree, in the shapes systemd uses.
fn probes(root: &str) -> Vec<String> {
    const NAMES: [&str; 4] = [
        "mcpwarden-probe",
        "mcpwarden-probe.scope",
        "mcpwarden-probe.service",
        "mcpwarden-probe.slice",
    ];
    let mut out = vec![root.to_owned()];
    let mut level = vec![root.to_owned()];
    for _ in 0..3 {
        let next: Vec<String> = level
            .iter()
            .flat_map(|p| NAMES.iter().map(move |n| format!("{p}/{n}")))
            .collect();
        out.extend(next.iter().cloned());
        level = next;
    }
    out
}

/// The cgroups below `root` (relative to `mount`) that exist now, at most a few thousand.
fn existing_below(mount: &Path, root: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![mount.join(root.trim_start_matches('/'))];
    while let Some(dir) = stack.pop() {
        if out.len() > 5000 {
            break;
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(relative(mount, &e.path()));
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            parse_cgroup2_mount("none /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn bindings_that_reach_into_a_users_subtree_are_found() -> Result<()> {
        use crate::policy::bindings::CgroupGlob;
        let mount = std::env::temp_dir().join(format!("mcpwarden-deleg-{}", std::process::id()));
        let user = mount.join("user.slice/user-1000.slice/user@1000.service/app.slice/x.scope");
        fs::create_dir_all(&user)?;
        fs::create_dir_all(mount.join("system.slice/ci.scope"))?;
        let delegated_dir = mount.join("user.slice/user-1000.slice/user@1000.service");
        std::os::unix::fs::chown(&delegated_dir, Some(1000), Some(1000))?;
        let found = delegated_subtrees(&mount);
        assert_eq!(
            found,
            vec![Delegated {
                path: "/user.slice/user-1000.slice/user@1000.service".into(),
                uid: 1000
            }]
        );
        let conflict = |g: &str| -> Result<Option<String>> {
            let glob = CgroupGlob::new(g).map_err(|e| anyhow::anyhow!(e))?;
            Ok(delegation_conflict(&glob, &found, &mount).map(|d| d.path))
        };
        let users = Some("/user.slice/user-1000.slice/user@1000.service".to_owned());
        assert_eq!(conflict("/user.slice/**")?, users);
        assert_eq!(conflict("/**")?, users);
        assert_eq!(
            conflict("/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope")?,
            users,
            "an existing cgroup inside"
        );
        assert_eq!(
            conflict("/user.slice/user-1000.slice/user@1000.service/app.slice/not-yet.scope")?,
            users,
            "one the user could create"
        );
        assert_eq!(
            conflict("/user.slice/*/user@*.service/*.slice/*")?,
            users,
            "a glob over the shapes systemd uses"
        );
        // A user who logs in later gets a subtree too.
        assert!(conflict("/user.slice/user-2000.slice/**")?.is_some());
        assert_eq!(conflict("/system.slice/ci.scope")?, None);
        assert_eq!(conflict("/system.slice/*.scope")?, None);
        assert_eq!(conflict("/kubepods.slice/**")?, None);
        fs::remove_dir_all(&mount)?;
        Ok(())
    }

    #[test]
    fn resolves_relative_and_absolute() -> Result<()> {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve(m, Path::new("a/b"))?,
            PathBuf::from("/sys/fs/cgroup/unified/a/b")
        );
        assert_eq!(
            resolve(m, Path::new("/sys/fs/cgroup/unified/x"))?,
            PathBuf::from("/sys/fs/cgroup/unified/x")
        );
        assert!(resolve(m, Path::new("/tmp/x")).is_err());
        assert!(resolve(m, Path::new("../x")).is_err());
        assert!(resolve(m, Path::new("/sys/fs/cgroup/unified/../../x")).is_err());
        Ok(())
    }
}
