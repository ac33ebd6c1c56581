//! `cargo xtask`: the project's own build steps.
//!
//! - `setup`: install what building the eBPF programs needs, idempotently (quick when present):
//!   rust-src for the nightly toolchain, Debian's `llvm-N-dev` and `libpolly-N-dev` for N = the
//!   nightly's LLVM major, and `bpf-linker` built against that LLVM; for the tests' lenient MCP
//!   servers (tests/lenient/), Go, Node with npm and Python 3 (Debian's, each only when
//!   missing), and `npm ci` in tests/lenient/node when its node_modules is missing or stale.
//! - `build-ebpf`: build only the kernel programs (the agent's build.rs does this too).
//! - `test`: setup, then every test (unit and privileged integration), with a total at the end.
//! - `demo`: setup, build, and run `mcpwarden-demo` (a binary of the `tests/` crate).
//! - `bench`: setup, Debian's nginx (unpacked under target/, never started as a service), the
//!   criterion benches, release builds, then `mcpwarden-bench run`, which writes BENCHMARKS.md
//!   (`--quick`: a one-minute smoke run written to target/bench/quick.md; `test` runs it).
//! - `fuzz`: cargo-fuzz (installed if missing), one instrumented build of the fuzz targets
//!   (`agent/fuzz/`, nightly; the library crates and the agent's `tls/hello.rs`, never the agent
//!   itself), then libFuzzer on each target for `--seconds` (60): `--all` runs every target in
//!   [`FUZZ_TARGETS`] one after another, `--target NAME` one, and neither flag the policy
//!   loader alone, as before. Each run prints its executions and whether it found anything; a crash
//!   fails the command and names the input. `cargo test` replays every seed corpus; `test`
//!   fuzzes each target for 30 s when `CI=true`.

use std::{
    env,
    ffi::OsString,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// bpf-linker release known to build with this machine's stable toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and what the lenient test servers run on (idempotent).
    Setup,
    /// Build the eBPF programs alone.
    BuildEbpf,
    /// Run every test; privileged tests need root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build and run `mcpwarden-demo` (needs root).
    Demo,
    /// Run the benchmarks (needs root) and write BENCHMARKS.md.
    Bench {
        /// A one-minute smoke run (what CI runs): checks the harness, asserts no timing, and
        /// writes target/bench/quick.md instead of BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz (nightly, cargo-fuzz) and report any crash: the policy loader, one target
    /// (`--target`), or every target (`--all`), each for `--seconds`.
    Fuzz {
        /// How long libFuzzer runs each target, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Every target, one after another, on one instrumented build.
        #[arg(long, conflicts_with = "target")]
        all: bool,
        /// One target (see agent/fuzz/Cargo.toml); without it and `--all`, policy_load.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(FUZZ_TARGETS))]
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf()
        }
        Cmd::Test { args } => {
            setup()?;
            test(&args)?;
            if args.is_empty() {
                // The bench harness is code too: CI runs its smoke mode with every test.
                bench(true)?;
                println!("xtask: bench --quick ran every scenario");
                // CI fuzzes every target for 30 s (`cargo test` has replayed their corpora
                // already); on a developer's machine `cargo xtask fuzz --all` does it.
                if env::var("CI").is_ok_and(|v| v == "true") {
                    fuzz(FUZZ_TARGETS, 30)?;
                }
            }
            Ok(())
        }
        Cmd::Bench { quick } => {
            setup()?;
            bench(quick)
        }
        Cmd::Demo => {
            setup()?;
            demo()
        }
        Cmd::Fuzz {
            seconds,
            all,
            target,
        } => {
            // The fuzz crate builds no agent: no eBPF, so no setup.
            let one = [target.as_deref().unwrap_or(FUZZ_TARGET)];
            fuzz(if all { FUZZ_TARGETS } else { &one }, seconds)
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The LLVM major version of the nightly toolchain (`LLVM version: 22.1.4` → 22).
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "the nightly toolchain is needed for the eBPF programs (rustup toolchain install nightly)",
    )?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow::anyhow!("`rustc +nightly -vV` printed no LLVM version"))?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read the LLVM major from {version:?}"))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[String]) -> Result<()> {
    let missing: Vec<&String> = pkgs.iter().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("these Debian packages are missing and installing them needs root: {missing:?}");
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether bpf-linker is installed, at our version, built for LLVM `major`: cargo records the
/// features of every `cargo install` in $CARGO_HOME/.crates2.json.
fn bpf_linker_matches(major: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(cargo_home().join(".crates2.json")) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let prefix = format!("bpf-linker {BPF_LINKER_VERSION} ");
    let feature = format!("llvm-{major}");
    let built_for_major = json["installs"].as_object().is_some_and(|installs| {
        installs.iter().any(|(id, entry)| {
            id.starts_with(&prefix)
                && entry["features"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(feature.as_str())))
        })
    });
    built_for_major && cargo_home().join("bin/bpf-linker").exists()
}

