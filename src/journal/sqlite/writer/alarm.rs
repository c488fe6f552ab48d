//! Escalation and deactivation writes on the single writer (one savepoint per command).

use rusqlite::{Connection, OptionalExtension, params};

use super::{audit, enqueue};
use crate::journal::alarm::{
    AlarmOp, AlarmOut, Deactivation, Escalation, EscalationRule, NewDeactivation,
    acknowledged_detail, deactivated_detail, device_subject, ended_detail, escalated_detail,
    expired_detail, expiring_detail,
};
use crate::journal::command::AuditRow;
use crate::journal::sqlite::alarm::{
    DEACTIVATION_COLUMNS, ESCALATION_COLUMNS, deactivation_row, escalation_row,
};
use crate::journal::{JournalError, LaneClass};

pub fn apply(c: &Connection, op: &AlarmOp) -> Result<AlarmOut, JournalError> {
    match op {
        AlarmOp::Escalate {
            rules,
            now_ms,
            limit,
        } => escalate(c, rules, *now_ms, *limit).map(AlarmOut::Escalated),
        AlarmOp::Acknowledge {
            id,
            by,
            note,
            at_ms,
        } => acknowledge(c, *id, by, note.as_deref(), *at_ms).map(AlarmOut::Escalation),
        AlarmOp::Deactivate(d) => deactivate(c, d).map(AlarmOut::Deactivation),
        AlarmOp::EndDeactivation {
            vendor,
            device_id,
            by,
            at_ms,
        } => end_deactivation(c, vendor, device_id, by, *at_ms).map(AlarmOut::Deactivation),
        AlarmOp::DeactivationSweep { now_ms, lead_ms } => sweep(c, *now_ms, *lead_ms),
    }
}

fn escalate(
    c: &Connection,
    rules: &[EscalationRule],
    now: i64,
    limit: usize,
) -> Result<Vec<Escalation>, JournalError> {
    let mut out = Vec::new();
    for rule in rules {
        if out.len() >= limit {
            break;
        }
        let due: Vec<(i64, i64, String, String, i64, String)> = c
            .prepare_cached(
                "SELECT d.id, d.event_seq, d.event_id, d.lane_key, d.created_at, d.state
                 FROM deliveries d
                 WHERE d.dest = ?1 AND d.class = 0 AND d.state IN ('pending', 'dead')
                   AND (d.created_at <= ?2 OR d.state = 'dead')
                   AND NOT EXISTS (SELECT 1 FROM escalations x WHERE x.delivery_id = d.id)
                 ORDER BY d.created_at LIMIT ?3",
            )?
            .query_map(
                params![
                    rule.dest,
                    now - rule.deadline_ms,
                    (limit - out.len()) as i64
                ],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?;
        for (delivery_id, seq, event_id, key, stored_at, state) in due {
            let fallback_id = match &rule.fallback {
                Some(f) => Some(enqueue(c, seq, &event_id, f, LaneClass::Alarm, &key, now)?.0),
                None => None,
            };
            c.prepare_cached(
                "INSERT INTO escalations (delivery_id, event_id, dest, fallback,
                    fallback_delivery_id, deadline_ms, stored_at, escalated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                delivery_id,
                event_id,
                rule.dest,
                rule.fallback,
                fallback_id,
                rule.deadline_ms,
                stored_at,
                now
            ])?;
            let id = c.last_insert_rowid();
            let detail = escalated_detail(
                rule.deadline_ms,
                state == "dead",
                rule.fallback.as_deref(),
                fallback_id,
            );
            audit(
                c,
                AuditRow {
                    at: now,
                    event_id: &event_id,
                    kind: "escalated",
                    dest: Some(&rule.dest),
                    detail: Some(&detail),
                    ..Default::default()
                },
            )?;
            out.push(escalation(c, id)?);
        }
    }
    Ok(out)
}

fn escalation(c: &Connection, id: i64) -> Result<Escalation, JournalError> {
    Ok(c.prepare_cached(&format!(
        "SELECT {ESCALATION_COLUMNS} FROM escalations x LEFT JOIN deliveries d ON d.id = x.delivery_id
         WHERE x.id = ?1"
    ))?
    .query_row(params![id], escalation_row)?)
}

fn acknowledge(
    c: &Connection,
    id: i64,
    by: &str,
    note: Option<&str>,
    at: i64,
) -> Result<Escalation, JournalError> {
    let acked: Option<Option<i64>> = c
        .prepare_cached("SELECT acked_at FROM escalations WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    match acked {
        None => {
            return Err(JournalError::NotFound(format!(
                "no escalation with id {id}"
            )));
        }
        Some(Some(_)) => {
            return Err(JournalError::Conflict(format!(
                "escalation {id} is already acknowledged"
            )));
        }
        Some(None) => {}
    }
    c.prepare_cached(
        "UPDATE escalations SET acked_at = ?2, acked_by = ?3, ack_note = ?4 WHERE id = ?1",
    )?
    .execute(params![id, at, by, note])?;
    let e = escalation(c, id)?;
    let detail = acknowledged_detail(id, by, note);
    audit(
        c,
        AuditRow {
            at,
            event_id: &e.event_id,
            kind: "escalation_acknowledged",
            dest: Some(&e.destination),
            detail: Some(&detail),
            ..Default::default()
        },
    )?;
    Ok(e)
}

