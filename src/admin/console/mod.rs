//! The web console: server-rendered HTML pages under `/console` for operations staff (documented
//! in `docs/operations.md`, *Web console*). It reads the same journal views as the JSON admin API
//! and replays dead letters through the same journal call (`Journal::replay`, which audits each
//! replay), then wakes the destination's dispatcher exactly as the API does.
//!
//! Every runtime value is rendered through [`html::escape`] (the [`html::Html`] builder accepts
//! markup only as `'static` literals). Patient identifiers are masked (first six characters and
//! `*****`), since the console has no roles yet. Assets are embedded in the binary; the pages need
//! no network access beyond the gateway itself.

mod alarm;
mod audit_page;
pub mod html;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::TenantScope;
use crate::journal::registry_text::instant;
use crate::journal::{
    DeadLetterQuery, EventDetail, JournalError, LaneQuery, QuarantineQuery, ReplayFilter,
};
use html::{Html, age, mask_in_text, mask_key, url_encode};

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");
const ICON: &str = include_str!("icon.svg");

/// Rows shown per table (and the widest scan used for per-vendor counts).
const PAGE_ROWS: usize = 500;
const VENDOR_SCAN: usize = 10_000;
/// A pending delivery older than this, or a lane head retried this often, is shown in red.
const SLOW_MS: i64 = 60_000;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console", get(overview))
        .route("/console/", get(overview))
        .route("/console/lanes", get(lanes))
        .route("/console/dead-letters", get(dead_letters))
        .route("/console/dead-letters/replay", post(replay_filtered))
        .route(
            "/console/dead-letters/{delivery_id}/replay",
            post(replay_one),
        )
        .route("/console/events", get(event_search))
        .route("/console/events/{id}", get(event))
        .route("/console/quarantine", get(quarantine))
        .route("/console/audit", get(audit_page::audit))
        .route("/console/static/console.css", get(css))
        .route("/console/static/console.js", get(js))
        .route("/console/static/icon.svg", get(icon))
}

// ---- Responses -------------------------------------------------------------------------------

fn html_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Only our own embedded CSS and JS; no inline script, no framing, no external fetches.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: with it the browser sends `Origin: null`, which the replay forms refuse.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

fn asset(body: &'static str, ctype: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Which page the navigation highlights.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Overview,
    Lanes,
    DeadLetters,
    Events,
    Quarantine,
    Audit,
}

/// The whole document around `body`.
fn page(title: &str, nav: Nav, notice: Option<&str>, body: Html) -> String {
    let mut h = Html::new();
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<title>")
        .text(title)
        .raw(" · knutepunkt console</title>")
        .raw("<link rel=\"icon\" href=\"/console/static/icon.svg\">")
        .raw("<link rel=\"stylesheet\" href=\"/console/static/console.css\">")
        .raw("<script src=\"/console/static/console.js\" defer></script></head><body>")
        .raw("<header><a class=\"brand\" href=\"/console\">knutepunkt</a><nav>");
    for (n, href, label) in [
        (Nav::Overview, "/console", "Overview"),
        (Nav::Lanes, "/console/lanes", "Lanes"),
        (Nav::DeadLetters, "/console/dead-letters", "Dead letters"),
        (Nav::Events, "/console/events", "Events"),
        (Nav::Quarantine, "/console/quarantine", "Quarantine"),
        (Nav::Audit, "/console/audit", "Audit"),
    ] {
        h.raw(if n == nav {
            "<a class=\"active\" href=\""
        } else {
            "<a href=\""
        })
        .text(href)
        .raw("\">")
        .text(label)
        .raw("</a>");
    }
    h.raw("</nav><form class=\"search\" method=\"get\" action=\"/console/events\">")
        .raw("<input type=\"search\" name=\"id\" placeholder=\"Event id\" aria-label=\"Event id\" required>")
        .raw("<button type=\"submit\">Find event</button></form></header><main>")
        .raw("<h1>")
        .text(title)
        .raw("</h1>");
    if let Some(n) = notice.filter(|n| !n.is_empty()) {
        h.raw("<p class=\"notice\" role=\"status\" id=\"notice\">")
            .text(n)
            .raw("</p>");
    }
    h.append(body);
    h.raw("<footer>Patient identifiers are masked (first 6 characters). Times are UTC. Generated ")
        .text(instant(crate::clock::now_ms()))
        .raw("</footer></main></body></html>");
    h.into_string()
}