fn setup() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let major = nightly_llvm_major()?;
    apt_install(&[format!("llvm-{major}-dev"), format!("libpolly-{major}-dev")])?;
    if !bpf_linker_matches(major) {
        let llvm = PathBuf::from(format!("/usr/lib/llvm-{major}"));
        let mut path = OsString::from(llvm.join("bin"));
        path.push(":");
        path.push(env::var_os("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &llvm)
            .env("PATH", path))?;
    }
    lenient_servers()?;
    kubernetes_validate()?;
    mcp_python_sdk()?;
    image_tools()?;
    // The audit pipeline's integration tests rotate the agent's audit log with the real thing.
    apt_install(&["logrotate".to_owned()])?;
    eprintln!(
        "xtask: setup complete (nightly rust-src, LLVM {major}, bpf-linker {BPF_LINKER_VERSION}, \
         Go, Node and Python for tests/lenient, the MCP Python SDK, logrotate)"
    );
    Ok(())
}

/// What the container image's test (tests/tests/image.rs) builds deploy/Containerfile with:
/// Debian's buildah, and podman, which the test tries `podman run` with (where the runtime can
/// set rlimits; elsewhere it proves the image by running it chrooted from `buildah mount`).
fn image_tools() -> Result<()> {
    apt_install(&["buildah".to_owned(), "podman".to_owned()])
}

fn on_path(cmd: &str) -> bool {
    Command::new("which")
        .arg(cmd)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// What the lenient MCP servers of the tests (tests/lenient/) run on: Go, Node, npm, Python 3
/// (a command already on PATH counts: NodeSource's nodejs brings npm outside dpkg), and the
/// Node server's packages, installed from its package-lock.json when node_modules is missing
/// or older than the lock file.
fn lenient_servers() -> Result<()> {
    let missing: Vec<String> = [
        ("go", "golang-go"),
        ("node", "nodejs"),
        ("npm", "npm"),
        ("python3", "python3"),
    ]
    .into_iter()
    .filter(|(cmd, _)| !on_path(cmd))
    .map(|(_, pkg)| pkg.to_string())
    .collect();
    apt_install(&missing)?;
    let node = workspace_root().join("tests/lenient/node");
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // npm ci rewrites node_modules/.package-lock.json on every install.
    let installed = modified(node.join("node_modules/.package-lock.json"));
    let locked = modified(node.join("package-lock.json"));
    if installed.is_none() || installed < locked {
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&node))?;
    }
    Ok(())
}

