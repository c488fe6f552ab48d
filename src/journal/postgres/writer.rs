//! The node's single writer: one connection, one transaction per batch, commands pipelined.
//!
//! Commands of one batch run concurrently on the same transaction, so each command's statements
//! must be correct under any interleaving with the others' (and with other nodes' transactions):
//! - an emptied lane keeps its row with `head_id = 0`; an append fills an empty head in the same
//!   upsert that locks the row, and advancing a lane sets the head to the smallest pending id in a
//!   single statement; whichever order these run in, no pending delivery is left without a head;
//! - outcomes are applied only while their lease still holds the lane row, which `lock_lanes`
//!   locked first, so a concurrent append on another node has either committed before the next
//!   head is computed or will find the lane's new state; the lease is read after the batch's own
//!   claims, which run first and may take over a lane whose lease ran out;
//! - every batch first locks all lane rows its appends and records touch, in one sorted pass
//!   (`lock_lanes`), so writers of different nodes take lane locks in the same order and do not
//!   deadlock. Without it, three nodes deadlocked constantly and each deadlock cost PostgreSQL's
//!   1 s detection timeout (155 events/s instead of 1 767 in the bench). After the lanes comes
//!   the audit chain's head, then subscription rows (see `apply_batch`).
//!
//! Any store error rolls the whole batch back and every caller gets `Unavailable`.

mod alarm;
mod bulk;
mod offers;
mod registry;
mod subs;

pub use registry::{COLUMNS as ASSIGNMENT_COLUMNS, assignment as assignment_row};

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{Mutex, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::db_error_text;
use crate::journal::command::{AuditRow, Command, Done, Inbox, Out, fail, finish};
use crate::journal::handoff::{Handed, Handoff};
use crate::journal::{
    AttemptRecord, Claimed, DeliveryTask, JournalError, LaneClass, NewEvent, ReplayFilter, Replayed,
};

/// How often emptied lane rows are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How often a writer seals audit rows left without a chain position by an older binary, when
/// none of its batches did (see [`writes_unchained_audit`]).
const SEAL_LEFTOVERS_EVERY: Duration = Duration::from_secs(10);

pub async fn connect(config: &Config, tls: MakeRustlsConnect) -> Result<Client, JournalError> {
    Ok(connect_raw(config, tls).await?)
}

/// Connects and drives the connection in the background; keeps the driver's error type so the
/// caller can tell a server that is down from one that refuses us.
pub async fn connect_raw(
    config: &Config,
    tls: MakeRustlsConnect,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

struct Conn {
    client: Client,
    s: Stmts,
    /// The audit chain head as this writer's last commit left it, while no seal or failure has
    /// made it uncertain: the next batch may be sent in one round trip on it (see `pipeline`).
    head: Option<bulk::Head>,
    /// Until when batches are sent the careful way after an assumption failed.
    assume_from: Instant,
}

/// Runs one writer. Several writers of a node share the queue: each takes the next batch while
/// the others' batches run, so PostgreSQL executes them on several server processes (one
/// connection's statements run one after another on one core). They are as safe together as
/// writers of different nodes, which is what the locking above is designed for.
pub async fn run(
    config: Config,
    tls: MakeRustlsConnect,
    inbox: Arc<Mutex<Inbox>>,
    max_batch: usize,
    lease: Duration,
    handoff: Arc<Handoff>,
) {
    let hand = bulk::HandOver {
        handoff: Some(&handoff),
        lease_ms: lease.as_millis() as i64,
    };
    let mut conn: Option<Conn> = None;
    let mut chores = Chores::new();
    let mut carried: Option<Vec<Command>> = None;
    loop {
        let batch = match carried.take() {
            Some(b) => b,
            None => match inbox.lock().await.next_batch(max_batch).await {
                Some(b) => b,
                None => break,
            },
        };
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match open(&config, tls.clone()).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let msg = e.to_string();
                    for cmd in batch {
                        fail(cmd, &msg).send(&Err(msg.clone()));
                    }
                    continue;
                }
            };
        }
        let Some(c) = conn.as_mut() else { continue };
        match c.assumable(&batch) {
            Some(head) => {
                let feed = Feed {
                    inbox: &inbox,
                    max_batch,
                    chores: &chores,
                };
                carried = pipeline(c, batch, head, feed, hand, &handoff).await;
            }
            None => {
                let (done, commit, handed) = run_batch(c, batch, hand).await;
                answer(done, commit, handed, &handoff);
            }
        }
        if c.client.is_closed() {
            conn = None;
        }
        if let Some(c) = conn.as_mut() {
            chores.run(c).await;
        }
    }
}

/// Answers a batch: hand-offs first (their deliveries start while the callers are answered).
fn answer(done: Vec<Done>, commit: Result<(), String>, handed: Vec<Handed>, handoff: &Handoff) {
    handoff.send(handed);
    if let Err(e) = &commit {
        tracing::error!(error = %e, "journal batch failed");
    }
    for d in done {
        d.send(&commit);
    }
}

/// A writer's periodic work beside its batches: the lane sweep, sealing leftovers, re-planning.
struct Chores {
    last_sweep: Instant,
    last_seal: Instant,
    last_replan: Instant,
}

impl Chores {
    fn new() -> Self {
        let now = Instant::now();
        Chores {
            last_sweep: now,
            last_seal: now,
            last_replan: now,
        }
    }

