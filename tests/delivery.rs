//! Delivery over real sockets against the real binary: retries and backoff, Retry-After,
//! dead-lettering, timeouts and resets, per-key order, isolation between keys, destinations and
//! lane classes, replay, and the lane/destination admin views.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Received, Sink, alarm, observation};
use serde_json::Value;
use tokio::task::JoinSet;

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A destination whose `timeout_ms` replaces the harness default.
fn dest_with_timeout(name: &str, url: &str, timeout_ms: u64) -> Dest {
    let mut d = Dest::new(name, url);
    assert!(
        d.extra.contains("timeout_ms = 2000"),
        "harness default changed"
    );
    d.extra = d
        .extra
        .replace("timeout_ms = 2000", &format!("timeout_ms = {timeout_ms}"));
    d
}

/// Posts one event, asserts it was stored (202) and returns its id.
async fn ingest(gw: &Gateway, body: &Value) -> String {
    let (status, resp) = gw.post(body).await;
    assert_eq!(status, 202, "ingest refused: {resp}");
    resp["id"].as_str().expect("id in 202 body").to_string()
}

/// Posts all bodies with up to `parallel` requests in flight; returns the ids in body order.
async fn ingest_many(gw: &Gateway, bodies: Vec<Value>, parallel: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/vendors/fhir/events", gw.base);
    let mut ids = vec![String::new(); bodies.len()];
    let mut set = JoinSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        if set.len() >= parallel {
            let (j, id) = set.join_next().await.expect("task").expect("join");
            ids[j] = id;
        }
        let http = http.clone();
        let url = url.clone();
        set.spawn(async move {
            let resp = http
                .post(&url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .expect("post event");
            assert_eq!(resp.status().as_u16(), 202);
            let v: Value = resp.json().await.expect("json");
            (i, v["id"].as_str().expect("id").to_string())
        });
    }
    while let Some(r) = set.join_next().await {
        let (j, id) = r.expect("join");
        ids[j] = id;
    }
    ids
}

/// Polls `GET path` until `pred` holds; returns that body or panics after `timeout`.
async fn wait_admin(
    gw: &Gateway,
    path: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = gw.get(path).await;
        if status == 200 && pred(&body) {
            return body;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for: {what}; last {path} -> {status} {body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until every delivery of event `id` is in `state`; returns the event detail.
async fn wait_event_state(gw: &Gateway, id: &str, state: &str) -> Value {
    wait_admin(
        gw,
        &format!("/v1/admin/events/{id}"),
        WAIT,
        &format!("event {id} deliveries {state}"),
        |ev| {
            ev["deliveries"]
                .as_array()
                .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["state"] == state))
        },
    )
    .await
}

/// One audit row, reduced to what the assertions look at.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    kind: String,
    attempt: Option<i64>,
    status: Option<i64>,
    detail: String,
}

