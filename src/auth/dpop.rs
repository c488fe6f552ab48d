//! DPoP proofs (RFC 9449 §4.3): the proof is a JWT signed by the key in its own header, for
//! this method and URL, fresh, never seen before, bound to the access token (`ath`) and to the
//! key the token was issued for (`cnf.jkt` = RFC 7638 thumbprint of the proof key).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::request::Parts as Request;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, ThumbprintHash};
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::token::ACCEPTED;

/// Proofs older than this (plus leeway) are refused, which also bounds how long a `jti` must
/// be remembered.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Remembered `jti`s; beyond this the oldest are forgotten (they are past `MAX_AGE` unless more
/// than this many proofs arrive within one window).
pub const REPLAY_CAPACITY: usize = 100_000;

#[derive(Deserialize)]
struct Proof {
    jti: String,
    htm: String,
    htu: String,
    iat: i64,
    ath: Option<String>,
}

/// Seen `jti` → forget-after time, plus insertion order for eviction.
type Seen = (HashMap<String, i64>, VecDeque<(String, i64)>);

pub struct ReplayCache {
    inner: Mutex<Seen>,
    capacity: usize,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity,
        }
    }

    /// Records `jti` (forgettable after `until`); false when it was already seen.
    fn first_use(&self, jti: &str, now: i64, until: i64) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let (seen, order) = &mut *g;
        while let Some((old, exp)) = order.front() {
            if *exp >= now && order.len() < self.capacity {
                break;
            }
            seen.remove(old);
            order.pop_front();
        }
        if seen.contains_key(jti) {
            return false;
        }
        seen.insert(jti.to_string(), until);
        order.push_back((jti.to_string(), until));
        true
    }
}

pub fn verify(
    req: &Request,
    access_token: &str,
    jkt: &str,
    leeway: Duration,
    replay: &ReplayCache,
) -> Result<(), String> {
    let mut proofs = req.headers.get_all("dpop").iter();
    let proof = match (proofs.next(), proofs.next()) {
        (Some(p), None) => p.to_str().map_err(|_| "malformed DPoP proof".to_string())?,
        (None, _) => return Err("DPoP token without a DPoP proof header".into()),
        _ => return Err("more than one DPoP proof header".into()),
    };
    let header = jsonwebtoken::decode_header(proof).map_err(|_| "malformed DPoP proof")?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err("DPoP proof typ must be dpop+jwt".into());
    }
    if !ACCEPTED.contains(&header.alg) {
        return Err("DPoP proof algorithm is not accepted".into());
    }
    let jwk = header.jwk.as_ref().ok_or("DPoP proof without jwk")?;
    // Only public RSA and NIST-curve EC keys (this also keeps `thumbprint` away from the key
    // and curve combinations it panics on).
    let public = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => true,
        AlgorithmParameters::EllipticCurve(ec) => {
            matches!(ec.curve, EllipticCurve::P256 | EllipticCurve::P384)
        }
        _ => false,
    };
    if !public {
        return Err("DPoP proof jwk must be a public RSA or EC (P-256/P-384) key".into());
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "DPoP proof jwk is not usable")?;
    let mut v = Validation::new(header.alg);
    // jsonwebtoken wants one family per validation; the header alg was checked above.
    v.algorithms = vec![header.alg];
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let proof: Proof = jsonwebtoken::decode::<Proof>(proof, &key, &v)
        .map_err(|_| "DPoP proof signature or claims invalid")?
        .claims;
    if jwk.thumbprint(ThumbprintHash::SHA256) != jkt {
        return Err("DPoP proof key does not match the token's cnf.jkt".into());
    }
    if proof.htm != req.method.as_str() {
        return Err("DPoP proof htm does not match the request method".into());
    }
    if !htu_matches(&proof.htu, req) {
        return Err("DPoP proof htu does not match the request URL".into());
    }
    let expected_ath = URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()));
    if proof.ath.as_deref() != Some(expected_ath.as_str()) {
        return Err("DPoP proof ath does not match the access token".into());
    }
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let skew = leeway.as_secs() as i64;
    if proof.iat > now + skew || proof.iat < now - MAX_AGE.as_secs() as i64 - skew {
        return Err("DPoP proof iat is not fresh".into());
    }
    if !replay.first_use(&proof.jti, now, proof.iat + MAX_AGE.as_secs() as i64 + skew) {
        return Err("DPoP proof jti was already used".into());
    }
    Ok(())
}

/// `htu` must name this request: same path and same authority as the `Host` the client used.
/// The scheme is not compared, since TLS may end at a proxy in front of the gateway.
fn htu_matches(htu: &str, req: &Request) -> bool {
    let Ok(u) = reqwest::Url::parse(htu) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let authority = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let req_authority = req
        .headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri.authority().map(|a| a.to_string()));
    u.path() == req.uri.path() && req_authority.is_some_and(|a| a.eq_ignore_ascii_case(&authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_cache_is_bounded_and_detects_repeats() {
        let c = ReplayCache::new(2);
        assert!(c.first_use("a", 100, 200));
        assert!(!c.first_use("a", 100, 200));
        assert!(c.first_use("b", 100, 200));
        assert!(c.first_use("c", 100, 200));
        // "a" was forgotten to keep the bound.
        assert!(c.first_use("a", 100, 200));
        // Expired entries go first.
        assert!(c.first_use("d", 300, 400));
    }
}
