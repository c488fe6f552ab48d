//! Audit reads and the FHIR AuditEvent export against the real binary: records of one event's
//! path, patient identity masked for an unnamed caller, every read audited as `audit-read`
//! (who and filter, no identity number), the chain still verifies, and the exported AuditEvents
//! pass the FHIR R4 validator (conformance-tests/validate-resources.mjs) when it is installed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Dest, Gateway, Mode, Sink, observation, repo_path};
use serde_json::Value;

const PATIENT: &str = "13097248022";

async fn get_text(gw: &Gateway, path: &str) -> (u16, String, String) {
    let resp = reqwest::get(format!("{}{path}", gw.base))
        .await
        .expect("get");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_search_and_fhir_export_are_masked_audited_and_valid() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let (status, body) = gw.post(&observation(PATIENT, "audit-1")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    sink.wait_for(Duration::from_secs(10), "delivery", |r| !r.is_empty())
        .await;
    // The delivered step is written after the sink answered: wait for it in the trail.
    let mut records = Vec::new();
    for _ in 0..100 {
        let (s, v) = gw.get(&format!("/v1/admin/audit?event_id={id}")).await;
        assert_eq!(s, 200, "{v}");
        records = v["records"].as_array().expect("records").clone();
        if records.iter().any(|r| r["kind"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    for k in ["received", "stored", "routed", "attempt", "delivered"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    for r in &records {
        assert_eq!(r["event_id"], id.as_str());
        assert_eq!(r["vendor"], "fhir");
        assert_eq!(
            r["key"], "patient:130972*****",
            "patient identity masked: {r}"
        );
    }
    let (s, v) = gw
        .get("/v1/admin/audit?destination=epj&outcome=delivered")
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1), "{v}");
    let (s, v) = gw
        .get("/v1/admin/audit?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z")
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        v["records"].as_array().map(Vec::len),
        Some(0),
        "time range: {v}"
    );
    let (s, v) = gw.get("/v1/admin/audit?from=yesterday").await;
    assert_eq!(s, 400, "{v}");

    // The export: a Bundle of AuditEvents, no identity number anywhere.
    let (s, ct, text) = get_text(&gw, &format!("/v1/admin/audit/export?event_id={id}")).await;
    assert_eq!(s, 200, "{text}");
    assert!(ct.starts_with("application/fhir+json"), "{ct}");
    assert!(
        !text.contains(PATIENT),
        "export leaks the identity number: {text}"
    );
    let bundle: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(bundle["resourceType"], "Bundle");
    let entries = bundle["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), records.len());
    let delivered = entries
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["subtype"][1]["code"] == "delivered")
        .expect("delivered AuditEvent");
    assert_eq!(delivered["resourceType"], "AuditEvent");
    assert_eq!(delivered["type"]["code"], "110106", "DICOM Export");
    assert_eq!(delivered["outcome"], "0");
    let agents: Vec<&str> = delivered["agent"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["who"]["display"].as_str())
        .collect();
    assert_eq!(agents, ["knutepunkt", "fhir", "epj"]);
    assert_eq!(
        delivered["entity"][0]["what"]["identifier"]["value"],
        id.as_str()
    );
    assert_eq!(
        delivered["entity"].as_array().map(Vec::len),
        Some(1),
        "no patient entity"
    );

    let (s, ct, nd) = get_text(
        &gw,
        &format!("/v1/admin/audit/export?event_id={id}&format=ndjson"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(ct, "application/fhir+ndjson");
    let lines: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    assert_eq!(lines.len(), entries.len());

    // Every read above was audited, naming the caller and the filter, without patient data.
    let (_, v) = gw.get("/v1/admin/audit?outcome=audit-read&limit=50").await;
    let reads = v["records"].as_array().expect("records");
    assert!(reads.len() >= 6, "each query and export is audited: {v}");
    let details: Vec<&str> = reads.iter().filter_map(|r| r["detail"].as_str()).collect();
    assert!(
        details
            .iter()
            .any(|d| d.starts_with("audit export by unauthenticated: event_id=")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("destination=epj outcome=delivered"))
    );
    assert!(!v.to_string().contains(PATIENT));

    // The console's audit page: the same search, masked, and audited as a console search.
    let (s, ct, html) = get_text(
        &gw,
        &format!("/console/audit?event_id={id}&destination=epj"),
    )
    .await;
    assert_eq!(s, 200, "{html}");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(html.contains("<h1>Audit trail</h1>"), "{html}");
    assert!(
        html.contains(&format!("/console/events/{id}")),
        "links the event"
    );
    assert!(
        html.contains(">delivered<") && html.contains("patient:130972*****"),
        "{html}"
    );
    assert!(!html.contains(PATIENT), "console leaks the identity number");
    let (s, _, html) = get_text(&gw, "/console/audit").await;
    assert_eq!(s, 200);
    assert!(
        !html.contains("<table id=\"audit\">"),
        "no search without a filter"
    );
    let (s, _, _) = get_text(&gw, "/console/audit?from=soon").await;
    assert_eq!(s, 400);
    let (_, v) = gw.get("/v1/admin/audit?outcome=audit-read&limit=50").await;
    assert!(
        v.to_string()
            .contains("console audit search by console: event_id="),
        "console searches are audited: {v}"
    );

    // Reads and their audit notes keep the chain intact.
    let (code, verified) = gw.audit_verify();
    assert_eq!(code, 0, "audit verify: {verified}");

    // FHIR R4 validation of the exported AuditEvents (the pinned validator, if installed).
    let dir = repo_path("conformance-tests");
    if !dir.join("node_modules/@medplum/core").exists() {
        // The test command installs it and sets this, so CI cannot skip the validation.
        assert!(
            std::env::var_os("KNUTEPUNKT_REQUIRE_VALIDATOR").is_none(),
            "run `npm ci` in conformance-tests/"
        );
        eprintln!(
            "note: conformance-tests/node_modules missing (run npm ci there): validator skipped"
        );
        return;
    }
    let file = gw.dir.path().join("audit-export.json");
    std::fs::write(&file, &text).expect("write");
    let out = Command::new("node")
        .current_dir(&dir)
        .arg("validate-resources.mjs")
        .arg(&file)
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "AuditEvent export is not valid FHIR R4:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("0 error(s)"), "{said}");
}
