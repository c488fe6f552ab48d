//! Device registry over the real binary: assignments (CRUD, overlap 409), device-only payloads
//! resolved to the assigned patient at the event's time, the reject (422) and quarantine
//! (held, listed, replayed) modes, and heartbeats recorded as device liveness.
//! Runs on either backend (`KNUTEPUNKT_TEST_STORAGE=postgres`).

mod common;

use std::time::Duration;

use common::{Dest, Gateway, Mode, Sink, repo_path, storage_section};
use serde_json::{Value, json};

/// Valid fødselsnummer (not synthetic).
const P1: &str = "13097248022";

/// A second valid number, built with the gateway's own check-digit rule.
fn p2() -> String {
    (100..999)
        .find_map(|n| {
            let first9 = format!("010190{n}");
            let d: Vec<u32> = first9.bytes().map(|b| u32::from(b - b'0')).collect();
            let (k1, k2) = knutepunkt::normalise::identity::check_digits(&d)?;
            Some(format!("{first9}{k1}{k2}"))
        })
        .expect("a valid number")
}

/// Mapping dir with the shipped SCAIP mapping (`missing_patient = "device"`) plus a reject and a
/// quarantine variant of it, as vendors `scaipr` and `scaipq`.
fn mappings_dir(root: &std::path::Path) -> std::path::PathBuf {
    let dir = root.join("mappings");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let scaip = std::fs::read_to_string(repo_path("mappings/scaip.toml")).expect("scaip.toml");
    std::fs::write(dir.join("scaip.toml"), &scaip).expect("write");
    for (vendor, mode) in [("scaipr", "reject"), ("scaipq", "quarantine")] {
        let text = scaip
            .replace("vendor = \"scaip\"", &format!("vendor = \"{vendor}\""))
            .replace(
                "missing_patient = \"device\"",
                &format!("missing_patient = \"{mode}\""),
            );
        assert!(text.contains(&format!("missing_patient = \"{mode}\"")));
        std::fs::write(dir.join(format!("{vendor}.toml")), text).expect("write");
    }
    dir
}

async fn start(sink: Option<&Sink>) -> Gateway {
    start_with(sink, None).await
}

async fn start_with(sink: Option<&Sink>, storage: Option<String>) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let maps = mappings_dir(dir.path());
    let mut cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n",
        maps.display().to_string()
    );
    if let Some(s) = sink {
        let d = Dest::new("epj", &s.url);
        cfg.push_str(&format!(
            "[[destination]]\nname = \"epj\"\nurl = {:?}\n{}\n[[route]]\nname = \"all\"\ndestinations = [\"epj\"]\n",
            d.url, d.extra
        ));
    }
    match storage {
        Some(s) => cfg.push_str(&s),
        None => cfg.push_str(&storage_section(dir.path()).await),
    }
    Gateway::start_with_config(dir, &cfg).await
}

async fn post_json(gw: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", gw.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post_scaip(gw: &Gateway, vendor: &str, xml: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/vendors/{vendor}/events", gw.base))
        .header("content-type", "application/scaip+xml")
        .body(xml.to_string())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A SCAIP manual alarm from controller `cid`; `tim` is the device's event time, if any.
fn alarm_xml(cid: &str, reference: &str, tim: Option<&str>) -> String {
    let lge = tim
        .map(|t| format!("<lge><tim>{t}</tim></lge>"))
        .unwrap_or_default();
    format!(
        "<mrq><ref>{reference}</ref><mty>ME</mty><cid>{cid}</cid><dty>0004</dty><stc>0010</stc>{lge}</mrq>"
    )
}

async fn assign(
    gw: &Gateway,
    vendor: &str,
    device: &str,
    patient: &str,
    from: &str,
    to: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({ "patient_id": patient, "tenant": "5001", "valid_from": from });
    if let Some(t) = to {
        body["valid_to"] = json!(t);
    }
    post_json(
        gw,
        &format!("/v1/admin/devices/{vendor}/{device}/assignments"),
        &body,
    )
    .await
}

