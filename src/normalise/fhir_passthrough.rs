//! FHIR R4 JSON from vendors that already speak FHIR: checked, re-keyed and wrapped so every
//! delivery carries a Bundle whose `id` and `identifier` are the gateway's stable event id.

use serde_json::{Map, Value, json};

use super::{Category, Envelope, MapError, Priority, RawEvent, VendorSpec, json_depth};

/// Resources of one message with their type names.
type Resources<'a> = Vec<(String, &'a Map<String, Value>)>;

const KNOWN: [&str; 6] = [
    "DetectedIssue",
    "Observation",
    "MedicationDispense",
    "Composition",
    "Encounter",
    "Device",
];

pub fn normalise(spec: &VendorSpec, raw: &RawEvent<'_>) -> Result<Envelope, MapError> {
    let depth = json_depth::max_depth(raw.body, raw.max_json_depth);
    if depth > raw.max_json_depth {
        return Err(MapError::Malformed(format!(
            "JSON nesting deeper than {} levels (ingest.max_json_depth)",
            raw.max_json_depth
        )));
    }
    let value: Value = serde_json::from_slice(raw.body)
        .map_err(|e| MapError::Malformed(format!("invalid JSON: {e}")))?;
    let Value::Object(root) = value else {
        return Err(MapError::unmappable(
            "$",
            "body must be a FHIR resource (a JSON object)",
        ));
    };
    let resource_type = str_at(&root, "resourceType")
        .ok_or_else(|| {
            MapError::unmappable("resourceType", "missing; a FHIR R4 resource is required")
        })?
        .to_string();

    let resources: Resources<'_> = if resource_type == "Bundle" {
        bundle_resources(&root)?
    } else {
        vec![(resource_type.clone(), &root)]
    };
    let (category, priority) = classify(&resources)?;
    let key = ordering_key(&resources)?;
    let vendor_event_id = if resource_type == "Bundle" {
        root.get("identifier")
            .and_then(|i| str_at_value(i, "value"))
            .map(str::to_string)
    } else {
        first_identifier(&root)
    };
    let tenant = raw.tenant.clone().or_else(|| spec.default_tenant.clone());

    let bundle = if resource_type == "Bundle" {
        rekey_bundle(root, &raw.id)
    } else {
        wrap(Value::Object(root), &raw.id)
    };
    Ok(Envelope {
        id: raw.id.clone(),
        vendor: spec.name.clone(),
        vendor_event_id,
        category,
        priority,
        tenant,
        key,
        mapping_version: spec.version.clone(),
        // Straight into a string: `Value`'s `Display` goes through the formatter machinery.
        fhir: serde_json::to_string(&bundle)
            .map_err(|e| MapError::Malformed(format!("cannot serialise the Bundle: {e}")))?,
    })
}

fn bundle_resources(root: &Map<String, Value>) -> Result<Resources<'_>, MapError> {
    let entries = root
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| MapError::unmappable("Bundle.entry", "missing or not an array"))?;
    if entries.is_empty() {
        return Err(MapError::unmappable(
            "Bundle.entry",
            "must hold at least one resource",
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let res = e
            .get("resource")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                MapError::unmappable(format!("Bundle.entry[{i}].resource"), "missing")
            })?;
        let rt = str_at(res, "resourceType").ok_or_else(|| {
            MapError::unmappable(
                format!("Bundle.entry[{i}].resource.resourceType"),
                "missing",
            )
        })?;
        out.push((rt.to_string(), res));
    }
    Ok(out)
}

/// Category comes from the most urgent resource in the message: an alarm wins over a note.
fn classify(resources: &[(String, &Map<String, Value>)]) -> Result<(Category, Priority), MapError> {
    let mut category = None;
    let mut priority = Priority::Normal;
    for (rt, res) in resources {
        let c = match rt.as_str() {
            "DetectedIssue" => {
                priority = match str_at(res, "severity") {
                    Some("moderate") => Priority::Normal,
                    Some("low") => Priority::Low,
                    _ => Priority::High,
                };
                Category::Alarm
            }
            "MedicationDispense" => Category::Medication,
            "Observation" => Category::Measurement,
            "Composition" => Category::Note,
            "Encounter" | "Device" => Category::Event,
            _ => continue,
        };
        category = Some(match category {
            Some(prev) if rank(prev) <= rank(c) => prev,
            _ => c,
        });
    }
    let category = category.ok_or_else(|| {
        MapError::unmappable(
            "resourceType",
            format!(
                "no supported resource; expected one of {}",
                KNOWN.join(", ")
            ),
        )
    })?;
    Ok((category, priority))
}

fn rank(c: Category) -> u8 {
    match c {
        Category::Alarm => 0,
        Category::Medication => 1,
        Category::Measurement => 2,
        Category::Note => 3,
        Category::Event => 4,
    }
}

/// Patient identifier when any resource names one, else the device identifier.
fn ordering_key(resources: &[(String, &Map<String, Value>)]) -> Result<String, MapError> {
    for (_, res) in resources {
        for field in ["subject", "patient"] {
            if let Some(id) = res.get(field).and_then(reference_id) {
                return Ok(format!("patient:{id}"));
            }
        }
    }
    for (rt, res) in resources {
        if rt == "Device"
            && let Some(id) = first_identifier(res)
        {
            return Ok(format!("device:{id}"));
        }
        for field in ["device", "author", "performer"] {
            if let Some(id) = res.get(field).and_then(reference_id) {
                return Ok(format!("device:{id}"));
            }
        }
    }
    Err(MapError::unmappable(
        "subject",
        "no patient (subject/patient) or device (device/author) identifier to order the event by",
    ))
}

