//! Audit trail reads: `GET /v1/admin/audit` (JSON records) and `GET /v1/admin/audit/export`
//! (FHIR R4 AuditEvent, as a Bundle or NDJSON). Every read is itself audited
//! (`audit-read`: who and the filter, never patient data).
//!
//! Patient identity (the event's `patient:` key) is shown only to callers whose [`Caller`]
//! request extension allows it; authentication sets that extension. Without it the caller is
//! unnamed and sees no patient identity, and details are redacted.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::console::html::mask_key;
use crate::api_error::ApiError;
use crate::app::AppState;
use crate::auth::TenantScope;
use crate::journal::registry_text::instant;
use crate::journal::{AuditNote, AuditQuery, AuditRecord};
use crate::normalise::datetime::{self, TimeFormat, Zone};
use crate::normalise::identity;
use crate::telemetry::redact::redact;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

/// Who is calling, as audit reads need it: derived from the authenticated caller (`auth`).
/// Without authentication (open API on loopback): an unnamed caller who may not see patient
/// identity.
#[derive(Debug, Clone)]
pub struct Caller {
    /// A name for the audit trail (client id, user), never a patient identifier.
    pub name: String,
    /// Whether the caller may see patient identity (identity numbers, the patient key).
    pub may_see_patient: bool,
}

impl Caller {
    /// The request's authenticated caller, or an unnamed one (`name`) who may not see patient
    /// identity.
    pub fn or_unnamed(ext: Option<Extension<crate::auth::Caller>>, name: &str) -> Caller {
        match ext {
            Some(Extension(c)) => Caller {
                name: c.sub,
                may_see_patient: c.may_see_patient,
            },
            None => Caller {
                name: name.into(),
                may_see_patient: false,
            },
        }
    }
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/audit", get(search))
        .route("/v1/admin/audit/export", get(export))
}

/// Query parameters shared by the search, the export and the console page.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    pub event_id: Option<String>,
    pub vendor: Option<String>,
    pub device: Option<String>,
    pub destination: Option<String>,
    /// ISO 8601 instant or Unix ms, inclusive.
    pub from: Option<String>,
    /// ISO 8601 instant or Unix ms, exclusive.
    pub to: Option<String>,
    pub outcome: Option<String>,
    pub limit: Option<usize>,
    /// Export only: `bundle` (default) or `ndjson`.
    pub format: Option<String>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn instant_param(field: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    let Some(s) = nonempty(v) else {
        return Ok(None);
    };
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(Some(ms));
    }
    datetime::parse(&s, TimeFormat::Iso, Zone::Utc)
        .map(|d| Some(d.epoch_ms))
        .map_err(|e| ApiError::BadRequest {
            field: field.into(),
            message: format!("{field}: {e}; use e.g. 2026-01-31T12:00:00Z or Unix ms"),
        })
}

impl AuditParams {
    /// The journal query, limited to the tenants the caller may see.
    pub fn query(&self, scope: &TenantScope) -> Result<AuditQuery, ApiError> {
        Ok(AuditQuery {
            event_id: nonempty(&self.event_id),
            vendor: nonempty(&self.vendor),
            device: nonempty(&self.device),
            destination: nonempty(&self.destination),
            from_ms: instant_param("from", &self.from)?,
            to_ms: instant_param("to", &self.to)?,
            outcome: nonempty(&self.outcome),
            limit: self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
            tenants: scope.query_filter(),
        })
    }
}

/// What an `audit-read` record says about a query: the filter, with anything that could be
/// personal data redacted (a device filter is kept: device ids are not personal identifiers).
fn describe(q: &AuditQuery) -> String {
    let mut parts = Vec::new();
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    };
    add("event_id", &q.event_id);
    add("vendor", &q.vendor);
    add("device", &q.device);
    add("destination", &q.destination);
    add("from", &q.from_ms.map(instant));
    add("to", &q.to_ms.map(instant));
    add("outcome", &q.outcome);
    parts.push(format!("limit={}", q.limit));
    redact(&parts.join(" ")).into_owned()
}

/// Runs a search and audits it (the read is refused if it cannot be audited).
pub async fn audited_search(
    state: &AppState,
    caller: &Caller,
    what: &str,
    q: AuditQuery,
) -> Result<Vec<AuditRecord>, ApiError> {
    let retry = state.ingest.retry_after_s;
    state
        .journal
        .audit_note(AuditNote {
            kind: "audit-read".into(),
            subject: "audit".into(),
            dest: None,
            detail: format!("{what} by {}: {}", redact(&caller.name), describe(&q)),
        })
        .await
        .map_err(|e| ApiError::from_journal(e, retry))?;
    state
        .journal
        .audit_search(q)
        .await
        .map_err(|e| ApiError::from_journal(e, retry))
}

