//! Announcing pending approvals to a URL (`approvals.webhook_url`).

use std::path::PathBuf;

/// `approvals.webhook_url` and its secret.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: http::Uri,
    /// A file holding the HMAC secret (never logged).
    pub secret_file: PathBuf,
}
