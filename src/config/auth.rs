//! `[auth]` (inbound OAuth2 bearer tokens) and the outbound credentials of a destination:
//! raw serde types and their pure validation. Documented in `docs/configuration.md` and
//! `docs/security.md` ("API authentication and tenant isolation").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[auth]`: absent means the API is open, which is only allowed on a loopback listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss` of every access token, e.g. `"https://helseid-sts.nhn.no"`.
    pub issuer: String,
    /// Expected `aud` (one of the token's audiences), e.g. `"knutepunkt"`.
    pub audience: String,
    /// JWKS file with the issuer's public signing keys (read at start-up).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL of the issuer; fetched at start-up, cached, refreshed on an unknown `kid`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and DPoP `iat`, in seconds.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Claim listing the caller's municipality numbers (string or array of strings; `"*"` means
    /// every tenant), e.g. a HelseID-style custom claim.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Scope required per endpoint family.
    #[serde(default)]
    pub scopes: ScopesConfig,
    /// Refuse plain `Bearer` tokens: every call must present a DPoP-bound token and proof.
    #[serde(default)]
    pub require_dpop: bool,
    /// Serve `/metrics` without a token (for a scraper on a trusted network); otherwise it
    /// needs the `read` scope.
    #[serde(default)]
    pub metrics_open: bool,
}

fn default_leeway_s() -> u64 {
    30
}

fn default_tenant_claim() -> String {
    "knutepunkt:tenants".into()
}

/// `[auth.scopes]`: the scope string each endpoint family requires.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopesConfig {
    pub ingest: String,
    pub subscribe: String,
    pub read: String,
    pub audit: String,
    pub replay: String,
    pub configure: String,
    /// Not an endpoint family: callers holding it see patient identity in audit reads.
    pub patient: String,
}

impl Default for ScopesConfig {
    fn default() -> Self {
        Self {
            ingest: "knutepunkt:ingest".into(),
            subscribe: "knutepunkt:subscribe".into(),
            read: "knutepunkt:read".into(),
            audit: "knutepunkt:audit".into(),
            replay: "knutepunkt:replay".into(),
            configure: "knutepunkt:configure".into(),
            patient: "knutepunkt:patient".into(),
        }
    }
}

/// `[auth]` after validation.
#[derive(Debug, Clone)]
pub struct ValidAuth {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub leeway: Duration,
    pub tenant_claim: String,
    pub scopes: ScopesConfig,
    pub require_dpop: bool,
    pub metrics_open: bool,
}

/// `[destination.oauth]`: OAuth2 client credentials with a `private_key_jwt` client assertion.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationOAuth {
    /// Token endpoint of the destination's authorisation server.
    pub token_url: String,
    pub client_id: String,
    /// PEM private key (RSA → RS256, EC P-256 → ES256) that signs the client assertion.
    pub private_key_file: PathBuf,
    /// Scope(s) to request, space-separated.
    #[serde(default)]
    pub scope: Option<String>,
    /// `audience` parameter some servers want (e.g. the EPJ's resource indicator).
    #[serde(default)]
    pub audience: Option<String>,
    /// Key id put in the assertion header, when the server needs it to pick the key.
    #[serde(default)]
    pub key_id: Option<String>,
}

/// Pushes `(field, message)` for every problem in `[auth]`.
pub fn validate_auth(
    auth: Option<&AuthConfig>,
    listen: &SocketAddr,
    push: &mut dyn FnMut(String, String),
) -> Option<ValidAuth> {
    let Some(a) = auth else {
        if !listen.ip().is_loopback() {
            push(
                "auth".into(),
                format!(
                    "missing: the API listens on {listen}, which is not loopback; configure [auth] \
                     (issuer, audience, jwks_file or jwks_url) or listen on 127.0.0.1"
                ),
            );
        }
        return None;
    };
    if !is_http_url(&a.issuer) {
        push(
            "auth.issuer".into(),
            format!(
                "{:?} is not an http(s) URL, e.g. \"https://helseid-sts.nhn.no\"",
                a.issuer
            ),
        );
    }
    if a.audience.trim().is_empty() {
        push(
            "auth.audience".into(),
            "must not be empty, e.g. \"knutepunkt\"".into(),
        );
    }
    match (&a.jwks_file, &a.jwks_url) {
        (None, None) => push(
            "auth.jwks_file".into(),
            "set auth.jwks_file and/or auth.jwks_url, e.g. jwks_url = \"https://idp.example/jwks\""
                .into(),
        ),
        (Some(f), _) if f.as_os_str().is_empty() => {
            push("auth.jwks_file".into(), "must not be empty".into());
        }
        _ => {}
    }
    if let Some(u) = &a.jwks_url
        && !is_http_url(u)
    {
        push(
            "auth.jwks_url".into(),
            format!(
                "{u:?} is not an http(s) URL, e.g. \"https://idp.example/.well-known/jwks.json\""
            ),
        );
    }
    if a.leeway_s > 300 {
        push("auth.leeway_s".into(), "must be at most 300 seconds".into());
    }
    if a.tenant_claim.trim().is_empty() {
        push(
            "auth.tenant_claim".into(),
            "must not be empty, e.g. \"knutepunkt:tenants\"".into(),
        );
    }
    let s = &a.scopes;
    for (name, v) in [
        ("ingest", &s.ingest),
        ("subscribe", &s.subscribe),
        ("read", &s.read),
        ("audit", &s.audit),
        ("replay", &s.replay),
        ("configure", &s.configure),
        ("patient", &s.patient),
    ] {
        if v.trim().is_empty() || v.contains(char::is_whitespace) {
            push(
                format!("auth.scopes.{name}"),
                format!("must be one scope token without spaces, e.g. \"knutepunkt:{name}\""),
            );
        }
    }
    Some(ValidAuth {
        issuer: a.issuer.clone(),
        audience: a.audience.clone(),
        jwks_file: a.jwks_file.clone(),
        jwks_url: a.jwks_url.clone(),
        leeway: Duration::from_secs(a.leeway_s),
        tenant_claim: a.tenant_claim.clone(),
        scopes: a.scopes.clone(),
        require_dpop: a.require_dpop,
        metrics_open: a.metrics_open,
    })
}

