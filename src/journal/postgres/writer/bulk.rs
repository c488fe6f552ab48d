//! A batch's appends in one statement and its attempt records in another.
//!
//! PostgreSQL spends about as long on each statement's round of parse/bind/execute start-up as on
//! the work itself, and one writer's statements run one after another on one server process:
//! with a statement or two per command, that process was the node's limit. Here the batch's
//! commands travel as column arrays (`unnest ... WITH ORDINALITY`) and rows are inserted in array
//! order, so delivery and audit ids keep the order the commands had, as lane order and the audit
//! chain require. The lane rows were locked by the batch's `lock_lanes` before either runs.

use std::collections::HashSet;

use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::{Stmts, find_existing, subs};
use crate::journal::{Appended, AttemptRecord, JournalError, NewEvent, Verdict};

/// Stores every event of `evs` that is not a repeat: the event, its deliveries (in destination
/// order), its lanes (a new delivery becomes the head of an empty lane) and its `received`,
/// `stored` and `routed`/`unrouted` audit rows. Results are in `evs` order.
pub async fn append_all(
    tx: &Transaction<'_>,
    s: &Stmts,
    evs: &[&NewEvent],
) -> Vec<Result<Appended, JournalError>> {
    if evs.is_empty() {
        return Vec::new();
    }
    let now = crate::clock::now_ms();
    let cols = AppendColumns::of(evs, now);
    let rows = match tx.query(&s.append_all, &cols.params()).await {
        Ok(rows) => rows,
        Err(e) => return all_failed(evs.len(), &e.into()),
    };
    let stored: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let any_subscription = rows.first().is_some_and(|r| r.get::<_, bool>(1));
    let mut out = Vec::with_capacity(evs.len());
    for ev in evs {
        let id = &ev.envelope.id;
        out.push(if stored.contains(id) {
            // The numbering statement runs only when some subscription exists at all.
            match any_subscription {
                true => subs::on_append(tx, s, &ev.envelope, now)
                    .await
                    .map(|()| Appended::Stored { id: id.clone() }),
                false => Ok(Appended::Stored { id: id.clone() }),
            }
        } else {
            // A repeat of a stored event (also of one earlier in this batch): ON CONFLICT skipped it.
            match find_existing(tx, s, ev).await {
                Ok(Some(id)) => Ok(Appended::Duplicate { id }),
                Ok(None) => Err(JournalError::Conflict(
                    "event conflicts with a stored event but none matches".into(),
                )),
                Err(e) => Err(e),
            }
        });
    }
    out
}

/// Applies every record of `recs` whose task still holds its lane: the delivery row, the
/// attempt's two audit rows and the lane (released; advanced to its next pending delivery unless
/// the head is to be retried). A record whose lease is stale changes nothing and gets `Conflict`.
pub async fn record_all(
    tx: &Transaction<'_>,
    s: &Stmts,
    recs: &[&AttemptRecord],
) -> Vec<Result<(), JournalError>> {
    if recs.is_empty() {
        return Vec::new();
    }
    let cols = RecordColumns::of(recs);
    let rows = match tx.query(&s.record_all, &cols.params()).await {
        Ok(rows) => rows,
        Err(e) => return all_failed(recs.len(), &e.into()),
    };
    let applied: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    recs.iter()
        .enumerate()
        .map(|(i, rec)| match applied.contains(&(i as i64 + 1)) {
            true => Ok(()),
            false => Err(JournalError::Conflict(format!(
                "stale lease for delivery {} (lane no longer held by this worker)",
                rec.task.delivery_id
            ))),
        })
        .collect()
}

fn all_failed<T>(n: usize, e: &JournalError) -> Vec<Result<T, JournalError>> {
    (0..n)
        .map(|_| Err(JournalError::Unavailable(e.to_string())))
        .collect()
}