/// What tests/tests/deploy.rs checks the Kubernetes manifests (deploy/kustomize/) with, offline:
/// `kubectl kustomize` renders them (kubectl comes with the machine, not from Debian, whose
/// kubectl is too old for kustomize v5: only checked here), and PyPI's `kubernetes-validate`, at
/// a pinned version, validates the result against the API schemas of a Kubernetes release. It
/// is installed into its own venv, `<target>/venv-kv`, and only when that venv does not already
/// report the pinned version.
fn kubernetes_validate() -> Result<()> {
    /// 1.37.0 ships the schemas of Kubernetes 1.25 to 1.37 (the test validates against 1.32).
    const VERSION: &str = "1.37.0";
    if !on_path("kubectl") {
        eprintln!(
            "xtask: warning: kubectl not found: tests/tests/deploy.rs renders deploy/kustomize with \
             `kubectl kustomize` and will fail; install kubectl 1.27 or later"
        );
    }
    let venv = target_dir().join("venv-kv");
    let bin = venv.join("bin/kubernetes-validate");
    pinned_in_venv(&venv, "kubernetes-validate", VERSION, || {
        let mut c = Command::new(&bin);
        c.arg("--version");
        c
    })
}

/// What tests/py/approval_client.py runs on: the official MCP Python SDK from PyPI, at a pinned
/// version, as the 2026-07-28 client whose tool calls mcpwarden holds for user approval (the
/// tests run `<target>/venv-mcp/bin/python tests/py/approval_client.py ...`). It is installed
/// into its own venv, `<target>/venv-mcp`, and only when that venv's python cannot import `mcp`
/// at the pinned version.
fn mcp_python_sdk() -> Result<()> {
    /// 2.3.0 speaks 2026-07-28, multi-round-trip results (input_required) included.
    const VERSION: &str = "2.3.0";
    let venv = target_dir().join("venv-mcp");
    let python = venv.join("bin/python");
    pinned_in_venv(&venv, "mcp", VERSION, || {
        let mut c = Command::new(&python);
        c.args([
            "-c",
            "import mcp, importlib.metadata as m; print(m.version('mcp'))",
        ]);
        c
    })
}

/// `package==version` in its own venv at `venv`: left alone when `probe` (a command that prints
/// the installed version) already prints `version`; else the venv is made afresh, the package
/// installed from PyPI, and the probe must then print `version`.
fn pinned_in_venv(
    venv: &std::path::Path,
    package: &str,
    version: &str,
    probe: impl Fn() -> Command,
) -> Result<()> {
    let installed = probe()
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == version)
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    fresh_venv(venv)?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{package}=={version}"),
    ]))?;
    let reported = output(&mut probe())?;
    if reported.trim() != version {
        bail!(
            "{} reports {package} version {:?}, expected {version}",
            venv.display(),
            reported.trim()
        );
    }
    Ok(())
}

/// An empty Python venv at `venv` (replacing whatever is there), made with Debian's python3.
fn fresh_venv(venv: &std::path::Path) -> Result<()> {
    // Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
    let venv_ok = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !venv_ok {
        apt_install(&["python3-venv".to_owned()])?;
    }
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv))
}

fn build_ebpf() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "+nightly",
            "build",
            "--release",
            "--package",
            "mcpwarden-ebpf",
            "--bins",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]))
}

fn test(extra: &[String]) -> Result<()> {
    if !is_root() {
        // Privileged tests cannot run, and a skipped test must never look like a passed one.
        bail!("cargo xtask test runs privileged eBPF tests and must run as root");
    }
    // The image test (tests/tests/image.rs) builds deploy/Containerfile from the release agent.
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "mcpwarden",
        "--bin",
        "mcpwarden",
    ]))?;
    let image_binary = target_dir().join("release/mcpwarden");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("MCPWARDEN_IMAGE_BINARY", &image_binary)
        .args(["test", "--no-fail-fast"])
        .arg("--")
        .args(extra)
        .stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout from cargo test"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
            ignored += count(rest, " ignored");
        }
    }
    let status = child.wait()?;
    println!("\nxtask: {passed} tests passed, {failed} failed, {ignored} ignored (unit and privileged integration)");
    if ignored > 0 {
        bail!("{ignored} test(s) were ignored: every test must run");
    }
    if !status.success() || failed > 0 || passed == 0 {
        bail!("tests failed");
    }
    println!("{passed} passed, {failed} failed");
    Ok(())
}

