//! Retention sweep on the embedded journal (see `journal::retention`).

use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::now_ms;
use crate::journal::RetentionReport;

/// The chained audit rows that may go: a prefix of the chain, up to (not including) the first
/// row that is recent or concerns an unfinished event, and never the head.
/// Walks the chain index from the start and stops at the first blocker, so a sweep reads only
/// the rows it may delete plus one.
const BLOCKER: &str = "
    SELECT a.chain_seq FROM audit a
    WHERE a.chain_seq > 0 AND (a.at >= ?1
       OR EXISTS (SELECT 1 FROM events e JOIN deliveries d ON d.event_seq = e.seq
                  WHERE e.id = a.event_id AND d.state = 'pending')
       OR EXISTS (SELECT 1 FROM quarantine q WHERE q.event_id = a.event_id
                  AND q.released_at IS NULL))
    ORDER BY a.chain_seq LIMIT 1";

/// Finished events older than the cutoff whose audit rows are all gone.
const DOOMED: &str = "
    INSERT INTO retention_doomed (seq)
    SELECT e.seq FROM events e
    WHERE e.received_at < ?1
      AND NOT EXISTS (SELECT 1 FROM audit a WHERE a.event_id = e.id)
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.state = 'pending')
      AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.event_seq = e.seq AND q.released_at IS NULL)";

pub fn sweep(c: &Connection, cutoff_ms: i64) -> rusqlite::Result<RetentionReport> {
    // IMMEDIATE: take the write lock up front (busy_timeout waits for the writer thread's
    // current batch) instead of failing when a read turns into a write.
    c.execute_batch("BEGIN IMMEDIATE")?;
    let result = sweep_in(c, cutoff_ms);
    match &result {
        Ok(_) => c.execute_batch("COMMIT")?,
        Err(_) => {
            let _ = c.execute_batch("ROLLBACK");
        }
    }
    result
}

fn sweep_in(c: &Connection, cutoff_ms: i64) -> rusqlite::Result<RetentionReport> {
    let mut report = RetentionReport::default();
    let head: Option<i64> = c.query_row(
        "SELECT max(chain_seq) FROM audit WHERE chain_seq > 0",
        [],
        |r| r.get(0),
    )?;
    let blocker: Option<i64> = c
        .query_row(BLOCKER, params![cutoff_ms], |r| r.get(0))
        .optional()?;
    if let Some(head) = head {
        let upto = blocker.map_or(head, |b| b - 1).min(head - 1);
        if upto >= 1 {
            let hash: Option<String> = c
                .query_row(
                    "SELECT hash FROM audit WHERE chain_seq = ?1",
                    params![upto],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            if let Some(hash) = hash {
                let n = c.execute(
                    "DELETE FROM audit WHERE chain_seq > 0 AND chain_seq <= ?1",
                    params![upto],
                )?;
                c.execute(
                    "INSERT INTO audit_anchor (id, seq, hash, at) VALUES (1, ?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
                       at = excluded.at",
                    params![upto, hash, now_ms()],
                )?;
                report.audit_rows += n as u64;
                report.anchor = Some((upto, hash));
            }
        }
    }
    // Rows from before the chain existed are outside it: old ones simply go.
    report.audit_rows += c.execute(
        "DELETE FROM audit WHERE chain_seq <= 0 AND at < ?1",
        params![cutoff_ms],
    )? as u64;
    c.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS retention_doomed (seq INTEGER PRIMARY KEY);
         DELETE FROM retention_doomed;",
    )?;
    c.execute(DOOMED, params![cutoff_ms])?;
    c.execute_batch(
        "DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM retention_doomed);
         DELETE FROM quarantine WHERE event_seq IN (SELECT seq FROM retention_doomed);",
    )?;
    report.events = c.execute(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM retention_doomed)",
        [],
    )? as u64;
    Ok(report)
}
