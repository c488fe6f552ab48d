//! Outbound OAuth2 over real sockets: a loopback token endpoint that verifies the
//! `private_key_jwt` client assertion, and a destination that accepts only live tokens it issued.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Dest, Gateway, observation};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{Value, json};

const CLIENT_ID: &str = "knutepunkt-test";
const LIFETIME_S: u64 = 5;

#[derive(Default)]
struct Idp {
    key: Option<DecodingKey>,
    token_url: String,
    fetches: AtomicUsize,
    /// Answer 500 instead of a token.
    down: AtomicBool,
    seen_jti: Mutex<HashSet<String>>,
    /// Issued token → when it expires.
    live: Mutex<HashMap<String, Instant>>,
    /// Tokens the destination must refuse with 401 (revoked early).
    revoked: Mutex<HashSet<String>>,
    delivered: AtomicUsize,
    refused: AtomicUsize,
}

async fn token(State(idp): State<Arc<Idp>>, body: String) -> (StatusCode, String) {
    let form: HashMap<String, String> = reqwest::Url::parse(&format!("http://x/?{body}"))
        .expect("form")
        .query_pairs()
        .into_owned()
        .collect();
    let bad = |m: &str| {
        (
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_client", "error_description": m }).to_string(),
        )
    };
    if idp.down.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "{}".into());
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return bad("grant");
    }
    let Some(assertion) = form.get("client_assertion") else {
        return bad("no assertion");
    };
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[&idp.token_url]);
    v.set_issuer(&[CLIENT_ID]);
    v.sub = Some(CLIENT_ID.into());
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, idp.key.as_ref().expect("key"), &v)
    {
        Ok(d) => d.claims,
        Err(e) => return bad(&format!("assertion: {e}")),
    };
    let lifetime = claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
    if !(1..=300).contains(&lifetime) {
        return bad("assertion lifetime");
    }
    let jti = claims["jti"].as_str().unwrap_or_default().to_string();
    if jti.is_empty() || !idp.seen_jti.lock().expect("lock").insert(jti) {
        return bad("jti reused");
    }
    if form.get("scope").map(String::as_str) != Some("epj.write") {
        return bad("scope");
    }
    let n = idp.fetches.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("tok-{n}");
    idp.live.lock().expect("lock").insert(
        token.clone(),
        Instant::now() + Duration::from_secs(LIFETIME_S),
    );
    (
        StatusCode::OK,
        json!({ "access_token": token, "token_type": "Bearer", "expires_in": LIFETIME_S })
            .to_string(),
    )
}

async fn destination(State(idp): State<Arc<Idp>>, headers: HeaderMap) -> StatusCode {
    let tok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let live = idp
        .live
        .lock()
        .expect("lock")
        .get(&tok)
        .is_some_and(|exp| Instant::now() < *exp);
    if live && !idp.revoked.lock().expect("lock").contains(&tok) {
        idp.delivered.fetch_add(1, Ordering::SeqCst);
        StatusCode::OK
    } else {
        idp.refused.fetch_add(1, Ordering::SeqCst);
        StatusCode::UNAUTHORIZED
    }
}

async fn wait_delivered(idp: &Idp, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while idp.delivered.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} delivered",
            idp.delivered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn client_credentials_token_is_cached_refreshed_and_replaced_after_401() {
    // The client's key, generated now; the identity provider knows only its public half.
    let kp = rcgen::KeyPair::generate().expect("key");
    let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("pem");
    let public = Jwk::from_encoding_key(&enc, Algorithm::ES256).expect("jwk");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let idp = Arc::new(Idp {
        key: Some(DecodingKey::from_jwk(&public).expect("decoding key")),
        token_url: format!("{base}/token"),
        ..Default::default()
    });
    let app = Router::new()
        .route("/token", post(token))
        .route("/fhir", post(destination))
        .with_state(Arc::clone(&idp));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("client.key");
    std::fs::write(&key_file, kp.serialize_pem()).expect("write key");
    let dest = Dest::new("epj", &format!("{base}/fhir")).extra(&format!(
        "[destination.oauth]\ntoken_url = {:?}\nclient_id = {CLIENT_ID:?}\nprivate_key_file = {:?}\nscope = \"epj.write\"",
        idp.token_url,
        key_file.display().to_string()
    ));
    let gw = Gateway::start(&[dest], "").await;

    // Many deliveries, one token.
    for i in 0..10 {
        let (s, body) = gw.post(&observation("1", &format!("a{i}"))).await;
        assert_eq!(s, 202, "{body}");
    }
    wait_delivered(&idp, 10).await;
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        1,
        "token fetched once for 10 deliveries"
    );
    assert_eq!(idp.refused.load(Ordering::SeqCst), 0);

    // After the token's lifetime (minus the refresh margin) a new one is fetched first.
    tokio::time::sleep(Duration::from_secs(LIFETIME_S)).await;
    let (s, _) = gw.post(&observation("1", "b0")).await;
    assert_eq!(s, 202);
    wait_delivered(&idp, 11).await;
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        2,
        "refreshed after expiry"
    );
    assert_eq!(
        idp.refused.load(Ordering::SeqCst),
        0,
        "never sent an expired token"
    );

    // The destination revokes the token early: one 401, a new token, delivered.
    idp.revoked.lock().expect("lock").insert("tok-2".into());
    let (s, _) = gw.post(&observation("1", "c0")).await;
    assert_eq!(s, 202);
    wait_delivered(&idp, 12).await;
    assert_eq!(idp.refused.load(Ordering::SeqCst), 1);
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 3);

    // The token endpoint fails: the delivery is retried (audited attempt), then delivered.
    idp.revoked.lock().expect("lock").insert("tok-3".into());
    idp.down.store(true, Ordering::SeqCst);
    let (s, body) = gw.post(&observation("1", "d0")).await;
    assert_eq!(s, 202);
    let id = body["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
        let audited = ev["audit"].as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("token endpoint"))
            })
        });
        if audited {
            assert_eq!(ev["deliveries"][0]["state"], "pending", "{ev}");
            break;
        }
        assert!(Instant::now() < deadline, "no audited token failure: {ev}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    idp.down.store(false, Ordering::SeqCst);
    wait_delivered(&idp, 13).await;
}
