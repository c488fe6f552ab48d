//! FHIR subscriptions (R5 Backport IG on R4) and the pull feed, end to end: the real binary,
//! real loopback subscriber endpoints (the harness `Sink`), real journal.

mod common;

use std::time::Duration;

use common::{Gateway, Mode, Received, Sink, observation};
use serde_json::{Value, json};

const EXT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
const PATIENT: &str = "13097248022";
const OTHER: &str = "01017012345";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A backport Subscription on `topic` with `filters` (`key=value`), payload `content`.
fn subscription(
    topic: &str,
    filters: &[&str],
    endpoint: &str,
    content: &str,
    heartbeat_s: Option<u32>,
) -> Value {
    let mut channel_ext =
        vec![json!({ "url": format!("{EXT}backport-max-count"), "valuePositiveInt": 3 })];
    if let Some(h) = heartbeat_s {
        channel_ext.push(
            json!({ "url": format!("{EXT}backport-heartbeat-period"), "valueUnsignedInt": h }),
        );
    }
    let filters: Vec<Value> = filters
        .iter()
        .map(|f| json!({ "url": format!("{EXT}backport-filter-criteria"), "valueString": f }))
        .collect();
    json!({
        "resourceType": "Subscription",
        "meta": { "profile": [format!("{EXT}backport-subscription")] },
        "status": "requested",
        "reason": "EPJ journal notes",
        "criteria": format!("https://knutepunkt.no/fhir/SubscriptionTopic/{topic}"),
        "_criteria": { "extension": filters },
        "channel": {
            "extension": channel_ext,
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": format!("{EXT}backport-payload-content"), "valueCode": content }] },
            "header": ["X-Epj-Key: secret-1"]
        }
    })
}

async fn subscribe(gw: &Gateway, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/fhir/Subscription", gw.base))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("post subscription");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn created(gw: &Gateway, body: &Value) -> String {
    let (s, b) = subscribe(gw, body).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["status"], "requested");
    b["id"].as_str().expect("id").to_string()
}

/// Posts an observation for `patient` (optionally for a municipality); returns the event id.
async fn measure(gw: &Gateway, patient: &str, vendor_id: &str, tenant: Option<&str>) -> String {
    let headers: Vec<(&str, &str)> = tenant.map(|t| ("x-tenant", t)).into_iter().collect();
    let (s, b) = gw
        .post_as("fhir", &observation(patient, vendor_id), &headers)
        .await;
    assert_eq!(s, 202, "{b}");
    b["id"].as_str().expect("id").to_string()
}

/// The SubscriptionStatus (R4 Parameters) of a notification bundle.
fn status_of(bundle: &Value) -> &Value {
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "history", "{bundle}");
    let st = &bundle["entry"][0]["resource"];
    assert_eq!(st["resourceType"], "Parameters", "{bundle}");
    st
}

fn param<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["parameter"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or(&Value::Null)
}

