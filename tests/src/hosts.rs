//! `HostsEntry`: a name in /etc/hosts for the length of a test, so that an unmodified client
//! and the agent resolve a real hostname to the test's own loopback address.
//!
//! Lines are added with a marker comment naming the test process and removed on drop. Every
//! change to the file happens under one process-wide lock (tests of one binary run as threads),
//! and the file is rewritten through a temporary file and a rename.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

const HOSTS: &str = "/etc/hosts";

static LOCK: Mutex<()> = Mutex::new(());

pub struct HostsEntry {
    line: String,
}

impl HostsEntry {
    /// Map `name` to `ip` until the guard drops.
    pub fn add(name: &str, ip: IpAddr) -> HostsEntry {
        let line = format!("{ip} {name} # mcpwarden-test pid {}", std::process::id());
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let text = std::fs::read_to_string(HOSTS).unwrap_or_default();
        let mut out: String = text
            .lines()
            .filter(|l| {
                !l.ends_with(&format!(
                    " {name} # mcpwarden-test pid {}",
                    std::process::id()
                ))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&line);
        out.push('\n');
        rewrite(Path::new(HOSTS), &out);
        HostsEntry { line }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let text = std::fs::read_to_string(HOSTS).unwrap_or_default();
        let out: String = text
            .lines()
            .filter(|l| *l != self.line)
            .map(|l| format!("{l}\n"))
            .collect();
        rewrite(Path::new(HOSTS), &out);
    }
}

/// Replace the file's content. /etc/hosts may be a bind mount (containers), where a rename
/// over it fails: then write in place.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("mcpwarden-test-{}", std::process::id()));
    let renamed = std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_ok();
    if !renamed {
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(path, text).unwrap_or_else(|e| panic!("rewriting {}: {e}", path.display()));
    }
}
