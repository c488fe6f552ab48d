//! API authentication and tenant isolation over real sockets: the real binary with `[auth]`,
//! tokens signed at run time by keys generated in the test (no committed private keys).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Dest, Gateway, Mode, Sink, observation};
use jsonwebtoken::jwk::{Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const ISS: &str = "https://idp.test";
const AUD: &str = "knutepunkt";
const ALL_SCOPES: &str =
    "knutepunkt:ingest knutepunkt:read knutepunkt:replay knutepunkt:audit knutepunkt:configure";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A signing key generated now, with its public JWK.
struct Key {
    enc: EncodingKey,
    jwk: Jwk,
    alg: Algorithm,
}

impl Key {
    fn ec(kid: &str) -> Key {
        let kp = rcgen::KeyPair::generate().expect("P-256 key");
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("pem");
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        Key {
            enc,
            jwk,
            alg: Algorithm::ES256,
        }
    }

    /// rcgen cannot generate RSA keys; the openssl CLI can.
    fn rsa(kid: &str) -> Key {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl genpkey");
        assert!(out.status.success(), "openssl failed");
        let enc = EncodingKey::from_rsa_pem(&out.stdout).expect("pem");
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        Key {
            enc,
            jwk,
            alg: Algorithm::RS256,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = self.jwk.common.key_id.clone();
        jsonwebtoken::encode(&h, claims, &self.enc).expect("sign")
    }

    /// A DPoP proof for `method url` bound to `token`.
    fn proof(&self, method: &str, url: &str, token: &str, jti: &str) -> String {
        self.proof_at(method, url, token, jti, now())
    }

    fn proof_at(&self, method: &str, url: &str, token: &str, jti: &str, iat: i64) -> String {
        let mut h = Header::new(self.alg);
        h.typ = Some("dpop+jwt".into());
        let mut public = self.jwk.clone();
        public.common.key_id = None;
        h.jwk = Some(public);
        let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
        let claims = json!({ "jti": jti, "htm": method, "htu": url, "iat": iat, "ath": ath });
        jsonwebtoken::encode(&h, &claims, &self.enc).expect("sign proof")
    }

    fn thumbprint(&self) -> String {
        self.jwk.thumbprint(ThumbprintHash::SHA256)
    }
}

fn claims(scope: &str, tenants: &[&str]) -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "tester", "exp": now() + 300, "nbf": now() - 10,
        "scope": scope, "tenants": tenants,
    })
}

fn jwks(keys: &[&Key]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).expect("jwks")
}

/// Starts the gateway with `[auth]` trusting `keys` (from a JWKS file).
async fn gateway(keys: &[&Key], dests: &[Dest]) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(keys)).expect("write jwks");
    let source = format!("jwks_file = {:?}", file.display().to_string());
    gateway_with(dir, &source, dests).await
}

/// Starts the gateway with `[auth]` whose key source is `source` (a `jwks_*` line).
async fn gateway_with(dir: tempfile::TempDir, source: &str, dests: &[Dest]) -> Gateway {
    gateway_with_auth(dir, source, "", dests).await
}

