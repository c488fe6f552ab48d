//! Alarm-path admin endpoints (documented in `docs/api.md`):
//!
//! - `GET  /v1/admin/escalations?all=&limit=` lists open (or all) escalations;
//! - `POST /v1/admin/escalations/{id}/acknowledge` `{by, note?}`: an operator takes it (audited);
//! - `POST /v1/admin/devices/{vendor}/{device_id}/deactivation` `{until, reason, by, from?}`
//!   starts a time-limited deactivation (open-ended or longer than `deactivation.max_s`: 400);
//! - `DELETE /v1/admin/devices/{vendor}/{device_id}/deactivation?by=` ends it early;
//! - `GET  /v1/admin/deactivations?vendor=&device=&active=` lists deactivations.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::devices::{TimeIn, time};
use crate::api_error::ApiError;
use crate::app::AppState;
use crate::clock::now_ms;
use crate::journal::JournalError;
use crate::journal::alarm::{
    AlarmOp, AlarmOut, Deactivation, DeactivationQuery, EscalationQuery, NewDeactivation,
};
use crate::journal::registry_text::instant;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/escalations", get(escalations))
        .route("/v1/admin/escalations/{id}/acknowledge", post(acknowledge))
        .route("/v1/admin/deactivations", get(deactivations))
        .route(
            "/v1/admin/devices/{vendor}/{device_id}/deactivation",
            post(deactivate)
                .delete(reactivate)
                .get(device_deactivations),
        )
}

fn jerr(state: &AppState) -> impl Fn(JournalError) -> ApiError + '_ {
    |e| ApiError::from_journal(e, state.ingest.retry_after_s)
}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        field: field.into(),
        message: message.into(),
    }
}

/// Who did it: an operator name or id, as the audit trail records it.
fn operator(by: Option<&str>) -> Result<String, ApiError> {
    let by = by.map(str::trim).unwrap_or_default();
    if by.is_empty() || by.len() > 128 || by.chars().any(char::is_control) {
        return Err(bad(
            "by",
            "by (the operator, as recorded in the audit trail) must be 1-128 visible characters",
        ));
    }
    Ok(by.to_string())
}

fn text(field: &str, v: &str, max: usize) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(bad(
            field,
            format!("{field} must be 1-{max} visible characters"),
        ));
    }
    Ok(v.to_string())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    all: Option<bool>,
    limit: Option<usize>,
}

