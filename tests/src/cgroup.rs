//! cgroup v2 test directories and spawning processes inside them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Mount point of the cgroup v2 hierarchy, read from /proc/mounts (first `cgroup2` entry).
/// Panics if there is none: the sock_addr hooks need cgroup v2.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (_dev, mnt, fstype) = (fields.next(), fields.next(), fields.next());
        if fstype == Some("cgroup2") {
            if let Some(mnt) = mnt {
                return PathBuf::from(unescape_mount_path(mnt));
            }
        }
    }
    panic!("no cgroup2 file system is mounted (see /proc/mounts); mcpwarden needs cgroup v2")
}

/// /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8 mount path")
}

/// A cgroup `<mount>/mcpwarden-test-<name>-<pid>` with optional children. Drop kills every
/// process below it (cgroup.kill, or SIGKILL of each pid in cgroup.procs), waits until the
/// subtree is empty, and removes all its directories, including ones created by others
/// (such as the agent's own `--agent-cgroup`).
pub struct TestCgroup {
    path: PathBuf,
    mount: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let mount = cgroup2_mount();
        let path = mount.join(format!("mcpwarden-test-{name}-{}", std::process::id()));
        if path.exists() {
            // Left over by an earlier run with the same pid: clean it first.
            let stale = TestCgroup {
                path: path.clone(),
                mount: mount.clone(),
            };
            drop(stale);
        }
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path, mount }
    }

    /// Absolute path of this cgroup.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 mount, with a leading '/' (as in /proc/PID/cgroup).
    pub fn rel_path(&self) -> String {
        rel_to_mount(&self.mount, &self.path)
    }

    /// Create (if needed) the child `rel` (may contain '/') and return its absolute path.
    pub fn child(&self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Path of the child `rel` relative to the mount, with a leading '/'.
    pub fn child_rel_path(&self, rel: &str) -> String {
        rel_to_mount(&self.mount, &self.path.join(rel))
    }

    /// Pids currently in `dir`'s cgroup.procs.
    pub fn procs_of(dir: &Path) -> Vec<i32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn all_dirs(&self) -> Vec<PathBuf> {
        // Depth-first, children before parents.
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        walk(&e.path(), out);
                    }
                }
            }
            out.push(dir.to_path_buf());
        }
        let mut v = Vec::new();
        walk(&self.path, &mut v);
        v
    }

    fn subtree_pids(&self) -> Vec<i32> {
        self.all_dirs()
            .iter()
            .flat_map(|d| Self::procs_of(d))
            .collect()
    }
}

pub(crate) fn rel_to_mount(mount: &Path, path: &Path) -> String {
    let rel = path
        .strip_prefix(mount)
        .expect("cgroup path below the cgroup2 mount");
    format!("/{}", rel.display())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let kill_file = self.path.join("cgroup.kill");
        loop {
            let pids = self.subtree_pids();
            if pids.is_empty() {
                break;
            }
            if kill_file.exists() {
                let _ = std::fs::write(&kill_file, "1");
            } else {
                for pid in &pids {
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
            }
            if Instant::now() > deadline {
                eprintln!(
                    "TestCgroup drop: processes {pids:?} still in {} after 10 s",
                    self.path.display()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in self.all_dirs() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        if Instant::now() > deadline {
                            eprintln!("TestCgroup drop: rmdir {}: {e}", dir.display());
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }
}

/// Make `cmd` start inside the cgroup directory `cgroup_dir`: in the child, between fork and
/// exec, it writes "0" to `<cgroup_dir>/cgroup.procs`, which moves the calling process. The
/// test process itself never moves.
pub fn spawn_in_cgroup(cmd: &mut Command, cgroup_dir: &Path) {
    let procs = CString::new(cgroup_dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("no NUL in path");
    // SAFETY: the closure only makes async-signal-safe system calls (open, write, close) on
    // memory allocated before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// The cgroup v2 path (relative to the mount, with a leading '/') of process `pid`.
pub fn cgroup_of_pid(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| p.to_string()))
}

/// The cgroup id (the kernfs inode number of its directory) of the cgroup at `dir`.
pub fn cgroup_id(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}