/// The number before `label` in a libtest summary ("ok. 12 passed; 0 failed; …").
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.trim_end().ends_with(label.trim()))
        .and_then(|part| part.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Debian's nginx binary for the bench's reference hop. The package is unpacked under target/
/// rather than installed: installing it would start a system nginx on port 80 on this host.
fn nginx() -> Result<PathBuf> {
    let root = workspace_root().join("target/bench-tools");
    let bin = root.join("usr/sbin/nginx");
    if bin.exists() {
        return Ok(bin);
    }
    // Its shared libraries are ordinary packages; make sure they are there.
    apt_install(&[
        "libcrypt1".into(),
        "libpcre2-8-0".into(),
        "libssl3".into(),
        "zlib1g".into(),
    ])?;
    let debs = root.join("debs");
    std::fs::create_dir_all(&debs)?;
    let download = |debs: &PathBuf| {
        Command::new("apt-get")
            .args(["download", "-q", "nginx"])
            .current_dir(debs)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !download(&debs) {
        // No package lists yet on a fresh machine.
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        if !download(&debs) {
            bail!("apt-get download nginx failed");
        }
    }
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nginx_") && n.ends_with(".deb"))
        })
        .ok_or_else(|| anyhow::anyhow!("no nginx .deb in {}", debs.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    if !bin.exists() {
        bail!("{} is not in the nginx package", bin.display());
    }
    Ok(bin)
}

fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the bench loads eBPF programs and creates cgroups: run cargo xtask bench as root");
    }
    let nginx = nginx()?;
    let root = workspace_root();
    // In-process costs first, while nothing else runs. Old results go first: the report reads
    // every estimate in the directory.
    let _ = std::fs::remove_dir_all(root.join("target/criterion"));
    let mut criterion = Command::new("cargo");
    criterion.current_dir(&root).args([
        "bench",
        "--package",
        "mcpwarden",
        "--bench",
        "hot_path",
        "--",
    ]);
    if quick {
        criterion.args(["--warm-up-time", "0.2", "--measurement-time", "0.5"]);
    }
    run(&mut criterion)?;
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "mcpwarden",
        "--package",
        "mcpwarden-bench",
    ]))?;
    let (out, command) = if quick {
        (
            root.join("target/bench/quick.md"),
            "cargo xtask bench --quick",
        )
    } else {
        (root.join("BENCHMARKS.md"), "cargo xtask bench")
    };
    let mut cmd = Command::new(root.join("target/release/mcpwarden-bench"));
    cmd.arg("run")
        .arg("--agent")
        .arg(root.join("target/release/mcpwarden"))
        .arg("--out")
        .arg(&out)
        .arg("--criterion")
        .arg(root.join("target/criterion"))
        .arg("--command")
        .arg(command)
        .env("NGINX", &nginx);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates cgroups: run cargo xtask demo as root");
    }
    // The demo lives in the tests crate so that rmcp (its sample server and client) stays out
    // of the agent binary.
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--package",
        "mcpwarden-tests",
        "--bin",
        "mcpwarden-demo",
    ]))?;
    run(&mut Command::new(target_dir().join("debug/mcpwarden-demo")))
}

/// Cargo's target directory for builds run from the workspace root: `CARGO_TARGET_DIR` if set
/// (a relative one is relative to where cargo runs), else `target/`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The fuzz target `cargo xtask fuzz` runs without `--all` or `--target`.
const FUZZ_TARGET: &str = "policy_load";

/// Every fuzz target in agent/fuzz/ (its Cargo.toml), in the order `--all` runs them, and the
/// test that replays its seed corpus (`agent/fuzz/corpus/<target>/`) in every `cargo test`.
const FUZZ_TARGETS: &[&str] = &[
    "policy_load",
    "request_read",
    "server_message",
    "sse_split",
    "client_hello",
];

