//! Admin read models, served from a separate connection (WAL readers never block the writer).

use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::now_ms;
use crate::journal::{
    AuditEntry, DeadLetter, DeadLetterQuery, DeliveryInfo, DestinationQueue, DestinationStats,
    EventDetail, JournalStats, LaneClass, LaneInfo, LaneQuery, QueueFigures,
};

pub fn lanes(c: &Connection, q: &LaneQuery) -> Result<Vec<LaneInfo>, rusqlite::Error> {
    let now = now_ms();
    let mut stmt = c.prepare_cached(
        "SELECT l.dest, l.class, l.lane_key, l.next_attempt_at, l.leased,
                d.event_id, d.attempts, d.created_at, d.last_status, d.last_error,
                (SELECT count(*) FROM deliveries p WHERE p.dest = l.dest AND p.class = l.class
                   AND p.lane_key = l.lane_key AND p.state = 'pending')
         FROM lanes l JOIN deliveries d ON d.id = l.head_id JOIN events e ON e.seq = d.event_seq
         WHERE (?1 IS NULL OR l.dest = ?1)
           AND (?3 IS NULL OR e.tenant IN (SELECT value FROM json_each(?3)))
         ORDER BY l.class, d.created_at LIMIT ?2",
    )?;
    let limit = q.limit.max(1) as i64;
    let tenants = tenants_json(q.tenants.as_deref());
    let rows = stmt.query_map(params![q.destination, limit, tenants], |r| {
        let created: i64 = r.get(7)?;
        Ok(LaneInfo {
            destination: r.get(0)?,
            class: LaneClass::from_i64(r.get(1)?),
            key: r.get(2)?,
            next_attempt_at_ms: r.get(3)?,
            in_flight: r.get::<_, i64>(4)? != 0,
            head_event_id: r.get(5)?,
            head_attempts: r.get(6)?,
            oldest_age_ms: (now - created).max(0),
            last_status: r.get(8)?,
            last_error: r.get(9)?,
            depth: r.get(10)?,
        })
    })?;
    rows.collect()
}

pub fn destinations(c: &Connection) -> Result<Vec<DestinationStats>, rusqlite::Error> {
    let now = now_ms();
    let mut stmt = c.prepare_cached(
        "SELECT dest,
                (SELECT count(*) FROM lanes l WHERE l.dest = d.dest),
                sum(state = 'pending'), sum(state = 'delivered'), sum(state = 'dead'),
                min(CASE WHEN state = 'pending' THEN created_at END)
         FROM deliveries d GROUP BY dest ORDER BY dest",
    )?;
    let rows = stmt.query_map([], |r| {
        let oldest: Option<i64> = r.get(5)?;
        Ok(DestinationStats {
            destination: r.get(0)?,
            lanes: r.get(1)?,
            pending: r.get(2)?,
            delivered: r.get(3)?,
            dead: r.get(4)?,
            oldest_pending_age_ms: oldest.map(|o| (now - o).max(0)),
        })
    })?;
    rows.collect()
}

pub fn dead_letters(
    c: &Connection,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, rusqlite::Error> {
    let mut stmt = c.prepare_cached(
        "SELECT d.id, d.event_id, d.dest, e.vendor, e.category, d.attempts, d.last_status, d.last_error, d.dead_at
         FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.state = 'dead' AND (?1 IS NULL OR d.dest = ?1) AND (?2 IS NULL OR e.vendor = ?2)
           AND (?4 IS NULL OR e.tenant IN (SELECT value FROM json_each(?4)))
         ORDER BY d.id DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            q.destination,
            q.vendor,
            q.limit.max(1) as i64,
            tenants_json(q.tenants.as_deref())
        ],
        |r| {
            Ok(DeadLetter {
                delivery_id: r.get(0)?,
                event_id: r.get(1)?,
                destination: r.get(2)?,
                vendor: r.get(3)?,
                category: r.get(4)?,
                attempts: r.get(5)?,
                last_status: r.get(6)?,
                reason: r.get(7)?,
                dead_at_ms: r.get(8)?,
            })
        },
    )?;
    rows.collect()
}

/// A tenant filter as a JSON array for `json_each` (`None`: no filter).
pub fn tenants_json(tenants: Option<&[String]>) -> Option<String> {
    tenants.map(|t| serde_json::Value::from(t.to_vec()).to_string())
}