/// The statement behind [`append_all`]. `$16` is the stored-at time of the whole batch.
pub const APPEND_ALL_SQL: &str = "WITH i AS (
        SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
            $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::SMALLINT[], $10::TEXT[], $11::TEXT[],
            $12::BYTEA[], $13::TEXT[], $14::INTEGER[], $15::BIGINT[], $17::TEXT[])
        WITH ORDINALITY AS i(id, vendor, vendor_event_id, idem_key, category, priority, tenant,
            key, lane_class, mapping_version, content_type, raw, fhir, routed_to, received_at,
            traceparent, n)
     ), ev AS (
        INSERT INTO events (id, vendor, vendor_event_id, idem_key, category, priority, tenant,
            key, lane_class, mapping_version, content_type, raw, fhir, routed_to, received_at,
            stored_at, traceparent)
        SELECT id, vendor, vendor_event_id, idem_key, category, priority, tenant, key,
            lane_class, mapping_version, content_type, raw, fhir, routed_to, received_at, $16::BIGINT,
            traceparent
        FROM i ORDER BY n
        ON CONFLICT DO NOTHING RETURNING seq, id
     ), dl AS (
        INSERT INTO deliveries (event_seq, event_id, dest, class, lane_key, state, created_at)
        SELECT ev.seq, i.id, d.dest, i.lane_class, i.key, 'pending', $16::BIGINT
        FROM unnest($18::BIGINT[], $19::TEXT[]) WITH ORDINALITY AS d(ev_n, dest, n)
        JOIN i ON i.n = d.ev_n JOIN ev ON ev.id = i.id
        ORDER BY d.n
        RETURNING id, dest, class, lane_key
     ), ln AS (
        INSERT INTO lanes (dest, class, lane_key, head_id, next_attempt_at)
        SELECT dest, class, lane_key, min(id), $16::BIGINT FROM dl GROUP BY dest, class, lane_key
        ON CONFLICT (dest, class, lane_key) DO UPDATE SET
          head_id = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.head_id ELSE lanes.head_id END,
          next_attempt_at = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.next_attempt_at
                                 ELSE lanes.next_attempt_at END
     ), au AS (
        INSERT INTO audit (at, event_id, kind, detail)
        SELECT a.at, i.id, a.kind, a.detail
        FROM unnest($20::BIGINT[], $21::BIGINT[], $22::TEXT[], $23::TEXT[])
            WITH ORDINALITY AS a(ev_n, at, kind, detail, n)
        JOIN i ON i.n = a.ev_n JOIN ev ON ev.id = i.id
        ORDER BY a.n
     )
     SELECT id, EXISTS (SELECT 1 FROM subscriptions) FROM ev";

/// The statement behind [`record_all`]: returns the 1-based positions of the records applied.
/// Verdicts: 0 delivered, 1 retry, 2 dead letter. The parts of one statement share a snapshot,
/// so the lane's next head must skip the recorded delivery explicitly (it still reads as
/// pending there).
pub const RECORD_ALL_SQL: &str = "WITH r AS (
        SELECT * FROM unnest($1::TEXT[], $2::SMALLINT[], $3::TEXT[], $4::BIGINT[], $5::INTEGER[],
            $6::INTEGER[], $7::BIGINT[], $8::TEXT[], $9::FLOAT8[], $10::TEXT[], $11::TEXT[],
            $12::BIGINT[], $13::SMALLINT[], $14::BIGINT[])
        WITH ORDINALITY AS r(dest, class, lane_key, delivery_id, attempt, status, at, event_id,
            latency_ms, error, detail, next_at, verdict, lease, n)
     ), ok AS (
        SELECT r.* FROM r JOIN lanes l
          ON l.dest = r.dest AND l.class = r.class AND l.lane_key = r.lane_key AND l.leased = r.lease
     ), d AS (
        UPDATE deliveries SET
          state = CASE ok.verdict WHEN 0 THEN 'delivered' WHEN 2 THEN 'dead' ELSE deliveries.state END,
          attempts = ok.attempt, last_status = ok.status,
          last_error = CASE ok.verdict WHEN 0 THEN NULL WHEN 1 THEN ok.error ELSE ok.detail END,
          delivered_at = CASE WHEN ok.verdict = 0 THEN ok.at ELSE deliveries.delivered_at END,
          dead_at = CASE WHEN ok.verdict = 2 THEN ok.at ELSE deliveries.dead_at END
        FROM ok WHERE deliveries.id = ok.delivery_id
     ), a AS (
        INSERT INTO audit (at, event_id, kind, dest, attempt, status, latency_ms, detail)
        SELECT ok.at, ok.event_id, x.kind, ok.dest, ok.attempt, ok.status, x.latency_ms, x.detail
        FROM ok CROSS JOIN LATERAL (VALUES
            (1, 'attempt', ok.latency_ms, ok.error),
            (2, CASE ok.verdict WHEN 0 THEN 'delivered' WHEN 1 THEN 'retry_scheduled'
                                ELSE 'dead_lettered' END,
                NULL::FLOAT8,
                CASE WHEN ok.verdict = 0 THEN NULLIF(ok.detail, '') ELSE ok.detail END)
        ) AS x(k, kind, latency_ms, detail)
        ORDER BY ok.n, x.k
     ), l AS (
        UPDATE lanes SET
          head_id = CASE WHEN ok.verdict = 1 THEN lanes.head_id
                    ELSE COALESCE((SELECT min(p.id) FROM deliveries p
                                   WHERE p.dest = ok.dest AND p.class = ok.class
                                     AND p.lane_key = ok.lane_key AND p.state = 'pending'
                                     AND p.id <> ok.delivery_id), 0) END,
          leased = 0, lease_until = 0, next_attempt_at = ok.next_at
        FROM ok
        WHERE lanes.dest = ok.dest AND lanes.class = ok.class AND lanes.lane_key = ok.lane_key
     )
     SELECT n FROM ok";