/// The `cargo test` that replays a target's corpus through the same checks.
fn corpus_test(target: &str) -> &'static str {
    match target {
        "policy_load" => "cargo test -p mcpwarden-tests --test policy_corpus",
        "client_hello" => "cargo test -p mcpwarden --lib intercept::tls::hello",
        _ => "cargo test -p mcpwarden-mcp --lib fuzz_checks",
    }
}

/// What one libFuzzer run printed that the summary needs.
#[derive(Debug, Default)]
struct FuzzRun {
    /// `stat::number_of_executed_units`, else the `Done N runs` line.
    executions: Option<u64>,
    /// Where libFuzzer wrote the input that failed (`Test unit written to PATH`).
    artifact: Option<String>,
    /// What went wrong: a panic (where, and its message on the next line), or libFuzzer's or
    /// the sanitizer's `ERROR:` line (a deadly signal, a timeout, a leak).
    failure: Option<String>,
    /// The panic's location was the last line read: the next one is its message.
    panic_message_next: bool,
}

impl FuzzRun {
    /// Takes in one line of libFuzzer's output.
    fn read(&mut self, line: &str) {
        if std::mem::take(&mut self.panic_message_next) {
            if let Some(failure) = &mut self.failure {
                failure.push(' ');
                failure.push_str(line.trim());
            }
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            self.executions = n.trim().parse().ok().or(self.executions);
        } else if let Some(rest) = line.strip_prefix("Done ") {
            if let Some(n) = rest
                .strip_suffix(" second(s)")
                .and_then(|r| r.split(' ').next())
            {
                if self.executions.is_none() {
                    self.executions = n.parse().ok();
                }
            }
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            self.artifact = Some(path.trim().to_owned());
        } else if self.failure.is_none() && line.contains("panicked at") {
            self.failure = Some(line.trim().to_owned());
            self.panic_message_next = true;
        } else if self.failure.is_none() && line.contains("ERROR: ") {
            self.failure = Some(line.trim().to_owned());
        }
    }
}

