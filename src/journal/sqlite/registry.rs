//! Device registry, liveness and quarantine reads (on the read connection).

use rusqlite::{Connection, OptionalExtension, params};

use super::writer::assignment_row;
use crate::clock::now_ms;
use crate::journal::{
    Assignment, AssignmentQuery, Liveness, LivenessQuery, QuarantineQuery, QuarantinedEvent,
};

const COLUMNS: &str =
    "id, vendor, device_id, patient_id, tenant, valid_from, valid_to, created_at, note";

pub fn assignments(c: &Connection, q: &AssignmentQuery) -> rusqlite::Result<Vec<Assignment>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM device_assignments
         WHERE (?1 IS NULL OR vendor = ?1) AND (?2 IS NULL OR device_id = ?2)
           AND (?3 IS NULL OR patient_id = ?3) AND (?4 IS NULL OR tenant = ?4)
           AND (?5 IS NULL OR (valid_from <= ?5 AND (valid_to IS NULL OR valid_to > ?5)))
         ORDER BY vendor, device_id, valid_from LIMIT ?6"
    ))?
    .query_map(
        params![
            q.vendor,
            q.device_id,
            q.patient_id,
            q.tenant,
            q.active_at_ms,
            q.limit.max(1) as i64
        ],
        assignment_row,
    )?
    .collect()
}

pub fn resolve(
    c: &Connection,
    vendor: &str,
    device_id: &str,
    at_ms: i64,
) -> rusqlite::Result<Option<Assignment>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM device_assignments
         WHERE vendor = ?1 AND device_id = ?2 AND valid_from <= ?3
           AND (valid_to IS NULL OR valid_to > ?3)
         ORDER BY valid_from DESC LIMIT 1"
    ))?
    .query_row(params![vendor, device_id, at_ms], assignment_row)
    .optional()
}

pub fn liveness(c: &Connection, q: &LivenessQuery) -> rusqlite::Result<Vec<Liveness>> {
    let now = now_ms();
    let limit = q.limit.max(1) as i64;
    let tenants = super::read::tenants_json(q.tenants.as_deref());
    c.prepare_cached(
        "SELECT vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats
         FROM device_liveness
         WHERE (?1 IS NULL OR vendor = ?1) AND (?2 IS NULL OR device_id = ?2)
           AND (?4 IS NULL OR tenant IN (SELECT value FROM json_each(?4)))
         ORDER BY last_seen_at LIMIT ?3",
    )?
    .query_map(params![q.vendor, q.device_id, limit, tenants], |r| {
        liveness_row(r, now)
    })?
    .collect()
}

/// The columns `vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats` of
/// `device_liveness`, aged at `now`.
pub(super) fn liveness_row(r: &rusqlite::Row<'_>, now: i64) -> rusqlite::Result<Liveness> {
    let seen: i64 = r.get(3)?;
    Ok(Liveness {
        vendor: r.get(0)?,
        device_id: r.get(1)?,
        tenant: r.get(2)?,
        last_seen_at_ms: seen,
        last_seen_age_ms: (now - seen).max(0),
        last_kind: r.get(4)?,
        reported_at_ms: r.get(5)?,
        beats: r.get(6)?,
    })
}

const QUARANTINE_COLUMNS: &str = "q.event_id, e.vendor, q.device_id, e.category, q.reason,
    q.quarantined_at, e.received_at, q.released_at, q.requested_tenant, e.content_type,
    e.idem_key";

fn quarantine_row(r: &rusqlite::Row<'_>, now: i64) -> rusqlite::Result<QuarantinedEvent> {
    let at: i64 = r.get(5)?;
    Ok(QuarantinedEvent {
        event_id: r.get(0)?,
        vendor: r.get(1)?,
        device_id: r.get(2)?,
        category: r.get(3)?,
        reason: r.get(4)?,
        quarantined_at_ms: at,
        age_ms: (now - at).max(0),
        received_at_ms: r.get(6)?,
        released_at_ms: r.get(7)?,
        requested_tenant: r.get(8)?,
        content_type: r.get(9)?,
        idempotency_key: r.get(10)?,
        raw: Vec::new(),
    })
}

pub fn quarantined(c: &Connection, q: &QuarantineQuery) -> rusqlite::Result<Vec<QuarantinedEvent>> {
    let now = now_ms();
    c.prepare_cached(&format!(
        "SELECT {QUARANTINE_COLUMNS} FROM quarantine q JOIN events e ON e.seq = q.event_seq
         WHERE (?1 IS NULL OR e.vendor = ?1) AND (?2 OR q.released_at IS NULL)
         ORDER BY q.quarantined_at LIMIT ?3"
    ))?
    .query_map(params![q.vendor, q.all, q.limit.max(1) as i64], |r| {
        quarantine_row(r, now)
    })?
    .collect()
}

pub fn quarantined_event(c: &Connection, id: &str) -> rusqlite::Result<Option<QuarantinedEvent>> {
    let now = now_ms();
    c.prepare_cached(&format!(
        "SELECT {QUARANTINE_COLUMNS}, e.raw FROM quarantine q JOIN events e ON e.seq = q.event_seq
         WHERE q.event_id = ?1"
    ))?
    .query_row(params![id], |r| {
        let mut q = quarantine_row(r, now)?;
        q.raw = r.get(11)?;
        Ok(q)
    })
    .optional()
}
