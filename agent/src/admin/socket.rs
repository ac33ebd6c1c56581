//! The admin socket: HTTP/1.1 on a Unix socket (mode 0660, owner root, group the configured
//! admin group), never on TCP. Each connection's peer is checked once, from the kernel's
//! credentials (`SO_PEERCRED`: uid and primary gid; `SO_PEERGROUPS`: supplementary groups): root
//! or a member of the admin group is served, anyone else gets 403 and an `admin_refused`
//! audit record.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/status` | [`Status`](super::status::Status) as JSON |
//! | `GET /v1/health` | [`Report`](super::health::Report); 200 when ready, else 503 |
//! | `POST /v1/reload` | [`Reloaded`](super::Reloaded) |
//! | `POST /v1/explain` | an [`ExplainQuery`](super::ExplainQuery) in, the decision and its steps out |
//! | `GET /v1/approvals` | the held calls ([`Summary`](crate::approvals::Summary) list) |
//! | `POST /v1/approvals/decide` | a [`Decide`](super::Decide) in, the decided call's summary out; 404 unknown id, 403 an approver in the caller's own workload |

use std::{
    convert::Infallible,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::{Control, Peer};

/// Request bodies larger than this are refused (an explain query is small).
const MAX_BODY: usize = 1 << 20;

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub group: Option<u32>,
}

/// The bound socket; dropping it removes its file if the path still names it.
pub struct AdminSocket {
    path: PathBuf,
    /// Where it is bound until [`AdminSocket::publish`] moves it to `path`.
    staged: PathBuf,
    published: bool,
    /// Device and inode of the socket file this agent bound: a successor binds its own at the
    /// same path, which this one must not remove.
    ino: (u64, u64),
    listener: Option<UnixListener>,
}

impl AdminSocket {
    /// Bind a socket for `path`, mode 0660, owner root, group `access.group`: beside it
    /// (`PATH.PID`) until [`AdminSocket::publish`]. Anything at `path` that is not a socket is
    /// an error.
    pub fn bind(path: &Path, access: Access) -> Result<AdminSocket> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => bail!(
                "{} exists and is not a socket: refusing to replace it (admin_socket)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let mut staged = path.as_os_str().to_owned();
        staged.push(format!(".{}", std::process::id()));
        let staged = PathBuf::from(staged);
        let _ = std::fs::remove_file(&staged);
        let std_listener = std::os::unix::net::UnixListener::bind(&staged)
            .with_context(|| format!("binding the admin socket {}", staged.display()))?;
        let mut socket = AdminSocket {
            path: path.to_owned(),
            staged: staged.clone(),
            published: false,
            ino: (0, 0),
            listener: None,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        std::os::unix::fs::chown(&staged, Some(0), Some(access.group.unwrap_or(0)))
            .with_context(|| format!("chown {}", staged.display()))?;
        std_listener.set_nonblocking(true)?;
        let meta = std::fs::metadata(&staged)?;
        socket.ino = (meta.dev(), meta.ino());
        socket.listener = Some(UnixListener::from_std(std_listener)?);
        Ok(socket)
    }

    /// Move the socket to its path (replacing a previous agent's, or a stale one).
    pub fn publish(&mut self) -> Result<()> {
        std::fs::rename(&self.staged, &self.path).with_context(|| {
            format!(
                "moving the admin socket {} to {}",
                self.staged.display(),
                self.path.display()
            )
        })?;
        self.published = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where it is bound before (or instead of) being published: `PATH.PID`.
    pub fn staged(&self) -> &Path {
        &self.staged
    }

    /// Serve until the returned task is aborted.
    pub fn serve(
        &mut self,
        control: Arc<dyn Control>,
        access: Access,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let listener = self.listener.take()?;
        Some(tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let control = control.clone();
                tokio::spawn(async move {
                    let verdict = check_peer(stream.as_raw_fd(), access);
                    if let Err((pid, uid, why)) = &verdict {
                        tracing::warn!(pid, uid, "admin socket: {why}");
                        // The audit write may wait for a stalled sink: not on this thread.
                        let (control, pid, uid, why) = (control.clone(), *pid, *uid, why.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || control.refused(pid, uid, &why))
                                .await;
                    }
                    let verdict = Arc::new(verdict.map_err(|(_, _, why)| why));
                    let service = hyper::service::service_fn(move |req| {
                        let control = control.clone();
                        let verdict = verdict.clone();
                        async move {
                            Ok::<_, Infallible>(match &*verdict {
                                Ok(peer) => route(req, control, peer).await,
                                Err(why) => json(
                                    StatusCode::FORBIDDEN,
                                    &serde_json::json!({ "error": why }),
                                ),
                            })
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }))
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // A successor may have bound its own socket here since: leave that one alone.
        let path = if self.published {
            &self.path
        } else {
            &self.staged
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if (m.dev(), m.ino()) == self.ino {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Root, or the admin group as primary or supplementary group: `Ok`; otherwise the peer's
/// pid, uid and why it is refused.
fn check_peer(fd: std::os::fd::RawFd, access: Access) -> Result<Peer, (u32, u32, String)> {
    // SAFETY: `fd` is the accepted stream's, open for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let cred = crate::identity::peer_cred(&fd).map_err(|e| {
        (
            0,
            u32::MAX,
            format!("cannot read the peer's credentials: {e}"),
        )
    })?;
    let (pid, uid) = (cred.pid, cred.uid);
    let peer = |groups: Vec<u32>| Peer {
        pid,
        uid,
        gid: cred.gid,
        groups,
    };
    if uid == 0 {
        return Ok(peer(peer_groups(fd).unwrap_or_default()));
    }
    let Some(group) = access.group else {
        return Err((
            pid,
            uid,
            format!("peer pid {pid} uid {uid} refused: only root may use this socket (no admin group is configured)"),
        ));
    };
    let groups = peer_groups(fd);
    if cred.gid == group {
        return Ok(peer(groups.unwrap_or_default()));
    }
    match groups {
        Ok(groups) if groups.contains(&group) => Ok(peer(groups)),
        Ok(_) => Err((
            pid,
            uid,
            format!("peer pid {pid} uid {uid} refused: not root and not in the admin group (gid {group})"),
        )),
        Err(e) => Err((
            pid,
            uid,
            format!("peer pid {pid} uid {uid} refused: cannot read its groups (SO_PEERGROUPS): {e}"),
        )),
    }
}

/// The peer's supplementary groups, from `SO_PEERGROUPS` (credentials at connect time).
fn peer_groups(fd: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: the buffer is `len` bytes long and lives across the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 1 << 16 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

type Body = Full<Bytes>;

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The body of a POST, at most [`MAX_BODY`] bytes, as JSON.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
) -> Result<T, Box<Response<Body>>> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            )))
        }
        Err(e) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
            )))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("the body: {e}"))))
}

