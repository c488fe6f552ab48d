//! Device registry, device liveness and quarantine endpoints (documented in `docs/api.md`).
//!
//! - `POST /v1/admin/devices/{vendor}/{device_id}/assignments` assigns a device to a patient for
//!   a period (409 when it overlaps another assignment of the device);
//! - `GET  /v1/admin/devices/{vendor}/{device_id}/assignments` and
//!   `GET  /v1/admin/devices?vendor=&device=&patient=&tenant=&active_at=` list assignments;
//! - `POST /v1/admin/devices/{vendor}/{device_id}/assignments/{id}/end` ends one;
//! - `GET  /v1/admin/devices/liveness?vendor=&device=` lists when devices were last seen;
//! - `GET  /v1/admin/quarantine?vendor=&all=` lists held events;
//! - `POST /v1/admin/quarantine/{event_id}/replay` maps a held event again (resolving its device
//!   through the registry) and routes it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::auth::TenantScope;
use crate::clock::now_ms;
use crate::config::validate::is_municipality_number;
use crate::ingest::{normalise_resolved, uncovered};
use crate::journal::registry_text::instant;
use crate::journal::{
    Assignment, AssignmentQuery, JournalError, Liveness, LivenessQuery, NewAssignment,
    QuarantineQuery, Release,
};
use crate::normalise::datetime::{self, TimeFormat, Zone};
use crate::normalise::{MapError, Outcome, RawEvent, VendorSpec, identity};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
const MAX_DEVICE_ID: usize = 128;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/devices", get(list))
        .route("/v1/admin/devices/liveness", get(liveness))
        .route(
            "/v1/admin/devices/{vendor}/{device_id}/assignments",
            post(assign).get(list_device),
        )
        .route(
            "/v1/admin/devices/{vendor}/{device_id}/assignments/{id}/end",
            post(end),
        )
        .route("/v1/admin/quarantine", get(quarantine))
        .route("/v1/admin/quarantine/{event_id}/replay", post(replay))
}

fn jerr(state: &AppState) -> impl Fn(JournalError) -> ApiError + '_ {
    |e| ApiError::from_journal(e, state.ingest.retry_after_s)
}

fn limit(l: Option<usize>) -> usize {
    l.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
}

fn vendor_spec<'a>(state: &'a AppState, vendor: &str) -> Result<&'a VendorSpec, ApiError> {
    state
        .vendors
        .get(vendor)
        .ok_or_else(|| ApiError::UnknownVendor(vendor.to_string()))
}

fn device_id(raw: &str) -> Result<String, ApiError> {
    let d = raw.trim();
    if d.is_empty() || d.len() > MAX_DEVICE_ID || d.chars().any(char::is_control) {
        return Err(ApiError::BadRequest {
            field: "device_id".into(),
            message: format!("device id must be 1-{MAX_DEVICE_ID} visible characters"),
        });
    }
    Ok(d.to_string())
}

/// A time in a request: ISO 8601 text (UTC when it has no offset) or epoch milliseconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum TimeIn {
    Ms(i64),
    Text(String),
}

pub(crate) fn time(field: &str, t: &TimeIn) -> Result<i64, ApiError> {
    match t {
        TimeIn::Ms(ms) => Ok(*ms),
        TimeIn::Text(s) => datetime::parse(s, TimeFormat::Iso, Zone::Utc)
            .map(|d| d.epoch_ms)
            .map_err(|e| ApiError::BadRequest {
                field: field.into(),
                message: format!("{field}: {e}"),
            }),
    }
}

fn assignment_json(a: &Assignment) -> Value {
    let mut v = json!(a);
    v["valid_from"] = json!(instant(a.valid_from_ms));
    v["valid_to"] = json!(a.valid_to_ms.map(instant));
    let now = now_ms();
    v["active"] = json!(a.valid_from_ms <= now && a.valid_to_ms.is_none_or(|t| t > now));
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    patient_id: String,
    tenant: String,
    valid_from: Option<TimeIn>,
    valid_to: Option<TimeIn>,
    note: Option<String>,
}

