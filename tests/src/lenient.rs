//! Real lenient MCP servers: tiny MCP servers in Go, Node and Python whose bodies are read by
//! each language's own, real parsers (no imitation), so that bypass tests show what a real
//! server behind mcpwarden would execute. Sources in `tests/lenient/`:
//!
//! | kind | source | reads a body with | so it also accepts |
//! |---|---|---|---|
//! | [`Lenient::Go`] | `go/main.go` (stdlib only) | `json.Unmarshal` into Go structs | keys in any case (`"Method"`, `"PARAMS"`), last duplicate key wins, invalid UTF-8 → U+FFFD |
//! | [`Lenient::Node`] | `node/server.js` (`raw-body`, `content-type`) | raw-body decoding the Content-Type charset with iconv-lite, then `JSON.parse` | utf-7, utf-16le, latin1, … bodies; a UTF-8 BOM; last duplicate wins |
//! | [`Lenient::Python`] | `python/server.py` (stdlib `http.server`) | `json.loads` on the raw bytes | UTF-16/UTF-32 either byte order, BOM or not; a UTF-8 BOM; `NaN`; last duplicate wins |
//!
//! Each answers every path and every HTTP method alike: `initialize`, `tools/list` (`echo`,
//! `secret_dump`, `start_security_scan`, `drop_cluster`, `transfer`), `tools/call` (executed:
//! one line `{"tool", "arguments"}` as the server read them in its executions log, written
//! before the answer, which is `<kind> ran <name>`), `{}` for any other request; JSON
//! batches; 202 when a body holds no request; 400 with a JSON-RPC error when it does not parse.
//!
//! A missing toolchain (go, node, python3) or missing `node_modules` makes
//! [`LenientServer::start`] panic with what to install (`cargo xtask setup` does it): like
//! every test here, these never skip, under `CI=true` or not.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::TempDir;

/// How long a server may take to print `listening`.
const STARTUP: Duration = Duration::from_secs(30);

/// Which lenient server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lenient {
    Go,
    Node,
    Python,
}

impl Lenient {
    pub const ALL: [Lenient; 3] = [Lenient::Go, Lenient::Node, Lenient::Python];

    /// `go`, `node` or `python`: the `<kind>` of its answers (`go ran echo`) and its
    /// `serverInfo.name` (`lenient-go`).
    pub fn name(self) -> &'static str {
        match self {
            Lenient::Go => "go",
            Lenient::Node => "node",
            Lenient::Python => "python",
        }
    }

    fn command(self) -> Command {
        let src = source_dir();
        match self {
            Lenient::Go => Command::new(go_binary()),
            Lenient::Node => {
                let modules = src.join("node/node_modules");
                for pkg in ["raw-body", "content-type", "iconv-lite"] {
                    if !modules.join(pkg).join("package.json").exists() {
                        panic!(
                            "lenient-node needs {}: run cargo xtask setup \
                             (it runs `npm ci` in tests/lenient/node)",
                            modules.join(pkg).display()
                        );
                    }
                }
                let mut c = Command::new("node");
                c.arg(src.join("node/server.js"));
                c
            }
            Lenient::Python => {
                let mut c = Command::new("python3");
                c.arg(src.join("python/server.py"));
                c
            }
        }
    }

    /// The program [`Lenient::command`] runs, and the package that brings it.
    fn program(self) -> (&'static str, &'static str) {
        match self {
            Lenient::Go => ("the lenient-go binary", "golang-go"),
            Lenient::Node => ("node", "nodejs"),
            Lenient::Python => ("python3", "python3"),
        }
    }
}

