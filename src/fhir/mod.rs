//! The EPJ-facing FHIR R4 API under `/fhir` (documented in `docs/api.md`, "FHIR API"):
//! CapabilityStatement, subscription topics, topic-based Subscriptions (R5 Backport IG) with
//! `$status` and `$events`, and the pull feed with journaling acknowledgements.
//!
//! Storage and numbering live in `journal::subs`; delivery in `notify`.

mod feed;
pub mod notify;
pub mod subscription;
pub mod topics;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::auth::TenantScope;
use crate::journal::subs::{SubsOp, SubsOut, SubsRead, SubscriptionRow};
use crate::normalise::Category;

/// Most events one `$events` call returns (page with `eventsSinceNumber`).
pub const MAX_EVENTS_PER_CALL: usize = 1000;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/SubscriptionTopic", get(topic_list))
        .route("/fhir/SubscriptionTopic/{name}", get(topic_read))
        .route("/fhir/Subscription", get(list).post(create))
        .route("/fhir/Subscription/{id}", get(read).delete(delete))
        .route("/fhir/Subscription/{id}/$status", get(status_op))
        .route("/fhir/Subscription/{id}/$events", get(events_op))
        .merge(feed::router())
}

/// A FHIR JSON response.
pub(crate) fn fhir(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    resp
}

pub(crate) fn journal_error(state: &AppState, e: crate::journal::JournalError) -> ApiError {
    ApiError::from_journal(e, state.ingest.retry_after_s)
}

/// Tenant isolation for subscriptions and the feed: whether the caller may use `tenant` (a
/// subscription's `municipality` filter, or the feed's; `None` = every municipality). A caller
/// limited to some municipalities must name one of them: an unfiltered subscription or feed would
/// carry every municipality's events. Create and the feed refuse with this error; reads,
/// `$status`, `$events`, delete and the list hide subscriptions outside the caller's tenants.
pub(crate) fn check_tenant_scope(
    scope: &TenantScope,
    tenant: Option<&str>,
) -> Result<(), ApiError> {
    if scope.allows(tenant) {
        return Ok(());
    }
    let message = match tenant {
        None => "this caller may only see its own municipalities: set a municipality filter".into(),
        Some(t) => format!("municipality {t} is not one of the caller's municipalities"),
    };
    Err(ApiError::Forbidden {
        field: "municipality".into(),
        message,
    })
}

async fn metadata() -> Response {
    let now = notify::instant(crate::clock::now_ms());
    fhir(StatusCode::OK, topics::capability_statement(&now))
}

async fn topic_list() -> Response {
    fhir(StatusCode::OK, topics::topics_bundle())
}

async fn topic_read(Path(name): Path<String>) -> Result<Response, ApiError> {
    let c: Category = name
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no SubscriptionTopic {name:?}")))?;
    Ok(fhir(StatusCode::OK, topics::topic(c)))
}

/// A subscription the caller may see (tenant hook), else `NotFound` like an unknown id.
async fn get_scoped(
    state: &AppState,
    scope: &TenantScope,
    id: &str,
) -> Result<SubscriptionRow, ApiError> {
    let row = get_row(state, id).await?;
    check_tenant_scope(scope, row.spec.tenant.as_deref())
        .map_err(|_| ApiError::NotFound(format!("no Subscription {id}")))?;
    Ok(row)
}

async fn get_row(state: &AppState, id: &str) -> Result<SubscriptionRow, ApiError> {
    match state
        .journal
        .subs_read(SubsRead::Get(id.to_string()))
        .await
        .map_err(|e| journal_error(state, e))?
    {
        SubsOut::Sub(Some(row)) => Ok(*row),
        _ => Err(ApiError::NotFound(format!("no Subscription {id}"))),
    }
}

async fn create(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        field: "body".into(),
        message: format!("not JSON: {e}"),
    })?;
    let id = uuid::Uuid::now_v7().to_string();
    let new = subscription::parse(&value, id.clone(), crate::clock::now_ms())?;
    check_tenant_scope(&scope, new.tenant.as_deref())?;
    // The answer is the resource as stored; the handshake may already have changed its status.
    let body = subscription::render(&SubscriptionRow::new(new.clone()));
    state
        .journal
        .subs(SubsOp::Create(Box::new(new)))
        .await
        .map_err(|e| journal_error(&state, e))?;
    notify::WAKE.notify_one();
    let mut resp = fhir(StatusCode::CREATED, body);
    if let Ok(v) = HeaderValue::from_str(&format!("Subscription/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn list(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
) -> Result<Response, ApiError> {
    let SubsOut::Subs(rows) = state
        .journal
        .subs_read(SubsRead::List)
        .await
        .map_err(|e| journal_error(&state, e))?
    else {
        return Ok(fhir(StatusCode::OK, json!({})));
    };
    let entries: Vec<Value> = rows
        .iter()
        .filter(|r| check_tenant_scope(&scope, r.spec.tenant.as_deref()).is_ok())
        .map(|r| {
            json!({
                "fullUrl": format!("urn:uuid:{}", r.spec.id),
                "resource": subscription::render(r),
                "search": { "mode": "match" }
            })
        })
        .collect();
    Ok(fhir(
        StatusCode::OK,
        json!({ "resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries }),
    ))
}

async fn read(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = get_scoped(&state, &scope, &id).await?;
    Ok(fhir(StatusCode::OK, subscription::render(&row)))
}

async fn delete(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_scoped(&state, &scope, &id).await?;
    state
        .journal
        .subs(SubsOp::Delete(id))
        .await
        .map_err(|e| journal_error(&state, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn status_op(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = get_scoped(&state, &scope, &id).await?;
    let st = notify::status(&row, "query-status", &row.status, &[], &row.spec.payload);
    Ok(fhir(
        StatusCode::OK,
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [{ "fullUrl": format!("urn:uuid:{}", st["id"].as_str().unwrap_or_default()),
                        "resource": st, "search": { "mode": "match" } }]
        }),
    ))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(rename = "eventsSinceNumber")]
    since: Option<String>,
    #[serde(rename = "eventsUntilNumber")]
    until: Option<String>,
    content: Option<String>,
}

fn number(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|s| {
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::BadRequest {
                field: field.into(),
                message: format!("{field} must be a positive event number, got {s:?}"),
            })
    })
    .transpose()
}

/// Replays numbered events straight from the journal: what a subscriber missed while down.
async fn events_op(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let row = get_scoped(&state, &scope, &id).await?;
    let from = number("eventsSinceNumber", q.since.as_deref())?.unwrap_or(1);
    let to = number("eventsUntilNumber", q.until.as_deref())?.unwrap_or(row.events);
    let content = match q.content.as_deref() {
        None => row.spec.payload.clone(),
        Some(c @ ("empty" | "id-only" | "full-resource")) => c.to_string(),
        Some(other) => {
            return Err(ApiError::BadRequest {
                field: "content".into(),
                message: format!("content {other:?} is not empty, id-only or full-resource"),
            });
        }
    };
    let SubsOut::Events(events) = state
        .journal
        .subs_read(SubsRead::Events {
            id: id.clone(),
            from,
            to,
            limit: MAX_EVENTS_PER_CALL,
        })
        .await
        .map_err(|e| journal_error(&state, e))?
    else {
        return Err(ApiError::NotFound(format!("no Subscription {id}")));
    };
    Ok(fhir(
        StatusCode::OK,
        notify::bundle(&row, "query-event", &row.status, &events, &content),
    ))
}