async fn assign(
    State(state): State<Arc<AppState>>,
    Path((vendor, device)): Path<(String, String)>,
    body: Result<Json<AssignBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::BadRequest {
        field: "body".into(),
        message: format!(
            "expected JSON {{patient_id, tenant, valid_from?, valid_to?, note?}}: {}",
            e.body_text()
        ),
    })?;
    let spec = vendor_spec(&state, &vendor)?;
    let device = device_id(&device)?;
    let tenant = b.tenant.trim().to_string();
    if !is_municipality_number(&tenant) {
        return Err(ApiError::BadRequest {
            field: "tenant".into(),
            message: "tenant must be a 4-digit municipality number, e.g. 0301".into(),
        });
    }
    if !spec.tenants.is_empty() && !spec.tenants.contains(&tenant) {
        return Err(ApiError::Forbidden {
            field: "tenant".into(),
            message: format!(
                "vendor {:?} may not post for municipality {tenant}",
                spec.name
            ),
        });
    }
    // The same identity rules as for identifiers in payloads (test numbers only for test tenants).
    let patient = identity::parse_person_id(&b.patient_id, spec.test_tenants.contains(&tenant))
        .map_err(|e| MapError::unmappable("patient_id", e))?;
    let valid_from = match &b.valid_from {
        Some(t) => time("valid_from", t)?,
        None => now_ms(),
    };
    let valid_to = b
        .valid_to
        .as_ref()
        .map(|t| time("valid_to", t))
        .transpose()?;
    if valid_to.is_some_and(|to| to <= valid_from) {
        return Err(MapError::unmappable("valid_to", "valid_to must be after valid_from").into());
    }
    if b.note.as_ref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::BadRequest {
            field: "note".into(),
            message: "note is limited to 1000 bytes".into(),
        });
    }
    let a = state
        .journal
        .assign_device(NewAssignment {
            vendor: spec.name.clone(),
            device_id: device,
            patient_id: patient.value,
            tenant,
            valid_from_ms: valid_from,
            valid_to_ms: valid_to,
            note: b.note,
        })
        .await
        .map_err(jerr(&state))?;
    tracing::info!(vendor = %a.vendor, device = %a.device_id, assignment = a.id, "device assigned");
    Ok((StatusCode::CREATED, Json(assignment_json(&a))).into_response())
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EndBody {
    at: Option<TimeIn>,
}

async fn end(
    State(state): State<Arc<AppState>>,
    Path((vendor, device, id)): Path<(String, String, i64)>,
    body: Option<Json<EndBody>>,
) -> Result<Json<Value>, ApiError> {
    let spec = vendor_spec(&state, &vendor)?;
    let device = device_id(&device)?;
    let at = match body.and_then(|Json(b)| b.at) {
        Some(t) => time("at", &t)?,
        None => now_ms(),
    };
    let a = state
        .journal
        .end_assignment(id, &spec.name, &device, at)
        .await
        .map_err(jerr(&state))?;
    tracing::info!(vendor = %a.vendor, device = %a.device_id, assignment = a.id, "device assignment ended");
    Ok(Json(assignment_json(&a)))
}

#[derive(Debug, Deserialize)]
struct ListFilter {
    vendor: Option<String>,
    device: Option<String>,
    patient: Option<String>,
    tenant: Option<String>,
    active_at: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<ListFilter>,
) -> Result<Json<Value>, ApiError> {
    let active_at = match f.active_at.as_deref() {
        None => None,
        Some("now") => Some(now_ms()),
        Some(s) => Some(match s.parse::<i64>() {
            Ok(ms) => ms,
            Err(_) => time("active_at", &TimeIn::Text(s.to_string()))?,
        }),
    };
    // A patient filter matches the stored (normalised) form of the number.
    let patient = f.patient.map(|p| {
        p.chars()
            .filter(|c| !c.is_whitespace() && *c != '.')
            .collect()
    });
    let q = AssignmentQuery {
        vendor: f.vendor,
        device_id: f.device.map(|d| d.trim().to_string()),
        patient_id: patient,
        tenant: f.tenant,
        active_at_ms: active_at,
        limit: limit(f.limit),
    };
    let mut rows = state.journal.assignments(q).await.map_err(jerr(&state))?;
    rows.retain(|a| scope.allows(Some(&a.tenant)));
    Ok(Json(
        json!({ "assignments": rows.iter().map(assignment_json).collect::<Vec<_>>() }),
    ))
}