async fn route(req: Request<Incoming>, control: Arc<dyn Control>, peer: &Peer) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/v1/status") => {
            match tokio::task::spawn_blocking(move || control.status()).await {
                Ok(s) => json(StatusCode::OK, &s),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::GET, "/v1/health") => {
            let report = control.health();
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &report)
        }
        (&Method::POST, "/v1/reload") => {
            match tokio::task::spawn_blocking(move || control.reload()).await {
                Ok(r) => json(StatusCode::OK, &r),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::POST, "/v1/explain") => {
            let query: super::ExplainQuery = match read_json(body).await {
                Ok(q) => q,
                Err(r) => return *r,
            };
            match control.explain(&query) {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (&Method::GET, "/v1/approvals") => json(StatusCode::OK, &control.approvals()),
        (&Method::POST, "/v1/approvals/decide") => {
            let decide: super::Decide = match read_json(body).await {
                Ok(d) => d,
                Err(r) => return *r,
            };
            let peer = peer.clone();
            // Writes audit records (a refused approver): not on this thread.
            match tokio::task::spawn_blocking(move || control.decide(&decide, &peer)).await {
                Ok(Ok(summary)) => json(StatusCode::OK, &summary),
                Ok(Err((status, e))) => error(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
                    e,
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (
            _,
            "/v1/status"
            | "/v1/health"
            | "/v1/reload"
            | "/v1/explain"
            | "/v1/approvals"
            | "/v1/approvals/decide",
        ) => {
            let allow = if matches!(path.as_str(), "/v1/status" | "/v1/health" | "/v1/approvals") {
                "GET"
            } else {
                "POST"
            };
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
            r
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
    }
}

/// The admin socket at `path` first, then the sockets of agents still draining after a
/// hand-over beside it (`PATH.PID`), which serve their own held calls.
pub fn with_draining(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_owned()];
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return out;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut more: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix(&prefix)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
                && e.file_type().is_ok_and(|t| t.is_socket())
        })
        .map(|e| e.path())
        .collect();
    more.sort();
    out.extend(more);
    out
}

/// The gid of `group`: a number, or a name from the group database (getgrnam_r: NSS, so
/// directory groups work too).
pub fn resolve_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).context("a group name with a NUL byte")?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed plain C struct, filled by getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`'s strings
    // (only gr_gid is read).
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc))
            .with_context(|| format!("looking up group {group:?}"));
    }
    if found.is_null() {
        bail!("no group named {group:?} (give a gid instead)");
    }
    Ok(grp.gr_gid)
}