/// [`APPEND_ALL_SQL`]'s parameters: one array per column, plus the deliveries and audit rows
/// flattened with the 1-based position of their event.
struct AppendColumns<'a> {
    id: Vec<&'a str>,
    vendor: Vec<&'a str>,
    vendor_event_id: Vec<Option<&'a str>>,
    idem_key: Vec<Option<&'a str>>,
    category: Vec<&'static str>,
    priority: Vec<&'static str>,
    tenant: Vec<Option<&'a str>>,
    key: Vec<&'a str>,
    class: Vec<i16>,
    mapping_version: Vec<&'a str>,
    content_type: Vec<&'a str>,
    raw: Vec<&'a [u8]>,
    fhir: Vec<&'a str>,
    routed: Vec<i32>,
    received_at: Vec<i64>,
    now: i64,
    traceparent: Vec<Option<&'a str>>,
    dl_event: Vec<i64>,
    dl_dest: Vec<&'a str>,
    au_event: Vec<i64>,
    au_at: Vec<i64>,
    au_kind: Vec<&'static str>,
    au_detail: Vec<String>,
}

impl<'a> AppendColumns<'a> {
    fn of(evs: &[&'a NewEvent], now: i64) -> Self {
        let mut c = AppendColumns {
            id: Vec::with_capacity(evs.len()),
            vendor: Vec::with_capacity(evs.len()),
            vendor_event_id: Vec::with_capacity(evs.len()),
            idem_key: Vec::with_capacity(evs.len()),
            category: Vec::with_capacity(evs.len()),
            priority: Vec::with_capacity(evs.len()),
            tenant: Vec::with_capacity(evs.len()),
            key: Vec::with_capacity(evs.len()),
            class: Vec::with_capacity(evs.len()),
            mapping_version: Vec::with_capacity(evs.len()),
            content_type: Vec::with_capacity(evs.len()),
            raw: Vec::with_capacity(evs.len()),
            fhir: Vec::with_capacity(evs.len()),
            routed: Vec::with_capacity(evs.len()),
            received_at: Vec::with_capacity(evs.len()),
            now,
            traceparent: Vec::with_capacity(evs.len()),
            dl_event: Vec::new(),
            dl_dest: Vec::new(),
            au_event: Vec::with_capacity(3 * evs.len()),
            au_at: Vec::with_capacity(3 * evs.len()),
            au_kind: Vec::with_capacity(3 * evs.len()),
            au_detail: Vec::with_capacity(3 * evs.len()),
        };
        for (i, ev) in evs.iter().enumerate() {
            let n = i as i64 + 1;
            let env = &ev.envelope;
            c.id.push(&env.id);
            c.vendor.push(&env.vendor);
            c.vendor_event_id.push(env.vendor_event_id.as_deref());
            c.idem_key.push(ev.idempotency_key.as_deref());
            c.category.push(env.category.as_str());
            c.priority.push(env.priority.as_str());
            c.tenant.push(env.tenant.as_deref());
            c.key.push(&env.key);
            c.class.push(env.category.lane_class().as_i64() as i16);
            c.mapping_version.push(&env.mapping_version);
            c.content_type.push(&ev.content_type);
            c.raw.push(&ev.raw);
            c.fhir.push(&env.fhir);
            c.routed.push(ev.destinations.len() as i32);
            c.received_at.push(ev.received_at_ms);
            c.traceparent.push(ev.traceparent.as_deref());
            for d in &ev.destinations {
                c.dl_event.push(n);
                c.dl_dest.push(d);
            }
            let routing = match ev.destinations.is_empty() {
                true => ("unrouted", "no route matched".to_string()),
                false => (
                    "routed",
                    format!(
                        "routes [{}] -> [{}]",
                        ev.routes.join(","),
                        ev.destinations.join(",")
                    ),
                ),
            };
            for (at, kind, detail) in [
                (ev.received_at_ms, "received", env.vendor.clone()),
                (now, "stored", format!("mapping {}", env.mapping_version)),
                (now, routing.0, routing.1),
            ] {
                c.au_event.push(n);
                c.au_at.push(at);
                c.au_kind.push(kind);
                c.au_detail.push(detail);
            }
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 23] {
        [
            &self.id,
            &self.vendor,
            &self.vendor_event_id,
            &self.idem_key,
            &self.category,
            &self.priority,
            &self.tenant,
            &self.key,
            &self.class,
            &self.mapping_version,
            &self.content_type,
            &self.raw,
            &self.fhir,
            &self.routed,
            &self.received_at,
            &self.now,
            &self.traceparent,
            &self.dl_event,
            &self.dl_dest,
            &self.au_event,
            &self.au_at,
            &self.au_kind,
            &self.au_detail,
        ]
    }
}

/// [`RECORD_ALL_SQL`]'s parameters, one array per column.
#[derive(Default)]
struct RecordColumns<'a> {
    dest: Vec<&'a str>,
    class: Vec<i16>,
    lane_key: Vec<&'a str>,
    delivery_id: Vec<i64>,
    attempt: Vec<i32>,
    status: Vec<Option<i32>>,
    at: Vec<i64>,
    event_id: Vec<&'a str>,
    latency_ms: Vec<f64>,
    error: Vec<Option<&'a str>>,
    detail: Vec<String>,
    next_at: Vec<i64>,
    verdict: Vec<i16>,
    lease: Vec<i64>,
}

impl<'a> RecordColumns<'a> {
    fn of(recs: &[&'a AttemptRecord]) -> Self {
        let mut c = RecordColumns::default();
        for rec in recs {
            let t = &rec.task;
            let (verdict, detail, next) = match &rec.verdict {
                Verdict::Delivered => (0, String::new(), rec.at_ms),
                Verdict::Retry { next_attempt_ms } => (
                    1,
                    format!("next attempt in {} ms", next_attempt_ms - rec.at_ms),
                    *next_attempt_ms,
                ),
                Verdict::DeadLetter { reason } => (2, reason.clone(), rec.at_ms),
            };
            c.dest.push(&t.dest);
            c.class.push(t.class.as_i64() as i16);
            c.lane_key.push(&t.lane_key);
            c.delivery_id.push(t.delivery_id);
            c.attempt.push(rec.attempt as i32);
            c.status.push(rec.status.map(i32::from));
            c.at.push(rec.at_ms);
            c.event_id.push(&t.event_id);
            c.latency_ms.push(rec.latency_ms);
            c.error.push(rec.error.as_deref());
            c.detail.push(detail);
            c.next_at.push(next);
            c.verdict.push(verdict);
            c.lease.push(t.lease);
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 14] {
        [
            &self.dest,
            &self.class,
            &self.lane_key,
            &self.delivery_id,
            &self.attempt,
            &self.status,
            &self.at,
            &self.event_id,
            &self.latency_ms,
            &self.error,
            &self.detail,
            &self.next_at,
            &self.verdict,
            &self.lease,
        ]
    }
}
