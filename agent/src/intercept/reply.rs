//! The responses mcpwarden writes itself: refusals, 202s, errors in place of the server's.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::upstream::Body;

/// A body of these bytes.
pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// `status` with a `text/plain` body.
pub(super) fn plain_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(text.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `status` with a JSON body.
pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// 202 Accepted, as an HTTP+SSE server answers every POST.
pub(super) fn accepted() -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(b"Accepted")));
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

/// A request refused before it was read as MCP: `mcpwarden: REASON` as text.
pub(super) fn refused_plain(status: StatusCode, reason: &str) -> Response<Body> {
    plain_response(status, &format!("mcpwarden: {reason}\n"))
}