/// `{identifier:{value}}` or `{reference:"Patient/x"}`; arrays use their first element.
fn reference_id(v: &Value) -> Option<String> {
    let v = match v {
        Value::Array(a) => a.first()?,
        other => other,
    };
    if let Some(val) = v.get("identifier").and_then(|i| str_at_value(i, "value")) {
        return Some(val.trim().to_string());
    }
    v.get("reference")
        .and_then(Value::as_str)
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
}

fn first_identifier(res: &Map<String, Value>) -> Option<String> {
    let ident = res.get("identifier")?;
    let first = match ident {
        Value::Array(a) => a.first()?,
        other => other,
    };
    str_at_value(first, "value")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn str_at<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn str_at_value<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn stable_identifier(event_id: &str) -> Value {
    json!({ "system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{event_id}") })
}

/// Keeps the vendor's Bundle (type, identifier, entries) and sets `id` to the event id.
fn rekey_bundle(mut root: Map<String, Value>, event_id: &str) -> Value {
    root.insert("id".into(), Value::String(event_id.to_string()));
    if !root.contains_key("identifier") {
        root.insert("identifier".into(), stable_identifier(event_id));
    }
    Value::Object(root)
}

/// A `collection` Bundle around the resource. Built field by field: `json!` would copy the
/// resource through `to_value`, a second walk of the whole tree.
fn wrap(resource: Value, event_id: &str) -> Value {
    let mut entry = Map::with_capacity(2);
    entry.insert("fullUrl".into(), super::full_url(event_id, 0).into());
    entry.insert("resource".into(), resource);
    let mut bundle = Map::with_capacity(5);
    bundle.insert("resourceType".into(), "Bundle".into());
    bundle.insert("id".into(), event_id.into());
    bundle.insert("identifier".into(), stable_identifier(event_id));
    bundle.insert("type".into(), "collection".into());
    bundle.insert("entry".into(), Value::Array(vec![Value::Object(entry)]));
    Value::Object(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalise::Format;

    fn spec() -> VendorSpec {
        VendorSpec {
            name: "v".into(),
            version: "1".into(),
            format: Format::Fhir,
            default_tenant: Some("0301".into()),
            tenants: vec![],
            test_tenants: vec![],
            file: "v.toml".into(),
            mapping: None,
        }
    }

    fn run(body: &str) -> Result<Envelope, MapError> {
        let raw = RawEvent {
            id: "ev-1".into(),
            body: body.as_bytes(),
            tenant: None,
            max_json_depth: 16,
            max_xml_depth: crate::normalise::xml::MAX_DEPTH,
        };
        normalise(&spec(), &raw)
    }

    #[test]
    fn observation_is_wrapped_and_keyed_by_patient() {
        let env = run(r#"{"resourceType":"Observation","status":"final","identifier":[{"value":"m-1"}],
            "subject":{"identifier":{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"13097248022"}},
            "valueQuantity":{"value":7.10,"unit":"mmol/L"}}"#)
        .expect("maps");
        assert_eq!(env.category, Category::Measurement);
        assert_eq!(env.key, "patient:13097248022");
        assert_eq!(env.vendor_event_id.as_deref(), Some("m-1"));
        assert_eq!(env.tenant.as_deref(), Some("0301"));
        let v: Value = serde_json::from_str(&env.fhir).expect("json");
        assert_eq!(v["id"], "ev-1");
        assert_eq!(v["identifier"]["value"], "urn:uuid:ev-1");
        // Exact decimals survive: 7.10 stays 7.10.
        assert!(env.fhir.contains("7.10"), "{}", env.fhir);
    }

    #[test]
    fn alarm_bundle_keyed_by_device_when_no_patient() {
        let env = run(
            r#"{"resourceType":"Bundle","type":"collection","identifier":{"value":"alarm-9"},
            "entry":[{"resource":{"resourceType":"DetectedIssue","status":"final",
            "author":{"identifier":{"value":"dev-7"}}}}]}"#,
        )
        .expect("maps");
        assert_eq!(env.category, Category::Alarm);
        assert_eq!(env.priority, Priority::High);
        assert_eq!(env.key, "device:dev-7");
        assert_eq!(env.vendor_event_id.as_deref(), Some("alarm-9"));
    }

    #[test]
    fn precise_errors() {
        assert!(matches!(run("{"), Err(MapError::Malformed(_))));
        assert_eq!(
            run(r#"{"status":"final"}"#).expect_err("no type"),
            MapError::unmappable("resourceType", "missing; a FHIR R4 resource is required")
        );
        let e = run(r#"{"resourceType":"Observation"}"#).expect_err("no key");
        assert!(
            matches!(e, MapError::Unmappable { ref field, .. } if field == "subject"),
            "{e:?}"
        );
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert!(matches!(run(&deep), Err(MapError::Malformed(m)) if m.contains("nesting")));
    }
}
