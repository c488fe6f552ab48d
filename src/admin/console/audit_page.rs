//! `GET /console/audit`: the audit trail searched by event id, vendor, device, destination,
//! time range and outcome. Goes through the same audited search as the JSON API (each search is
//! recorded as `audit-read`); patient identity is masked unless the caller may see it.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::html::{Html, url_encode};
use super::{Nav, html_response, opt, page, status_is_bad, step_class};
use crate::admin::audit::{AuditParams, Caller, audited_search, visible};
use crate::app::AppState;
use crate::journal::registry_text::instant;

/// The filter fields: (query name, label, placeholder).
const FIELDS: [(&str, &str, &str); 7] = [
    ("event_id", "Event id", ""),
    ("vendor", "Vendor", ""),
    ("device", "Device", ""),
    ("destination", "Destination", ""),
    ("from", "From", "2026-01-31T00:00:00Z"),
    ("to", "To", "2026-02-01T00:00:00Z"),
    ("outcome", "Outcome", "delivered, dead_lettered, …"),
];

pub(super) async fn audit(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<crate::auth::Caller>>,
    scope: crate::auth::TenantScope,
    Query(p): Query<AuditParams>,
) -> Response {
    let caller = Caller::or_unnamed(caller, "console");
    let values = [
        &p.event_id,
        &p.vendor,
        &p.device,
        &p.destination,
        &p.from,
        &p.to,
        &p.outcome,
    ];
    let mut b = Html::new();
    b.raw("<form class=\"filter\" id=\"audit-filter\" method=\"get\" action=\"/console/audit\">");
    for ((name, label, hint), value) in FIELDS.iter().zip(values) {
        b.raw("<label>")
            .text(label)
            .raw(" <input type=\"search\" name=\"")
            .text(name)
            .raw("\" value=\"")
            .text(value.as_deref().unwrap_or(""))
            .raw("\" placeholder=\"")
            .text(hint)
            .raw("\"></label>");
    }
    b.raw("<button type=\"submit\">Search</button></form>");
    let any = values
        .iter()
        .any(|v| v.as_deref().is_some_and(|s| !s.trim().is_empty()));
    if !any {
        b.raw("<p class=\"hint\">Narrow by any field; times are ISO 8601 (UTC) or Unix ms. Each search is itself recorded in the audit trail (<code>audit-read</code>). The same filter exports FHIR AuditEvents at <code>/v1/admin/audit/export</code>.</p>");
        return html_response(StatusCode::OK, page("Audit trail", Nav::Audit, None, b));
    }
    let q = match p.query(&scope) {
        Ok(q) => q,
        Err(e) => {
            b.raw("<p class=\"error\">").text(e).raw("</p>");
            return html_response(
                StatusCode::BAD_REQUEST,
                page("Audit trail", Nav::Audit, None, b),
            );
        }
    };
    let rows = match audited_search(&state, &caller, "console audit search", q).await {
        Ok(r) => r,
        Err(e) => {
            b.raw("<p class=\"error\">").text(e).raw("</p>");
            return html_response(
                StatusCode::SERVICE_UNAVAILABLE,
                page("Audit trail", Nav::Audit, None, b),
            );
        }
    };
    b.raw("<table id=\"audit\"><thead><tr><th>Time</th><th>Event</th><th>Step</th>")
        .raw("<th>Vendor</th><th>Destination</th><th class=\"num\">Attempt</th><th>Status</th>")
        .raw("<th>Patient</th><th>Detail</th><th class=\"num\">Chain</th></tr></thead><tbody>");
    if rows.is_empty() {
        b.raw("<tr><td colspan=\"10\" class=\"empty\">No audit records match.</td></tr>");
    }
    for r in rows {
        let r = visible(r, &caller);
        b.raw("<tr class=\"")
            .text(step_class(&r.kind, r.status, &r.detail))
            .raw("\">")
            .td(instant(r.at_ms), false)
            .raw("<td>");
        if r.event_id.contains(':') || r.event_id == "audit" {
            b.text(&r.event_id);
        } else {
            b.link(
                &format!("/console/events/{}", url_encode(&r.event_id)),
                &r.event_id,
            );
        }
        b.raw("</td>")
            .td(&r.kind, false)
            .td(opt(&r.vendor), false)
            .td(opt(&r.destination), false)
            .td(opt(&r.attempt), false)
            .td(opt(&r.status), status_is_bad(r.status))
            .td(opt(&r.key), false)
            .td(opt(&r.detail), false)
            .td(opt(&r.chain_seq), false)
            .raw("</tr>");
    }
    b.raw("</tbody></table>");
    html_response(StatusCode::OK, page("Audit trail", Nav::Audit, None, b))
}