/// Builds the fuzz targets once (instrumented, nightly), then runs each of `targets` for
/// `seconds` in turn: a scratch corpus under target/fuzz/corpus/<target>/ first (libFuzzer
/// adds what it finds there, kept between runs) and the committed seeds after it, which
/// libFuzzer only reads. Crashes go to agent/fuzz/artifacts/<target>/ (git-ignored).
fn fuzz(targets: &[&str], seconds: u64) -> Result<()> {
    let cargo_fuzz_present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !cargo_fuzz_present {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    let fuzz_dir = root.join("agent/fuzz");
    let target_dir = root.join("target/fuzz");
    let mut build = Command::new("cargo");
    // `cargo run` gave xtask the variables cargo sets for a package (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Passed on, nightly cargo sees them as changed inputs of crates that
    // read them (ring: "the env variable CARGO_MANIFEST_DIR changed") and rebuilds those and
    // everything above them (~10 minutes here) each time the target is built once by
    // `cargo fuzz` by hand and once by xtask.
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&k)
        }) {
            build.env_remove(key);
        }
    }
    // One build for every run: all targets, or the one asked for. Debug assertions on, so
    // that overflows and `debug_assert!`s are findings too (`cargo fuzz run -a` by hand
    // reuses this build).
    build
        .current_dir(root.join("agent"))
        .args([
            "+nightly",
            "fuzz",
            "build",
            "--debug-assertions",
            "--fuzz-dir",
        ])
        .arg(&fuzz_dir)
        .arg("--target-dir")
        .arg(&target_dir);
    if let [one] = targets {
        build.arg(one);
    }
    let started = std::time::Instant::now();
    run(&mut build)?;
    println!(
        "xtask: built the fuzz targets in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let host = output(Command::new("rustc").args(["+nightly", "-vV"]))?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("`rustc +nightly -vV` printed no host"))?;
    let bin_dir = target_dir.join(host).join("release");

    let mut report = Vec::new();
    for target in targets {
        let seeds = fuzz_dir.join("corpus").join(target);
        let work = target_dir.join("corpus").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        for dir in [&work, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut cmd = Command::new(bin_dir.join(target));
        cmd.arg(format!("-max_total_time={seconds}"))
            // An input that takes this long is a finding (a hang), not a slow machine.
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&work)
            .arg(&seeds)
            // libFuzzer prints the stack of a crash; Rust's own backtrace would double it.
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        eprintln!("xtask: running {cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {target}"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr from {target}"))?;
        let mut found = FuzzRun::default();
        let mut quiet = 0u64;
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            found.read(&line);
            // Every new input is a line; show the rest (pulses, the end, any finding).
            let new_input =
                line.starts_with('#') && (line.contains("\tNEW ") || line.contains("\tREDUCE "));
            if new_input {
                quiet += 1;
            } else if !line.contains("# Uses: ") {
                // (The recommended dictionary, one line per entry, is left out too.)
                eprintln!("{target}: {line}");
            }
        }
        let status = child.wait()?;
        let executions = found
            .executions
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        let verdict = if status.success() && found.failure.is_none() {
            "nothing found".to_owned()
        } else {
            format!(
                "FOUND: {} ({status}); the input is {}: copy it into {} under a name saying what \
                 it is, and `{}` replays it",
                found.failure.as_deref().unwrap_or("libFuzzer failed"),
                found.artifact.as_deref().unwrap_or("(no artifact written)"),
                seeds.display(),
                corpus_test(target)
            )
        };
        let line = format!(
            "{target}: {executions} executions in {seconds} s ({quiet} new inputs), {verdict}"
        );
        println!("xtask: {line}");
        report.push((line, found.failure.is_some() || !status.success()));
    }
    println!(
        "\nxtask: fuzzed {} target(s) for {seconds} s each:",
        report.len()
    );
    for (line, _) in &report {
        println!("  {line}");
    }
    let failed = report.iter().filter(|(_, failed)| *failed).count();
    if failed > 0 {
        bail!("the fuzzers found {failed} problem(s): see above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{count, FuzzRun};

    #[test]
    fn reads_libfuzzer_summaries() {
        let mut run = FuzzRun::default();
        for line in [
            "#524288\tpulse  cov: 1024 ft: 4096 corp: 300/20Kb exec/s: 17476 rss: 60Mb",
            "Done 1048576 runs in 61 second(s)",
            "stat::number_of_executed_units: 1048577",
            "stat::average_exec_per_sec:     17189",
        ] {
            run.read(line);
        }
        assert_eq!(run.executions, Some(1048577));
        assert_eq!((run.artifact, run.failure), (None, None));

        let mut run = FuzzRun::default();
        for line in [
            "thread '<unnamed>' panicked at mcp/src/fuzz_checks.rs:10:5:",
            "normalize_path is not idempotent",
            "==12== ERROR: libFuzzer: deadly signal",
            "MS: 1 ChangeByte-; base unit: 0000",
            "artifact_prefix='/w/agent/fuzz/artifacts/sse_split/'; Test unit written to /w/agent/fuzz/artifacts/sse_split/crash-ab12",
            "stat::number_of_executed_units: 77",
        ] {
            run.read(line);
        }
        assert_eq!(run.executions, Some(77));
        assert_eq!(
            run.artifact.as_deref(),
            Some("/w/agent/fuzz/artifacts/sse_split/crash-ab12")
        );
        assert_eq!(
            run.failure.as_deref(),
            Some(
                "thread '<unnamed>' panicked at mcp/src/fuzz_checks.rs:10:5: normalize_path is \
                 not idempotent"
            )
        );

        let mut run = FuzzRun::default();
        run.read("Done 12 runs in 1 second(s)");
        assert_eq!(run.executions, Some(12));
    }

    #[test]
    fn reads_libtest_summaries() {
        let s = "ok. 12 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count(s, " passed"), 12);
        assert_eq!(count(s, " failed"), 1);
        assert_eq!(count(s, " ignored"), 2);
    }
}
