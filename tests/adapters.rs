//! Destination adapters against loopback servers that behave as VKP, JFT, PMD and a FHIR REST
//! server do (docs/adapters.md): request shape (path, Bundle type, tags), outcome mapping
//! (OperationOutcome codes, 202 + status polling, batch-response entries) → delivered, retried or
//! dead-lettered. Real binary, real sockets; runs on PostgreSQL too.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{Dest, Gateway, observation, repo_path, scaip_alarm, storage_section};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Servers {
    vkp_script: VecDeque<(u16, Value)>,
    vkp: Vec<(String, Value)>,
    jft_plans: VecDeque<Vec<&'static str>>,
    jft_status: HashMap<usize, VecDeque<&'static str>>,
    jft_posts: Vec<Value>,
    jft_polls: usize,
    rest: Vec<Value>,
    pmd_script: VecDeque<Value>,
    pmd: Vec<(HeaderMap, Value)>,
}

type Shared = Arc<Mutex<Servers>>;

fn outcome(code: &str) -> Value {
    json!({ "resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "processing",
        "details": { "coding": [{
            "system": "http://ehelse.no/fhir/CodeSystem/vkp-operation-outcome-v090", "code": code }],
            "text": "vkp says no" } }] })
}

async fn vkp(State(s): State<Shared>, Path(orgnr): Path<String>, Json(b): Json<Value>) -> Response {
    let mut s = s.lock().expect("lock");
    s.vkp.push((orgnr, b));
    match s.vkp_script.pop_front() {
        Some((code, body)) => (
            StatusCode::from_u16(code).expect("code"),
            [(header::CONTENT_TYPE, "application/fhir+json")],
            body.to_string(),
        )
            .into_response(),
        None => StatusCode::CREATED.into_response(),
    }
}

async fn jft_post(State(s): State<Shared>, Json(b): Json<Value>) -> Response {
    let mut s = s.lock().expect("lock");
    s.jft_posts.push(b);
    let n = s.jft_posts.len();
    let plan = s.jft_plans.pop_front().unwrap_or(vec!["journaled"]);
    s.jft_status.insert(n, plan.into());
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/jft/v1/Bundle/{n}/$status"))],
    )
        .into_response()
}

async fn jft_status(State(s): State<Shared>, Path((n, _op)): Path<(usize, String)>) -> Response {
    let mut s = s.lock().expect("lock");
    s.jft_polls += 1;
    let Some(q) = s.jft_status.get_mut(&n) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let status = if q.len() > 1 {
        q.pop_front()
    } else {
        q.front().copied()
    };
    Json(json!({ "id": n.to_string(), "status": status })).into_response()
}