/// Pushes `(field suffix, message)` for every problem in a destination's outbound credentials.
pub fn validate_outbound(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    oauth: Option<&DestinationOAuth>,
    push: &mut dyn FnMut(&str, String),
) {
    if cert.is_some() != key.is_some() {
        push(
            "client_cert_file",
            "set both client_cert_file and client_key_file (PEM), or neither".into(),
        );
    }
    let Some(o) = oauth else { return };
    if !is_http_url(&o.token_url) {
        push(
            "oauth.token_url",
            format!(
                "{:?} is not an http(s) URL, e.g. \"https://idp.example/connect/token\"",
                o.token_url
            ),
        );
    }
    if o.client_id.trim().is_empty() {
        push("oauth.client_id", "must not be empty".into());
    }
    if o.private_key_file.as_os_str().is_empty() {
        push(
            "oauth.private_key_file",
            "must name a PEM private key file".into(),
        );
    }
}

fn is_http_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://"))
        && reqwest::Url::parse(s).is_ok_and(|u| u.host().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(auth: Option<&AuthConfig>, listen: &str) -> Vec<String> {
        let mut out = Vec::new();
        validate_auth(auth, &listen.parse().expect("addr"), &mut |f, _| {
            out.push(f)
        });
        out
    }

    #[test]
    fn open_api_only_on_loopback() {
        assert!(errors(None, "127.0.0.1:8080").is_empty());
        assert!(errors(None, "[::1]:8080").is_empty());
        assert_eq!(errors(None, "0.0.0.0:8080"), vec!["auth".to_string()]);
    }

    #[test]
    fn reports_each_bad_key() {
        let a: AuthConfig = toml::from_str(
            "issuer = \"nope\"\naudience = \"\"\nleeway_s = 999\n[scopes]\nread = \"a b\"",
        )
        .expect("toml");
        let errs = errors(Some(&a), "0.0.0.0:8080");
        for f in [
            "auth.issuer",
            "auth.audience",
            "auth.jwks_file",
            "auth.leeway_s",
            "auth.scopes.read",
        ] {
            assert!(errs.contains(&f.to_string()), "{f} in {errs:?}");
        }
    }

    #[test]
    fn outbound_credentials() {
        let mut errs = Vec::new();
        let cert = PathBuf::from("c.pem");
        validate_outbound(Some(&cert), None, None, &mut |f, _| {
            errs.push(f.to_string())
        });
        assert_eq!(errs, vec!["client_cert_file"]);
        let o: DestinationOAuth =
            toml::from_str("token_url = \"ftp://x\"\nclient_id = \"\"\nprivate_key_file = \"k\"")
                .expect("toml");
        let mut errs = Vec::new();
        validate_outbound(None, None, Some(&o), &mut |f, _| errs.push(f.to_string()));
        assert_eq!(errs, vec!["oauth.token_url", "oauth.client_id"]);
    }

    #[test]
    fn defaults() {
        let a: AuthConfig =
            toml::from_str("issuer = \"https://idp.example\"\naudience = \"k\"\njwks_file = \"j\"")
                .expect("toml");
        assert!(errors(Some(&a), "0.0.0.0:8080").is_empty());
        assert_eq!(a.scopes.ingest, "knutepunkt:ingest");
        assert_eq!(a.leeway_s, 30);
        assert!(!a.require_dpop);
    }
}
