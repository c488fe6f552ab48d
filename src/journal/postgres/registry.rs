//! Device registry, liveness and quarantine reads on a pooled connection.

use tokio_postgres::GenericClient;

use super::writer::{ASSIGNMENT_COLUMNS, assignment_row};
use crate::clock::now_ms;
use crate::journal::{
    Assignment, AssignmentQuery, JournalError, Liveness, LivenessQuery, QuarantineQuery,
    QuarantinedEvent,
};

pub async fn assignments(
    c: &impl GenericClient,
    q: &AssignmentQuery,
) -> Result<Vec<Assignment>, JournalError> {
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            &format!(
                "SELECT {ASSIGNMENT_COLUMNS} FROM device_assignments
                 WHERE ($1::TEXT IS NULL OR vendor = $1) AND ($2::TEXT IS NULL OR device_id = $2)
                   AND ($3::TEXT IS NULL OR patient_id = $3) AND ($4::TEXT IS NULL OR tenant = $4)
                   AND ($5::BIGINT IS NULL OR (valid_from <= $5 AND (valid_to IS NULL OR valid_to > $5)))
                 ORDER BY vendor, device_id, valid_from LIMIT $6"
            ),
            &[
                &q.vendor,
                &q.device_id,
                &q.patient_id,
                &q.tenant,
                &q.active_at_ms,
                &limit,
            ],
        )
        .await?;
    Ok(rows.iter().map(assignment_row).collect())
}

pub async fn resolve(
    c: &impl GenericClient,
    vendor: &str,
    device_id: &str,
    at_ms: i64,
) -> Result<Option<Assignment>, JournalError> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {ASSIGNMENT_COLUMNS} FROM device_assignments
                 WHERE vendor = $1 AND device_id = $2 AND valid_from <= $3
                   AND (valid_to IS NULL OR valid_to > $3)
                 ORDER BY valid_from DESC LIMIT 1"
            ),
            &[&vendor, &device_id, &at_ms],
        )
        .await?;
    Ok(row.as_ref().map(assignment_row))
}

pub async fn liveness(
    c: &impl GenericClient,
    q: &LivenessQuery,
) -> Result<Vec<Liveness>, JournalError> {
    let now = now_ms();
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            "SELECT vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats
             FROM device_liveness
             WHERE ($1::TEXT IS NULL OR vendor = $1) AND ($2::TEXT IS NULL OR device_id = $2)
               AND ($4::TEXT[] IS NULL OR tenant = ANY($4))
             ORDER BY last_seen_at LIMIT $3",
            &[&q.vendor, &q.device_id, &limit, &q.tenants],
        )
        .await?;
    Ok(rows.iter().map(|r| liveness_row(r, now)).collect())
}

/// The columns `vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats` of
/// `device_liveness`, aged at `now`.
pub(super) fn liveness_row(r: &tokio_postgres::Row, now: i64) -> Liveness {
    let seen: i64 = r.get(3);
    Liveness {
        vendor: r.get(0),
        device_id: r.get(1),
        tenant: r.get(2),
        last_seen_at_ms: seen,
        last_seen_age_ms: (now - seen).max(0),
        last_kind: r.get(4),
        reported_at_ms: r.get(5),
        beats: r.get(6),
    }
}

const QUARANTINE_COLUMNS: &str = "q.event_id, e.vendor, q.device_id, e.category, q.reason,
    q.quarantined_at, e.received_at, q.released_at, q.requested_tenant, e.content_type,
    e.idem_key";

fn quarantine_row(r: &tokio_postgres::Row, now: i64) -> QuarantinedEvent {
    let at: i64 = r.get(5);
    QuarantinedEvent {
        event_id: r.get(0),
        vendor: r.get(1),
        device_id: r.get(2),
        category: r.get(3),
        reason: r.get(4),
        quarantined_at_ms: at,
        age_ms: (now - at).max(0),
        received_at_ms: r.get(6),
        released_at_ms: r.get(7),
        requested_tenant: r.get(8),
        content_type: r.get(9),
        idempotency_key: r.get(10),
        raw: Vec::new(),
    }
}

pub async fn quarantined(
    c: &impl GenericClient,
    q: &QuarantineQuery,
) -> Result<Vec<QuarantinedEvent>, JournalError> {
    let now = now_ms();
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            &format!(
                "SELECT {QUARANTINE_COLUMNS} FROM quarantine q JOIN events e ON e.seq = q.event_seq
                 WHERE ($1::TEXT IS NULL OR e.vendor = $1) AND ($2 OR q.released_at IS NULL)
                 ORDER BY q.quarantined_at LIMIT $3"
            ),
            &[&q.vendor, &q.all, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| quarantine_row(r, now)).collect())
}

pub async fn quarantined_event(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<QuarantinedEvent>, JournalError> {
    let now = now_ms();
    let row = c
        .query_opt(
            &format!(
                "SELECT {QUARANTINE_COLUMNS}, e.raw FROM quarantine q
                 JOIN events e ON e.seq = q.event_seq WHERE q.event_id = $1"
            ),
            &[&id],
        )
        .await?;
    Ok(row.map(|r| {
        let mut q = quarantine_row(&r, now);
        q.raw = r.get(11);
        q
    }))
}
