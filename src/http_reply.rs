//! JSON answers shared by the daemon's HTTP servers (the control socket and `metrics_listen`).
//!
//! Kept apart from both so that neither server depends on the other.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

/// The body type of every answer.
pub type Body = BoxBody<Bytes, Infallible>;

/// `value` as pretty JSON with `status`.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A JSON error `{"error": "..."}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
