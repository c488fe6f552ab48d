//! "No contact" alarms over the real binary: a device silent past its vendor's heartbeat
//! interval raises one alarm-category event per silence period, routed like any alarm; not one
//! per scan, not again after a restart, again after a new heartbeat and silence; never for a
//! device that keeps beating or is deactivated.
//! Runs on either backend (`KNUTEPUNKT_TEST_STORAGE=postgres`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Dest, Gateway, Mode, Received, Sink, repo_path, storage_section};
use serde_json::{Value, json};

async fn start(sink: &Sink) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Dest::new("rc", &sink.url);
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n\
         [no_contact.heartbeat_s]\nscaip = 2\n\
         [[destination]]\nname = \"rc\"\nurl = {:?}\n{}\n\
         [[route]]\nname = \"alarms\"\ncategories = [\"alarm\"]\ndestinations = [\"rc\"]\n{}",
        repo_path("mappings").display().to_string(),
        d.url,
        d.extra,
        storage_section(dir.path()).await
    );
    Gateway::start_with_config(dir, &cfg).await
}

async fn heartbeat(gw: &Gateway, cid: &str, r: &str) {
    let xml = format!(
        "<mrq><ref>{r}</ref><mty>PI</mty><cid>{cid}</cid><dty>0002</dty><stc>0102</stc></mrq>"
    );
    let resp = common::post_scaip(gw, xml).await;
    assert_eq!(resp.status().as_u16(), 200);
}

/// Distinct no-contact events the sink received for `device`.
fn no_contact_events(got: &[Received], device: &str) -> HashSet<String> {
    got.iter()
        .filter(|r| {
            let issue = &r.body["entry"][0]["resource"];
            issue["resourceType"] == "DetectedIssue"
                && issue["code"]["coding"][0]["code"] == "1.20"
                && r.body["entry"][1]["resource"]["identifier"][0]["value"] == device
        })
        .map(|r| r.idempotency_key.clone())
        .collect()
}

#[tokio::test]
async fn silent_device_raises_one_no_contact_alarm_per_silence_period() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = start(&sink).await;
    heartbeat(&gw, "4711400", "H1").await;
    heartbeat(&gw, "4711401", "K1").await;
    heartbeat(&gw, "4711402", "Z1").await;
    let (s, d) = {
        let resp = reqwest::Client::new()
            .post(format!(
                "{}/v1/admin/devices/scaip/4711402/deactivation",
                gw.base
            ))
            .json(&json!({ "until": "2099-01-01T00:00:00Z", "reason": "x", "by": "op" }))
            .send()
            .await
            .expect("post");
        (
            resp.status().as_u16(),
            resp.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    assert_eq!(s, 400, "beyond max_s is refused: {d}");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/admin/devices/scaip/4711402/deactivation",
            gw.base
        ))
        .json(&json!({ "until": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64 + 3_600_000,
            "reason": "away for service", "by": "op" }))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 201);

    // 4711401 keeps beating; 4711400 goes silent.
    let beating = {
        let base = gw.base.clone();
        tokio::spawn(async move {
            for i in 0..16 {
                let xml = format!(
                    "<mrq><ref>K{i}x</ref><mty>PI</mty><cid>4711401</cid><dty>0002</dty><stc>0102</stc></mrq>"
                );
                let _ = reqwest::Client::new()
                    .post(format!("{base}/v1/vendors/scaip/events"))
                    .header("content-type", "application/scaip+xml")
                    .body(xml)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    sink.wait_for(Duration::from_secs(6), "a no-contact alarm", |r| {
        !no_contact_events(r, "4711400").is_empty()
    })
    .await;
    let first = no_contact_events(&sink.received(), "4711400");
    let id = first.iter().next().expect("one").clone();
    let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
    assert_eq!(ev["category"], "alarm", "{ev}");
    assert_eq!(ev["vendor"], "scaip");
    assert_eq!(ev["key"], "device:4711400");
    assert!(
        ev["audit"]
            .as_array()
            .expect("audit")
            .iter()
            .any(|a| a["kind"] == "routed"),
        "routed like an alarm: {ev}"
    );

    // Not once per scan: still one after several more scans.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(no_contact_events(&sink.received(), "4711400").len(), 1);
    beating.await.expect("beating");
    assert!(
        no_contact_events(&sink.received(), "4711401").is_empty(),
        "a beating device raises nothing"
    );
    assert!(
        no_contact_events(&sink.received(), "4711402").is_empty(),
        "a deactivated device is expected to be silent"
    );

    // Durable: a restart does not raise it again for the same silence.
    gw.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(no_contact_events(&sink.received(), "4711400").len(), 1);

    // A new heartbeat and a new silence: a second event.
    heartbeat(&gw, "4711400", "H2").await;
    sink.wait_for(Duration::from_secs(6), "a second no-contact alarm", |r| {
        no_contact_events(r, "4711400").len() == 2
    })
    .await;
    let text = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert!(
        text.lines()
            .any(|l| l.starts_with("knutepunkt_device_no_contact_events_total")),
        "{text}"
    );
}
