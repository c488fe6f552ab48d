//! `audit verify` on the embedded journal: reads the chain straight from the database file.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::journal::JournalError;
use crate::journal::audit_chain::{ChainRow, Verdict, Walker};

/// Walks the audit chain of the journal in `data_dir` (read-only; the gateway may be running).
pub fn verify(data_dir: &Path) -> Result<Verdict, JournalError> {
    let path = data_dir.join("journal.sqlite3");
    if !path.exists() {
        return Err(JournalError::NotFound(format!(
            "no journal at {}",
            path.display()
        )));
    }
    let c = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 3 {
        return Err(JournalError::Conflict(format!(
            "journal schema version {version} has no audit chain (it starts at version 3: start \
             the gateway once to migrate)"
        )));
    }
    let mut stmt = c.prepare(
        "SELECT id, chain_seq, hash, at, event_id, kind, dest, attempt, status, latency_ms, detail
         FROM audit ORDER BY chain_seq",
    )?;
    let anchor: Option<(i64, String)> = if version >= 5 {
        use rusqlite::OptionalExtension;
        c.query_row("SELECT seq, hash FROM audit_anchor WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?
    } else {
        None
    };
    let mut rows = stmt.query([])?;
    let mut w = anchor.map_or_else(Walker::default, |(seq, hash)| Walker::anchored(seq, hash));
    while let Some(r) = rows.next()? {
        let row = ChainRow {
            id: r.get(0)?,
            chain_seq: r.get(1)?,
            hash: r.get(2)?,
            at: r.get(3)?,
            event_id: r.get(4)?,
            kind: r.get(5)?,
            dest: r.get(6)?,
            attempt: r.get(7)?,
            status: r.get(8)?,
            latency_ms: r.get(9)?,
            detail: r.get(10)?,
        };
        if let Some(broken) = w.push(row) {
            return Ok(broken);
        }
    }
    Ok(w.finish())
}
