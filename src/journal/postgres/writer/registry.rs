//! Device registry, liveness and quarantine writes, pipelined with the rest of a batch.
//!
//! Commands of a batch run interleaved on one transaction, and other nodes write concurrently,
//! so every check-then-write is made safe by a single statement or a lock:
//! - assign: a per-device advisory transaction lock (serialises other nodes; the lock is
//!   re-entrant within our own transaction), then one `INSERT … WHERE NOT EXISTS (overlap)`
//!   statement, which sees the rows of earlier statements of the same transaction;
//! - end and release: one conditional `UPDATE … RETURNING`; the row lock makes a concurrent
//!   second attempt find the condition false;
//! - liveness: one upsert.

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{EventRow, Stmts, audit, enqueue, find_existing};
use crate::journal::command::{AuditRow, RegistryOp, RegistryOut};
use crate::journal::registry_text::{check_end, instant, overlap_message};
use crate::journal::{
    Appended, Assignment, DeviceBeat, JournalError, NewAssignment, NewEvent, QuarantineInfo,
    Release,
};

/// Namespace (first key) of the per-device advisory locks; the second key hashes the device.
const DEVICE_LOCK_NS: i32 = 0x6b6e_6476;

pub async fn apply(tx: &Client, s: &Stmts, op: &RegistryOp) -> Result<RegistryOut, JournalError> {
    match op {
        RegistryOp::Assign(a) => assign(tx, a).await.map(RegistryOut::Assignment),
        RegistryOp::End {
            id,
            vendor,
            device_id,
            at_ms,
        } => end(tx, *id, vendor, device_id, *at_ms)
            .await
            .map(RegistryOut::Assignment),
        RegistryOp::Beat(b) => beat(tx, b).await.map(|()| RegistryOut::Unit),
        RegistryOp::Quarantine(ev, info) => {
            quarantine(tx, s, ev, info).await.map(RegistryOut::Appended)
        }
        RegistryOp::Release(r) => release(tx, s, r).await.map(|()| RegistryOut::Unit),
        RegistryOp::Alarm(op) => super::alarm::apply(tx, s, op).await.map(RegistryOut::Alarm),
        RegistryOp::Note(n) => audit(
            tx,
            s,
            AuditRow {
                at: crate::clock::now_ms(),
                event_id: &n.subject,
                kind: &n.kind,
                dest: n.dest.as_deref(),
                detail: Some(&n.detail),
                ..Default::default()
            },
        )
        .await
        .map(|()| RegistryOut::Unit),
    }
}

pub const COLUMNS: &str =
    "id, vendor, device_id, patient_id, tenant, valid_from, valid_to, created_at, note";

pub fn assignment(r: &tokio_postgres::Row) -> Assignment {
    Assignment {
        id: r.get(0),
        vendor: r.get(1),
        device_id: r.get(2),
        patient_id: r.get(3),
        tenant: r.get(4),
        valid_from_ms: r.get(5),
        valid_to_ms: r.get(6),
        created_at_ms: r.get(7),
        note: r.get(8),
    }
}

async fn assign(tx: &Client, a: &NewAssignment) -> Result<Assignment, JournalError> {
    if a.valid_to_ms.is_some_and(|to| to <= a.valid_from_ms) {
        // Checked here, not left to the CHECK constraint: a database error would roll back the
        // whole batch.
        return Err(JournalError::Conflict(
            "valid_to must be after valid_from".into(),
        ));
    }
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::TEXT || '/' || $3::TEXT))",
        &[&DEVICE_LOCK_NS, &a.vendor, &a.device_id],
    )
    .await?;
    let now = crate::clock::now_ms();
    let params: [&(dyn ToSql + Sync); 8] = [
        &a.vendor,
        &a.device_id,
        &a.patient_id,
        &a.tenant,
        &a.valid_from_ms,
        &a.valid_to_ms,
        &now,
        &a.note,
    ];
    let inserted = tx
        .query_opt(
            "INSERT INTO device_assignments
               (vendor, device_id, patient_id, tenant, valid_from, valid_to, created_at, note)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8
             WHERE NOT EXISTS (
               SELECT 1 FROM device_assignments
               WHERE vendor = $1 AND device_id = $2
                 AND (valid_to IS NULL OR valid_to > $5) AND ($6::BIGINT IS NULL OR valid_from < $6))
             RETURNING id",
            &params,
        )
        .await?;
    if let Some(row) = inserted {
        return Ok(Assignment {
            id: row.get(0),
            vendor: a.vendor.clone(),
            device_id: a.device_id.clone(),
            patient_id: a.patient_id.clone(),
            tenant: a.tenant.clone(),
            valid_from_ms: a.valid_from_ms,
            valid_to_ms: a.valid_to_ms,
            created_at_ms: now,
            note: a.note.clone(),
        });
    }
    let clash = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM device_assignments
                 WHERE vendor = $1 AND device_id = $2
                   AND (valid_to IS NULL OR valid_to > $3) AND ($4::BIGINT IS NULL OR valid_from < $4)
                 ORDER BY valid_from LIMIT 1"
            ),
            &[&a.vendor, &a.device_id, &a.valid_from_ms, &a.valid_to_ms],
        )
        .await?;
    Err(JournalError::Conflict(match clash {
        Some(r) => overlap_message(&assignment(&r)),
        None => format!(
            "device {}/{} has an overlapping assignment",
            a.vendor, a.device_id
        ),
    }))
}

