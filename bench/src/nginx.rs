//! A bare nginx reverse-proxy hop: Debian's nginx, one worker, keep-alive to the upstream,
//! no access log, responses streamed (`proxy_buffering off`, as the interceptor streams them:
//! each SSE event goes on as it arrives, and an idle stream is not timed out for an hour).
//! It parses HTTP and nothing else: the cost of a generic proxy in the path. The TLS hop
//! terminates TLS with a certificate from the bench CA and re-encrypts to the upstream,
//! verifying it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use mcpwarden_tests::{spawn_in_cgroup, wait_for, TempDir};

pub struct Nginx {
    child: Child,
    pub listen: SocketAddr,
    _dir: TempDir,
}

/// The nginx binary: `$NGINX` or /usr/sbin/nginx.
pub fn binary() -> PathBuf {
    std::env::var_os("NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

pub fn version() -> String {
    Command::new(binary())
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// What the hop does.
pub enum Hop<'a> {
    /// HTTP in, HTTP to `upstream`.
    Plain { upstream: SocketAddr },
    /// TLS terminated with `cert`/`key` (a certificate for `name`), then TLS again to `upstream`
    /// with SNI `name`, verified against `ca`: keep-alive and session reuse towards the upstream,
    /// as a production TLS hop would be configured.
    Tls {
        upstream: SocketAddr,
        name: &'a str,
        cert: &'a Path,
        key: &'a Path,
        ca: &'a Path,
    },
}

/// Connections (client and upstream) the worker takes unless told otherwise.
pub const CONNECTIONS: usize = 4096;

fn config(dir: &Path, listen: SocketAddr, hop: &Hop<'_>, connections: usize) -> String {
    // Twice the connections, within what the worker may have (the master runs as root, but
    // raising the hard limit takes CAP_SYS_RESOURCE, which a container may not grant).
    let nofile = (2 * connections as u64).min(crate::nofile_limit().max(connections as u64));
    let d = dir.display();
    let (upstream, listen_opts, server_tls, scheme, location_tls) = match hop {
        Hop::Plain { upstream } => (*upstream, "", String::new(), "http", String::new()),
        Hop::Tls {
            upstream,
            name,
            cert,
            key,
            ca,
        } => (
            *upstream,
            " ssl",
            format!(
                r#"
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;"#,
                cert.display(),
                key.display()
            ),
            "https",
            format!(
                r#"
            proxy_ssl_server_name on;
            proxy_ssl_name {name};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {};
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;"#,
                ca.display()
            ),
        ),
    };
    format!(
        r#"worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream mcp {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen}{listen_opts} reuseport backlog=4096;{server_tls}
        location / {{
            proxy_pass {scheme}://mcp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 1h;{location_tls}
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Start nginx in `cgroup`, proxying `listen` → the hop's upstream; returns once it accepts.
    pub fn start(cgroup: &Path, listen: SocketAddr, hop: &Hop<'_>) -> Result<Nginx> {
        Nginx::start_sized(cgroup, listen, hop, CONNECTIONS)
    }

    /// [`Nginx::start`] with room for `connections` connections (client and upstream) in its
    /// worker, which allocates their slots at start.
    pub fn start_sized(
        cgroup: &Path,
        listen: SocketAddr,
        hop: &Hop<'_>,
        connections: usize,
    ) -> Result<Nginx> {
        Nginx::start_in(cgroup, None, listen, hop, connections)
    }

    /// [`Nginx::start_sized`], nginx in the network namespace at `netns` (when given): `listen`
    /// is an address there, and the start-up check connects from there.
    pub fn start_in(
        cgroup: &Path,
        netns: Option<&Path>,
        listen: SocketAddr,
        hop: &Hop<'_>,
        connections: usize,
    ) -> Result<Nginx> {
        let dir = TempDir::new("nginx");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), listen, hop, connections))?;
        let mut cmd = Command::new(binary());
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // nginx reads $NGINX as a list of inherited listening sockets (its binary upgrade);
            // ours names the binary (xtask sets it for the bench).
            .env_remove("NGINX");
        spawn_in_cgroup(&mut cmd, cgroup);
        let ns = crate::run::enter_netns(&mut cmd, netns)?;
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (cargo xtask bench installs it)",
                binary().display()
            )
        })?;
        let mut nginx = Nginx {
            child,
            listen,
            _dir: dir,
        };
        drop(ns);
        let accepts = move || {
            wait_for(Duration::from_secs(10), || {
                std::net::TcpStream::connect(listen).ok()
            })
            .is_some()
        };
        let up = match netns {
            None => accepts(),
            Some(path) => mcpwarden_tests::pods::in_netns(path, accepts),
        };
        if !up {
            let log =
                std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default();
            let _ = nginx.child.kill();
            bail!("nginx did not start listening on {listen}:\n{log}");
        }
        Ok(nginx)
    }

    /// The worker process (where the proxying happens): the child of the master.
    pub fn worker_pid(&self) -> Option<u32> {
        children_of(self.child.id()).into_iter().next()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of master and worker.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = wait_for(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids whose parent is `pid` (scanning /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if crate::run::proc_stat(child).is_some_and(|s| s.ppid == pid) {
            out.push(child);
        }
    }
    out
}
