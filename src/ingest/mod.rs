//! Ingest: `POST /v1/vendors/{vendor}/events`. Validate, normalise, route, journal (durable),
//! and only then answer 202. Every refusal is an OperationOutcome and stores nothing.
//!
//! Device-only payloads (no patient identifier) are resolved through the device registry in the
//! journal at the event's time. When no assignment covers the device, the vendor mapping's
//! `output.missing_patient` decides: `reject` (422), `device` (deliver keyed by device) or
//! `quarantine` (journaled, not routed, 202 `quarantined`; released by an operator through
//! `POST /v1/admin/quarantine/{id}/replay`). Heartbeats update device liveness (durably) and
//! answer 200.

pub mod limits;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::clock::now_ms;
use crate::config::validate::is_municipality_number;
use crate::journal::registry_text::instant;
use crate::journal::{Appended, Assignment, DeviceBeat, NewEvent, QuarantineInfo};
use crate::normalise::mapping::MissingPatient;
use crate::normalise::{
    self, Answer, DeviceQuery, Format, Outcome, Probe, RawEvent, Registered, VendorSpec,
};
use crate::telemetry::events::{EventStored, IngestAnswered, IngestOutcome, IngestRejected};

/// Ingest limits, resolved from config.
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub retry_after_s: u64,
    pub request_timeout: std::time::Duration,
    pub max_json_depth: usize,
    pub max_xml_depth: usize,
    pub in_flight: Semaphore,
    /// `[ingest.vendor.<name>]` limits; vendors not listed have none beyond the global ones.
    pub per_vendor: HashMap<String, limits::VendorLimit>,
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/vendors/{vendor}/events", post(ingest))
}

