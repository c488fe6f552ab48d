//! Ingest: `POST /v1/vendors/{vendor}/events`. Validate, normalise, route, journal (durable),
//! and only then answer 202. Every refusal is an OperationOutcome and stores nothing.

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::clock::now_ms;
use crate::config::validate::is_municipality_number;
use crate::journal::{Appended, NewEvent};
use crate::normalise::{self, Format, RawEvent, VendorSpec};

/// Ingest limits, resolved from config.
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub retry_after_s: u64,
    pub request_timeout: std::time::Duration,
    pub max_json_depth: usize,
    pub in_flight: Semaphore,
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/vendors/{vendor}/events", post(ingest))
}

async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = &state.ingest;
    // Shed load before reading the body: a bounded number of requests is ever buffered.
    let Ok(_slot) = limits.in_flight.try_acquire() else {
        return Err(ApiError::Overloaded {
            retry_after_s: limits.retry_after_s,
        });
    };
    let received_at_ms = now_ms();
    let spec = state
        .vendors
        .get(&vendor)
        .ok_or_else(|| ApiError::UnknownVendor(vendor.clone()))?;
    let content_type = check_content_type(spec, &headers)?;
    let tenant = requested_tenant(spec, &headers)?;
    let idempotency_key = idempotency_key(&headers)?;

    let work = async {
        let body = to_bytes(body, limits.max_body_bytes)
            .await
            .map_err(|_| ApiError::TooLarge {
                limit: limits.max_body_bytes,
            })?;
        let raw = RawEvent {
            id: uuid::Uuid::now_v7().to_string(),
            body: &body,
            tenant,
            max_json_depth: limits.max_json_depth,
        };
        let envelope = match normalise::normalise_outcome(spec, &raw)? {
            normalise::Outcome::Event(e) => e,
            // Liveness only: acknowledged, never journaled as a clinical event.
            normalise::Outcome::Heartbeat(hb) => {
                tracing::debug!(vendor = %hb.vendor, device = %hb.device_key, "heartbeat");
                return Ok(Err(hb));
            }
        };
        let decision = state.router.route(&envelope);
        let event = NewEvent {
            envelope,
            raw: body.to_vec(),
            content_type,
            idempotency_key,
            received_at_ms,
            destinations: decision.destinations,
            routes: decision.routes,
        };
        let dests = event.destinations.clone();
        let appended = state
            .journal
            .append(event)
            .await
            .map_err(|e| ApiError::from_journal(e, limits.retry_after_s))?;
        Ok::<_, ApiError>(Ok((appended, dests)))
    };
    let (appended, dests) = match tokio::time::timeout(limits.request_timeout, work)
        .await
        .map_err(|_| ApiError::Timeout {
            retry_after_s: limits.retry_after_s,
        })?? {
        Ok(stored) => stored,
        Err(hb) => {
            return Ok((
                StatusCode::OK,
                Json(json!({ "status": "heartbeat", "device": hb.device_key })),
            )
                .into_response());
        }
    };
    Ok(match appended {
        Appended::Stored { id } => {
            for d in &dests {
                state.wakers.wake(d);
            }
            let location = format!("/v1/admin/events/{id}");
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(json!({ "id": id, "status": "stored" })),
            )
                .into_response()
        }
        Appended::Duplicate { id } => (
            StatusCode::OK,
            Json(json!({ "id": id, "status": "duplicate" })),
        )
            .into_response(),
    })
}

fn check_content_type(spec: &VendorSpec, headers: &HeaderMap) -> Result<String, ApiError> {
    let got = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = got
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let (ok, expected) = match spec.format {
        Format::Fhir | Format::Json => (
            essence == "application/fhir+json" || essence == "application/json",
            "application/fhir+json or application/json",
        ),
        Format::Xml => (
            matches!(
                essence.as_str(),
                "application/xml" | "text/xml" | "application/scaip+xml"
            ),
            "application/xml, text/xml or application/scaip+xml",
        ),
    };
    if ok {
        Ok(essence)
    } else {
        Err(ApiError::UnsupportedMediaType { got, expected })
    }
}

/// `X-Tenant` names the municipality; it must be in the vendor's allow-list when one is set.
fn requested_tenant(spec: &VendorSpec, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-tenant") else {
        return Ok(None);
    };
    let t = v.to_str().unwrap_or("").trim().to_string();
    if !is_municipality_number(&t) {
        return Err(ApiError::BadRequest {
            field: "X-Tenant".into(),
            message: "X-Tenant must be a 4-digit municipality number, e.g. 0301".into(),
        });
    }
    if !spec.tenants.is_empty() && !spec.tenants.contains(&t) {
        return Err(ApiError::Forbidden {
            field: "X-Tenant".into(),
            message: format!("vendor {:?} may not post for municipality {t}", spec.name),
        });
    }
    Ok(Some(t))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if !s.trim().is_empty() && s.len() <= 200 => Ok(Some(s.trim().to_string())),
        _ => Err(ApiError::BadRequest {
            field: "Idempotency-Key".into(),
            message: "Idempotency-Key must be 1-200 visible ASCII characters".into(),
        }),
    }
}
