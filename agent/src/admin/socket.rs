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

use super::Control;

/// Request bodies larger than this are refused (an explain query is small).
const MAX_BODY: usize = 1 << 20;

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub group: Option<u32>,
}

/// The bound socket; dropping it removes the path if it is still this socket's.
pub struct AdminSocket {
    path: PathBuf,
    /// Device and inode of the socket file this agent bound: a successor binds its own at the
    /// same path, which this one must not remove.
    ino: (u64, u64),
    listener: Option<UnixListener>,
}

impl AdminSocket {
    /// Bind `path` (a stale socket there is replaced; anything else there is an error),
    /// mode 0660, owner root, group `access.group`.
    pub fn bind(path: &Path, access: Access) -> Result<AdminSocket> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?,
            Ok(_) => bail!(
                "{} exists and is not a socket: refusing to replace it (admin_socket)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let std_listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("binding the admin socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        std::os::unix::fs::chown(path, Some(0), Some(access.group.unwrap_or(0)))
            .with_context(|| format!("chown {}", path.display()))?;
        std_listener.set_nonblocking(true)?;
        let meta = std::fs::metadata(path)?;
        Ok(AdminSocket {
            path: path.to_owned(),
            ino: (meta.dev(), meta.ino()),
            listener: Some(UnixListener::from_std(std_listener)?),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
                        control.refused(*pid, *uid, why);
                    }
                    let verdict = Arc::new(verdict.map_err(|(_, _, why)| why));
                    let service = hyper::service::service_fn(move |req| {
                        let control = control.clone();
                        let verdict = verdict.clone();
                        async move {
                            Ok::<_, Infallible>(match &*verdict {
                                Ok(()) => route(req, control).await,
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
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Root, or the admin group as primary or supplementary group: `Ok`; otherwise the peer's
/// pid, uid and why it is refused.
fn check_peer(fd: std::os::fd::RawFd, access: Access) -> Result<(), (u32, u32, String)> {
    // SAFETY: `fd` is the accepted stream's, open for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let cred = rustix::net::sockopt::socket_peercred(fd).map_err(|e| {
        (
            0,
            u32::MAX,
            format!("cannot read the peer's credentials: {e}"),
        )
    })?;
    let pid = cred.pid.as_raw_nonzero().get() as u32;
    let uid = cred.uid.as_raw();
    if uid == 0 {
        return Ok(());
    }
    let Some(group) = access.group else {
        return Err((
            pid,
            uid,
            format!("peer pid {pid} uid {uid} refused: only root may use this socket (no admin group is configured)"),
        ));
    };
    if cred.gid.as_raw() == group {
        return Ok(());
    }
    match peer_groups(fd) {
        Ok(groups) if groups.contains(&group) => Ok(()),
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

async fn route(req: Request<Incoming>, control: Arc<dyn Control>) -> Response<Body> {
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
            let bytes = match Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            };
            let query: super::ExplainQuery = match serde_json::from_slice(&bytes) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("the query: {e}")),
            };
            match control.explain(&query) {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (_, "/v1/status" | "/v1/health" | "/v1/reload" | "/v1/explain") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
    }
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