fn error_page(status: StatusCode, title: &str, nav: Nav, message: &str) -> Response {
    let mut b = Html::new();
    b.raw("<p class=\"error\">").text(message).raw("</p>");
    html_response(status, page(title, nav, None, b))
}

fn journal_error(e: JournalError, nav: Nav) -> Response {
    let status = match e {
        JournalError::NotFound(_) => StatusCode::NOT_FOUND,
        JournalError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error_page(status, "Journal error", nav, &e.to_string())
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
}

fn status_is_bad(s: Option<i64>) -> bool {
    s.is_some_and(|s| !(200..300).contains(&s))
}

// ---- Overview --------------------------------------------------------------------------------

async fn overview(State(state): State<Arc<AppState>>, scope: TenantScope) -> Response {
    match render_overview(&state, &scope).await {
        Ok(s) => html_response(StatusCode::OK, s),
        Err(e) => journal_error(e, Nav::Overview),
    }
}

async fn render_overview(state: &AppState, scope: &TenantScope) -> Result<String, JournalError> {
    let stats = state.journal.stats().await?;
    let rows = state.journal.destinations().await?;
    let dead = state
        .journal
        .dead_letters(DeadLetterQuery {
            limit: VENDOR_SCAN,
            tenants: scope.query_filter(),
            ..Default::default()
        })
        .await?;
    let mut held = state
        .journal
        .quarantined(QuarantineQuery {
            limit: VENDOR_SCAN,
            ..Default::default()
        })
        .await?;
    held.retain(|e| scope.allows(e.requested_tenant.as_deref()));

    let failing = state
        .journal
        .lanes(LaneQuery {
            destination: None,
            limit: PAGE_ROWS,
            tenants: scope.query_filter(),
        })
        .await?;

    let mut b = Html::new();
    b.raw("<section class=\"cards\">");
    for (label, value, bad) in [
        ("Events", stats.events, false),
        ("Pending deliveries", stats.pending, false),
        ("Delivered", stats.delivered, false),
        ("Dead letters", stats.dead, stats.dead > 0),
        ("Unrouted", stats.unrouted, false),
        ("In quarantine", stats.quarantined, stats.quarantined > 0),
    ] {
        b.raw(if bad {
            "<div class=\"card bad\"><span class=\"n\">"
        } else {
            "<div class=\"card\"><span class=\"n\">"
        })
        .text(value)
        .raw("</span><span class=\"l\">")
        .text(label)
        .raw("</span></div>");
    }
    b.raw("</section>");
    b.append(alarm::overview_section(state).await?);

    b.raw("<h2>Destinations</h2><table id=\"destinations\"><thead><tr><th>Destination</th>")
        .raw("<th class=\"num\">Pending</th><th class=\"num\">Lanes</th><th>Oldest undelivered</th>")
        .raw("<th class=\"num\">Delivered</th><th class=\"num\">Dead letters</th><th>Status</th></tr></thead><tbody>");
    let mut names: Vec<(String, bool)> = state
        .destinations
        .iter()
        .map(|d| (d.clone(), true))
        .collect();
    for r in &rows {
        if !state.destinations.contains(&r.destination) {
            names.push((r.destination.clone(), false));
        }
    }
    for (name, configured) in &names {
        let r = rows.iter().find(|r| &r.destination == name);
        let (pending, lanes, delivered, deadn, oldest) = r
            .map(|r| {
                (
                    r.pending,
                    r.lanes,
                    r.delivered,
                    r.dead,
                    r.oldest_pending_age_ms,
                )
            })
            .unwrap_or((0, 0, 0, 0, None));
        let slow = oldest.is_some_and(|a| a > SLOW_MS);
        let mut problems = Vec::new();
        if !configured {
            problems.push("not configured");
        }
        if deadn > 0 {
            problems.push("dead letters");
        }
        if slow {
            problems.push("backlog is old");
        }
        let failing_lanes = failing
            .iter()
            .filter(|l| {
                &l.destination == name && (l.last_error.is_some() || status_is_bad(l.last_status))
            })
            .count();
        let failing_text = format!("failing ({failing_lanes} lanes retrying)");
        if failing_lanes > 0 {
            problems.push(&failing_text);
        }
        b.raw("<tr><td>")
            .link(
                &format!("/console/lanes?destination={}", url_encode(name)),
                name,
            )
            .raw("</td>")
            .td(pending, false)
            .td(lanes, false)
            .td(oldest.map(age).unwrap_or_else(|| "—".into()), slow)
            .td(delivered, false);
        if deadn > 0 {
            b.raw("<td class=\"bad\">")
                .link(
                    &format!("/console/dead-letters?destination={}", url_encode(name)),
                    deadn,
                )
                .raw("</td>");
        } else {
            b.td(deadn, false);
        }
        if problems.is_empty() {
            b.raw("<td class=\"ok\">OK</td>");
        } else {
            b.td(problems.join(", "), true);
        }
        b.raw("</tr>");
    }
    b.raw("</tbody></table>");

    b.raw("<h2>Vendors</h2><table id=\"vendors\"><thead><tr><th>Vendor</th>")
        .raw("<th class=\"num\">Dead letters</th><th class=\"num\">In quarantine</th></tr></thead><tbody>");
    let mut vendors: Vec<String> = state
        .vendors
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    vendors.sort();
    for v in &vendors {
        let d = dead.iter().filter(|r| &r.vendor == v).count();
        let q = held.iter().filter(|r| &r.vendor == v).count();
        b.raw("<tr><td>").text(v).raw("</td>");
        if d > 0 {
            b.raw("<td class=\"bad\">")
                .link(
                    &format!("/console/dead-letters?vendor={}", url_encode(v)),
                    d,
                )
                .raw("</td>");
        } else {
            b.td(d, false);
        }
        b.td(q, q > 0).raw("</tr>");
    }
    b.raw("</tbody></table><p class=\"hint\">Per-vendor ingest rates and rejections are exported as metrics on <code>/metrics</code>; counts here are from the journal (up to ")
        .text(VENDOR_SCAN)
        .raw(" rows each).</p>");
    Ok(page("Overview", Nav::Overview, None, b))
}

// ---- Lanes -----------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct ListFilter {
    destination: Option<String>,
    vendor: Option<String>,
    notice: Option<String>,
    all: Option<bool>,
}

