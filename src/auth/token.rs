//! Access-token validation: signature (JWKS), `iss`, `aud`, `exp`/`nbf` with leeway, scopes,
//! tenant claim and DPoP binding (`cnf.jkt`).

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::KeyStore;
use crate::config::auth::ValidAuth;

pub const ACCEPTED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// What the gateway takes from a valid access token.
#[derive(Debug)]
pub struct Claims {
    pub sub: String,
    pub scopes: Vec<String>,
    pub tenants: Vec<String>,
    pub cnf_jkt: Option<String>,
}

/// Validates `token`; the error is a short reason for the `WWW-Authenticate` description.
pub async fn validate(token: &str, cfg: &ValidAuth, keys: &KeyStore) -> Result<Claims, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token".to_string())?;
    if !ACCEPTED.contains(&header.alg) {
        return Err(format!("algorithm {:?} is not accepted", header.alg));
    }
    let mut v = Validation::new(header.alg);
    // jsonwebtoken wants one family per validation; the header alg was checked above.
    v.algorithms = vec![header.alg];
    v.leeway = cfg.leeway.as_secs();
    v.validate_nbf = true;
    v.set_issuer(&[&cfg.issuer]);
    v.set_audience(&[&cfg.audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let candidates = keys.candidates(header.kid.as_deref()).await;
    if candidates.is_empty() {
        return Err("no signing key matches the token's kid".into());
    }
    let mut last = String::from("signature does not verify");
    for jwk in candidates.iter().filter(|k| key_fits(k, header.alg)) {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v) {
            Ok(data) => return Ok(extract(data.claims, &cfg.tenant_claim)),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature => "signature does not verify".into(),
                    K::ExpiredSignature => "token expired".into(),
                    K::ImmatureSignature => "token not yet valid (nbf)".into(),
                    K::InvalidIssuer => "wrong issuer".into(),
                    K::InvalidAudience => "wrong audience".into(),
                    K::MissingRequiredClaim(c) => format!("missing claim {c}"),
                    _ => "invalid token".into(),
                };
                // Only a signature mismatch can depend on which key we tried.
                if !matches!(
                    e.kind(),
                    K::InvalidSignature | K::InvalidKeyFormat | K::InvalidAlgorithm
                ) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

/// A JWK that declares its algorithm must be used with that algorithm only.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    match jwk.common.key_algorithm {
        Some(ka) => format!("{ka:?}") == format!("{alg:?}"),
        None => true,
    }
}

fn extract(mut c: Map<String, Value>, tenant_claim: &str) -> Claims {
    // `scope` is space-separated (RFC 8693 §4.2); some issuers (HelseID) send an array, some `scp`.
    let mut scopes = strings(c.get("scope"));
    scopes.extend(strings(c.get("scp")));
    let tenants = strings(c.get(tenant_claim));
    let sub = c
        .remove("sub")
        .or_else(|| c.remove("client_id"))
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let cnf_jkt = c
        .get("cnf")
        .and_then(|v| v.get("jkt"))
        .and_then(Value::as_str)
        .map(str::to_string);
    // Any other confirmation method (e.g. x5t#S256) also means "bound": refuse it as Bearer.
    let cnf_jkt = cnf_jkt.or_else(|| c.get("cnf").map(|_| String::new()));
    Claims {
        sub,
        scopes,
        tenants,
        cnf_jkt,
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .flat_map(|s| s.split_whitespace())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_shapes() {
        let m = json!({"sub": "u1", "scope": "a b", "scp": ["c"], "ten": ["0301", "4601"],
                       "cnf": {"jkt": "x"}});
        let c = extract(m.as_object().cloned().unwrap_or_default(), "ten");
        assert_eq!(c.sub, "u1");
        assert_eq!(c.scopes, vec!["a", "b", "c"]);
        assert_eq!(c.tenants, vec!["0301", "4601"]);
        assert_eq!(c.cnf_jkt.as_deref(), Some("x"));
        let m = json!({"client_id": "svc", "ten": "0301", "cnf": {"x5t#S256": "y"}});
        let c = extract(m.as_object().cloned().unwrap_or_default(), "ten");
        assert_eq!(c.sub, "svc");
        assert_eq!(c.tenants, vec!["0301"]);
        assert_eq!(c.cnf_jkt.as_deref(), Some(""));
    }
}
