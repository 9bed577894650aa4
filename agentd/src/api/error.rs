//! `ApiError`: every error the API returns, with its HTTP status and a stable code, serialized
//! as `{"error":{"code":"...","message":"..."}}`. Internal errors are logged with their chain
//! and returned as a generic 500 with a request id.

use hyper::StatusCode;

/// An error answered to an API client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Not allowed from where the request came (403), e.g. host paths over TCP.
    #[error("{0}")]
    Forbidden(String),
    /// The host's disk is full (507).
    #[error("{0}")]
    InsufficientStorage(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// Method not allowed on this path (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The resource is in the wrong state for this request (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is too large (413).
    #[error("{0}")]
    TooLarge(String),
    /// A quota would be exceeded (429).
    #[error("{0}")]
    Quota(String),
    /// An upstream (OpenCode in a sandbox, the LLM provider) failed (502).
    #[error("{0}")]
    BadGateway(String),
    /// The service is not ready for this (503), e.g. no LLM upstream configured.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a host failure (500); the message is logged, not returned.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Quota(_) => "quota_exceeded",
            ApiError::BadGateway(_) => "bad_gateway",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body; internal errors are logged here under `request_id` and hidden.
    pub fn body(&self, request_id: u64) -> serde_json::Value {
        let message = match self {
            ApiError::Internal(detail) => {
                tracing::error!(request_id, error = %detail, "internal error");
                format!("internal error (request {request_id}); see agentd's log")
            }
            other => other.to_string(),
        };
        serde_json::json!({"error": {"code": self.code(), "message": message}})
    }

    /// An internal error from anything displayable, with its causes.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

/// A handler's error becomes its status here; [`super::handle`] writes the body, which
/// carries the request's id.
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let mut response = self.status().into_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        crate::error::Error::from(e).into()
    }
}

/// Each kind of service error has its status.
impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error;
        match e {
            Error::Invalid(m) => ApiError::BadRequest(m),
            Error::Forbidden(m) => ApiError::Forbidden(m),
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::Conflict(m) => ApiError::Conflict(m),
            Error::Quota(m) => ApiError::Quota(m),
            Error::NoSpace(m) => ApiError::InsufficientStorage(m),
            Error::Unavailable(m) => ApiError::Unavailable(m),
            Error::Internal(m) => ApiError::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_internal_errors_hide_details() {
        let e = ApiError::internal("disk on fire at /secret/path");
        let body = e.body(7).to_string();
        assert!(!body.contains("/secret/path"), "{body}");
        assert!(body.contains("request 7"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let e = ApiError::Quota("too many sandboxes".into());
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            e.body(1),
            serde_json::json!({"error": {"code": "quota_exceeded", "message": "too many sandboxes"}})
        );
    }
}