impl ListFilter {
    fn destination(&self) -> Option<String> {
        self.destination.clone().filter(|s| !s.is_empty())
    }
    fn vendor(&self) -> Option<String> {
        self.vendor.clone().filter(|s| !s.is_empty())
    }
}

/// A `<select>` of configured destinations (plus "all").
fn destination_select(b: &mut Html, state: &AppState, selected: Option<&str>) {
    b.raw("<label>Destination <select name=\"destination\"><option value=\"\">all</option>");
    for d in &state.destinations {
        b.raw(if Some(d.as_str()) == selected {
            "<option selected value=\""
        } else {
            "<option value=\""
        })
        .text(d)
        .raw("\">")
        .text(d)
        .raw("</option>");
    }
    b.raw("</select></label>");
}

fn vendor_select(b: &mut Html, state: &AppState, selected: Option<&str>) {
    b.raw("<label>Vendor <select name=\"vendor\"><option value=\"\">all</option>");
    let mut vendors: Vec<&str> = state.vendors.names();
    vendors.sort();
    for v in vendors {
        b.raw(if Some(v) == selected {
            "<option selected value=\""
        } else {
            "<option value=\""
        })
        .text(v)
        .raw("\">")
        .text(v)
        .raw("</option>");
    }
    b.raw("</select></label>");
}