/// A record as the caller may see it: without patient identity unless allowed (the key masked
/// as everywhere in the console: `patient:130972*****`).
pub fn visible(mut r: AuditRecord, caller: &Caller) -> AuditRecord {
    if !caller.may_see_patient {
        r.key = r.key.map(|k| mask_key(&k));
        r.detail = r.detail.map(|d| redact(&d).into_owned());
    }
    r
}

async fn search(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<crate::auth::Caller>>,
    scope: TenantScope,
    Query(p): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::or_unnamed(caller, "unauthenticated");
    let q = p.query(&scope)?;
    let rows = audited_search(&state, &caller, "audit search", q).await?;
    let rows: Vec<AuditRecord> = rows.into_iter().map(|r| visible(r, &caller)).collect();
    Ok(Json(json!({ "records": rows })).into_response())
}

async fn export(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<crate::auth::Caller>>,
    scope: TenantScope,
    headers: HeaderMap,
    Query(p): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::or_unnamed(caller, "unauthenticated");
    let ndjson = match p.format.as_deref() {
        None | Some("bundle") => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("ndjson")),
        Some("ndjson") => true,
        Some(other) => {
            return Err(ApiError::BadRequest {
                field: "format".into(),
                message: format!("format {other:?}: use \"bundle\" or \"ndjson\""),
            });
        }
    };
    let q = p.query(&scope)?;
    let rows = audited_search(&state, &caller, "audit export", q).await?;
    let events: Vec<Value> = rows
        .into_iter()
        .map(|r| audit_event(&r, caller.may_see_patient))
        .collect();
    if ndjson {
        let mut body = String::new();
        for e in &events {
            body.push_str(&e.to_string());
            body.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "application/fhir+ndjson")], body).into_response());
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": instant(crate::clock::now_ms()),
        "entry": events
            .into_iter()
            .map(|e| json!({ "fullUrl": format!("urn:uuid:{}", uuid_for(&e)), "resource": e }))
            .collect::<Vec<_>>(),
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/fhir+json; fhirVersion=4.0",
        )],
        bundle.to_string(),
    )
        .into_response())
}

/// A stable UUID (v5) per AuditEvent id, for `fullUrl`.
fn uuid_for(e: &Value) -> uuid::Uuid {
    let id = e["id"].as_str().unwrap_or_default();
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("urn:knutepunkt:audit:{id}").as_bytes(),
    )
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const STEP_SYSTEM: &str = "urn:knutepunkt:audit-step";

/// (type, subtype, action) of an audit step.
fn classify(kind: &str) -> (Value, Value, &'static str) {
    let dcm =
        |code: &str, display: &str| json!({ "system": DCM, "code": code, "display": display });
    let rest = |code: &str| json!({ "system": RESTFUL, "code": code, "display": code });
    match kind {
        // A vendor's event came in and was journaled (and routed).
        "received" | "stored" | "routed" | "unrouted" | "quarantined" | "released" => {
            (dcm("110107", "Import"), rest("create"), "C")
        }
        // A delivery step towards a destination.
        "attempt" | "delivered" | "retry_scheduled" | "dead_lettered" | "replayed" => {
            (dcm("110106", "Export"), rest("create"), "R")
        }
        "audit-read" => (dcm("110101", "Audit Log Used"), rest("search-system"), "R"),
        _ => (
            json!({ "system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation" }),
            rest("operation"),
            "E",
        ),
    }
}

/// FHIR AuditEvent outcome: 0 success, 4 minor failure (retried), 8 serious failure.
fn outcome(r: &AuditRecord) -> &'static str {
    match r.kind.as_str() {
        "dead_lettered" | "unrouted" | "refused" => "8",
        "retry_scheduled" => "4",
        "attempt" if !r.status.is_some_and(|s| (200..300).contains(&s)) => "4",
        _ => "0",
    }
}

