//! Why a request was refused; mapped to 401/403 + `WWW-Authenticate` in `api_error.rs`.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("missing access token: send \"Authorization: Bearer <token>\" (or DPoP)")]
    Missing { dpop_only: bool },
    #[error("invalid access token: {reason}")]
    Invalid { reason: String, dpop_only: bool },
    #[error("the access token lacks the scope {scope:?} this endpoint requires")]
    InsufficientScope {
        scope: String,
        /// The caller, for the audit trail.
        sub: String,
        dpop_only: bool,
    },
}

/// Algorithms we accept for access tokens and DPoP proofs (asymmetric only).
pub const ALGS: &str = "ES256 ES384 RS256 RS384 RS512 PS256 PS384 PS512";

impl AuthError {
    pub fn invalid(reason: impl Into<String>, dpop_only: bool) -> Self {
        AuthError::Invalid {
            reason: reason.into(),
            dpop_only,
        }
    }

    /// `WWW-Authenticate` challenges (RFC 6750 §3, RFC 9449 §7.1), one per accepted scheme.
    pub fn challenges(&self) -> Vec<String> {
        let (params, dpop_only) = match self {
            AuthError::Missing { dpop_only } => (String::new(), *dpop_only),
            AuthError::Invalid { reason, dpop_only } => (
                format!(
                    ", error=\"invalid_token\", error_description=\"{}\"",
                    quote_safe(reason)
                ),
                *dpop_only,
            ),
            AuthError::InsufficientScope {
                scope, dpop_only, ..
            } => (
                format!(
                    ", error=\"insufficient_scope\", scope=\"{}\"",
                    quote_safe(scope)
                ),
                *dpop_only,
            ),
        };
        let mut out = Vec::new();
        if !dpop_only {
            out.push(format!("Bearer realm=\"knutepunkt\"{params}"));
        }
        out.push(format!(
            "DPoP realm=\"knutepunkt\", algs=\"{ALGS}\"{params}"
        ));
        out
    }
}

/// Challenge parameters are quoted strings: keep them to printable ASCII without quotes.
fn quote_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect()
}

/// Building the authenticator failed (start-up).
#[derive(Debug, Error)]
pub enum AuthBuildError {
    #[error("auth.jwks_file {path}: {source}")]
    ReadJwks {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.jwks_file {path}: not a JWK set: {source}")]
    ParseJwks {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("auth.jwks_url: building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}