async fn lanes(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<ListFilter>,
) -> Response {
    let dest = f.destination();
    let rows = match state
        .journal
        .lanes(LaneQuery {
            destination: dest.clone(),
            limit: PAGE_ROWS,
            tenants: scope.query_filter(),
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return journal_error(e, Nav::Lanes),
    };
    let now = crate::clock::now_ms();
    let mut b = Html::new();
    b.raw("<form class=\"filter\" method=\"get\" action=\"/console/lanes\">");
    destination_select(&mut b, &state, dest.as_deref());
    b.raw("<button type=\"submit\">Show</button></form>");
    b.raw("<p class=\"hint\">Non-empty lanes, alarm lanes first, then oldest head first. ")
        .text(rows.len())
        .raw(" shown.</p>");
    b.raw("<table id=\"lanes\"><thead><tr><th>Destination</th><th>Class</th><th>Key</th>")
        .raw("<th class=\"num\">Depth</th><th>Head event</th><th class=\"num\">Head attempts</th>")
        .raw("<th>Oldest</th><th>Next attempt</th><th>In flight</th><th>Last status</th><th>Last error</th></tr></thead><tbody>");
    if rows.is_empty() {
        b.raw("<tr><td colspan=\"11\" class=\"empty\">No pending deliveries.</td></tr>");
    }
    for l in &rows {
        let class = match l.class {
            crate::journal::LaneClass::Alarm => "alarm",
            crate::journal::LaneClass::Normal => "normal",
        };
        let next = l.next_attempt_at_ms - now;
        b.raw("<tr>")
            .td(&l.destination, false)
            .td(class, false)
            .td(mask_key(&l.key), false)
            .td(l.depth, false)
            .raw("<td>")
            .link(
                &format!("/console/events/{}", url_encode(&l.head_event_id)),
                &l.head_event_id,
            )
            .raw("</td>")
            .td(l.head_attempts, l.head_attempts > 1)
            .td(age(l.oldest_age_ms), l.oldest_age_ms > SLOW_MS)
            .td(
                if next > 0 {
                    format!("in {}", age(next))
                } else {
                    "now".into()
                },
                false,
            )
            .td(if l.in_flight { "yes" } else { "no" }, false)
            .td(opt(&l.last_status), status_is_bad(l.last_status))
            .td(opt(&l.last_error), l.last_error.is_some())
            .raw("</tr>");
    }
    b.raw("</tbody></table>");
    html_response(StatusCode::OK, page("Lanes", Nav::Lanes, None, b))
}

// ---- Dead letters and replay -----------------------------------------------------------------

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<ListFilter>,
) -> Response {
    let (dest, vendor) = (f.destination(), f.vendor());
    let rows = match state
        .journal
        .dead_letters(DeadLetterQuery {
            destination: dest.clone(),
            vendor: vendor.clone(),
            limit: PAGE_ROWS,
            tenants: scope.query_filter(),
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return journal_error(e, Nav::DeadLetters),
    };
    let mut b = Html::new();
    b.raw("<div class=\"forms\"><form class=\"filter\" method=\"get\" action=\"/console/dead-letters\">");
    destination_select(&mut b, &state, dest.as_deref());
    vendor_select(&mut b, &state, vendor.as_deref());
    b.raw("<button type=\"submit\">Show</button></form>");
    b.raw("<form class=\"filter replay\" id=\"replay-filter\" method=\"post\" action=\"/console/dead-letters/replay\" data-confirm=\"Replay every dead letter matching this filter?\">")
        .raw("<strong>Replay by filter</strong>");
    destination_select(&mut b, &state, dest.as_deref());
    vendor_select(&mut b, &state, vendor.as_deref());
    b.raw("<label>Limit <input type=\"number\" name=\"limit\" min=\"1\" max=\"10000\" value=\"100\"></label>")
        .raw("<button type=\"submit\" class=\"danger\">Replay matching</button></form></div>");
    b.raw("<p class=\"hint\">Newest first. ")
        .text(rows.len())
        .raw(" shown. A replayed dead letter is queued again at the tail of its lane; the replay is recorded in the event's audit trail.</p>");
    b.raw("<table id=\"dead-letters\"><thead><tr><th class=\"num\">Delivery</th><th>Event</th>")
        .raw("<th>Destination</th><th>Vendor</th><th>Category</th><th class=\"num\">Attempts</th>")
        .raw("<th>Last status</th><th>Reason</th><th>Dead since</th><th></th></tr></thead><tbody>");
    if rows.is_empty() {
        b.raw("<tr><td colspan=\"10\" class=\"empty\">No dead letters.</td></tr>");
    }
    for d in &rows {
        b.raw("<tr data-event-id=\"")
            .text(&d.event_id)
            .raw("\">")
            .td(d.delivery_id, false)
            .raw("<td>")
            .link(
                &format!("/console/events/{}", url_encode(&d.event_id)),
                &d.event_id,
            )
            .raw("</td>")
            .td(&d.destination, false)
            .td(&d.vendor, false)
            .td(&d.category, false)
            .td(d.attempts, false)
            .td(opt(&d.last_status), true)
            .td(opt(&d.reason), false)
            .td(d.dead_at_ms.map(instant).unwrap_or_default(), false)
            .raw("<td><form method=\"post\" action=\"/console/dead-letters/")
            .text(d.delivery_id)
            .raw("/replay\"><button type=\"submit\" class=\"replay\">Replay</button></form></td></tr>");
    }
    b.raw("</tbody></table>");
    html_response(
        StatusCode::OK,
        page("Dead letters", Nav::DeadLetters, f.notice.as_deref(), b),
    )
}

/// A cross-site form must not trigger a replay: when the browser names the page's origin, it has
/// to be this host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or(origin);
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

fn refused(headers: &HeaderMap) -> String {
    let h = |n| {
        headers
            .get(n)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    format!(
        "Cross-origin replay refused: Origin {:?} is not this host ({:?}).",
        h(header::ORIGIN),
        h(header::HOST)
    )
}

/// Replays through the same journal call as the JSON API (audited there), wakes the dispatchers
/// and redirects back to the dead letters with a summary.
async fn do_replay(state: &AppState, filter: ReplayFilter, back: String) -> Response {
    let notice = match state.journal.replay(filter).await {
        Ok(done) => {
            for r in &done {
                state.wakers.wake(&r.destination);
            }
            match done.as_slice() {
                [] => "Nothing replayed: no dead letter matched.".to_string(),
                [one] => format!(
                    "Replayed event {} to {} (new delivery {}).",
                    one.event_id, one.destination, one.new_delivery_id
                ),
                many => format!("Replayed {} dead letters.", many.len()),
            }
        }
        Err(e) => format!("Replay failed: {e}"),
    };
    let sep = if back.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{back}{sep}notice={}", url_encode(&notice))).into_response()
}

async fn replay_one(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    headers: HeaderMap,
    Path(delivery_id): Path<i64>,
) -> Response {
    if !same_origin(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            Nav::DeadLetters,
            &refused(&headers),
        );
    }
    let filter = ReplayFilter {
        delivery_id: Some(delivery_id),
        limit: 1,
        tenants: scope.query_filter(),
        ..Default::default()
    };
    do_replay(&state, filter, "/console/dead-letters".into()).await
}

async fn replay_filtered(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !same_origin(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            Nav::DeadLetters,
            &refused(&headers),
        );
    }
    let mut filter = ReplayFilter {
        limit: 100,
        tenants: scope.query_filter(),
        ..Default::default()
    };
    for (k, v) in html::parse_form(&body) {
        match (k.as_str(), v.trim()) {
            (_, "") => {}
            ("destination", v) => filter.destination = Some(v.to_string()),
            ("vendor", v) => filter.vendor = Some(v.to_string()),
            ("limit", v) => match v.parse::<usize>() {
                Ok(n) => filter.limit = n.clamp(1, 10_000),
                Err(_) => {
                    return error_page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        Nav::DeadLetters,
                        "limit must be a number",
                    );
                }
            },
            _ => {}
        }
    }
    let mut back = String::from("/console/dead-letters");
    let mut sep = '?';
    for (k, v) in [
        ("destination", &filter.destination),
        ("vendor", &filter.vendor),
    ] {
        if let Some(v) = v {
            back.push_str(&format!("{sep}{k}={}", url_encode(v)));
            sep = '&';
        }
    }
    do_replay(&state, filter, back).await
}

