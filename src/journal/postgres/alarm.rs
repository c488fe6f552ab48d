//! Escalation and deactivation reads on a pooled connection.

use tokio_postgres::{GenericClient, Row};

use crate::journal::alarm::{Deactivation, DeactivationQuery, Escalation, EscalationQuery};
use crate::journal::{JournalError, Liveness};

pub const ESCALATION_COLUMNS: &str = "x.id, x.delivery_id, x.event_id, x.dest, x.fallback,
    x.fallback_delivery_id, x.deadline_ms, x.stored_at, x.escalated_at, x.acked_at, x.acked_by,
    x.ack_note, coalesce(d.state, 'unknown')";

pub fn escalation_row(r: &Row) -> Escalation {
    Escalation {
        id: r.get(0),
        delivery_id: r.get(1),
        event_id: r.get(2),
        destination: r.get(3),
        fallback: r.get(4),
        fallback_delivery_id: r.get(5),
        deadline_ms: r.get(6),
        stored_at_ms: r.get(7),
        escalated_at_ms: r.get(8),
        acknowledged_at_ms: r.get(9),
        acknowledged_by: r.get(10),
        note: r.get(11),
        delivery_state: r.get(12),
    }
}

pub const DEACTIVATION_COLUMNS: &str = "id, vendor, device_id, from_at, until_at, reason,
    created_by, created_at, ended_at, ended_by, reminded_at";

pub fn deactivation_row(r: &Row) -> Deactivation {
    Deactivation {
        id: r.get(0),
        vendor: r.get(1),
        device_id: r.get(2),
        from_ms: r.get(3),
        until_ms: r.get(4),
        reason: r.get(5),
        created_by: r.get(6),
        created_at_ms: r.get(7),
        ended_at_ms: r.get(8),
        ended_by: r.get(9),
        reminded_at_ms: r.get(10),
    }
}

pub async fn escalations(
    c: &impl GenericClient,
    q: &EscalationQuery,
) -> Result<Vec<Escalation>, JournalError> {
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            &format!(
                "SELECT {ESCALATION_COLUMNS} FROM escalations x
                 LEFT JOIN deliveries d ON d.id = x.delivery_id
                 WHERE ($1 OR x.acked_at IS NULL) ORDER BY x.id DESC LIMIT $2"
            ),
            &[&q.all, &limit],
        )
        .await?;
    Ok(rows.iter().map(escalation_row).collect())
}

pub async fn open_escalations(c: &impl GenericClient) -> Result<i64, JournalError> {
    Ok(c.query_one(
        "SELECT count(*) FROM escalations WHERE acked_at IS NULL",
        &[],
    )
    .await?
    .get(0))
}

pub async fn deactivations(
    c: &impl GenericClient,
    q: &DeactivationQuery,
) -> Result<Vec<Deactivation>, JournalError> {
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            &format!(
                "SELECT {DEACTIVATION_COLUMNS} FROM device_deactivations
                 WHERE ($1::TEXT IS NULL OR vendor = $1) AND ($2::TEXT IS NULL OR device_id = $2)
                   AND ($3::BIGINT IS NULL OR (from_at <= $3 AND until_at > $3
                                               AND (ended_at IS NULL OR ended_at > $3)))
                 ORDER BY id DESC LIMIT $4"
            ),
            &[&q.vendor, &q.device_id, &q.active_at_ms, &limit],
        )
        .await?;
    Ok(rows.iter().map(deactivation_row).collect())
}

pub async fn silent_devices(
    c: &impl GenericClient,
    vendor: &str,
    before: i64,
    limit: usize,
) -> Result<Vec<Liveness>, JournalError> {
    let now = crate::clock::now_ms();
    let limit = limit.max(1) as i64;
    let rows = c
        .query(
            "SELECT vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats
             FROM device_liveness WHERE vendor = $1 AND last_seen_at < $2
             ORDER BY last_seen_at DESC LIMIT $3",
            &[&vendor, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| super::registry::liveness_row(r, now))
        .collect())
}
