//! The pinned datapath (`failure_mode: closed`): the programs' links and maps live in bpffs, so
//! they outlive the agent that made them and the next agent adopts them.
//!
//! ```text
//! <bpffs_dir>/                      0700, on a bpf filesystem (mounted at /sys/fs/bpf if absent)
//!   maps/<layout>/<MAP>             every map of the object; <layout> names their shapes
//!   links/<cgroup id>/<program>     one bpf_link per program and cgroup it is attached to
//! ```
//!
//! A starting agent loads its programs against `maps/<its layout>/` (the same maps, records in
//! flight and all, when the layout is unchanged; new ones beside the old when it changed), fills
//! them, and then, for each link already pinned, swaps the program it runs
//! (`BPF_LINK_UPDATE`, atomic: the cgroup is never without one); only links not pinned yet are
//! created. Then links and map directories it no longer uses are unpinned.
//!
//! Written by hand: aya 0.14 pins maps and links, but neither updates a cgroup link's program
//! nor lends a pinned link's descriptor, so `BPF_OBJ_GET` and `BPF_LINK_UPDATE` are two
//! `bpf(2)` calls here.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Bumped whenever a map's meaning changes without its shape changing (a field's use, the
/// order of two fields of one size): the shapes alone are hashed too.
pub const LAYOUT_VERSION: u32 = 1;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The id of the object's map layout: a hash of [`LAYOUT_VERSION`], `salt` (tests), and each
/// pinned map's name, type, key and value sizes, size and flags. Two builds share pinned maps
/// only when their ids are equal.
pub fn layout_id(object: &[u8], pinned: &[&str], salt: &str) -> Result<String> {
    let obj = aya_obj::Object::parse(object).context("reading the eBPF object's maps")?;
    let mut names: Vec<&str> = pinned.to_vec();
    names.sort_unstable();
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.to_le_bytes());
    h.update(salt.as_bytes());
    for name in names {
        let m = obj
            .maps
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map {name}"))?;
        h.update(name.as_bytes());
        for v in [
            m.map_type(),
            m.key_size(),
            m.value_size(),
            m.max_entries(),
            m.map_flags(),
        ] {
            h.update(v.to_le_bytes());
        }
    }
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// The pin directory of one agent installation.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        PinDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Make sure the directory exists, 0700, on a bpf filesystem: bpffs is mounted at
    /// /sys/fs/bpf when the directory is below it and nothing is mounted there yet.
    pub fn prepare(&self) -> Result<()> {
        let sys = Path::new("/sys/fs/bpf");
        if !on_bpffs(nearest_existing(&self.root)) {
            if !self.root.starts_with(sys) {
                bail!(
                    "bpffs_dir {} is not on a bpf filesystem (mount one there, or use a \
                     directory below /sys/fs/bpf)",
                    self.root.display()
                );
            }
            if super::cgroup::in_container() {
                bail!(
                    "{} is not a bpf filesystem and this agent runs in a container: a bpffs \
                     mounted here would vanish with the container, and with it the pinned \
                     datapath that keeps callers from going around the interceptor while no \
                     agent runs. Mount bpffs at /sys/fs/bpf on the node (systemd does at boot) \
                     and give the container that directory (a hostPath)",
                    sys.display()
                );
            }
            mount_bpffs(sys)?;
        }
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} 0700", self.root.display()))?;
        Ok(())
    }

    pub fn maps_dir(&self, layout: &str) -> PathBuf {
        self.root.join("maps").join(layout)
    }

    pub fn link_path(&self, cgroup_id: u64, program: &str) -> PathBuf {
        self.root
            .join("links")
            .join(cgroup_id.to_string())
            .join(program)
    }

    /// Every pinned link, as (cgroup id directory, program, path).
    pub fn links(&self) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        for cg in entries(&self.root.join("links")) {
            let cg_name = name_of(&cg);
            for link in entries(&cg) {
                out.push((cg_name.clone(), name_of(&link), link));
            }
        }
        out.sort();
        out
    }

    /// Every map layout directory pinned.
    pub fn layouts(&self) -> Vec<String> {
        let mut out: Vec<String> = entries(&self.root.join("maps"))
            .iter()
            .map(|p| name_of(p))
            .collect();
        out.sort();
        out
    }

    /// Unpin every map of `layout` (the maps go once no program uses them) and its directory.
    pub fn remove_layout(&self, layout: &str) -> Result<Vec<PathBuf>> {
        remove_tree(&self.maps_dir(layout))
    }

    /// Unpin the link at `path` (the program detaches once no descriptor holds the link), and
    /// its cgroup's directory when that was the last.
    pub fn remove_link(&self, path: &Path) -> Result<()> {
        fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
        if let Some(dir) = path.parent() {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    /// Unpin everything below the directory, and the directory: what `uninstall` does.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>> {
        remove_tree(&self.root)
    }
}

