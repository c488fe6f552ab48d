//! The single writer: drains queued commands into one transaction, commits (one fsync), and only
//! then answers each caller. One failing command never leaves partial rows nor spoils the others
//! in its batch: a batch with a failure runs again with a savepoint per command ([`run_batch`]).

mod alarm;
mod registry;
mod subs;

pub use registry::assignment_row;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

use crate::journal::audit_chain::{Content, GENESIS, row_hash};
use crate::journal::command::{AuditRow, Command, Done, Inbox, Out, fail, finish};
use crate::journal::handoff::{Handed, Handoff};
use crate::journal::{
    Appended, AttemptRecord, Claimed, DeliveryTask, JournalError, LaneClass, NewEvent,
    ReplayFilter, Replayed, Verdict,
};

// The writer's lookups on the hot path, named so that a test can check their query plans.
const FIND_BY_VENDOR_ID: &str = "SELECT id FROM events WHERE vendor = ?1 AND vendor_event_id = ?2";
const FIND_BY_IDEM_KEY: &str = "SELECT id FROM events WHERE vendor = ?1 AND idem_key = ?2";
const READY_LANES: &str = "SELECT lane_key, head_id FROM lanes
                 WHERE dest = ?1 AND class = ?2 AND leased = 0 AND next_attempt_at <= ?3
                 ORDER BY next_attempt_at LIMIT ?4";
const HEAD_TASK: &str = "SELECT d.event_id, d.attempts, d.created_at, e.fhir, e.traceparent
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = ?1";
const NEXT_DUE: &str = "SELECT min(next_attempt_at) FROM lanes
             WHERE dest = ?1 AND class = ?2 AND leased = 0 AND next_attempt_at > ?3";
const LANE_HOLDER: &str =
    "SELECT leased FROM lanes WHERE dest = ?1 AND class = ?2 AND lane_key = ?3";
const NEXT_PENDING: &str =
    "SELECT id FROM deliveries WHERE dest = ?1 AND class = ?2 AND lane_key = ?3
             AND state = 'pending' ORDER BY id LIMIT 1";

pub fn spawn(
    conn: Connection,
    inbox: Inbox,
    max_batch: usize,
    handoff: Arc<Handoff>,
) -> Result<(), JournalError> {
    // The writer is a plain thread (SQLite calls block); this runtime only waits on the inbox.
    let waiter = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| JournalError::Unavailable(format!("writer runtime: {e}")))?;
    std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || run(conn, inbox, &waiter, max_batch, &handoff))
        .map(|_| ())
        .map_err(|e| JournalError::Unavailable(format!("spawn writer: {e}")))
}

fn run(
    mut conn: Connection,
    mut inbox: Inbox,
    waiter: &tokio::runtime::Runtime,
    max_batch: usize,
    handoff: &Handoff,
) {
    let tokens = &LEASE_TOKENS;
    tokens.fetch_max(lease_epoch(), Ordering::Relaxed);
    let w = Writes { tokens, handoff };
    while let Some(batch) = waiter.block_on(inbox.next_batch(max_batch)) {
        let (done, handed, commit) = run_batch(&mut conn, batch, w);
        match &commit {
            // Hand-offs first: their deliveries start while the callers are being answered.
            Ok(()) => handoff.send(handed),
            Err(e) => {
                tracing::error!(error = %e, "journal commit failed");
                // The batch's audit rows are gone: read the head from the table again.
                CHAIN_HEAD.with(|h| h.borrow_mut().take());
                // Their leases were rolled back with the batch; dropping them frees the slots.
                drop(handed);
            }
        }
        for d in done {
            d.send(&commit);
        }
    }
}

/// What one pass over a batch left.
enum Pass {
    /// The transaction could not start (or a failed plain pass could not be rolled back).
    Unavailable(String),
    /// A command failed in a plain pass; the transaction was rolled back.
    Failed,
    /// Every command has its result; `commit` says whether the transaction committed.
    Ran {
        outs: Vec<Out>,
        handed: Vec<Handed>,
        commit: Result<(), String>,
    },
}