async fn end(
    tx: &Client,
    id: i64,
    vendor: &str,
    device_id: &str,
    at_ms: i64,
) -> Result<Assignment, JournalError> {
    let updated = tx
        .query_opt(
            &format!(
                "UPDATE device_assignments SET valid_to = $4
                 WHERE id = $1 AND vendor = $2 AND device_id = $3
                   AND valid_from < $4 AND (valid_to IS NULL OR valid_to > $4)
                 RETURNING {COLUMNS}"
            ),
            &[&id, &vendor, &device_id, &at_ms],
        )
        .await?;
    if let Some(r) = updated {
        return Ok(assignment(&r));
    }
    let found = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM device_assignments
                 WHERE id = $1 AND vendor = $2 AND device_id = $3"
            ),
            &[&id, &vendor, &device_id],
        )
        .await?;
    match found {
        None => Err(JournalError::NotFound(format!(
            "device {vendor}/{device_id} has no assignment {id}"
        ))),
        Some(r) => {
            check_end(&assignment(&r), at_ms)?;
            Err(JournalError::Conflict(format!(
                "assignment {id} changed concurrently; try again"
            )))
        }
    }
}

async fn beat(tx: &Client, b: &DeviceBeat) -> Result<(), JournalError> {
    tx.execute(
        "INSERT INTO device_liveness
           (vendor, device_id, tenant, last_seen_at, last_kind, reported_at, beats)
         VALUES ($1, $2, $3, $4, $5, $6, 1)
         ON CONFLICT (vendor, device_id) DO UPDATE SET
           tenant = COALESCE(EXCLUDED.tenant, device_liveness.tenant),
           last_seen_at = GREATEST(device_liveness.last_seen_at, EXCLUDED.last_seen_at),
           last_kind = EXCLUDED.last_kind,
           reported_at = COALESCE(EXCLUDED.reported_at, device_liveness.reported_at),
           beats = device_liveness.beats + 1",
        &[
            &b.vendor,
            &b.device_id,
            &b.tenant,
            &b.seen_at_ms,
            &b.kind,
            &b.reported_at_ms,
        ],
    )
    .await?;
    Ok(())
}

async fn quarantine(
    tx: &Client,
    s: &Stmts,
    ev: &NewEvent,
    info: &QuarantineInfo,
) -> Result<Appended, JournalError> {
    if let Some(id) = find_existing(tx, s, ev).await? {
        return Ok(Appended::Duplicate { id });
    }
    let env = &ev.envelope;
    let now = crate::clock::now_ms();
    let row = EventRow::new(ev, 0, now);
    let params = row.params();
    let Some(row) = tx.query_opt(&s.insert_event, &params).await? else {
        let id = find_existing(tx, s, ev).await?.ok_or_else(|| {
            JournalError::Conflict("event conflicts with a stored event but none matches".into())
        })?;
        return Ok(Appended::Duplicate { id });
    };
    let seq: i64 = row.get(0);
    tx.execute(
        "INSERT INTO quarantine (event_seq, event_id, device_id, requested_tenant, reason, quarantined_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &seq,
            &env.id,
            &info.device_id,
            &info.requested_tenant,
            &info.reason,
            &now,
        ],
    )
    .await?;
    let stored = format!("mapping {}", env.mapping_version);
    for (at, kind, detail) in [
        (ev.received_at_ms, "received", env.vendor.as_str()),
        (now, "stored", stored.as_str()),
        (now, "quarantined", info.reason.as_str()),
    ] {
        audit(
            tx,
            s,
            AuditRow {
                at,
                event_id: &env.id,
                kind,
                detail: Some(detail),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(Appended::Stored { id: env.id.clone() })
}

async fn release(tx: &Client, s: &Stmts, r: &Release) -> Result<(), JournalError> {
    let env = &r.envelope;
    let now = crate::clock::now_ms();
    let Some(row) = tx
        .query_opt(
            "UPDATE quarantine SET released_at = $2 WHERE event_id = $1 AND released_at IS NULL
             RETURNING event_seq",
            &[&env.id, &now],
        )
        .await?
    else {
        let known = tx
            .query_opt(
                "SELECT released_at FROM quarantine WHERE event_id = $1",
                &[&env.id],
            )
            .await?;
        return Err(match known.and_then(|r| r.get::<_, Option<i64>>(0)) {
            Some(at) => JournalError::Conflict(format!(
                "event {} was already released from quarantine at {}",
                env.id,
                instant(at)
            )),
            None => JournalError::NotFound(format!("event {} is not in quarantine", env.id)),
        });
    };
    let seq: i64 = row.get(0);
    let class = env.category.lane_class().as_i64() as i16;
    let routed = r.destinations.len() as i32;
    tx.execute(
        "UPDATE events SET category = $2, priority = $3, tenant = $4, key = $5, lane_class = $6,
            mapping_version = $7, fhir = $8, routed_to = $9 WHERE seq = $1",
        &[
            &seq,
            &env.category.as_str(),
            &env.priority.as_str(),
            &env.tenant,
            &env.key,
            &class,
            &env.mapping_version,
            &env.fhir,
            &routed,
        ],
    )
    .await?;
    audit(
        tx,
        s,
        AuditRow {
            at: now,
            event_id: &env.id,
            kind: "released",
            detail: Some(&r.detail),
            ..Default::default()
        },
    )
    .await?;
    super::subs::on_append(tx, s, env, now).await?;
    for dest in &r.destinations {
        enqueue(tx, s, seq, &env.id, dest, class, &env.key, now).await?;
    }
    let (kind, detail) = if r.destinations.is_empty() {
        ("unrouted", "no route matched".to_string())
    } else {
        (
            "routed",
            format!(
                "routes [{}] -> [{}]",
                r.routes.join(","),
                r.destinations.join(",")
            ),
        )
    };
    audit(
        tx,
        s,
        AuditRow {
            at: now,
            event_id: &env.id,
            kind,
            detail: Some(&detail),
            ..Default::default()
        },
    )
    .await
}