// ---- Events ----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct EventSearch {
    id: Option<String>,
}

async fn event_search(Query(q): Query<EventSearch>) -> Response {
    match q.id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => Redirect::to(&format!("/console/events/{}", url_encode(id))).into_response(),
        None => {
            let mut b = Html::new();
            b.raw("<form class=\"filter\" method=\"get\" action=\"/console/events\">")
                .raw("<label>Event id <input type=\"search\" name=\"id\" size=\"40\" required></label>")
                .raw("<button type=\"submit\">Show</button></form>")
                .raw("<p class=\"hint\">The event id is the <code>id</code> in the ingest answer, the <code>Idempotency-Key</code> destinations receive, and the id listed on the lanes and dead letters pages.</p>");
            html_response(StatusCode::OK, page("Find an event", Nav::Events, None, b))
        }
    }
}

async fn event(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Response {
    match state.journal.event(&id).await {
        Ok(Some(ev)) if scope.allows(ev.tenant.as_deref()) => {
            html_response(StatusCode::OK, render_event(&ev))
        }
        Ok(_) => error_page(
            StatusCode::NOT_FOUND,
            "Event not found",
            Nav::Events,
            &format!("No event with id {id:?}."),
        ),
        Err(e) => journal_error(e, Nav::Events),
    }
}

/// CSS class of an audit step in the path.
fn step_class(kind: &str, status: Option<i64>, detail: &Option<String>) -> &'static str {
    match kind {
        "delivered" => "step ok",
        "dead_lettered" | "unrouted" => "step bad",
        "attempt" if status_is_bad(status) || (status.is_none() && detail.is_some()) => "step warn",
        "retry_scheduled" => "step warn",
        "replayed" | "released" => "step info",
        _ => "step",
    }
}

