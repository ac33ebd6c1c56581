//! cgroup v2 plumbing: where the unified hierarchy is mounted, which cgroup a path or an id names,
//! and moving the agent into its own cgroup.
//!
//! The mount point is read from /proc/mounts (it is /sys/fs/cgroup on most hosts, but
//! /sys/fs/cgroup/unified on hybrid hosts): never assume either.

use std::{
    collections::HashMap,
    fs, io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Mutex,
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

/// Resolves cgroup ids to paths (relative to the mount, starting with '/'), with a bounded cache.
///
/// The id → path step uses `open_by_handle_at` with a kernfs file handle, the same way bpftool and
/// systemd do it: it works after the connecting process has exited, unlike /proc/PID/cgroup.
pub struct CgroupNames {
    mount: PathBuf,
    mount_dir: fs::File,
    cache: Mutex<HashMap<u64, String>>,
}

/// FILEID_KERNFS: the file-handle type of cgroupfs (include/linux/exportfs.h).
const FILEID_KERNFS: i32 = 0xfe;
const CACHE_MAX: usize = 4096;

impl CgroupNames {
    pub fn new(mount: &Path) -> Result<Self> {
        let mount_dir =
            fs::File::open(mount).with_context(|| format!("opening {}", mount.display()))?;
        Ok(CgroupNames {
            mount: mount.to_path_buf(),
            mount_dir,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The path of cgroup `id` relative to the mount ("/" for the root), or None when the cgroup
    /// no longer exists.
    pub fn path_of(&self, id: u64) -> Option<String> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(p) = cache.get(&id) {
                return Some(p.clone());
            }
        }
        let path = self.lookup(id).ok()?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(id, path.clone());
        }
        Some(path)
    }

    fn lookup(&self, id: u64) -> io::Result<String> {
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: KernfsHandle has the layout of `struct file_handle` with 8 bytes of payload;
        // the fd returned is owned below.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount_dir.as_raw_fd(),
                (&mut handle as *mut KernfsHandle).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let link = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let rel = link.strip_prefix(&self.mount).map_err(|_| {
            io::Error::other(format!("{} is not below the cgroup2 mount", link.display()))
        })?;
        let rel = rel.as_os_str().as_bytes();
        Ok(format!("/{}", String::from_utf8_lossy(rel)))
    }
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
