//! Which cgroup an id names: cgroup v2 ids are inode numbers, resolved to paths with
//! `open_by_handle_at`, through a bounded cache.

use std::{
    fs, io,
    num::NonZeroUsize,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use lru::LruCache;

/// Resolves cgroup ids to paths (relative to the mount, starting with '/'), with a bounded cache.
///
/// The id → path step uses `open_by_handle_at` with a kernfs file handle, the same way bpftool and
/// systemd do it: it works after the connecting process has exited, unlike /proc/PID/cgroup.
pub struct CgroupNames {
    mount: PathBuf,
    mount_dir: fs::File,
    cache: Mutex<LruCache<u64, Arc<str>>>,
}

/// FILEID_KERNFS: the file-handle type of cgroupfs (include/linux/exportfs.h).
const FILEID_KERNFS: i32 = 0xfe;
/// Cgroup names kept (least recently used dropped).
const CACHE_MAX: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

impl CgroupNames {
    pub fn new(mount: &Path) -> Result<Self> {
        let mount_dir =
            fs::File::open(mount).with_context(|| format!("opening {}", mount.display()))?;
        Ok(CgroupNames {
            mount: mount.to_path_buf(),
            mount_dir,
            cache: Mutex::new(LruCache::new(CACHE_MAX)),
        })
    }

    /// The path of cgroup `id` relative to the mount ("/" for the root), or None when the cgroup
    /// no longer exists.
    pub fn path_of(&self, id: u64) -> Option<Arc<str>> {
        if let Some(p) = self.cache().get(&id) {
            return Some(p.clone());
        }
        // Looked up without the lock: a concurrent miss for the same id only costs a second look.
        let path: Arc<str> = self.lookup(id).ok()?.into();
        self.cache().put(id, path.clone());
        Some(path)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Arc<str>>> {
        // The cache holds no invariant a panic could break.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    use crate::redirect::cgroup::{cgroup2_mount, id_of};

    #[test]
    fn ids_resolve_to_paths_below_the_mount_and_stay_cached() -> Result<()> {
        let mount = cgroup2_mount()?;
        let names = CgroupNames::new(&mount)?;
        let root = id_of(&mount)?;
        assert_eq!(names.path_of(root).as_deref(), Some("/"));
        assert!(
            names.cache().peek(&root).is_some(),
            "cached after the first look-up"
        );
        // No cgroup has this id (kernfs numbers its nodes from 1 upwards).
        assert_eq!(names.path_of(u64::MAX), None);
        Ok(())
    }
}