/// Runs a batch in one transaction: first plainly, which nearly always succeeds, and only when
/// a command fails again with a savepoint per command. A savepoint copies every page a command
/// touches into the statement journal before changing it (the same hot index and table pages,
/// command after command): about a quarter of the writer's time under load, spent to undo
/// failures that are rare (a stale lease, a conflicting registry write). So a failure in the
/// plain pass rolls everything back and the careful pass runs the batch again, where the
/// failing command undoes only its own writes and the others commit.
fn run_batch(
    conn: &mut Connection,
    batch: Vec<Command>,
    w: Writes<'_>,
) -> (Vec<Done>, Vec<Handed>, Result<(), String>) {
    let head = CHAIN_HEAD.with(|h| h.borrow().clone());
    let mut pass = one_pass(conn, &batch, w, false);
    if matches!(pass, Pass::Failed) {
        // The rolled-back rows took their chain positions with them.
        CHAIN_HEAD.with(|h| *h.borrow_mut() = head);
        pass = one_pass(conn, &batch, w, true);
    }
    match pass {
        Pass::Ran {
            outs,
            handed,
            commit,
        } => {
            let done = batch.into_iter().zip(outs).map(|(c, o)| finish(c, o));
            (done.collect(), handed, commit)
        }
        Pass::Unavailable(msg) => {
            let done = batch.into_iter().map(|c| fail(c, &msg)).collect();
            (done, Vec::new(), Err(msg))
        }
        // The careful pass never stops early; should it ever, nothing was committed.
        Pass::Failed => {
            let msg = "internal error: careful pass stopped early".to_string();
            let done = batch.into_iter().map(|c| fail(c, &msg)).collect();
            (done, Vec::new(), Err(msg))
        }
    }
}

/// One pass over the batch in its own transaction, with a savepoint per command when
/// `savepoints`; without, it stops at the first failing command and rolls back.
fn one_pass(conn: &mut Connection, batch: &[Command], w: Writes<'_>, savepoints: bool) -> Pass {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return Pass::Unavailable(e.to_string()),
    };
    let mut outs = Vec::with_capacity(batch.len());
    let mut handed = Vec::new();
    for cmd in batch {
        let out = if savepoints {
            in_savepoint(&tx, cmd, w, &mut handed)
        } else {
            execute(&tx, cmd, w, &mut handed)
        };
        if !savepoints && out.error().is_some() {
            // Dropping `handed` returns the slots its leases had reserved.
            return match tx.rollback() {
                Ok(()) => Pass::Failed,
                Err(e) => Pass::Unavailable(e.to_string()),
            };
        }
        outs.push(out);
    }
    let commit = tx.commit().map_err(|e| e.to_string());
    Pass::Ran {
        outs,
        handed,
        commit,
    }
}

/// Lease tokens of every writer in this process come from one counter, so they never repeat
/// within the process; each writer first moves it past the wall clock (ms x 1000), so tokens
/// also differ from those of earlier processes (whose leases are cleared on open anyway).
static LEASE_TOKENS: AtomicI64 = AtomicI64::new(0);

fn lease_epoch() -> i64 {
    crate::clock::now_ms().saturating_mul(1000)
}

/// What a batch's commands share besides the transaction: the lease token source and the
/// dispatchers registered for direct hand-off. The heads a command hands over are collected per
/// batch and sent only once the batch has committed.
#[derive(Clone, Copy)]
struct Writes<'a> {
    tokens: &'a AtomicI64,
    handoff: &'a Handoff,
}

impl Writes<'_> {
    /// Leases the new head `head_id` of a lane and queues it for hand-off, if its dispatcher has
    /// a free slot; otherwise leaves the lane to be claimed.
    fn hand_over(
        self,
        c: &Connection,
        lane: Lane<'_>,
        head_id: i64,
        task: impl FnOnce() -> Result<HeadTask, JournalError>,
        handed: &mut Vec<Handed>,
    ) -> Result<(), JournalError> {
        let Some(permit) = self.handoff.reserve(lane.dest, lane.class) else {
            return Ok(());
        };
        let task = lease(c, self.tokens, lane, head_id, task()?)?;
        handed.push(Handed {
            task,
            permit: Some(permit),
        });
        Ok(())
    }
}