    /// Whether some chore is due (a pipeline then stops sending and drains, see [`pipeline`]).
    fn due(&self) -> bool {
        self.last_sweep.elapsed() > SWEEP_EVERY
            || self.last_seal.elapsed() > SEAL_LEFTOVERS_EVERY
            || self.last_replan.elapsed() > REPLAN_EVERY
    }

    /// Runs the chores that are due; outside any transaction of the writer's.
    async fn run(&mut self, c: &mut Conn) {
        let (client, s) = (&c.client, &c.s);
        if self.last_sweep.elapsed() > SWEEP_EVERY {
            self.last_sweep = Instant::now();
            if let Err(e) = client.execute(&s.sweep, &[]).await {
                tracing::warn!(error = %db_error_text(&e), "lane sweep failed");
            }
        }
        if self.last_seal.elapsed() > SEAL_LEFTOVERS_EVERY {
            self.last_seal = Instant::now();
            if let Err(e) = seal_leftovers(client).await {
                tracing::warn!(error = %db_error_text(&e), "sealing leftover audit rows failed");
            }
            // A seal that found rows moved the chain head: the next batch reads it again
            // (the careful way) instead of failing on the head this writer last knew.
            c.head = None;
        }
        if self.last_replan.elapsed() > REPLAN_EVERY {
            self.last_replan = Instant::now();
            if let Err(e) = client.batch_execute("DISCARD PLANS").await {
                tracing::warn!(error = %db_error_text(&e), "discarding cached plans failed");
            }
        }
    }
}

/// Where a pipeline takes its next batches from, and what makes it stop taking them.
struct Feed<'a> {
    inbox: &'a Mutex<Inbox>,
    max_batch: usize,
    chores: &'a Chores,
}

/// Batches sent in one round trip that a writer may have on the wire at once. With one, the
/// server process sat idle between a batch's answer and the next batch's statements (the
/// writer reading the answers, answering callers and building the next batch): 16 % of its
/// time in the bench, 4 % with two. With two, the next batch is already queued behind the
/// running one's `COMMIT`.
const PIPELINE_DEPTH: usize = 2;

/// A batch that would queue behind one still running leaves once this many commands wait, or
/// [`HOLD`] after it could first have left (up to a millisecond more: the runtime's timer ticks
/// in milliseconds), or at once when alarm work arrives. Each batch costs the server a
/// transaction's fixed work (statement start-up, commit), and a batch that only waits at the
/// server behind the running one gains nothing by leaving early: in the bench at 64
/// connections, batches grew from 14 to 27 events per commit, closed-loop runs from 7 671-7 810
/// to 8 196-8 496 events/s (24 commands and 1 ms: 22 events per commit and less; 3 ms: less).
const FILL: usize = 48;
const HOLD: Duration = Duration::from_millis(2);

impl Feed<'_> {
    /// Whether the next batch would be small: no alarm work and fewer than [`FILL`] commands
    /// waiting. A busy inbox (another writer of this node taking a batch) counts as not thin.
    fn thin(&self) -> bool {
        self.inbox.try_lock().is_ok_and(|i| {
            let (urgent, normal) = i.waiting();
            urgent == 0 && normal < FILL
        })
    }
}

/// One batch sent in one round trip, with what comes back.
struct Flown {
    batch: Vec<Command>,
    tried: Tried,
}

async fn fly(
    client: &Client,
    s: &Stmts,
    batch: Vec<Command>,
    hand: bulk::HandOver<'_>,
    head: bulk::Head,
    tell: oneshot::Sender<bulk::Head>,
) -> Flown {
    let lanes = lanes_touched(&batch);
    let tried = one_round_trip(client, s, &batch, &lanes, hand, &head, tell).await;
    Flown { batch, tried }
}

