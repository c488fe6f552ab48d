//! A batch's appends in one statement and its attempt records in another.
//!
//! PostgreSQL spends about as long on each statement's round of parse/bind/execute start-up as on
//! the work itself, and one writer's statements run one after another on one server process:
//! with a statement or two per command, that process was the node's limit. Here the batch's
//! commands travel as column arrays (`unnest ... WITH ORDINALITY`) and deliveries are inserted in
//! array order, so their ids keep the order the appends had, as lane order requires. Audit rows
//! arrive already hashed into the chain (see [`write`]). The lane rows were locked by the batch's
//! `lock_lanes` before either runs.

use std::collections::HashMap;

use tokio::sync::oneshot;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::offers::Offers;
use super::{Stmts, subs};
use crate::journal::audit_chain::{Content, row_hash};
use crate::journal::handoff::{Handed, Handoff};
use crate::journal::{Appended, AttemptRecord, DeliveryTask, JournalError, NewEvent, Verdict};

/// The error that makes the writer run its batch again: a row the batch expected to write was
/// not written (another transaction stored the same vendor event first, or moved a lease), so
/// hashes already computed for it would leave a gap in the chain.
const RACED: &str = "40001: a concurrent transaction changed what the batch had chained";

/// Writes a batch's appends and attempt records with their audit rows already in the chain.
///
/// Locks the chain head first (after the batch's lanes: the order every writer keeps), so from
/// here to commit no other transaction adds events or chained rows: which appends are repeats
/// (of a stored event, or of one earlier in the batch) and which records still hold their lane
/// (read after the batch's claims, which may take over a lane whose lease ran out) is then known
/// before anything is written, and each audit row is inserted with its chain position and hash
/// instead of being rewritten by a seal.
/// `lock_anyway`: lock the head even when there is nothing to write (the batch's subscription
/// writes come next and must hold it). Lanes the appends open are leased for `hand.lease_ms` and
/// returned as hand-offs (see [`Offers`]), to be sent only once the batch has committed.
///
/// `assumed`: the chain head this writer's last commit left, when the batch is sent in one round
/// trip (see `writer::pipeline`). Then nothing is read first: every event is taken as new, every outcome
/// as holding its lease, and the rows are hashed onto the assumed head; the statements still lock
/// the head first, and abort the transaction as a serialization failure if any assumption did not
/// hold (another writer moved the head, a repeat, a moved lease, a subscription).
pub async fn write(
    tx: &Client,
    s: &Stmts,
    evs: &[&NewEvent],
    recs: &[&AttemptRecord],
    lock_anyway: bool,
    hand: HandOver<'_>,
    assumed: Option<OnHead<'_>>,
) -> Written {
    if evs.is_empty() && recs.is_empty() {
        if let Some(OnHead { head, tell }) = assumed {
            let _ = tell.send(head.clone());
        }
        if lock_anyway {
            // A failure aborts the transaction; the subscription writes then report it.
            let _ = tx.query_one(&s.lock_chain_head, &[]).await;
        }
        return (Vec::new(), Vec::new(), Vec::new(), None);
    }
    match write_chained(tx, s, evs, recs, hand, assumed).await {
        Ok(out) => out,
        Err(e) => (
            all_failed(evs.len(), &e),
            all_failed(recs.len(), &e),
            Vec::new(),
            None,
        ),
    }
}

/// A position and hash in the audit chain.
pub type Head = (i64, String);

/// A batch sent in one round trip: the chain head it assumes, and who is told the head its rows
/// will leave as soon as they are hashed, before the server has answered (the writer sends its
/// next batch on that head meanwhile, see `writer::pipeline`).
pub struct OnHead<'a> {
    pub head: &'a Head,
    pub tell: oneshot::Sender<Head>,
}

/// Where a batch's opened lanes go: the node's dispatchers (`None`: nothing is handed over, as
/// in tests of the journal alone), and how long their lease lasts.
#[derive(Clone, Copy)]
pub struct HandOver<'a> {
    pub handoff: Option<&'a Handoff>,
    pub lease_ms: i64,
}

/// Per append and per outcome its result, the lanes to hand over, and the chain head the rows
/// moved to (`None`: nothing was written).
type Written = (
    Vec<Result<Appended, JournalError>>,
    Vec<Result<(), JournalError>>,
    Vec<Handed>,
    Option<Head>,
);

