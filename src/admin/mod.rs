//! Admin and health endpoints (documented in `docs/api.md`).

pub mod audit;
mod console;
pub(crate) mod devices;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::auth::TenantScope;
use crate::journal::{DeadLetterQuery, LaneQuery, ReplayFilter};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .merge(devices::router())
        .merge(console::router())
        .merge(audit::router())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/admin/stats", get(stats))
        .route("/v1/admin/destinations", get(destinations))
        .route("/v1/admin/lanes", get(lanes))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/dead-letters/replay", post(replay_filtered))
        .route(
            "/v1/admin/dead-letters/{delivery_id}/replay",
            post(replay_one),
        )
        .route("/v1/admin/events/{id}", get(event))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "up" }))
}

/// Ready when config is loaded (always, once serving) and a durable write succeeds promptly.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.journal.ping()).await {
        Ok(Ok(())) => {
            Json(json!({ "status": "ready", "vendors": state.vendors.len() })).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": e.to_string() })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": "journal write timed out" })),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct Filter {
    destination: Option<String>,
    vendor: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
    }
}

fn journal_err(state: &AppState) -> impl Fn(crate::journal::JournalError) -> ApiError + '_ {
    |e| ApiError::from_journal(e, state.ingest.retry_after_s)
}

async fn stats(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.journal.stats().await.map_err(journal_err(&state))?;
    Ok(Json(json!(s)))
}

async fn destinations(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = state
        .journal
        .destinations()
        .await
        .map_err(journal_err(&state))?;
    // Every configured destination appears, idle ones with zeros; destinations that still hold
    // deliveries but are no longer configured appear with `configured: false`, so their backlog
    // cannot go unnoticed.
    let mut out: Vec<serde_json::Value> = state
        .destinations
        .iter()
        .map(|name| match rows.iter().find(|r| &r.destination == name) {
            Some(r) => with_configured(json!(r), true),
            None => json!({
                "destination": name, "lanes": 0, "pending": 0, "delivered": 0, "dead": 0,
                "oldest_pending_age_ms": null, "configured": true
            }),
        })
        .collect();
    for r in rows
        .iter()
        .filter(|r| !state.destinations.contains(&r.destination))
    {
        out.push(with_configured(json!(r), false));
    }
    Ok(Json(json!({ "destinations": out })))
}

fn with_configured(mut v: serde_json::Value, configured: bool) -> serde_json::Value {
    v["configured"] = json!(configured);
    v
}

async fn lanes(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<Filter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = LaneQuery {
        destination: f.destination.clone(),
        limit: f.limit(),
        tenants: scope.query_filter(),
    };
    let rows = state.journal.lanes(q).await.map_err(journal_err(&state))?;
    Ok(Json(json!({ "lanes": rows })))
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<Filter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = DeadLetterQuery {
        destination: f.destination.clone(),
        vendor: f.vendor.clone(),
        limit: f.limit(),
        tenants: scope.query_filter(),
    };
    let rows = state
        .journal
        .dead_letters(q)
        .await
        .map_err(journal_err(&state))?;
    Ok(Json(json!({ "dead_letters": rows })))
}

async fn replay_one(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(delivery_id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // Another tenant's dead letter is "not found", exactly like a missing one.
    let filter = ReplayFilter {
        delivery_id: Some(delivery_id),
        limit: 1,
        tenants: scope.query_filter(),
        ..Default::default()
    };
    replay(&state, filter).await
}

async fn replay_filtered(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<Filter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = ReplayFilter {
        delivery_id: None,
        destination: f.destination.clone(),
        vendor: f.vendor.clone(),
        limit: f.limit(),
        tenants: scope.query_filter(),
    };
    replay(&state, filter).await
}

async fn replay(
    state: &AppState,
    filter: ReplayFilter,
) -> Result<Json<serde_json::Value>, ApiError> {
    let done = state
        .journal
        .replay(filter)
        .await
        .map_err(journal_err(state))?;
    for r in &done {
        state.wakers.wake(&r.destination);
    }
    Ok(Json(json!({ "replayed": done })))
}

async fn event(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ev = state
        .journal
        .event(&id)
        .await
        .map_err(journal_err(&state))?;
    ev.filter(|e| scope.allows(e.tenant.as_deref()))
        .map(|e| Json(json!(e)))
        .ok_or_else(|| ApiError::NotFound(format!("no event with id {id:?}")))
}
