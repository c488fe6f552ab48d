//! Audit search on the embedded journal (read connection).

use rusqlite::{Connection, params};

use crate::journal::{AuditQuery, AuditRecord};

pub fn search(c: &Connection, q: &AuditQuery) -> rusqlite::Result<Vec<AuditRecord>> {
    c.prepare_cached(
        "SELECT a.id, a.chain_seq, a.hash, a.at, a.event_id, a.kind, a.dest, a.attempt, a.status,
                a.latency_ms, a.detail, e.vendor, e.category, e.tenant, e.key
         FROM audit a LEFT JOIN events e ON e.id = a.event_id
         WHERE (?1 IS NULL OR a.event_id = ?1)
           AND (?2 IS NULL OR e.vendor = ?2)
           AND (?3 IS NULL OR e.key = 'device:' || ?3 OR instr(e.fhir, ?3) > 0)
           AND (?4 IS NULL OR a.dest = ?4)
           AND (?5 IS NULL OR a.at >= ?5)
           AND (?6 IS NULL OR a.at < ?6)
           AND (?7 IS NULL OR a.kind = ?7)
           AND (?9 IS NULL OR e.tenant IN (SELECT value FROM json_each(?9)))
         ORDER BY a.id DESC LIMIT ?8",
    )?
    .query_map(
        params![
            q.event_id,
            q.vendor,
            q.device,
            q.destination,
            q.from_ms,
            q.to_ms,
            q.outcome,
            q.limit.max(1) as i64,
            super::read::tenants_json(q.tenants.as_deref())
        ],
        |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                chain_seq: r.get(1)?,
                hash: r.get(2)?,
                at_ms: r.get(3)?,
                event_id: r.get(4)?,
                kind: r.get(5)?,
                destination: r.get(6)?,
                attempt: r.get(7)?,
                status: r.get(8)?,
                latency_ms: r.get(9)?,
                detail: r.get(10)?,
                vendor: r.get(11)?,
                category: r.get(12)?,
                tenant: r.get(13)?,
                key: r.get(14)?,
            })
        },
    )?
    .collect()
}
