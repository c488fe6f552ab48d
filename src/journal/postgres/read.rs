//! Admin read models on a pooled connection.

use tokio_postgres::GenericClient;

use crate::clock::now_ms;
use crate::journal::{
    AuditEntry, DeadLetter, DeadLetterQuery, DeliveryInfo, DestinationQueue, DestinationStats,
    EventDetail, JournalError, JournalStats, LaneClass, LaneInfo, LaneQuery, QueueFigures,
};

fn opt_i64(v: Option<i32>) -> Option<i64> {
    v.map(i64::from)
}

pub async fn lanes(c: &impl GenericClient, q: &LaneQuery) -> Result<Vec<LaneInfo>, JournalError> {
    let now = now_ms();
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            "SELECT l.dest, l.class, l.lane_key, l.next_attempt_at, l.leased, l.lease_until,
                    d.event_id, d.attempts, d.created_at, d.last_status, d.last_error,
                    (SELECT count(*) FROM deliveries p WHERE p.dest = l.dest AND p.class = l.class
                       AND p.lane_key = l.lane_key AND p.state = 'pending')
             FROM lanes l JOIN deliveries d ON d.id = l.head_id JOIN events e ON e.seq = d.event_seq
             WHERE l.head_id <> 0 AND ($1::TEXT IS NULL OR l.dest = $1)
               AND ($3::TEXT[] IS NULL OR e.tenant = ANY($3))
             ORDER BY l.class, d.created_at LIMIT $2",
            &[&q.destination, &limit, &q.tenants],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let class: i16 = r.get(1);
            let leased: i64 = r.get(4);
            let lease_until: i64 = r.get(5);
            let attempts: i32 = r.get(7);
            let created: i64 = r.get(8);
            LaneInfo {
                destination: r.get(0),
                class: LaneClass::from_i64(i64::from(class)),
                key: r.get(2),
                next_attempt_at_ms: r.get(3),
                in_flight: leased != 0 && lease_until >= now,
                head_event_id: r.get(6),
                head_attempts: i64::from(attempts),
                oldest_age_ms: (now - created).max(0),
                last_status: opt_i64(r.get(9)),
                last_error: r.get(10),
                depth: r.get(11),
            }
        })
        .collect())
}

pub async fn destinations(c: &impl GenericClient) -> Result<Vec<DestinationStats>, JournalError> {
    let now = now_ms();
    let rows = c
        .query(
            "SELECT dest,
                    (SELECT count(*) FROM lanes l WHERE l.dest = d.dest AND l.head_id <> 0),
                    count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'delivered'),
                    count(*) FILTER (WHERE state = 'dead'),
                    min(created_at) FILTER (WHERE state = 'pending')
             FROM deliveries d GROUP BY dest ORDER BY dest",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let oldest: Option<i64> = r.get(5);
            DestinationStats {
                destination: r.get(0),
                lanes: r.get(1),
                pending: r.get(2),
                delivered: r.get(3),
                dead: r.get(4),
                oldest_pending_age_ms: oldest.map(|o| (now - o).max(0)),
            }
        })
        .collect())
}

pub async fn dead_letters(
    c: &impl GenericClient,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, JournalError> {
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            "SELECT d.id, d.event_id, d.dest, e.vendor, e.category, d.attempts, d.last_status, d.last_error,
                    d.dead_at
             FROM deliveries d JOIN events e ON e.seq = d.event_seq
             WHERE d.state = 'dead' AND ($1::TEXT IS NULL OR d.dest = $1) AND ($2::TEXT IS NULL OR e.vendor = $2)
               AND ($4::TEXT[] IS NULL OR e.tenant = ANY($4))
             ORDER BY d.id DESC LIMIT $3",
            &[&q.destination, &q.vendor, &limit, &q.tenants],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let attempts: i32 = r.get(5);
            DeadLetter {
                delivery_id: r.get(0),
                event_id: r.get(1),
                destination: r.get(2),
                vendor: r.get(3),
                category: r.get(4),
                attempts: i64::from(attempts),
                last_status: opt_i64(r.get(6)),
                reason: r.get(7),
                dead_at_ms: r.get(8),
            }
        })
        .collect())
}

