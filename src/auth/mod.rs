//! Inbound API authentication (OAuth2 access tokens, optionally DPoP-bound) and tenant isolation.
//!
//! One middleware (`require`, applied once in `app::http_router`) classifies every request into
//! an endpoint `Family`, validates the access token against the issuer's JWKS and the family's
//! scope, and stores the `Caller` in the request extensions. Handlers never look at tokens: they
//! take a `TenantScope` (from the `Caller`) and pass it to their journal queries, so a caller
//! only ever sees its own municipalities' events. Without `[auth]` (loopback only) nothing is
//! checked and every scope is `TenantScope::All`.

mod dpop;
mod error;
mod jwks;
mod tenant;
mod token;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::config::auth::ValidAuth;
use crate::journal::AuditNote;
pub use error::{AuthBuildError, AuthError};
pub use tenant::TenantScope;

/// Who made the request, as proven by the access token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `sub` of the token (or `client_id` for client-credentials tokens without `sub`).
    pub sub: String,
    /// Municipality numbers from the tenant claim; `"*"` means every tenant.
    pub tenants: Vec<String>,
    pub scopes: Vec<String>,
    /// Holds `auth.scopes.patient`: may see patient identity in audit reads.
    pub may_see_patient: bool,
}

/// Set by the mTLS listener when the vendor presented a verified client certificate; vendor
/// ingest then needs no bearer token.
#[derive(Debug, Clone)]
pub struct VerifiedClientCert;

/// Endpoint families, each guarded by one scope (`[auth.scopes]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `/healthz`, `/readyz`: probes, never authenticated.
    Open,
    Ingest,
    Subscribe,
    Read,
    Audit,
    Replay,
    Configure,
}

/// The one table of which path belongs to which family. Unknown paths are `Read`, so a new
/// route is never open by accident.
pub fn classify(method: &Method, path: &str) -> Family {
    let path = path.trim_end_matches('/');
    if path == "/healthz" || path == "/readyz" {
        return Family::Open;
    }
    if path.starts_with("/v1/vendors/") {
        return Family::Ingest;
    }
    // The CapabilityStatement is public, as FHIR clients read it before they authenticate.
    if path == "/fhir/metadata" {
        return Family::Open;
    }
    // The EPJ-facing FHIR API (subscriptions, topics, pull feed and its journaling acks) is one
    // family: an EPJ system holds one scope for all of it.
    if path.starts_with("/fhir/") {
        return Family::Subscribe;
    }
    if path.starts_with("/v1/admin/audit") || path.starts_with("/console/audit") {
        return Family::Audit;
    }
    let safe = method == Method::GET || method == Method::HEAD;
    if !safe && path.ends_with("/replay") {
        return Family::Replay;
    }
    if !safe {
        return Family::Configure;
    }
    Family::Read
}

/// Validates tokens for one `[auth]` section.
pub struct Authenticator {
    config: ValidAuth,
    keys: jwks::KeyStore,
    replay: dpop::ReplayCache,
}

impl Authenticator {
    /// Reads `jwks_file` and fetches `jwks_url` once (a failing fetch is retried on demand).
    pub async fn build(config: ValidAuth) -> Result<Self, AuthBuildError> {
        let keys =
            jwks::KeyStore::load(config.jwks_file.as_deref(), config.jwks_url.clone()).await?;
        Ok(Self {
            config,
            keys,
            replay: dpop::ReplayCache::new(dpop::REPLAY_CAPACITY),
        })
    }

    fn scope_for(&self, family: Family) -> &str {
        let s = &self.config.scopes;
        match family {
            Family::Open => "",
            Family::Ingest => &s.ingest,
            Family::Subscribe => &s.subscribe,
            Family::Read => &s.read,
            Family::Audit => &s.audit,
            Family::Replay => &s.replay,
            Family::Configure => &s.configure,
        }
    }