/// Sends batches in one round trip each, the next on the chain head the previous one's rows
/// will leave, before the previous one is answered (up to [`PIPELINE_DEPTH`] on the wire). The
/// server runs them in order: if one aborts, every later one fails its head check too (its
/// assumed head never came to be), so the pipeline stops sending, drains, and runs the failed
/// batches again the careful way, in order (`run_batch`). Batches are answered in the order
/// they were sent. Stops taking batches when a chore is due or a batch cannot be sent in one
/// round trip; returns such a batch, to run once everything sent is answered.
async fn pipeline(
    c: &mut Conn,
    first: Vec<Command>,
    head: bulk::Head,
    feed: Feed<'_>,
    hand: bulk::HandOver<'_>,
    handoff: &Handoff,
) -> Option<Vec<Command>> {
    let Conn {
        client,
        s,
        head: known,
        assume_from,
    } = c;
    let (client, s) = (&*client, &*s);
    let mut flying = FuturesOrdered::new();
    let (tell, mut told) = oneshot::channel();
    flying.push_back(fly(client, s, first, hand, head, tell));
    let mut waiting_tip = true;
    let mut tip: Option<bulk::Head> = None;
    let mut carried = None;
    let mut failed = Vec::new();
    let mut closed = false;
    let mut hold: Option<tokio::time::Instant> = None;
    loop {
        let room = failed.is_empty()
            && carried.is_none()
            && !closed
            && !waiting_tip
            && tip.is_some()
            && flying.len() < PIPELINE_DEPTH
            && !feed.chores.due();
        // Hold back a small batch while the one before it still runs (see FILL).
        if room && !flying.is_empty() && feed.thin() {
            hold.get_or_insert_with(|| tokio::time::Instant::now() + HOLD);
        } else {
            hold = None;
        }
        let held = hold.filter(|h| tokio::time::Instant::now() < *h);
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(held.unwrap_or_else(tokio::time::Instant::now)), if held.is_some() => {}
            Some(f) = flying.next() => {
                let Flown { batch, tried: (result, outs, handed, moved) } = f;
                match result {
                    Ok(()) => {
                        // Committed after an earlier batch failed only if it chained nothing on
                        // that one's rows (else its head check failed): it stands, but the
                        // head is no longer known.
                        if !failed.is_empty() {
                            *known = None;
                        } else if moved.is_some() {
                            *known = moved;
                        }
                        let done = batch.into_iter().zip(outs).map(|(c, o)| finish(c, o)).collect();
                        answer(done, Ok(()), handed, handoff);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a batch sent in one round trip did not hold; running it again");
                        *known = None;
                        *assume_from = Instant::now() + ASSUME_AFTER_MISS;
                        failed.push(batch);
                    }
                }
                if flying.is_empty() {
                    break;
                }
            }
            t = &mut told, if waiting_tip => {
                waiting_tip = false;
                tip = t.ok();
            }
            b = next_batch(feed.inbox, feed.max_batch, held.is_some()), if room => {
                let Some(b) = b else {
                    // Shutting down: answer what was sent, then the writer ends.
                    closed = true;
                    continue;
                };
                let Some(head) = tip.take().filter(|_| one_trip(&b) && Instant::now() >= *assume_from) else {
                    carried = Some(b);
                    continue;
                };
                let (tell, t) = oneshot::channel();
                told = t;
                waiting_tip = true;
                flying.push_back(fly(client, s, b, hand, head, tell));
            }
        }
    }
    drop(flying);
    for batch in failed {
        let (done, commit, handed) = run_batch(c, batch, hand).await;
        answer(done, commit, handed, handoff);
    }
    carried
}

/// The next batch; while a small batch is held back, only one that alarm work starts.
async fn next_batch(inbox: &Mutex<Inbox>, max_batch: usize, held: bool) -> Option<Vec<Command>> {
    let mut inbox = inbox.lock().await;
    if held {
        Some(inbox.next_alarm_batch(max_batch).await)
    } else {
        inbox.next_batch(max_batch).await
    }
}

async fn open(config: &Config, tls: MakeRustlsConnect) -> Result<Conn, JournalError> {
    let client = connect(config, tls).await?;
    let s = Stmts::prepare(&client).await?;
    Ok(Conn {
        client,
        s,
        head: None,
        assume_from: Instant::now(),
    })
}

/// How often a writer drops its prepared statements' cached plans. PostgreSQL keeps a generic
/// plan until the table's statistics change, and without ANALYZE (autovacuum off, or not yet
/// run) a plan made while a table was nearly empty stays a sequential scan as the table grows:
/// loading claimed lane heads scanned the whole deliveries table on every claim, and the
/// bench's throughput fell with the journal's size. Re-planning reads the current table sizes.
const REPLAN_EVERY: Duration = Duration::from_secs(5);

/// Attempts per batch when PostgreSQL aborts it for a deadlock or serialization failure between
/// nodes; the batch was rolled back, so running it again is safe.
const BATCH_TRIES: usize = 4;

/// The store's own failure in a command's result (the ones that fail the whole batch).
fn store_error(out: &Out) -> Option<&str> {
    match out.error() {
        Some(JournalError::Unavailable(m)) => Some(m),
        _ => None,
    }
}

/// Lanes as parallel arrays: destinations, classes, keys.
type Lanes = (Vec<String>, Vec<i16>, Vec<String>);

/// The lanes (destination, class, key) that appends and records of a batch will lock, sorted
/// and without repeats, as three parallel arrays for `unnest`.
fn lanes_touched(batch: &[Command]) -> Lanes {
    let mut lanes: Vec<(String, i16, String)> = Vec::new();
    for cmd in batch {
        match cmd {
            Command::Append(ev, _) => {
                let class = ev.envelope.category.lane_class().as_i64() as i16;
                for d in &ev.destinations {
                    lanes.push((d.clone(), class, ev.envelope.key.clone()));
                }
            }
            Command::Record(rec, _) => {
                let t = &rec.task;
                lanes.push((t.dest.clone(), t.class.as_i64() as i16, t.lane_key.clone()));
            }
            _ => {}
        }
    }
    lanes.sort();
    lanes.dedup();
    let mut out = (
        Vec::with_capacity(lanes.len()),
        Vec::with_capacity(lanes.len()),
        Vec::with_capacity(lanes.len()),
    );
    for (d, c, k) in lanes {
        out.0.push(d);
        out.1.push(c);
        out.2.push(k);
    }
    out
}

/// Whether a batch holds commands that insert audit rows without a chain position (replays,
/// registry, subscription writes), which must be sealed before `COMMIT`. Appends and outcomes
/// chain their rows as they insert them, claims and pings write none: a batch of only those
/// skips the seal and its round trips. Rows an older binary left unsealed are picked up by the
/// next batch that seals, or by the writer's periodic [`seal_leftovers`].
fn writes_unchained_audit(batch: &[Command]) -> bool {
    batch.iter().any(|c| {
        matches!(
            c,
            Command::Replay(..) | Command::Registry(..) | Command::Subs(..)
        )
    })
}

