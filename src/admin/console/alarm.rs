//! The overview's alarm-path section: open escalations and device deactivations in force, with
//! those about to end flagged (the reminder before a deactivation ends).

use super::html::{Html, url_encode};
use crate::app::AppState;
use crate::clock::now_ms;
use crate::journal::JournalError;
use crate::journal::alarm::{DeactivationQuery, EscalationQuery};
use crate::journal::registry_text::instant;

const ROWS: usize = 50;

pub async fn overview_section(state: &AppState) -> Result<Html, JournalError> {
    let open = state.journal.open_escalations().await?;
    let rows = state
        .journal
        .escalations(EscalationQuery {
            all: false,
            limit: ROWS,
        })
        .await?;
    let now = now_ms();
    let active = state
        .journal
        .deactivations(DeactivationQuery {
            active_at_ms: Some(now),
            limit: ROWS,
            ..Default::default()
        })
        .await?;
    let lead = state.alarm.config.reminder_lead.as_millis() as i64;

    let mut b = Html::new();
    b.raw("<h2>Escalations</h2>");
    if open == 0 {
        b.raw("<p class=\"ok\" id=\"escalations-none\">No open escalations.</p>");
    } else {
        b.raw("<p class=\"bad\">")
            .text(format!(
                "{open} open escalation(s): alarms not delivered within their deadline. \
                 Acknowledge with POST /v1/admin/escalations/{{id}}/acknowledge."
            ))
            .raw("</p>");
        b.raw("<table id=\"escalations\"><thead><tr><th>Id</th><th>Event</th><th>Destination</th>")
            .raw(
                "<th>Fallback</th><th>Escalated</th><th>Original delivery</th></tr></thead><tbody>",
            );
        for e in &rows {
            b.raw("<tr>")
                .td(e.id, true)
                .raw("<td>")
                .link(
                    &format!("/console/events/{}", url_encode(&e.event_id)),
                    &e.event_id,
                )
                .raw("</td>")
                .td(&e.destination, false)
                .td(e.fallback.as_deref().unwrap_or("—"), false)
                .td(instant(e.escalated_at_ms), false)
                .td(&e.delivery_state, e.delivery_state != "delivered")
                .raw("</tr>");
        }
        b.raw("</tbody></table>");
    }
    b.raw("<h2>Device deactivations</h2>");
    if active.is_empty() {
        b.raw("<p id=\"deactivations-none\">No device is deactivated.</p>");
    } else {
        b.raw("<table id=\"deactivations\"><thead><tr><th>Device</th><th>Until</th>")
            .raw("<th>Reason</th><th>By</th><th>Status</th></tr></thead><tbody>");
        for d in &active {
            let ending = d.until_ms - now <= lead;
            b.raw("<tr>")
                .td(format!("{}/{}", d.vendor, d.device_id), false)
                .td(instant(d.until_ms), ending)
                .td(&d.reason, false)
                .td(&d.created_by, false)
                .td(if ending { "ends soon" } else { "deactivated" }, ending)
                .raw("</tr>");
        }
        b.raw("</tbody></table>");
    }
    Ok(b)
}