pub async fn event(c: &impl GenericClient, id: &str) -> Result<Option<EventDetail>, JournalError> {
    let Some(r) = c
        .query_opt(
            "SELECT seq, vendor, vendor_event_id, category, priority, tenant, key, mapping_version,
                    content_type, received_at, stored_at, fhir
             FROM events WHERE id = $1",
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let seq: i64 = r.get(0);
    let fhir: String = r.get(11);
    let mut detail = EventDetail {
        id: id.to_string(),
        vendor: r.get(1),
        vendor_event_id: r.get(2),
        category: r.get(3),
        priority: r.get(4),
        tenant: r.get(5),
        key: r.get(6),
        mapping_version: r.get(7),
        content_type: r.get(8),
        received_at_ms: r.get(9),
        stored_at_ms: r.get(10),
        fhir: serde_json::from_str(&fhir).unwrap_or(serde_json::Value::String(fhir)),
        deliveries: Vec::new(),
        audit: Vec::new(),
    };
    detail.deliveries = c
        .query(
            "SELECT id, dest, state, attempts, last_status, last_error, delivered_at
             FROM deliveries WHERE event_seq = $1 ORDER BY id",
            &[&seq],
        )
        .await?
        .iter()
        .map(|r| {
            let attempts: i32 = r.get(3);
            DeliveryInfo {
                delivery_id: r.get(0),
                destination: r.get(1),
                state: r.get(2),
                attempts: i64::from(attempts),
                last_status: opt_i64(r.get(4)),
                last_error: r.get(5),
                delivered_at_ms: r.get(6),
            }
        })
        .collect();
    detail.audit = c
        .query(
            "SELECT at, kind, dest, attempt, status, latency_ms, detail FROM audit
             WHERE event_id = $1 ORDER BY id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| AuditEntry {
            at_ms: r.get(0),
            kind: r.get(1),
            destination: r.get(2),
            attempt: opt_i64(r.get(3)),
            status: opt_i64(r.get(4)),
            latency_ms: r.get(5),
            detail: r.get(6),
        })
        .collect();
    Ok(Some(detail))
}

/// The queue gauges' figures. Each part reads a partial index (pending, dead, open quarantine) or
/// the non-empty lanes, so the cost follows the queue, not the delivered history.
pub async fn queue_figures(c: &impl GenericClient) -> Result<QueueFigures, JournalError> {
    let now = now_ms();
    let rows = c
        .query(
            "SELECT dest, sum(lanes)::BIGINT, sum(pending)::BIGINT, sum(dead)::BIGINT, min(oldest)
             FROM (SELECT dest, count(*) AS lanes, 0 AS pending, 0 AS dead, NULL::BIGINT AS oldest
                     FROM lanes WHERE head_id <> 0 GROUP BY dest
                   UNION ALL
                   SELECT dest, 0, count(*), 0, min(created_at)
                     FROM deliveries WHERE state = 'pending' GROUP BY dest
                   UNION ALL
                   SELECT dest, 0, 0, count(*), NULL
                     FROM deliveries WHERE state = 'dead' GROUP BY dest) q
             GROUP BY dest ORDER BY dest",
            &[],
        )
        .await?;
    let destinations = rows
        .iter()
        .map(|r| {
            let oldest: Option<i64> = r.get(4);
            DestinationQueue {
                destination: r.get(0),
                lanes: r.get(1),
                pending: r.get(2),
                dead: r.get(3),
                oldest_pending_age_ms: oldest.map(|o| (now - o).max(0)),
            }
        })
        .collect();
    let q = c
        .query_one(
            "SELECT count(*) FROM quarantine WHERE released_at IS NULL",
            &[],
        )
        .await?;
    Ok(QueueFigures {
        destinations,
        quarantined: q.get(0),
    })
}

pub async fn stats(c: &impl GenericClient) -> Result<JournalStats, JournalError> {
    let e = c
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE routed_to = 0 AND seq NOT IN
                        (SELECT event_seq FROM quarantine WHERE released_at IS NULL)),
                    (SELECT count(*) FROM quarantine WHERE released_at IS NULL)
             FROM events",
            &[],
        )
        .await?;
    let d = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'delivered'),
                    count(*) FILTER (WHERE state = 'dead') FROM deliveries",
            &[],
        )
        .await?;
    Ok(JournalStats {
        events: e.get(0),
        unrouted: e.get(1),
        pending: d.get(0),
        delivered: d.get(1),
        dead: d.get(2),
        quarantined: e.get(2),
    })
}