fn kind(bundle: &Value) -> String {
    param(status_of(bundle), "type")["valueCode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// (event number, focus event id) of every notification-event, in bundle order.
fn events_in(bundle: &Value) -> Vec<(i64, String)> {
    status_of(bundle)["parameter"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            let part = |n: &str| {
                p["part"]
                    .as_array()
                    .expect("part")
                    .iter()
                    .find(|x| x["name"] == n)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let number = part("event-number")["valueString"]
                .as_str()
                .expect("event-number")
                .parse()
                .expect("number");
            let focus = part("focus")["valueReference"]["reference"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("Bundle/")
                .to_string();
            (number, focus)
        })
        .collect()
}

/// Event notifications the subscriber acknowledged (2xx), flattened, in arrival order.
fn delivered_events(sink: &Sink) -> Vec<(i64, String)> {
    sink.delivered()
        .iter()
        .filter(|r| kind(&r.body) == "event-notification")
        .flat_map(|r| events_in(&r.body))
        .collect()
}

fn of_kind(got: &[Received], k: &str) -> usize {
    got.iter().filter(|r| kind(&r.body) == k).count()
}

async fn sub_status(gw: &Gateway, id: &str) -> String {
    let (s, b) = gw.get(&format!("/fhir/Subscription/{id}")).await;
    assert_eq!(s, 200, "{b}");
    b["status"].as_str().unwrap_or_default().to_string()
}

async fn wait_status(gw: &Gateway, id: &str, want: &str) {
    for _ in 0..300 {
        if sub_status(gw, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("subscription {id} never reached {want}");
}

#[tokio::test]
async fn handshake_then_numbered_notifications_in_order_with_filters() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[], "").await;
    let id = created(
        &gw,
        &subscription(
            "measurement",
            &[&format!("Observation?patient=Patient/{PATIENT}")],
            &sink.url,
            "full-resource",
            None,
        ),
    )
    .await;

    sink.wait_for(Duration::from_secs(10), "handshake", |r| {
        of_kind(r, "handshake") == 1
    })
    .await;
    let hs = &sink.received()[0];
    let st = status_of(&hs.body);
    assert_eq!(param(st, "status")["valueCode"], "requested");
    assert_eq!(
        param(st, "subscription")["valueReference"]["reference"],
        format!("Subscription/{id}")
    );
    assert_eq!(
        param(st, "events-since-subscription-start")["valueString"],
        "0"
    );
    assert!(hs.content_type.starts_with("application/fhir+json"));
    wait_status(&gw, &id, "active").await;

    // Seven events of the subscribed patient, interleaved with another patient's (filtered out).
    let mut mine = Vec::new();
    for i in 0..7 {
        mine.push(measure(&gw, PATIENT, &format!("m-{i}"), None).await);
        measure(&gw, OTHER, &format!("o-{i}"), None).await;
    }
    sink.wait_for(Duration::from_secs(15), "seven events", |_| {
        delivered_events(&sink).len() >= 7
    })
    .await;
    let got = delivered_events(&sink);
    let numbers: Vec<i64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (1..=7).collect::<Vec<_>>(),
        "continuous, in order, once"
    );
    let focus: Vec<String> = got.iter().map(|(_, f)| f.clone()).collect();
    assert_eq!(focus, mine, "the patient's events in journal order");

    // full-resource: each focus is followed by the event Bundle itself; maxCount 3 per bundle.
    for r in sink
        .delivered()
        .iter()
        .filter(|r| kind(&r.body) == "event-notification")
    {
        let evs = events_in(&r.body);
        assert!(evs.len() <= 3, "maxCount honoured");
        let entries = r.body["entry"].as_array().expect("entries");
        assert_eq!(entries.len(), 1 + evs.len());
        for (e, (_, focus)) in entries[1..].iter().zip(&evs) {
            assert_eq!(e["resource"]["resourceType"], "Bundle");
            assert_eq!(e["resource"]["id"], focus.as_str());
            assert_eq!(e["fullUrl"], format!("urn:uuid:{focus}"));
        }
        let st = status_of(&r.body);
        assert_eq!(param(st, "status")["valueCode"], "active");
    }
    // $status counts every numbered event.
    let (s, b) = gw.get(&format!("/fhir/Subscription/{id}/$status")).await;
    assert_eq!(s, 200, "{b}");
    let st = &b["entry"][0]["resource"];
    assert_eq!(
        param(st, "events-since-subscription-start")["valueString"],
        "7"
    );
    assert_eq!(param(st, "type")["valueCode"], "query-status");
}

#[tokio::test]
async fn payload_content_levels_and_heartbeat() {
    let empty = Sink::start(Mode::Ok).await;
    let id_only = Sink::start(Mode::Ok).await;
    let full = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[], "").await;
    for (sink, content) in [
        (&empty, "empty"),
        (&id_only, "id-only"),
        (&full, "full-resource"),
    ] {
        created(
            &gw,
            &subscription("measurement", &[], &sink.url, content, Some(1)),
        )
        .await;
    }
    for sink in [&empty, &id_only, &full] {
        sink.wait_for(Duration::from_secs(10), "handshake", |r| {
            of_kind(r, "handshake") == 1
        })
        .await;
    }
    let ev = measure(&gw, PATIENT, "p-1", Some("0301")).await;
    for sink in [&empty, &id_only, &full] {
        sink.wait_for(Duration::from_secs(10), "notification", |r| {
            of_kind(r, "event-notification") == 1
        })
        .await;
    }
    let note = |s: &Sink| {
        s.received()
            .into_iter()
            .find(|r| kind(&r.body) == "event-notification")
            .expect("notification")
            .body
    };
    // empty: only the status, no focus.
    let b = note(&empty);
    assert_eq!(b["entry"].as_array().expect("entries").len(), 1);
    assert_eq!(events_in(&b), vec![(1, String::new())]);
    // id-only: focus and an entry with fullUrl, no resource.
    let b = note(&id_only);
    assert_eq!(events_in(&b), vec![(1, ev.clone())]);
    assert_eq!(b["entry"][1]["fullUrl"], format!("urn:uuid:{ev}"));
    assert!(b["entry"][1].get("resource").is_none(), "{b}");
    // full-resource: the event Bundle.
    let b = note(&full);
    assert_eq!(b["entry"][1]["resource"]["id"], ev.as_str());
    assert_eq!(b["entry"][1]["resource"]["resourceType"], "Bundle");
    // The custom header reaches the endpoint is checked implicitly by a 2xx; heartbeats follow
    // when idle (period 1 s).
    full.wait_for(Duration::from_secs(10), "two heartbeats", |r| {
        of_kind(r, "heartbeat") >= 2
    })
    .await;
    let hb = full
        .received()
        .into_iter()
        .find(|r| kind(&r.body) == "heartbeat")
        .expect("heartbeat")
        .body;
    assert_eq!(
        param(status_of(&hb), "events-since-subscription-start")["valueString"],
        "1"
    );
    assert!(events_in(&hb).is_empty());
}

#[tokio::test]
async fn subscriber_down_then_catches_up_via_events_across_a_restart() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = Gateway::start(&[], "").await;
    let id = created(
        &gw,
        &subscription(
            "measurement",
            &["municipality=0301"],
            &sink.url,
            "id-only",
            None,
        ),
    )
    .await;
    sink.wait_for(Duration::from_secs(10), "handshake", |r| {
        of_kind(r, "handshake") == 1
    })
    .await;
    wait_status(&gw, &id, "active").await;
    let first = measure(&gw, PATIENT, "d-0", Some("0301")).await;
    sink.wait_for(Duration::from_secs(10), "event 1", |_| {
        delivered_events(&sink).len() == 1
    })
    .await;

    // The subscriber goes down: 503 to everything.
    sink.set_default(Mode::status(503));
    let mut posted = vec![first];
    for i in 1..8 {
        // Keys alternate between two patients; another municipality is filtered out.
        let p = if i % 2 == 0 { PATIENT } else { OTHER };
        posted.push(measure(&gw, p, &format!("d-{i}"), Some("0301")).await);
        measure(&gw, p, &format!("x-{i}"), Some("0302")).await;
    }
    wait_status(&gw, &id, "error").await;
    let (_, b) = gw.get(&format!("/fhir/Subscription/{id}")).await;
    assert!(
        b["error"].as_str().unwrap_or_default().contains("503"),
        "{b}"
    );

    // A restart loses nothing: numbers and state are in the journal.
    gw.restart();
    let (s, b) = gw
        .get(&format!(
            "/fhir/Subscription/{id}/$events?eventsSinceNumber=2"
        ))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(param(status_of(&b), "type")["valueCode"], "query-event");
    let missed = events_in(&b);
    let numbers: Vec<i64> = missed.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (2..=8).collect::<Vec<_>>(), "no gap");
    let ids: Vec<String> = missed.into_iter().map(|(_, f)| f).collect();
    assert_eq!(ids, posted[1..].to_vec(), "no reorder");
    // A bounded window and a content override.
    let (_, b) = gw
        .get(&format!(
            "/fhir/Subscription/{id}/$events?eventsSinceNumber=3&eventsUntilNumber=4&content=full-resource"
        ))
        .await;
    assert_eq!(
        events_in(&b).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(b["entry"][1]["resource"]["id"], posted[2].as_str());
    let (s, b) = gw
        .get(&format!(
            "/fhir/Subscription/{id}/$events?eventsSinceNumber=zero"
        ))
        .await;
    assert_eq!(s, 400);
    assert_eq!(b["issue"][0]["expression"][0], "eventsSinceNumber");

    // The subscriber recovers: pushes resume where acknowledged, and the status is active again.
    sink.set_default(Mode::Ok);
    sink.wait_for(Duration::from_secs(60), "all eight events", |_| {
        delivered_events(&sink).iter().map(|e| e.0).max() == Some(8)
    })
    .await;
    wait_status(&gw, &id, "active").await;
    let numbers: Vec<i64> = delivered_events(&sink).iter().map(|e| e.0).collect();
    assert_eq!(
        numbers,
        (1..=8).collect::<Vec<_>>(),
        "acknowledged pushes: each once, in order"
    );

    // Operators see notifications on /metrics; every series exists from the start.
    let text = http()
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let value = |kind: &str, outcome: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("knutepunkt_subscription_notifications_total")
                    && l.contains(&format!("type=\"{kind}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("event-notification", "accepted") >= 1.0, "{text}");
    assert!(value("handshake", "failed") == 0.0, "{text}");
}

#[tokio::test]
async fn metadata_topics_validation_and_delete() {
    let gw = Gateway::start(&[], "").await;
    let (s, cs) = gw.get("/fhir/metadata").await;
    assert_eq!(s, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let sub = cs["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["type"] == "Subscription")
        .expect("Subscription")
        .clone();
    let topics: Vec<&str> = sub["extension"]
        .as_array()
        .expect("topic canonicals")
        .iter()
        .filter_map(|e| e["valueCanonical"].as_str())
        .collect();
    assert_eq!(topics.len(), 5);
    assert!(topics.contains(&"https://knutepunkt.no/fhir/SubscriptionTopic/alarm"));
    let ops: Vec<&str> = sub["operation"]
        .as_array()
        .expect("ops")
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(ops, vec!["status", "events"]);

    let (s, t) = gw.get("/fhir/SubscriptionTopic").await;
    assert_eq!(s, 200);
    assert_eq!(t["total"], 5);
    let (s, t) = gw.get("/fhir/SubscriptionTopic/alarm").await;
    assert_eq!(s, 200);
    assert_eq!(t["resourceType"], "Basic");
    assert_eq!(t["code"]["coding"][0]["code"], "SubscriptionTopic");
    let (s, _) = gw.get("/fhir/SubscriptionTopic/weather").await;
    assert_eq!(s, 404);

    // Refusals name the field.
    let good = subscription("alarm", &[], "http://127.0.0.1:9/hook", "id-only", None);
    let cases = [
        ("/channel/type", json!("email"), "Subscription.channel.type"),
        (
            "/criteria",
            json!("https://knutepunkt.no/fhir/SubscriptionTopic/x"),
            "Subscription.criteria",
        ),
        (
            "/channel/endpoint",
            json!("not a url"),
            "Subscription.channel.endpoint",
        ),
        (
            "/_criteria/extension",
            json!([{ "url": format!("{EXT}backport-filter-criteria"), "valueString": "municipality=oslo" }]),
            "Subscription._criteria.extension.valueString",
        ),
    ];
    for (ptr, value, field) in cases {
        let mut body = good.clone();
        *body.pointer_mut(ptr).expect(ptr) = value;
        let (s, b) = subscribe(&gw, &body).await;
        assert_eq!(s, 400, "{ptr}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
        assert_eq!(b["issue"][0]["expression"][0], field, "{b}");
    }

    let id = created(&gw, &good).await;
    let (s, list) = gw.get("/fhir/Subscription").await;
    assert_eq!((s, list["total"].clone()), (200, json!(1)));
    let resp = http()
        .delete(format!("{}/fhir/Subscription/{id}", gw.base))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 204);
    let (s, b) = gw.get(&format!("/fhir/Subscription/{id}")).await;
    assert_eq!(s, 404);
    assert_eq!(b["resourceType"], "OperationOutcome");
    // The subscription's audit records (created, status changes, deleted) join the hash chain.
    let (code, text) = gw.audit_verify();
    assert!(code == 0 && text.starts_with("ok"), "{text}");
    let rows: u64 = text
        .split("intact: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(rows >= 2, "created + deleted at least: {text}");
}

async fn ack(gw: &Gateway, id: &str, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/fhir/Bundle/{id}/$ack", gw.base))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("ack");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn state_of(p: &Value) -> String {
    param(p, "status")["valueCode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn pull_feed_pages_with_cursor_and_tracks_journaling() {
    let gw = Gateway::start(&[], "").await;
    let mut oslo = Vec::new();
    for i in 0..3 {
        oslo.push(measure(&gw, PATIENT, &format!("f-{i}"), Some("0301")).await);
    }
    let bergen = measure(&gw, PATIENT, "f-b", Some("4601")).await;

    let (s, page) = gw.get("/fhir/Bundle?_count=2&municipality=0301").await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["type"], "searchset");
    let ids = |p: &Value| -> Vec<String> {
        p["entry"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|x| x["resource"]["id"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&page), oslo[..2].to_vec());
    let tag = &page["entry"][0]["resource"]["meta"]["tag"];
    assert!(tag.to_string().contains("\"read\""), "{tag}");
    let next = page["link"][0]["url"].as_str().expect("next").to_string();
    let (_, page2) = gw.get(&format!("/fhir/{next}")).await;
    assert_eq!(ids(&page2), oslo[2..].to_vec());
    let next2 = page2["link"][0]["url"].as_str().expect("next").to_string();
    let (_, page3) = gw.get(&format!("/fhir/{next2}")).await;
    assert!(ids(&page3).is_empty(), "caught up: {page3}");
    // A new event shows up behind the last cursor.
    let late = measure(&gw, OTHER, "f-late", Some("0301")).await;
    let (_, page4) = gw.get(&format!("/fhir/{next2}")).await;
    assert_eq!(ids(&page4), vec![late]);
    let (s, b) = gw.get("/fhir/Bundle?_cursor=bogus").await;
    assert_eq!(
        (s, b["issue"][0]["expression"][0].clone()),
        (400, json!("_cursor"))
    );

    // registered → read → journaled | failed, and final states stay final.
    let (_, st) = gw.get(&format!("/fhir/Bundle/{bergen}/$status")).await;
    assert_eq!(state_of(&st), "registered");
    let (_, st) = gw.get(&format!("/fhir/Bundle/{}/$status", oslo[0])).await;
    assert_eq!(state_of(&st), "read");
    let journaled = json!({ "resourceType": "Parameters", "parameter": [{ "name": "status", "valueCode": "journaled" }] });
    let (s, st) = ack(&gw, &oslo[0], &journaled).await;
    assert_eq!((s, state_of(&st)), (200, "journaled".to_string()), "{st}");
    let (s, b) = ack(&gw, &oslo[0], &journaled).await;
    assert_eq!(s, 409, "{b}");
    let failed = json!({ "resourceType": "Parameters", "parameter": [
        { "name": "status", "valueCode": "failed" }, { "name": "reason", "valueString": "patient unknown in EPJ" }] });
    let (s, st) = ack(&gw, &oslo[1], &failed).await;
    assert_eq!((s, state_of(&st)), (200, "failed".to_string()));
    assert_eq!(
        param(&st, "reason")["valueString"],
        "patient unknown in EPJ"
    );
    let (s, b) = ack(&gw, &oslo[2], &json!({ "resourceType": "Parameters", "parameter": [{ "name": "status", "valueCode": "done" }] })).await;
    assert_eq!(
        (s, b["issue"][0]["expression"][0].clone()),
        (400, json!("Parameters.parameter(status).valueCode"))
    );
    let (s, _) = ack(&gw, "no-such-event", &journaled).await;
    assert_eq!(s, 404);
    // Each acknowledgement is in the event's audit trail.
    let (_, ev) = gw.get(&format!("/v1/admin/events/{}", oslo[1])).await;
    let audit = ev["audit"].to_string();
    assert!(
        audit.contains("journaling-ack") && audit.contains("failed: patient unknown"),
        "{audit}"
    );
    // The feed shows the acknowledged state.
    let (_, page) = gw.get("/fhir/Bundle?_count=1&municipality=0301").await;
    assert!(
        page["entry"][0]["resource"]["meta"]["tag"]
            .to_string()
            .contains("journaled")
    );
}

/// Every FHIR shape of this API passes the pinned R4 validator (`conformance-tests/`, set up by
/// `npm ci` there; the test says so and fails when it is missing and `KNUTEPUNKT_REQUIRE_VALIDATOR`
/// is set, as in CI).
#[tokio::test]
async fn fhir_outputs_validate_as_r4() {
    let validator = common::repo_path("conformance-tests/node_modules/@medplum/core");
    if !validator.exists() {
        assert!(
            std::env::var_os("KNUTEPUNKT_REQUIRE_VALIDATOR").is_none(),
            "run `npm ci` in conformance-tests/"
        );
        eprintln!("skipped: run `npm ci` in conformance-tests/ to validate FHIR outputs");
        return;
    }
    let sinks = [
        Sink::start(Mode::Ok).await,
        Sink::start(Mode::Ok).await,
        Sink::start(Mode::Ok).await,
    ];
    let gw = Gateway::start(&[], "").await;
    let mut subs = Vec::new();
    for (sink, content) in sinks.iter().zip(["empty", "id-only", "full-resource"]) {
        subs.push(
            created(
                &gw,
                &subscription("measurement", &[], &sink.url, content, Some(1)),
            )
            .await,
        );
    }
    let ev = measure(&gw, PATIENT, "v-1", Some("0301")).await;
    for sink in &sinks {
        sink.wait_for(
            Duration::from_secs(15),
            "handshake, event, heartbeat",
            |r| {
                of_kind(r, "handshake") >= 1
                    && of_kind(r, "event-notification") >= 1
                    && of_kind(r, "heartbeat") >= 1
            },
        )
        .await;
    }
    let mut docs: Vec<(String, Value)> = Vec::new();
    for (i, sink) in sinks.iter().enumerate() {
        for k in ["handshake", "event-notification", "heartbeat"] {
            let r = sink
                .received()
                .into_iter()
                .find(|r| kind(&r.body) == k)
                .expect("kind");
            docs.push((format!("{i}-{k}"), r.body));
        }
    }
    for path in [
        "/fhir/metadata".to_string(),
        "/fhir/SubscriptionTopic".into(),
        format!("/fhir/Subscription/{}", subs[2]),
        "/fhir/Subscription".into(),
        format!("/fhir/Subscription/{}/$status", subs[2]),
        format!("/fhir/Subscription/{}/$events?eventsSinceNumber=1", subs[2]),
        "/fhir/Bundle?_count=5".into(),
        format!("/fhir/Bundle/{ev}/$status"),
    ] {
        let (s, b) = gw.get(&path).await;
        assert_eq!(s, 200, "{path}: {b}");
        docs.push((path.replace(['/', '?', '$', '=', '&'], "_"), b));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (name, doc) in &docs {
        let p = dir.path().join(format!("{name}.json"));
        std::fs::write(&p, doc.to_string()).expect("write");
        files.push(p);
    }
    let out = std::process::Command::new("node")
        .arg(common::repo_path(
            "conformance-tests/validate-resources.mjs",
        ))
        .args(&files)
        .current_dir(common::repo_path("conformance-tests"))
        .output()
        .expect("run node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "R4 validation failed:\n{text}");
    assert!(
        text.contains(&format!("from {} files: 0 error(s)", docs.len())),
        "{text}"
    );
}

/// A held (quarantined) event is neither numbered nor in the feed until it is released; then it
/// is numbered once and enters the feed once, after the events stored meanwhile.
#[tokio::test]
async fn quarantined_event_is_numbered_and_fed_at_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let maps = dir.path().join("mappings");
    std::fs::create_dir_all(&maps).expect("mkdir");
    let scaip = std::fs::read_to_string(common::repo_path("mappings/scaip.toml")).expect("scaip");
    let held = scaip
        .replace("vendor = \"scaip\"", "vendor = \"scaipq\"")
        .replace(
            "missing_patient = \"device\"",
            "missing_patient = \"quarantine\"",
        );
    assert!(held.contains("missing_patient = \"quarantine\""));
    std::fs::write(maps.join("scaipq.toml"), held).expect("write");
    std::fs::copy(
        common::repo_path("mappings/fhir-passthrough.toml"),
        maps.join("fhir-passthrough.toml"),
    )
    .expect("copy");
    let storage = common::storage_section(dir.path()).await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n{storage}",
        maps.display().to_string()
    );
    let gw = Gateway::start_with_config(dir, &cfg).await;
    let sink = Sink::start(Mode::Ok).await;
    let id = created(&gw, &subscription("alarm", &[], &sink.url, "id-only", None)).await;
    sink.wait_for(Duration::from_secs(10), "handshake", |r| {
        of_kind(r, "handshake") == 1
    })
    .await;

    let xml =
        "<mrq><ref>Q1</ref><mty>ME</mty><cid>4711002</cid><dty>0004</dty><stc>0010</stc></mrq>";
    let resp = http()
        .post(format!("{}/v1/vendors/scaipq/events", gw.base))
        .header("content-type", "application/scaip+xml")
        .body(xml)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 202);
    let b: Value = resp.json().await.expect("json");
    assert_eq!(b["status"], "quarantined", "{b}");
    let held_id = b["id"].as_str().expect("id").to_string();
    let (_, page) = gw.get("/fhir/Bundle").await;
    assert!(
        page["entry"].as_array().is_none_or(Vec::is_empty),
        "held: not in the feed: {page}"
    );
    let cursor = page["link"][0]["url"].as_str().expect("next").to_string();

    // An alarm stored meanwhile gets number 1 and the next feed position.
    let (s, b) = gw.post(&common::alarm(PATIENT, "dev-9", "a-1")).await;
    assert_eq!(s, 202, "{b}");
    let direct = b["id"].as_str().expect("id").to_string();

    let resp = http()
        .post(format!("{}/v1/admin/devices/scaipq/4711002/assignments", gw.base))
        .header("content-type", "application/json")
        .body(json!({ "patient_id": PATIENT, "tenant": "5001", "valid_from": "2000-01-01T00:00:00Z" }).to_string())
        .send()
        .await
        .expect("assign");
    assert_eq!(resp.status().as_u16(), 201);
    let (s, b) = gw
        .post_admin(&format!("/v1/admin/quarantine/{held_id}/replay"))
        .await;
    assert_eq!((s, b["status"].clone()), (200, json!("released")), "{b}");

    let (_, ev) = gw.get(&format!("/fhir/Subscription/{id}/$events")).await;
    assert_eq!(
        events_in(&ev),
        vec![(1, direct.clone()), (2, held_id.clone())]
    );
    let (_, page) = gw.get(&format!("/fhir/{cursor}")).await;
    let ids: Vec<&str> = page["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![direct.as_str(), held_id.as_str()],
        "once each, in commit order"
    );
    let (_, all) = gw.get("/fhir/Bundle").await;
    assert_eq!(all["entry"].as_array().map(Vec::len), Some(2), "{all}");
}

/// PostgreSQL, two nodes with two writers each: events of four patients posted concurrently to
/// both nodes are numbered 1..n without gaps or repeats, each patient's events in acknowledgement
/// order, and pushed once each in number order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_number_without_gaps_in_commit_order() {
    if !common::on_postgres() {
        eprintln!("skipped: PostgreSQL only (KNUTEPUNKT_TEST_STORAGE=postgres)");
        return;
    }
    let url = common::fresh_database().await;
    let cfg = format!(
        "{}\n[storage]\nkind = \"postgres\"\nurl = {url:?}\nlease_s = 4\nwriters = 2\n",
        common::config_text(&[], "")
    );
    let a = Gateway::start_with_config(tempfile::tempdir().expect("tempdir"), &cfg).await;
    let b = Gateway::start_with_config(tempfile::tempdir().expect("tempdir"), &cfg).await;
    let sink = Sink::start(Mode::Ok).await;
    let id = created(
        &a,
        &subscription("measurement", &[], &sink.url, "id-only", None),
    )
    .await;
    sink.wait_for(Duration::from_secs(10), "handshake", |r| {
        of_kind(r, "handshake") == 1
    })
    .await;

    const PER: usize = 10;
    let patients = ["13097248022", "01017012345", "24068012345", "15057512345"];
    let mut tasks = tokio::task::JoinSet::new();
    let nodes = std::sync::Arc::new([a, b]);
    for (k, p) in patients.iter().enumerate() {
        let nodes = std::sync::Arc::clone(&nodes);
        let p = p.to_string();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER {
                // Alternate nodes: a patient's next event goes to the other node after the ack.
                let gw = &nodes[(k + i) % 2];
                acked.push(measure(gw, &p, &format!("mn-{k}-{i}"), None).await);
            }
            (p, acked)
        });
    }
    let mut order: Vec<(String, Vec<String>)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        order.push(r.expect("task"));
    }
    let total = patients.len() * PER;
    let (s, ev) = nodes[1]
        .get(&format!("/fhir/Subscription/{id}/$events"))
        .await;
    assert_eq!(s, 200, "{ev}");
    let numbered = events_in(&ev);
    assert_eq!(
        numbered.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=total as i64).collect::<Vec<_>>(),
        "gap-free, each number once"
    );
    let position: std::collections::HashMap<&str, i64> =
        numbered.iter().map(|(n, e)| (e.as_str(), *n)).collect();
    assert_eq!(position.len(), total, "each event numbered once");
    for (p, acked) in &order {
        let nums: Vec<i64> = acked.iter().map(|e| position[e.as_str()]).collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "patient {p}: {nums:?}"
        );
    }
    sink.wait_for(Duration::from_secs(30), "every event pushed", |_| {
        delivered_events(&sink).len() >= total
    })
    .await;
    let pushed: Vec<i64> = delivered_events(&sink).iter().map(|e| e.0).collect();
    assert_eq!(
        pushed,
        (1..=total as i64).collect::<Vec<_>>(),
        "in number order, once"
    );
}