async fn write_chained(
    tx: &Client,
    s: &Stmts,
    evs: &[&NewEvent],
    recs: &[&AttemptRecord],
    hand: HandOver<'_>,
    assumed: Option<OnHead<'_>>,
) -> Result<Written, JournalError> {
    let (assumed, tell) = match assumed {
        Some(a) => (Some(a.head), Some(a.tell)),
        None => (None, None),
    };
    let (mut chain, appended, valid) = match assumed {
        Some((seq, hash)) => (
            Chain {
                seq: *seq,
                hash: hash.clone(),
            },
            vec![None; evs.len()],
            vec![true; recs.len()],
        ),
        None => {
            // One round trip: the server runs them in this order, so both lookups start once
            // the head is held (each statement of a transaction at this isolation level reads
            // what committed before it started).
            let (head, appended, valid) = tokio::join!(
                tx.query_one(&s.lock_chain_head, &[]),
                repeats(tx, s, evs),
                holding(tx, s, recs)
            );
            let (head, appended, valid) = (head?, appended?, valid?);
            let chain = Chain {
                seq: head.get(0),
                hash: head.get(1),
            };
            (chain, appended, valid)
        }
    };
    let now = crate::clock::now_ms();
    let new: Vec<&NewEvent> = evs
        .iter()
        .zip(&appended)
        .filter(|(_, a)| a.is_none())
        .map(|(ev, _)| *ev)
        .collect();
    let applied: Vec<&AttemptRecord> = recs
        .iter()
        .zip(&valid)
        .filter(|(_, ok)| **ok)
        .map(|(r, _)| *r)
        .collect();
    let ap = AppendColumns::of(&new, now, &mut chain);
    let offers = Offers::of(&new, hand.handoff, now + hand.lease_ms);
    let expect_stored = assumed.map(|_| new.len() as i64);
    let mut ap_params = ap.params().to_vec();
    ap_params.extend(offers.params());
    ap_params.push(&expect_stored);
    let rc = RecordColumns::of(&applied, &mut chain, hand, now);
    let expect_applied = assumed.map(|_| applied.len() as i64);
    if let Some(tell) = tell {
        let _ = tell.send((chain.seq, chain.hash.clone()));
    }
    let mut rc_params = rc.params().to_vec();
    rc_params.push(&expect_applied);
    // Pipelined: the head moves in the same round trip as the rows that moved it; on the
    // assumed head, it is also locked in that round trip, first.
    let head: [&(dyn ToSql + Sync); 2] = [&chain.seq, &chain.hash];
    let (was_seq, was_hash) = assumed.map_or((0, ""), |(seq, hash)| (*seq, hash.as_str()));
    let head_if: [&(dyn ToSql + Sync); 4] = [&chain.seq, &chain.hash, &was_seq, &was_hash];
    let (locked, stored, recorded, moved) = tokio::join!(
        async {
            match assumed {
                Some(_) => tx.query_one(&s.lock_chain_head, &[]).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match new.is_empty() {
                true => Ok(None),
                false => {
                    let append = match assumed {
                        Some(_) => &s.append_fresh,
                        None => &s.append_all,
                    };
                    tx.query_one(append, &ap_params).await.map(Some)
                }
            }
        },
        async {
            match applied.is_empty() {
                true => Ok(None),
                false => tx.query_one(&s.record_all, &rc_params).await.map(Some),
            }
        },
        async {
            match assumed {
                Some(_) => tx.execute(&s.move_chain_head_from, &head_if).await,
                None => tx.execute(&s.move_chain_head, &head).await,
            }
        },
    );
    locked?;
    let (stored, recorded) = (stored?, recorded?);
    moved?;
    if stored
        .as_ref()
        .is_some_and(|r| r.get::<_, i64>(0) != new.len() as i64)
        || recorded
            .as_ref()
            .is_some_and(|r| r.get::<_, i64>(0) != applied.len() as i64)
    {
        return Err(JournalError::Unavailable(RACED.into()));
    }
    let any_subscription = stored.as_ref().is_some_and(|r| r.get::<_, bool>(1));
    let mut handed = match &stored {
        Some(r) => {
            let (n, head, lease): (Vec<i64>, Vec<i64>, Vec<i64>) = (r.get(2), r.get(3), r.get(4));
            offers.accept(&n, &head, &lease, now)
        }
        None => Vec::new(),
    };
    if let Some(r) = &recorded {
        handed.extend(next_heads(r, &applied)?);
    }
    let mut appends = Vec::with_capacity(evs.len());
    for (ev, repeat) in evs.iter().zip(appended) {
        appends.push(match repeat {
            Some(id) => Ok(Appended::Duplicate { id }),
            // The numbering statement runs only when some subscription exists at all.
            None if any_subscription => {
                subs::on_append(tx, s, &ev.envelope, now)
                    .await
                    .map(|()| Appended::Stored {
                        id: ev.envelope.id.clone(),
                    })
            }
            None => Ok(Appended::Stored {
                id: ev.envelope.id.clone(),
            }),
        });
    }
    let records = recs
        .iter()
        .zip(valid)
        .map(|(rec, ok)| match ok {
            true => Ok(()),
            false => Err(JournalError::Conflict(format!(
                "stale lease for delivery {} (lane no longer held by this worker)",
                rec.task.delivery_id
            ))),
        })
        .collect();
    Ok((appends, records, handed, Some((chain.seq, chain.hash))))
}

/// The next heads [`RECORD_ALL_SQL`] leased for hand-off, as tasks (no slot: each waits for the
/// slot its record's attempt frees, so at most one per slot waits).
fn next_heads(
    row: &tokio_postgres::Row,
    applied: &[&AttemptRecord],
) -> Result<Vec<Handed>, JournalError> {
    let n: Vec<i64> = row.try_get(1)?;
    let head: Vec<i64> = row.try_get(2)?;
    let lease: Vec<i64> = row.try_get(3)?;
    let event_id: Vec<String> = row.try_get(4)?;
    let attempts: Vec<i32> = row.try_get(5)?;
    let created_at: Vec<i64> = row.try_get(6)?;
    let fhir: Vec<String> = row.try_get(7)?;
    let traceparent: Vec<Option<String>> = row.try_get(8)?;
    let mut out = Vec::with_capacity(n.len());
    let columns = head
        .into_iter()
        .zip(lease)
        .zip(event_id)
        .zip(attempts)
        .zip(created_at)
        .zip(fhir)
        .zip(traceparent);
    for (n, ((((((head, lease), event_id), attempts), created_at), fhir), traceparent)) in
        n.into_iter().zip(columns)
    {
        let Some(rec) = applied.get(n as usize - 1) else {
            continue;
        };
        let t = &rec.task;
        out.push(Handed {
            task: DeliveryTask {
                delivery_id: head,
                event_id,
                dest: t.dest.clone(),
                class: t.class,
                lane_key: t.lane_key.clone(),
                attempts: attempts.max(0) as u32,
                created_at_ms: created_at,
                fhir: fhir.into(),
                lease,
                traceparent,
            },
            permit: None,
        });
    }
    Ok(out)
}

/// For each event, the id of the stored event it repeats (same vendor event id, else same
/// idempotency key; stored before, or earlier in this batch), or `None` when it is new.
async fn repeats(
    tx: &Client,
    s: &Stmts,
    evs: &[&NewEvent],
) -> Result<Vec<Option<String>>, JournalError> {
    let vendor: Vec<&str> = evs.iter().map(|e| e.envelope.vendor.as_str()).collect();
    let vid: Vec<Option<&str>> = evs
        .iter()
        .map(|e| e.envelope.vendor_event_id.as_deref())
        .collect();
    let idem: Vec<Option<&str>> = evs.iter().map(|e| e.idempotency_key.as_deref()).collect();
    let mut by_vid: HashMap<(&str, &str), String> = HashMap::new();
    let mut by_idem: HashMap<(&str, &str), String> = HashMap::new();
    let mut stored_vid: HashMap<usize, String> = HashMap::new();
    let mut stored_idem: HashMap<usize, String> = HashMap::new();
    if !evs.is_empty() {
        for r in tx.query(&s.find_repeats, &[&vendor, &vid, &idem]).await? {
            let (by, n, id): (i32, i64, String) = (r.get(0), r.get(1), r.get(2));
            match by {
                0 => stored_vid.insert(n as usize - 1, id),
                _ => stored_idem.insert(n as usize - 1, id),
            };
        }
    }
    let mut out = Vec::with_capacity(evs.len());
    for (i, ev) in evs.iter().enumerate() {
        let v = ev.envelope.vendor.as_str();
        let vid_key = vid[i].map(|x| (v, x));
        let idem_key = idem[i].map(|x| (v, x));
        let found = stored_vid
            .remove(&i)
            .or_else(|| vid_key.and_then(|k| by_vid.get(&k).cloned()))
            .or_else(|| stored_idem.remove(&i))
            .or_else(|| idem_key.and_then(|k| by_idem.get(&k).cloned()));
        if found.is_none() {
            let id = ev.envelope.id.clone();
            if let Some(k) = vid_key {
                by_vid.insert(k, id.clone());
            }
            if let Some(k) = idem_key {
                by_idem.insert(k, id);
            }
        }
        out.push(found);
    }
    Ok(out)
}

/// For each record, whether its task's lease still holds the lane.
async fn holding(
    tx: &Client,
    s: &Stmts,
    recs: &[&AttemptRecord],
) -> Result<Vec<bool>, JournalError> {
    if recs.is_empty() {
        return Ok(Vec::new());
    }
    let dest: Vec<&str> = recs.iter().map(|r| r.task.dest.as_str()).collect();
    let class: Vec<i16> = recs.iter().map(|r| r.task.class.as_i64() as i16).collect();
    let key: Vec<&str> = recs.iter().map(|r| r.task.lane_key.as_str()).collect();
    let lease: Vec<i64> = recs.iter().map(|r| r.task.lease).collect();
    let mut valid = vec![false; recs.len()];
    for r in tx
        .query(&s.find_holders, &[&dest, &class, &key, &lease])
        .await?
    {
        if let Some(v) = valid.get_mut(r.get::<_, i64>(0) as usize - 1) {
            *v = true;
        }
    }
    Ok(valid)
}

/// The chain's head while a batch's rows are hashed onto it.
struct Chain {
    seq: i64,
    hash: String,
}

impl Chain {
    /// Chains one row: its position and hash.
    fn push(&mut self, c: Content<'_>) -> (i64, String) {
        self.seq += 1;
        self.hash = row_hash(&self.hash, &Content { seq: self.seq, ..c });
        (self.seq, self.hash.clone())
    }
}

fn all_failed<T>(n: usize, e: &JournalError) -> Vec<Result<T, JournalError>> {
    (0..n)
        .map(|_| match e {
            JournalError::Unavailable(m) => Err(JournalError::Unavailable(m.clone())),
            other => Err(JournalError::Unavailable(other.to_string())),
        })
        .collect()
}

/// Which of a batch's records (1-based positions) hold their lane's lease.
pub const FIND_HOLDERS_SQL: &str = "
    SELECT r.n FROM unnest($1::TEXT[], $2::SMALLINT[], $3::TEXT[], $4::BIGINT[])
        WITH ORDINALITY AS r(dest, class, lane_key, lease, n)
    JOIN lanes l ON l.dest = r.dest AND l.class = r.class AND l.lane_key = r.lane_key
        AND l.leased = r.lease";

/// Which of a batch's events are already stored: (0 by vendor event id | 1 by idempotency key,
/// 1-based position, stored id).
pub const FIND_REPEATS_SQL: &str = "
    SELECT 0, u.n, e.id FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS u(vendor, vid, n)
        JOIN events e ON e.vendor = u.vendor AND e.vendor_event_id = u.vid
    UNION ALL
    SELECT 1, u.n, e.id FROM unnest($1::TEXT[], $3::TEXT[]) WITH ORDINALITY AS u(vendor, ik, n)
        JOIN events e ON e.vendor = u.vendor AND e.idem_key = u.ik";

/// Stores the batch's new events with their deliveries, lanes and chained audit rows; returns
/// how many events it stored (fewer than sent means another transaction raced it), whether any
/// subscription exists, and which offered lanes (`$26`–`$28`, see [`Offers`]) it leased until
/// `$29` because they were empty: offer position, head delivery, lease token. A lane's lease
/// token is taken from the offer only when the lane had no head and no lease, so a token equal
/// to the offer's proves this statement leased it. `$16` is the stored-at time of the batch.
/// `$30`, when not null, is the number of events the writer expects stored without having
/// looked for repeats (see [`write`]): fewer, or any subscription (whose numbering needs a
/// round trip of its own), abort the transaction as a serialization failure.
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
     ), offer AS (
        SELECT o.*, nextval('lease_tokens') AS token
        FROM unnest($26::TEXT[], $27::SMALLINT[], $28::TEXT[]) WITH ORDINALITY
            AS o(dest, class, lane_key, n)
     ), ln AS (
        INSERT INTO lanes (dest, class, lane_key, head_id, next_attempt_at, leased, lease_until)
        SELECT g.dest, g.class, g.lane_key, g.head, $16::BIGINT, COALESCE(o.token, 0),
            CASE WHEN o.token IS NULL THEN 0 ELSE $29::BIGINT END
        FROM (SELECT dest, class, lane_key, min(id) AS head FROM dl
              GROUP BY dest, class, lane_key) g
        LEFT JOIN offer o
            ON o.dest = g.dest AND o.class = g.class AND o.lane_key = g.lane_key
        ON CONFLICT (dest, class, lane_key) DO UPDATE SET
          head_id = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.head_id ELSE lanes.head_id END,
          next_attempt_at = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.next_attempt_at
                                 ELSE lanes.next_attempt_at END,
          leased = CASE WHEN lanes.head_id = 0 AND lanes.leased = 0 THEN EXCLUDED.leased
                        ELSE lanes.leased END,
          lease_until = CASE WHEN lanes.head_id = 0 AND lanes.leased = 0
                             THEN EXCLUDED.lease_until ELSE lanes.lease_until END
        RETURNING lanes.dest, lanes.class, lanes.lane_key, lanes.head_id, lanes.leased
     ), handed AS (
        SELECT o.n, ln.head_id, ln.leased FROM ln JOIN offer o
            ON o.dest = ln.dest AND o.class = ln.class AND o.lane_key = ln.lane_key
            AND o.token = ln.leased
     ), au AS (
        INSERT INTO audit (at, event_id, kind, detail, chain_seq, hash)
        SELECT a.at, a.event_id, a.kind, a.detail, a.seq, a.hash
        FROM unnest($20::BIGINT[], $21::TEXT[], $22::TEXT[], $23::TEXT[], $24::BIGINT[],
            $25::TEXT[]) AS a(at, event_id, kind, detail, seq, hash)
        ORDER BY a.seq
     )
     SELECT (SELECT count(*) FROM ev), EXISTS (SELECT 1 FROM subscriptions),
        ARRAY(SELECT n FROM handed ORDER BY n), ARRAY(SELECT head_id FROM handed ORDER BY n),
        ARRAY(SELECT leased FROM handed ORDER BY n),
        CASE WHEN $30::BIGINT IS NULL
                  OR ((SELECT count(*) FROM ev) = $30 AND NOT EXISTS (SELECT 1 FROM subscriptions))
             THEN true ELSE knutepunkt_raced('the events of a batch sent in one round trip') END";