/// Answers through [`ingest_inner`] and records the request's metrics.
async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
    peer: Option<Extension<tls::VendorPeer>>,
    scope: crate::auth::TenantScope,
    body: Body,
) -> Response {
    let started = std::time::Instant::now();
    let known = state.vendors.get(&vendor).map(|s| s.name.clone());
    let peer = peer.map(|Extension(p)| p);
    // One trace per event: this span (a child of the vendor's `traceparent`, if it sent one)
    // is stored with the event, and every delivery attempt becomes its child. No patient data.
    let span = tracing::info_span!(
        "ingest",
        otel.kind = "server",
        vendor = known.as_deref().unwrap_or("unknown"),
        category = tracing::field::Empty,
        event_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    crate::telemetry::traces::set_parent(
        &span,
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
    );
    let response = match ingest_inner(
        State(Arc::clone(&state)),
        Path(vendor),
        headers,
        peer,
        scope,
        body,
    )
    .instrument(span.clone())
    .await
    {
        Ok(r) => r,
        Err(e) => {
            // The reason may quote the payload; the log formatter redacts identity numbers.
            span.in_scope(|| tracing::info!(error = %e, "ingest refused"));
            IngestRejected {
                vendor: known.as_deref().unwrap_or("unknown"),
                reason: limits::reject_reason(&e),
            }
            .emit(&state.telemetry);
            e.into_response()
        }
    };
    span.record("http.response.status_code", response.status().as_u16());
    let outcome = response
        .extensions()
        .get::<IngestOutcome>()
        .copied()
        .unwrap_or(IngestOutcome::Rejected);
    IngestAnswered {
        vendor: known.as_deref().unwrap_or("unknown"),
        outcome,
        status: response.status().as_u16(),
        duration: started.elapsed(),
    }
    .emit(&state.telemetry);
    response
}

fn tagged(outcome: IngestOutcome, r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    r.extensions_mut().insert(outcome);
    r
}

async fn ingest_inner(
    State(state): State<Arc<AppState>>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
    peer: Option<tls::VendorPeer>,
    scope: crate::auth::TenantScope,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = &state.ingest;
    // Shed load before reading the body: a bounded number of requests is ever buffered.
    let Ok(_slot) = limits.in_flight.try_acquire() else {
        return Err(ApiError::Overloaded {
            retry_after_s: limits.retry_after_s,
        });
    };
    // On the vendor port the client certificate decides which vendor may post.
    tls::authorise(&state, peer.as_ref(), &vendor).await?;
    let received_at_ms = now_ms();
    let spec = state
        .vendors
        .get(&vendor)
        .ok_or_else(|| ApiError::UnknownVendor(vendor.clone()))?;
    // Per-vendor rate before anything else is read: an over-rate vendor costs one lock.
    let vendor_limit = limits.per_vendor.get(&spec.name);
    if let Some(l) = vendor_limit {
        l.admit(std::time::Instant::now())
            .map_err(|retry_after_s| ApiError::RateLimited {
                vendor: spec.name.clone(),
                retry_after_s,
            })?;
    }
    let max_body_bytes = vendor_limit
        .and_then(|l| l.max_body_bytes)
        .unwrap_or(limits.max_body_bytes);
    let content_type = check_content_type(spec, &headers)?;
    let tenant = match requested_tenant(spec, &headers) {
        Err(e @ ApiError::Forbidden { .. }) => {
            tls::refusal(&state, &spec.name, &e.to_string()).await;
            return Err(e);
        }
        other => other?,
    };
    let idempotency_key = idempotency_key(&headers)?;

    // A declared length over the limit is refused before a byte of the body is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes as u64) {
        return Err(ApiError::TooLarge {
            limit: max_body_bytes,
        });
    }

    let work = async {
        // `to_bytes` stops reading once the limit is passed: at most `max_body_bytes` are held.
        let body = to_bytes(body, max_body_bytes)
            .await
            .map_err(|_| ApiError::TooLarge {
                limit: max_body_bytes,
            })?;
        let raw = RawEvent {
            id: uuid::Uuid::now_v7().to_string(),
            body: &body,
            tenant,
            max_json_depth: limits.max_json_depth,
            max_xml_depth: limits.max_xml_depth,
        };
        let (outcome, lookup) = normalise_resolved(&state, spec, &raw).await?;
        let mut envelope = match outcome {
            Outcome::Event(e) => e,
            // Liveness only: recorded durably, never journaled as a clinical event.
            Outcome::Heartbeat(hb) => {
                let device_id = hb
                    .device_key
                    .strip_prefix("device:")
                    .unwrap_or(&hb.device_key)
                    .to_string();
                state
                    .journal
                    .device_beat(DeviceBeat {
                        vendor: hb.vendor.clone(),
                        device_id,
                        seen_at_ms: received_at_ms,
                        reported_at_ms: Some(hb.at_ms),
                        kind: "heartbeat".into(),
                        tenant: hb.tenant.clone(),
                    })
                    .await
                    .map_err(|e| ApiError::from_journal(e, limits.retry_after_s))?;
                tracing::debug!(vendor = %hb.vendor, device = %hb.device_key, "heartbeat");
                return Ok(Stored::Heartbeat(hb.device_key));
            }
        };
        let quarantine = match (&lookup, missing_patient(spec)) {
            (Some(l), MissingPatient::Quarantine) if l.found.is_none() => Some(QuarantineInfo {
                device_id: Some(l.query.device_id.clone()),
                requested_tenant: raw.tenant.clone(),
                reason: uncovered(&l.query),
            }),
            _ => None,
        };
        // A bearer token names the municipalities its holder may post for (no token: the
        // vendor's allow-list alone decides, checked above).
        if !scope.allows(envelope.tenant.as_deref()) {
            let e = ApiError::Forbidden {
                field: "X-Tenant".into(),
                message: format!(
                    "the access token may not post for municipality {}",
                    envelope.tenant.as_deref().unwrap_or("(none)")
                ),
            };
            tls::refusal(&state, &spec.name, &e.to_string()).await;
            return Err(e);
        }
        let span = tracing::Span::current();
        span.record("category", envelope.category.as_str());
        span.record("event_id", envelope.id.as_str());
        let decision = match quarantine {
            Some(_) => Default::default(),
            None => state.router.route(&envelope),
        };
        // Marked, never held back: see alarm/deactivation.rs.
        let device = lookup.as_ref().map(|l| l.query.device_id.as_str());
        let deactivated = crate::alarm::deactivation::find(&state, &envelope, device).await;
        if let Some(d) = &deactivated {
            crate::alarm::deactivation::tag(&mut envelope, d);
        }
        let event = NewEvent {
            envelope,
            raw: body.to_vec(),
            content_type,
            idempotency_key,
            received_at_ms,
            destinations: decision.destinations,
            routes: decision.routes,
            traceparent: crate::telemetry::traces::current_traceparent(),
        };
        let dests = event.destinations.clone();
        let category = event.envelope.category;
        let commit = tracing::info_span!("journal.commit", quarantined = quarantine.is_some());
        let appended = async {
            match quarantine {
                Some(info) => {
                    tracing::info!(
                        vendor = %spec.name,
                        event = %event.envelope.id,
                        device = info.device_id.as_deref().unwrap_or(""),
                        "event quarantined: no device assignment covers the device"
                    );
                    let reason = info.reason.clone();
                    let a = state.journal.append_quarantined(event, info).await;
                    a.map(|a| (a, Some(reason)))
                }
                None => state.journal.append(event).await.map(|a| (a, None)),
            }
        }
        .instrument(commit)
        .await
        .map_err(|e| ApiError::from_journal(e, limits.retry_after_s))?;
        if let (Appended::Stored { .. }, _) = &appended {
            EventStored {
                vendor: &spec.name,
                category,
            }
            .emit(&state.telemetry);
        }
        if let ((Appended::Stored { id }, _), Some(d)) = (&appended, &deactivated) {
            crate::alarm::deactivation::note(&state, id, d).await;
        }
        Ok::<_, ApiError>(Stored::Event(appended, dests, category.lane_class()))
    };
    let (appended, dests, class) = match tokio::time::timeout(limits.request_timeout, work)
        .await
        .map_err(|_| ApiError::Timeout {
        retry_after_s: limits.retry_after_s,
    })?? {
        Stored::Event(appended, dests, class) => (appended, dests, class),
        Stored::Heartbeat(device_key) => {
            return Ok(tagged(
                IngestOutcome::Heartbeat,
                (
                    StatusCode::OK,
                    Json(json!({ "status": "heartbeat", "device": device_key })),
                ),
            ));
        }
    };
    if let (Appended::Stored { id }, Some(reason)) = &appended {
        let location = format!("/v1/admin/events/{id}");
        return Ok(tagged(
            IngestOutcome::Quarantined,
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(json!({ "id": id, "status": "quarantined", "reason": reason })),
            ),
        ));
    }
    let appended = appended.0;
    Ok(match appended {
        Appended::Stored { id } => {
            for d in &dests {
                state.wakers.wake_class(d, class);
            }
            crate::fhir::notify::WAKE.notify_one();
            let location = format!("/v1/admin/events/{id}");
            tagged(
                IngestOutcome::Stored,
                (
                    StatusCode::ACCEPTED,
                    [(header::LOCATION, location)],
                    Json(json!({ "id": id, "status": "stored" })),
                ),
            )
        }
        Appended::Duplicate { id } => tagged(
            IngestOutcome::Duplicate,
            (
                StatusCode::OK,
                Json(json!({ "id": id, "status": "duplicate" })),
            ),
        ),
    })
}