/// Leases `lane` with a fresh token and returns its head `head_id` as a delivery task: the one
/// way a head is handed out, by a claim or by a hand-off.
fn lease(
    c: &Connection,
    tokens: &AtomicI64,
    lane: Lane<'_>,
    head_id: i64,
    h: HeadTask,
) -> Result<DeliveryTask, JournalError> {
    let lease = tokens.fetch_add(1, Ordering::Relaxed);
    c.prepare_cached(
        "UPDATE lanes SET leased = ?4 WHERE dest = ?1 AND class = ?2 AND lane_key = ?3",
    )?
    .execute(params![lane.dest, lane.class.as_i64(), lane.key, lease])?;
    Ok(DeliveryTask {
        delivery_id: head_id,
        event_id: h.event_id,
        dest: lane.dest.to_string(),
        class: lane.class,
        lane_key: lane.key.to_string(),
        attempts: h.attempts,
        created_at_ms: h.created_at_ms,
        fhir: h.fhir,
        lease,
        traceparent: h.traceparent,
    })
}

/// A lane, named by destination, class and key.
#[derive(Clone, Copy)]
struct Lane<'a> {
    dest: &'a str,
    class: LaneClass,
    key: &'a str,
}

/// What a delivery task needs from the journal besides its lane.
struct HeadTask {
    event_id: String,
    attempts: u32,
    created_at_ms: i64,
    fhir: Arc<str>,
    traceparent: Option<String>,
}

/// The head delivery `head_id` as a task's facts.
fn head_task(c: &Connection, head_id: i64) -> Result<HeadTask, JournalError> {
    Ok(c.prepare_cached(HEAD_TASK)?
        .query_row(params![head_id], |r| {
            Ok(HeadTask {
                event_id: r.get(0)?,
                attempts: r.get(1)?,
                created_at_ms: r.get(2)?,
                fhir: r.get::<_, String>(3)?.into(),
                traceparent: r.get(4)?,
            })
        })?)
}

fn execute(c: &Connection, cmd: &Command, w: Writes<'_>, handed: &mut Vec<Handed>) -> Out {
    match cmd {
        Command::Append(ev, _) => Out::Append(append(c, ev, w, handed)),
        Command::Claim {
            dest,
            class,
            limit,
            now_ms,
            ..
        } => Out::Claim(claim(c, dest, *class, *limit, *now_ms, w.tokens)),
        Command::Record(rec, _) => Out::Unit(record(c, rec, w, handed)),
        Command::Replay(f, _) => Out::Replay(replay(c, f)),
        Command::Ping(_) => Out::Unit(Ok(())),
        Command::Registry(op, _) => Out::Registry(registry::apply(c, op)),
        Command::Subs(op, _) => Out::Subs(subs::apply(c, op)),
    }
}

/// Runs one command inside a savepoint so that its failure undoes only its own writes, and
/// keeps its hand-offs only if it succeeds (a rolled-back command's leases are undone with it).
/// The savepoint statements are prepared once and cached: parsing them for every command cost
/// about a quarter of the writer's time under load.
fn in_savepoint(c: &Connection, cmd: &Command, w: Writes<'_>, handed: &mut Vec<Handed>) -> Out {
    let run = |sql: &str| c.prepare_cached(sql).and_then(|mut s| s.execute([]));
    if let Err(e) = run("SAVEPOINT command") {
        return Out::failed(cmd, e.into());
    }
    let head_before = CHAIN_HEAD.with(|h| h.borrow().clone());
    let mut mine = Vec::new();
    let out = execute(c, cmd, w, &mut mine);
    if out.error().is_none() {
        return match run("RELEASE command") {
            Ok(_) => {
                handed.append(&mut mine);
                out
            }
            Err(e) => Out::failed(cmd, e.into()),
        };
    }
    // The command's audit rows are undone with it, and so is its move of the head.
    CHAIN_HEAD.with(|h| *h.borrow_mut() = head_before);
    match run("ROLLBACK TO command").and_then(|_| run("RELEASE command")) {
        Ok(_) => out,
        Err(e) => Out::failed(cmd, e.into()),
    }
}

thread_local! {
    /// The audit chain's head (position, hash) as of the last row this thread wrote, or `None`
    /// when unknown. Only the writer thread writes audit rows; it restores the head when a
    /// command's savepoint rolls back and forgets it when a commit fails, so the cached head is
    /// always the table's. Saves one query per audit row (five per event).
    static CHAIN_HEAD: std::cell::RefCell<Option<(i64, String)>> = const { std::cell::RefCell::new(None) };
}

