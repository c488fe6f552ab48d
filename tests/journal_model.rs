//! Model-based test of the journal: random sequences of appends, claims, outcomes, replays and
//! restarts run against the real journal and against a tiny in-memory model, and the two must
//! agree after every step. The same code runs on the embedded store (`SqliteJournal`, default) and
//! with `KNUTEPUNKT_TEST_STORAGE=postgres` on `PostgresJournal` (a fresh database per case).
//!
//! What is checked:
//! - `claim` hands out only lane heads (the oldest pending delivery of its (dest, class, key) in
//!   append/replay order), never a lane that is leased, never a finished delivery, as many as
//!   `limit` allows and ready lanes offer, oldest due first, and reports the right `next_due_ms`;
//! - `record` moves the lane as the verdict says (delivered / retry at a time / dead letter);
//!   an outcome carrying a lease that is no longer held is refused with `Conflict` and changes
//!   nothing;
//! - `replay` re-queues dead letters at their lane's tail, oldest first;
//! - repeats of a vendor event id are `Duplicate` and store nothing;
//! - stats, per-destination counts and the lanes read model match the model;
//! - direct hand-off (`journal::handoff`): destination `a` is registered with
//!   [`ALARM_SLOTS`] and [`NORMAL_SLOTS`] slots, held by the test like a dispatcher holds them
//!   (until the outcome of the task is recorded). An append that opens a lane of `a`, and an
//!   outcome (delivered or dead) that leaves a next head in a lane of `a`, must hand exactly that
//!   head over when a slot of its class is free, and nothing otherwise; no other call hands
//!   anything over. Handed-over tasks are then held like claimed ones;
//! - restart (drop, wait for the writer thread to stop, reopen the same directory) keeps
//!   everything but the leases. Decision: tasks held across a restart are not dropped silently
//!   from the test; they become stale and recording them must answer `Conflict`, while their
//!   lanes are claimable again.
//!
//! What differs on PostgreSQL (and is modelled exactly):
//! - leases expire: a claim at `now` leases until `now + PG_LEASE`, and a lane whose lease ended
//!   (`lease_until < now`) is claimable again (and does count for `next_due_ms`). The new claim
//!   fences the old holder: its task becomes stale. A holder whose lease ended but whose lane
//!   nobody took meanwhile still holds the token and may record its outcome;
//! - restart drops the journal and opens a new one on the same database (another node): leases
//!   survive it, so tasks held across it stay valid until they expire and are taken over;
//! - emptied lanes keep a row (`head_id = 0`) until a sweep: claims and the read models must not
//!   show them, which the checks after every step cover;
//! - a lane's next head after an outcome is handed over whenever `a`'s dispatcher is registered,
//!   free slot or not (it waits for the slot of the recorded attempt), and a handed-over lease
//!   ends at the wall clock of its write plus `PG_LEASE`: far behind model time, so for claims it
//!   has always ended and the next claim may take the lane over (fencing the handed task);
//! - the lanes read model reports `in_flight` for a lease that has not expired by the wall clock
//!   (for a handed-over lease whose end falls within the read's own start and finish, either
//!   answer is accepted).
//!   Model time runs far ahead of the wall clock, so every lease still holding a token reads as
//!   in flight, as on SQLite.
//!
//! Time: lanes created by append/replay are due at the wall clock of the write, so the model runs
//! its own clock far ahead of the wall clock (claims pass it as `now_ms`); retries are scheduled
//! relative to that clock, in its past or future.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use knutepunkt::journal::handoff::Handed;
use knutepunkt::journal::{
    Appended, AttemptRecord, Claimed, DeliveryTask, Journal, JournalError, LaneClass, LaneQuery,
    NewEvent, PostgresJournal, ReplayFilter, SqliteJournal, Verdict,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const DESTS: [&str; 2] = ["a", "b"];
/// The destination registered for direct hand-off (where the backend offers it), and its slots:
/// few, so that both a free and a full class occur often.
const HANDOFF_DEST: &str = "a";
const ALARM_SLOTS: usize = 1;
const NORMAL_SLOTS: usize = 2;
const KEYS: [&str; 3] = ["patient:1", "patient:2", "device:3"];

#[derive(Debug, Clone)]
enum Choice {
    Delivered,
    RetryPast(u16),
    RetryFuture(u16),
    Dead,
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        key: usize,
        dests: u8,
        alarm: bool,
    },
    AppendDup(Index),
    Claim {
        dest: usize,
        alarm: bool,
        limit: usize,
    },
    Record(Index, Choice),
    RecordStale(Index),
    Replay {
        dest: Option<usize>,
        limit: usize,
    },
    ReplayOne(Index),
    Advance(u16),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    // On PostgreSQL, more time passes between claims and outcomes, so that leases expire and are
    // taken over, also across restarts.
    let (record, advance) = if common::on_postgres() {
        (3, 5)
    } else {
        (5, 2)
    };
    let choice = prop_oneof![
        3 => Just(Choice::Delivered),
        1 => (0u16..5000).prop_map(Choice::RetryPast),
        1 => (0u16..5000).prop_map(Choice::RetryFuture),
        2 => Just(Choice::Dead),
    ];
    prop_oneof![
        5 => (0..KEYS.len(), 1u8..=3, any::<bool>())
            .prop_map(|(key, dests, alarm)| Op::Append { key, dests, alarm }),
        1 => any::<Index>().prop_map(Op::AppendDup),
        5 => (0..DESTS.len(), any::<bool>(), 0usize..4)
            .prop_map(|(dest, alarm, limit)| Op::Claim { dest, alarm, limit }),
        record => (any::<Index>(), choice).prop_map(|(i, c)| Op::Record(i, c)),
        1 => any::<Index>().prop_map(Op::RecordStale),
        1 => (proptest::option::of(0..DESTS.len()), 1usize..4)
            .prop_map(|(dest, limit)| Op::Replay { dest, limit }),
        1 => any::<Index>().prop_map(Op::ReplayOne),
        advance => (0u16..3000).prop_map(Op::Advance),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Pending,
    Delivered,
    Dead,
    Replayed,
}

#[derive(Debug, Clone)]
struct Del {
    event_id: String,
    dest: String,
    class: LaneClass,
    key: String,
    state: St,
    attempts: u32,
    /// The journal's delivery id, once seen (claim or replay).
    sql_id: Option<i64>,
}

/// When a lane is due. Lanes (re)created by append/replay are due at the wall clock of that
/// write, known only within bounds; everything else is due at an exact model time.
#[derive(Debug, Clone, Copy)]
enum Due {
    Wall { lo: i64, hi: i64 },
    At(i64),
}

impl Due {
    fn lo(self) -> i64 {
        match self {
            Due::Wall { lo, .. } => lo,
            Due::At(v) => v,
        }
    }
    fn hi(self) -> i64 {
        match self {
            Due::Wall { hi, .. } => hi,
            Due::At(v) => v,
        }
    }
}

#[derive(Debug, Clone)]
struct Lane {
    due: Due,
    leased: Option<i64>,
    /// End of the lease (model time) where leases expire (PostgreSQL).
    lease_until: i64,
    /// A lease from a hand-off on PostgreSQL: it ends at the wall clock of its write plus the
    /// lease, known within these bounds (wall time, far behind model time: such a lease has
    /// always ended for claims, and reads as in flight until the wall clock passes it).
    wall_lease: Option<(i64, i64)>,
}

type LaneId = (String, LaneClass, String);

#[derive(Default)]
struct Model {
    /// (event id, vendor event id, fhir)
    events: Vec<(String, String, String)>,
    /// In append/replay order.
    dels: Vec<Del>,
    lanes: BTreeMap<LaneId, Lane>,
    held: Vec<DeliveryTask>,
    /// Tasks whose lease is no longer valid: already recorded, or held across a restart.
    spent: Vec<DeliveryTask>,
    tokens: HashSet<i64>,
    now: i64,
    next_event: u64,
    /// Lease length where leases expire (PostgreSQL); `None`: a lease lasts until it is released
    /// or the journal restarts (SQLite).
    lease_ms: Option<i64>,
}

impl Model {
    fn head(&self, lane: &LaneId) -> Option<usize> {
        self.dels.iter().position(|d| {
            d.state == St::Pending && d.dest == lane.0 && d.class == lane.1 && d.key == lane.2
        })
    }

    fn enqueue(&mut self, del: Del, lo: i64, hi: i64) {
        let id = (del.dest.clone(), del.class, del.key.clone());
        self.dels.push(del);
        self.lanes.entry(id).or_insert(Lane {
            due: Due::Wall { lo, hi },
            leased: None,
            lease_until: 0,
            wall_lease: None,
        });
    }

    /// Nobody holds the lane at `now`: never leased, released, or its lease ended.
    fn unleased(&self, l: &Lane, now: i64) -> bool {
        l.leased.is_none() || self.lease_ms.is_some() && l.lease_until < now
    }

    /// The head is finished: the lane moves on (due at `at`) or disappears.
    fn advance(&mut self, lane: &LaneId, at: i64) {
        if self.head(lane).is_some() {
            let l = self.lanes.get_mut(lane).expect("lane");
            l.leased = None;
            l.due = Due::At(at);
        } else {
            self.lanes.remove(lane);
        }
    }
}

fn lane_of(t: &DeliveryTask) -> LaneId {
    (t.dest.clone(), t.class, t.lane_key.clone())
}

fn wall() -> i64 {
    knutepunkt::clock::now_ms()
}

/// Lease length on PostgreSQL: short against the model's time steps (`Advance` up to 3 s, retries
/// up to 5 s), so leases often expire and get taken over within a case.
const PG_LEASE: Duration = Duration::from_secs(2);

/// Where the journal under test lives; a restart opens it again.
enum Store {
    Sqlite(tempfile::TempDir),
    /// Connection string of a database created for this case.
    Postgres(String),
}

impl Store {
    async fn create() -> Store {
        if common::on_postgres() {
            Store::Postgres(common::fresh_database().await)
        } else {
            Store::Sqlite(tempfile::tempdir().expect("tempdir"))
        }
    }

    fn lease_ms(&self) -> Option<i64> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(_) => Some(PG_LEASE.as_millis() as i64),
        }
    }

    async fn open(&self) -> Arc<dyn Journal> {
        match self {
            Store::Sqlite(dir) => {
                Arc::new(SqliteJournal::open(dir.path(), 64, 1024).expect("open journal"))
            }
            Store::Postgres(url) => Arc::new(
                PostgresJournal::open(url, None, 2, PG_LEASE, 64, 1024)
                    .await
                    .expect("open journal"),
            ),
        }
    }

    /// Removes the case's database (the journal must be dropped already).
    async fn remove(self) {
        if let Store::Postgres(url) = self {
            let name = url
                .split_whitespace()
                .find_map(|p| p.strip_prefix("dbname="))
                .expect("database name")
                .to_string();
            let (client, conn) = tokio_postgres::connect(
                &format!("{} dbname=test", common::pg_server()),
                tokio_postgres::NoTls,
            )
            .await
            .expect("connect to the test PostgreSQL server");
            tokio::spawn(conn);
            // FORCE: connections of the dropped journal may still be closing.
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .expect("drop database");
        }
    }
}