const WITH_CONFLICT: &str = "ON CONFLICT DO NOTHING RETURNING seq, id";

/// [`APPEND_ALL_SQL`] for a batch sent in one round trip, which takes every event as new: a plain
/// insert, without `ON CONFLICT`. A repeat then fails the statement on the unique index (the
/// transaction aborts and the batch runs the careful way, as when the count check fails), and
/// the insert skips the separate probe of the three unique indexes before each row that
/// `ON CONFLICT` makes (about 6 % of the statement's time in the bench).
pub fn fresh_appends() -> String {
    APPEND_ALL_SQL.replacen(WITH_CONFLICT, "RETURNING seq, id", 1)
}

/// Applies the batch's records whose lease holds, with their chained audit rows; returns how
/// many it applied (fewer than sent means a lease moved after [`holding`] read it: the batch runs
/// again). Verdicts: 0 delivered, 1 retry, 2 dead letter. The parts of one statement share a
/// snapshot, so the lane's next head must skip the recorded delivery explicitly (it still reads
/// as pending there): it is searched *after* it, as the recorded delivery is the lane's head and
/// every other pending delivery of the lane has a larger id (replays re-enter at the tail).
/// Searching from the lane's start instead walked the index entries of every delivered row that
/// vacuum had not removed yet, more of them the longer a lane's backlog. `nx` is `MATERIALIZED`
/// so the search runs once per record: inlined, each of the three uses of `next_head` in the
/// lane update ran its own. Where `$20` holds (the destination's dispatcher takes hand-offs), a
/// lane that moves on to a next head is leased until `$21` at once, and the head is returned
/// with what its delivery needs (arrays, by record position), so it goes out without waiting
/// for a claim.
/// `$22`, when not null, is the number of outcomes the writer expects to hold their lease
/// without having read the leases: fewer abort the transaction as a serialization failure.
pub const RECORD_ALL_SQL: &str = "WITH r AS (
        SELECT * FROM unnest($1::TEXT[], $2::SMALLINT[], $3::TEXT[], $4::BIGINT[], $5::INTEGER[],
            $6::INTEGER[], $7::BIGINT[], $8::TEXT[], $9::FLOAT8[], $10::TEXT[], $11::TEXT[],
            $12::BIGINT[], $13::SMALLINT[], $14::BIGINT[], $15::BIGINT[], $16::TEXT[],
            $17::BIGINT[], $18::TEXT[], $19::TEXT[], $20::BOOL[])
        WITH ORDINALITY AS r(dest, class, lane_key, delivery_id, attempt, status, at, event_id,
            latency_ms, error, detail, next_at, verdict, lease, seq1, hash1, seq2, hash2, detail2,
            offer, n)
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
        INSERT INTO audit (at, event_id, kind, dest, attempt, status, latency_ms, detail,
            chain_seq, hash)
        SELECT ok.at, ok.event_id, x.kind, ok.dest, ok.attempt, ok.status, x.latency_ms, x.detail,
            x.seq, x.hash
        FROM ok CROSS JOIN LATERAL (VALUES
            ('attempt', ok.latency_ms, ok.error, ok.seq1, ok.hash1),
            (CASE ok.verdict WHEN 0 THEN 'delivered' WHEN 1 THEN 'retry_scheduled'
                             ELSE 'dead_lettered' END,
                NULL::FLOAT8, ok.detail2, ok.seq2, ok.hash2)
        ) AS x(kind, latency_ms, detail, seq, hash)
        ORDER BY x.seq
     ), nx AS MATERIALIZED (
        SELECT ok.*, CASE WHEN ok.verdict = 1 THEN NULL
                     ELSE COALESCE((SELECT min(p.id) FROM deliveries p
                                    WHERE p.dest = ok.dest AND p.class = ok.class
                                      AND p.lane_key = ok.lane_key AND p.state = 'pending'
                                      AND p.id > ok.delivery_id), 0) END AS next_head
        FROM ok
     ), l AS (
        UPDATE lanes SET
          head_id = COALESCE(nx.next_head, lanes.head_id),
          leased = CASE WHEN nx.next_head > 0 AND nx.offer THEN nextval('lease_tokens') ELSE 0 END,
          lease_until = CASE WHEN nx.next_head > 0 AND nx.offer THEN $21::BIGINT ELSE 0 END,
          next_attempt_at = nx.next_at
        FROM nx
        WHERE lanes.dest = nx.dest AND lanes.class = nx.class AND lanes.lane_key = nx.lane_key
        RETURNING nx.n, lanes.head_id, lanes.leased
     ), handed AS (
        SELECT l.n, l.head_id, l.leased, d.event_id, d.attempts, d.created_at, e.fhir,
            e.traceparent
        FROM l JOIN deliveries d ON d.id = l.head_id JOIN events e ON e.seq = d.event_seq
        WHERE l.leased <> 0
     )
     SELECT (SELECT count(*) FROM ok), ARRAY(SELECT n FROM handed ORDER BY n),
        ARRAY(SELECT head_id FROM handed ORDER BY n), ARRAY(SELECT leased FROM handed ORDER BY n),
        ARRAY(SELECT event_id FROM handed ORDER BY n),
        ARRAY(SELECT attempts FROM handed ORDER BY n),
        ARRAY(SELECT created_at FROM handed ORDER BY n),
        ARRAY(SELECT fhir FROM handed ORDER BY n),
        ARRAY(SELECT traceparent FROM handed ORDER BY n),
        CASE WHEN $22::BIGINT IS NULL OR (SELECT count(*) FROM ok) = $22 THEN true
             ELSE knutepunkt_raced('the leases of a batch sent in one round trip') END";

