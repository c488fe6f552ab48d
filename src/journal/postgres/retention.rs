//! Retention sweep on PostgreSQL (see `journal::retention`).

use crate::clock::now_ms;
use crate::journal::{JournalError, RetentionReport};

pub async fn sweep(
    c: &mut deadpool_postgres::Object,
    cutoff_ms: i64,
) -> Result<RetentionReport, JournalError> {
    let tx = c.transaction().await?;
    let mut report = RetentionReport::default();
    let head: Option<i64> = tx
        .query_one("SELECT max(chain_seq) FROM audit WHERE chain_seq > 0", &[])
        .await?
        .get(0);
    // A prefix of the chain, up to the first row that is recent or concerns an unfinished
    // event, and never the head.
    // Walks the chain index from the start and stops at the first blocker.
    let blocker: Option<i64> = tx
        .query_opt(
            "SELECT a.chain_seq FROM audit a
             WHERE a.chain_seq > 0 AND (a.at >= $1
                OR EXISTS (SELECT 1 FROM events e JOIN deliveries d ON d.event_seq = e.seq
                           WHERE e.id = a.event_id AND d.state = 'pending')
                OR EXISTS (SELECT 1 FROM quarantine q WHERE q.event_id = a.event_id
                           AND q.released_at IS NULL))
             ORDER BY a.chain_seq LIMIT 1",
            &[&cutoff_ms],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(head) = head {
        let upto = blocker.map_or(head, |b| b - 1).min(head - 1);
        if upto >= 1
            && let Some(row) = tx
                .query_opt("SELECT hash FROM audit WHERE chain_seq = $1", &[&upto])
                .await?
            && let Some(hash) = row.get::<_, Option<String>>(0)
        {
            let n = tx
                .execute(
                    "DELETE FROM audit WHERE chain_seq > 0 AND chain_seq <= $1",
                    &[&upto],
                )
                .await?;
            tx.execute(
                "INSERT INTO audit_anchor (id, seq, hash, at) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,
                   at = EXCLUDED.at",
                &[&upto, &hash, &now_ms()],
            )
            .await?;
            report.audit_rows += n;
            report.anchor = Some((upto, hash));
        }
    }
    report.audit_rows += tx
        .execute(
            "DELETE FROM audit WHERE chain_seq <= 0 AND at < $1",
            &[&cutoff_ms],
        )
        .await?;
    // FK checks run at the end of the statement, after all three deletes.
    report.events = tx
        .execute(
            "WITH doomed AS (
                SELECT e.seq FROM events e
                WHERE e.received_at < $1
                  AND NOT EXISTS (SELECT 1 FROM audit a WHERE a.event_id = e.id)
                  AND NOT EXISTS (SELECT 1 FROM deliveries d
                                  WHERE d.event_seq = e.seq AND d.state = 'pending')
                  AND NOT EXISTS (SELECT 1 FROM quarantine q
                                  WHERE q.event_seq = e.seq AND q.released_at IS NULL)
             ), dd AS (
                DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM doomed)
             ), dq AS (
                DELETE FROM quarantine WHERE event_seq IN (SELECT seq FROM doomed)
             )
             DELETE FROM events WHERE seq IN (SELECT seq FROM doomed)",
            &[&cutoff_ms],
        )
        .await?;
    tx.commit().await?;
    Ok(report)
}