/// Seals audit rows that were committed without a chain position (by an older binary during a
/// rolling upgrade), in a transaction of its own.
async fn seal_leftovers(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    match super::audit::seal(client).await {
        Ok(()) => client.batch_execute("COMMIT").await,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

fn retryable(err: &str) -> bool {
    err.starts_with("40P01") || err.starts_with("40001")
}

/// Whether the database refused a statement for the data it was given (SQLSTATE classes 22 data
/// exception, 23 integrity constraint, 44 check option, P0 raised by a function): something one
/// command brought, which its batch companions may not share. A lost connection, a shutdown or
/// a full disk is none of these: running each command alone would only repeat the wait.
fn refused_for_its_data(err: &str) -> bool {
    ["22", "23", "44", "P0"]
        .iter()
        .any(|class| err.starts_with(class) && err.as_bytes().get(5) == Some(&b':'))
}

/// Runs a batch the careful way in one transaction, again if the database aborted it for a
/// deadlock or a race (see `retryable`); returns each command's answer, the outcome, and the
/// lanes to hand over (only when it committed). Batches of appends, outcomes and claims go out
/// in one round trip instead while this writer knows the audit chain head (see [`pipeline`]);
/// this is the way for the others, for those that found an assumption broken, and for every
/// batch during the [`ASSUME_AFTER_MISS`] that follows (another node is writing, or
/// subscriptions exist).
///
/// A batch's appends and outcomes are written by shared statements, so one command the database
/// refuses for reasons of its own (a value it cannot store, say) would fail all the others with
/// it, and again whenever they are sent with it. When a batch of several fails that way, its
/// commands run once more one by one, in order: only the refused one fails (only for errors
/// about the data, see [`refused_for_its_data`]).
async fn run_batch(
    c: &mut Conn,
    batch: Vec<Command>,
    hand: bulk::HandOver<'_>,
) -> (Vec<Done>, Result<(), String>, Vec<Handed>) {
    let err = match try_batch(c, &batch, hand).await {
        Ok((outs, handed)) => {
            let done = batch.into_iter().zip(outs).map(|(c, o)| finish(c, o));
            return (done.collect(), Ok(()), handed);
        }
        Err(e) => e,
    };
    if batch.len() < 2 || !refused_for_its_data(&err) {
        let msg = format!("batch rolled back: {err}");
        let done = batch.into_iter().map(|cmd| fail(cmd, &msg)).collect();
        return (done, Err(msg), Vec::new());
    }
    tracing::warn!(error = %err, commands = batch.len(), "batch refused; running its commands one by one");
    let mut done = Vec::with_capacity(batch.len());
    let mut handed = Vec::new();
    for cmd in batch {
        match try_batch(c, std::slice::from_ref(&cmd), hand).await {
            Ok((outs, h)) => {
                let out = outs
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Out::Unit(no_result()));
                done.push(finish(cmd, out));
                handed.extend(h);
            }
            Err(e) => done.push(fail(cmd, &format!("batch rolled back: {e}"))),
        }
    }
    // Each command's answer already says whether its own transaction committed.
    (done, Ok(()), handed)
}

/// [`run_batch`]'s transaction: each command's result and the lanes to hand over when it
/// committed, else the error that rolled it back.
async fn try_batch(
    c: &mut Conn,
    batch: &[Command],
    hand: bulk::HandOver<'_>,
) -> Result<(Vec<Out>, Vec<Handed>), String> {
    let lanes = lanes_touched(batch);
    let seals = writes_unchained_audit(batch);
    let mut last_err = String::new();
    for attempt in 1..=BATCH_TRIES {
        let (result, outs, handed, head) = careful(c, batch, &lanes, hand, seals).await;
        match result {
            Ok(()) => {
                if seals {
                    // The seal moved the head past what this writer knows.
                    c.head = None;
                } else if head.is_some() {
                    c.head = head;
                }
                return Ok((outs, handed));
            }
            Err(e) => {
                c.head = None;
                let again = retryable(&e) && attempt < BATCH_TRIES;
                if again {
                    tracing::debug!(error = %e, attempt, "batch aborted by the database; running it again");
                }
                last_err = e;
                if !again {
                    break;
                }
            }
        }
    }
    Err(last_err)
}

/// Whether a batch may be sent in one round trip: only appends, outcomes and claims, whose
/// statements check every assumption themselves (`bulk::write`).
fn one_trip(batch: &[Command]) -> bool {
    batch.iter().all(|cmd| {
        matches!(
            cmd,
            Command::Append(..) | Command::Record(..) | Command::Claim { .. }
        )
    })
}

impl Conn {
    /// The chain head to send `batch` on in one round trip, if it may go that way now.
    fn assumable(&self, batch: &[Command]) -> Option<bulk::Head> {
        match &self.head {
            Some(head) if one_trip(batch) && Instant::now() >= self.assume_from => {
                Some(head.clone())
            }
            _ => None,
        }
    }
}

/// How long a writer sends its batches the careful way after one sent in one round trip found
/// an assumption broken.
const ASSUME_AFTER_MISS: Duration = Duration::from_secs(1);

/// What one try of a batch came to: committed or the error, each command's result, the lanes to
/// hand over, and where the chain head moved.
type Tried = (
    Result<(), String>,
    Vec<Out>,
    Vec<Handed>,
    Option<bulk::Head>,
);

/// The batch with `BEGIN` and `COMMIT` in one round trip, on the assumed chain head; `tell`
/// learns the head its rows will leave once they are hashed (see `bulk::OnHead`).
async fn one_round_trip(
    client: &Client,
    s: &Stmts,
    batch: &[Command],
    lanes: &Lanes,
    hand: bulk::HandOver<'_>,
    head: &bulk::Head,
    tell: oneshot::Sender<bulk::Head>,
) -> Tried {
    let assumed = bulk::OnHead { head, tell };
    // Each is sent on its first poll, and `tokio::join!` polls them first in this order.
    let (begun, applied, committed) = tokio::join!(
        client.batch_execute("BEGIN"),
        apply_batch(client, s, batch, lanes, hand, Some(assumed)),
        client.batch_execute("COMMIT"),
    );
    let root = match begun {
        Err(e) => Some(db_error_text(&e)),
        Ok(()) => root_error(&applied),
    };
    let result = match (root, committed) {
        (None, Ok(())) => Ok(()),
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(db_error_text(&e)),
    };
    if result.is_err() {
        // Usually rolled back by the COMMIT already; a stray ROLLBACK only draws a warning.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    (result, applied.outs, applied.handed, applied.head)
}

/// The batch the careful way: `BEGIN`, the statements (chain head and leases read first), the
/// seal when the batch needs it, `COMMIT`.
async fn careful(
    c: &Conn,
    batch: &[Command],
    lanes: &Lanes,
    hand: bulk::HandOver<'_>,
    seals: bool,
) -> Tried {
    let Conn { client, s, .. } = c;
    if let Err(e) = client.batch_execute("BEGIN").await {
        return (Err(db_error_text(&e)), Vec::new(), Vec::new(), None);
    }
    let applied = apply_batch(client, s, batch, lanes, hand, None).await;
    let result = match root_error(&applied) {
        Some(e) => Err(e),
        None if !seals => Ok(()),
        None => super::audit::seal(client)
            .await
            .map_err(|e| db_error_text(&e)),
    };
    let result = match result {
        Ok(()) => client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| db_error_text(&e)),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    };
    (result, applied.outs, applied.handed, applied.head)
}

/// The error that aborted a batch's transaction, if any: the lane lock's, else the root cause
/// among the commands' (not the "transaction is aborted" errors it caused in the others).
fn root_error(applied: &Applied) -> Option<String> {
    if let Err(e) = &applied.locked {
        return Some(db_error_text(e));
    }
    let errors: Vec<&str> = applied.outs.iter().filter_map(store_error).collect();
    errors
        .iter()
        .find(|e| !e.starts_with("25P02"))
        .or(errors.first())
        .map(|e| e.to_string())
}

/// Runs a batch's commands on its transaction, pipelined, results in batch order. First, in the
/// same round trip as what follows (the server runs a connection's statements in the order they
/// were sent), every lane row the batch's appends and records will touch is locked in one sorted
/// pass (`lanes`, see [`lanes_touched`]): all writers of all nodes then take lane locks in the
/// same order and cannot deadlock (claims never wait, the audit head is always locked after the
/// lanes). Then claims and pings; replays and registry writes next, because they may lock lanes
/// of their own and every lane lock must come before the chain head's; then all appends and
/// attempt records together (`bulk::write`, which locks the head); subscription writes last.
/// Subscription rows are only ever locked under the head (numbering a stored event's
/// subscriptions locks them too), so two transactions cannot wait for each other there.
async fn apply_batch(
    tx: &Client,
    s: &Stmts,
    batch: &[Command],
    lanes: &Lanes,
    hand: bulk::HandOver<'_>,
    assumed: Option<bulk::OnHead<'_>>,
) -> Applied {
    let lease_ms = hand.lease_ms;
    let mut appends = Vec::new();
    let mut records = Vec::new();
    let mut quick = Vec::new();
    let mut rest = Vec::new();
    let mut subs = Vec::new();
    for (i, cmd) in batch.iter().enumerate() {
        match cmd {
            Command::Append(ev, _) => appends.push((i, &**ev)),
            Command::Record(rec, _) => records.push((i, &**rec)),
            Command::Claim { .. } | Command::Ping(_) => quick.push((i, cmd)),
            Command::Subs(..) => subs.push((i, cmd)),
            _ => rest.push((i, cmd)),
        }
    }
    let evs: Vec<&NewEvent> = appends.iter().map(|a| a.1).collect();
    let recs: Vec<&AttemptRecord> = records.iter().map(|r| r.1).collect();
    let quick_run = join_all(quick.iter().map(|c| apply(tx, s, c.1, lease_ms)));
    let rest_run = join_all(rest.iter().map(|c| apply(tx, s, c.1, lease_ms)));
    let subs_run = join_all(subs.iter().map(|c| apply(tx, s, c.1, lease_ms)));
    let (dests, classes, keys) = lanes;
    let lock_params: [&(dyn ToSql + Sync); 3] = [dests, classes, keys];
    let (locked, quick_outs, (rest_outs, (appended, recorded, handed, head), subs_outs)) =
        tokio::join!(tx.execute(&s.lock_lanes, &lock_params), quick_run, async {
            let rest_outs = rest_run.await;
            let written = bulk::write(tx, s, &evs, &recs, !subs.is_empty(), hand, assumed).await;
            (rest_outs, written, subs_run.await)
        });
    let mut outs: Vec<Option<Out>> = batch.iter().map(|_| None).collect();
    for ((i, _), r) in appends.iter().zip(appended) {
        outs[*i] = Some(Out::Append(r));
    }
    for ((i, _), r) in records.iter().zip(recorded) {
        outs[*i] = Some(Out::Unit(r));
    }
    let others = quick.iter().chain(&rest).chain(&subs);
    for ((i, _), o) in others.zip(quick_outs.into_iter().chain(rest_outs).chain(subs_outs)) {
        outs[*i] = Some(o);
    }
    let outs = outs
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Out::Unit(no_result())))
        .collect();
    Applied {
        locked,
        outs,
        handed,
        head,
    }
}

