//! Time-limited device deactivation over the real binary: only bounded deactivations are
//! accepted; alarms from a deactivated device are still delivered (marked, audited); a reminder
//! is raised before it ends; it ends by itself, or early by DELETE.
//! Runs on either backend (`KNUTEPUNKT_TEST_STORAGE=postgres`).

mod common;

use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Sink, metric_value, repo_path, scaip_alarm, storage_section};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

async fn start(sink: &Sink) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Dest::new("rc", &sink.url);
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n\
         [deactivation]\nmax_s = 3600\nreminder_lead_s = 3\n\
         [[destination]]\nname = \"rc\"\nurl = {:?}\n{}\n\
         [[route]]\nname = \"all\"\ndestinations = [\"rc\"]\n{}",
        repo_path("mappings").display().to_string(),
        d.url,
        d.extra,
        storage_section(dir.path()).await
    );
    Gateway::start_with_config(dir, &cfg).await
}

async fn send(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", gw.base));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

async fn wait_metric(gw: &Gateway, name: &str, label: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric_value(gw, name, label).await;
        if v == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} = {v:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn deactivated_tag(body: &Value) -> bool {
    body["meta"]["tag"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["code"] == "deactivated"))
}

#[tokio::test]
async fn only_bounded_deactivations_are_accepted() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = start(&sink).await;
    let path = "/v1/admin/devices/scaip/4711100/deactivation";
    let post = reqwest::Method::POST;
    let later = now_ms() + 60_000;
    let cases = [
        (json!({ "reason": "service", "by": "op" }), 400, "until"),
        (
            json!({ "until": now_ms() + 7_200_000, "reason": "service", "by": "op" }),
            400,
            "until",
        ),
        (
            json!({ "until": now_ms() - 1000, "reason": "service", "by": "op" }),
            400,
            "until",
        ),
        (json!({ "until": later, "by": "op" }), 400, "reason"),
        (json!({ "until": later, "reason": "service" }), 400, "by"),
        (
            json!({ "until": "not a time", "reason": "service", "by": "op" }),
            400,
            "until",
        ),
    ];
    for (body, status, field) in cases {
        let (s, b) = send(&gw, post.clone(), path, Some(&body)).await;
        assert_eq!(s, status, "{body} -> {b}");
        assert!(
            b.to_string().contains(field),
            "{body}: the error names {field}: {b}"
        );
    }
    let (s, _) = send(
        &gw,
        post.clone(),
        "/v1/admin/devices/nosuchvendor/x/deactivation",
        Some(&json!({ "until": later, "reason": "r", "by": "op" })),
    )
    .await;
    assert_eq!(s, 404);

    let (s, d) = send(
        &gw,
        post.clone(),
        path,
        Some(&json!({ "until": later, "reason": "battery change", "by": "op-1" })),
    )
    .await;
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["active"], true);
    assert_eq!(d["created_by"], "op-1");
    let (s, b) = send(
        &gw,
        post.clone(),
        path,
        Some(&json!({ "until": later, "reason": "again", "by": "op-2" })),
    )
    .await;
    assert_eq!(s, 409, "overlapping deactivation: {b}");

    // Ended early by DELETE; a second DELETE finds none.
    let (s, b) = send(
        &gw,
        reqwest::Method::DELETE,
        &format!("{path}?by=op-3"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ended_by"], "op-3");
    assert_eq!(b["active"], false);
    let (s, _) = send(
        &gw,
        reqwest::Method::DELETE,
        &format!("{path}?by=op-3"),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, l) = gw.get("/v1/admin/deactivations?active=true").await;
    assert_eq!(l["deactivations"], json!([]), "{l}");
    let (_, l) = gw.get("/v1/admin/devices/scaip/4711100/deactivation").await;
    assert_eq!(l["deactivations"].as_array().map(Vec::len), Some(1), "{l}");
}

#[tokio::test]
async fn alarms_from_a_deactivated_device_are_delivered_marked_and_it_expires_with_a_reminder() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = start(&sink).await;
    // Ends in 5 s; the reminder lead is 3 s.
    let until = now_ms() + 5_000;
    let (s, d) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/admin/devices/scaip/4711200/deactivation",
        Some(&json!({ "until": until, "reason": "door sensor replaced", "by": "op-1" })),
    )
    .await;
    assert_eq!(s, 201, "{d}");
    wait_metric(&gw, "knutepunkt_device_deactivations_active", "", 1.0).await;

    // The alarm is stored, delivered (not suppressed) and marked; other devices are not marked.
    let id = scaip_alarm(&gw, "4711200", "D1").await;
    let other = scaip_alarm(&gw, "4711201", "D2").await;
    sink.wait_for(WAIT, "both alarms delivered", |r| {
        r.iter().any(|x| x.idempotency_key == id) && r.iter().any(|x| x.idempotency_key == other)
    })
    .await;
    let got = sink.received();
    let mine = got.iter().find(|x| x.idempotency_key == id).expect("alarm");
    assert!(deactivated_tag(&mine.body), "marked: {}", mine.body["meta"]);
    let theirs = got
        .iter()
        .find(|x| x.idempotency_key == other)
        .expect("other");
    assert!(
        !deactivated_tag(&theirs.body),
        "not marked: {}",
        theirs.body["meta"]
    );
    let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
    let kinds: Vec<&str> = ev["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"during_deactivation"), "{kinds:?}");
    assert!(kinds.contains(&"delivered"), "{kinds:?}");

    // The reminder comes before the end, and shows in the console.
    wait_metric(
        &gw,
        "knutepunkt_device_deactivation_reminders_total",
        "kind=\"expiring\"",
        1.0,
    )
    .await;
    assert!(now_ms() < until, "reminder must come before the end");
    let html = reqwest::get(format!("{}/console", gw.base))
        .await
        .expect("console")
        .text()
        .await
        .expect("html");
    assert!(
        html.contains("ends soon") && html.contains("4711200"),
        "console shows the reminder"
    );

    // It ends by itself; alarms after that are not marked.
    wait_metric(
        &gw,
        "knutepunkt_device_deactivation_reminders_total",
        "kind=\"expired\"",
        1.0,
    )
    .await;
    assert!(now_ms() >= until);
    wait_metric(&gw, "knutepunkt_device_deactivations_active", "", 0.0).await;
    let after = scaip_alarm(&gw, "4711200", "D3").await;
    sink.wait_for(WAIT, "alarm after expiry", |r| {
        r.iter().any(|x| x.idempotency_key == after)
    })
    .await;
    let got = sink.received();
    let later = got
        .iter()
        .find(|x| x.idempotency_key == after)
        .expect("after");
    assert!(!deactivated_tag(&later.body));
}
