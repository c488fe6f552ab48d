//! Traces end to end: the real binary exports spans over OTLP/HTTP (protobuf) to a receiver in
//! this test. One event is one trace: the vendor's `traceparent` → `ingest` → `journal.commit`,
//! and one `deliver` span per attempt, children of `ingest` although they run later from the
//! journal; the destination receives each attempt's `traceparent`.
//! Without an endpoint a lighter layer carries the same trace context (last test).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{Dest, Gateway, Mode, Sink, observation};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

type Spans = Arc<Mutex<Vec<Span>>>;

/// A minimal OTLP/HTTP trace receiver on loopback; returns its base URL and what it received.
async fn otlp_receiver() -> (String, Spans, Arc<Mutex<Vec<String>>>) {
    let spans: Spans = Arc::default();
    let services: Arc<Mutex<Vec<String>>> = Arc::default();
    let app =
        axum::Router::new()
            .route(
                "/v1/traces",
                post(
                    |State((spans, services)): State<(Spans, Arc<Mutex<Vec<String>>>)>,
                     body: Bytes| async move {
                        let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        for rs in req.resource_spans {
                            for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
                                if kv.key == "service.name" {
                                    services
                                        .lock()
                                        .expect("lock")
                                        .push(format!("{:?}", kv.value));
                                }
                            }
                            for ss in rs.scope_spans {
                                spans.lock().expect("lock").extend(ss.spans);
                            }
                        }
                        // An empty ExportTraceServiceResponse encodes to zero bytes.
                        (
                            [("content-type", "application/x-protobuf")],
                            Vec::<u8>::new(),
                        )
                    },
                ),
            )
            .route("/v1/metrics", post(|| async { "" }))
            .with_state((Arc::clone(&spans), Arc::clone(&services)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), spans, services)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
        .map(|v| match v {
            Value::StringValue(s) => s,
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_vendor_traceparent_through_every_delivery_attempt() {
    let (otlp, spans, services) = otlp_receiver().await;
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(
        &[Dest::new("epj", &sink.url)],
        &format!("[telemetry]\notlp_endpoint = {otlp:?}\nservice_name = \"knutepunkt-test\"\n"),
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let vendor_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{vendor_span}-01");
    // First attempt fails (retried), the second delivers: two attempt spans in one trace.
    sink.script([Mode::status(503)]);
    let (status, body) = gw
        .post_as(
            "fhir",
            &observation("13097248022", "trace-1"),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let event_id = body["id"].as_str().expect("id").to_string();
    sink.wait_for(Duration::from_secs(20), "delivery after one retry", |r| {
        r.iter().any(|x| x.mode == Mode::Ok)
    })
    .await;

    // Every attempt carried a traceparent of the vendor's trace, each from its own span.
    let received = sink.received();
    assert_eq!(received.len(), 2, "one failed and one delivered attempt");
    let sent: Vec<(String, String)> = received
        .iter()
        .map(|r| {
            let parts: Vec<&str> = r.traceparent.split('-').collect();
            assert_eq!(parts.len(), 4, "traceparent {:?}", r.traceparent);
            assert_eq!(parts[1], trace_id, "destination got the vendor's trace id");
            (parts[2].to_string(), parts[3].to_string())
        })
        .collect();
    assert_ne!(sent[0].0, sent[1].0, "each attempt has its own span");

    // Wait for the exporter (batched every 500 ms) to deliver the spans.
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = spans.lock().expect("lock").clone();
        let delivers = all.iter().filter(|s| s.name == "deliver").count();
        if all.iter().any(|s| s.name == "ingest") && delivers >= 2 {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "spans not exported in time; got {:?}",
            all.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ours: Vec<&Span> = all
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let find =
        |name: &str| -> Vec<&Span> { ours.iter().copied().filter(|s| s.name == name).collect() };
    let ingest = find("ingest");
    assert_eq!(ingest.len(), 1, "one ingest span in the vendor's trace");
    let ingest = ingest[0];
    assert_eq!(
        hex(&ingest.parent_span_id),
        vendor_span,
        "ingest is the vendor span's child"
    );
    assert_eq!(attr(ingest, "vendor").as_deref(), Some("fhir"));
    assert_eq!(attr(ingest, "category").as_deref(), Some("measurement"));
    assert_eq!(attr(ingest, "event_id").as_deref(), Some(event_id.as_str()));
    let commit = find("journal.commit");
    assert_eq!(commit.len(), 1, "journal commit span");
    assert_eq!(
        commit[0].parent_span_id, ingest.span_id,
        "commit under ingest"
    );

    let mut delivers = find("deliver");
    delivers.sort_by_key(|s| attr(s, "attempt"));
    assert_eq!(delivers.len(), 2, "one deliver span per attempt");
    for (i, d) in delivers.iter().enumerate() {
        assert_eq!(
            d.parent_span_id, ingest.span_id,
            "deliver is a child of ingest"
        );
        assert_eq!(attr(d, "destination").as_deref(), Some("epj"));
        assert_eq!(attr(d, "attempt"), Some((i + 1).to_string()));
        assert_eq!(
            hex(&d.span_id),
            sent[i].0,
            "destination saw this attempt's span id"
        );
        assert_eq!(sent[i].1, "01", "sampled flag propagated");
    }
    assert_eq!(
        attr(delivers[0], "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(attr(delivers[0], "outcome").as_deref(), Some("retry"));
    assert_eq!(attr(delivers[1], "outcome").as_deref(), Some("delivered"));
    // No span attribute carries the patient's identity number.
    for s in &all {
        for kv in &s.attributes {
            assert!(!format!("{:?}", kv.value).contains("13097248022"), "{kv:?}");
        }
    }
    assert!(
        services
            .lock()
            .expect("lock")
            .iter()
            .any(|s| s.contains("knutepunkt-test")),
        "service.name from config"
    );
}

/// Parts of a W3C `traceparent` as (trace id, span id, flags).
fn parts(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent {traceparent:?}");
    assert_eq!(p[0], "00", "version");
    assert!(
        p[1].len() == 32 && p[2].len() == 16 && p[3].len() == 2,
        "{traceparent:?}"
    );
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

/// Without an OTLP endpoint nothing is exported, but trace context still travels: each attempt
/// carries the vendor's trace id and sampled flag with its own span id; an event without a
/// `traceparent` starts a trace of its own, shared by all its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_vendor_trace_still_reaches_the_destination() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let vendor_span = "00f067aa0ba902b7";

    // Vendor trace, sampled; its first attempt fails, so two attempts carry it.
    sink.script([Mode::status(503)]);
    let (status, body) = gw
        .post_as(
            "fhir",
            &observation("13097248022", "plain-1"),
            &[("traceparent", &format!("00-{trace_id}-{vendor_span}-01"))],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let first = body["id"].as_str().expect("id").to_string();
    // Vendor trace, not sampled: the flag is kept.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let (status, body) = gw
        .post_as(
            "fhir",
            &observation("13097248022", "plain-2"),
            &[(
                "traceparent",
                &format!("00-{unsampled}-b7ad6b7169203331-00"),
            )],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let second = body["id"].as_str().expect("id").to_string();
    // No vendor trace, and a malformed one: each starts its own.
    let (_, body) = gw
        .post_as("fhir", &observation("13097248022", "plain-3"), &[])
        .await;
    let third = body["id"].as_str().expect("id").to_string();
    let (_, body) = gw
        .post_as(
            "fhir",
            &observation("13097248022", "plain-4"),
            &[("traceparent", "00-zz-b7ad6b7169203331-01")],
        )
        .await;
    let fourth = body["id"].as_str().expect("id").to_string();
    sink.wait_for(Duration::from_secs(30), "every event delivered", |r| {
        [&first, &second, &third, &fourth].iter().all(|id| {
            r.iter()
                .any(|x| &&x.idempotency_key == id && x.mode == Mode::Ok)
        })
    })
    .await;

    let got = sink.received();
    let of = |id: &str| -> Vec<(String, String, String)> {
        got.iter()
            .filter(|r| r.idempotency_key == id)
            .map(|r| parts(&r.traceparent))
            .collect()
    };
    let a = of(&first);
    assert_eq!(a.len(), 2, "a failed and a delivered attempt");
    assert_ne!(a[0].1, a[1].1, "each attempt has its own span");
    for (t, s, f) in &a {
        assert_eq!(t, trace_id, "the vendor's trace id");
        assert_ne!(s, vendor_span, "the attempt's own span, a child");
        assert_eq!(f, "01", "sampled flag kept");
    }
    let b = of(&second);
    assert_eq!(b[0].0, unsampled);
    assert_eq!(b[0].2, "00", "unsampled flag kept");
    for own in [of(&third), of(&fourth)] {
        assert_ne!(own[0].0, trace_id);
        assert_ne!(own[0].0, unsampled);
        assert_ne!(own[0].0, "0".repeat(32));
        assert_eq!(own[0].2, "01", "sampling_ratio 1 by default");
    }
    assert_ne!(of(&third)[0].0, of(&fourth)[0].0, "a trace per event");
}