/// What [`apply_batch`] did before commit: the lane lock's result (when it failed, the commands
/// failed with "transaction is aborted" and it is the cause), each command's result in batch
/// order, and the leased lanes to hand over once the batch has committed.
struct Applied {
    locked: Result<u64, tokio_postgres::Error>,
    outs: Vec<Out>,
    handed: Vec<Handed>,
    /// Where the batch's chained rows moved the audit chain head (`None`: it wrote none).
    head: Option<bulk::Head>,
}

/// What a command gets if the batch's dispatch left it without a result (a bug).
fn no_result<T>() -> Result<T, JournalError> {
    Err(JournalError::Unavailable(
        "internal error: command without result".into(),
    ))
}

async fn apply(tx: &Client, s: &Stmts, cmd: &Command, lease_ms: i64) -> Out {
    match cmd {
        // Appends and records are written together by `bulk::write` (see `apply_batch`).
        Command::Append(..) => Out::Append(no_result()),
        Command::Claim {
            dest,
            class,
            limit,
            now_ms,
            ..
        } => Out::Claim(claim(tx, s, dest, *class, *limit, *now_ms, lease_ms).await),
        Command::Record(..) => Out::Unit(no_result()),
        Command::Replay(f, _) => Out::Replay(replay(tx, s, f).await),
        Command::Registry(op, _) => Out::Registry(registry::apply(tx, s, op).await),
        Command::Subs(op, _) => Out::Subs(subs::apply(tx, s, op).await),
        Command::Ping(_) => Out::Unit(
            tx.execute("SELECT 1", &[])
                .await
                .map(|_| ())
                .map_err(Into::into),
        ),
    }
}

