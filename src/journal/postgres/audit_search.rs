//! Audit search on PostgreSQL (pooled read connection).

use tokio_postgres::GenericClient;

use crate::journal::{AuditQuery, AuditRecord, JournalError};

pub async fn search(
    c: &impl GenericClient,
    q: &AuditQuery,
) -> Result<Vec<AuditRecord>, JournalError> {
    let limit = q.limit.max(1) as i64;
    let rows = c
        .query(
            "SELECT a.id, a.chain_seq, a.hash, a.at, a.event_id, a.kind, a.dest, a.attempt,
                    a.status, a.latency_ms, a.detail, e.vendor, e.category, e.tenant, e.key
             FROM audit a LEFT JOIN events e ON e.id = a.event_id
             WHERE ($1::TEXT IS NULL OR a.event_id = $1)
               AND ($2::TEXT IS NULL OR e.vendor = $2)
               AND ($3::TEXT IS NULL OR e.key = 'device:' || $3 OR strpos(e.fhir, $3) > 0)
               AND ($4::TEXT IS NULL OR a.dest = $4)
               AND ($5::BIGINT IS NULL OR a.at >= $5)
               AND ($6::BIGINT IS NULL OR a.at < $6)
               AND ($7::TEXT IS NULL OR a.kind = $7)
               AND ($9::TEXT[] IS NULL OR e.tenant = ANY($9))
             ORDER BY a.id DESC LIMIT $8",
            &[
                &q.event_id,
                &q.vendor,
                &q.device,
                &q.destination,
                &q.from_ms,
                &q.to_ms,
                &q.outcome,
                &limit,
                &q.tenants,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AuditRecord {
            id: r.get(0),
            chain_seq: r.get(1),
            hash: r.get(2),
            at_ms: r.get(3),
            event_id: r.get(4),
            kind: r.get(5),
            destination: r.get(6),
            attempt: r.get::<_, Option<i32>>(7).map(i64::from),
            status: r.get::<_, Option<i32>>(8).map(i64::from),
            latency_ms: r.get(9),
            detail: r.get(10),
            vendor: r.get(11),
            category: r.get(12),
            tenant: r.get(13),
            key: r.get(14),
        })
        .collect())
}