async fn rest(State(s): State<Shared>, Json(b): Json<Value>) -> Response {
    let n = b["entry"].as_array().map(Vec::len).unwrap_or(0);
    s.lock().expect("lock").rest.push(b);
    let entries: Vec<Value> = (0..n)
        .map(|_| json!({ "response": { "status": "201 Created" } }))
        .collect();
    Json(json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": entries }))
        .into_response()
}

async fn pmd(State(s): State<Shared>, headers: HeaderMap, Json(b): Json<Value>) -> Response {
    let mut s = s.lock().expect("lock");
    let answer = s.pmd_script.pop_front().unwrap_or_else(|| {
        let entries: Vec<Value> = b["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| json!({ "fullUrl": e["fullUrl"], "response": { "status": "201 Created" } }))
            .collect();
        json!({ "resourceType": "Bundle", "type": "batch-response", "entry": entries })
    });
    s.pmd.push((headers, b));
    Json(answer).into_response()
}

async fn serve(state: Shared) -> String {
    let app = Router::new()
        .route("/vkp/epj/r4/{orgnr}/bundle", post(vkp))
        .route("/jft/v1/Bundle", post(jft_post))
        .route("/jft/v1/Bundle/{n}/{op}", get(jft_status))
        .route("/rest", post(rest))
        .route("/pmd/", post(pmd))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

async fn start(base: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = |name: &str, path: &str, extra: &str| {
        let d = Dest::new(name, &format!("{base}{path}"));
        format!(
            "[[destination]]\nname = {name:?}\nurl = {:?}\n{}{extra}\n",
            d.url, d.extra
        )
    };
    // JFT attempts poll for up to status_window_s: the lease must outlast them.
    let storage = storage_section(dir.path())
        .await
        .replace("lease_s = 4", "lease_s = 10");
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n{}{}{}{}\
         [[route]]\nname = \"alarms\"\ncategories = [\"alarm\"]\ndestinations = [\"vkp\", \"jft\", \"rest\"]\n\
         [[route]]\nname = \"measurements\"\ncategories = [\"measurement\"]\ndestinations = [\"pmd\", \"rest\"]\n{storage}",
        repo_path("mappings").display().to_string(),
        dest("vkp", "/vkp", "kind = \"vkp\"\norgnr = \"312229544\""),
        dest(
            "jft",
            "/jft",
            "kind = \"jft\"\nstatus_poll_ms = 100\nstatus_window_s = 3"
        ),
        dest("rest", "/rest", "kind = \"fhir-rest\""),
        dest("pmd", "/pmd/", "kind = \"pmd\"\nmunicipality = \"5001\""),
    );
    Gateway::start_with_config(dir, &cfg).await
}

async fn ingest(gw: &Gateway, body: &Value) -> String {
    let (status, resp) = gw.post(body).await;
    assert_eq!(status, 202, "{resp}");
    resp["id"].as_str().expect("id").to_string()
}

/// Waits until every delivery of the event is finished; returns destination → (state, attempts,
/// last_error).
async fn settled(gw: &Gateway, id: &str, n: usize) -> HashMap<String, (String, i64, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
        let ds = ev["deliveries"].as_array().cloned().unwrap_or_default();
        if ds.len() == n && ds.iter().all(|d| d["state"] != "pending") {
            return ds
                .iter()
                .map(|d| {
                    (
                        d["destination"].as_str().unwrap_or_default().to_string(),
                        (
                            d["state"].as_str().unwrap_or_default().to_string(),
                            d["attempts"].as_i64().unwrap_or(0),
                            d["last_error"].as_str().unwrap_or_default().to_string(),
                        ),
                    )
                })
                .collect();
        }
        assert!(Instant::now() < deadline, "event {id} did not settle: {ev}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn adapters_build_their_requests_and_map_outcomes() {
    let state: Shared = Arc::default();
    {
        let mut s = state.lock().expect("lock");
        // VKP: TimedOut (3.1) is retried; MissingActiveService (1.3) is final.
        s.vkp_script = VecDeque::from([
            (400, outcome("3.1")),
            (201, Value::Null),
            (400, outcome("1.3")),
        ]);
        // JFT: the first event is journaled after two polls, the second fails.
        s.jft_plans = VecDeque::from([
            vec!["registered", "read", "journaled"],
            vec!["registered", "failed"],
        ]);
        // PMD: the second measurement has a rejected entry.
        s.pmd_script = VecDeque::from([
            json!({ "resourceType": "Bundle", "type": "batch-response",
                    "entry": [{ "response": { "status": "201 Created" } }] }),
            json!({ "resourceType": "Bundle", "type": "batch-response",
                    "entry": [{ "fullUrl": "urn:uuid:x", "response": { "status": "400 Bad Request" } }] }),
        ]);
    }
    let base = serve(Arc::clone(&state)).await;
    let gw = start(&base).await;

    let a1 = scaip_alarm(&gw, "4712001", "A1").await;
    let a2 = scaip_alarm(&gw, "4712001", "A2").await;
    let m1 = ingest(&gw, &observation("13097248022", "ad-m1")).await;
    let m2 = ingest(&gw, &observation("13097248022", "ad-m2")).await;

    let r1 = settled(&gw, &a1, 3).await;
    let r2 = settled(&gw, &a2, 3).await;
    let q1 = settled(&gw, &m1, 2).await;
    let q2 = settled(&gw, &m2, 2).await;

    // VKP
    assert_eq!(r1["vkp"].0, "delivered", "{r1:?}");
    assert_eq!(r1["vkp"].1, 2, "3.1 TimedOut was retried: {r1:?}");
    assert_eq!(r2["vkp"].0, "dead", "{r2:?}");
    assert!(
        r2["vkp"].2.contains("1.3"),
        "the reason names the VKP outcome: {r2:?}"
    );
    {
        let s = state.lock().expect("lock");
        assert_eq!(s.vkp.len(), 3);
        for (orgnr, b) in &s.vkp {
            assert_eq!(orgnr, "312229544");
            assert_eq!(b["type"], "document");
            assert_eq!(b["entry"][0]["resource"]["resourceType"], "Composition");
        }
    }

    // JFT
    assert_eq!(r1["jft"].0, "delivered", "{r1:?}");
    assert_eq!(r1["jft"].1, 1, "one POST, then status polls: {r1:?}");
    assert_eq!(r2["jft"].0, "dead", "{r2:?}");
    assert!(r2["jft"].2.contains("failed"), "{r2:?}");
    {
        let s = state.lock().expect("lock");
        assert_eq!(s.jft_posts.len(), 2, "never posted twice");
        assert!(s.jft_polls >= 4, "status was polled: {}", s.jft_polls);
    }

    // FHIR REST: a transaction per event.
    for r in [&r1, &r2, &q1, &q2] {
        assert_eq!(r["rest"].0, "delivered", "{r:?}");
    }
    {
        let s = state.lock().expect("lock");
        assert_eq!(s.rest.len(), 4);
        for b in &s.rest {
            assert_eq!(b["type"], "transaction");
            let entries = b["entry"].as_array().expect("entries");
            assert!(!entries.is_empty());
            for e in entries {
                assert_eq!(e["request"]["method"], "POST");
                assert_eq!(e["request"]["url"], e["resource"]["resourceType"]);
            }
        }
    }

    // PMD: Observations only, batch, municipality tag; a rejected entry dead-letters.
    assert_eq!(q1["pmd"].0, "delivered", "{q1:?}");
    assert_eq!(q2["pmd"].0, "dead", "{q2:?}");
    assert!(q2["pmd"].2.contains("urn:uuid:x"), "{q2:?}");
    {
        let s = state.lock().expect("lock");
        assert_eq!(s.pmd.len(), 2, "alarms never go to PMD");
        for (headers, b) in &s.pmd {
            assert_eq!(b["type"], "batch");
            assert_eq!(b["meta"]["tag"][0]["code"], "5001");
            assert_eq!(
                b["meta"]["tag"][0]["system"],
                "https://register.geonorge.no/sosi-kodelister/inndelinger/inndelingsbase/kommunenummer"
            );
            for e in b["entry"].as_array().expect("entries") {
                assert_eq!(e["resource"]["resourceType"], "Observation");
                assert_eq!(e["request"]["url"], "Observation");
                assert!(e["fullUrl"].is_string());
            }
            assert!(headers.contains_key("correlation-id"));
        }
    }
}
