//! Golden conformance cases: `conformance-tests/cases/<vendor>/<case>/` holds `input.json` or
//! `input.xml`, an optional `case.toml` (`tenant`, `event_id`, `duplicate_of`, `description`)
//! and `expected.json` (the outcome and, for events, the exact FHIR R4 Bundle).
//!
//! Output is deterministic: the event id is fixed per case (its UUID v7 time is the receive
//! time) and every fullUrl derives from it. `UPDATE_GOLDEN=1 cargo test --test conformance`
//! rewrites the expected files; review the diff before committing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use knutepunkt::normalise::{self, MapError, Outcome, RawEvent, VendorRegistry, load_vendors};
use serde_json::{Value, json};

/// 2025-03-14T12:40:00Z as a UUID v7.
const DEFAULT_EVENT_ID: &str = "019594ab-2900-7000-8000-000000000001";

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseToml {
    tenant: Option<String>,
    event_id: Option<String>,
    duplicate_of: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
}

struct Case {
    vendor: String,
    name: String,
    dir: PathBuf,
    input: PathBuf,
    meta: CaseToml,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance-tests")
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut vendors: Vec<_> = std::fs::read_dir(root().join("cases"))
        .expect("conformance-tests/cases")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    vendors.sort();
    for vdir in vendors {
        let vendor = vdir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let mut dirs: Vec<_> = std::fs::read_dir(&vdir)
            .expect("vendor dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().expect("name").to_string_lossy().to_string();
            let input = ["input.json", "input.xml"]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{}: no input.json or input.xml", dir.display()));
            let meta = match std::fs::read_to_string(dir.join("case.toml")) {
                Ok(t) => toml::from_str(&t)
                    .unwrap_or_else(|e| panic!("{}/case.toml: {e}", dir.display())),
                Err(_) => CaseToml::default(),
            };
            out.push(Case {
                vendor: vendor.clone(),
                name,
                dir,
                input,
                meta,
            });
        }
    }
    out
}

fn registry() -> VendorRegistry {
    load_vendors(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"))
        .unwrap_or_else(|e| panic!("shipped mappings must load: {e:?}"))
}

/// The outcome of one case as the JSON stored in `expected.json`.
fn run_case(reg: &VendorRegistry, c: &Case) -> Value {
    let spec = reg
        .get(&c.vendor)
        .unwrap_or_else(|| panic!("{}: no mapping for vendor {}", c.dir.display(), c.vendor));
    let body = std::fs::read(&c.input).expect("input");
    let raw = RawEvent {
        id: c
            .meta
            .event_id
            .clone()
            .unwrap_or_else(|| DEFAULT_EVENT_ID.to_string()),
        body: &body,
        tenant: c.meta.tenant.clone(),
        max_json_depth: 64,
        max_xml_depth: knutepunkt::normalise::xml::MAX_DEPTH,
    };
    match normalise::normalise_outcome(spec, &raw) {
        Ok(Outcome::Event(e)) => {
            let fhir: Value = serde_json::from_str(&e.fhir).expect("fhir is JSON");
            assert_eq!(
                fhir["id"],
                Value::String(e.id.clone()),
                "Bundle.id = event id"
            );
            json!({
                "outcome": "event",
                "category": e.category.as_str(),
                "priority": e.priority.as_str(),
                "tenant": e.tenant,
                "key": e.key,
                "vendor_event_id": e.vendor_event_id,
                "mapping_version": e.mapping_version,
                "fhir": fhir,
            })
        }
        Ok(Outcome::Heartbeat(h)) => json!({
            "outcome": "heartbeat",
            "device_key": h.device_key,
            "tenant": h.tenant,
            "vendor_event_id": h.vendor_event_id,
        }),
        Err(MapError::Malformed(m)) => json!({ "outcome": "error", "status": 400, "message": m }),
        Err(MapError::Unmappable { field, message }) => json!({
            "outcome": "error", "status": 422, "field": field, "message": message,
        }),
    }
}

#[test]
fn golden_cases() {
    let reg = registry();
    let all = cases();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    let mut results: BTreeMap<(String, String), Value> = BTreeMap::new();
    for c in &all {
        let got = run_case(&reg, c);
        let path = c.dir.join("expected.json");
        if update {
            let mut text = serde_json::to_string_pretty(&got).expect("json");
            text.push('\n');
            std::fs::write(&path, text).expect("write expected");
        } else {
            match std::fs::read_to_string(&path) {
                Err(_) => failures.push(format!("{}: missing expected.json", c.dir.display())),
                Ok(t) => {
                    let want: Value = serde_json::from_str(&t).expect("expected.json is JSON");
                    if want != got {
                        failures.push(format!(
                            "{}/{}: output differs from expected.json\n--- got ---\n{}",
                            c.vendor,
                            c.name,
                            serde_json::to_string_pretty(&got).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        results.insert((c.vendor.clone(), c.name.clone()), got);
    }
    // Re-sends: same vendor event id (so the journal sees a duplicate) and same FHIR content.
    for c in &all {
        let Some(orig) = &c.meta.duplicate_of else {
            continue;
        };
        let a = &results[&(c.vendor.clone(), c.name.clone())];
        let Some(b) = results.get(&(c.vendor.clone(), orig.clone())) else {
            failures.push(format!("{}: duplicate_of {orig} does not exist", c.name));
            continue;
        };
        if a["vendor_event_id"] != b["vendor_event_id"] || a["vendor_event_id"].is_null() {
            failures.push(format!(
                "{}/{}: a re-send must have the same vendor_event_id as {orig}",
                c.vendor, c.name
            ));
        }
        if a["key"] != b["key"] {
            failures.push(format!(
                "{}/{}: re-send keyed differently",
                c.vendor, c.name
            ));
        }
    }
    assert!(
        all.len() >= 40,
        "at least 40 golden cases are required, found {}",
        all.len()
    );
    let vendors: std::collections::BTreeSet<_> = all.iter().map(|c| c.vendor.as_str()).collect();
    for v in reg.names() {
        assert!(vendors.contains(v), "no golden case for vendor {v}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Each case also goes through the serialised path ingest uses (normalise() for events).
#[test]
fn events_are_stable_across_runs() {
    let reg = registry();
    for c in cases().iter().take(60) {
        assert_eq!(run_case(&reg, c), run_case(&reg, c), "{}", c.name);
    }
}