/// Journal writer threads alive in this process (named `journal-writer`).
fn writer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "journal-writer")
                })
                .count()
        })
        .unwrap_or(0)
}

fn new_event(id: &str, vendor_id: &str, key: &str, alarm: bool, dests: &[&str]) -> NewEvent {
    common::journal_event("model", id, vendor_id, key, alarm, dests)
}

fn class(alarm: bool) -> LaneClass {
    if alarm {
        LaneClass::Alarm
    } else {
        LaneClass::Normal
    }
}

struct Harness {
    store: Store,
    journal: Option<Arc<dyn Journal>>,
    m: Model,
    restarts: usize,
    /// The test's side of the hand-off to `HANDOFF_DEST`, where the backend offers it.
    taker: Option<Taker>,
}

/// What a dispatcher registered for hand-off holds: the channel, its slots, and the slot of each
/// handed-over task until its outcome is recorded.
struct Taker {
    rx: tokio::sync::mpsc::UnboundedReceiver<Handed>,
    alarm: Arc<Semaphore>,
    normal: Arc<Semaphore>,
    permits: HashMap<i64, OwnedSemaphorePermit>,
}

impl Taker {
    /// Registers with `journal`, if it hands off.
    fn register(journal: &dyn Journal) -> Option<Taker> {
        let handoff = journal.handoff()?;
        let (alarm, normal) = (
            Arc::new(Semaphore::new(ALARM_SLOTS)),
            Arc::new(Semaphore::new(NORMAL_SLOTS)),
        );
        let rx = handoff
            .register(HANDOFF_DEST, Arc::clone(&alarm), Arc::clone(&normal))
            .rx;
        Some(Taker {
            rx,
            alarm,
            normal,
            permits: HashMap::new(),
        })
    }