/// [`APPEND_ALL_SQL`]'s parameters: one array per column, the deliveries flattened with the
/// 1-based position of their event, and the audit rows with their place in the chain.
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
    au_at: Vec<i64>,
    au_event: Vec<&'a str>,
    au_kind: Vec<&'static str>,
    au_detail: Vec<String>,
    au_seq: Vec<i64>,
    au_hash: Vec<String>,
}

impl<'a> AppendColumns<'a> {
    fn of(evs: &[&'a NewEvent], now: i64, chain: &mut Chain) -> Self {
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
            au_at: Vec::with_capacity(3 * evs.len()),
            au_event: Vec::with_capacity(3 * evs.len()),
            au_kind: Vec::with_capacity(3 * evs.len()),
            au_detail: Vec::with_capacity(3 * evs.len()),
            au_seq: Vec::with_capacity(3 * evs.len()),
            au_hash: Vec::with_capacity(3 * evs.len()),
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
                let (seq, hash) = chain.push(Content {
                    seq: 0,
                    at,
                    event_id: &env.id,
                    kind,
                    dest: None,
                    attempt: None,
                    status: None,
                    latency_ms: None,
                    detail: Some(&detail),
                });
                c.au_at.push(at);
                c.au_event.push(&env.id);
                c.au_kind.push(kind);
                c.au_detail.push(detail);
                c.au_seq.push(seq);
                c.au_hash.push(hash);
            }
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 25] {
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
            &self.au_at,
            &self.au_event,
            &self.au_kind,
            &self.au_detail,
            &self.au_seq,
            &self.au_hash,
        ]
    }
}