fn diagnostics(b: &Value) -> String {
    b["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn audit_kinds(ev: &Value) -> Vec<String> {
    ev["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The patient identifier values in a delivered or stored FHIR Bundle.
fn patients(fhir: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for e in fhir["entry"].as_array().into_iter().flatten() {
        let r = &e["resource"];
        for k in ["patient", "subject"] {
            if let Some(v) = r[k]["identifier"]["value"].as_str()
                && !out.iter().any(|x| x == v)
            {
                out.push(v.to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn assignments_crud_and_overlap_conflict() {
    let gw = start(None).await;
    let p2 = p2();

    let (s, a1) = assign(&gw, "scaip", "D1", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{a1}");
    let a1_id = a1["id"].as_i64().expect("id");
    assert_eq!(a1["patient_id"], P1);
    assert_eq!(a1["tenant"], "5001");
    assert_eq!(a1["valid_from"], "2025-01-01T00:00:00Z");
    assert_eq!(a1["valid_to"], Value::Null);
    assert_eq!(a1["active"], true);

    // A device has at most one patient at a time.
    let (s, b) = assign(&gw, "scaip", "D1", &p2, "2025-06-01T00:00:00Z", None).await;
    assert_eq!(s, 409, "{b}");
    assert!(
        diagnostics(&b).contains("already assigned"),
        "{}",
        diagnostics(&b)
    );
    assert!(!diagnostics(&b).contains(P1), "never names the patient");

    // Validation: national id rules, tenant, period, vendor.
    let (s, b) = assign(
        &gw,
        "scaip",
        "D1",
        "13097248023",
        "2030-01-01T00:00:00Z",
        None,
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert!(!b.to_string().contains("13097248023"), "masked: {b}");
    let (s, b) = post_json(
        &gw,
        "/v1/admin/devices/scaip/D9/assignments",
        &json!({ "patient_id": P1, "tenant": "oslo" }),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = assign(
        &gw,
        "scaip",
        "D9",
        P1,
        "2025-02-01T00:00:00Z",
        Some("2025-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, _) = assign(&gw, "nobody", "D9", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 404);

    // End D1's assignment; the next one may start where it ends (periods are half-open).
    let (s, ended) = post_json(
        &gw,
        &format!("/v1/admin/devices/scaip/D1/assignments/{a1_id}/end"),
        &json!({ "at": "2025-06-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(s, 200, "{ended}");
    assert_eq!(ended["valid_to"], "2025-06-01T00:00:00Z");
    assert_eq!(ended["active"], false);
    let (s, a2) = assign(&gw, "scaip", "D1", &p2, "2025-06-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{a2}");
    let (s, b) = assign(
        &gw,
        "scaip",
        "D1",
        P1,
        "2025-05-01T00:00:00Z",
        Some("2025-07-01T00:00:00Z"),
    )
    .await;
    assert_eq!(s, 409, "{b}");
    // Ending again, or an unknown assignment.
    let (s, b) = post_json(
        &gw,
        &format!("/v1/admin/devices/scaip/D1/assignments/{a1_id}/end"),
        &json!({ "at": "2025-07-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(s, 409, "{b}");
    let (s, _) = post_json(
        &gw,
        "/v1/admin/devices/scaip/D1/assignments/999999/end",
        &json!({}),
    )
    .await;
    assert_eq!(s, 404);
    // Another device of the same patient is independent.
    let (s, b) = assign(&gw, "scaip", "D2", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{b}");

    // Listing and filters.
    let (_, l) = gw.get("/v1/admin/devices?vendor=scaip&device=D1").await;
    assert_eq!(l["assignments"].as_array().expect("list").len(), 2, "{l}");
    let (_, l) = gw.get(&format!("/v1/admin/devices?patient={p2}")).await;
    assert_eq!(l["assignments"].as_array().expect("list").len(), 1, "{l}");
    let (_, l) = gw.get(&format!("/v1/admin/devices?patient={P1}")).await;
    assert_eq!(l["assignments"].as_array().expect("list").len(), 2, "{l}");
    let (_, l) = gw
        .get("/v1/admin/devices?device=D1&active_at=2025-03-01T00:00:00Z")
        .await;
    let rows = l["assignments"].as_array().expect("list");
    assert_eq!(rows.len(), 1, "{l}");
    assert_eq!(rows[0]["id"], a1_id);
    let (_, l) = gw.get("/v1/admin/devices?tenant=0301").await;
    assert_eq!(l["assignments"].as_array().expect("list").len(), 0, "{l}");
    let (s, l) = gw.get("/v1/admin/devices/scaip/D1/assignments").await;
    assert_eq!(s, 200);
    assert_eq!(l["assignments"].as_array().expect("list").len(), 2, "{l}");
}

#[tokio::test]
async fn device_only_event_is_resolved_to_the_assigned_patient() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = start(Some(&sink)).await;
    let (s, a) = assign(&gw, "scaip", "4711002", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{a}");

    // No device time: resolved at the received time.
    let (s, b) = post_scaip(&gw, "scaip", &alarm_xml("4711002", "R1", None)).await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().expect("id").to_string();
    // An unassigned device keeps today's behaviour in "device" mode: keyed by device.
    let (s, b) = post_scaip(&gw, "scaip", &alarm_xml("4711999", "R2", None)).await;
    assert_eq!(s, 202, "{b}");
    let other = b["id"].as_str().expect("id").to_string();

    sink.wait_for(Duration::from_secs(10), "two deliveries", |r| r.len() >= 2)
        .await;
    let got = sink.received();
    let mine = got
        .iter()
        .find(|r| r.idempotency_key == id)
        .expect("delivered");
    assert_eq!(patients(&mine.body), vec![P1.to_string()], "{}", mine.body);
    assert!(
        mine.body
            .to_string()
            .contains("urn:oid:2.16.578.1.12.4.1.4.1"),
        "fødselsnummer OID"
    );

    let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
    assert_eq!(ev["key"], format!("patient:{P1}"), "{ev}");
    assert_eq!(ev["tenant"], "5001");
    let (_, ev) = gw.get(&format!("/v1/admin/events/{other}")).await;
    assert_eq!(ev["key"], "device:4711999", "{ev}");
    assert!(patients(&ev["fhir"]).is_empty());

    // The device's own event time decides: before the assignment began, it is not covered.
    let (s, b) = post_scaip(
        &gw,
        "scaip",
        &alarm_xml("4711002", "R3", Some("2024-12-31T23:30:00+01")),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let (_, ev) = gw
        .get(&format!(
            "/v1/admin/events/{}",
            b["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(ev["key"], "device:4711002", "{ev}");
}

#[tokio::test]
async fn uncovered_device_is_rejected_in_reject_mode() {
    let gw = start(None).await;
    // Assigned, but only from tomorrow.
    let tomorrow =
        knutepunkt::journal::registry_text::instant(knutepunkt::clock::now_ms() + 86_400_000);
    let (s, b) = assign(&gw, "scaipr", "4711002", P1, &tomorrow, None).await;
    assert_eq!(s, 201, "{b}");

    let (s, b) = post_scaip(&gw, "scaipr", &alarm_xml("4711002", "R1", None)).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["resourceType"], "OperationOutcome");
    assert_eq!(b["issue"][0]["expression"][0], "cid", "{b}");
    let d = diagnostics(&b);
    assert!(
        d.contains("no device assignment covers device 4711002"),
        "{d}"
    );
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["events"], 0, "a refusal stores nothing: {stats}");

    // Covered: accepted and keyed by the patient.
    let (s, b) = assign(&gw, "scaipr", "4711003", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = post_scaip(&gw, "scaipr", &alarm_xml("4711003", "R2", None)).await;
    assert_eq!(s, 202, "{b}");
}

#[tokio::test]
async fn uncovered_device_is_quarantined_then_replayed() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = start(Some(&sink)).await;
    let p2 = p2();
    // The device is assigned, but only from 2025; the event happened on New Year's Eve 2024.
    let (s, b) = assign(
        &gw,
        "scaipq",
        "4711002",
        P1,
        "2025-01-01T00:00:00+01:00",
        None,
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let xml = alarm_xml("4711002", "Q1", Some("2024-12-31T23:30:00+01"));
    let (s, b) = post_scaip(&gw, "scaipq", &xml).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "quarantined", "{b}");
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no device assignment covers device 4711002")),
        "{b}"
    );
    let id = b["id"].as_str().expect("id").to_string();

    // A resend is recognised, not quarantined twice.
    let (s, b) = post_scaip(&gw, "scaipq", &xml).await;
    assert_eq!((s, b["id"].as_str()), (200, Some(id.as_str())), "{b}");

    // Visible: stats, quarantine list, event audit; nothing delivered.
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["quarantined"], 1, "{stats}");
    assert_eq!(stats["events"], 1, "{stats}");
    assert_eq!(stats["unrouted"], 0, "{stats}");
    let (s, q) = gw.get("/v1/admin/quarantine").await;
    assert_eq!(s, 200);
    let held = q["quarantined"].as_array().expect("list");
    assert_eq!(held.len(), 1, "{q}");
    assert_eq!(held[0]["event_id"], id.as_str());
    assert_eq!(held[0]["vendor"], "scaipq");
    assert_eq!(held[0]["device_id"], "4711002");
    assert!(held[0]["reason"].as_str().is_some());
    let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
    assert!(
        audit_kinds(&ev).contains(&"quarantined".to_string()),
        "{ev}"
    );
    assert_eq!(ev["deliveries"].as_array().map(Vec::len), Some(0), "{ev}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.received().is_empty(), "a held event is never routed");

    // Replay before an assignment covers the event time: still held, 409 saying why.
    let (s, b) = gw
        .post_admin(&format!("/v1/admin/quarantine/{id}/replay"))
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(diagnostics(&b).contains("add an assignment"), "{b}");

    // The operator records the earlier period (to another patient), then replays.
    let (s, b) = assign(
        &gw,
        "scaipq",
        "4711002",
        &p2,
        "2024-12-01T00:00:00+01:00",
        Some("2025-01-01T00:00:00+01:00"),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = gw
        .post_admin(&format!("/v1/admin/quarantine/{id}/replay"))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "released");
    assert_eq!(b["destinations"], json!(["epj"]));

    sink.wait_for(Duration::from_secs(10), "the released event", |r| {
        r.iter().any(|x| x.idempotency_key == id)
    })
    .await;
    let got = sink.received();
    let delivered = got.iter().find(|r| r.idempotency_key == id).expect("got");
    assert_eq!(patients(&delivered.body), vec![p2.clone()]);

    // The sink has the request before the gateway has recorded the 2xx: wait for that record.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let (_, ev) = gw.get(&format!("/v1/admin/events/{id}")).await;
        if audit_kinds(&ev).iter().any(|k| k == "delivered") || std::time::Instant::now() > deadline
        {
            break ev;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ev["key"], format!("patient:{p2}"), "{ev}");
    let kinds = audit_kinds(&ev);
    for k in ["quarantined", "released", "routed", "delivered"] {
        assert!(kinds.contains(&k.to_string()), "{k} in {kinds:?}");
    }
    assert!(
        !ev["audit"].to_string().contains(&p2),
        "the audit trail never names the patient"
    );
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["quarantined"], 0, "{stats}");
    let (_, q) = gw.get("/v1/admin/quarantine").await;
    assert_eq!(q["quarantined"].as_array().map(Vec::len), Some(0), "{q}");
    let (_, q) = gw.get("/v1/admin/quarantine?all=true").await;
    assert!(q["quarantined"][0]["released_at_ms"].is_i64(), "{q}");

    // Released once only.
    let (s, _) = gw
        .post_admin(&format!("/v1/admin/quarantine/{id}/replay"))
        .await;
    assert_eq!(s, 409);
    let (s, _) = gw
        .post_admin("/v1/admin/quarantine/no-such-event/replay")
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn heartbeats_update_device_liveness() {
    let gw = start(None).await;
    let hb = |r: &str| {
        format!(
            "<mrq><ref>{r}</ref><mty>PI</mty><cid>4711002</cid><dty>0002</dty><stc>0102</stc></mrq>"
        )
    };
    let (s, b) = post_scaip(&gw, "scaip", &hb("HB1")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "heartbeat");

    let (s, l) = gw.get("/v1/admin/devices/liveness?vendor=scaip").await;
    assert_eq!(s, 200, "{l}");
    let devices = l["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{l}");
    let d = &devices[0];
    assert_eq!(d["device_id"], "4711002");
    assert_eq!(d["last_kind"], "heartbeat");
    assert_eq!(d["beats"], 1);
    assert_eq!(d["tenant"], "5001");
    let age = d["last_seen_age_ms"].as_i64().expect("age");
    assert!((0..60_000).contains(&age), "{d}");
    let first_seen = d["last_seen_at_ms"].as_i64().expect("seen");

    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, _) = post_scaip(&gw, "scaip", &hb("HB2")).await;
    assert_eq!(s, 200);
    let (_, l) = gw
        .get("/v1/admin/devices/liveness?vendor=scaip&device=4711002")
        .await;
    let d = &l["devices"][0];
    assert_eq!(d["beats"], 2, "{l}");
    assert!(d["last_seen_at_ms"].as_i64().expect("seen") >= first_seen);
    let (_, l) = gw.get("/v1/admin/devices/liveness?vendor=other").await;
    assert_eq!(l["devices"].as_array().map(Vec::len), Some(0));

    // Heartbeats are not clinical events.
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(stats["events"], 0, "{stats}");
}

/// A PostgreSQL database left at schema version 1 by an earlier binary gets only the version-2
/// step (device registry, liveness, quarantine) and keeps working. (SQLite: unit test
/// `journal::sqlite::tests::version_1_journal_is_migrated_to_version_2`.)
#[tokio::test]
async fn postgres_version_1_database_is_migrated() {
    if !common::on_postgres() {
        return;
    }
    let url = common::fresh_database().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(include_str!("../src/journal/postgres/schema.sql"))
        .await
        .expect("v1 schema");
    client
        .batch_execute(
            "CREATE TABLE knutepunkt_schema (version INTEGER NOT NULL);
             INSERT INTO knutepunkt_schema (version) VALUES (1);",
        )
        .await
        .expect("v1 marker");
    let storage = format!("[storage]\nkind = \"postgres\"\nurl = {url:?}\n");
    let gw = start_with(None, Some(storage)).await;
    let (s, b) = assign(&gw, "scaip", "D1", P1, "2025-01-01T00:00:00Z", None).await;
    assert_eq!(s, 201, "{b}");
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM knutepunkt_schema ORDER BY version",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7, 8]);
}
