//! The container image of deploy/Containerfile, built and run as the DaemonSet runs it.
//!
//! [`Image::build`] stages the build context with deploy/stage-image.sh and builds it with
//! `buildah bud`; [`Image::mount`] makes a working container of it and mounts its root file
//! system ([`Rootfs`]). Containers cannot be started on every test machine (`podman run`
//! needs a runtime that may set rlimits), so [`Rootfs::launcher`] writes a script that runs
//! the image's own binary the way a runtime would: in a mount namespace of its own
//! (`unshare --mount`, which the namespace's mounts vanish with), the DaemonSet's mounts bound
//! in, `chroot` into the image, and `exec` all the way so that the process the harness started
//! is the agent (its SIGTERM reaches it). Guards undo everything on drop, also when a test
//! fails: the container unmounted and removed, the image removed.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::TempDir;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The release agent binary the image is made from: `$MCPWARDEN_IMAGE_BINARY` (`cargo xtask
/// test` builds it and sets this). Without it, under `CI=true` the test fails (it cannot run
/// what CI is meant to check); elsewhere it is built here, with the same
/// `cargo build --release -p mcpwarden --bin mcpwarden` (several minutes the first time).
pub fn release_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MCPWARDEN_IMAGE_BINARY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_absolute() && path.is_file(),
            "MCPWARDEN_IMAGE_BINARY={} is not an absolute path to a file",
            path.display()
        );
        return path;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "MCPWARDEN_IMAGE_BINARY is not set: under CI the image test needs the release agent \
             binary that `cargo xtask test` builds (`cargo build --release -p mcpwarden --bin \
             mcpwarden`, then MCPWARDEN_IMAGE_BINARY=<absolute path>)"
        );
    }
    let root = workspace_root();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "mcpwarden",
        "--bin",
        "mcpwarden",
    ]);
    // What cargo set for this test process would look like changed inputs to build scripts
    // that read them (ring), and rebuild them: build as from a shell.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&k)
        }) {
            cmd.env_remove(key);
        }
    }
    eprintln!("MCPWARDEN_IMAGE_BINARY is not set: building the release agent ({cmd:?})");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/mcpwarden");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// Panics unless buildah is installed (never skips: the image test must run).
pub fn require_buildah() {
    let found = Command::new("buildah")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "buildah is not installed: the image test builds deploy/Containerfile with it. Run \
         `cargo xtask setup` (it installs Debian's buildah and podman)"
    );
}

/// Run a command, panic with its output unless it succeeds; its stdout, trimmed.
fn checked(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An image built from deploy/Containerfile, removed (`buildah rmi`) on drop.
pub struct Image {
    tag: String,
    /// How long `buildah bud` took (staging not included).
    pub build_time: Duration,
    /// How long deploy/stage-image.sh took.
    pub stage_time: Duration,
    /// The staged build context (removed on drop unless the test failed).
    context: TempDir,
}

impl Image {
    /// Stage `binary` (deploy/stage-image.sh) and build the image, tagged
    /// `localhost/mcpwarden-test:<pid>-<n>`, in one layer (`--layers=false`).
    pub fn build(binary: &Path) -> Image {
        require_buildah();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut image = Image {
            tag: format!("localhost/mcpwarden-test:{}-{n}", std::process::id()),
            build_time: Duration::ZERO,
            stage_time: Duration::ZERO,
            context: TempDir::new("image-context"),
        };
        let root = workspace_root();
        let dir = image.context_dir();
        let started = Instant::now();
        let staged = checked(
            Command::new(root.join("deploy/stage-image.sh"))
                .arg(binary)
                .arg(&dir),
        );
        image.stage_time = started.elapsed();
        eprintln!("{staged}");
        let version = checked(Command::new(binary).arg("--version"));
        let version = version.split_whitespace().nth(1).unwrap_or("unknown");
        let started = Instant::now();
        // The guard exists already: a build that fails after tagging is removed too.
        checked(
            Command::new("buildah")
                .args(["bud", "--layers=false", "--quiet", "-f"])
                .arg(root.join("deploy/Containerfile"))
                .arg("--build-arg")
                .arg(format!("VERSION={version}"))
                .args(["-t", &image.tag])
                .arg(&dir),
        );
        image.build_time = started.elapsed();
        eprintln!(
            "built {} ({}) in {:.2} s (staging {:.2} s)",
            image.tag,
            image.size(),
            image.build_time.as_secs_f64(),
            image.stage_time.as_secs_f64()
        );
        image
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Where the build context was staged.
    pub fn context_dir(&self) -> PathBuf {
        self.context.path().join("root")
    }

    /// The image's size as buildah shows it ("24 MB").
    pub fn size(&self) -> String {
        checked(Command::new("buildah").args(["images", "--format", "{{.Size}}", &self.tag]))
    }

    /// The image's OCI configuration (`OCIv1.config` of `buildah inspect`: entrypoint, labels...).
    pub fn oci_config(&self) -> serde_json::Value {
        let text = checked(Command::new("buildah").args(["inspect", "--type", "image", &self.tag]));
        let all: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("buildah inspect printed no JSON ({e}): {text}"));
        all["OCIv1"]["config"].clone()
    }

    /// `podman run --rm --ulimit host IMAGE args...`, when podman is installed (None if not).
    /// It may fail where the container runtime cannot run (crun cannot set rlimits in some
    /// sandboxes): the caller decides what a failure means.
    pub fn podman_run(&self, args: &[&str]) -> Option<Output> {
        let present = Command::new("podman")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            return None;
        }
        Command::new("podman")
            .args([
                "run",
                "--rm",
                "--ulimit",
                "host",
                "--network",
                "none",
                &self.tag,
            ])
            .args(args)
            .output()
            .ok()
    }

    /// A working container of this image, its root file system mounted.
    pub fn mount(&self) -> Rootfs {
        let name = format!(
            "mcpwarden-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        // The guard first: whatever of it exists is removed on drop.
        let mut rootfs = Rootfs {
            container: name.clone(),
            path: PathBuf::new(),
            scripts: TempDir::new("image-launcher"),
        };
        checked(Command::new("buildah").args(["from", "--quiet", "--name", &name, &self.tag]));
        rootfs.path = PathBuf::from(checked(Command::new("buildah").args(["mount", &name])));
        assert!(
            rootfs.path.join("usr/local/bin/mcpwarden").is_file(),
            "the mounted image at {} has no /usr/local/bin/mcpwarden",
            rootfs.path.display()
        );
        rootfs
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let out = Command::new("buildah")
            .args(["rmi", "--force", &self.tag])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) && self.build_time > Duration::ZERO {
            eprintln!("buildah rmi {}: {out:?}", self.tag);
        }
    }
}