    fn free(&self, class: LaneClass) -> usize {
        match class {
            LaneClass::Alarm => self.alarm.available_permits(),
            LaneClass::Normal => self.normal.available_permits(),
        }
    }
}

impl Harness {
    fn j(&self) -> &dyn Journal {
        self.journal.as_deref().expect("open")
    }

    /// Whether a new head of `lane` would be handed over now: its destination takes hand-offs
    /// and has a free slot of its class.
    fn would_hand_over(&self, lane: &LaneId) -> bool {
        lane.0 == HANDOFF_DEST && self.taker.as_ref().is_some_and(|t| t.free(lane.1) > 0)
    }

    /// Whether the next head of `lane` would be handed over when an outcome moves the lane on.
    /// On PostgreSQL it needs no free slot: the task waits for the slot its outcome's attempt
    /// frees (and carries none).
    fn would_hand_over_next(&self, lane: &LaneId) -> bool {
        match self.m.lease_ms {
            Some(_) => lane.0 == HANDOFF_DEST && self.taker.is_some(),
            None => self.would_hand_over(lane),
        }
    }

    /// Checks that task `t` (claimed or handed over) is the head of `lane` with its event's
    /// Bundle and trace context and a lease token never seen before, and notes the head's
    /// journal id.
    fn hand_out(&mut self, t: &DeliveryTask, lane: &LaneId) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.traceparent.as_deref(), Some(common::TRACEPARENT));
        let h = self.m.head(lane).expect("a lane handed out has a head");
        let head = &self.m.dels[h];
        prop_assert_eq!(&t.event_id, &head.event_id, "not the head of {:?}", lane);
        prop_assert_eq!(t.attempts, head.attempts);
        if let Some(sql) = head.sql_id {
            prop_assert_eq!(t.delivery_id, sql);
        }
        let fhir = &self
            .m
            .events
            .iter()
            .find(|e| e.0 == t.event_id)
            .expect("event")
            .2;
        prop_assert_eq!(&*t.fhir, fhir.as_str());
        prop_assert!(
            self.m.tokens.insert(t.lease),
            "lease token {} handed out twice",
            t.lease
        );
        self.m.dels[h].sql_id = Some(t.delivery_id);
        Ok(())
    }

    /// Everything handed over since the last look (the writer sends before it answers).
    fn handed(&mut self) -> Vec<Handed> {
        match self.taker.as_mut() {
            Some(t) => std::iter::from_fn(|| t.rx.try_recv().ok()).collect(),
            None => Vec::new(),
        }
    }

    /// Checks that `got` is the head of `lane` (or nothing, when `expected` is false) and holds
    /// it like a claimed task, with its slot if it came with one. `wall`: the wall clock before
    /// and after the write that handed it over.
    fn take_over(
        &mut self,
        lane: &LaneId,
        expected: bool,
        got: Vec<Handed>,
        wall: (i64, i64),
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            got.len(),
            usize::from(expected),
            "hand-off of lane {:?}: {:?}",
            lane,
            got.iter().map(|h| &h.task.event_id).collect::<Vec<_>>()
        );
        let Some(Handed { task, permit }) = got.into_iter().next() else {
            return Ok(());
        };
        prop_assert_eq!(&lane_of(&task), lane);
        self.hand_out(&task, lane)?;
        let pg_lease = self.m.lease_ms;
        let l = self.m.lanes.get_mut(lane).expect("lane");
        prop_assert!(l.leased.is_none(), "hand-off of a leased lane {:?}", lane);
        l.leased = Some(task.lease);
        // PostgreSQL leases a handed-over lane by the wall clock of the write.
        l.wall_lease = pg_lease.map(|ms| (wall.0 + ms, wall.1 + ms));
        l.lease_until = l.wall_lease.map_or(0, |w| w.1);
        if let (Some(t), Some(permit)) = (self.taker.as_mut(), permit) {
            t.permits.insert(task.lease, permit);
        }
        self.m.held.push(task);
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        (match op {
            Op::Append { key, dests, alarm } => self.append(*key, *dests, *alarm).await,
            Op::AppendDup(i) => self.append_dup(i).await,
            Op::Claim { dest, alarm, limit } => self.claim(*dest, *alarm, *limit).await,
            Op::Record(i, c) => self.record(i, c).await,
            Op::RecordStale(i) => self.record_stale(i).await,
            Op::Replay { dest, limit } => self.replay(*dest, *limit).await,
            Op::ReplayOne(i) => self.replay_one(i).await,
            Op::Advance(ms) => {
                self.m.now += i64::from(*ms);
                Ok(())
            }
            Op::Restart => self.restart().await,
        })?;
        // Only appends and outcomes hand anything over (checked where they run).
        let stray = self.handed();
        prop_assert!(
            stray.is_empty(),
            "{:?} handed over {:?}",
            op,
            stray.iter().map(|h| &h.task.event_id).collect::<Vec<_>>()
        );
        Ok(())
    }

    async fn append(&mut self, key: usize, dests: u8, alarm: bool) -> Result<(), TestCaseError> {
        let n = self.m.next_event;
        self.m.next_event += 1;
        let id = format!("ev-{n}");
        let vid = format!("v-{n}");
        let dest_names: Vec<&str> = DESTS
            .iter()
            .enumerate()
            .filter(|(i, _)| dests & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect();
        let ev = new_event(&id, &vid, KEYS[key], alarm, &dest_names);
        let fhir = ev.envelope.fhir.clone();
        let handoff_lane: LaneId = (HANDOFF_DEST.into(), class(alarm), KEYS[key].into());
        let expect_handoff = dest_names.contains(&HANDOFF_DEST)
            && !self.m.lanes.contains_key(&handoff_lane)
            && self.would_hand_over(&handoff_lane);
        let lo = wall();
        let got = self.j().append(ev).await;
        let hi = wall();
        prop_assert_eq!(got.ok(), Some(Appended::Stored { id: id.clone() }));
        let handed = self.handed();
        self.m.events.push((id.clone(), vid, fhir));
        for d in dest_names {
            let del = Del {
                event_id: id.clone(),
                dest: d.to_string(),
                class: class(alarm),
                key: KEYS[key].to_string(),
                state: St::Pending,
                attempts: 0,
                sql_id: None,
            };
            self.m.enqueue(del, lo, hi);
        }
        self.take_over(&handoff_lane, expect_handoff, handed, (lo, hi))
    }

    async fn append_dup(&mut self, i: &Index) -> Result<(), TestCaseError> {
        if self.m.events.is_empty() {
            return Ok(());
        }
        let (id, vid, _) = self.m.events[i.index(self.m.events.len())].clone();
        // A different gateway id, key and routing: still the same vendor event.
        let ev = new_event("ev-dup", &vid, KEYS[0], true, &DESTS);
        let got = self.j().append(ev).await;
        prop_assert_eq!(got.ok(), Some(Appended::Duplicate { id }));
        Ok(())
    }

    async fn claim(&mut self, dest: usize, alarm: bool, limit: usize) -> Result<(), TestCaseError> {
        let dest = DESTS[dest];
        let class = class(alarm);
        let now = self.m.now;
        let got: Claimed = self
            .j()
            .claim(dest, class, limit, now)
            .await
            .map_err(|e| TestCaseError::fail(format!("claim: {e}")))?;
        let ready: Vec<LaneId> = self
            .m
            .lanes
            .iter()
            .filter(|(id, l)| {
                id.0 == dest && id.1 == class && self.m.unleased(l, now) && l.due.lo() <= now
            })
            .map(|(id, _)| id.clone())
            .collect();
        // Exact model times are never ambiguous; wall-clock dues are always far in the past.
        for id in &ready {
            prop_assert!(self.m.lanes[id].due.hi() <= now);
        }
        prop_assert_eq!(
            got.tasks.len(),
            limit.min(ready.len()),
            "claim({}, {:?}, {}) returned {:?}, ready lanes {:?}",
            dest,
            class,
            limit,
            got.tasks
                .iter()
                .map(|t| (&t.lane_key, &t.event_id))
                .collect::<Vec<_>>(),
            ready
        );
        let mut taken: Vec<LaneId> = Vec::new();
        for t in &got.tasks {
            let lane = lane_of(t);
            prop_assert_eq!(&t.dest, dest);
            prop_assert_eq!(t.class, class);
            prop_assert!(
                ready.contains(&lane),
                "claimed lane {:?} is not ready (leased or not due or empty): {:?}",
                lane,
                self.m.lanes.get(&lane)
            );
            prop_assert!(!taken.contains(&lane), "lane {:?} handed out twice", lane);
            taken.push(lane.clone());
            self.hand_out(t, &lane)?;
        }
        // Oldest due first.
        for r in &taken {
            for u in ready.iter().filter(|u| !taken.contains(u)) {
                prop_assert!(
                    self.m.lanes[r].due.lo() <= self.m.lanes[u].due.hi(),
                    "lane {:?} ({:?}) claimed before older lane {:?} ({:?})",
                    r,
                    self.m.lanes[r].due,
                    u,
                    self.m.lanes[u].due
                );
            }
        }
        let lease_ms = self.m.lease_ms.unwrap_or(0);
        for t in &got.tasks {
            let l = self.m.lanes.get_mut(&lane_of(t)).expect("lane");
            l.lease_until = now + lease_ms;
            l.wall_lease = None;
            // Taking over an expired lease fences its holder: that task is stale from now on.
            if let Some(old) = l.leased.replace(t.lease) {
                let p = self.m.held.iter().position(|h| h.lease == old);
                prop_assert!(p.is_some(), "lease {} of a taken-over lane not held", old);
                let stale = self.m.held.remove(p.expect("held"));
                self.m.spent.push(stale);
            }
            self.m.held.push(t.clone());
        }
        let next_due = self
            .m
            .lanes
            .iter()
            .filter(|(id, l)| id.0 == dest && id.1 == class && self.m.unleased(l, now))
            .filter_map(|(_, l)| match l.due {
                Due::At(v) if v > now => Some(v),
                _ => None,
            })
            .min();
        prop_assert_eq!(got.next_due_ms, next_due);
        Ok(())
    }

    async fn record(&mut self, i: &Index, choice: &Choice) -> Result<(), TestCaseError> {
        if self.m.held.is_empty() {
            return Ok(());
        }
        let task = self.m.held.remove(i.index(self.m.held.len()));
        let lane = lane_of(&task);
        prop_assert_eq!(self.m.lanes[&lane].leased, Some(task.lease));
        let h = self.m.head(&lane).expect("held lane has a head");
        prop_assert_eq!(self.m.dels[h].sql_id, Some(task.delivery_id));
        let at = self.m.now;
        let verdict = match choice {
            Choice::Delivered => Verdict::Delivered,
            Choice::RetryPast(d) => Verdict::Retry {
                next_attempt_ms: at - i64::from(*d),
            },
            Choice::RetryFuture(d) => Verdict::Retry {
                next_attempt_ms: at + 1 + i64::from(*d),
            },
            Choice::Dead => Verdict::DeadLetter {
                reason: "model says so".into(),
            },
        };
        let attempt = task.attempts + 1;
        let rec = AttemptRecord {
            task: task.clone(),
            attempt,
            status: Some(if verdict == Verdict::Delivered {
                200
            } else {
                503
            }),
            error: None,
            latency_ms: 1.0,
            at_ms: at,
            verdict: verdict.clone(),
        };
        // The task's own slot is still held while its outcome is recorded (as in a dispatcher).
        let may_hand_over =
            !matches!(verdict, Verdict::Retry { .. }) && self.would_hand_over_next(&lane);
        let lo = wall();
        let got = self.j().record(rec).await;
        let hi = wall();
        prop_assert!(got.is_ok(), "record of a held lease failed: {:?}", got);
        let handed = self.handed();
        self.m.dels[h].attempts = attempt;
        match verdict {
            Verdict::Delivered => {
                self.m.dels[h].state = St::Delivered;
                self.m.advance(&lane, at);
            }
            Verdict::DeadLetter { .. } => {
                self.m.dels[h].state = St::Dead;
                self.m.advance(&lane, at);
            }
            Verdict::Retry { next_attempt_ms } => {
                let l = self.m.lanes.get_mut(&lane).expect("lane");
                l.leased = None;
                l.due = Due::At(next_attempt_ms);
            }
        }
        let next_head = self.m.lanes.contains_key(&lane) && self.m.lanes[&lane].leased.is_none();
        self.take_over(&lane, may_hand_over && next_head, handed, (lo, hi))?;
        if let Some(t) = self.taker.as_mut() {
            t.permits.remove(&task.lease);
        }
        self.m.spent.push(task);
        Ok(())
    }

    async fn record_stale(&mut self, i: &Index) -> Result<(), TestCaseError> {
        if self.m.spent.is_empty() {
            return Ok(());
        }
        let task = self.m.spent[i.index(self.m.spent.len())].clone();
        let rec = AttemptRecord {
            attempt: task.attempts + 1,
            task,
            status: Some(200),
            error: None,
            latency_ms: 1.0,
            at_ms: self.m.now,
            verdict: Verdict::Delivered,
        };
        let got = self.j().record(rec).await;
        prop_assert!(
            matches!(got, Err(JournalError::Conflict(_))),
            "an outcome with a stale lease must be refused, got {:?}",
            got
        );
        Ok(())
    }

    /// Re-queues the dead deliveries `picked` (indices into `dels`) as the journal reported.
    fn requeue(
        &mut self,
        picked: &[usize],
        got: &[knutepunkt::journal::Replayed],
        lo: i64,
        hi: i64,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), picked.len());
        let max_known = self
            .m
            .dels
            .iter()
            .filter_map(|d| d.sql_id)
            .max()
            .unwrap_or(0);
        for (&p, r) in picked.iter().zip(got) {
            let d = self.m.dels[p].clone();
            prop_assert_eq!(&r.event_id, &d.event_id);
            prop_assert_eq!(&r.destination, &d.dest);
            prop_assert_eq!(Some(r.dead_delivery_id), d.sql_id);
            prop_assert!(r.new_delivery_id > max_known);
            self.m.dels[p].state = St::Replayed;
            let new = Del {
                state: St::Pending,
                attempts: 0,
                sql_id: Some(r.new_delivery_id),
                ..d
            };
            self.m.enqueue(new, lo, hi);
        }
        Ok(())
    }

    async fn replay(&mut self, dest: Option<usize>, limit: usize) -> Result<(), TestCaseError> {
        let destination = dest.map(|d| DESTS[d].to_string());
        let picked: Vec<usize> = (0..self.m.dels.len())
            .filter(|&i| {
                let d = &self.m.dels[i];
                d.state == St::Dead && destination.as_ref().is_none_or(|x| *x == d.dest)
            })
            .take(limit)
            .collect();
        let lo = wall();
        let got = self
            .j()
            .replay(ReplayFilter {
                destination,
                limit,
                ..Default::default()
            })
            .await
            .map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
        let hi = wall();
        self.requeue(&picked, &got, lo, hi)
    }

    async fn replay_one(&mut self, i: &Index) -> Result<(), TestCaseError> {
        let dead: Vec<usize> = (0..self.m.dels.len())
            .filter(|&i| self.m.dels[i].state == St::Dead)
            .collect();
        if dead.is_empty() {
            let got = self
                .j()
                .replay(ReplayFilter {
                    delivery_id: Some(1_000_000),
                    limit: 1,
                    ..Default::default()
                })
                .await;
            prop_assert!(matches!(got, Err(JournalError::NotFound(_))), "{:?}", got);
            return Ok(());
        }
        let p = dead[i.index(dead.len())];
        let lo = wall();
        let got = self
            .j()
            .replay(ReplayFilter {
                delivery_id: self.m.dels[p].sql_id,
                limit: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| TestCaseError::fail(format!("replay one: {e}")))?;
        let hi = wall();
        self.requeue(&[p], &got, lo, hi)
    }

    async fn restart(&mut self) -> Result<(), TestCaseError> {
        // The dispatcher goes with the process: its slots and channel too.
        drop(self.taker.take());
        drop(self.journal.take());
        self.restarts += 1;
        if self.m.lease_ms.is_some() {
            // PostgreSQL: another node opens the same database. Leases are rows and outlive the
            // node that took them; they end only by expiring (or being released).
            self.journal = Some(self.store.open().await);
            self.taker = Taker::register(self.j());
            return Ok(());
        }
        // The writer thread stops once its queue is closed; wait for it so the old connection is
        // gone before the directory is opened again (the LOCK file alone does not ensure that).
        let deadline = Instant::now() + Duration::from_secs(10);
        while writer_threads() > 0 {
            prop_assert!(Instant::now() < deadline, "journal writer did not stop");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.journal = Some(self.store.open().await);
        self.taker = Taker::register(self.j());
        for l in self.m.lanes.values_mut() {
            l.leased = None;
        }
        let held = std::mem::take(&mut self.m.held);
        self.m.spent.extend(held);
        Ok(())
    }

    async fn check(&self) -> Result<(), TestCaseError> {
        let j = self.j();
        let m = &self.m;
        let count = |s: St| m.dels.iter().filter(|d| d.state == s).count() as i64;
        let stats = j
            .stats()
            .await
            .map_err(|e| TestCaseError::fail(format!("stats: {e}")))?;
        prop_assert_eq!(stats.events, m.events.len() as i64);
        prop_assert_eq!(stats.pending, count(St::Pending), "pending");
        prop_assert_eq!(stats.delivered, count(St::Delivered), "delivered");
        prop_assert_eq!(stats.dead, count(St::Dead), "dead");

        // The gauges' cheaper read agrees with the model on everything still queued.
        let queue = j
            .queue_figures()
            .await
            .map_err(|e| TestCaseError::fail(format!("queue figures: {e}")))?;
        prop_assert_eq!(queue.quarantined, stats.quarantined);

        let dests = j
            .destinations()
            .await
            .map_err(|e| TestCaseError::fail(format!("destinations: {e}")))?;
        for d in DESTS {
            let of = |s: St| {
                m.dels
                    .iter()
                    .filter(|x| x.dest == d && x.state == s)
                    .count() as i64
            };
            let lanes = m.lanes.keys().filter(|l| l.0 == d).count() as i64;
            match dests.iter().find(|x| x.destination == d) {
                Some(s) => {
                    prop_assert_eq!(
                        (s.lanes, s.pending, s.delivered, s.dead),
                        (lanes, of(St::Pending), of(St::Delivered), of(St::Dead)),
                        "destination {}",
                        d
                    );
                }
                None => prop_assert!(m.dels.iter().all(|x| x.dest != d)),
            }
            let got = queue
                .destinations
                .iter()
                .find(|x| x.destination == d)
                .map(|q| {
                    (
                        q.lanes,
                        q.pending,
                        q.dead,
                        q.oldest_pending_age_ms.is_some(),
                    )
                })
                .unwrap_or_default();
            let pending = of(St::Pending);
            prop_assert_eq!(
                got,
                (lanes, pending, of(St::Dead), pending > 0),
                "queue of {}",
                d
            );
        }

        let read_lo = wall();
        let lanes = j
            .lanes(LaneQuery {
                destination: None,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| TestCaseError::fail(format!("lanes: {e}")))?;
        let read_hi = wall();
        prop_assert_eq!(lanes.len(), m.lanes.len(), "lane count");
        for info in &lanes {
            let id: LaneId = (info.destination.clone(), info.class, info.key.clone());
            let Some(l) = m.lanes.get(&id) else {
                return Err(TestCaseError::fail(format!("unexpected lane {id:?}")));
            };
            let h = &m.dels[m.head(&id).expect("head")];
            prop_assert_eq!(&info.head_event_id, &h.event_id, "head of {:?}", id);
            prop_assert_eq!(info.head_attempts, i64::from(h.attempts));
            let depth = m
                .dels
                .iter()
                .filter(|d| {
                    d.state == St::Pending && d.dest == id.0 && d.class == id.1 && d.key == id.2
                })
                .count() as i64;
            prop_assert_eq!(info.depth, depth, "depth of {:?}", id);
            // A handed-over lease on PostgreSQL reads as in flight until the wall clock passes
            // its end; within the bounds of that end, either answer is right.
            match (l.leased, l.wall_lease) {
                (Some(_), Some((end_lo, _))) if read_hi < end_lo => {
                    prop_assert!(info.in_flight, "lease of {:?}", id)
                }
                (Some(_), Some((_, end_hi))) if read_lo > end_hi => {
                    prop_assert!(!info.in_flight, "lease of {:?}", id)
                }
                (Some(_), Some(_)) => {}
                (leased, None) => {
                    prop_assert_eq!(info.in_flight, leased.is_some(), "lease of {:?}", id)
                }
                (None, Some(_)) => prop_assert!(!info.in_flight, "lease of {:?}", id),
            }
            prop_assert!(
                l.due.lo() <= info.next_attempt_at_ms && info.next_attempt_at_ms <= l.due.hi(),
                "due of {:?}: {} vs model {:?}",
                id,
                info.next_attempt_at_ms,
                l.due
            );
        }
        Ok(())
    }
}

async fn run(ops: Vec<Op>) -> Result<usize, TestCaseError> {
    let store = Store::create().await;
    let journal = Some(store.open().await);
    let taker = journal.as_deref().and_then(Taker::register);
    let mut h = Harness {
        m: Model {
            // Far ahead of the wall clock: lanes due "now" at append are always ready.
            now: wall() + 1_000_000_000,
            lease_ms: store.lease_ms(),
            ..Default::default()
        },
        store,
        journal,
        restarts: 0,
        taker,
    };
    let mut result = Ok(());
    for (n, op) in ops.iter().enumerate() {
        result = h
            .step(op)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {n} {op:?}: {e}")));
        if result.is_ok() {
            result = h
                .check()
                .await
                .map_err(|e| TestCaseError::fail(format!("after step {n} {op:?}: {e}")));
        }
        if result.is_err() {
            break;
        }
    }
    let Harness {
        store,
        journal,
        restarts,
        ..
    } = h;
    drop(journal);
    store.remove().await;
    result.map(|()| restarts)
}

/// Fewer but longer cases on PostgreSQL: each creates a database.
fn cases() -> u32 {
    if common::on_postgres() { 24 } else { 64 }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let len = if common::on_postgres() { 1..80 } else { 1..40 };
    proptest::collection::vec(op(), len)
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    #[test]
    fn journal_matches_model(ops in ops()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(ops))?;
    }
}
