//! The R4 Subscription resource with the R5 Backport IG profile: parsing and validation (every
//! error names the field), and rendering a stored subscription back.

use serde_json::{Value, json};

use super::topics::{TOPIC_BASE, topic_url};
use crate::api_error::ApiError;
use crate::journal::subs::{NewSubscription, SubscriptionRow};
use crate::normalise::Category;

pub const PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
const EXT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

pub const DEFAULT_TIMEOUT_S: u32 = 10;
pub const MAX_TIMEOUT_S: u32 = 120;
pub const DEFAULT_MAX_COUNT: u32 = 100;
pub const MAX_MAX_COUNT: u32 = 1000;
pub const MAX_HEARTBEAT_S: u32 = 86_400;
/// Filter keys the topics accept (`canFilterBy`).
pub const FILTERS: [&str; 3] = ["municipality", "patient", "code"];

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Extensions of `node` with the backport `name`.
fn extensions<'a>(node: &'a Value, name: &str) -> Vec<&'a Value> {
    let url = format!("{EXT}{name}");
    node["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"].as_str() == Some(url.as_str()))
        .collect()
}

fn one_uint(node: &Value, name: &str, key: &str, field: &str) -> Result<Option<u32>, ApiError> {
    let found = extensions(node, name);
    match found.as_slice() {
        [] => Ok(None),
        [e] => e[key]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| bad(field, format!("{name} needs a non-negative integer {key}"))),
        _ => Err(bad(field, format!("{name} may appear only once"))),
    }
}

/// Validates a posted Subscription and turns it into what the journal stores.
pub fn parse(body: &Value, id: String, now_ms: i64) -> Result<NewSubscription, ApiError> {
    if body["resourceType"].as_str() != Some("Subscription") {
        return Err(bad("resourceType", "expected a Subscription resource"));
    }
    match body["status"].as_str() {
        Some("requested" | "active") => {}
        Some(other) => {
            return Err(bad(
                "Subscription.status",
                format!("status {other:?} cannot be requested; send \"requested\""),
            ));
        }
        None => return Err(bad("Subscription.status", "status is required (requested)")),
    }
    if body["reason"].as_str().is_none_or(|r| r.trim().is_empty()) {
        return Err(bad("Subscription.reason", "reason is required"));
    }
    let criteria = body["criteria"].as_str().ok_or_else(|| {
        bad(
            "Subscription.criteria",
            "criteria (topic canonical) is required",
        )
    })?;
    let topic = criteria
        .strip_prefix(TOPIC_BASE)
        .and_then(|t| t.parse::<Category>().ok())
        .ok_or_else(|| {
            bad(
                "Subscription.criteria",
                format!(
                    "unknown topic {criteria:?}; expected one of {}",
                    Category::ALL.map(topic_url).join(", ")
                ),
            )
        })?;
    let (mut tenant, mut patient, mut code) = (None, None, None);
    for f in extensions(&body["_criteria"], "backport-filter-criteria") {
        let field = "Subscription._criteria.extension.valueString";
        let text = f["valueString"]
            .as_str()
            .ok_or_else(|| bad(field, "filter criteria need a valueString"))?;
        // `Resource?key=value` and `key=value` are both accepted; several `&`-joined too.
        let text = text.split_once('?').map_or(text, |(_, q)| q);
        for pair in text.split('&') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(field, format!("filter {pair:?} is not key=value")))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(bad(field, format!("filter {key:?} has an empty value")));
            }
            let slot = match key.trim() {
                "municipality" => {
                    if !crate::config::validate::is_municipality_number(value) {
                        return Err(bad(
                            field,
                            format!("municipality {value:?} is not a 4-digit number, e.g. 0301"),
                        ));
                    }
                    &mut tenant
                }
                "patient" => &mut patient,
                "code" => &mut code,
                other => {
                    return Err(bad(
                        field,
                        format!(
                            "unknown filter {other:?}; topics filter on {}",
                            FILTERS.join(", ")
                        ),
                    ));
                }
            };
            if slot.is_some() {
                return Err(bad(field, format!("filter {key:?} given twice")));
            }
            *slot = Some(value.to_string());
        }
    }
    // The gateway's ordering key holds the bare patient identifier.
    let patient = patient.map(|p| {
        let p = p.strip_prefix("Patient/").unwrap_or(&p);
        p.rsplit_once('|').map_or(p, |(_, v)| v).to_string()
    });
    let channel = &body["channel"];
    if !channel.is_object() {
        return Err(bad("Subscription.channel", "channel is required"));
    }
    if channel["type"].as_str() != Some("rest-hook") {
        return Err(bad(
            "Subscription.channel.type",
            "only channel type \"rest-hook\" is supported",
        ));
    }
    let endpoint = channel["endpoint"]
        .as_str()
        .ok_or_else(|| bad("Subscription.channel.endpoint", "endpoint is required"))?;
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| bad("Subscription.channel.endpoint", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(
            "Subscription.channel.endpoint",
            "endpoint must be an http(s) URL with a host, e.g. https://epj.example/notify",
        ));
    }
    match channel["payload"].as_str() {
        None | Some("application/fhir+json" | "application/json") => {}
        Some(other) => {
            return Err(bad(
                "Subscription.channel.payload",
                format!("payload {other:?} is not supported; use application/fhir+json"),
            ));
        }
    }
    let content = extensions(&channel["_payload"], "backport-payload-content");
    let payload = match content.as_slice() {
        [] => "id-only",
        [e] => match e["valueCode"].as_str() {
            Some(c @ ("empty" | "id-only" | "full-resource")) => c,
            _ => {
                return Err(bad(
                    "Subscription.channel._payload.extension.valueCode",
                    "payload content must be empty, id-only or full-resource",
                ));
            }
        },
        _ => {
            return Err(bad(
                "Subscription.channel._payload.extension",
                "backport-payload-content may appear only once",
            ));
        }
    };
    let heartbeat_s = one_uint(
        channel,
        "backport-heartbeat-period",
        "valueUnsignedInt",
        "Subscription.channel.extension(heartbeatPeriod)",
    )?
    .unwrap_or(0);
    if heartbeat_s > MAX_HEARTBEAT_S {
        return Err(bad(
            "Subscription.channel.extension(heartbeatPeriod)",
            format!("heartbeat period is at most {MAX_HEARTBEAT_S} s"),
        ));
    }
    let timeout_s = one_uint(
        channel,
        "backport-timeout",
        "valueUnsignedInt",
        "Subscription.channel.extension(timeout)",
    )?
    .unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
        return Err(bad(
            "Subscription.channel.extension(timeout)",
            format!("timeout must be 1..={MAX_TIMEOUT_S} s"),
        ));
    }
    let max_count = one_uint(
        channel,
        "backport-max-count",
        "valuePositiveInt",
        "Subscription.channel.extension(maxCount)",
    )?
    .unwrap_or(DEFAULT_MAX_COUNT);
    if !(1..=MAX_MAX_COUNT).contains(&max_count) {
        return Err(bad(
            "Subscription.channel.extension(maxCount)",
            format!("max count must be 1..={MAX_MAX_COUNT}"),
        ));
    }
    let mut headers = Vec::new();
    for h in channel["header"].as_array().into_iter().flatten() {
        let text = h.as_str().unwrap_or_default();
        let ok = text.split_once(':').is_some_and(|(n, v)| {
            reqwest::header::HeaderName::from_bytes(n.trim().as_bytes()).is_ok()
                && reqwest::header::HeaderValue::from_str(v.trim()).is_ok()
        });
        if !ok {
            return Err(bad(
                "Subscription.channel.header",
                format!("header {text:?} is not \"Name: value\""),
            ));
        }
        headers.push(text.to_string());
    }
    let mut resource = body.clone();
    resource["id"] = json!(id);
    Ok(NewSubscription {
        id,
        topic: topic.as_str().to_string(),
        tenant,
        patient,
        code,
        endpoint: endpoint.to_string(),
        payload: payload.to_string(),
        heartbeat_s,
        timeout_s,
        max_count,
        headers,
        resource: resource.to_string(),
        created_at_ms: now_ms,
    })
}

