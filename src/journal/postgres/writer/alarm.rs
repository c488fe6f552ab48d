//! Escalation and deactivation writes, pipelined with the rest of a batch.
//!
//! Several nodes scan for overdue alarm deliveries at once; they meet on the unique
//! `escalations.delivery_id`: the escalation row is inserted first (`ON CONFLICT DO NOTHING`),
//! and only the node whose insert took adds the fallback delivery. The fallback lane is locked
//! outside the batch's sorted lane pass, so a rare deadlock with another node is possible; the
//! database breaks it and the writer runs the batch again (`BATCH_TRIES`).

use tokio_postgres::Client;

use super::{Stmts, audit, enqueue};
use crate::journal::alarm::{
    AlarmOp, AlarmOut, Deactivation, Escalation, EscalationRule, NewDeactivation,
    acknowledged_detail, deactivated_detail, device_subject, ended_detail, escalated_detail,
    expired_detail, expiring_detail,
};
use crate::journal::command::AuditRow;
use crate::journal::postgres::alarm::{
    DEACTIVATION_COLUMNS, ESCALATION_COLUMNS, deactivation_row, escalation_row,
};
use crate::journal::{JournalError, LaneClass};

pub async fn apply(tx: &Client, s: &Stmts, op: &AlarmOp) -> Result<AlarmOut, JournalError> {
    match op {
        AlarmOp::Escalate {
            rules,
            now_ms,
            limit,
        } => escalate(tx, s, rules, *now_ms, *limit)
            .await
            .map(AlarmOut::Escalated),
        AlarmOp::Acknowledge {
            id,
            by,
            note,
            at_ms,
        } => acknowledge(tx, s, *id, by, note.as_deref(), *at_ms)
            .await
            .map(AlarmOut::Escalation),
        AlarmOp::Deactivate(d) => deactivate(tx, s, d).await.map(AlarmOut::Deactivation),
        AlarmOp::EndDeactivation {
            vendor,
            device_id,
            by,
            at_ms,
        } => end_deactivation(tx, s, vendor, device_id, by, *at_ms)
            .await
            .map(AlarmOut::Deactivation),
        AlarmOp::DeactivationSweep { now_ms, lead_ms } => sweep(tx, s, *now_ms, *lead_ms).await,
    }
}

async fn escalate(
    tx: &Client,
    s: &Stmts,
    rules: &[EscalationRule],
    now: i64,
    limit: usize,
) -> Result<Vec<Escalation>, JournalError> {
    let alarm = LaneClass::Alarm.as_i64() as i16;
    let mut out = Vec::new();
    for rule in rules {
        if out.len() >= limit {
            break;
        }
        let due = tx
            .query(
                "SELECT d.id, d.event_seq, d.event_id, d.lane_key, d.created_at, d.state
                 FROM deliveries d
                 WHERE d.dest = $1 AND d.class = 0 AND d.state IN ('pending', 'dead')
                   AND (d.created_at <= $2 OR d.state = 'dead')
                   AND NOT EXISTS (SELECT 1 FROM escalations x WHERE x.delivery_id = d.id)
                 ORDER BY d.created_at LIMIT $3",
                &[
                    &rule.dest,
                    &(now - rule.deadline_ms),
                    &((limit - out.len()) as i64),
                ],
            )
            .await?;
        for row in due {
            let delivery_id: i64 = row.get(0);
            let seq: i64 = row.get(1);
            let event_id: String = row.get(2);
            let key: String = row.get(3);
            let stored_at: i64 = row.get(4);
            let dead = row.get::<_, String>(5) == "dead";
            let Some(inserted) = tx
                .query_opt(
                    "INSERT INTO escalations (delivery_id, event_id, dest, fallback, deadline_ms,
                        stored_at, escalated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (delivery_id) DO NOTHING RETURNING id",
                    &[
                        &delivery_id,
                        &event_id,
                        &rule.dest,
                        &rule.fallback,
                        &rule.deadline_ms,
                        &stored_at,
                        &now,
                    ],
                )
                .await?
            else {
                // Another node escalated it first.
                continue;
            };
            let id: i64 = inserted.get(0);
            let fallback_id = match &rule.fallback {
                Some(f) => Some(enqueue(tx, s, seq, &event_id, f, alarm, &key, now).await?),
                None => None,
            };
            tx.execute(
                "UPDATE escalations SET fallback_delivery_id = $2 WHERE id = $1",
                &[&id, &fallback_id],
            )
            .await?;
            let detail = escalated_detail(
                rule.deadline_ms,
                dead,
                rule.fallback.as_deref(),
                fallback_id,
            );
            audit(
                tx,
                s,
                AuditRow {
                    at: now,
                    event_id: &event_id,
                    kind: "escalated",
                    dest: Some(&rule.dest),
                    detail: Some(&detail),
                    ..Default::default()
                },
            )
            .await?;
            out.push(escalation(tx, id).await?);
        }
    }
    Ok(out)
}

async fn escalation(tx: &Client, id: i64) -> Result<Escalation, JournalError> {
    let row = tx
        .query_one(
            &format!(
                "SELECT {ESCALATION_COLUMNS} FROM escalations x
                 LEFT JOIN deliveries d ON d.id = x.delivery_id WHERE x.id = $1"
            ),
            &[&id],
        )
        .await?;
    Ok(escalation_row(&row))
}

