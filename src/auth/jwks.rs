//! The issuer's signing keys: a JWKS file (fixed) and/or a JWKS URL (cached, refreshed when a
//! token names an unknown `kid`, at most once per `MIN_REFETCH`, bounded in size and time).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};

use super::error::AuthBuildError;

/// Keys from the URL are used this long before a routine re-fetch.
const TTL: Duration = Duration::from_secs(600);
/// An unknown `kid` triggers a re-fetch at most this often (a flood of forged kids must not
/// turn into a flood of requests to the identity provider).
const MIN_REFETCH: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 512 * 1024;
const MAX_KEYS: usize = 100;

pub struct KeyStore {
    file: Vec<Jwk>,
    url: Option<String>,
    http: reqwest::Client,
    fetched: RwLock<Arc<Vec<Jwk>>>,
    /// When the URL was last fetched (or tried); the mutex also makes fetches single-flight.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl KeyStore {
    pub async fn load(file: Option<&Path>, url: Option<String>) -> Result<Self, AuthBuildError> {
        let file_keys = match file {
            Some(p) => {
                let path = p.display().to_string();
                let text =
                    std::fs::read_to_string(p).map_err(|source| AuthBuildError::ReadJwks {
                        path: path.clone(),
                        source,
                    })?;
                let set: JwkSet = serde_json::from_str(&text)
                    .map_err(|source| AuthBuildError::ParseJwks { path, source })?;
                set.keys
            }
            None => Vec::new(),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::limited(2))
            .build()
            .map_err(AuthBuildError::Client)?;
        let store = Self {
            file: file_keys,
            url,
            http,
            fetched: RwLock::new(Arc::new(Vec::new())),
            last_fetch: tokio::sync::Mutex::new(None),
        };
        if store.url.is_some() {
            store.refetch(Duration::ZERO).await;
        }
        Ok(store)
    }

    /// Candidate keys for a token: the one with `kid`, or every key when the token names none.
    pub async fn candidates(&self, kid: Option<&str>) -> Vec<Jwk> {
        let mut found = self.lookup(kid);
        if found.is_empty() || self.is_stale() {
            self.refetch(if found.is_empty() { MIN_REFETCH } else { TTL })
                .await;
            found = self.lookup(kid);
        }
        found
    }

    fn lookup(&self, kid: Option<&str>) -> Vec<Jwk> {
        let fetched = self
            .fetched
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_default();
        self.file
            .iter()
            .chain(fetched.iter())
            .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
            // Keys published for encryption never verify a signature.
            .filter(|k| k.common.public_key_use != Some(PublicKeyUse::Encryption))
            .cloned()
            .collect()
    }

    /// Never waits: while a fetch is running the keys at hand are good enough.
    fn is_stale(&self) -> bool {
        self.url.is_some()
            && self
                .last_fetch
                .try_lock()
                .is_ok_and(|last| last.is_none_or(|t| t.elapsed() > TTL))
    }

    /// Fetches the URL unless the last fetch is younger than `min_age`.
    async fn refetch(&self, min_age: Duration) {
        let Some(url) = &self.url else { return };
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_age) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch(url).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched JWKS");
                if let Ok(mut g) = self.fetched.write() {
                    *g = Arc::new(keys);
                }
            }
            // Keep the keys we have: an identity provider hiccup must not lock everyone out.
            Err(e) => tracing::warn!(error = %e, "fetching auth.jwks_url failed"),
        }
    }

    async fn fetch(&self, url: &str) -> Result<Vec<Jwk>, String> {
        let mut resp = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BODY {
                return Err(format!("JWKS larger than {MAX_BODY} bytes"));
            }
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(set.keys.into_iter().take(MAX_KEYS).collect())
    }
}