async fn audit(tx: &Client, s: &Stmts, a: AuditRow<'_>) -> Result<(), JournalError> {
    let attempt = a.attempt.map(|n| n as i32);
    let status = a.status.map(i32::from);
    tx.execute(
        &s.audit,
        &[
            &a.at,
            &a.event_id,
            &a.kind,
            &a.dest,
            &attempt,
            &status,
            &a.latency_ms,
            &a.detail,
        ],
    )
    .await?;
    Ok(())
}

async fn find_existing(
    tx: &Client,
    s: &Stmts,
    ev: &NewEvent,
) -> Result<Option<String>, JournalError> {
    let env = &ev.envelope;
    if let Some(vid) = &env.vendor_event_id
        && let Some(row) = tx.query_opt(&s.find_vid, &[&env.vendor, vid]).await?
    {
        return Ok(Some(row.get(0)));
    }
    if let Some(key) = &ev.idempotency_key
        && let Some(row) = tx.query_opt(&s.find_idem, &[&env.vendor, key]).await?
    {
        return Ok(Some(row.get(0)));
    }
    Ok(None)
}

/// The `events` columns of a stored event, bound as $1–$17 in the order both `insert_event` and
/// `append_event` list them, so the two ways of storing an event cannot drift apart.
pub(super) struct EventRow<'a> {
    ev: &'a NewEvent,
    category: &'static str,
    priority: &'static str,
    class: i16,
    routed: i32,
    now: i64,
}

impl<'a> EventRow<'a> {
    /// `routed`: how many destinations the event goes to; `now`: its stored-at time.
    pub(super) fn new(ev: &'a NewEvent, routed: usize, now: i64) -> Self {
        let env = &ev.envelope;
        Self {
            ev,
            category: env.category.as_str(),
            priority: env.priority.as_str(),
            class: env.category.lane_class().as_i64() as i16,
            routed: routed as i32,
            now,
        }
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 17] {
        let env = &self.ev.envelope;
        [
            &env.id,
            &env.vendor,
            &env.vendor_event_id,
            &self.ev.idempotency_key,
            &self.category,
            &self.priority,
            &env.tenant,
            &env.key,
            &self.class,
            &env.mapping_version,
            &self.ev.content_type,
            &self.ev.raw,
            &env.fhir,
            &self.routed,
            &self.ev.received_at_ms,
            &self.now,
            &self.ev.traceparent,
        ]
    }
}

#[allow(clippy::too_many_arguments)]
async fn enqueue(
    tx: &Client,
    s: &Stmts,
    seq: i64,
    event_id: &str,
    dest: &str,
    class: i16,
    key: &str,
    now: i64,
) -> Result<i64, JournalError> {
    let id: i64 = tx
        .query_one(
            &s.insert_delivery,
            &[&seq, &event_id, &dest, &class, &key, &now],
        )
        .await?
        .get(0);
    tx.execute(&s.upsert_lane, &[&dest, &class, &key, &id, &now])
        .await?;
    Ok(id)
}

