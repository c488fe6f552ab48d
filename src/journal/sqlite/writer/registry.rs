//! Device registry, liveness and quarantine writes on the single writer (one savepoint each).
//! The writer is the only one writing, so "check for an overlap, then insert" cannot race.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Stored, audit, route_to, store};
use crate::journal::command::{AuditRow, RegistryOp, RegistryOut};
use crate::journal::registry_text::{overlap_message, period};
use crate::journal::{
    Appended, Assignment, DeviceBeat, JournalError, NewAssignment, NewEvent, QuarantineInfo,
    Release,
};

pub fn apply(c: &Connection, op: &RegistryOp) -> Result<RegistryOut, JournalError> {
    match op {
        RegistryOp::Assign(a) => assign(c, a).map(RegistryOut::Assignment),
        RegistryOp::End {
            id,
            vendor,
            device_id,
            at_ms,
        } => end(c, *id, vendor, device_id, *at_ms).map(RegistryOut::Assignment),
        RegistryOp::Beat(b) => beat(c, b).map(|()| RegistryOut::Unit),
        RegistryOp::Quarantine(ev, info) => quarantine(c, ev, info).map(RegistryOut::Appended),
        RegistryOp::Release(r) => release(c, r).map(|()| RegistryOut::Unit),
        RegistryOp::Alarm(op) => super::alarm::apply(c, op).map(RegistryOut::Alarm),
        RegistryOp::Note(n) => audit(
            c,
            AuditRow {
                at: crate::clock::now_ms(),
                event_id: &n.subject,
                kind: &n.kind,
                dest: n.dest.as_deref(),
                detail: Some(&n.detail),
                ..Default::default()
            },
        )
        .map(|()| RegistryOut::Unit),
    }
}

const COLUMNS: &str =
    "id, vendor, device_id, patient_id, tenant, valid_from, valid_to, created_at, note";

pub fn assignment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Assignment> {
    Ok(Assignment {
        id: r.get(0)?,
        vendor: r.get(1)?,
        device_id: r.get(2)?,
        patient_id: r.get(3)?,
        tenant: r.get(4)?,
        valid_from_ms: r.get(5)?,
        valid_to_ms: r.get(6)?,
        created_at_ms: r.get(7)?,
        note: r.get(8)?,
    })
}

fn assign(c: &Connection, a: &NewAssignment) -> Result<Assignment, JournalError> {
    if a.valid_to_ms.is_some_and(|to| to <= a.valid_from_ms) {
        return Err(JournalError::Conflict(
            "valid_to must be after valid_from".into(),
        ));
    }
    // Half-open periods [from, to) overlap when each starts before the other ends.
    let clash: Option<Assignment> = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM device_assignments
             WHERE vendor = ?1 AND device_id = ?2
               AND (valid_to IS NULL OR valid_to > ?3) AND (?4 IS NULL OR valid_from < ?4)
             ORDER BY valid_from LIMIT 1"
        ))?
        .query_row(
            params![a.vendor, a.device_id, a.valid_from_ms, a.valid_to_ms],
            assignment_row,
        )
        .optional()?;
    if let Some(other) = clash {
        return Err(JournalError::Conflict(overlap_message(&other)));
    }
    let now = crate::clock::now_ms();
    let id: i64 = c
        .prepare_cached(
            "INSERT INTO device_assignments
               (vendor, device_id, patient_id, tenant, valid_from, valid_to, created_at, note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        )?
        .query_row(
            params![
                a.vendor,
                a.device_id,
                a.patient_id,
                a.tenant,
                a.valid_from_ms,
                a.valid_to_ms,
                now,
                a.note
            ],
            |r| r.get(0),
        )?;
    Ok(Assignment {
        id,
        vendor: a.vendor.clone(),
        device_id: a.device_id.clone(),
        patient_id: a.patient_id.clone(),
        tenant: a.tenant.clone(),
        valid_from_ms: a.valid_from_ms,
        valid_to_ms: a.valid_to_ms,
        created_at_ms: now,
        note: a.note.clone(),
    })
}