/// Appends one audit row, chained to the last one (head from `CHAIN_HEAD`, else the table).
fn audit(c: &Connection, a: AuditRow<'_>) -> Result<(), JournalError> {
    let cached = CHAIN_HEAD.with(|h| h.borrow().clone());
    let prev: Option<(i64, String)> = match cached {
        Some(head) => Some(head),
        None => c
            .prepare_cached(
                "SELECT chain_seq, hash FROM audit WHERE chain_seq > 0 ORDER BY chain_seq DESC LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
    };
    let (prev_seq, prev_hash) = prev.unwrap_or((0, GENESIS.to_string()));
    let seq = prev_seq + 1;
    let hash = row_hash(
        &prev_hash,
        &Content {
            seq,
            at: a.at,
            event_id: a.event_id,
            kind: a.kind,
            dest: a.dest,
            attempt: a.attempt.map(i64::from),
            status: a.status.map(i64::from),
            latency_ms: a.latency_ms,
            detail: a.detail,
        },
    );
    c.prepare_cached(
        "INSERT INTO audit (at, event_id, kind, dest, attempt, status, latency_ms, detail,
                            chain_seq, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        a.at,
        a.event_id,
        a.kind,
        a.dest,
        a.attempt,
        a.status,
        a.latency_ms,
        a.detail,
        seq,
        hash
    ])?;
    CHAIN_HEAD.with(|h| *h.borrow_mut() = Some((seq, hash)));
    Ok(())
}

/// What [`store`] did: stored the event as row `seq` at `now`, or found it already stored.
enum Stored {
    New { seq: i64, now: i64 },
    Duplicate(String),
}

fn append(
    c: &Connection,
    ev: &NewEvent,
    w: Writes<'_>,
    handed: &mut Vec<Handed>,
) -> Result<Appended, JournalError> {
    let (seq, now) = match store(c, ev)? {
        Stored::New { seq, now } => (seq, now),
        Stored::Duplicate(id) => return Ok(Appended::Duplicate { id }),
    };
    let new_lanes = route(c, seq, ev, now)?;
    subs::on_append(c, &ev.envelope, now)?;
    // A delivery that opened its lane is ready now: hand it straight to its dispatcher instead
    // of waiting for a claim (a second commit) before it goes out.
    let env = &ev.envelope;
    for (dest, head_id) in new_lanes {
        let lane = Lane {
            dest,
            class: env.category.lane_class(),
            key: &env.key,
        };
        let task = || {
            Ok(HeadTask {
                event_id: env.id.clone(),
                attempts: 0,
                created_at_ms: now,
                fhir: Arc::from(env.fhir.as_str()),
                traceparent: ev.traceparent.clone(),
            })
        };
        w.hand_over(c, lane, head_id, task, handed)?;
    }
    Ok(Appended::Stored {
        id: ev.envelope.id.clone(),
    })
}

/// Inserts the event row (unless it repeats a stored one) with its `received` and `stored` audit.
fn store(c: &Connection, ev: &NewEvent) -> Result<Stored, JournalError> {
    let env = &ev.envelope;
    if let Some(vid) = &env.vendor_event_id {
        let found: Option<String> = c
            .prepare_cached(FIND_BY_VENDOR_ID)?
            .query_row(params![env.vendor, vid], |r| r.get(0))
            .optional()?;
        if let Some(id) = found {
            return Ok(Stored::Duplicate(id));
        }
    }
    if let Some(key) = &ev.idempotency_key {
        let found: Option<String> = c
            .prepare_cached(FIND_BY_IDEM_KEY)?
            .query_row(params![env.vendor, key], |r| r.get(0))
            .optional()?;
        if let Some(id) = found {
            return Ok(Stored::Duplicate(id));
        }
    }
    let now = crate::clock::now_ms();
    let class = env.category.lane_class();
    c.prepare_cached(
        "INSERT INTO events (id, vendor, vendor_event_id, idem_key, category, priority, tenant, key,
            lane_class, mapping_version, content_type, raw, fhir, routed_to, received_at, stored_at,
            traceparent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        env.id,
        env.vendor,
        env.vendor_event_id,
        ev.idempotency_key,
        env.category.as_str(),
        env.priority.as_str(),
        env.tenant,
        env.key,
        class.as_i64(),
        env.mapping_version,
        ev.content_type,
        ev.raw,
        env.fhir,
        ev.destinations.len() as i64,
        ev.received_at_ms,
        now,
        ev.traceparent,
    ])?;
    let seq = c.last_insert_rowid();
    audit(
        c,
        AuditRow {
            at: ev.received_at_ms,
            event_id: &env.id,
            kind: "received",
            detail: Some(&env.vendor),
            ..Default::default()
        },
    )?;
    let stored = format!("mapping {}", env.mapping_version);
    audit(
        c,
        AuditRow {
            at: now,
            event_id: &env.id,
            kind: "stored",
            detail: Some(&stored),
            ..Default::default()
        },
    )?;
    Ok(Stored::New { seq, now })
}

