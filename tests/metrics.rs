//! `GET /metrics` over the real binary: counters and gauges after a run with failures match what
//! happened, and the example alert rules only use exported metric names.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Sink, alarm, observation};
use knutepunkt::telemetry::names;

const WAIT: Duration = Duration::from_secs(20);

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').expect("label");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().expect("value"),
        });
    }
    out
}

/// Sum of the samples named `name` whose labels include `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(gw: &Gateway) -> (String, Vec<Sample>) {
    let resp = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    let text = resp.text().await.expect("body");
    let samples = parse(&text);
    (text, samples)
}

/// Scrapes until `pred` holds (gauges come from a snapshot refreshed every 2 s).
async fn scrape_until(gw: &Gateway, what: &str, pred: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (text, samples) = scrape(gw).await;
        if pred(&samples) {
            return samples;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last scrape:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stored(gw: &Gateway, body: &serde_json::Value) -> String {
    let (status, resp) = gw.post(body).await;
    assert_eq!(status, 202, "{resp}");
    resp["id"].as_str().expect("id").to_string()
}

async fn wait_state(gw: &Gateway, id: &str, state: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
        if ev["deliveries"]
            .as_array()
            .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["state"] == state))
        {
            return;
        }
        assert!(Instant::now() < deadline, "event {id} never {state}: {ev}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_run_with_failures() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;

    // Before any traffic: the configured destination's gauges exist and are zero.
    scrape_until(&gw, "zero gauges for epj", |s| {
        s.iter()
            .any(|x| x.name == "knutepunkt_destination_pending" && x.labels["destination"] == "epj")
    })
    .await;

    // 1: 503 then 200 → one retry, one delivery.
    sink.script([Mode::status(503), Mode::Ok]);
    let a = stored(&gw, &observation("12345678901", "m-1")).await;
    wait_state(&gw, &a, "delivered").await;
    // 2: a permanent 400 → dead letter.
    sink.script([Mode::status(400)]);
    let b = stored(&gw, &observation("12345678901", "m-2")).await;
    wait_state(&gw, &b, "dead").await;
    // 3: an alarm, delivered at once.
    let c = stored(&gw, &alarm("12345678901", "dev-1", "a-1")).await;
    wait_state(&gw, &c, "delivered").await;
    // A duplicate, a malformed body and an unknown vendor.
    let (st, _) = gw.post(&observation("12345678901", "m-1")).await;
    assert_eq!(st, 200);
    let (st, _) = gw.post(&serde_json::json!({"resourceType": 7})).await;
    assert!((400..500).contains(&st), "{st}");
    let (st, _) = gw
        .post_as("no-such-vendor", &observation("12345678901", "x"), &[])
        .await;
    assert_eq!(st, 404);

    let s = scrape_until(&gw, "queue drained and dead letter counted", |s| {
        sum(
            s,
            "knutepunkt_destination_dead_letters",
            &[("destination", "epj")],
        ) == 1.0
            && sum(
                s,
                "knutepunkt_destination_pending",
                &[("destination", "epj")],
            ) == 0.0
    })
    .await;

    let ingest = "knutepunkt_ingest_requests_total";
    let fhir = ("vendor", "fhir");
    assert_eq!(
        sum(
            &s,
            ingest,
            &[fhir, ("outcome", "stored"), ("status_class", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &s,
            ingest,
            &[fhir, ("outcome", "duplicate"), ("status_class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &s,
            ingest,
            &[fhir, ("outcome", "rejected"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &s,
            ingest,
            &[
                ("vendor", "unknown"),
                ("outcome", "rejected"),
                ("status_class", "4xx")
            ]
        ),
        1.0,
        "unknown vendor names are never label values"
    );
    assert!(
        !s.iter()
            .any(|x| x.labels.values().any(|v| v == "no-such-vendor"))
    );

    let stored_total = "knutepunkt_events_stored_total";
    assert_eq!(sum(&s, stored_total, &[fhir]), 3.0);
    assert_eq!(sum(&s, stored_total, &[fhir, ("lane_class", "alarm")]), 1.0);

    let attempts = "knutepunkt_delivery_attempts_total";
    let epj = ("destination", "epj");
    assert_eq!(sum(&s, attempts, &[epj, ("outcome", "delivered")]), 2.0);
    assert_eq!(sum(&s, attempts, &[epj, ("outcome", "retry")]), 1.0);
    assert_eq!(sum(&s, attempts, &[epj, ("outcome", "dead_letter")]), 1.0);
    assert_eq!(
        sum(
            &s,
            attempts,
            &[epj, ("lane_class", "alarm"), ("outcome", "delivered")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &s,
            "knutepunkt_delivery_dead_letters_total",
            &[epj, ("reason", "permanent")]
        ),
        1.0
    );
    assert_eq!(
        sum(&s, "knutepunkt_delivery_duration_seconds_count", &[epj]),
        4.0
    );
    assert_eq!(
        sum(&s, "knutepunkt_ingest_duration_seconds_count", &[]),
        6.0
    );
    assert_eq!(
        sum(
            &s,
            "knutepunkt_alarm_delivery_latency_seconds_count",
            &[epj]
        ),
        1.0
    );

    // Gauges from the journal snapshot: drained queue, one dead letter held.
    assert_eq!(sum(&s, "knutepunkt_destination_pending", &[epj]), 0.0);
    assert_eq!(sum(&s, "knutepunkt_destination_lanes", &[epj]), 0.0);
    assert_eq!(
        sum(
            &s,
            "knutepunkt_destination_oldest_pending_age_seconds",
            &[epj]
        ),
        0.0
    );
    assert_eq!(sum(&s, "knutepunkt_destination_dead_letters", &[epj]), 1.0);
    assert!(sum(&s, "knutepunkt_vendor_last_accepted_seconds", &[fhir]) > 1.7e9);
    assert!(sum(&s, "knutepunkt_journal_snapshot_age_seconds", &[]) < 10.0);

    // Replaying the dead letter: the held count goes back to 0, a delivery is counted.
    let (st, _) = gw
        .post_admin("/v1/admin/dead-letters/replay?destination=epj")
        .await;
    assert_eq!(st, 200);
    let s = scrape_until(&gw, "replayed dead letter delivered", |s| {
        sum(s, "knutepunkt_destination_dead_letters", &[epj]) == 0.0
            && sum(s, "knutepunkt_destination_pending", &[epj]) == 0.0
            && sum(s, attempts, &[epj, ("outcome", "delivered")]) == 3.0
    })
    .await;
    assert_eq!(
        sum(&s, "knutepunkt_delivery_dead_letters_total", &[epj]),
        1.0
    );

    // Every exported knutepunkt metric is in the documented table, and vice versa.
    let (text, _) = scrape(&gw).await;
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let table: BTreeSet<&str> = names::ALL.iter().map(|m| m.prom).collect();
    assert_eq!(
        exported, table,
        "exported metric families differ from telemetry::names"
    );
    let doc = std::fs::read_to_string(common::repo_path("docs/operations.md")).expect("docs");
    for m in names::ALL {
        assert!(
            doc.contains(m.prom),
            "docs/operations.md does not document {}",
            m.prom
        );
    }
}

/// Metric names used by the example alert rules.
fn alert_metric_names() -> BTreeSet<String> {
    rule_file_metric_names("deploy/prometheus/alerts.yaml")
}

/// Metric names used by the alert rules of one file (every rule must have a name and an expr).
fn rule_file_metric_names(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(common::repo_path(path)).expect(path);
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("rules are YAML");
    let mut out = BTreeSet::new();
    let groups = docs[0]["groups"].as_vec().expect("groups");
    for g in groups {
        for rule in g["rules"].as_vec().expect("rules") {
            assert!(
                rule["alert"].as_str().is_some(),
                "rule without a name: {rule:?}"
            );
            let expr = rule["expr"].as_str().expect("expr");
            let mut word = String::new();
            for ch in expr.chars().chain(std::iter::once(' ')) {
                if ch.is_ascii_alphanumeric() || ch == '_' {
                    word.push(ch);
                } else {
                    if word.starts_with("knutepunkt_") {
                        out.insert(word.clone());
                    }
                    word.clear();
                }
            }
        }
    }
    out
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    let used = alert_metric_names();
    assert!(used.len() >= 6, "{used:?}");
    for n in &used {
        let known = names::ALL.iter().any(|m| {
            m.prom == n
                || (m.kind == names::Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suf| format!("{}{suf}", m.prom) == *n))
        });
        assert!(
            known,
            "alerts.yaml uses {n}, which knutepunkt does not export"
        );
    }
}

/// Every rule file in deploy/prometheus references only metrics from telemetry::names. The
/// escalation counter is declared by the escalation feature; until names.rs declares it, its
/// rule file is checked for everything else.
#[test]
fn every_rule_file_uses_declared_metrics() {
    let names_rs =
        std::fs::read_to_string(common::repo_path("src/telemetry/names.rs")).expect("names.rs");
    let dir = common::repo_path("deploy/prometheus");
    let mut files = 0;
    let mut alerts = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/prometheus") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let rel = format!(
            "deploy/prometheus/{}",
            path.file_name().and_then(|n| n.to_str()).expect("name")
        );
        let text = std::fs::read_to_string(&path).expect("read");
        let doc = &yaml_rust2::YamlLoader::load_from_str(&text).expect("YAML")[0];
        for g in doc["groups"].as_vec().expect("groups") {
            for r in g["rules"].as_vec().expect("rules") {
                alerts.insert(r["alert"].as_str().expect("alert").to_string());
            }
        }
        for n in rule_file_metric_names(&rel) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(&n);
            let declared = names::ALL.iter().any(|m| m.prom == n || m.prom == base);
            let pending = n == "knutepunkt_alarm_escalations_total" && !names_rs.contains(&n);
            assert!(
                declared || pending,
                "{rel} uses {n}, which telemetry::names does not declare"
            );
        }
    }
    assert!(files >= 2, "alerts.yaml and alerts-escalation.yaml");
    for a in [
        "KnutepunktAlarmDeliveryOverdue",
        "KnutepunktAlarmEscalated",
        "KnutepunktDestinationFailing",
        "KnutepunktVendorSilent",
        "KnutepunktDeviceHeartbeatStopped",
        "KnutepunktDeadLetters",
    ] {
        assert!(alerts.contains(a), "no example rule {a}: {alerts:?}");
    }
}