enum Stored {
    /// The journal's answer; with `Some(reason)` when the event was quarantined.
    /// With the event's destinations and the class of its lanes (whose claim loops to wake).
    Event(
        (Appended, Option<String>),
        Vec<String>,
        crate::journal::LaneClass,
    ),
    Heartbeat(String),
}

fn missing_patient(spec: &VendorSpec) -> MissingPatient {
    spec.mapping
        .as_ref()
        .map_or(MissingPatient::Reject, |m| m.missing_patient)
}

/// Why a device-only event could not be resolved (never names a patient).
pub(crate) fn uncovered(q: &DeviceQuery) -> String {
    format!(
        "no patient identifier in the payload and no device assignment covers device {} \
         (field {}) at {}",
        q.device_id,
        q.device_field,
        instant(q.at_ms)
    )
}

/// The registry lookup made for a device-only payload.
pub(crate) struct Lookup {
    pub query: DeviceQuery,
    pub found: Option<Assignment>,
}

/// Normalises with the device registry: a first mapping pass with a [`Probe`] tells whether the
/// payload has only a device id; if so the journal is asked which patient the device was assigned
/// to at the event's time, and the body is mapped again with that answer.
pub(crate) async fn normalise_resolved(
    state: &AppState,
    spec: &VendorSpec,
    raw: &RawEvent<'_>,
) -> Result<(Outcome, Option<Lookup>), ApiError> {
    let probe = Probe::default();
    let first = normalise::normalise_with(spec, raw, &probe);
    let Some(query) = probe.asked() else {
        return Ok((first?, None));
    };
    let found = state
        .journal
        .resolve_device(&spec.name, &query.device_id, query.at_ms)
        .await
        .map_err(|e| ApiError::from_journal(e, state.ingest.retry_after_s))?;
    let outcome = match &found {
        None => first?,
        Some(a) => {
            let answer = Answer {
                query: query.clone(),
                registered: Some(Registered {
                    assignment_id: a.id,
                    patient_id: a.patient_id.clone(),
                    tenant: a.tenant.clone(),
                }),
            };
            normalise::normalise_with(spec, raw, &answer)?
        }
    };
    Ok((outcome, Some(Lookup { query, found })))
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

#[cfg(test)]
mod header_fuzz;
