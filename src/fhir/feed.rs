//! Pull feed (the JFT ReadAPI pattern): journaled events in commit order behind an opaque
//! cursor, and a journaling status per event: registered → read (returned by the feed) →
//! journaled | failed (acknowledged by the EPJ with `$ack`), audited with `audit_note`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{check_tenant_scope, fhir, journal_error};
use crate::api_error::ApiError;
use crate::app::AppState;
use crate::auth::TenantScope;
use crate::journal::AuditNote;
use crate::journal::subs::{AckState, SubsOp, SubsOut, SubsRead};

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 500;
/// Tag system carrying the journaling status on each returned event Bundle.
pub const STATUS_TAG: &str = "https://knutepunkt.no/fhir/CodeSystem/journaling-status";
const CURSOR_PREFIX: &str = "k1.";

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/fhir/Bundle", get(feed))
        .route("/fhir/Bundle/{id}/$status", get(ack_status))
        .route("/fhir/Bundle/{id}/$ack", post(ack))
}

/// The cursor is opaque to clients: a versioned hex position, so its meaning can change.
pub fn encode_cursor(position: i64) -> String {
    format!("{CURSOR_PREFIX}{position:x}")
}

pub fn decode_cursor(s: &str) -> Option<i64> {
    s.strip_prefix(CURSOR_PREFIX)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .filter(|p| *p >= 0)
}

#[derive(Deserialize)]
struct FeedQuery {
    #[serde(rename = "_cursor")]
    cursor: Option<String>,
    #[serde(rename = "_count")]
    count: Option<String>,
    municipality: Option<String>,
}

async fn feed(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(q): Query<FeedQuery>,
) -> Result<Response, ApiError> {
    let after = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => decode_cursor(c).ok_or_else(|| ApiError::BadRequest {
            field: "_cursor".into(),
            message: "not a cursor from this feed's next link".into(),
        })?,
    };
    let count = match q.count.as_deref() {
        None => DEFAULT_COUNT,
        Some(c) => c
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .ok_or_else(|| ApiError::BadRequest {
                field: "_count".into(),
                message: format!("_count must be 1..={MAX_COUNT}"),
            })?,
    };
    if let Some(m) = &q.municipality
        && !crate::config::validate::is_municipality_number(m)
    {
        return Err(ApiError::BadRequest {
            field: "municipality".into(),
            message: format!("{m:?} is not a 4-digit municipality number, e.g. 0301"),
        });
    }
    check_tenant_scope(&scope, q.municipality.as_deref())?;
    let SubsOut::Feed(items) = state
        .journal
        .subs_read(SubsRead::Feed {
            after,
            tenant: q.municipality.clone(),
            limit: count,
        })
        .await
        .map_err(|e| journal_error(&state, e))?
    else {
        return Err(ApiError::NotFound("feed".into()));
    };
    let registered: Vec<String> = items
        .iter()
        .filter(|i| i.state == "registered")
        .map(|i| i.event_id.clone())
        .collect();
    if !registered.is_empty() {
        state
            .journal
            .subs(SubsOp::FeedRead {
                event_ids: registered,
                at_ms: crate::clock::now_ms(),
            })
            .await
            .map_err(|e| journal_error(&state, e))?;
    }
    let next = items.last().map_or(after, |i| i.position);
    let mut query = format!("_cursor={}&_count={count}", encode_cursor(next));
    if let Some(m) = &q.municipality {
        query.push_str(&format!("&municipality={m}"));
    }
    let entries: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut resource: Value = serde_json::from_str(&i.fhir).unwrap_or(Value::Null);
            // What the reader sees is the state after this read.
            let state = if i.state == "registered" {
                "read"
            } else {
                i.state.as_str()
            };
            let tags = resource["meta"]["tag"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut tags: Vec<Value> = tags
                .into_iter()
                .filter(|t| t["system"].as_str() != Some(STATUS_TAG))
                .collect();
            tags.push(json!({ "system": STATUS_TAG, "code": state }));
            resource["meta"]["tag"] = Value::Array(tags);
            json!({
                "fullUrl": format!("urn:uuid:{}", i.event_id),
                "resource": resource,
                "search": { "mode": "match" }
            })
        })
        .collect();
    Ok(fhir(
        StatusCode::OK,
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            // The next link is always given: an empty page means "caught up, poll again later".
            "link": [{ "relation": "next", "url": format!("Bundle?{query}") }],
            "entry": entries
        }),
    ))
}