/// A buildah working container of an [`Image`], its root file system mounted at [`path`]:
/// unmounted and removed on drop. Changes made in it (mount points the launcher creates) go
/// with it.
///
/// [`path`]: Rootfs::path
pub struct Rootfs {
    container: String,
    path: PathBuf,
    /// Where the launcher scripts are written.
    scripts: TempDir,
}

/// What the container runtime gives every container of the DaemonSet, from the host at the
/// same path: the host's /proc (hostPID), /sys (with securityfs below it), /dev, and the name
/// service files. The DaemonSet's own hostPath volumes come on top: the image test reads them
/// from the rendered manifest and passes them to [`Rootfs::launcher`].
pub const RUNTIME_MOUNTS: &[&str] = &["/proc", "/sys", "/dev", "/etc/resolv.conf", "/etc/hosts"];

fn shell_quote(p: &Path) -> String {
    let s = String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned();
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Rootfs {
    /// The mounted root file system.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// A script that runs the image's `/usr/local/bin/mcpwarden` with its arguments: in a new
    /// mount namespace (mounts of the host that are shared stay visible as they change: the
    /// HostToContainer propagation of the DaemonSet), with [`RUNTIME_MOUNTS`] and `binds`
    /// (directories or files of the host, at the same path inside) bound in recursively, then
    /// chrooted into the image. Every step `exec`s: the process started is the agent.
    pub fn launcher(&self, binds: &[&Path]) -> PathBuf {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let inner = self.scripts.path().join(format!("in-namespace-{n}.sh"));
        let outer = self.scripts.path().join(format!("mcpwarden-{n}"));
        let mut paths: Vec<PathBuf> = RUNTIME_MOUNTS.iter().map(PathBuf::from).collect();
        paths.extend(binds.iter().map(|p| p.to_path_buf()));
        let list: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
        let inner_text = format!(
            r#"#!/bin/sh
# Runs in the launcher's mount namespace: bind what the DaemonSet mounts, then become the
# image's mcpwarden. Mount points missing from the image are made in the working container.
set -eu
root={root}
bind() {{
    if [ -d "$1" ]; then
        mkdir -p "$root$1"
    else
        mkdir -p "$root$(dirname "$1")"
        [ -e "$root$1" ] || : >"$root$1"
    fi
    mount --rbind "$1" "$root$1"
}}
for p in {list}; do
    if [ -e "$p" ]; then bind "$p"; fi
done
exec chroot "$root" /usr/local/bin/mcpwarden "$@"
"#,
            root = shell_quote(&self.path),
            list = list.join(" "),
        );
        let outer_text = format!(
            "#!/bin/sh\n# mcpwarden from the image {container}, as its container would run it.\n\
             exec unshare --mount --propagation slave -- /bin/sh {inner} \"$@\"\n",
            container = self.container,
            inner = shell_quote(&inner),
        );
        std::fs::write(&inner, inner_text).expect("write the launcher");
        std::fs::write(&outer, outer_text).expect("write the launcher");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the launcher");
        outer
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = Command::new("buildah")
            .args(["umount", &self.container])
            .output();
        let out = Command::new("buildah")
            .args(["rm", &self.container])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) && !self.path.as_os_str().is_empty() {
            eprintln!("buildah rm {}: {out:?}", self.container);
        }
    }
}

/// Makes a directory of the host a shared mount (a bind mount onto itself) while it lives,
/// as a node's /run is (systemd makes every mount shared): mounts made below it later then
/// reach the launcher's namespace, as a runtime's new pod pins reach the agent's container
/// through its HostToContainer mount. Detached (with whatever is mounted below) on drop.
pub struct SharedMount {
    path: PathBuf,
}

impl SharedMount {
    pub fn new(path: &Path) -> SharedMount {
        let guard = SharedMount {
            path: path.to_path_buf(),
        };
        checked(Command::new("mount").arg("--bind").arg(path).arg(path));
        checked(Command::new("mount").arg("--make-shared").arg(path));
        guard
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