async fn claim(
    tx: &Client,
    s: &Stmts,
    dest: &str,
    class: LaneClass,
    limit: usize,
    now_ms: i64,
    lease_ms: i64,
) -> Result<Claimed, JournalError> {
    let c = class.as_i64() as i16;
    let until = now_ms + lease_ms;
    // Pipelined: the next-due query runs after the claim on the server, so it sees the leases.
    let due: [&(dyn ToSql + Sync); 3] = [&dest, &c, &now_ms];
    let (leased, next_due) = tokio::join!(
        async {
            match limit {
                0 => Ok(Vec::new()),
                _ => {
                    tx.query(&s.claim, &[&dest, &c, &now_ms, &until, &(limit as i64)])
                        .await
                }
            }
        },
        tx.query_one(&s.next_due, &due),
    );
    let mut tasks = Vec::new();
    for row in leased? {
        let head: i64 = row.get(1);
        let (Some(event_id), Some(attempts), Some(fhir)) = (
            row.get::<_, Option<String>>(3),
            row.get::<_, Option<i32>>(4),
            row.get::<_, Option<String>>(6),
        ) else {
            return Err(JournalError::Unavailable(format!(
                "lane head {head} has no delivery row"
            )));
        };
        tasks.push(DeliveryTask {
            delivery_id: head,
            event_id,
            dest: dest.to_string(),
            class,
            lane_key: row.get(0),
            attempts: attempts.max(0) as u32,
            created_at_ms: row.get(5),
            fhir: fhir.into(),
            lease: row.get(2),
            traceparent: row.get(7),
        });
    }
    let next_due_ms: Option<i64> = next_due?.get(0);
    Ok(Claimed { tasks, next_due_ms })
}

async fn replay(tx: &Client, s: &Stmts, f: &ReplayFilter) -> Result<Vec<Replayed>, JournalError> {
    let limit = f.limit.max(1) as i64;
    let rows = tx
        .query(
            &s.find_dead,
            &[
                &f.delivery_id,
                &f.destination,
                &f.vendor,
                &limit,
                &f.tenants,
            ],
        )
        .await?;
    if rows.is_empty()
        && let Some(id) = f.delivery_id
    {
        return Err(JournalError::NotFound(format!(
            "no dead letter with delivery id {id}"
        )));
    }
    let now = crate::clock::now_ms();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (dead_id, seq, event_id, dest, class, key): (i64, i64, String, String, i16, String) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        tx.execute(&s.mark_replayed, &[&dead_id]).await?;
        let new_id = enqueue(tx, s, seq, &event_id, &dest, class, &key, now).await?;
        let detail =
            format!("dead delivery {dead_id} re-queued as delivery {new_id} at the lane tail");
        audit(
            tx,
            s,
            AuditRow {
                at: now,
                event_id: &event_id,
                kind: "replayed",
                dest: Some(&dest),
                detail: Some(&detail),
                ..Default::default()
            },
        )
        .await?;
        out.push(Replayed {
            event_id,
            destination: dest,
            dead_delivery_id: dead_id,
            new_delivery_id: new_id,
        });
    }
    Ok(out)
}

/// Prepared once per connection.
struct Stmts {
    find_vid: Statement,
    find_idem: Statement,
    insert_event: Statement,
    /// A batch's appends and attempt records (`bulk`).
    append_all: Statement,
    /// [`bulk::APPEND_ALL_SQL`] without `ON CONFLICT` on `events`, for batches sent in one round
    /// trip, which assume no repeats (see `bulk::fresh_appends`).
    append_fresh: Statement,
    record_all: Statement,
    find_repeats: Statement,
    find_holders: Statement,
    lock_chain_head: Statement,
    move_chain_head: Statement,
    move_chain_head_from: Statement,
    insert_delivery: Statement,
    lock_lanes: Statement,
    upsert_lane: Statement,
    audit: Statement,
    claim: Statement,
    next_due: Statement,
    find_dead: Statement,
    mark_replayed: Statement,
    sweep: Statement,
    /// Numbers a stored event for its matching subscriptions (`subs::NUMBER_SQL`).
    subs_number: Statement,
}