fn ack_parameters(a: &AckState) -> Value {
    let mut p = vec![
        json!({ "name": "event", "valueReference": { "reference": format!("Bundle/{}", a.event_id) } }),
        json!({ "name": "status", "valueCode": a.state }),
    ];
    if let Some(r) = &a.reason {
        p.push(json!({ "name": "reason", "valueString": r }));
    }
    json!({ "resourceType": "Parameters", "parameter": p })
}

/// An event of another tenant is reported as unknown, so its existence does not leak.
async fn visible(state: &AppState, scope: &TenantScope, id: &str) -> Result<(), ApiError> {
    let event = state
        .journal
        .event(id)
        .await
        .map_err(|e| journal_error(state, e))?;
    match event {
        Some(e) if scope.allows(e.tenant.as_deref()) => Ok(()),
        _ => Err(ApiError::NotFound(format!("no event {id}"))),
    }
}

async fn current(state: &AppState, id: &str) -> Result<AckState, ApiError> {
    match state
        .journal
        .subs_read(SubsRead::Ack(id.to_string()))
        .await
        .map_err(|e| journal_error(state, e))?
    {
        SubsOut::Ack(Some(a)) => Ok(a),
        _ => Err(ApiError::NotFound(format!("no event {id}"))),
    }
}

async fn ack_status(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible(&state, &scope, &id).await?;
    let a = current(&state, &id).await?;
    Ok(fhir(StatusCode::OK, ack_parameters(&a)))
}

/// `POST /fhir/Bundle/{id}/$ack` with Parameters `status` (journaled | failed, default
/// journaled) and optional `reason`.
async fn ack(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    visible(&state, &scope, &id).await?;
    let params: Value = if body.is_empty() {
        json!({ "resourceType": "Parameters" })
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
            field: "body".into(),
            message: format!("not JSON: {e}"),
        })?
    };
    if params["resourceType"].as_str() != Some("Parameters") {
        return Err(ApiError::BadRequest {
            field: "resourceType".into(),
            message: "expected a Parameters resource".into(),
        });
    }
    let find = |name: &str| {
        params["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some(name))
            .cloned()
    };
    let status = match find("status") {
        None => "journaled".to_string(),
        Some(p) => match p["valueCode"].as_str() {
            Some(s @ ("journaled" | "failed")) => s.to_string(),
            _ => {
                return Err(ApiError::BadRequest {
                    field: "Parameters.parameter(status).valueCode".into(),
                    message: "status must be journaled or failed".into(),
                });
            }
        },
    };
    let reason = find("reason").and_then(|p| p["valueString"].as_str().map(str::to_string));
    state
        .journal
        .subs(SubsOp::Ack {
            event_id: id.clone(),
            state: status.clone(),
            reason: reason.clone(),
            at_ms: crate::clock::now_ms(),
        })
        .await
        .map_err(|e| journal_error(&state, e))?;
    let detail = match &reason {
        Some(r) => format!("{status}: {r}"),
        None => status.clone(),
    };
    state
        .journal
        .audit_note(AuditNote {
            kind: "journaling-ack".into(),
            subject: id.clone(),
            dest: None,
            detail,
        })
        .await
        .map_err(|e| journal_error(&state, e))?;
    let a = current(&state, &id).await?;
    Ok(fhir(StatusCode::OK, ack_parameters(&a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_foreign_text() {
        assert_eq!(decode_cursor(&encode_cursor(0)), Some(0));
        assert_eq!(decode_cursor(&encode_cursor(123_456)), Some(123_456));
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(decode_cursor("k1.zz"), None);
    }
}
