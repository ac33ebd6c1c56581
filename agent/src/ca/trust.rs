//! `mcpwarden ca install` / `ca uninstall`: the host's trust store.
//!
//! Debian and Ubuntu: PEM files in /usr/local/share/ca-certificates/*.crt, then
//! `update-ca-certificates`. RHEL, Fedora and derivatives: /etc/pki/ca-trust/source/anchors/,
//! then `update-ca-trust extract`. One file per CA certificate (`mcpwarden.crt`, and
//! `mcpwarden-next.crt` while a rotation is configured), so uninstall removes exactly ours.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// A distribution's trust store layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustStore {
    /// Where local anchors go.
    pub dir: PathBuf,
    /// File extension the refresh tool picks up.
    pub ext: &'static str,
    /// The refresh command and its arguments.
    pub refresh: &'static [&'static str],
}

const DEBIAN: (&str, &str, &[&str]) = (
    "/usr/local/share/ca-certificates",
    "crt",
    &["update-ca-certificates"],
);
const RHEL: (&str, &str, &[&str]) = (
    "/etc/pki/ca-trust/source/anchors",
    "pem",
    &["update-ca-trust", "extract"],
);

/// The trust store of this host, or an error saying which layouts were looked for.
pub fn detect() -> Result<TrustStore> {
    for (dir, ext, refresh) in [DEBIAN, RHEL] {
        let tool = refresh.first().copied().unwrap_or_default();
        if Path::new(dir).is_dir() && on_path(tool) {
            return Ok(TrustStore {
                dir: PathBuf::from(dir),
                ext,
                refresh,
            });
        }
    }
    bail!(
        "no supported trust store: expected {} with update-ca-certificates (Debian, Ubuntu) or {} with \
         update-ca-trust (RHEL, Fedora); install the CA by hand from `mcpwarden ca show`",
        DEBIAN.0,
        RHEL.0
    )
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

impl TrustStore {
    /// The anchor file for the `i`-th CA certificate.
    fn file(&self, i: usize) -> PathBuf {
        let name = if i == 0 {
            "mcpwarden".to_owned()
        } else {
            format!(
                "mcpwarden-next{}",
                if i == 1 { String::new() } else { i.to_string() }
            )
        };
        self.dir.join(format!("{name}.{}", self.ext))
    }

    /// Write one anchor per certificate (replacing earlier ones), then refresh. Returns the files.
    pub fn install(&self, pems: &[String]) -> Result<Vec<PathBuf>> {
        self.remove_ours()?;
        let mut written = Vec::new();
        for (i, pem) in pems.iter().enumerate() {
            let path = self.file(i);
            std::fs::write(&path, pem)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            written.push(path);
        }
        self.refresh()?;
        Ok(written)
    }

    /// Remove our anchors and refresh. Returns the files removed (none: nothing was installed).
    pub fn uninstall(&self) -> Result<Vec<PathBuf>> {
        let removed = self.remove_ours()?;
        self.refresh()?;
        Ok(removed)
    }

    fn remove_ours(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("{}: cannot list", self.dir.display()))?;
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let ours = (name == format!("mcpwarden.{}", self.ext))
                || (name.starts_with("mcpwarden-next")
                    && name.ends_with(&format!(".{}", self.ext)));
            if ours {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("{}: cannot remove", e.path().display()))?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    fn refresh(&self) -> Result<()> {
        let (tool, args) = self
            .refresh
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("no refresh command"))?;
        let out = Command::new(tool)
            .args(args)
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}
