//! Every HTTP-facing error, mapped to a status and a FHIR OperationOutcome in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use thiserror::Error;

use crate::journal::JournalError;
use crate::normalise::MapError;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("unknown vendor {0:?}")]
    UnknownVendor(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("content type {got:?} is not accepted; send {expected}")]
    UnsupportedMediaType { got: String, expected: &'static str },
    #[error("{message}")]
    BadRequest { field: String, message: String },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{message}")]
    Forbidden { field: String, message: String },
    #[error("the gateway is overloaded; retry later")]
    Overloaded { retry_after_s: u64 },
    #[error("the journal is unavailable; nothing was stored; retry later")]
    Unavailable { retry_after_s: u64, detail: String },
    #[error("{0}")]
    Conflict(String),
    #[error("request timed out before the event was stored")]
    Timeout { retry_after_s: u64 },
    #[error(
        "vendor {vendor:?} is over its request rate limit; nothing was stored; retry after {retry_after_s} s"
    )]
    RateLimited { vendor: String, retry_after_s: u64 },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

impl ApiError {
    pub fn from_journal(e: JournalError, retry_after_s: u64) -> Self {
        match e {
            JournalError::Overloaded => ApiError::Overloaded { retry_after_s },
            JournalError::Unavailable(detail) => ApiError::Unavailable {
                retry_after_s,
                detail,
            },
            JournalError::NotFound(m) => ApiError::NotFound(m),
            JournalError::Conflict(m) => ApiError::Conflict(m),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<String>, Option<u64>) {
        match self {
            ApiError::UnknownVendor(_) => (
                StatusCode::NOT_FOUND,
                "not-found",
                Some("vendor".into()),
                None,
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", None, None),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-long", None, None),
            ApiError::UnsupportedMediaType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                Some("Content-Type".into()),
                None,
            ),
            ApiError::BadRequest { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid",
                Some(field.clone()),
                None,
            ),
            ApiError::Map(MapError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, "structure", None, None)
            }
            ApiError::Map(MapError::Unmappable { field, .. }) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                Some(field.clone()),
                None,
            ),
            ApiError::Forbidden { field, .. } => (
                StatusCode::FORBIDDEN,
                "forbidden",
                Some(field.clone()),
                None,
            ),
            ApiError::Overloaded { retry_after_s } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "throttled",
                None,
                Some(*retry_after_s),
            ),
            ApiError::Unavailable { retry_after_s, .. } | ApiError::Timeout { retry_after_s } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                None,
                Some(*retry_after_s),
            ),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None, None),
            ApiError::RateLimited { retry_after_s, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                None,
                Some(*retry_after_s),
            ),
            ApiError::Auth(crate::auth::AuthError::InsufficientScope { .. }) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                Some("Authorization".into()),
                None,
            ),
            ApiError::Auth(_) => (
                StatusCode::UNAUTHORIZED,
                "login",
                Some("Authorization".into()),
                None,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field, retry_after) = self.parts();
        if let ApiError::Unavailable { detail, .. } = &self {
            tracing::error!(%detail, "journal unavailable");
        }
        let mut issue =
            json!({ "severity": "error", "code": code, "diagnostics": self.to_string() });
        if let Some(f) = field {
            issue["expression"] = json!([f]);
        }
        let body = json!({ "resourceType": "OperationOutcome", "issue": [issue] });
        let mut resp = (status, Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        if let ApiError::Auth(e) = &self {
            for c in e.challenges() {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
        }
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
