//! Escalation of alarm deliveries that miss their destination's deadline, against the real
//! binary over loopback: fallback delivery, notification to the escalation endpoint, metrics,
//! audit trail, acknowledgement, survival across a restart, and what must not escalate.
//! Runs on PostgreSQL too (`KNUTEPUNKT_TEST_STORAGE=postgres`).

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Mode, Sink, alarm, metric_value, observation, repo_path, storage_section};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

/// A response centre `rc` with `deadline_s = 2` and fallback `backup`; alarms and measurements
/// are routed to `rc` only. `escalation_url` receives notifications.
async fn start(rc: &Sink, backup: &Sink, escalation_url: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = storage_section(dir.path()).await;
    let cfg = format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace_s = 1
[mappings]
dir = {mappings:?}
[escalation]
url = {escalation_url:?}
timeout_ms = 1000
max_attempts = 3

[[destination]]
name = "rc"
url = {rc:?}
timeout_ms = 2500
retry.base_delay_ms = 50
retry.max_delay_ms = 400
deadline_s = 2
fallback = "backup"

[[destination]]
name = "backup"
url = {backup:?}
timeout_ms = 2000
retry.base_delay_ms = 50
retry.max_delay_ms = 400

[[route]]
name = "alarms"
categories = ["alarm"]
destinations = ["rc"]

[[route]]
name = "measurements"
categories = ["measurement"]
destinations = ["rc"]

{storage}"#,
        mappings = repo_path("mappings").display().to_string(),
        rc = rc.url,
        backup = backup.url,
    );
    Gateway::start_with_config(dir, &cfg).await
}

async fn ingest(gw: &Gateway, body: &Value) -> String {
    let (status, resp) = gw.post(body).await;
    assert_eq!(status, 202, "ingest refused: {resp}");
    resp["id"].as_str().expect("id").to_string()
}