fn render_event(ev: &EventDetail) -> String {
    let mut b = Html::new();
    b.raw("<section class=\"event-summary\"><dl>");
    let rows: [(&str, String); 10] = [
        ("Event id", ev.id.clone()),
        ("Vendor", ev.vendor.clone()),
        ("Vendor event id", opt(&ev.vendor_event_id)),
        ("Category", ev.category.clone()),
        ("Priority", ev.priority.clone()),
        ("Tenant", opt(&ev.tenant)),
        ("Lane key", mask_key(&ev.key)),
        ("Mapping version", ev.mapping_version.clone()),
        ("Received", instant(ev.received_at_ms)),
        ("Stored", instant(ev.stored_at_ms)),
    ];
    for (k, v) in rows {
        b.raw("<dt>").text(k).raw("</dt><dd>").text(v).raw("</dd>");
    }
    b.raw("</dl></section>");

    b.raw("<h2>Deliveries</h2><table id=\"deliveries\"><thead><tr><th class=\"num\">Delivery</th>")
        .raw(
            "<th>Destination</th><th>State</th><th class=\"num\">Attempts</th><th>Last status</th>",
        )
        .raw("<th>Last error</th><th>Delivered at</th></tr></thead><tbody>");
    if ev.deliveries.is_empty() {
        b.raw("<tr><td colspan=\"7\" class=\"empty\">No deliveries (unrouted or in quarantine).</td></tr>");
    }
    for d in &ev.deliveries {
        let state_class = match d.state.as_str() {
            "delivered" => "<td class=\"ok state\">",
            "dead" => "<td class=\"bad state\">",
            _ => "<td class=\"state\">",
        };
        b.raw("<tr>")
            .td(d.delivery_id, false)
            .td(&d.destination, false)
            .raw(state_class)
            .text(&d.state)
            .raw("</td>")
            .td(d.attempts, false)
            .td(opt(&d.last_status), status_is_bad(d.last_status))
            .td(opt(&d.last_error), d.last_error.is_some())
            .td(d.delivered_at_ms.map(instant).unwrap_or_default(), false)
            .raw("</tr>");
    }
    b.raw("</tbody></table>");

    b.raw("<h2>Path</h2><ol class=\"path\" id=\"audit\">");
    for a in &ev.audit {
        b.raw("<li class=\"")
            .text(step_class(&a.kind, a.status, &a.detail))
            .raw("\" data-kind=\"")
            .text(&a.kind)
            .raw("\"><span class=\"kind\">")
            .text(a.kind.replace('_', " "))
            .raw("</span> <time>")
            .text(instant(a.at_ms))
            .raw("</time>");
        if let Some(d) = &a.destination {
            b.raw(" <span class=\"dest\">→ ").text(d).raw("</span>");
        }
        if let Some(n) = a.attempt {
            b.raw(" <span class=\"meta\">attempt ")
                .text(n)
                .raw("</span>");
        }
        if let Some(s) = a.status {
            b.raw(" <span class=\"meta\">status ")
                .text(s)
                .raw("</span>");
        }
        if let Some(l) = a.latency_ms {
            b.raw(" <span class=\"meta\">")
                .text(format!("{l:.1} ms"))
                .raw("</span>");
        }
        if a.kind == "stored" {
            b.raw(" <span class=\"meta\">mapping ")
                .text(&ev.mapping_version)
                .raw("</span>");
        }
        if let Some(d) = &a.detail {
            b.raw("<div class=\"detail\">")
                .text(mask_in_text(d, &ev.key))
                .raw("</div>");
        }
        b.raw("</li>");
    }
    b.raw("</ol>");

    let fhir = serde_json::to_string_pretty(&ev.fhir).unwrap_or_default();
    b.raw("<details id=\"fhir\"><summary>FHIR Bundle (normalised, patient identifier masked)</summary><pre>")
        .text(mask_in_text(&fhir, &ev.key))
        .raw("</pre></details>");
    page(&format!("Event {}", ev.id), Nav::Events, None, b)
}

