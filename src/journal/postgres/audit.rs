//! The audit hash chain on PostgreSQL.
//!
//! Several writers per node and several nodes append audit rows concurrently, so the chain
//! cannot be kept per writer or per node. A transaction that writes audit rows locks the single
//! `audit_chain_head` row (`FOR UPDATE`) and holds it until commit, so the chain is global,
//! gapless and in commit order, and a transaction that rolls back leaves no trace in it.
//! Appends and delivery outcomes hash their rows onto the head as they insert them
//! (`writer/bulk.rs`); rows other commands insert without a position are *sealed* here, last,
//! right before `COMMIT`: hashed in id order onto the head, their positions and hashes written,
//! the head moved. Only batches that wrote audit rows take the lock (claims do not). Cost: the
//! chained part of a batch and its commit are serialised across the cluster; see
//! docs/operations.md.

use std::path::Path;

use futures_util::{StreamExt, pin_mut};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{db_error_text, tls, writer};
use crate::journal::JournalError;
use crate::journal::audit_chain::{ChainRow, Verdict, Walker, row_hash};

const COLUMNS: &str = "id, chain_seq, hash, at, event_id, kind, dest, attempt, status, \
                       latency_ms, detail";

fn chain_row(r: &tokio_postgres::Row) -> ChainRow {
    ChainRow {
        id: r.get(0),
        chain_seq: r.get(1),
        hash: r.get(2),
        at: r.get(3),
        event_id: r.get(4),
        kind: r.get(5),
        dest: r.get(6),
        attempt: r.get::<_, Option<i32>>(7).map(i64::from),
        status: r.get::<_, Option<i32>>(8).map(i64::from),
        latency_ms: r.get(9),
        detail: r.get(10),
    }
}

/// Seals this transaction's unchained audit rows into the chain (call last, right before
/// `COMMIT`).
pub async fn seal(tx: &Client) -> Result<(), tokio_postgres::Error> {
    let unsealed = format!("SELECT {COLUMNS} FROM audit WHERE chain_seq IS NULL ORDER BY id");
    // Without the lock first: most batches that wrote nothing to the audit skip it.
    if tx
        .query_opt(&format!("{unsealed} LIMIT 1"), &[])
        .await?
        .is_none()
    {
        return Ok(());
    }
    let head = tx
        .query_one(
            "SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let (mut seq, mut prev): (i64, String) = (head.get(0), head.get(1));
    // Again under the lock: also picks up rows a transaction committed without sealing them
    // (an older binary during a rolling upgrade).
    let rows = tx.query(&unsealed, &[]).await?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    for r in &rows {
        let row = chain_row(r);
        seq += 1;
        prev = row_hash(&prev, &row.content(seq));
        ids.push(row.id);
        seqs.push(seq);
        hashes.push(prev.clone());
    }
    let params: [&(dyn ToSql + Sync); 3] = [&ids, &seqs, &hashes];
    tx.execute(
        "UPDATE audit a SET chain_seq = u.seq, hash = u.hash
         FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u(id, seq, hash)
         WHERE a.id = u.id",
        &params,
    )
    .await?;
    tx.execute(
        "UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1",
        &[&seq, &prev],
    )
    .await?;
    Ok(())
}

/// Walks the chain in the database at `url` (read-only; nodes may be running).
pub async fn verify(url: &str, tls_ca_file: Option<&Path>) -> Result<Verdict, JournalError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| JournalError::Unavailable(format!("storage.url: {e}")))?;
    config.connect_timeout(std::time::Duration::from_secs(5));
    let tls = tls::configure(&mut config, tls_ca_file)?;
    let client = writer::connect(&config, tls).await?;
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM knutepunkt_schema", &[])
        .await
        .map_err(|e| JournalError::Unavailable(db_error_text(&e)))?
        .get(0);
    if version.unwrap_or(0) < 3 {
        return Err(JournalError::Conflict(format!(
            "database schema version {} has no audit chain (it starts at version 3: start the \
             gateway once to migrate)",
            version.unwrap_or(0)
        )));
    }
    // One snapshot for the whole walk, so rows committed meanwhile cannot look like a break.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let anchor: Option<(i64, String)> = if version.unwrap_or(0) >= 5 {
        client
            .query_opt("SELECT seq, hash FROM audit_anchor WHERE id = 1", &[])
            .await?
            .map(|r| (r.get(0), r.get(1)))
    } else {
        None
    };
    let stream = client
        .query_raw(
            &format!("SELECT {COLUMNS} FROM audit ORDER BY chain_seq NULLS LAST"),
            std::iter::empty::<i32>(),
        )
        .await?;
    pin_mut!(stream);
    let mut w = anchor.map_or_else(Walker::default, |(seq, hash)| Walker::anchored(seq, hash));
    while let Some(r) = stream.next().await {
        if let Some(broken) = w.push(chain_row(&r?)) {
            return Ok(broken);
        }
    }
    let head = client
        .query_one("SELECT seq, hash FROM audit_chain_head WHERE id = 1", &[])
        .await?;
    client.batch_execute("COMMIT").await?;
    let (head_seq, head_hash): (i64, String) = (head.get(0), head.get(1));
    Ok(match w.finish() {
        Verdict::Intact { head: end, .. } if end.as_ref().map_or(0, |e| e.0) != head_seq => {
            let last = end.map_or(0, |e| e.0);
            Verdict::Broken {
                id: 0,
                seq: Some(last),
                what: format!(
                    "the chain ends at position {last} but audit_chain_head says {head_seq}: \
                     the newest row(s) were deleted"
                ),
            }
        }
        Verdict::Intact {
            head: Some((seq, hash)),
            ..
        } if hash != head_hash => Verdict::Broken {
            id: 0,
            seq: Some(seq),
            what: "the last row's hash differs from audit_chain_head: the newest row was \
                   rewritten"
                .into(),
        },
        v => v,
    })
}