async fn post_json(gw: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", gw.base))
        .json(body)
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `GET path` until `pred` holds.
async fn wait_admin(gw: &Gateway, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = gw.get(path).await;
        if status == 200 && pred(&body) {
            return body;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last {path} -> {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn audit_kinds(ev: &Value) -> Vec<(String, String)> {
    ev["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap_or_default().to_string(),
                a["destination"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn hanging_response_centre_escalates_to_fallback_within_deadline_plus_one_second() {
    let rc = Sink::start(Mode::Hang).await;
    let backup = Sink::start(Mode::Ok).await;
    let hook = Sink::start(Mode::Ok).await;
    let gw = start(&rc, &backup, &hook.url).await;

    let t0 = Instant::now();
    let alarm_id = ingest(&gw, &alarm("13097248022", "dev-1", "esc-a1")).await;
    let measurement_id = ingest(&gw, &observation("13097248022", "esc-m1")).await;

    backup
        .wait_for(Duration::from_secs(3), "alarm at the fallback", |r| {
            r.iter().any(|x| x.idempotency_key == alarm_id)
        })
        .await;
    let got = backup
        .received()
        .into_iter()
        .find(|x| x.idempotency_key == alarm_id)
        .expect("fallback request");
    let after = got.at.duration_since(t0);
    assert!(
        after >= Duration::from_millis(1900) && after <= Duration::from_secs(3),
        "fallback got the alarm {after:?} after ingest; want between the 2 s deadline and 3 s"
    );
    assert_eq!(
        got.body["id"], alarm_id,
        "the fallback receives the event's Bundle"
    );

    // The escalation endpoint is told, with ids only.
    hook.wait_for(WAIT, "escalation notification", |r| {
        r.iter()
            .any(|x| x.body["about"][0]["identifier"]["value"] == alarm_id.as_str())
    })
    .await;
    let note = hook.received()[0].body.clone();
    assert_eq!(note["resourceType"], "Communication");
    assert_eq!(note["priority"], "stat");
    assert!(
        !note.to_string().contains("13097248022"),
        "notification must not carry the patient id: {note}"
    );

    // Audit trail: escalated at rc, delivered to backup; rc's own delivery keeps trying.
    let ev = wait_admin(
        &gw,
        &format!("/v1/admin/events/{alarm_id}"),
        "fallback delivered",
        |ev| {
            ev["deliveries"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["destination"] == "backup" && d["state"] == "delivered")
            })
        },
    )
    .await;
    let kinds = audit_kinds(&ev);
    assert!(
        kinds.contains(&("escalated".into(), "rc".into())),
        "no escalated audit record: {kinds:?}"
    );
    assert!(
        kinds.contains(&("delivered".into(), "backup".into())),
        "{kinds:?}"
    );
    let rc_delivery = ev["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .find(|d| d["destination"] == "rc")
        .expect("rc delivery")
        .clone();
    assert_eq!(
        rc_delivery["state"], "pending",
        "the original delivery is not cancelled"
    );

    // Metrics: the counter and the open gauge.
    let deadline = Instant::now() + WAIT;
    loop {
        let c = metric_value(
            &gw,
            "knutepunkt_alarm_escalations_total",
            "destination=\"rc\"",
        )
        .await;
        let open = metric_value(&gw, "knutepunkt_alarm_escalations_open", "").await;
        if c == Some(1.0) && open == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics: counter {c:?}, open {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = metric_value(
        &gw,
        "knutepunkt_alarm_escalation_notifications_total",
        "outcome=\"sent\"",
    )
    .await;
    assert_eq!(sent, Some(1.0));

    // The measurement to the same hanging destination does not escalate.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, list) = gw.get("/v1/admin/escalations").await;
    let rows = list["escalations"].as_array().expect("escalations").clone();
    assert_eq!(rows.len(), 1, "only the alarm escalates: {list}");
    assert_eq!(rows[0]["event_id"], alarm_id);
    assert_eq!(rows[0]["destination"], "rc");
    assert_eq!(rows[0]["fallback"], "backup");
    assert!(
        !backup
            .received()
            .iter()
            .any(|x| x.idempotency_key == measurement_id),
        "a measurement must not go to the fallback"
    );
    let (_, mev) = gw.get(&format!("/v1/admin/events/{measurement_id}")).await;
    assert!(!audit_kinds(&mev).iter().any(|(k, _)| k == "escalated"));

    // An operator acknowledges it (audited); a second acknowledgement conflicts.
    let id = rows[0]["id"].as_i64().expect("escalation id");
    let (status, body) = post_json(
        &gw,
        &format!("/v1/admin/escalations/{id}/acknowledge"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 400, "acknowledgement without `by`: {body}");
    let (status, body) = post_json(
        &gw,
        &format!("/v1/admin/escalations/{id}/acknowledge"),
        &json!({ "by": "operator-7", "note": "called the response centre" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acknowledged_by"], "operator-7");
    let (status, _) = post_json(
        &gw,
        &format!("/v1/admin/escalations/{id}/acknowledge"),
        &json!({ "by": "operator-8" }),
    )
    .await;
    assert_eq!(status, 409);
    let (_, list) = gw.get("/v1/admin/escalations").await;
    assert_eq!(list["open"], 0, "{list}");
    let (_, ev) = gw.get(&format!("/v1/admin/events/{alarm_id}")).await;
    assert!(
        audit_kinds(&ev)
            .iter()
            .any(|(k, _)| k == "escalation_acknowledged"),
        "{:?}",
        audit_kinds(&ev)
    );
    // The console overview shows escalations.
    let html = reqwest::get(format!("{}/console", gw.base))
        .await
        .expect("console")
        .text()
        .await
        .expect("html");
    assert!(
        html.contains("Escalations"),
        "console overview lacks escalations"
    );
}

#[tokio::test]
async fn alarm_delivered_in_time_does_not_escalate() {
    let rc = Sink::start(Mode::Delay(300)).await;
    let backup = Sink::start(Mode::Ok).await;
    let hook = Sink::start(Mode::Ok).await;
    let gw = start(&rc, &backup, &hook.url).await;
    let id = ingest(&gw, &alarm("13097248022", "dev-2", "esc-ok1")).await;
    rc.wait_for(WAIT, "alarm delivered", |r| {
        r.iter().any(|x| x.idempotency_key == id)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, list) = gw.get("/v1/admin/escalations?all=true").await;
    assert_eq!(list["escalations"], json!([]), "{list}");
    assert!(backup.received().is_empty());
    assert!(hook.received().is_empty());
    assert_eq!(
        metric_value(
            &gw,
            "knutepunkt_alarm_escalations_total",
            "destination=\"rc\""
        )
        .await,
        Some(0.0)
    );
}

/// The deadline check is driven from the journal: a gateway killed before the deadline
/// escalates the overdue alarm right after it starts again.
#[tokio::test]
async fn escalation_survives_a_restart() {
    let rc = Sink::start(Mode::Hang).await;
    let backup = Sink::start(Mode::Ok).await;
    let hook = Sink::start(Mode::Ok).await;
    let mut gw = start(&rc, &backup, &hook.url).await;
    let id = ingest(&gw, &alarm("13097248022", "dev-3", "esc-r1")).await;
    gw.kill();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(backup.received().is_empty());
    let t = Instant::now();
    gw.spawn();
    backup
        .wait_for(
            Duration::from_secs(3),
            "alarm at the fallback after restart",
            |r| r.iter().any(|x| x.idempotency_key == id),
        )
        .await;
    assert!(t.elapsed() < Duration::from_secs(3));
    let ev = wait_admin(
        &gw,
        &format!("/v1/admin/events/{id}"),
        "escalated once",
        |ev| {
            audit_kinds(ev)
                .iter()
                .filter(|(k, _)| k == "escalated")
                .count()
                == 1
        },
    )
    .await;
    // Exactly one fallback delivery row, however many scans ran.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, ev2) = gw.get(&format!("/v1/admin/events/{id}")).await;
    let backups = |ev: &Value| {
        ev["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .filter(|d| d["destination"] == "backup")
            .count()
    };
    assert_eq!(backups(&ev), 1);
    assert_eq!(backups(&ev2), 1);
}

/// A response centre that refuses the alarm (4xx → dead letter) will never take it: the alarm
/// escalates at once, without waiting for the deadline.
#[tokio::test]
async fn refused_alarm_escalates_without_waiting_for_the_deadline() {
    let rc = Sink::start(Mode::status(400)).await;
    let backup = Sink::start(Mode::Ok).await;
    let hook = Sink::start(Mode::Ok).await;
    let gw = start(&rc, &backup, &hook.url).await;
    let t0 = Instant::now();
    let id = ingest(&gw, &alarm("13097248022", "dev-4", "esc-d1")).await;
    backup
        .wait_for(
            Duration::from_millis(1800),
            "alarm at the fallback before the deadline",
            |r| r.iter().any(|x| x.idempotency_key == id),
        )
        .await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    let ev = wait_admin(&gw, &format!("/v1/admin/events/{id}"), "escalated", |ev| {
        audit_kinds(ev).iter().any(|(k, _)| k == "escalated")
    })
    .await;
    let detail = ev["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .find(|a| a["kind"] == "escalated")
        .and_then(|a| a["detail"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("dead-lettered"), "{detail}");
}
