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

/// Create `dir` if needed and move this whole process (every thread) into it.
pub fn join(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the agent into cgroup {}", dir.display()))
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
