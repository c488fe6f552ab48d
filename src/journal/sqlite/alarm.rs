//! Escalations and device deactivations on the embedded journal: schema step 4 and reads.

use rusqlite::{Connection, params};

use crate::journal::Liveness;
use crate::journal::alarm::{Deactivation, DeactivationQuery, Escalation, EscalationQuery};

/// Version 4: escalations of alarm deliveries and time-limited device deactivations.
pub const SCHEMA_V4: &str = "
    CREATE TABLE IF NOT EXISTS escalations (
        id                   INTEGER PRIMARY KEY,
        -- One escalation per delivery row: the scan inserts it in the same transaction that
        -- adds the fallback delivery, so a restart never escalates twice nor forgets one.
        delivery_id          INTEGER NOT NULL UNIQUE,
        event_id             TEXT NOT NULL,
        dest                 TEXT NOT NULL,
        fallback             TEXT,
        fallback_delivery_id INTEGER,
        deadline_ms          INTEGER NOT NULL,
        stored_at            INTEGER NOT NULL,
        escalated_at         INTEGER NOT NULL,
        acked_at             INTEGER,
        acked_by             TEXT,
        ack_note             TEXT
    );
    CREATE INDEX IF NOT EXISTS escalations_open ON escalations(id) WHERE acked_at IS NULL;
    -- The escalation scan: undelivered alarm deliveries by destination and age.
    CREATE INDEX IF NOT EXISTS deliveries_alarm_open ON deliveries(dest, created_at)
        WHERE class = 0 AND state IN ('pending', 'dead');
    CREATE TABLE IF NOT EXISTS device_deactivations (
        id           INTEGER PRIMARY KEY,
        vendor       TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        from_at      INTEGER NOT NULL,
        until_at     INTEGER NOT NULL,
        reason       TEXT NOT NULL,
        created_by   TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        ended_at     INTEGER,
        ended_by     TEXT,
        reminded_at  INTEGER,
        expired_at   INTEGER
    );
    CREATE INDEX IF NOT EXISTS device_deactivations_device
        ON device_deactivations(vendor, device_id, until_at);
";

pub const ESCALATION_COLUMNS: &str = "x.id, x.delivery_id, x.event_id, x.dest, x.fallback,
    x.fallback_delivery_id, x.deadline_ms, x.stored_at, x.escalated_at, x.acked_at, x.acked_by,
    x.ack_note, coalesce(d.state, 'unknown')";

pub fn escalation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Escalation> {
    Ok(Escalation {
        id: r.get(0)?,
        delivery_id: r.get(1)?,
        event_id: r.get(2)?,
        destination: r.get(3)?,
        fallback: r.get(4)?,
        fallback_delivery_id: r.get(5)?,
        deadline_ms: r.get(6)?,
        stored_at_ms: r.get(7)?,
        escalated_at_ms: r.get(8)?,
        acknowledged_at_ms: r.get(9)?,
        acknowledged_by: r.get(10)?,
        note: r.get(11)?,
        delivery_state: r.get(12)?,
    })
}

pub const DEACTIVATION_COLUMNS: &str = "id, vendor, device_id, from_at, until_at, reason,
    created_by, created_at, ended_at, ended_by, reminded_at";

pub fn deactivation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deactivation> {
    Ok(Deactivation {
        id: r.get(0)?,
        vendor: r.get(1)?,
        device_id: r.get(2)?,
        from_ms: r.get(3)?,
        until_ms: r.get(4)?,
        reason: r.get(5)?,
        created_by: r.get(6)?,
        created_at_ms: r.get(7)?,
        ended_at_ms: r.get(8)?,
        ended_by: r.get(9)?,
        reminded_at_ms: r.get(10)?,
    })
}

pub fn escalations(c: &Connection, q: &EscalationQuery) -> rusqlite::Result<Vec<Escalation>> {
    c.prepare_cached(&format!(
        "SELECT {ESCALATION_COLUMNS} FROM escalations x LEFT JOIN deliveries d ON d.id = x.delivery_id
         WHERE (?1 OR x.acked_at IS NULL) ORDER BY x.id DESC LIMIT ?2"
    ))?
    .query_map(params![q.all, q.limit.max(1) as i64], escalation_row)?
    .collect()
}

pub fn open_escalations(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row(
        "SELECT count(*) FROM escalations WHERE acked_at IS NULL",
        [],
        |r| r.get(0),
    )
}

pub fn deactivations(c: &Connection, q: &DeactivationQuery) -> rusqlite::Result<Vec<Deactivation>> {
    c.prepare_cached(&format!(
        "SELECT {DEACTIVATION_COLUMNS} FROM device_deactivations
         WHERE (?1 IS NULL OR vendor = ?1) AND (?2 IS NULL OR device_id = ?2)
           AND (?3 IS NULL OR (from_at <= ?3 AND until_at > ?3
                               AND (ended_at IS NULL OR ended_at > ?3)))
         ORDER BY id DESC LIMIT ?4"
    ))?
    .query_map(
        params![q.vendor, q.device_id, q.active_at_ms, q.limit.max(1) as i64],
        deactivation_row,
    )?
    .collect()
}

pub fn silent_devices(
    c: &Connection,
    vendor: &str,
    before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Liveness>> {
    let now = crate::clock::now_ms();
    c.prepare_cached(
        "SELECT vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats
         FROM device_liveness WHERE vendor = ?1 AND last_seen_at < ?2
         ORDER BY last_seen_at DESC LIMIT ?3",
    )?
    .query_map(params![vendor, before, limit.max(1) as i64], |r| {
        super::registry::liveness_row(r, now)
    })?
    .collect()
}
