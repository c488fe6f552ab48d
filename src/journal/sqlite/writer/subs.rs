//! Subscription writes on the single writer: numbering at append, claims, outcomes, feed acks.

use rusqlite::{Connection, OptionalExtension, params};

use super::audit;
use crate::journal::JournalError;
use crate::journal::command::AuditRow;
use crate::journal::sqlite::subs::{SUB_COLS, sub_row};
use crate::journal::subs::{MatchFacts, NewSubscription, SubOutcome, SubsOp, SubsOut};
use crate::normalise::Envelope;

/// The filter every numbering statement shares (`?1` topic, `?2` tenant, `?3` patient, `?4` the
/// event's codes as a JSON array).
const MATCH: &str = "topic = ?1 AND (tenant IS NULL OR tenant = ?2)
    AND (patient IS NULL OR patient = ?3)
    AND (code IS NULL OR code IN (SELECT value FROM json_each(?4)))";

/// Gives a newly stored event the next number of every matching subscription (same
/// transaction as the event: numbered iff stored).
pub fn on_append(c: &Connection, env: &Envelope, now: i64) -> Result<(), JournalError> {
    let any: bool = c
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE topic = ?1)")?
        .query_row([env.category.as_str()], |r| r.get(0))?;
    if !any {
        return Ok(());
    }
    let f = MatchFacts::of(env);
    let codes = serde_json::to_string(&f.codes).unwrap_or_else(|_| "[]".into());
    c.prepare_cached(&format!(
        "INSERT INTO subscription_events (sub_id, event_no, event_id, at)
         SELECT id, events + 1, ?5, ?6 FROM subscriptions WHERE {MATCH}"
    ))?
    .execute(params![f.topic, f.tenant, f.patient, codes, env.id, now])?;
    c.prepare_cached(&format!(
        "UPDATE subscriptions SET events = events + 1 WHERE {MATCH}"
    ))?
    .execute(params![f.topic, f.tenant, f.patient, codes])?;
    Ok(())
}

pub fn apply(c: &Connection, op: &SubsOp) -> Result<SubsOut, JournalError> {
    match op {
        SubsOp::Create(s) => create(c, s).map(|()| SubsOut::Unit),
        SubsOp::Delete(id) => delete(c, id).map(|()| SubsOut::Unit),
        SubsOp::Claim {
            now_ms,
            lease_ms,
            limit,
        } => {
            let mut stmt = c.prepare_cached(&format!(
                "UPDATE subscriptions SET lease_until = ?1 + ?2 + timeout_s * 1000
                 WHERE id IN (SELECT id FROM subscriptions
                     WHERE lease_until < ?1 AND next_attempt_at <= ?1
                       AND (handshake_done = 0 OR events > delivered
                            OR (heartbeat_s > 0 AND last_sent_at + heartbeat_s * 1000 <= ?1))
                     ORDER BY next_attempt_at LIMIT ?3)
                 RETURNING {SUB_COLS}"
            ))?;
            let rows = stmt.query_map(params![now_ms, lease_ms, *limit as i64], sub_row)?;
            Ok(SubsOut::Subs(rows.collect::<Result<_, _>>()?))
        }
        SubsOp::Outcome(o) => outcome(c, o).map(|()| SubsOut::Unit),
        SubsOp::FeedRead { event_ids, at_ms } => {
            let mut stmt = c.prepare_cached(
                "INSERT INTO feed_acks (event_id, state, updated_at) VALUES (?1, 'read', ?2)
                 ON CONFLICT (event_id) DO NOTHING",
            )?;
            for id in event_ids {
                stmt.execute(params![id, at_ms])?;
            }
            Ok(SubsOut::Unit)
        }
        SubsOp::Ack {
            event_id,
            state,
            reason,
            at_ms,
        } => {
            let exists: bool = c
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE id = ?1)")?
                .query_row([&event_id], |r| r.get(0))?;
            if !exists {
                return Err(JournalError::NotFound(format!("no event {event_id}")));
            }
            let current: Option<String> = c
                .prepare_cached("SELECT state FROM feed_acks WHERE event_id = ?1")?
                .query_row([&event_id], |r| r.get(0))
                .optional()?;
            if let Some(s) = current.filter(|s| s == "journaled" || s == "failed") {
                return Err(JournalError::Conflict(format!(
                    "event {event_id} is already {s}"
                )));
            }
            c.prepare_cached(
                "INSERT INTO feed_acks (event_id, state, reason, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (event_id) DO UPDATE SET state = ?2, reason = ?3, updated_at = ?4",
            )?
            .execute(params![event_id, state, reason, at_ms])?;
            Ok(SubsOut::Unit)
        }
    }
}

fn create(c: &Connection, s: &NewSubscription) -> Result<(), JournalError> {
    let headers = serde_json::to_string(&s.headers).unwrap_or_else(|_| "[]".into());
    let n = c
        .prepare_cached(
            "INSERT INTO subscriptions (id, topic, tenant, patient, code, endpoint, payload,
                heartbeat_s, timeout_s, max_count, headers, resource, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'requested', ?13)
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            s.id,
            s.topic,
            s.tenant,
            s.patient,
            s.code,
            s.endpoint,
            s.payload,
            s.heartbeat_s,
            s.timeout_s,
            s.max_count,
            headers,
            s.resource,
            s.created_at_ms
        ])?;
    if n == 0 {
        return Err(JournalError::Conflict(format!(
            "subscription {} exists",
            s.id
        )));
    }
    let detail = format!("topic {} endpoint {}", s.topic, s.endpoint);
    audit(
        c,
        AuditRow {
            at: s.created_at_ms,
            event_id: &s.id,
            kind: "subscription-created",
            detail: Some(&detail),
            ..Default::default()
        },
    )
}

fn delete(c: &Connection, id: &str) -> Result<(), JournalError> {
    let n = c
        .prepare_cached("DELETE FROM subscriptions WHERE id = ?1")?
        .execute([id])?;
    if n == 0 {
        return Err(JournalError::NotFound(format!("no subscription {id}")));
    }
    c.prepare_cached("DELETE FROM subscription_events WHERE sub_id = ?1")?
        .execute([id])?;
    audit(
        c,
        AuditRow {
            at: crate::clock::now_ms(),
            event_id: id,
            kind: "subscription-deleted",
            ..Default::default()
        },
    )
}

fn outcome(c: &Connection, o: &SubOutcome) -> Result<(), JournalError> {
    let n = c
        .prepare_cached(
            "UPDATE subscriptions SET status = ?3, handshake_done = ?4,
                delivered = max(delivered, ?5), failures = ?6, next_attempt_at = ?7,
                last_sent_at = ?8, last_error = ?9, lease_until = 0
             WHERE id = ?1 AND lease_until = ?2",
        )?
        .execute(params![
            o.id,
            o.lease_until_ms,
            o.status,
            o.handshake_done as i64,
            o.delivered,
            o.failures,
            o.next_attempt_at_ms,
            o.last_sent_at_ms,
            o.last_error
        ])?;
    if let (1, Some(detail)) = (n, &o.audit) {
        audit(
            c,
            AuditRow {
                at: crate::clock::now_ms(),
                event_id: &o.id,
                kind: "subscription-status",
                detail: Some(detail),
                ..Default::default()
            },
        )?;
    }
    Ok(())
}