/// The audit trail of an event for one destination (rows without a destination are skipped).
fn trail(ev: &Value, dest: &str) -> Vec<Step> {
    ev["audit"]
        .as_array()
        .expect("audit array")
        .iter()
        .filter(|a| a["destination"] == dest)
        .map(|a| Step {
            kind: a["kind"].as_str().unwrap_or_default().to_string(),
            attempt: a["attempt"].as_i64(),
            status: a["status"].as_i64(),
            detail: a["detail"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

fn kinds(steps: &[Step]) -> Vec<&str> {
    steps.iter().map(|s| s.kind.as_str()).collect()
}

/// Every audit kind of the event in order, destination-less rows included.
fn all_kinds(ev: &Value) -> Vec<String> {
    ev["audit"]
        .as_array()
        .expect("audit array")
        .iter()
        .map(|a| a["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The `N` in a `retry_scheduled` detail "next attempt in N ms".
fn scheduled_ms(step: &Step) -> i64 {
    step.detail
        .strip_prefix("next attempt in ")
        .and_then(|s| s.strip_suffix(" ms"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected retry_scheduled detail: {step:?}"))
}

fn for_event<'a>(got: &'a [Received], id: &str) -> Vec<&'a Received> {
    got.iter().filter(|r| r.idempotency_key == id).collect()
}

fn operation_outcome(text: &str) -> String {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": "invalid", "diagnostics": text }]
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. Retry with backoff
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retries_with_backoff_until_2xx() {
    let sink = Sink::start(Mode::Ok).await;
    sink.script([Mode::status(503), Mode::status(503), Mode::status(503)]);
    // base 50 ms, max 400 ms: ceilings after failures 1, 2, 3 are 50, 100, 200 ms.
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;

    let id = ingest(&gw, &observation("13097248022", "r-1")).await;
    sink.wait_for(WAIT, "one 2xx", |r| r.iter().any(|x| x.mode.is_success()))
        .await;
    let ev = wait_event_state(&gw, &id, "delivered").await;
    // Nothing more once it is delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.received();

    assert_eq!(got.len(), 4, "3 failures then 1 success: {got:#?}");
    let attempts: Vec<u32> = got.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4]);
    for r in &got {
        assert_eq!(
            r.idempotency_key, id,
            "Idempotency-Key is the event id on every attempt"
        );
        assert_eq!(r.body["resourceType"], "Bundle");
        assert_eq!(
            r.body["id"],
            id.as_str(),
            "Bundle id is the event id on every attempt"
        );
        assert!(r.content_type.starts_with("application/fhir+json"));
    }
    assert_eq!(got[0].body, got[3].body, "the same Bundle is re-sent");
    assert_eq!(sink.delivered().len(), 1);

    let d = &ev["deliveries"][0];
    assert_eq!(d["attempts"], 4, "{ev}");
    assert_eq!(d["last_status"], 200, "{ev}");

    let all = all_kinds(&ev);
    assert_eq!(&all[..3], ["received", "stored", "routed"], "{all:?}");
    let steps = trail(&ev, "epj");
    assert_eq!(
        kinds(&steps),
        [
            "attempt",
            "retry_scheduled",
            "attempt",
            "retry_scheduled",
            "attempt",
            "retry_scheduled",
            "attempt",
            "delivered"
        ],
        "{steps:#?}"
    );
    for (i, n) in [(0, 1), (2, 2), (4, 3), (6, 4)] {
        assert_eq!(steps[i].attempt, Some(n), "{steps:#?}");
        let want = if n < 4 { 503 } else { 200 };
        assert_eq!(steps[i].status, Some(want), "{steps:#?}");
    }
    assert_eq!(steps[7].attempt, Some(4));
    // Exponential ceilings with full jitter: each wait lies in [0, base * 2^(n-1)], and the sink
    // never sees the next attempt before the scheduled wait has passed.
    for (k, ceiling) in [(1usize, 50i64), (3, 100), (5, 200)] {
        let wait = scheduled_ms(&steps[k]);
        assert!(
            (0..=ceiling).contains(&wait),
            "wait {wait} ms after failure {}: ceiling {ceiling}",
            k.div_ceil(2)
        );
        let n = k / 2;
        let gap = got[n + 1].at.duration_since(got[n].at).as_millis() as i64;
        assert!(
            gap + 5 >= wait,
            "attempt {} came {gap} ms after attempt {}, scheduled {wait} ms",
            n + 2,
            n + 1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Retry-After
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_after_is_honoured_as_a_floor() {
    let sink = Sink::start(Mode::Ok).await;
    sink.script([Mode::Status {
        code: 429,
        retry_after: Some(1),
        body: String::new(),
    }]);
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let id = ingest(&gw, &observation("13097248022", "ra-1")).await;
    sink.wait_for(WAIT, "delivery after 429", |r| r.len() >= 2)
        .await;
    let ev = wait_event_state(&gw, &id, "delivered").await;

    let got = sink.received();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!((got[0].attempt, got[1].attempt), (1, 2));
    assert!(matches!(got[0].mode, Mode::Status { code: 429, .. }));
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(900),
        "Retry-After: 1 ignored: second attempt only {gap:?} after the first"
    );
    assert!(gap < Duration::from_secs(5), "retry far too late: {gap:?}");

    let steps = trail(&ev, "epj");
    assert_eq!(
        kinds(&steps),
        ["attempt", "retry_scheduled", "attempt", "delivered"]
    );
    assert_eq!(steps[0].status, Some(429));
    let wait = scheduled_ms(&steps[1]);
    // The backoff ceiling is 50 ms here, so the 1 s floor is what decided the wait.
    assert!((1000..=1050).contains(&wait), "scheduled {wait} ms");
}

// ---------------------------------------------------------------------------------------------
// 3. Dead letters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn permanent_4xx_is_dead_lettered_after_one_attempt() {
    let sink = Sink::start(Mode::Status {
        code: 400,
        retry_after: None,
        body: operation_outcome("Observation.code: unknown LOINC code"),
    })
    .await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let id = ingest(&gw, &observation("13097248022", "p-1")).await;

    let dl = wait_admin(
        &gw,
        "/v1/admin/dead-letters",
        WAIT,
        "one dead letter",
        |b| b["dead_letters"].as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    let row = &dl["dead_letters"][0];
    assert_eq!(row["event_id"], id.as_str());
    assert_eq!(row["destination"], "epj");
    assert_eq!(row["vendor"], "fhir");
    assert_eq!(row["category"], "measurement");
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["last_status"], 400);
    let reason = row["reason"].as_str().expect("reason");
    assert!(reason.contains("400"), "reason names the status: {reason}");
    assert!(
        reason.contains("unknown LOINC code"),
        "reason carries the receiver's OperationOutcome: {reason}"
    );

    // Never retried.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink.received().len(), 1);

    let ev = wait_event_state(&gw, &id, "dead").await;
    let steps = trail(&ev, "epj");
    assert_eq!(kinds(&steps), ["attempt", "dead_lettered"], "{steps:#?}");
    assert_eq!(steps[0].status, Some(400));
    assert_eq!(steps[1].attempt, Some(1));
    assert!(steps[1].detail.contains("400"), "{steps:#?}");

    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(
        (stats["dead"].as_i64(), stats["pending"].as_i64()),
        (Some(1), Some(0)),
        "{stats}"
    );
    // The lane is gone: a dead letter does not block the key.
    let (_, lanes) = gw.get("/v1/admin/lanes").await;
    assert_eq!(lanes["lanes"].as_array().map(Vec::len), Some(0), "{lanes}");

    // 501 and redirects are permanent too (a redirect is never followed with patient data).
    for (code, vid) in [(501u16, "p-2"), (302, "p-3")] {
        sink.script([Mode::status(code)]);
        let id = ingest(&gw, &observation("13097248022", vid)).await;
        let ev = wait_event_state(&gw, &id, "dead").await;
        let steps = trail(&ev, "epj");
        assert_eq!(
            kinds(&steps),
            ["attempt", "dead_lettered"],
            "{code}: {steps:#?}"
        );
        assert_eq!(steps[0].status, Some(i64::from(code)));
        assert!(steps[1].detail.contains(&code.to_string()), "{steps:#?}");
    }
    assert_eq!(sink.received().len(), 3);
}

#[tokio::test]
async fn retries_stop_at_max_age() {
    let sink = Sink::start(Mode::status(503)).await;
    let gw = Gateway::start(
        &[Dest::new("epj", &sink.url).extra("retry.max_age_s = 1")],
        "",
    )
    .await;
    let posted = Instant::now();
    let id = ingest(&gw, &observation("13097248022", "age-1")).await;
    let ev = wait_event_state(&gw, &id, "dead").await;
    let took = posted.elapsed();
    let steps = trail(&ev, "epj");
    let last = steps.last().expect("steps");
    assert_eq!(last.kind, "dead_lettered", "{steps:#?}");
    assert!(last.detail.contains("max age"), "{steps:#?}");
    // Tried until the age ran out (the last try is scheduled at the deadline), then given up.
    let got = sink.received();
    assert!(got.len() >= 3, "{got:#?}");
    assert!(
        got.last().expect("last").at.duration_since(posted) >= Duration::from_millis(950),
        "gave up before the max age: {got:#?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "kept retrying past the max age: {took:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| s.kind == "attempt").count(),
        got.len()
    );
}

#[tokio::test]
async fn retries_are_exhausted_after_max_attempts() {
    let sink = Sink::start(Mode::status(503)).await;
    let gw = Gateway::start(
        &[Dest::new("epj", &sink.url).extra("retry.max_attempts = 3")],
        "",
    )
    .await;
    let id = ingest(&gw, &observation("13097248022", "x-1")).await;
    // A later event of the same key waits behind the head, then goes once the head is dead.
    let id2 = ingest(&gw, &observation("13097248022", "x-2")).await;

    let dl = wait_admin(
        &gw,
        "/v1/admin/dead-letters?destination=epj",
        WAIT,
        "two dead letters",
        |b| b["dead_letters"].as_array().is_some_and(|a| a.len() == 2),
    )
    .await;
    let rows = dl["dead_letters"].as_array().expect("rows");
    for row in rows {
        assert_eq!(row["attempts"], 3, "{row}");
        assert_eq!(row["last_status"], 503, "{row}");
        let reason = row["reason"].as_str().expect("reason");
        assert!(reason.contains("3 attempts"), "{reason}");
        assert!(
            reason.contains("last error: HTTP 503"),
            "the reason names the last failure: {reason}"
        );
    }
    // Newest first.
    assert_eq!(rows[0]["event_id"], id2.as_str());
    assert_eq!(rows[1]["event_id"], id.as_str());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.received();
    assert_eq!(got.len(), 6, "exactly 3 attempts each: {got:#?}");
    let first: Vec<u32> = for_event(&got, &id).iter().map(|r| r.attempt).collect();
    assert_eq!(first, vec![1, 2, 3]);
    // Strict lane order: the second event is not tried before the first is finished.
    assert!(got[..3].iter().all(|r| r.idempotency_key == id), "{got:#?}");

    let ev = wait_event_state(&gw, &id, "dead").await;
    let steps = trail(&ev, "epj");
    assert_eq!(
        kinds(&steps),
        [
            "attempt",
            "retry_scheduled",
            "attempt",
            "retry_scheduled",
            "attempt",
            "dead_lettered"
        ],
        "{steps:#?}"
    );
    assert_eq!(steps[5].attempt, Some(3));
    assert_eq!(ev["deliveries"][0]["attempts"], 3);

    // Filtering by another destination finds nothing.
    let (_, none) = gw.get("/v1/admin/dead-letters?destination=other").await;
    assert_eq!(
        none["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{none}"
    );

    // The destinations view lists the configured destination with its dead letters.
    let (_, dests) = gw.get("/v1/admin/destinations").await;
    let row = &dests["destinations"][0];
    assert_eq!(row["destination"], "epj", "{dests}");
    assert_eq!(row["configured"], true, "{dests}");
    assert!(row["dead"].as_i64().unwrap_or(0) >= 1, "{dests}");
}

#[tokio::test]
async fn idle_destinations_are_listed() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(
        &[Dest::new("quiet", &sink.url), Dest::new("other", &sink.url)],
        "",
    )
    .await;
    let (status, dests) = gw.get("/v1/admin/destinations").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = dests["destinations"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["destination"].as_str())
        .collect();
    assert_eq!(names, vec!["quiet", "other"], "{dests}");
    assert_eq!(dests["destinations"][0]["pending"], 0);
    assert_eq!(dests["destinations"][0]["configured"], true);
}

// ---------------------------------------------------------------------------------------------
// 4. Timeouts and resets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hangs_and_resets_are_retried_until_delivered() {
    let hang = Sink::start(Mode::Ok).await;
    hang.script([Mode::Hang, Mode::Hang]);
    let reset = Sink::start(Mode::Ok).await;
    reset.script([Mode::Reset, Mode::Reset]);
    let gw = Gateway::start(
        &[
            dest_with_timeout("slow", &hang.url, 300),
            Dest::new("flaky", &reset.url),
        ],
        "",
    )
    .await;
    let id = ingest(&gw, &observation("13097248022", "h-1")).await;
    let ev = wait_event_state(&gw, &id, "delivered").await;

    for (sink, dest, failure) in [(&hang, "slow", Mode::Hang), (&reset, "flaky", Mode::Reset)] {
        let got = sink.received();
        let attempts: Vec<u32> = got.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, vec![1, 2, 3], "{dest}: {got:#?}");
        assert_eq!(got[0].mode, failure);
        assert_eq!(got[1].mode, failure);
        assert!(got[2].mode.is_success());
        assert!(got.iter().all(|r| r.idempotency_key == id));

        let steps = trail(&ev, dest);
        assert_eq!(
            kinds(&steps),
            [
                "attempt",
                "retry_scheduled",
                "attempt",
                "retry_scheduled",
                "attempt",
                "delivered"
            ],
            "{dest}: {steps:#?}"
        );
        for s in [&steps[0], &steps[2]] {
            assert_eq!(
                s.status, None,
                "{dest}: no HTTP status on a transport failure"
            );
            assert!(!s.detail.is_empty(), "{dest}: the error is audited");
        }
        assert_eq!(steps[4].status, Some(200));
    }
    // A hung receiver is abandoned at the destination timeout, not earlier.
    let got = hang.received();
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(250),
        "timeout too early: {gap:?}"
    );
    assert!(gap < Duration::from_secs(3), "timeout too late: {gap:?}");
    let steps = trail(&ev, "slow");
    assert!(steps[0].detail.contains("timeout"), "{steps:#?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Per-key order, no head-of-line blocking across keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn failing_head_blocks_only_its_own_key() {
    let sink = Sink::start(Mode::Ok).await;
    // The first request (head of key A, attempt 1) is put off for two seconds, which leaves
    // ample time to script the rest of its failures and to queue and deliver the other events.
    sink.script([Mode::Status {
        code: 503,
        retry_after: Some(2),
        body: String::new(),
    }]);
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;

    let a1 = ingest(&gw, &observation("patient-a", "a-0")).await;
    sink.wait_for(WAIT, "first attempt of A's head", |r| !r.is_empty())
        .await;
    sink.script_event(
        &a1,
        [Mode::status(503), Mode::status(500), Mode::status(503)],
    );
    let mut a = vec![a1.clone()];
    for i in 1..5 {
        a.push(ingest(&gw, &observation("patient-a", &format!("a-{i}"))).await);
    }
    let mut b = Vec::new();
    for i in 0..5 {
        b.push(ingest(&gw, &observation("patient-b", &format!("b-{i}"))).await);
    }

    sink.wait_for(WAIT, "all 10 events delivered", |r| {
        r.iter().filter(|x| x.mode.is_success()).count() >= 10
    })
    .await;
    let got = sink.received();
    let ok: Vec<&str> = got
        .iter()
        .filter(|r| r.mode.is_success())
        .map(|r| r.idempotency_key.as_str())
        .collect();
    let a_ok: Vec<&str> = ok
        .iter()
        .copied()
        .filter(|k| a.iter().any(|x| x == k))
        .collect();
    let b_ok: Vec<&str> = ok
        .iter()
        .copied()
        .filter(|k| b.iter().any(|x| x == k))
        .collect();
    assert_eq!(a_ok, a, "key A delivered in ingest order");
    assert_eq!(b_ok, b, "key B delivered in ingest order");
    assert_eq!(ok.len(), 10, "each event delivered exactly once");

    // The head went through five attempts (2 s Retry-After, then three quick failures).
    let head: Vec<(u32, bool)> = for_event(&got, &a1)
        .iter()
        .map(|r| (r.attempt, r.mode.is_success()))
        .collect();
    assert_eq!(
        head,
        vec![(1, false), (2, false), (3, false), (4, false), (5, true)]
    );
    // Only the head of A was ever on the wire until it succeeded.
    let head_ok = got
        .iter()
        .position(|r| r.idempotency_key == a1 && r.mode.is_success())
        .expect("head delivered");
    for r in &got[..head_ok] {
        assert!(
            !a[1..].contains(&r.idempotency_key),
            "a later event of key A was sent while its head was still failing"
        );
    }
    // Key B did not wait for A's head: every B event reached the sink before A's head did.
    let last_b = got
        .iter()
        .rposition(|r| b.contains(&r.idempotency_key))
        .expect("b delivered");
    assert!(
        last_b < head_ok,
        "key B was held up behind key A's failing head"
    );
    assert!(
        got[last_b].at < got[head_ok].at,
        "B finished after A's head"
    );

    let ev = wait_event_state(&gw, &a1, "delivered").await;
    let steps = trail(&ev, "epj");
    assert_eq!(
        kinds(&steps)
            .iter()
            .filter(|k| **k == "retry_scheduled")
            .count(),
        4,
        "{steps:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Destination isolation
// ---------------------------------------------------------------------------------------------

const N_ISOLATION: usize = 200;

/// Starts a gateway routing everything to `healthy` and `other`, ingests N events and returns how
/// long it took from the first post until `healthy` had received every event (panicking once that
/// takes longer than `limit`).
async fn time_to_deliver_all(
    other: Dest,
    other_sink: &Sink,
    limit: Duration,
) -> (Duration, Gateway) {
    let healthy = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("healthy", &healthy.url), other], "").await;
    let bodies: Vec<Value> = (0..N_ISOLATION)
        .map(|i| observation(&format!("iso-{}", i % 20), &format!("iso-{i}")))
        .collect();
    let started = Instant::now();
    let ids = ingest_many(&gw, bodies, 16).await;
    healthy
        .wait_for(
            limit,
            &format!(
                "healthy destination got all {N_ISOLATION} events (beside {})",
                other_sink.url
            ),
            |r| r.iter().filter(|x| x.mode.is_success()).count() >= N_ISOLATION,
        )
        .await;
    let took = started.elapsed();
    let got: HashSet<String> = healthy
        .delivered()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    let want: HashSet<String> = ids.into_iter().collect();
    assert_eq!(
        got, want,
        "healthy destination got exactly the ingested events"
    );
    // The other destination was really being tried meanwhile.
    assert!(
        !other_sink.received().is_empty(),
        "other destination never tried"
    );
    (took, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_destination_does_not_slow_a_healthy_one() {
    // Baseline: both destinations healthy.
    let twin = Sink::start(Mode::Ok).await;
    let (baseline, gw0) =
        time_to_deliver_all(Dest::new("twin", &twin.url), &twin, Duration::from_secs(30)).await;
    drop(gw0);
    // Generous, so a loaded machine does not make it flaky, yet far below what sharing slots or
    // connections with a 1 s-timeout destination would cost (200 events x 1 s).
    let bound = Duration::from_secs(10).max(baseline * 3);

    // A destination that accepts the connection and never answers (each attempt holds a slot
    // for the full timeout).
    let hung = Sink::start(Mode::Hang).await;
    let (with_hang, gw) =
        time_to_deliver_all(dest_with_timeout("dead", &hung.url, 1000), &hung, bound).await;
    let (_, dests) = gw.get("/v1/admin/destinations").await;
    let dead = dests["destinations"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["destination"] == "dead"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(dead["delivered"], 0, "{dests}");
    assert!(dead["pending"].as_i64().unwrap_or(0) > 0, "{dests}");
    drop(gw);

    // A destination that resets every connection at once: fast failures, so the dead
    // destination's retries keep the shared journal writer as busy as they can.
    let rst = Sink::start(Mode::Reset).await;
    let (with_reset, gw) = time_to_deliver_all(Dest::new("dead", &rst.url), &rst, bound).await;
    // Every delivery that succeeded went to the healthy destination.
    let stats = wait_admin(&gw, "/v1/admin/stats", WAIT, "outcomes recorded", |b| {
        b["delivered"].as_u64() >= Some(N_ISOLATION as u64)
    })
    .await;
    assert_eq!(stats["delivered"], N_ISOLATION, "{stats}");

    eprintln!("isolation: baseline {baseline:?}, hang {with_hang:?}, reset {with_reset:?}");
    assert!(
        with_hang <= bound,
        "a hanging destination slowed the healthy one: {with_hang:?} vs baseline {baseline:?}"
    );
    assert!(
        with_reset <= bound,
        "a resetting destination slowed the healthy one: {with_reset:?} vs baseline {baseline:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Alarms overtake a measurement backlog
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_is_not_stuck_behind_a_measurement_backlog() {
    const BACKLOG: usize = 300;
    // One measurement at a time, 20 ms each: the backlog takes at least 6 s to drain. It is spread
    // over 100 keys, so fair round-robin between lanes alone would still put the alarm behind
    // roughly 100 measurements: only a separate alarm lane class with its own slots lets it pass.
    let sink = Sink::start(Mode::Delay(20)).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url).extra("concurrency = 1")], "").await;
    let bodies: Vec<Value> = (0..BACKLOG)
        .map(|i| observation(&format!("bl-{}", i % 100), &format!("bl-{i}")))
        .collect();
    let measurements: HashSet<String> = ingest_many(&gw, bodies, 16).await.into_iter().collect();

    // The alarm is for a patient whose measurements are queued too.
    let posted = Instant::now();
    let alarm_id = ingest(&gw, &alarm("bl-0", "dev-9", "alarm-1")).await;
    sink.wait_for(Duration::from_secs(30), "alarm delivered", |r| {
        r.iter()
            .any(|x| x.idempotency_key == alarm_id && x.mode.is_success())
    })
    .await;
    let got = sink.received();
    let at = got
        .iter()
        .position(|r| r.idempotency_key == alarm_id)
        .expect("alarm received");
    let latency = got[at].at.duration_since(posted);
    let before = got[..at]
        .iter()
        .filter(|r| measurements.contains(&r.idempotency_key))
        .count();
    // Measurements that went out after the alarm was accepted but before it.
    let overtaken_by = got[..at]
        .iter()
        .filter(|r| r.at >= posted && measurements.contains(&r.idempotency_key))
        .count();
    eprintln!(
        "alarm delivered after {latency:?}; {before} of {BACKLOG} measurements before it, \
         {overtaken_by} of them after it was posted"
    );
    assert!(
        overtaken_by <= 25,
        "alarm queued behind the measurement backlog: {overtaken_by} measurements went first"
    );
    assert!(
        before + 100 <= BACKLOG,
        "backlog too small to prove anything: {before} of {BACKLOG} already delivered"
    );
    assert!(
        latency < Duration::from_secs(3),
        "alarm took {latency:?} to be delivered"
    );
    // And the backlog really was still there.
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert!(stats["pending"].as_i64().unwrap_or(0) >= 50, "{stats}");
    let (_, ev) = gw.get(&format!("/v1/admin/events/{alarm_id}")).await;
    assert_eq!(ev["category"], "alarm", "{ev}");
}

// ---------------------------------------------------------------------------------------------
// 8. Replay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dead_letters_replay_singly_and_by_filter() {
    let sink = Sink::start(Mode::Status {
        code: 422,
        retry_after: None,
        body: operation_outcome("rejected"),
    })
    .await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let e1 = ingest(&gw, &observation("rp-1", "rp-1")).await;
    let e2 = ingest(&gw, &observation("rp-2", "rp-2")).await;
    let e3 = ingest(&gw, &observation("rp-2", "rp-3")).await;
    let dl = wait_admin(
        &gw,
        "/v1/admin/dead-letters",
        WAIT,
        "three dead letters",
        |b| b["dead_letters"].as_array().is_some_and(|a| a.len() == 3),
    )
    .await;
    let dead_id = |event: &str| {
        dl["dead_letters"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["event_id"] == event)
            .and_then(|r| r["delivery_id"].as_i64())
            .expect("dead letter for event")
    };
    let (d1, d2) = (dead_id(&e1), dead_id(&e2));
    sink.set_default(Mode::Ok);

    // Singly.
    let (status, body) = gw
        .post_admin(&format!("/v1/admin/dead-letters/{d1}/replay"))
        .await;
    assert_eq!(status, 200, "{body}");
    let replayed = body["replayed"].as_array().expect("replayed");
    assert_eq!(replayed.len(), 1, "{body}");
    assert_eq!(replayed[0]["event_id"], e1.as_str());
    assert_eq!(replayed[0]["dead_delivery_id"], d1);
    let new1 = replayed[0]["new_delivery_id"].as_i64().expect("new id");
    assert_ne!(new1, d1);

    let ev = wait_admin(
        &gw,
        &format!("/v1/admin/events/{e1}"),
        WAIT,
        "replayed delivery delivered",
        |ev| {
            ev["deliveries"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["state"] == "delivered"))
        },
    )
    .await;
    let deliveries = ev["deliveries"].as_array().expect("deliveries");
    assert_eq!(deliveries.len(), 2, "{ev}");
    assert_eq!(deliveries[0]["delivery_id"], d1);
    assert_eq!(deliveries[0]["state"], "replayed");
    assert_eq!(deliveries[1]["delivery_id"], new1);
    assert_eq!(deliveries[1]["state"], "delivered");
    assert_eq!(
        deliveries[1]["attempts"], 1,
        "attempt count restarts on replay"
    );
    let steps = trail(&ev, "epj");
    assert_eq!(
        kinds(&steps),
        [
            "attempt",
            "dead_lettered",
            "replayed",
            "attempt",
            "delivered"
        ],
        "{steps:#?}"
    );
    assert_eq!(steps[3].attempt, Some(1));
    let e1_reqs = for_event(&sink.received(), &e1)
        .iter()
        .map(|r| (r.attempt, r.mode.is_success()))
        .collect::<Vec<_>>();
    assert_eq!(
        e1_reqs,
        vec![(1, false), (1, true)],
        "same Idempotency-Key, attempt restarts"
    );

    // A filter that matches nothing replays nothing.
    let (status, body) = gw
        .post_admin("/v1/admin/dead-letters/replay?vendor=nobody")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"].as_array().map(Vec::len), Some(0), "{body}");
    // By filter: the two left.
    let (status, body) = gw
        .post_admin("/v1/admin/dead-letters/replay?destination=epj&vendor=fhir&limit=10")
        .await;
    assert_eq!(status, 200, "{body}");
    let mut events: Vec<&str> = body["replayed"]
        .as_array()
        .expect("replayed")
        .iter()
        .map(|r| r["event_id"].as_str().expect("event id"))
        .collect();
    events.sort_unstable();
    let mut want = vec![e2.as_str(), e3.as_str()];
    want.sort_unstable();
    assert_eq!(events, want, "{body}");
    for e in [&e2, &e3] {
        let ev = wait_admin(
            &gw,
            &format!("/v1/admin/events/{e}"),
            WAIT,
            "filtered replay delivered",
            |ev| {
                ev["deliveries"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|d| d["state"] == "delivered"))
            },
        )
        .await;
        let steps = trail(&ev, "epj");
        let tail: Vec<&str> = kinds(&steps).into_iter().rev().take(3).collect();
        assert_eq!(tail, ["delivered", "attempt", "replayed"], "{ev}");
    }
    let (_, dl) = gw.get("/v1/admin/dead-letters").await;
    assert_eq!(dl["dead_letters"].as_array().map(Vec::len), Some(0), "{dl}");

    // Only dead deliveries can be replayed.
    for id in [new1, d1, d2, 999_999] {
        let (status, body) = gw
            .post_admin(&format!("/v1/admin/dead-letters/{id}/replay"))
            .await;
        assert_eq!(status, 404, "replaying delivery {id}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    }
    // Nothing was sent twice by the refused replays.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.delivered().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// 9. Lanes and destinations views
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn lanes_and_destinations_show_backlog_then_drain() {
    let sink = Sink::start(Mode::status(503)).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let mut p = Vec::new();
    for i in 0..3 {
        p.push(ingest(&gw, &observation("lane-p", &format!("lp-{i}"))).await);
    }
    let q = ingest(&gw, &observation("lane-q", "lq-0")).await;

    let lanes = wait_admin(
        &gw,
        "/v1/admin/lanes?destination=epj",
        WAIT,
        "two failing lanes",
        |b| {
            b["lanes"].as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter().all(|l| {
                        l["head_attempts"].as_i64().unwrap_or(0) >= 1
                            && l["oldest_age_ms"].as_i64().unwrap_or(0) > 0
                    })
            })
        },
    )
    .await;
    let lane = |key: &str| {
        lanes["lanes"]
            .as_array()
            .expect("lanes")
            .iter()
            .find(|l| l["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no lane {key}: {lanes}"))
    };
    let lp = lane("patient:lane-p");
    assert_eq!(lp["destination"], "epj");
    assert_eq!(lp["class"], "normal");
    assert_eq!(lp["depth"], 3, "{lp}");
    assert_eq!(lp["head_event_id"], p[0].as_str());
    assert_eq!(lp["last_status"], 503, "{lp}");
    let lq = lane("patient:lane-q");
    assert_eq!(lq["depth"], 1, "{lq}");
    assert_eq!(lq["head_event_id"], q.as_str());

    let (_, other) = gw.get("/v1/admin/lanes?destination=nowhere").await;
    assert_eq!(other["lanes"].as_array().map(Vec::len), Some(0), "{other}");

    let (_, dests) = gw.get("/v1/admin/destinations").await;
    let epj = &dests["destinations"][0];
    assert_eq!(epj["destination"], "epj", "{dests}");
    assert_eq!(epj["pending"], 4, "{dests}");
    assert_eq!(epj["lanes"], 2, "{dests}");
    assert_eq!(epj["delivered"], 0, "{dests}");
    assert!(
        epj["oldest_pending_age_ms"].as_i64().unwrap_or(0) > 0,
        "{dests}"
    );

    // Recovery drains everything.
    sink.set_default(Mode::Ok);
    wait_admin(
        &gw,
        "/v1/admin/destinations",
        WAIT,
        "destination drained",
        |b| {
            let d = &b["destinations"][0];
            d["pending"] == 0 && d["lanes"] == 0 && d["delivered"] == 4
        },
    )
    .await;
    let (_, lanes) = gw.get("/v1/admin/lanes").await;
    assert_eq!(lanes["lanes"].as_array().map(Vec::len), Some(0), "{lanes}");
    let (_, dests) = gw.get("/v1/admin/destinations").await;
    assert!(
        dests["destinations"][0]["oldest_pending_age_ms"].is_null(),
        "{dests}"
    );
    // Key P still came out in order after the outage.
    let order: Vec<String> = sink
        .delivered()
        .into_iter()
        .map(|r| r.idempotency_key)
        .filter(|k| p.contains(k))
        .collect();
    assert_eq!(order, p);
}