    /// Authenticates one request for `family`.
    pub async fn check(&self, req: &Parts, family: Family) -> Result<Caller, AuthError> {
        let dpop_only = self.config.require_dpop;
        let header = req
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing { dpop_only })?;
        let (scheme, token) = header.split_once(' ').ok_or_else(|| {
            AuthError::invalid(
                "Authorization must be \"Bearer <token>\" or \"DPoP <token>\"",
                dpop_only,
            )
        })?;
        let token = token.trim();
        let is_dpop = if scheme.eq_ignore_ascii_case("dpop") {
            true
        } else if scheme.eq_ignore_ascii_case("bearer") {
            false
        } else {
            return Err(AuthError::Missing { dpop_only });
        };
        if dpop_only && !is_dpop {
            return Err(AuthError::invalid(
                "this API requires DPoP-bound tokens",
                dpop_only,
            ));
        }
        let claims = token::validate(token, &self.config, &self.keys)
            .await
            .map_err(|r| AuthError::invalid(r, dpop_only))?;
        match (is_dpop, claims.cnf_jkt.as_deref()) {
            (false, Some(_)) => {
                return Err(AuthError::invalid(
                    "the token is DPoP-bound (cnf); present it with the DPoP scheme and a proof",
                    dpop_only,
                ));
            }
            (true, None) => {
                return Err(AuthError::invalid(
                    "a DPoP token must carry cnf.jkt",
                    dpop_only,
                ));
            }
            (true, Some(jkt)) => {
                dpop::verify(req, token, jkt, self.config.leeway, &self.replay)
                    .map_err(|r| AuthError::invalid(r, dpop_only))?;
            }
            (false, None) => {}
        }
        let need = self.scope_for(family);
        if !claims.scopes.iter().any(|s| s == need) {
            return Err(AuthError::InsufficientScope {
                scope: need.to_string(),
                sub: claims.sub,
                dpop_only,
            });
        }
        let may_see_patient = claims.scopes.contains(&self.config.scopes.patient);
        Ok(Caller {
            sub: claims.sub,
            tenants: claims.tenants,
            scopes: claims.scopes,
            may_see_patient,
        })
    }
}

/// The middleware: without `[auth]` it lets everything through.
pub async fn require(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(auth) = state.auth.as_deref() else {
        return next.run(req).await;
    };
    let mut family = classify(req.method(), req.uri().path());
    if auth.config.metrics_open && req.uri().path() == "/metrics" {
        family = Family::Open;
    }
    if family == Family::Open
        || (family == Family::Ingest && req.extensions().get::<VerifiedClientCert>().is_some())
    {
        return next.run(req).await;
    }
    // Check on the parts: the body is not `Sync`, so a `&Request` cannot be held across await.
    let (mut parts, body) = req.into_parts();
    match auth.check(&parts, family).await {
        Ok(caller) => {
            parts.extensions.insert(caller);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => {
            tracing::info!(family = ?family, error = %e, "request refused");
            if let AuthError::InsufficientScope { scope, sub, .. } = &e {
                audit_denied(&state, &parts, family, scope, sub).await;
            }
            ApiError::Auth(e).into_response()
        }
    }
}

/// An authenticated caller tried something its token does not allow: that goes into the audit
/// trail. Unauthenticated refusals (401) are only logged: anyone can cause them, and they must not
/// be able to fill the journal.
async fn audit_denied(state: &AppState, parts: &Parts, family: Family, scope: &str, sub: &str) {
    let note = AuditNote {
        kind: "access_denied".into(),
        subject: format!("caller:{}", sub.chars().take(128).collect::<String>()),
        dest: None,
        detail: format!(
            "{} {} ({family:?}) needs scope {scope}",
            parts.method,
            parts.uri.path().chars().take(200).collect::<String>()
        ),
    };
    if let Err(e) = state.journal.audit_note(note).await {
        tracing::warn!(error = %e, "could not audit a refused request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(classify(&get, "/healthz"), Family::Open);
        assert_eq!(classify(&get, "/readyz"), Family::Open);
        assert_eq!(classify(&get, "/metrics"), Family::Read);
        assert_eq!(classify(&post, "/v1/vendors/acme/events"), Family::Ingest);
        assert_eq!(classify(&get, "/v1/admin/dead-letters"), Family::Read);
        assert_eq!(
            classify(&post, "/v1/admin/dead-letters/7/replay"),
            Family::Replay
        );
        assert_eq!(
            classify(&post, "/v1/admin/dead-letters/replay"),
            Family::Replay
        );
        assert_eq!(
            classify(&post, "/console/dead-letters/replay"),
            Family::Replay
        );
        assert_eq!(
            classify(&post, "/v1/admin/devices/acme/d1/assignments"),
            Family::Configure
        );
        assert_eq!(classify(&get, "/v1/admin/audit"), Family::Audit);
        assert_eq!(classify(&post, "/fhir/Subscription"), Family::Subscribe);
        assert_eq!(classify(&post, "/fhir/Bundle/e1/$ack"), Family::Subscribe);
        assert_eq!(classify(&get, "/fhir/metadata"), Family::Open);
        assert_eq!(classify(&get, "/anything-new"), Family::Read);
    }
}