fn end(
    c: &Connection,
    id: i64,
    vendor: &str,
    device_id: &str,
    at_ms: i64,
) -> Result<Assignment, JournalError> {
    let found: Option<Assignment> = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM device_assignments WHERE id = ?1 AND vendor = ?2 AND device_id = ?3"
        ))?
        .query_row(params![id, vendor, device_id], assignment_row)
        .optional()?;
    let Some(mut a) = found else {
        return Err(JournalError::NotFound(format!(
            "device {vendor}/{device_id} has no assignment {id}"
        )));
    };
    crate::journal::registry_text::check_end(&a, at_ms)?;
    c.prepare_cached("UPDATE device_assignments SET valid_to = ?2 WHERE id = ?1")?
        .execute(params![id, at_ms])?;
    a.valid_to_ms = Some(at_ms);
    Ok(a)
}

fn beat(c: &Connection, b: &DeviceBeat) -> Result<(), JournalError> {
    c.prepare_cached(
        "INSERT INTO device_liveness
           (vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
         ON CONFLICT (vendor, device_id) DO UPDATE SET
           tenant = coalesce(excluded.tenant, tenant),
           last_seen_at = max(last_seen_at, excluded.last_seen_at),
           last_kind = excluded.last_kind,
           reported_at = coalesce(excluded.reported_at, reported_at),
           beats = beats + 1",
    )?
    .execute(params![
        b.vendor,
        b.device_id,
        b.tenant,
        b.seen_at_ms,
        b.kind,
        b.reported_at_ms
    ])?;
    Ok(())
}

fn quarantine(
    c: &Connection,
    ev: &NewEvent,
    info: &QuarantineInfo,
) -> Result<Appended, JournalError> {
    let (seq, now) = match store(c, ev)? {
        Stored::New { seq, now } => (seq, now),
        Stored::Duplicate(id) => return Ok(Appended::Duplicate { id }),
    };
    let id = &ev.envelope.id;
    c.prepare_cached(
        "INSERT INTO quarantine (event_seq, event_id, device_id, requested_tenant, reason, quarantined_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        seq,
        id,
        info.device_id,
        info.requested_tenant,
        info.reason,
        now
    ])?;
    audit(
        c,
        AuditRow {
            at: now,
            event_id: id,
            kind: "quarantined",
            detail: Some(&info.reason),
            ..Default::default()
        },
    )?;
    Ok(Appended::Stored { id: id.clone() })
}

fn release(c: &Connection, r: &Release) -> Result<(), JournalError> {
    let env = &r.envelope;
    let now = crate::clock::now_ms();
    let seq: Option<i64> = c
        .prepare_cached(
            "UPDATE quarantine SET released_at = ?2 WHERE event_id = ?1 AND released_at IS NULL
             RETURNING event_seq",
        )?
        .query_row(params![env.id, now], |r| r.get(0))
        .optional()?;
    let Some(seq) = seq else {
        let known: Option<i64> = c
            .prepare_cached("SELECT released_at FROM quarantine WHERE event_id = ?1")?
            .query_row(params![env.id], |r| r.get(0))
            .optional()?;
        return Err(match known {
            Some(at) => JournalError::Conflict(format!(
                "event {} was already released from quarantine ({})",
                env.id,
                period(at, None)
            )),
            None => JournalError::NotFound(format!("event {} is not in quarantine", env.id)),
        });
    };
    c.prepare_cached(
        "UPDATE events SET category = ?2, priority = ?3, tenant = ?4, key = ?5, lane_class = ?6,
            mapping_version = ?7, fhir = ?8, routed_to = ?9 WHERE seq = ?1",
    )?
    .execute(params![
        seq,
        env.category.as_str(),
        env.priority.as_str(),
        env.tenant,
        env.key,
        env.category.lane_class().as_i64(),
        env.mapping_version,
        env.fhir,
        r.destinations.len() as i64
    ])?;
    audit(
        c,
        AuditRow {
            at: now,
            event_id: &env.id,
            kind: "released",
            detail: Some(&r.detail),
            ..Default::default()
        },
    )?;
    super::subs::on_append(c, env, now)?;
    // Released events are claimed as usual (no direct hand-off).
    route_to(c, seq, env, &r.destinations, &r.routes, now).map(|_| ())
}
