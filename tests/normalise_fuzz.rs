//! Property tests: arbitrary bytes and mutated golden payloads through every shipped mapping
//! (and the raw parsers). Nothing may panic; every rejection is a `MapError`, which ingest
//! answers with 400 (Malformed) or 422 (Unmappable, naming a field); every accepted event is
//! a JSON Bundle whose id is the event id.

use std::path::Path;

use knutepunkt::normalise::{self, MapError, Outcome, RawEvent, VendorRegistry, load_vendors};
use proptest::prelude::*;

const EVENT_ID: &str = "019594ab-2900-7000-8000-000000000001";

fn registry() -> VendorRegistry {
    load_vendors(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings load")
}

/// Golden inputs, by vendor, as mutation seeds.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance-tests/cases");
    let mut out = Vec::new();
    for v in std::fs::read_dir(&root)
        .expect("cases")
        .filter_map(Result::ok)
    {
        let vendor = v.file_name().to_string_lossy().to_string();
        for c in std::fs::read_dir(v.path())
            .expect("vendor")
            .filter_map(Result::ok)
        {
            for f in ["input.json", "input.xml"] {
                if let Ok(b) = std::fs::read(c.path().join(f)) {
                    out.push((vendor.clone(), b));
                }
            }
        }
    }
    out.sort();
    assert!(!out.is_empty());
    out
}

fn check(reg: &VendorRegistry, vendor: &str, body: &[u8], tenant: Option<&str>) {
    let spec = reg.get(vendor).expect("vendor");
    let raw = RawEvent {
        id: EVENT_ID.into(),
        body,
        tenant: tenant.map(str::to_string),
        max_json_depth: 64,
        max_xml_depth: knutepunkt::normalise::xml::MAX_DEPTH,
    };
    match normalise::normalise_outcome(spec, &raw) {
        Ok(Outcome::Event(e)) => {
            let v: serde_json::Value = serde_json::from_str(&e.fhir).expect("FHIR output is JSON");
            assert_eq!(v["resourceType"], "Bundle");
            assert_eq!(v["id"], EVENT_ID);
            assert!(
                e.key.starts_with("patient:") || e.key.starts_with("device:"),
                "{}",
                e.key
            );
        }
        Ok(Outcome::Heartbeat(h)) => assert!(h.device_key.starts_with("device:")),
        Err(MapError::Malformed(m)) => assert!(!m.is_empty()),
        Err(MapError::Unmappable { field, message }) => {
            assert!(!field.is_empty() && !message.is_empty());
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let snippets = prop::sample::select(vec![
        b"\"".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"[".to_vec(),
        b"<".to_vec(),
        b"</mrq>".to_vec(),
        b"&amp;".to_vec(),
        b"&#0;".to_vec(),
        b"&x;".to_vec(),
        b"<!DOCTYPE a>".to_vec(),
        b"null".to_vec(),
        b"-1e999".to_vec(),
        b"NaN".to_vec(),
        b"\xff\xfe".to_vec(),
        b"99999999999999999999999".to_vec(),
        b"\"2025-02-30T25:61:00+99:00\"".to_vec(),
        b"<stc>-1</stc>".to_vec(),
        b"\"readings\":[]".to_vec(),
        b"\"nationalId\":\"00000000000\"".to_vec(),
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), snippets).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if b.is_empty() {
            break;
        }
        let len = b.len();
        match m {
            Mutation::Flip(i, x) => b[i % len] = *x,
            Mutation::Truncate(i) => b.truncate(i % len),
            Mutation::Insert(i, s) => {
                let at = i % (len + 1);
                b.splice(at..at, s.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i % len;
                let end = (at + n).min(len);
                b.drain(at..end);
            }
            Mutation::Duplicate(i, n) => {
                let at = i % len;
                let end = (at + n).min(len);
                let part: Vec<u8> = b[at..end].to_vec();
                b.splice(at..at, part);
            }
        }
    }
    b
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    // `PROPTEST_CASES` runs longer on demand (docs/security.md, "Fuzzing").
    #![proptest_config(ProptestConfig { cases: cases(512), .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let reg = registry();
        for v in reg.names() {
            check(&reg, v, &body, None);
        }
        let _ = normalise::xml::parse(&body);
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
        let reg = registry();
        for v in reg.names() {
            check(&reg, v, s.as_bytes(), Some("0301"));
        }
        let _ = normalise::datetime::parse(&s, normalise::datetime::TimeFormat::Iso, normalise::datetime::Zone::EuropeOslo);
        let _ = normalise::identity::parse_person_id(&s, true);
        let _ = normalise::path::Path::parse(&s);
    }

    #[test]
    fn mutated_golden_payloads_never_panic(
        pick in any::<prop::sample::Index>(),
        muts in prop::collection::vec(mutation(), 1..6),
        tenant in prop::option::of(prop::sample::select(vec!["5001", "0301"])),
    ) {
        let reg = registry();
        let seeds = seeds();
        let (vendor, body) = &seeds[pick.index(seeds.len())];
        let mutated = apply(body.clone(), &muts);
        check(&reg, vendor, &mutated, tenant);
        // The same bytes through every other mapping, too.
        for v in reg.names() {
            check(&reg, v, &mutated, None);
        }
    }

    #[test]
    fn structured_json_values_never_panic(v in arb_json()) {
        let reg = registry();
        let body = serde_json::to_vec(&v).expect("json");
        for name in reg.names() {
            check(&reg, name, &body, None);
        }
    }
}

/// JSON documents shaped like the vendor payloads (known keys, odd values).
fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop::sample::select(vec![
        "eventId",
        "eventType",
        "occurredAt",
        "alarm",
        "category",
        "priority",
        "device",
        "serial",
        "serviceRecipient",
        "nationalId",
        "municipalityNumber",
        "id",
        "type",
        "dispenserId",
        "dispensedAt",
        "detectedAt",
        "client",
        "nin",
        "uploadId",
        "patient",
        "readings",
        "metric",
        "value_1",
        "value_2",
        "unit",
        "timestamp",
        "deviceId",
        "resourceType",
        "entry",
        "resource",
        "subject",
        "identifier",
        "value",
        "closedAt",
        "note",
    ]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        prop::sample::select(vec![
            "ALARM_TRIGGERED",
            "DOSE_TAKEN",
            "DOSE_MISSED",
            "HEARTBEAT",
            "DEVICE_HEARTBEAT",
            "blood_pressure",
            "spo2",
            "weight",
            "glucose",
            "temperature",
            "mmHg",
            "kPa",
            "°F",
            "lb",
            "mg/dL",
            "FALL",
            "5001",
            "0301",
            "14834810086",
            "54835210092",
            "81234510053",
            "1741935612000",
            "2025-03-14T13:05:22+01:00",
            "NaN",
            "",
            " ",
            "Observation",
            "Bundle",
        ])
        .prop_map(|s| serde_json::Value::String(s.to_string())),
        "[ -~]{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}