/// The descriptor of the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // union bpf_attr, obj member: pathname u64 @0, bpf_fd u32 @8, file_flags u32 @12.
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the attr buffer and the path outlive the call; the kernel reads `attr.len()` bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Make `link` run `program` from now on (`BPF_LINK_UPDATE`): one atomic swap, the attach
/// point never without a program.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    // union bpf_attr, link_update member: link_fd u32 @0, new_prog_fd u32 @4, flags u32 @8,
    // old_prog_fd u32 @12.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: the attr buffer outlives the call; both descriptors are open.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_ptr(), attr.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cgroup attach types mcpwarden's programs use (`enum bpf_attach_type`), with names.
pub const ATTACH_TYPES: &[(u32, &str)] = &[
    (2, "sock_create"),
    (3, "sock_ops"),
    (8, "bind4"),
    (9, "bind6"),
    (10, "connect4"),
    (11, "connect6"),
    (14, "sendmsg4"),
    (15, "sendmsg6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (43, "lsm_cgroup"),
];

/// The ids of the programs attached to `cgroup` itself for `attach_type` (`BPF_PROG_QUERY`,
/// what `bpftool cgroup show` asks), by anyone.
pub fn prog_query(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let f = fs::File::open(cgroup)?;
    let mut ids = vec![0u32; 256];
    // union bpf_attr, query member: target_fd u32 @0, attach_type u32 @4, query_flags u32 @8,
    // attach_flags u32 @12, prog_ids u64 @16, prog_cnt u32 @24.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(f.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: the attr buffer and the id array outlive the call; the kernel writes at most
    // `prog_cnt` ids.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let count = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
    ids.truncate(count.min(256));
    Ok(ids)
}

fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct of its own type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn nearest_existing(path: &Path) -> &Path {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    p
}

/// Mount bpffs at `at`, under a lock so that two agents starting together do not stack two
/// mounts (the second would hide the first one's pins).
fn mount_bpffs(at: &Path) -> Result<()> {
    let lock_path = Path::new("/run/mcpwarden-bpffs.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor this function owns; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("locking the bpffs mount");
    }
    if on_bpffs(at) {
        return Ok(());
    }
    fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes()).context("the bpffs mount point")?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", at.display()));
    }
    tracing::info!(at = %at.display(), "mounted a bpf filesystem for the pinned datapath");
    Ok(())
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Remove `root` and everything below it (bpffs: pins and directories), deepest first;
/// returns the pins removed.
fn remove_tree(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    let mut dirs = vec![root.to_path_buf()];
    let mut order = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in entries(&d) {
            if e.is_dir() {
                dirs.push(e);
            } else {
                fs::remove_file(&e).with_context(|| format!("unpinning {}", e.display()))?;
                removed.push(e);
            }
        }
        order.push(d);
    }
    for d in order.iter().rev() {
        fs::remove_dir(d).with_context(|| format!("removing {}", d.display()))?;
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_id_follows_the_maps_and_the_salt() -> Result<()> {
        let object = super::super::EBPF_OBJECT;
        let maps = super::super::MAPS;
        let a = layout_id(object, maps, "")?;
        assert_eq!(a, layout_id(object, maps, "")?, "stable for one object");
        assert_eq!(a.len(), 16);
        assert_ne!(a, layout_id(object, maps, "other build")?);
        assert_ne!(a, layout_id(object, &maps[1..], "")?, "one map fewer");
        assert!(layout_id(object, &["NO_SUCH_MAP"], "").is_err());
        Ok(())
    }
}
