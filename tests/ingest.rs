//! Ingest endpoint over a real socket: status codes, OperationOutcomes, duplicates.

mod common;

use common::{Dest, Gateway, Mode, Sink, observation};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn accepts_then_recognises_repeats() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;

    let (status, body) = gw.post(&observation("13097248022", "m-1")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();

    // Same vendor event id: 200, same id, nothing new stored.
    let (status, again) = gw.post(&observation("13097248022", "m-1")).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], id.as_str());

    // Same Idempotency-Key on a body without a vendor id: 200 with the first id.
    let mut anon = observation("13097248022", "x");
    anon.as_object_mut().expect("obj").remove("identifier");
    let (s1, b1) = gw
        .post_as("fhir", &anon, &[("idempotency-key", "k-1")])
        .await;
    let (s2, b2) = gw
        .post_as("fhir", &anon, &[("idempotency-key", "k-1")])
        .await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(b1["id"], b2["id"]);

    sink.wait_for(Duration::from_secs(10), "two deliveries", |r| r.len() >= 2)
        .await;
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["events"], 2, "{stats}");
    let got = sink.received();
    assert_eq!(got[0].idempotency_key, id);
    assert_eq!(got[0].body["id"], id.as_str());
    assert!(got[0].content_type.starts_with("application/fhir+json"));
}

#[tokio::test]
async fn refusals_are_precise_and_store_nothing() {
    let gw = Gateway::start(&[], "[ingest]\nmax_body_bytes = 2000\n").await;

    let (s, b) = gw.post_as("nobody", &observation("1", "a"), &[]).await;
    assert_eq!(s, 404);
    assert_eq!(b["resourceType"], "OperationOutcome");
    assert_eq!(b["issue"][0]["expression"][0], "vendor");

    let big = json!({ "resourceType": "Observation", "note": "x".repeat(5000) });
    let (s, b) = gw.post(&big).await;
    assert_eq!(s, 413, "{b}");

    let (s, b) = gw
        .post(&json!({ "resourceType": "Observation", "status": "final" }))
        .await;
    assert_eq!(s, 422);
    assert_eq!(b["issue"][0]["expression"][0], "subject");

    let (s, b) = gw.post(&json!("just a string")).await;
    assert_eq!(s, 422, "{b}");

    let deep = json!(format!("{}{}", "[".repeat(100), "]".repeat(100)));
    let (s, _) = gw.post_as("fhir", &deep, &[]).await;
    assert_eq!(s, 422, "a JSON string is well-formed but not a resource");

    let (s, b) = gw
        .post_as("fhir", &observation("1", "b"), &[("x-tenant", "oslo")])
        .await;
    assert_eq!(s, 400);
    assert_eq!(b["issue"][0]["expression"][0], "X-Tenant");

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/vendors/fhir/events", gw.base))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 415);

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/vendors/fhir/events", gw.base))
        .header("content-type", "application/json")
        .body("[".repeat(1_500))
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.status().as_u16(),
        400,
        "JSON nested past the depth limit is refused as malformed"
    );

    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["events"], 0, "{stats}");
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = Gateway::start(&[], "").await;
    assert_eq!(gw.get("/healthz").await.0, 200);
    let (s, b) = gw.get("/readyz").await;
    assert_eq!(s, 200, "{b}");
}