/// [`RECORD_ALL_SQL`]'s parameters, one array per column; each record's two audit rows (the
/// attempt, then its verdict) with their place in the chain and the verdict row's detail.
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
    seq1: Vec<i64>,
    hash1: Vec<String>,
    seq2: Vec<i64>,
    hash2: Vec<String>,
    detail2: Vec<Option<String>>,
    /// Whether the lane's next head may be leased for hand-off (its dispatcher takes them).
    offer: Vec<bool>,
    lease_until: i64,
}

impl<'a> RecordColumns<'a> {
    fn of(recs: &[&'a AttemptRecord], chain: &mut Chain, hand: HandOver<'_>, now: i64) -> Self {
        let mut c = RecordColumns {
            lease_until: now + hand.lease_ms,
            ..RecordColumns::default()
        };
        for rec in recs {
            let t = &rec.task;
            c.offer.push(hand.handoff.is_some_and(|h| h.takes(&t.dest)));
            let (verdict, detail, next) = match &rec.verdict {
                Verdict::Delivered => (0, String::new(), rec.at_ms),
                Verdict::Retry { next_attempt_ms } => (
                    1,
                    format!("next attempt in {} ms", next_attempt_ms - rec.at_ms),
                    *next_attempt_ms,
                ),
                Verdict::DeadLetter { reason } => (2, reason.clone(), rec.at_ms),
            };
            let (kind, detail2) = match verdict {
                0 => ("delivered", Some(detail.clone()).filter(|d| !d.is_empty())),
                1 => ("retry_scheduled", Some(detail.clone())),
                _ => ("dead_lettered", Some(detail.clone())),
            };
            let step = |kind, latency_ms, detail| Content {
                seq: 0,
                at: rec.at_ms,
                event_id: &t.event_id,
                kind,
                dest: Some(&t.dest),
                attempt: Some(i64::from(rec.attempt)),
                status: rec.status.map(i64::from),
                latency_ms,
                detail,
            };
            let (seq1, hash1) =
                chain.push(step("attempt", Some(rec.latency_ms), rec.error.as_deref()));
            let (seq2, hash2) = chain.push(step(kind, None, detail2.as_deref()));
            c.seq1.push(seq1);
            c.hash1.push(hash1);
            c.seq2.push(seq2);
            c.hash2.push(hash2);
            c.detail2.push(detail2);
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

    fn params(&self) -> [&(dyn ToSql + Sync); 21] {
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
            &self.seq1,
            &self.hash1,
            &self.seq2,
            &self.hash2,
            &self.detail2,
            &self.offer,
            &self.lease_until,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_appends_drop_the_events_conflict_clause_and_nothing_else() {
        assert_eq!(APPEND_ALL_SQL.matches(WITH_CONFLICT).count(), 1);
        let fresh = fresh_appends();
        assert!(!fresh.contains("ON CONFLICT DO NOTHING"), "{fresh}");
        assert!(fresh.contains("ON CONFLICT (dest, class, lane_key) DO UPDATE"));
        assert_eq!(
            fresh.len(),
            APPEND_ALL_SQL.len() - "ON CONFLICT DO NOTHING ".len()
        );
    }
}