impl Stmts {
    async fn prepare(c: &Client) -> Result<Self, JournalError> {
        Ok(Self {
            find_vid: c.prepare("SELECT id FROM events WHERE vendor = $1 AND vendor_event_id = $2").await?,
            find_idem: c.prepare("SELECT id FROM events WHERE vendor = $1 AND idem_key = $2").await?,
            insert_event: c
                .prepare(
                    "INSERT INTO events (id, vendor, vendor_event_id, idem_key, category, priority, tenant, key,
                        lane_class, mapping_version, content_type, raw, fhir, routed_to, received_at, stored_at,
                        traceparent)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                     ON CONFLICT DO NOTHING RETURNING seq",
                )
                .await?,
            append_all: c.prepare(bulk::APPEND_ALL_SQL).await?,
            append_fresh: c.prepare(&bulk::fresh_appends()).await?,
            record_all: c.prepare(bulk::RECORD_ALL_SQL).await?,
            find_repeats: c.prepare(bulk::FIND_REPEATS_SQL).await?,
            find_holders: c.prepare(bulk::FIND_HOLDERS_SQL).await?,
            lock_chain_head: c
                .prepare("SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE")
                .await?,
            move_chain_head: c
                .prepare("UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1")
                .await?,
            move_chain_head_from: c
                .prepare(
                    // Moves the head from ($3, $4) only: a writer that hashed onto a head it
                    // assumed aborts if another writer moved it meanwhile.
                    "UPDATE audit_chain_head SET seq = $1, hash = $2
                     WHERE id = 1 AND CASE WHEN seq = $3 AND hash = $4 THEN true
                                           ELSE knutepunkt_raced('the audit chain head') END",
                )
                .await?,
            insert_delivery: c
                .prepare(
                    "INSERT INTO deliveries (event_seq, event_id, dest, class, lane_key, state, created_at)
                     VALUES ($1, $2, $3, $4, $5, 'pending', $6) RETURNING id",
                )
                .await?,
            lock_lanes: c
                .prepare(
                    // Creates missing lanes as empty (head_id = 0, which the appends fill in) and
                    // locks all of them, in the caller's sorted order. `WHERE false` locks an
                    // existing row without writing a new version of it.
                    "INSERT INTO lanes (dest, class, lane_key, head_id, next_attempt_at)
                     SELECT d, c, k, 0, 0 FROM unnest($1::TEXT[], $2::SMALLINT[], $3::TEXT[])
                         WITH ORDINALITY AS t(d, c, k, n) ORDER BY n
                     ON CONFLICT (dest, class, lane_key) DO UPDATE SET head_id = lanes.head_id
                         WHERE false",
                )
                .await?,
            upsert_lane: c
                .prepare(
                    "INSERT INTO lanes (dest, class, lane_key, head_id, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (dest, class, lane_key) DO UPDATE SET
                       head_id = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.head_id ELSE lanes.head_id END,
                       next_attempt_at = CASE WHEN lanes.head_id = 0 THEN EXCLUDED.next_attempt_at
                                              ELSE lanes.next_attempt_at END",
                )
                .await?,
            audit: c
                .prepare(
                    "INSERT INTO audit (at, event_id, kind, dest, attempt, status, latency_ms, detail)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?,
            claim: c
                .prepare(
                    // Leases ready lanes and returns their heads with what a delivery needs.
                    "WITH l AS (
                        UPDATE lanes l SET leased = nextval('lease_tokens'), lease_until = $4
                        FROM (SELECT dest, class, lane_key FROM lanes
                              WHERE dest = $1 AND class = $2 AND head_id <> 0 AND next_attempt_at <= $3
                                AND (leased = 0 OR lease_until < $3)
                              ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED) r
                        WHERE l.dest = r.dest AND l.class = r.class AND l.lane_key = r.lane_key
                        RETURNING l.lane_key, l.head_id, l.leased
                     )
                     SELECT l.lane_key, l.head_id, l.leased, d.event_id, d.attempts, d.created_at,
                            e.fhir, e.traceparent
                     FROM l LEFT JOIN deliveries d ON d.id = l.head_id
                         LEFT JOIN events e ON e.seq = d.event_seq",
                )
                .await?,
            next_due: c
                .prepare(
                    "SELECT min(next_attempt_at) FROM lanes
                     WHERE dest = $1 AND class = $2 AND head_id <> 0 AND next_attempt_at > $3
                       AND (leased = 0 OR lease_until < $3)",
                )
                .await?,
            find_dead: c
                .prepare(
                    "SELECT d.id, d.event_seq, d.event_id, d.dest, d.class, d.lane_key
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.state = 'dead'
                       AND ($1::BIGINT IS NULL OR d.id = $1)
                       AND ($2::TEXT IS NULL OR d.dest = $2)
                       AND ($3::TEXT IS NULL OR e.vendor = $3)
                       AND ($5::TEXT[] IS NULL OR e.tenant = ANY($5))
                     ORDER BY d.id LIMIT $4 FOR UPDATE OF d SKIP LOCKED",
                )
                .await?,
            mark_replayed: c.prepare("UPDATE deliveries SET state = 'replayed' WHERE id = $1").await?,
            sweep: c
                .prepare(
                    // Never waits for a lock: a lane row another batch holds is left for the next
                    // sweep; blocking here would make every append to those lanes queue behind it.
                    "DELETE FROM lanes WHERE ctid IN (SELECT ctid FROM lanes
                        WHERE head_id = 0 AND leased = 0 LIMIT 1000 FOR UPDATE SKIP LOCKED)",
                )
                .await?,
            subs_number: c.prepare(subs::NUMBER_SQL).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::refused_for_its_data;

    #[test]
    fn only_data_errors_split_a_batch() {
        for data in [
            "22021: invalid byte sequence for encoding \"UTF8\": 0x00",
            "23505: duplicate key value violates unique constraint",
            "P0001: boom refused",
        ] {
            assert!(refused_for_its_data(data), "{data}");
        }
        for other in [
            "40001: could not serialize access",
            "57P01: terminating connection due to administrator command",
            "53100: could not extend file: No space left on device",
            "connection closed",
            "22",
            "",
        ] {
            assert!(!refused_for_its_data(other), "{other}");
        }
    }
}
