//! Subscription writes, pipelined with the rest of a batch. The numbering `UPDATE` locks each
//! matching subscription row until commit, so numbers follow commit order per subscription
//! across every writer of every node.

use tokio_postgres::Client;

use super::{Stmts, audit};
use crate::journal::JournalError;
use crate::journal::command::AuditRow;
use crate::journal::postgres::subs::{DUE, SUB_COLS, sub_row};
use crate::journal::subs::{MatchFacts, NewSubscription, SubOutcome, SubsOp, SubsOut};
use crate::normalise::Envelope;

/// Prepared once per writer connection (`Stmts::subs_number`).
pub const NUMBER_SQL: &str = "WITH s AS (
        UPDATE subscriptions SET events = events + 1
        WHERE topic = $1 AND (tenant IS NULL OR tenant = $2)
          AND (patient IS NULL OR patient = $3)
          AND (code IS NULL OR code = ANY($4::TEXT[]))
        RETURNING id, events)
    INSERT INTO subscription_events (sub_id, event_no, event_id, at)
    SELECT id, events, $5, $6 FROM s";

pub async fn on_append(
    tx: &Client,
    s: &Stmts,
    env: &Envelope,
    now: i64,
) -> Result<(), JournalError> {
    let f = MatchFacts::of(env);
    tx.execute(
        &s.subs_number,
        &[&f.topic, &f.tenant, &f.patient, &f.codes, &env.id, &now],
    )
    .await?;
    Ok(())
}

pub async fn apply(tx: &Client, s: &Stmts, op: &SubsOp) -> Result<SubsOut, JournalError> {
    match op {
        SubsOp::Create(n) => create(tx, s, n).await.map(|()| SubsOut::Unit),
        SubsOp::Delete(id) => {
            let n = tx
                .execute("DELETE FROM subscriptions WHERE id = $1", &[id])
                .await?;
            if n == 0 {
                return Err(JournalError::NotFound(format!("no subscription {id}")));
            }
            tx.execute("DELETE FROM subscription_events WHERE sub_id = $1", &[id])
                .await?;
            audit(
                tx,
                s,
                AuditRow {
                    at: crate::clock::now_ms(),
                    event_id: id,
                    kind: "subscription-deleted",
                    ..Default::default()
                },
            )
            .await?;
            Ok(SubsOut::Unit)
        }
        SubsOp::Claim {
            now_ms,
            lease_ms,
            limit,
        } => {
            let rows = tx
                .query(
                    &format!(
                        "UPDATE subscriptions SET lease_until = $1 + $2 + timeout_s * 1000
                         WHERE id IN (SELECT id FROM subscriptions WHERE {DUE}
                             ORDER BY next_attempt_at LIMIT $3
                             FOR UPDATE SKIP LOCKED)
                         RETURNING {SUB_COLS}"
                    ),
                    &[now_ms, lease_ms, &(*limit as i64)],
                )
                .await?;
            Ok(SubsOut::Subs(rows.iter().map(sub_row).collect()))
        }
        SubsOp::Outcome(o) => outcome(tx, s, o).await.map(|()| SubsOut::Unit),
        SubsOp::FeedRead { event_ids, at_ms } => {
            tx.execute(
                "INSERT INTO feed_acks (event_id, state, updated_at)
                 SELECT id, 'read', $2 FROM unnest($1::TEXT[]) AS id
                 ON CONFLICT (event_id) DO NOTHING",
                &[event_ids, at_ms],
            )
            .await?;
            Ok(SubsOut::Unit)
        }
        SubsOp::Ack {
            event_id,
            state,
            reason,
            at_ms,
        } => {
            let exists = tx
                .query_opt("SELECT 1 FROM events WHERE id = $1", &[event_id])
                .await?
                .is_some();
            if !exists {
                return Err(JournalError::NotFound(format!("no event {event_id}")));
            }
            // One conditional upsert: a concurrent final acknowledgement makes it change nothing.
            let n = tx
                .execute(
                    "INSERT INTO feed_acks (event_id, state, reason, updated_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (event_id) DO UPDATE SET state = $2, reason = $3, updated_at = $4
                     WHERE feed_acks.state NOT IN ('journaled', 'failed')",
                    &[event_id, state, reason, at_ms],
                )
                .await?;
            if n == 0 {
                return Err(JournalError::Conflict(format!(
                    "event {event_id} is already journaled or failed"
                )));
            }
            Ok(SubsOut::Unit)
        }
    }
}

async fn create(tx: &Client, s: &Stmts, n: &NewSubscription) -> Result<(), JournalError> {
    let headers = serde_json::to_string(&n.headers).unwrap_or_else(|_| "[]".into());
    let rows = tx
        .execute(
            "INSERT INTO subscriptions (id, topic, tenant, patient, code, endpoint, payload,
                heartbeat_s, timeout_s, max_count, headers, resource, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'requested', $13)
             ON CONFLICT (id) DO NOTHING",
            &[
                &n.id,
                &n.topic,
                &n.tenant,
                &n.patient,
                &n.code,
                &n.endpoint,
                &n.payload,
                &i64::from(n.heartbeat_s),
                &i64::from(n.timeout_s),
                &i64::from(n.max_count),
                &headers,
                &n.resource,
                &n.created_at_ms,
            ],
        )
        .await?;
    if rows == 0 {
        return Err(JournalError::Conflict(format!(
            "subscription {} exists",
            n.id
        )));
    }
    let detail = format!("topic {} endpoint {}", n.topic, n.endpoint);
    audit(
        tx,
        s,
        AuditRow {
            at: n.created_at_ms,
            event_id: &n.id,
            kind: "subscription-created",
            detail: Some(&detail),
            ..Default::default()
        },
    )
    .await
}

async fn outcome(tx: &Client, s: &Stmts, o: &SubOutcome) -> Result<(), JournalError> {
    let n = tx
        .execute(
            "UPDATE subscriptions SET status = $3, handshake_done = $4,
                delivered = greatest(delivered, $5), failures = $6, next_attempt_at = $7,
                last_sent_at = $8, last_error = $9, lease_until = 0
             WHERE id = $1 AND lease_until = $2",
            &[
                &o.id,
                &o.lease_until_ms,
                &o.status,
                &o.handshake_done,
                &o.delivered,
                &o.failures,
                &o.next_attempt_at_ms,
                &o.last_sent_at_ms,
                &o.last_error,
            ],
        )
        .await?;
    if let (1, Some(detail)) = (n, &o.audit) {
        audit(
            tx,
            s,
            AuditRow {
                at: crate::clock::now_ms(),
                event_id: &o.id,
                kind: "subscription-status",
                detail: Some(detail),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(())
}