async fn list_device(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path((vendor, device)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let spec = vendor_spec(&state, &vendor)?;
    let q = AssignmentQuery {
        vendor: Some(spec.name.clone()),
        device_id: Some(device_id(&device)?),
        limit: MAX_LIMIT,
        ..Default::default()
    };
    let mut rows = state.journal.assignments(q).await.map_err(jerr(&state))?;
    rows.retain(|a| scope.allows(Some(&a.tenant)));
    Ok(Json(
        json!({ "assignments": rows.iter().map(assignment_json).collect::<Vec<_>>() }),
    ))
}

#[derive(Debug, Deserialize)]
struct LivenessFilter {
    vendor: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
}

fn liveness_json(l: &Liveness) -> Value {
    let mut v = json!(l);
    v["last_seen_at"] = json!(instant(l.last_seen_at_ms));
    v
}

async fn liveness(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<LivenessFilter>,
) -> Result<Json<Value>, ApiError> {
    let q = LivenessQuery {
        vendor: f.vendor,
        device_id: f.device.map(|d| d.trim().to_string()),
        limit: limit(f.limit),
        tenants: scope.query_filter(),
    };
    let rows = state.journal.liveness(q).await.map_err(jerr(&state))?;
    Ok(Json(
        json!({ "devices": rows.iter().map(liveness_json).collect::<Vec<_>>() }),
    ))
}

#[derive(Debug, Deserialize)]
struct QuarantineFilter {
    vendor: Option<String>,
    all: Option<bool>,
    limit: Option<usize>,
}

async fn quarantine(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<QuarantineFilter>,
) -> Result<Json<Value>, ApiError> {
    let q = QuarantineQuery {
        vendor: f.vendor,
        all: f.all.unwrap_or(false),
        limit: limit(f.limit),
    };
    let mut rows = state.journal.quarantined(q).await.map_err(jerr(&state))?;
    rows.retain(|e| scope.allows(e.requested_tenant.as_deref()));
    Ok(Json(json!({ "quarantined": rows })))
}

async fn replay(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let held = state
        .journal
        .quarantined_event(&event_id)
        .await
        .map_err(jerr(&state))?
        .filter(|e| scope.allows(e.requested_tenant.as_deref()))
        .ok_or_else(|| ApiError::NotFound(format!("event {event_id:?} is not in quarantine")))?;
    if let Some(at) = held.released_at_ms {
        return Err(ApiError::Conflict(format!(
            "event {event_id} was already released from quarantine at {}",
            instant(at)
        )));
    }
    let spec = state.vendors.get(&held.vendor).ok_or_else(|| {
        ApiError::Conflict(format!(
            "vendor {:?} of event {event_id} is no longer configured",
            held.vendor
        ))
    })?;
    // The same event id: the same received time, so the registry is asked at the same instant.
    let raw = RawEvent {
        id: held.event_id.clone(),
        body: &held.raw,
        tenant: held.requested_tenant.clone(),
        max_json_depth: state.ingest.max_json_depth,
        max_xml_depth: state.ingest.max_xml_depth,
    };
    let (outcome, lookup) = normalise_resolved(&state, spec, &raw).await?;
    let Outcome::Event(envelope) = outcome else {
        return Err(ApiError::Conflict(format!(
            "event {event_id} now maps to a heartbeat; nothing to release"
        )));
    };
    let assignment = match &lookup {
        Some(l) => match &l.found {
            Some(a) => a.id,
            None => {
                return Err(ApiError::Conflict(format!(
                    "{}; add an assignment with POST /v1/admin/devices/{}/{}/assignments, then \
                     replay again",
                    uncovered(&l.query),
                    spec.name,
                    l.query.device_id
                )));
            }
        },
        // The mapping now finds a patient identifier in the payload itself.
        None => 0,
    };
    let decision = state.router.route(&envelope);
    let detail = if assignment > 0 {
        format!(
            "patient resolved through device assignment {assignment}; mapping {}",
            envelope.mapping_version
        )
    } else {
        format!("mapped again with mapping {}", envelope.mapping_version)
    };
    let dests = decision.destinations.clone();
    state
        .journal
        .release(Release {
            envelope,
            destinations: decision.destinations,
            routes: decision.routes,
            detail,
        })
        .await
        .map_err(jerr(&state))?;
    for d in &dests {
        state.wakers.wake(d);
    }
    tracing::info!(event = %event_id, assignment, "quarantined event released");
    Ok(Json(json!({
        "id": event_id,
        "status": "released",
        "assignment_id": (assignment > 0).then_some(assignment),
        "destinations": dests,
    })))
}