fn deactivate(c: &Connection, d: &NewDeactivation) -> Result<Deactivation, JournalError> {
    let overlapping: Option<i64> = c
        .prepare_cached(
            "SELECT id FROM device_deactivations WHERE vendor = ?1 AND device_id = ?2
               AND ended_at IS NULL AND until_at > ?3 AND from_at < ?4 LIMIT 1",
        )?
        .query_row(params![d.vendor, d.device_id, d.from_ms, d.until_ms], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(id) = overlapping {
        return Err(JournalError::Conflict(format!(
            "device already has deactivation {id} in that period; end it first"
        )));
    }
    let now = crate::clock::now_ms();
    c.prepare_cached(
        "INSERT INTO device_deactivations (vendor, device_id, from_at, until_at, reason,
            created_by, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        d.vendor,
        d.device_id,
        d.from_ms,
        d.until_ms,
        d.reason,
        d.by,
        now
    ])?;
    let id = c.last_insert_rowid();
    let detail = deactivated_detail(id, d);
    audit(
        c,
        AuditRow {
            at: now,
            event_id: &device_subject(&d.vendor, &d.device_id),
            kind: "device_deactivated",
            detail: Some(&detail),
            ..Default::default()
        },
    )?;
    deactivation(c, id)
}

fn deactivation(c: &Connection, id: i64) -> Result<Deactivation, JournalError> {
    Ok(c.prepare_cached(&format!(
        "SELECT {DEACTIVATION_COLUMNS} FROM device_deactivations WHERE id = ?1"
    ))?
    .query_row(params![id], deactivation_row)?)
}

fn end_deactivation(
    c: &Connection,
    vendor: &str,
    device_id: &str,
    by: &str,
    at: i64,
) -> Result<Deactivation, JournalError> {
    let id: Option<i64> = c
        .prepare_cached(
            "SELECT id FROM device_deactivations WHERE vendor = ?1 AND device_id = ?2
               AND ended_at IS NULL AND until_at > ?3 ORDER BY from_at LIMIT 1",
        )?
        .query_row(params![vendor, device_id, at], |r| r.get(0))
        .optional()?;
    let Some(id) = id else {
        return Err(JournalError::NotFound(format!(
            "device {vendor}/{device_id} has no active deactivation"
        )));
    };
    c.prepare_cached("UPDATE device_deactivations SET ended_at = ?2, ended_by = ?3 WHERE id = ?1")?
        .execute(params![id, at, by])?;
    let detail = ended_detail(id, by);
    audit(
        c,
        AuditRow {
            at,
            event_id: &device_subject(vendor, device_id),
            kind: "device_reactivated",
            detail: Some(&detail),
            ..Default::default()
        },
    )?;
    deactivation(c, id)
}

fn sweep(c: &Connection, now: i64, lead_ms: i64) -> Result<AlarmOut, JournalError> {
    let pick = |sql: &str| -> Result<Vec<Deactivation>, JournalError> {
        Ok(c.prepare_cached(&format!(
            "SELECT {DEACTIVATION_COLUMNS} FROM device_deactivations WHERE {sql} LIMIT 100"
        ))?
        .query_map(params![now, lead_ms], deactivation_row)?
        .collect::<Result<_, _>>()?)
    };
    let reminded =
        pick("ended_at IS NULL AND reminded_at IS NULL AND until_at > ?1 AND until_at <= ?1 + ?2")?;
    for d in &reminded {
        c.prepare_cached("UPDATE device_deactivations SET reminded_at = ?2 WHERE id = ?1")?
            .execute(params![d.id, now])?;
        let detail = expiring_detail(d, now);
        audit(
            c,
            AuditRow {
                at: now,
                event_id: &device_subject(&d.vendor, &d.device_id),
                kind: "deactivation_expiring",
                detail: Some(&detail),
                ..Default::default()
            },
        )?;
    }
    // `?2` is bound but unused here; the same binder serves both queries.
    let expired = pick("ended_at IS NULL AND expired_at IS NULL AND until_at <= ?1 AND ?2 = ?2")?;
    for d in &expired {
        c.prepare_cached("UPDATE device_deactivations SET expired_at = ?2 WHERE id = ?1")?
            .execute(params![d.id, now])?;
        let detail = expired_detail(d);
        audit(
            c,
            AuditRow {
                at: now,
                event_id: &device_subject(&d.vendor, &d.device_id),
                kind: "deactivation_expired",
                detail: Some(&detail),
                ..Default::default()
            },
        )?;
    }
    Ok(AlarmOut::Swept { reminded, expired })
}