/// Queues the event's deliveries (or records that no route matched); returns the deliveries
/// that opened their lane, by destination.
fn route<'e>(
    c: &Connection,
    seq: i64,
    ev: &'e NewEvent,
    now: i64,
) -> Result<Vec<(&'e str, i64)>, JournalError> {
    route_to(c, seq, &ev.envelope, &ev.destinations, &ev.routes, now)
}

fn route_to<'d>(
    c: &Connection,
    seq: i64,
    env: &crate::normalise::Envelope,
    destinations: &'d [String],
    routes: &[String],
    now: i64,
) -> Result<Vec<(&'d str, i64)>, JournalError> {
    let class = env.category.lane_class();
    let mut new_lanes = Vec::new();
    for dest in destinations {
        let (id, opened) = enqueue(c, seq, &env.id, dest, class, &env.key, now)?;
        if opened {
            new_lanes.push((dest.as_str(), id));
        }
    }
    if destinations.is_empty() {
        audit(
            c,
            AuditRow {
                at: now,
                event_id: &env.id,
                kind: "unrouted",
                detail: Some("no route matched"),
                ..Default::default()
            },
        )?;
    } else {
        let detail = format!(
            "routes [{}] -> [{}]",
            routes.join(","),
            destinations.join(",")
        );
        audit(
            c,
            AuditRow {
                at: now,
                event_id: &env.id,
                kind: "routed",
                detail: Some(&detail),
                ..Default::default()
            },
        )?;
    }
    Ok(new_lanes)
}

/// Appends a pending delivery at the tail of its lane, creating the lane if it is empty.
/// Returns the delivery's id and whether it opened the lane (is its head).
fn enqueue(
    c: &Connection,
    seq: i64,
    event_id: &str,
    dest: &str,
    class: LaneClass,
    key: &str,
    now: i64,
) -> Result<(i64, bool), JournalError> {
    c.prepare_cached(
        "INSERT INTO deliveries (event_seq, event_id, dest, class, lane_key, state, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
    )?
    .execute(params![seq, event_id, dest, class.as_i64(), key, now])?;
    let id = c.last_insert_rowid();
    let opened = c
        .prepare_cached(
            "INSERT INTO lanes (dest, class, lane_key, head_id, next_attempt_at, leased)
             VALUES (?1, ?2, ?3, ?4, ?5, 0) ON CONFLICT (dest, class, lane_key) DO NOTHING",
        )?
        .execute(params![dest, class.as_i64(), key, id, now])?;
    Ok((id, opened == 1))
}