async fn gateway_with_auth(
    dir: tempfile::TempDir,
    source: &str,
    more: &str,
    dests: &[Dest],
) -> Gateway {
    let auth = format!(
        "[auth]\nissuer = {ISS:?}\naudience = {AUD:?}\n{source}\nleeway_s = 5\n\
         tenant_claim = \"tenants\"\n{more}\n"
    );
    let storage = common::storage_section(dir.path()).await;
    let cfg = format!("{}\n{storage}", common::config_text(dests, &auth));
    Gateway::start_with_config(dir, &cfg).await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// GET with an `Authorization` value (and optional DPoP proof); status, body, challenges.
async fn get(
    gw: &Gateway,
    path: &str,
    auth: Option<&str>,
    proof: Option<&str>,
) -> (u16, Value, String) {
    let mut req = http().get(format!("{}{path}", gw.base));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(p) = proof {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.expect("get");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(" | ");
    (status, resp.json().await.unwrap_or(Value::Null), challenge)
}

/// GET with `Authorization: Bearer {token}`; as `get`.
async fn get_bearer(gw: &Gateway, path: &str, token: &str) -> (u16, Value, String) {
    get(gw, path, Some(&format!("Bearer {token}")), None).await
}

async fn post(gw: &Gateway, path: &str, token: &str) -> (u16, Value) {
    let resp = http()
        .post(format!("{}{path}", gw.base))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokens_are_checked_for_signature_issuer_audience_time_scope_and_dpop() {
    let key = Key::ec("k1");
    let rsa = Key::rsa("r1");
    let gw = gateway(&[&key, &rsa], &[]).await;
    let path = "/v1/admin/dead-letters";
    let bearer = |t: &str| format!("Bearer {t}");

    // Probes stay open; everything else needs a token.
    assert_eq!(get(&gw, "/healthz", None, None).await.0, 200);
    assert_eq!(get(&gw, "/readyz", None, None).await.0, 200);
    let (s, body, challenge) = get(&gw, path, None, None).await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(
        challenge.contains("Bearer realm=\"knutepunkt\""),
        "{challenge}"
    );
    assert!(challenge.contains("DPoP"), "{challenge}");
    assert_eq!(get(&gw, "/metrics", None, None).await.0, 401);

    // Valid tokens (ES256 and RS256) pass.
    let good = key.sign(&claims(ALL_SCOPES, &["0301"]));
    assert_eq!(get(&gw, path, Some(&bearer(&good)), None).await.0, 200);
    let good_rsa = rsa.sign(&claims(ALL_SCOPES, &["0301"]));
    assert_eq!(get(&gw, path, Some(&bearer(&good_rsa)), None).await.0, 200);
    assert_eq!(
        get(&gw, "/metrics", Some(&bearer(&good)), None).await.0,
        200
    );

    // Same kid, different key: the signature does not verify.
    let forged = Key::ec("k1").sign(&claims(ALL_SCOPES, &["0301"]));
    let (s, _, challenge) = get(&gw, path, Some(&bearer(&forged)), None).await;
    assert_eq!(s, 401);
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert!(challenge.contains("signature"), "{challenge}");

    let mut c = claims(ALL_SCOPES, &["0301"]);
    c["iss"] = json!("https://other.test");
    let (s, _, challenge) = get(&gw, path, Some(&bearer(&key.sign(&c))), None).await;
    assert_eq!(s, 401);
    assert!(challenge.contains("issuer"), "{challenge}");

    let mut c = claims(ALL_SCOPES, &["0301"]);
    c["aud"] = json!("someone-else");
    let (s, _, challenge) = get(&gw, path, Some(&bearer(&key.sign(&c))), None).await;
    assert_eq!(s, 401);
    assert!(challenge.contains("audience"), "{challenge}");

    let mut c = claims(ALL_SCOPES, &["0301"]);
    c["exp"] = json!(now() - 60);
    let (s, _, challenge) = get(&gw, path, Some(&bearer(&key.sign(&c))), None).await;
    assert_eq!(s, 401);
    assert!(challenge.contains("expired"), "{challenge}");

    // A token without the read scope: 403 naming the scope.
    let ingest_only = key.sign(&claims("knutepunkt:ingest", &["0301"]));
    let (s, body, challenge) = get(&gw, path, Some(&bearer(&ingest_only)), None).await;
    assert_eq!(s, 403, "{body}");
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    assert!(challenge.contains("knutepunkt:read"), "{challenge}");
    // The refused (authenticated) caller is in the audit trail; read from the embedded journal.
    if !common::on_postgres() {
        let db =
            rusqlite::Connection::open(gw.dir.path().join("data/journal.sqlite3")).expect("db");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let detail: Option<String> = db
                .query_row(
                    "SELECT detail FROM audit WHERE kind = 'access_denied' AND event_id = 'caller:tester'",
                    [],
                    |r| r.get(0),
                )
                .ok();
            if let Some(d) = detail {
                assert!(d.contains("knutepunkt:read") && d.contains(path), "{d}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no access_denied audit record"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Vendor ingest on the API port needs the ingest scope.
    let (s, _) = gw.post_as("fhir", &observation("1", "a"), &[]).await;
    assert_eq!(s, 401);
    let read_only = key.sign(&claims("knutepunkt:read", &["0301"]));
    let (s, _) = gw
        .post_as(
            "fhir",
            &observation("1", "a"),
            &[("authorization", &bearer(&read_only))],
        )
        .await;
    assert_eq!(s, 403);
    let (s, body) = gw
        .post_as(
            "fhir",
            &observation("1", "a"),
            &[("authorization", &bearer(&ingest_only))],
        )
        .await;
    assert_eq!(
        s, 403,
        "a tenant-limited token must name its municipality: {body}"
    );
    let (s, body) = gw
        .post_as(
            "fhir",
            &observation("1", "a"),
            &[
                ("authorization", &bearer(&ingest_only)),
                ("x-tenant", "0301"),
            ],
        )
        .await;
    assert_eq!(s, 202, "{body}");

    // DPoP: a bound token needs the DPoP scheme and a matching proof.
    let client = Key::ec("client");
    let mut c = claims(ALL_SCOPES, &["0301"]);
    c["cnf"] = json!({ "jkt": client.thumbprint() });
    let bound = key.sign(&c);
    let dpop = format!("DPoP {bound}");
    let url = format!("{}{path}", gw.base);
    let (s, _, challenge) = get(&gw, path, Some(&bearer(&bound)), None).await;
    assert_eq!(s, 401, "a bound token used as Bearer");
    assert!(challenge.contains("cnf"), "{challenge}");
    let (s, _, challenge) = get(&gw, path, Some(&dpop), None).await;
    assert_eq!(s, 401, "DPoP token without proof");
    assert!(challenge.contains("proof"), "{challenge}");
    let wrong_htu = client.proof("GET", &format!("{}/v1/admin/lanes", gw.base), &bound, "j1");
    let (s, _, challenge) = get(&gw, path, Some(&dpop), Some(&wrong_htu)).await;
    assert_eq!(s, 401, "proof for another URL");
    assert!(challenge.contains("htu"), "{challenge}");
    let wrong_method = client.proof("POST", &url, &bound, "j4");
    let (s, _, challenge) = get(&gw, path, Some(&dpop), Some(&wrong_method)).await;
    assert_eq!(s, 401, "proof for another method");
    assert!(challenge.contains("htm"), "{challenge}");
    let stale = client.proof_at("GET", &url, &bound, "j5", now() - 600);
    let (s, _, challenge) = get(&gw, path, Some(&dpop), Some(&stale)).await;
    assert_eq!(s, 401, "stale proof");
    assert!(challenge.contains("iat"), "{challenge}");
    let other_token = client.proof("GET", &url, &good, "j6");
    let (s, _, challenge) = get(&gw, path, Some(&dpop), Some(&other_token)).await;
    assert_eq!(s, 401, "proof made for another access token");
    assert!(challenge.contains("ath"), "{challenge}");
    let wrong_key = Key::ec("x").proof("GET", &url, &bound, "j2");
    assert_eq!(get(&gw, path, Some(&dpop), Some(&wrong_key)).await.0, 401);
    let proof = client.proof("GET", &url, &bound, "j3");
    let (s, body, _) = get(&gw, path, Some(&dpop), Some(&proof)).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, challenge) = get(&gw, path, Some(&dpop), Some(&proof)).await;
    assert_eq!(s, 401, "replayed proof");
    assert!(challenge.contains("jti"), "{challenge}");
}

#[tokio::test]
async fn a_caller_sees_and_replays_only_its_own_tenants() {
    // The destination refuses everything permanently, so every event dead-letters.
    let sink = Sink::start(Mode::status(400)).await;
    // A second destination keeps failing temporarily, so every event stays at a lane head.
    let busy = Sink::start(Mode::status(503)).await;
    let key = Key::ec("k1");
    let gw = gateway(
        &[&key],
        &[Dest::new("epj", &sink.url), Dest::new("busy", &busy.url)],
    )
    .await;
    let a = key.sign(&claims(ALL_SCOPES, &["0301"]));
    let b = key.sign(&claims(ALL_SCOPES, &["4601"]));
    let all = key.sign(&claims(ALL_SCOPES, &["*"]));
    let auth = |t: &str| format!("Bearer {t}");

    let mut ids = Vec::new();
    // Different patients, so each event heads its own lane.
    for (tenant, token, vid, patient) in [
        ("0301", &a, "a1", "1"),
        ("4601", &b, "b1", "2"),
        ("0301", &a, "a2", "3"),
    ] {
        let (s, body) = gw
            .post_as(
                "fhir",
                &observation(patient, vid),
                &[("x-tenant", tenant), ("authorization", &auth(token))],
            )
            .await;
        assert_eq!(s, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    let (a1, b1, a2) = (&ids[0], &ids[1], &ids[2]);

    // Wait until all three are dead letters (seen by an all-tenant operator).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body, _) = get(&gw, "/v1/admin/dead-letters", Some(&auth(&all)), None).await;
        if body["dead_letters"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letters: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let listed = |body: &Value| -> Vec<String> {
        let mut v: Vec<String> = body["dead_letters"]
            .as_array()
            .expect("list")
            .iter()
            .map(|d| d["event_id"].as_str().expect("event id").to_string())
            .collect();
        v.sort();
        v
    };
    let (s, body, _) = get(&gw, "/v1/admin/dead-letters", Some(&auth(&a)), None).await;
    assert_eq!(s, 200);
    let mut want = vec![a1.clone(), a2.clone()];
    want.sort();
    assert_eq!(listed(&body), want, "tenant A sees only its dead letters");
    let (_, body, _) = get(&gw, "/v1/admin/dead-letters", Some(&auth(&b)), None).await;
    assert_eq!(listed(&body), vec![b1.clone()]);

    // Lanes (of the busy destination) are filtered the same way.
    let heads = |body: &Value| -> Vec<String> {
        let mut v: Vec<String> = body["lanes"]
            .as_array()
            .expect("lanes")
            .iter()
            .map(|l| l["head_event_id"].as_str().expect("head").to_string())
            .collect();
        v.sort();
        v
    };
    let (s, body, _) = get(
        &gw,
        "/v1/admin/lanes?destination=busy",
        Some(&auth(&a)),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(heads(&body), want, "tenant A sees only its lanes");
    let (_, body, _) = get(
        &gw,
        "/v1/admin/lanes?destination=busy",
        Some(&auth(&all)),
        None,
    )
    .await;
    assert_eq!(heads(&body).len(), 3, "{body}");

    // Single records of another tenant are "not found", not "forbidden".
    let (s, _, _) = get(
        &gw,
        &format!("/v1/admin/events/{b1}"),
        Some(&auth(&a)),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, body, _) = get(
        &gw,
        &format!("/v1/admin/events/{b1}"),
        Some(&auth(&b)),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(body["tenant"], "4601");
    let (s, _, _) = get(&gw, &format!("/console/events/{b1}"), Some(&auth(&a)), None).await;
    assert_eq!(s, 404);

    // A caller without tenants sees nothing.
    let nobody = key.sign(&claims(ALL_SCOPES, &[]));
    let (_, body, _) = get(&gw, "/v1/admin/dead-letters", Some(&auth(&nobody)), None).await;
    assert_eq!(body["dead_letters"], json!([]));

    // Replay of B's dead letter with A's token: 404, and it stays dead; B may replay it.
    let (_, body, _) = get(&gw, "/v1/admin/dead-letters", Some(&auth(&b)), None).await;
    let delivery = body["dead_letters"][0]["delivery_id"]
        .as_i64()
        .expect("delivery id");
    let (s, body) = post(
        &gw,
        &format!("/v1/admin/dead-letters/{delivery}/replay"),
        &a,
    )
    .await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = post(&gw, "/v1/admin/dead-letters/replay", &a).await;
    assert_eq!(s, 200, "{body}");
    let replayed: Vec<&str> = body["replayed"]
        .as_array()
        .expect("replayed")
        .iter()
        .filter_map(|r| r["event_id"].as_str())
        .collect();
    assert!(
        !replayed.contains(&b1.as_str()),
        "A replayed B's event: {body}"
    );
    assert_eq!(replayed.len(), 2, "{body}");
    let (s, body) = post(
        &gw,
        &format!("/v1/admin/dead-letters/{delivery}/replay"),
        &b,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["replayed"][0]["event_id"], json!(b1));
}

// Multi-threaded: the JWKS server must answer while the harness blocks on the gateway's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_is_cached_and_fetched_again_for_a_new_kid_at_a_bounded_rate() {
    // The identity provider's JWKS endpoint, counting fetches; keys can be rotated.
    let k1 = Key::ec("k1");
    let k2 = Key::ec("k2");
    let served = Arc::new((Mutex::new(jwks(&[&k1])), AtomicUsize::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    let state = Arc::clone(&served);
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let state = Arc::clone(&state);
            async move {
                state.1.fetch_add(1, Ordering::SeqCst);
                state.0.lock().expect("lock").clone()
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let fetches = || served.1.load(Ordering::SeqCst);

    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway_with(dir, &format!("jwks_url = {url:?}"), &[]).await;
    let path = "/v1/admin/dead-letters";
    let t1 = format!("Bearer {}", k1.sign(&claims(ALL_SCOPES, &["0301"])));
    for _ in 0..5 {
        assert_eq!(get(&gw, path, Some(&t1), None).await.0, 200);
    }
    assert_eq!(fetches(), 1, "fetched once at start-up, then cached");

    // Rotation: the provider publishes k2. Within the minimum interval after the last fetch a
    // flood of unknown kids causes no fetch at all.
    *served.0.lock().expect("lock") = jwks(&[&k1, &k2]);
    let t2 = format!("Bearer {}", k2.sign(&claims(ALL_SCOPES, &["0301"])));
    for i in 0..20 {
        let forged = format!(
            "Bearer {}",
            Key::ec(&format!("forged-{i}")).sign(&claims(ALL_SCOPES, &[]))
        );
        assert_eq!(get(&gw, path, Some(&forged), None).await.0, 401);
    }
    assert_eq!(
        fetches(),
        1,
        "unknown kids must not flood the identity provider"
    );

    // After the interval the new kid is fetched once and accepted.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(get(&gw, path, Some(&t2), None).await.0, 200);
    assert_eq!(get(&gw, path, Some(&t2), None).await.0, 200);
    assert_eq!(fetches(), 2);
    assert_eq!(get(&gw, path, Some(&t1), None).await.0, 200);
}

#[test]
fn open_api_is_refused_beyond_loopback_and_warned_about_on_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("k.toml");
    let mappings = common::repo_path("mappings").display().to_string();
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"0.0.0.0:0\"\n[mappings]\ndir = {mappings:?}\n"),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(": auth: missing"), "{text}");

    // On loopback it starts, and says the API is open.
    let data = dir.path().join("data").display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[mappings]\ndir = {mappings:?}\n\
             [storage]\ndata_dir = {data:?}\n"
        ),
    )
    .expect("write");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("KNUTEPUNKT_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let found = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .take(50)
        .map_while(Result::ok)
        .any(|l| l.contains("admin/API open without authentication"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "no start-up warning about the open API");
}

#[tokio::test]
async fn require_dpop_refuses_plain_bearer_tokens() {
    let key = Key::ec("k1");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&key])).expect("write jwks");
    let source = format!("jwks_file = {:?}", file.display().to_string());
    let gw = gateway_with_auth(dir, &source, "require_dpop = true", &[]).await;
    let path = "/v1/admin/lanes";
    let plain = key.sign(&claims(ALL_SCOPES, &["0301"]));
    let (s, _, challenge) = get(&gw, path, Some(&format!("Bearer {plain}")), None).await;
    assert_eq!(s, 401);
    assert!(
        !challenge.contains("Bearer realm"),
        "only DPoP is offered: {challenge}"
    );
    assert!(challenge.contains("DPoP realm"), "{challenge}");

    let client = Key::ec("client");
    let mut c = claims(ALL_SCOPES, &["0301"]);
    c["cnf"] = json!({ "jkt": client.thumbprint() });
    let bound = key.sign(&c);
    let proof = client.proof("GET", &format!("{}{path}", gw.base), &bound, "only");
    let (s, body, _) = get(&gw, path, Some(&format!("DPoP {bound}")), Some(&proof)).await;
    assert_eq!(s, 200, "{body}");
}

/// A minimal backport Subscription on the alarm topic, optionally filtered on a municipality.
fn subscription_for(municipality: Option<&str>, endpoint: &str) -> Value {
    const EXT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
    let filters: Vec<Value> = municipality
        .map(|m| json!({ "url": format!("{EXT}backport-filter-criteria"), "valueString": format!("municipality={m}") }))
        .into_iter()
        .collect();
    json!({
        "resourceType": "Subscription",
        "meta": { "profile": [format!("{EXT}backport-subscription")] },
        "status": "requested",
        "reason": "EPJ",
        "criteria": "https://knutepunkt.no/fhir/SubscriptionTopic/alarm",
        "_criteria": { "extension": filters },
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": format!("{EXT}backport-payload-content"), "valueCode": "id-only" }] }
        }
    })
}

async fn post_json(gw: &Gateway, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}{path}", gw.base))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn fhir_api_needs_the_subscribe_scope_and_is_scoped_to_the_callers_tenants() {
    let sink = Sink::start(Mode::Ok).await;
    let subscriber = Sink::start(Mode::Ok).await;
    let key = Key::ec("k1");
    let gw = gateway(&[&key], &[Dest::new("epj", &sink.url)]).await;
    let epj_a = key.sign(&claims("knutepunkt:subscribe knutepunkt:ingest", &["0301"]));
    let no_scope = key.sign(&claims("knutepunkt:read", &["0301"]));
    let ingest = key.sign(&claims("knutepunkt:ingest", &["*"]));
    let bearer = |t: &str| format!("Bearer {t}");

    // The CapabilityStatement is public; everything else under /fhir needs the subscribe scope.
    let (s, body, _) = get(&gw, "/fhir/metadata", None, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["resourceType"], "CapabilityStatement");
    let (s, _, challenge) = get(&gw, "/fhir/Subscription", None, None).await;
    assert_eq!(s, 401);
    assert!(challenge.contains("Bearer"), "{challenge}");
    let (s, _, _) = get(&gw, "/fhir/Subscription", Some(&bearer(&no_scope)), None).await;
    assert_eq!(s, 403, "the read scope is not the subscribe scope");

    // A caller of municipality 0301 must filter on it: not on another, not on none.
    let (s, body) = post_json(
        &gw,
        "/fhir/Subscription",
        &epj_a,
        &subscription_for(None, &subscriber.url),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["issue"][0]["expression"][0], "municipality", "{body}");
    let (s, body) = post_json(
        &gw,
        "/fhir/Subscription",
        &epj_a,
        &subscription_for(Some("4601"), &subscriber.url),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, body) = post_json(
        &gw,
        "/fhir/Subscription",
        &epj_a,
        &subscription_for(Some("0301"), &subscriber.url),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let own = body["id"].as_str().expect("id").to_string();

    // An all-tenant operator's unfiltered subscription is invisible to the 0301 caller.
    let operator = key.sign(&claims("knutepunkt:subscribe", &["*"]));
    let (s, body) = post_json(
        &gw,
        "/fhir/Subscription",
        &operator,
        &subscription_for(None, &subscriber.url),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let others = body["id"].as_str().expect("id").to_string();
    let (s, body, _) = get(&gw, "/fhir/Subscription", Some(&bearer(&epj_a)), None).await;
    assert_eq!(s, 200, "{body}");
    let ids: Vec<&str> = body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(ids, vec![own.as_str()], "{body}");
    let path = format!("/fhir/Subscription/{others}/$events");
    let (s, _, _) = get(&gw, &path, Some(&bearer(&epj_a)), None).await;
    assert_eq!(
        s, 404,
        "another tenant's subscription does not exist for this caller"
    );

    // The pull feed: only with the caller's municipality; another tenant's event is unknown.
    let mut ids = Vec::new();
    for (tenant, vid, patient) in [("0301", "fa", "1"), ("4601", "fb", "2")] {
        let (s, body) = gw
            .post_as(
                "fhir",
                &observation(patient, vid),
                &[("x-tenant", tenant), ("authorization", &bearer(&ingest))],
            )
            .await;
        assert_eq!(s, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    let (s, _, _) = get(&gw, "/fhir/Bundle", Some(&bearer(&epj_a)), None).await;
    assert_eq!(s, 403, "an unfiltered feed would carry every municipality");
    let (s, _, _) = get(
        &gw,
        "/fhir/Bundle?municipality=4601",
        Some(&bearer(&epj_a)),
        None,
    )
    .await;
    assert_eq!(s, 403);
    let (s, body, _) = get(
        &gw,
        "/fhir/Bundle?municipality=0301",
        Some(&bearer(&epj_a)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let seen: Vec<&str> = body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["fullUrl"].as_str())
        .collect();
    assert_eq!(seen, vec![format!("urn:uuid:{}", ids[0])], "{body}");
    let ack = json!({ "resourceType": "Parameters" });
    let (s, body) = post_json(&gw, &format!("/fhir/Bundle/{}/$ack", ids[1]), &epj_a, &ack).await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = post_json(&gw, &format!("/fhir/Bundle/{}/$ack", ids[0]), &epj_a, &ack).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn audit_reads_are_scoped_to_the_callers_tenants_and_patient_identity_needs_its_scope() {
    let sink = Sink::start(Mode::Ok).await;
    let key = Key::ec("k1");
    let gw = gateway(&[&key], &[Dest::new("epj", &sink.url)]).await;
    let ingest = key.sign(&claims("knutepunkt:ingest", &["*"]));
    for (tenant, vid, patient) in [("0301", "au-a", "13097248022"), ("4601", "au-b", "1")] {
        let (s, body) = gw
            .post_as(
                "fhir",
                &observation(patient, vid),
                &[
                    ("x-tenant", tenant),
                    ("authorization", &format!("Bearer {ingest}")),
                ],
            )
            .await;
        assert_eq!(s, 202, "{body}");
    }
    let records =
        |body: &Value| -> Vec<Value> { body["records"].as_array().cloned().unwrap_or_default() };

    // A token limited to 0301 cannot post for another municipality; the refusal is audited.
    let oslo_ingest = key.sign(&claims("knutepunkt:ingest", &["0301"]));
    let (s, body) = gw
        .post_as(
            "fhir",
            &observation("2", "au-c"),
            &[
                ("x-tenant", "4601"),
                ("authorization", &format!("Bearer {oslo_ingest}")),
            ],
        )
        .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["issue"][0]["expression"][0], "X-Tenant", "{body}");

    let oslo = key.sign(&claims("knutepunkt:audit", &["0301"]));
    let (s, body, _) = get_bearer(&gw, "/v1/admin/audit", &oslo).await;
    assert_eq!(s, 200, "{body}");
    let rows = records(&body);
    assert!(!rows.is_empty(), "{body}");
    assert!(
        rows.iter().all(|r| r["tenant"] == "0301"),
        "only municipality 0301's records: {body}"
    );
    assert!(
        rows.iter().all(|r| r["key"] == "patient:130972*****"),
        "patient identity masked without the patient scope: {body}"
    );

    let clinical = key.sign(&claims("knutepunkt:audit knutepunkt:patient", &["0301"]));
    let (s, body, _) = get_bearer(&gw, "/v1/admin/audit", &clinical).await;
    assert_eq!(s, 200, "{body}");
    let rows = records(&body);
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["key"] == "patient:13097248022"),
        "{body}"
    );

    // The reads themselves are audited, naming the caller (seen by an all-tenant auditor).
    let auditor = key.sign(&claims("knutepunkt:audit", &["*"]));
    let (s, body, _) = get_bearer(&gw, "/v1/admin/audit?outcome=audit-read", &auditor).await;
    assert_eq!(s, 200, "{body}");
    let reads = records(&body);
    assert!(reads.len() >= 2, "{body}");
    let (_, body, _) = get_bearer(&gw, "/v1/admin/audit?outcome=refused", &auditor).await;
    assert_eq!(
        records(&body).len(),
        1,
        "the refused post is audited: {body}"
    );
    let reader = key.sign(&claims("knutepunkt:read", &["*"]));
    let (_, stats, _) = get_bearer(&gw, "/v1/admin/stats", &reader).await;
    assert_eq!(
        stats["events"], 2,
        "nothing of the refused post is stored: {stats}"
    );
    assert!(
        reads.iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("by tester"))),
        "{body}"
    );
}
