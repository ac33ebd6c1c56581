//! The CLI's side of the admin socket: one HTTP/1.1 request (hyper over the Unix socket), the
//! JSON answer back.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// `method path` with `body` (JSON) on the admin socket at `socket`: the status and the body.
pub fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // An agent that accepts but does not answer (stopped, swapping) must not hang a probe.
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| {
                format!(
                    "connecting to the agent's admin socket {} (is the agent running? is this the \
                 path it was given with --admin-socket? are you root or in its admin group?)",
                    socket.display()
                )
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "mcpwarden")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("the agent answered {status} with a body that is not JSON"))?;
        if status == http::StatusCode::FORBIDDEN {
            bail!(
                "the agent refused this request: {}",
                value["error"].as_str().unwrap_or("forbidden")
            );
        }
        // 503 is a health answer (not ready), not a failure of the request.
        if !status.is_success() && status != http::StatusCode::SERVICE_UNAVAILABLE {
            bail!(
                "the agent answered {status}: {}",
                value["error"].as_str().unwrap_or("no reason given")
            );
        }
        Ok((status, value))
    };
    runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| {
            anyhow::anyhow!(
                "the agent did not answer on {} within {} s",
                socket.display(),
                TIMEOUT.as_secs()
            )
        })?
    })
}

/// How long one request to the admin socket may take (a reload waits for the reload thread).
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(40);