fn claim(
    c: &Connection,
    dest: &str,
    class: LaneClass,
    limit: usize,
    now_ms: i64,
    tokens: &AtomicI64,
) -> Result<Claimed, JournalError> {
    let mut tasks = Vec::new();
    if limit > 0 {
        let ready: Vec<(String, i64)> = c
            .prepare_cached(READY_LANES)?
            .query_map(params![dest, class.as_i64(), now_ms, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (lane_key, head_id) in ready {
            let lane = Lane {
                dest,
                class,
                key: &lane_key,
            };
            tasks.push(lease(c, tokens, lane, head_id, head_task(c, head_id)?)?);
        }
    }
    let next_due_ms: Option<i64> = c
        .prepare_cached(NEXT_DUE)?
        .query_row(params![dest, class.as_i64(), now_ms], |r| r.get(0))?;
    Ok(Claimed { tasks, next_due_ms })
}

fn record(
    c: &Connection,
    rec: &AttemptRecord,
    w: Writes<'_>,
    handed: &mut Vec<Handed>,
) -> Result<(), JournalError> {
    let t = &rec.task;
    let holder: Option<i64> = c
        .prepare_cached(LANE_HOLDER)?
        .query_row(params![t.dest, t.class.as_i64(), t.lane_key], |r| r.get(0))
        .optional()?;
    if holder != Some(t.lease) {
        return Err(JournalError::Conflict(format!(
            "stale lease for delivery {} (lane no longer held by this worker)",
            t.delivery_id
        )));
    }
    let at = rec.at_ms;
    audit(
        c,
        AuditRow {
            at,
            event_id: &t.event_id,
            kind: "attempt",
            dest: Some(&t.dest),
            attempt: Some(rec.attempt),
            status: rec.status,
            latency_ms: Some(rec.latency_ms),
            detail: rec.error.as_deref(),
        },
    )?;
    match &rec.verdict {
        Verdict::Delivered => {
            c.prepare_cached(
                "UPDATE deliveries SET state = 'delivered', attempts = ?2, last_status = ?3,
                    last_error = NULL, delivered_at = ?4 WHERE id = ?1",
            )?
            .execute(params![t.delivery_id, rec.attempt, rec.status, at])?;
            audit(
                c,
                AuditRow {
                    at,
                    event_id: &t.event_id,
                    kind: "delivered",
                    dest: Some(&t.dest),
                    attempt: Some(rec.attempt),
                    status: rec.status,
                    ..Default::default()
                },
            )?;
            advance(c, t, at, w, handed)
        }
        Verdict::Retry { next_attempt_ms } => {
            c.prepare_cached(
                "UPDATE deliveries SET attempts = ?2, last_status = ?3, last_error = ?4 WHERE id = ?1",
            )?
            .execute(params![t.delivery_id, rec.attempt, rec.status, rec.error])?;
            c.prepare_cached(
                "UPDATE lanes SET leased = 0, next_attempt_at = ?4
                 WHERE dest = ?1 AND class = ?2 AND lane_key = ?3",
            )?
            .execute(params![
                t.dest,
                t.class.as_i64(),
                t.lane_key,
                next_attempt_ms
            ])?;
            let detail = format!("next attempt in {} ms", next_attempt_ms - at);
            audit(
                c,
                AuditRow {
                    at,
                    event_id: &t.event_id,
                    kind: "retry_scheduled",
                    dest: Some(&t.dest),
                    attempt: Some(rec.attempt),
                    status: rec.status,
                    detail: Some(&detail),
                    ..Default::default()
                },
            )
        }
        Verdict::DeadLetter { reason } => {
            c.prepare_cached(
                "UPDATE deliveries SET state = 'dead', attempts = ?2, last_status = ?3, last_error = ?4,
                    dead_at = ?5 WHERE id = ?1",
            )?
            .execute(params![t.delivery_id, rec.attempt, rec.status, reason, at])?;
            audit(
                c,
                AuditRow {
                    at,
                    event_id: &t.event_id,
                    kind: "dead_lettered",
                    dest: Some(&t.dest),
                    attempt: Some(rec.attempt),
                    status: rec.status,
                    detail: Some(reason),
                    ..Default::default()
                },
            )?;
            advance(c, t, at, w, handed)
        }
    }
}

/// The head is finished: the next pending delivery becomes head, or the lane disappears.
/// The next head is handed straight to the dispatcher when it has a free slot, which saves the
/// lane a claim (one more commit) per event while it has a backlog.
fn advance(
    c: &Connection,
    t: &DeliveryTask,
    at: i64,
    w: Writes<'_>,
    handed: &mut Vec<Handed>,
) -> Result<(), JournalError> {
    let next: Option<i64> = c
        .prepare_cached(NEXT_PENDING)?
        .query_row(params![t.dest, t.class.as_i64(), t.lane_key], |r| r.get(0))
        .optional()?;
    match next {
        Some(head) => {
            c.prepare_cached(
                "UPDATE lanes SET head_id = ?4, leased = 0, next_attempt_at = ?5
                 WHERE dest = ?1 AND class = ?2 AND lane_key = ?3",
            )?
            .execute(params![t.dest, t.class.as_i64(), t.lane_key, head, at])?;
            let lane = Lane {
                dest: &t.dest,
                class: t.class,
                key: &t.lane_key,
            };
            w.hand_over(c, lane, head, || head_task(c, head), handed)?;
        }
        None => {
            c.prepare_cached("DELETE FROM lanes WHERE dest = ?1 AND class = ?2 AND lane_key = ?3")?
                .execute(params![t.dest, t.class.as_i64(), t.lane_key])?;
        }
    }
    Ok(())
}

fn replay(c: &Connection, f: &ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
    let rows: Vec<(i64, i64, String, String, i64, String)> = c
        .prepare_cached(
            "SELECT d.id, d.event_seq, d.event_id, d.dest, d.class, d.lane_key
             FROM deliveries d JOIN events e ON e.seq = d.event_seq
             WHERE d.state = 'dead'
               AND (?1 IS NULL OR d.id = ?1)
               AND (?2 IS NULL OR d.dest = ?2)
               AND (?3 IS NULL OR e.vendor = ?3)
               AND (?5 IS NULL OR e.tenant IN (SELECT value FROM json_each(?5)))
             ORDER BY d.id LIMIT ?4",
        )?
        .query_map(
            params![
                f.delivery_id,
                f.destination,
                f.vendor,
                f.limit.max(1) as i64,
                super::read::tenants_json(f.tenants.as_deref())
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
    if rows.is_empty()
        && let Some(id) = f.delivery_id
    {
        return Err(JournalError::NotFound(format!(
            "no dead letter with delivery id {id}"
        )));
    }
    let now = crate::clock::now_ms();
    let mut out = Vec::with_capacity(rows.len());
    for (dead_id, seq, event_id, dest, class, key) in rows {
        c.prepare_cached("UPDATE deliveries SET state = 'replayed' WHERE id = ?1")?
            .execute(params![dead_id])?;
        let (new_id, _) = enqueue(
            c,
            seq,
            &event_id,
            &dest,
            LaneClass::from_i64(class),
            &key,
            now,
        )?;
        let detail =
            format!("dead delivery {dead_id} re-queued as delivery {new_id} at the lane tail");
        audit(
            c,
            AuditRow {
                at: now,
                event_id: &event_id,
                kind: "replayed",
                dest: Some(&dest),
                detail: Some(&detail),
                ..Default::default()
            },
        )?;
        out.push(Replayed {
            event_id,
            destination: dest,
            dead_delivery_id: dead_id,
            new_delivery_id: new_id,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan lines of `sql` on a fresh journal connection (parameters left unbound: with the
    /// planner's stability guarantee on, the plan cannot depend on their values).
    fn plan(c: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = c
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        let mut rows = stmt.raw_query();
        let mut lines = Vec::new();
        while let Some(r) = rows.next().expect("plan row") {
            lines.push(r.get::<_, String>(3).expect("detail"));
        }
        lines
    }

    /// Every hot lookup of the writer searches an index; none scans a table. This guards the
    /// plans now that SQLite may no longer re-plan with the bound values.
    #[test]
    fn hot_statements_use_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = super::super::open_conn(&dir.path().join("journal.sqlite3")).expect("open");
        super::super::migrate(&c).expect("migrate");
        assert!(
            c.db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
                .expect("db config"),
            "journal connections run with the query planner stability guarantee"
        );
        // The check itself can fail: an unindexed column is scanned.
        assert!(
            plan(&c, "SELECT id FROM deliveries WHERE last_error = ?1")
                .iter()
                .any(|l| l.starts_with("SCAN")),
        );
        for sql in [
            FIND_BY_VENDOR_ID,
            FIND_BY_IDEM_KEY,
            READY_LANES,
            HEAD_TASK,
            NEXT_DUE,
            LANE_HOLDER,
            NEXT_PENDING,
        ] {
            let lines = plan(&c, sql);
            assert!(
                !lines.is_empty() && lines.iter().all(|l| l.starts_with("SEARCH")),
                "{sql}\n=> {lines:?}"
            );
        }
    }
}