/// The `code` filter matches `code` or `system|code` of a resource in the event; other topics
/// never see the event.
#[tokio::test]
async fn code_filter_and_topic_select_events() {
    let gw = Gateway::start(&[], "").await;
    // Endpoints that refuse connections: numbering does not depend on delivery.
    let hook = "http://127.0.0.1:9/hook";
    let pulse = created(
        &gw,
        &subscription(
            "measurement",
            &["code=http://loinc.org|8867-4"],
            hook,
            "id-only",
            None,
        ),
    )
    .await;
    let bare = created(
        &gw,
        &subscription("measurement", &["code=8867-4"], hook, "id-only", None),
    )
    .await;
    let weight = created(
        &gw,
        &subscription("measurement", &["code=29463-7"], hook, "id-only", None),
    )
    .await;
    let alarms = created(&gw, &subscription("alarm", &[], hook, "id-only", None)).await;
    let ev = measure(&gw, PATIENT, "c-1", None).await;
    let count = |b: &Value| {
        param(
            &b["entry"][0]["resource"],
            "events-since-subscription-start",
        )["valueString"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for (id, want) in [(&pulse, "1"), (&bare, "1"), (&weight, "0"), (&alarms, "0")] {
        let (s, b) = gw.get(&format!("/fhir/Subscription/{id}/$status")).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(count(&b), want, "{id}: {b}");
    }
    let (_, b) = gw.get(&format!("/fhir/Subscription/{pulse}/$events")).await;
    assert_eq!(events_in(&b), vec![(1, ev)]);
    // Unreachable endpoints: the handshake failed, so the subscriptions are in error.
    wait_status(&gw, &pulse, "error").await;
    let (_, b) = gw.get(&format!("/fhir/Subscription/{pulse}")).await;
    assert!(
        b["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("handshake"),
        "{b}"
    );
}
