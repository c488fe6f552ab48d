//! Outbound OAuth2 for a destination: the client-credentials grant with a `private_key_jwt`
//! client assertion (RFC 7523 §2.2: `iss` = `sub` = client id, `aud` = token URL, fresh `jti`,
//! short `exp`). The access token is cached until shortly before it expires; a 401 from the
//! destination drops it so the next request fetches a new one.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::json;
use thiserror::Error;

use crate::config::auth::DestinationOAuth;

/// Lifetime of a client assertion; long enough for clock skew, short enough to be useless
/// if intercepted.
const ASSERTION_TTL_S: u64 = 60;
/// Refresh this long before expiry (at most a quarter of the token's lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(30);
const MAX_TOKEN_BODY: usize = 64 * 1024;
const MAX_LIFETIME_S: u64 = 86_400;

#[derive(Debug, Error)]
pub enum OAuthError {
    #[error("oauth.private_key_file {path}: {message}")]
    Key { path: String, message: String },
    #[error("token endpoint: {0}")]
    Fetch(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

pub struct TokenSource {
    cfg: DestinationOAuth,
    key: EncodingKey,
    alg: Algorithm,
    http: reqwest::Client,
    /// Also makes fetches single-flight: concurrent deliveries wait for one token request.
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl TokenSource {
    /// Reads the PEM key (RSA → RS256, EC P-256 → ES256).
    pub fn load(cfg: DestinationOAuth, timeout: Duration) -> Result<Self, OAuthError> {
        let path = cfg.private_key_file.display().to_string();
        let pem = std::fs::read(&cfg.private_key_file).map_err(|e| OAuthError::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (key, alg) = match EncodingKey::from_rsa_pem(&pem) {
            Ok(k) => (k, Algorithm::RS256),
            Err(_) => match EncodingKey::from_ec_pem(&pem) {
                Ok(k) => (k, Algorithm::ES256),
                Err(_) => {
                    return Err(OAuthError::Key {
                        path,
                        message: "not a PEM RSA or EC (P-256) private key".into(),
                    });
                }
            },
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OAuthError::Fetch(e.to_string()))?;
        Ok(Self {
            cfg,
            key,
            alg,
            http,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid access token: the cached one, or a new one from the token endpoint.
    pub async fn token(&self) -> Result<String, OAuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// The destination refused `token`: forget it (unless another task already replaced it).
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }

    fn assertion(&self) -> Result<String, OAuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": self.cfg.client_id,
            "sub": self.cfg.client_id,
            "aud": self.cfg.token_url,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_TTL_S,
        });
        let mut header = Header::new(self.alg);
        header.kid = self.cfg.key_id.clone();
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| OAuthError::Fetch(format!("signing the client assertion: {e}")))
    }

    async fn fetch(&self) -> Result<Cached, OAuthError> {
        let assertion = self.assertion()?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("client_id", self.cfg.client_id.as_str()),
        ];
        if let Some(s) = &self.cfg.scope {
            form.push(("scope", s));
        }
        if let Some(a) = &self.cfg.audience {
            form.push(("audience", a));
        }
        let started = Instant::now();
        let mut resp = self
            .http
            .post(&self.cfg.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| OAuthError::Fetch(e.to_string()))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| OAuthError::Fetch(e.to_string()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_TOKEN_BODY {
                return Err(OAuthError::Fetch("response too large".into()));
            }
        }
        if !status.is_success() {
            // The error body (RFC 6749 §5.2) names the reason; it holds no secret.
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).replace('\n', " ");
            return Err(OAuthError::Fetch(format!(
                "HTTP {}: {}",
                status.as_u16(),
                text.trim()
            )));
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| OAuthError::Fetch(format!("not a token response: {e}")))?;
        if t.token_type
            .as_deref()
            .is_some_and(|tt| !tt.eq_ignore_ascii_case("bearer"))
        {
            return Err(OAuthError::Fetch(format!(
                "token_type {:?} is not supported (only Bearer)",
                t.token_type
            )));
        }
        if t.access_token.is_empty() || !t.access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(OAuthError::Fetch(
                "access_token is empty or not printable ASCII".into(),
            ));
        }
        // A missing lifetime gets 5 minutes; an absurd one is capped (and cannot overflow).
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(300).min(MAX_LIFETIME_S));
        let margin = REFRESH_MARGIN.min(lifetime / 4);
        tracing::debug!(client_id = %self.cfg.client_id, lifetime_s = lifetime.as_secs(), "fetched access token");
        Ok(Cached {
            token: t.access_token,
            refresh_at: started + lifetime - margin,
        })
    }
}