async fn escalations(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let q = EscalationQuery {
        all: q.all.unwrap_or(false),
        limit: q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
    };
    let rows = state.journal.escalations(q).await.map_err(jerr(&state))?;
    let open = state
        .journal
        .open_escalations()
        .await
        .map_err(jerr(&state))?;
    Ok(Json(json!({ "open": open, "escalations": rows })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    by: Option<String>,
    note: Option<String>,
}

async fn acknowledge(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
    body: Result<Json<AckBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body.map_err(|e| {
        bad(
            "body",
            format!("expected JSON {{by, note?}}: {}", e.body_text()),
        )
    })?;
    let by = operator(b.by.as_deref())?;
    let note = b
        .note
        .as_deref()
        .map(|n| text("note", n, 1000))
        .transpose()?;
    let op = AlarmOp::Acknowledge {
        id,
        by,
        note,
        at_ms: now_ms(),
    };
    match state.journal.alarm_op(op).await.map_err(jerr(&state))? {
        AlarmOut::Escalation(e) => {
            tracing::info!(escalation = e.id, "escalation acknowledged");
            Ok(Json(json!(e)))
        }
        _ => Err(ApiError::from_journal(
            JournalError::Unavailable("unexpected journal answer".into()),
            state.ingest.retry_after_s,
        )),
    }
}

fn deactivation_json(d: &Deactivation) -> Value {
    let mut v = json!(d);
    v["from"] = json!(instant(d.from_ms));
    v["until"] = json!(instant(d.until_ms));
    v["active"] = json!(d.active_at(now_ms()));
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeactivateBody {
    until: Option<TimeIn>,
    reason: Option<String>,
    by: Option<String>,
    from: Option<TimeIn>,
}

async fn deactivate(
    State(state): State<Arc<AppState>>,
    Path((vendor, device)): Path<(String, String)>,
    body: Result<Json<DeactivateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| {
        bad(
            "body",
            format!(
                "expected JSON {{until, reason, by, from?}}: {}",
                e.body_text()
            ),
        )
    })?;
    let spec = state
        .vendors
        .get(&vendor)
        .ok_or_else(|| ApiError::UnknownVendor(vendor.clone()))?;
    let device = text("device_id", &device, 128)?;
    // A deactivation without an end is how the door alarm in Helsetilsynet's 2025 case stayed
    // off for months: every deactivation must end by itself.
    let Some(until) = &b.until else {
        return Err(bad(
            "until",
            "until is required: a deactivation must end (open-ended deactivations are refused)",
        ));
    };
    let until = time("until", until)?;
    let now = now_ms();
    let from = b
        .from
        .as_ref()
        .map(|f| time("from", f))
        .transpose()?
        .unwrap_or(now);
    if until <= from.max(now) {
        return Err(bad("until", "until must be in the future and after from"));
    }
    let max = state.alarm.config.deactivation_max.as_millis() as i64;
    if until - from.min(now) > max {
        return Err(bad(
            "until",
            format!(
                "a deactivation may last at most {} s (deactivation.max_s)",
                max / 1000
            ),
        ));
    }
    let reason = text("reason", b.reason.as_deref().unwrap_or_default(), 1000)?;
    let by = operator(b.by.as_deref())?;
    let op = AlarmOp::Deactivate(NewDeactivation {
        vendor: spec.name.clone(),
        device_id: device,
        from_ms: from,
        until_ms: until,
        reason,
        by,
    });
    match state.journal.alarm_op(op).await.map_err(jerr(&state))? {
        AlarmOut::Deactivation(d) => {
            tracing::warn!(vendor = %d.vendor, device = %d.device_id, until_ms = d.until_ms,
                "device deactivated");
            state.alarm.active.upsert(d.clone());
            Ok((StatusCode::CREATED, Json(deactivation_json(&d))).into_response())
        }
        _ => Err(ApiError::from_journal(
            JournalError::Unavailable("unexpected journal answer".into()),
            state.ingest.retry_after_s,
        )),
    }
}

#[derive(Debug, Deserialize)]
struct ByQuery {
    by: Option<String>,
}

async fn reactivate(
    State(state): State<Arc<AppState>>,
    Path((vendor, device)): Path<(String, String)>,
    Query(q): Query<ByQuery>,
) -> Result<Json<Value>, ApiError> {
    let by = operator(q.by.as_deref())?;
    let op = AlarmOp::EndDeactivation {
        vendor,
        device_id: device,
        by,
        at_ms: now_ms(),
    };
    match state.journal.alarm_op(op).await.map_err(jerr(&state))? {
        AlarmOut::Deactivation(d) => {
            state.alarm.active.upsert(d.clone());
            Ok(Json(deactivation_json(&d)))
        }
        _ => Err(ApiError::from_journal(
            JournalError::Unavailable("unexpected journal answer".into()),
            state.ingest.retry_after_s,
        )),
    }
}

#[derive(Debug, Deserialize)]
struct DeactivationFilter {
    vendor: Option<String>,
    device: Option<String>,
    active: Option<bool>,
    limit: Option<usize>,
}

async fn deactivations(
    State(state): State<Arc<AppState>>,
    Query(f): Query<DeactivationFilter>,
) -> Result<Json<Value>, ApiError> {
    let q = DeactivationQuery {
        vendor: f.vendor,
        device_id: f.device,
        active_at_ms: f.active.unwrap_or(false).then(now_ms),
        limit: f.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
    };
    let rows = state.journal.deactivations(q).await.map_err(jerr(&state))?;
    let out: Vec<Value> = rows.iter().map(deactivation_json).collect();
    Ok(Json(json!({ "deactivations": out })))
}

async fn device_deactivations(
    State(state): State<Arc<AppState>>,
    Path((vendor, device)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let q = DeactivationQuery {
        vendor: Some(vendor),
        device_id: Some(device),
        active_at_ms: None,
        limit: DEFAULT_LIMIT,
    };
    let rows = state.journal.deactivations(q).await.map_err(jerr(&state))?;
    let out: Vec<Value> = rows.iter().map(deactivation_json).collect();
    Ok(Json(json!({ "deactivations": out })))
}