impl fmt::Display for Lenient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `tests/lenient/`.
fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lenient")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (a relative one taken from the workspace
/// root, as xtask does) or the workspace's `target/`.
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// `<target>/lenient/lenient-go`, built once per process (and under a file lock, since test
/// binaries run side by side). Go's cache, GOPATH and temp files stay in `<target>/lenient/`;
/// stdlib only, so nothing is downloaded (GOPROXY=off).
fn go_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_go)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_go() -> Result<PathBuf, String> {
    use std::os::fd::AsRawFd;
    let out = target_dir().join("lenient");
    for d in ["go-cache", "gopath", "go-tmp"] {
        std::fs::create_dir_all(out.join(d))
            .map_err(|e| format!("create {}: {e}", out.join(d).display()))?;
    }
    let lock_path = out.join("go-build.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    // Released when `lock` closes, at the end of this function.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let bin = out.join("lenient-go");
    // Go leaves an up-to-date binary alone and otherwise renames the new one into place, so a
    // server still running the old one is not disturbed.
    let run = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(source_dir().join("go"))
        .env("GOCACHE", out.join("go-cache"))
        .env("GOPATH", out.join("gopath"))
        .env("GOTMPDIR", out.join("go-tmp"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("GO111MODULE", "on")
        .env("GOWORK", "off")
        .env("GOPROXY", "off")
        .env("GOSUMDB", "off")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .output();
    match run {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "lenient-go needs the Go toolchain, and `go` is not on PATH: run cargo xtask setup \
             (Debian package golang-go)"
                .to_string(),
        ),
        Err(e) => Err(format!("run go build: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "go build of tests/lenient/go failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(_) => Ok(bin),
    }
}

/// One running lenient server; killed (and its temp dir removed) on drop.
pub struct LenientServer {
    kind: Lenient,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    requests: PathBuf,
    stderr: PathBuf,
    dir: TempDir,
}

impl LenientServer {
    /// Start a `kind` server on `addr` (port 0: a free port, see [`LenientServer::addr`]) and
    /// wait until it listens. Panics, saying what is missing, when it cannot run.
    pub fn start(kind: Lenient, addr: SocketAddr) -> LenientServer {
        let dir = TempDir::new(&format!("lenient-{kind}"));
        let log = dir.path().join("executions.jsonl");
        let requests = dir.path().join("requests.jsonl");
        let stderr = dir.path().join("stderr.log");
        std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let stderr_file = std::fs::File::create(&stderr)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()));
        let mut cmd = kind.command();
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--log")
            .arg(&log)
            .arg("--requests")
            .arg(&requests)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            let (program, package) = kind.program();
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!(
                    "lenient-{kind} needs {program}, which is not installed: run cargo xtask \
                     setup (Debian package {package})"
                )
            }
            panic!("start lenient-{kind} ({cmd:?}): {e}")
        });
        // The first line says where it listens; the rest of stdout is drained so that the
        // server never blocks on a full pipe.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("listening") {
                    let _ = tx.send(line);
                    break;
                }
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(STARTUP) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "lenient-{kind} did not print `listening` on {addr} ({}; exit: {status:?}); stderr:\n{}",
                    match e {
                        mpsc::RecvTimeoutError::Timeout => "timed out",
                        mpsc::RecvTimeoutError::Disconnected => "stdout closed",
                    },
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            }
        };
        let addr = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(addr);
        LenientServer {
            kind,
            addr,
            child,
            log,
            requests,
            stderr,
            dir,
        }
    }

    pub fn kind(&self) -> Lenient {
        self.kind
    }

    /// Where it listens (the bound port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`; every path is served alike.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every tools/call the server executed, in order: the tool name and the arguments as the
    /// server itself read them (a name that is not a JSON string comes as its JSON text;
    /// absent arguments as `null`).
    pub fn executed(&self) -> Vec<(String, Value)> {
        read_lines(&self.log)
            .into_iter()
            .map(|v| {
                let tool = match &v["tool"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (tool, v.get("arguments").cloned().unwrap_or(Value::Null))
            })
            .collect()
    }

    /// How many times `tool` was executed.
    pub fn calls(&self, tool: &str) -> u64 {
        self.executed().iter().filter(|(t, _)| t == tool).count() as u64
    }

    /// Every HTTP request received: `{"method", "path", "length"}` (the body's length in bytes,
    /// or for Node in decoded UTF-16 units; -1 when Node could not decode it).
    pub fn requests(&self) -> Vec<Value> {
        read_lines(&self.requests)
    }

    /// What the server wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its temp dir (logs), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LenientServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` (a TempDir) is removed after this, as the fields drop.
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line is not JSON ({e}): {l:?}", path.display()))
        })
        .collect()
}