/// The stored resource with the live status (and the last error while in `error`).
pub fn render(row: &SubscriptionRow) -> Value {
    let mut r: Value = serde_json::from_str(&row.spec.resource).unwrap_or_else(|_| json!({}));
    r["resourceType"] = json!("Subscription");
    r["id"] = json!(row.spec.id);
    r["status"] = json!(row.status);
    r["meta"] = json!({ "profile": [PROFILE] });
    match (&row.last_error, row.status.as_str()) {
        (Some(e), "error") => r["error"] = json!(e),
        _ => {
            if let Some(o) = r.as_object_mut() {
                o.remove("error");
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub() -> Value {
        json!({
            "resourceType": "Subscription", "status": "requested", "reason": "EPJ",
            "criteria": "https://knutepunkt.no/fhir/SubscriptionTopic/alarm",
            "_criteria": { "extension": [{
                "url": format!("{EXT}backport-filter-criteria"),
                "valueString": "DetectedIssue?municipality=0301&patient=Patient/13097248022" }] },
            "channel": {
                "type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                "payload": "application/fhir+json",
                "_payload": { "extension": [{
                    "url": format!("{EXT}backport-payload-content"), "valueCode": "full-resource" }] },
                "extension": [
                    { "url": format!("{EXT}backport-heartbeat-period"), "valueUnsignedInt": 60 },
                    { "url": format!("{EXT}backport-max-count"), "valuePositiveInt": 5 }
                ],
                "header": ["Authorization: Bearer x"]
            }
        })
    }

    #[test]
    fn parses_the_backport_profile() {
        let s = parse(&sub(), "s1".into(), 1).expect("valid");
        assert_eq!(s.topic, "alarm");
        assert_eq!(s.tenant.as_deref(), Some("0301"));
        assert_eq!(s.patient.as_deref(), Some("13097248022"));
        assert_eq!(s.payload, "full-resource");
        assert_eq!((s.heartbeat_s, s.timeout_s, s.max_count), (60, 10, 5));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, Value, &str); 5] = [
            (
                "/criteria",
                json!("https://x/SubscriptionTopic/alarm"),
                "Subscription.criteria",
            ),
            (
                "/channel/type",
                json!("websocket"),
                "Subscription.channel.type",
            ),
            (
                "/channel/endpoint",
                json!("ftp://x"),
                "Subscription.channel.endpoint",
            ),
            (
                "/channel/_payload/extension/0/valueCode",
                json!("all"),
                "Subscription.channel._payload.extension.valueCode",
            ),
            (
                "/_criteria/extension/0/valueString",
                json!("ward=3"),
                "Subscription._criteria.extension.valueString",
            ),
        ];
        for (ptr, value, field) in cases {
            let mut body = sub();
            *body.pointer_mut(ptr).expect(ptr) = value;
            match parse(&body, "s".into(), 1) {
                Err(ApiError::BadRequest { field: f, .. }) => assert_eq!(f, field, "{ptr}"),
                other => panic!("{ptr}: {other:?}"),
            }
        }
    }
}