/// One audit record as a FHIR R4 AuditEvent. Agents: knutepunkt (the recorder), the vendor
/// (source of an import) and the destination (receiver of an export). Entities: the event (by
/// id) and, only when `show_patient`, the patient.
pub fn audit_event(r: &AuditRecord, show_patient: bool) -> Value {
    let (ty, rest_subtype, action) = classify(&r.kind);
    let import = action == "C";
    let mut agents = vec![json!({
        "type": { "coding": [{ "system": DCM, "code": "110150", "display": "Application" }] },
        "who": { "identifier": { "system": "urn:knutepunkt:node", "value": "knutepunkt" },
                 "display": "knutepunkt" },
        "requestor": !import && r.destination.is_none(),
    })];
    if let Some(v) = &r.vendor {
        agents.push(json!({
            "type": { "coding": [{ "system": DCM, "code": "110153", "display": "Source Role ID" }] },
            "who": { "identifier": { "system": "urn:knutepunkt:vendor", "value": v }, "display": v },
            "requestor": import,
        }));
    }
    if let Some(d) = &r.destination {
        agents.push(json!({
            "type": { "coding": [{ "system": DCM, "code": "110152", "display": "Destination Role ID" }] },
            "who": { "identifier": { "system": "urn:knutepunkt:destination", "value": d }, "display": d },
            "requestor": false,
        }));
    }
    let mut detail = vec![json!({ "type": "kind", "valueString": r.kind })];
    if let Some(seq) = r.chain_seq {
        detail.push(json!({ "type": "chain_seq", "valueString": seq.to_string() }));
    }
    if let Some(h) = &r.hash {
        detail.push(json!({ "type": "chain_hash", "valueString": h }));
    }
    if let Some(a) = r.attempt {
        detail.push(json!({ "type": "attempt", "valueString": a.to_string() }));
    }
    if let Some(s) = r.status {
        detail.push(json!({ "type": "http_status", "valueString": s.to_string() }));
    }
    let mut entities = vec![json!({
        "what": { "identifier": { "system": "urn:knutepunkt:event", "value": r.event_id } },
        "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                  "code": "2", "display": "System Object" },
        "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role",
                  "code": "20", "display": "Job" },
        "detail": detail,
    })];
    if show_patient && let Some(id) = r.key.as_deref().and_then(|k| k.strip_prefix("patient:")) {
        let system = identity::parse_person_id(id, true)
            .map(|p| p.kind.system())
            .unwrap_or("urn:knutepunkt:patient");
        entities.push(json!({
            "what": { "identifier": { "system": system, "value": id } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                      "code": "1", "display": "Person" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role",
                      "code": "1", "display": "Patient" },
        }));
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": format!("kp-audit-{}", r.id),
        "type": ty,
        "subtype": [rest_subtype, { "system": STEP_SYSTEM, "code": r.kind }],
        "action": action,
        "recorded": instant(r.at_ms),
        "outcome": outcome(r),
        "agent": agents,
        "source": {
            "site": "knutepunkt",
            "observer": { "display": "knutepunkt" },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                       "code": "4", "display": "Application Server" }],
        },
        "entity": entities,
    });
    if let Some(d) = r.detail.as_deref().filter(|d| !d.is_empty()) {
        let d = if show_patient {
            d.to_string()
        } else {
            redact(d).into_owned()
        };
        ev["outcomeDesc"] = Value::String(d);
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, key: &str, detail: &str) -> AuditRecord {
        AuditRecord {
            id: 7,
            chain_seq: Some(7),
            hash: Some("ab".repeat(32)),
            at_ms: 1_767_225_600_000,
            event_id: "019594ab-2900-7000-8000-000000000001".into(),
            kind: kind.into(),
            destination: Some("epj".into()),
            attempt: Some(1),
            status: Some(400),
            latency_ms: Some(3.0),
            detail: Some(detail.into()),
            vendor: Some("scaip".into()),
            category: Some("alarm".into()),
            tenant: Some("5001".into()),
            key: Some(key.into()),
        }
    }

    #[test]
    fn patient_identity_only_when_allowed() {
        let r = rec(
            "dead_lettered",
            "patient:13497248005",
            "HTTP 400: 13497248005 unknown",
        );
        let hidden = audit_event(&r, false).to_string();
        assert!(!hidden.contains("13497248005"), "{hidden}");
        let shown = audit_event(&r, true);
        assert_eq!(
            shown["entity"][1]["what"]["identifier"]["value"],
            "13497248005"
        );
        assert_eq!(shown["outcome"], "8");
        assert_eq!(shown["type"]["code"], "110106");
        assert_eq!(mask_key("patient:13497248005"), "patient:134972*****");
        assert_eq!(mask_key("device:d-1"), "device:d-1");
    }

    #[test]
    fn filter_description_names_the_filter_without_identity_numbers() {
        let q = AuditQuery {
            vendor: Some("scaip".into()),
            event_id: Some("13497248005".into()),
            limit: 5,
            ..Default::default()
        };
        let d = describe(&q);
        assert!(d.contains("vendor=scaip") && d.contains("limit=5"), "{d}");
        assert!(!d.contains("13497248005"), "{d}");
    }
}