// ---- Quarantine ------------------------------------------------------------------------------

async fn quarantine(
    State(state): State<Arc<AppState>>,
    scope: TenantScope,
    Query(f): Query<ListFilter>,
) -> Response {
    let all = f.all.unwrap_or(false);
    let mut rows = match state
        .journal
        .quarantined(QuarantineQuery {
            vendor: f.vendor(),
            all,
            limit: PAGE_ROWS,
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return journal_error(e, Nav::Quarantine),
    };
    rows.retain(|e| scope.allows(e.requested_tenant.as_deref()));
    let mut b = Html::new();
    b.raw("<p class=\"hint\">Events held because no device assignment covered their device at the event's time, oldest first. ");
    if all {
        b.raw("Including released ones. <a href=\"/console/quarantine\">Held only</a>.");
    } else {
        b.raw("<a href=\"/console/quarantine?all=true\">Include released</a>.");
    }
    b.raw(" Release with <code>POST /v1/admin/quarantine/{event_id}/replay</code> after assigning the device.</p>");
    b.raw("<table id=\"quarantine\"><thead><tr><th>Event</th><th>Vendor</th><th>Device</th>")
        .raw("<th>Category</th><th>Reason</th><th>Held since</th><th>Age</th><th>Released</th></tr></thead><tbody>");
    if rows.is_empty() {
        b.raw("<tr><td colspan=\"8\" class=\"empty\">Nothing in quarantine.</td></tr>");
    }
    for q in &rows {
        let held = q.released_at_ms.is_none();
        b.raw("<tr><td>")
            .link(
                &format!("/console/events/{}", url_encode(&q.event_id)),
                &q.event_id,
            )
            .raw("</td>")
            .td(&q.vendor, false)
            .td(opt(&q.device_id), false)
            .td(&q.category, false)
            .td(&q.reason, false)
            .td(instant(q.quarantined_at_ms), false)
            .td(age(q.age_ms), held && q.age_ms > SLOW_MS)
            .td(q.released_at_ms.map(instant).unwrap_or_default(), false)
            .raw("</tr>");
    }
    b.raw("</tbody></table>");
    html_response(StatusCode::OK, page("Quarantine", Nav::Quarantine, None, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{AuditEntry, DeliveryInfo};

    fn detail() -> EventDetail {
        EventDetail {
            id: "ev-<1>".into(),
            vendor: "ven\"dor".into(),
            vendor_event_id: Some("<script>alert(1)</script>".into()),
            category: "alarm".into(),
            priority: "high".into(),
            tenant: Some("5001".into()),
            key: "patient:01017012345".into(),
            mapping_version: "fhir@1 & co".into(),
            content_type: "application/fhir+json".into(),
            received_at_ms: 0,
            stored_at_ms: 1,
            fhir: serde_json::json!({"subject": {"value": "01017012345"}, "note": "</pre><b>"}),
            deliveries: vec![DeliveryInfo {
                delivery_id: 7,
                destination: "epj<x>".into(),
                state: "dead".into(),
                attempts: 1,
                last_status: Some(400),
                last_error: Some("400 <html>".into()),
                delivered_at_ms: None,
            }],
            audit: vec![
                AuditEntry {
                    at_ms: 2,
                    kind: "attempt".into(),
                    destination: Some("epj<x>".into()),
                    attempt: Some(1),
                    status: Some(400),
                    latency_ms: Some(3.25),
                    detail: Some("body <i>01017012345</i>".into()),
                },
                AuditEntry {
                    at_ms: 3,
                    kind: "dead_lettered".into(),
                    destination: Some("epj<x>".into()),
                    attempt: None,
                    status: None,
                    latency_ms: None,
                    detail: None,
                },
            ],
        }
    }

    #[test]
    fn event_page_escapes_every_value_and_masks_the_patient() {
        let s = render_event(&detail());
        for raw in [
            "<script>alert",
            "<1>",
            "ven\"dor",
            "epj<x>",
            "<html>",
            "<i>",
            "</pre><b>",
        ] {
            assert!(!s.contains(raw), "unescaped {raw:?} in page");
        }
        assert!(s.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(s.contains("Event ev-&lt;1&gt;"));
        assert!(!s.contains("01017012345"), "patient id must be masked");
        assert!(s.contains("patient:010170*****"));
        assert!(s.contains("fhir@1 &amp; co"));
        assert!(s.contains("3.2 ms") || s.contains("3.3 ms"));
        assert!(s.contains("class=\"step bad\" data-kind=\"dead_lettered\""));
        assert!(s.contains("<td class=\"bad state\">dead</td>"));
    }

    #[test]
    fn layout_escapes_title_and_notice() {
        let s = page("T<i>", Nav::Lanes, Some("done <b>&"), Html::new());
        assert!(s.contains("<title>T&lt;i&gt; · knutepunkt console</title>"));
        assert!(s.contains("done &lt;b&gt;&amp;"));
        assert!(s.contains("<a class=\"active\" href=\"/console/lanes\">Lanes</a>"));
        assert!(s.starts_with("<!doctype html>"));
    }

    #[test]
    fn step_classes() {
        assert_eq!(step_class("delivered", None, &None), "step ok");
        assert_eq!(step_class("attempt", Some(200), &None), "step");
        assert_eq!(step_class("attempt", Some(503), &None), "step warn");
        assert_eq!(
            step_class("attempt", None, &Some("refused".into())),
            "step warn"
        );
        assert_eq!(step_class("dead_lettered", None, &None), "step bad");
    }

    #[test]
    fn origin_check() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        // Escaping once more never hurts the comparison of plain text.
        assert_eq!(html::escape("127.0.0.1"), "127.0.0.1");
    }
}