async fn acknowledge(
    tx: &Client,
    s: &Stmts,
    id: i64,
    by: &str,
    note: Option<&str>,
    at: i64,
) -> Result<Escalation, JournalError> {
    // One conditional update: a concurrent second acknowledgement finds the condition false.
    let updated = tx
        .execute(
            "UPDATE escalations SET acked_at = $2, acked_by = $3, ack_note = $4
             WHERE id = $1 AND acked_at IS NULL",
            &[&id, &at, &by, &note],
        )
        .await?;
    if updated == 0 {
        let exists = tx
            .query_opt("SELECT 1 FROM escalations WHERE id = $1", &[&id])
            .await?
            .is_some();
        return Err(if exists {
            JournalError::Conflict(format!("escalation {id} is already acknowledged"))
        } else {
            JournalError::NotFound(format!("no escalation with id {id}"))
        });
    }
    let e = escalation(tx, id).await?;
    let detail = acknowledged_detail(id, by, note);
    audit(
        tx,
        s,
        AuditRow {
            at,
            event_id: &e.event_id,
            kind: "escalation_acknowledged",
            dest: Some(&e.destination),
            detail: Some(&detail),
            ..Default::default()
        },
    )
    .await?;
    Ok(e)
}

/// Namespace of the per-device advisory locks that serialise deactivation overlap checks.
const DEACTIVATION_LOCK_NS: i32 = 0x6b6e_6461;

async fn deactivate(
    tx: &Client,
    s: &Stmts,
    d: &NewDeactivation,
) -> Result<Deactivation, JournalError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))",
        &[&DEACTIVATION_LOCK_NS, &d.vendor, &d.device_id],
    )
    .await?;
    let now = crate::clock::now_ms();
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO device_deactivations (vendor, device_id, from_at, until_at, reason,
                    created_by, created_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE NOT EXISTS (SELECT 1 FROM device_deactivations WHERE vendor = $1
                     AND device_id = $2 AND ended_at IS NULL AND until_at > $3 AND from_at < $4)
                 RETURNING {DEACTIVATION_COLUMNS}"
            ),
            &[
                &d.vendor,
                &d.device_id,
                &d.from_ms,
                &d.until_ms,
                &d.reason,
                &d.by,
                &now,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(JournalError::Conflict(
            "device already has a deactivation in that period; end it first".into(),
        ));
    };
    let out = deactivation_row(&row);
    let detail = deactivated_detail(out.id, d);
    audit(
        tx,
        s,
        AuditRow {
            at: now,
            event_id: &device_subject(&d.vendor, &d.device_id),
            kind: "device_deactivated",
            detail: Some(&detail),
            ..Default::default()
        },
    )
    .await?;
    Ok(out)
}

async fn end_deactivation(
    tx: &Client,
    s: &Stmts,
    vendor: &str,
    device_id: &str,
    by: &str,
    at: i64,
) -> Result<Deactivation, JournalError> {
    let row = tx
        .query_opt(
            &format!(
                "UPDATE device_deactivations SET ended_at = $3, ended_by = $4
                 WHERE id = (SELECT id FROM device_deactivations WHERE vendor = $1
                     AND device_id = $2 AND ended_at IS NULL AND until_at > $3
                     ORDER BY from_at LIMIT 1)
                   AND ended_at IS NULL
                 RETURNING {DEACTIVATION_COLUMNS}"
            ),
            &[&vendor, &device_id, &at, &by],
        )
        .await?;
    let Some(row) = row else {
        return Err(JournalError::NotFound(format!(
            "device {vendor}/{device_id} has no active deactivation"
        )));
    };
    let out = deactivation_row(&row);
    let detail = ended_detail(out.id, by);
    audit(
        tx,
        s,
        AuditRow {
            at,
            event_id: &device_subject(vendor, device_id),
            kind: "device_reactivated",
            detail: Some(&detail),
            ..Default::default()
        },
    )
    .await?;
    Ok(out)
}

async fn sweep(tx: &Client, s: &Stmts, now: i64, lead_ms: i64) -> Result<AlarmOut, JournalError> {
    let reminded: Vec<Deactivation> = tx
        .query(
            &format!(
                "UPDATE device_deactivations SET reminded_at = $1
                 WHERE id IN (SELECT id FROM device_deactivations WHERE ended_at IS NULL
                     AND reminded_at IS NULL AND until_at > $1 AND until_at <= $1 + $2
                     LIMIT 100 FOR UPDATE SKIP LOCKED)
                 RETURNING {DEACTIVATION_COLUMNS}"
            ),
            &[&now, &lead_ms],
        )
        .await?
        .iter()
        .map(deactivation_row)
        .collect();
    for d in &reminded {
        let detail = expiring_detail(d, now);
        audit(
            tx,
            s,
            AuditRow {
                at: now,
                event_id: &device_subject(&d.vendor, &d.device_id),
                kind: "deactivation_expiring",
                detail: Some(&detail),
                ..Default::default()
            },
        )
        .await?;
    }
    let expired: Vec<Deactivation> = tx
        .query(
            &format!(
                "UPDATE device_deactivations SET expired_at = $1
                 WHERE id IN (SELECT id FROM device_deactivations WHERE ended_at IS NULL
                     AND expired_at IS NULL AND until_at <= $1
                     LIMIT 100 FOR UPDATE SKIP LOCKED)
                 RETURNING {DEACTIVATION_COLUMNS}"
            ),
            &[&now],
        )
        .await?
        .iter()
        .map(deactivation_row)
        .collect();
    for d in &expired {
        let detail = expired_detail(d);
        audit(
            tx,
            s,
            AuditRow {
                at: now,
                event_id: &device_subject(&d.vendor, &d.device_id),
                kind: "deactivation_expired",
                detail: Some(&detail),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(AlarmOut::Swept { reminded, expired })
}