pub fn event(c: &Connection, id: &str) -> Result<Option<EventDetail>, rusqlite::Error> {
    let head = c
        .prepare_cached(
            "SELECT seq, vendor, vendor_event_id, category, priority, tenant, key, mapping_version,
                    content_type, received_at, stored_at, fhir
             FROM events WHERE id = ?1",
        )?
        .query_row(params![id], |r| {
            let fhir: String = r.get(11)?;
            Ok((
                r.get::<_, i64>(0)?,
                EventDetail {
                    id: id.to_string(),
                    vendor: r.get(1)?,
                    vendor_event_id: r.get(2)?,
                    category: r.get(3)?,
                    priority: r.get(4)?,
                    tenant: r.get(5)?,
                    key: r.get(6)?,
                    mapping_version: r.get(7)?,
                    content_type: r.get(8)?,
                    received_at_ms: r.get(9)?,
                    stored_at_ms: r.get(10)?,
                    fhir: serde_json::from_str(&fhir).unwrap_or(serde_json::Value::String(fhir)),
                    deliveries: Vec::new(),
                    audit: Vec::new(),
                },
            ))
        })
        .optional()?;
    let Some((seq, mut detail)) = head else {
        return Ok(None);
    };
    detail.deliveries = c
        .prepare_cached(
            "SELECT id, dest, state, attempts, last_status, last_error, delivered_at
             FROM deliveries WHERE event_seq = ?1 ORDER BY id",
        )?
        .query_map(params![seq], |r| {
            Ok(DeliveryInfo {
                delivery_id: r.get(0)?,
                destination: r.get(1)?,
                state: r.get(2)?,
                attempts: r.get(3)?,
                last_status: r.get(4)?,
                last_error: r.get(5)?,
                delivered_at_ms: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    detail.audit = c
        .prepare_cached(
            "SELECT at, kind, dest, attempt, status, latency_ms, detail FROM audit
             WHERE event_id = ?1 ORDER BY id",
        )?
        .query_map(params![id], |r| {
            Ok(AuditEntry {
                at_ms: r.get(0)?,
                kind: r.get(1)?,
                destination: r.get(2)?,
                attempt: r.get(3)?,
                status: r.get(4)?,
                latency_ms: r.get(5)?,
                detail: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(detail))
}

/// The queue gauges' figures. Each part reads a partial index (pending, dead, open quarantine) or
/// the lanes table, so the cost follows the queue, not the delivered history.
pub fn queue_figures(c: &Connection) -> Result<QueueFigures, rusqlite::Error> {
    let now = now_ms();
    let mut stmt = c.prepare_cached(
        "SELECT dest, sum(lanes), sum(pending), sum(dead), min(oldest) FROM (
             SELECT dest, count(*) AS lanes, 0 AS pending, 0 AS dead, NULL AS oldest
               FROM lanes GROUP BY dest
             UNION ALL
             SELECT dest, 0, count(*), 0, min(created_at)
               FROM deliveries WHERE state = 'pending' GROUP BY dest
             UNION ALL
             SELECT dest, 0, 0, count(*), NULL
               FROM deliveries WHERE state = 'dead' GROUP BY dest)
         GROUP BY dest ORDER BY dest",
    )?;
    let destinations = stmt
        .query_map([], |r| {
            let oldest: Option<i64> = r.get(4)?;
            Ok(DestinationQueue {
                destination: r.get(0)?,
                lanes: r.get(1)?,
                pending: r.get(2)?,
                dead: r.get(3)?,
                oldest_pending_age_ms: oldest.map(|o| (now - o).max(0)),
            })
        })?
        .collect::<Result<_, _>>()?;
    let quarantined = c
        .prepare_cached("SELECT count(*) FROM quarantine WHERE released_at IS NULL")?
        .query_row([], |r| r.get(0))?;
    Ok(QueueFigures {
        destinations,
        quarantined,
    })
}

pub fn stats(c: &Connection) -> Result<JournalStats, rusqlite::Error> {
    // An event held in quarantine is not "unrouted": it waits for a device assignment.
    let (events, unrouted, quarantined): (i64, i64, i64) = c.query_row(
        "SELECT count(*),
                coalesce(sum(routed_to = 0 AND seq NOT IN
                    (SELECT event_seq FROM quarantine WHERE released_at IS NULL)), 0),
                (SELECT count(*) FROM quarantine WHERE released_at IS NULL)
         FROM events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let (pending, delivered, dead): (i64, i64, i64) = c.query_row(
        "SELECT coalesce(sum(state = 'pending'), 0), coalesce(sum(state = 'delivered'), 0),
                coalesce(sum(state = 'dead'), 0) FROM deliveries",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(JournalStats {
        events,
        unrouted,
        pending,
        delivered,
        dead,
        quarantined,
    })
}
