//! Direct hand-off on the embedded store: a lane head that is ready when the writer commits it
//! is leased by the writer and passed to the registered dispatcher with one of its slots,
//! instead of waiting for a claim. Checked here against the real `SqliteJournal`: which heads
//! are handed over (new lanes, the next head after an outcome) and which are not (busy lanes,
//! no free slot, no dispatcher registered, retries), that a handed-over lease is a real lease
//! (claims skip the lane, its outcome is accepted, restart releases it) and that order per lane
//! holds. The dispatcher side is covered end to end by `tests/delivery.rs` and `tests/crash.rs`,
//! which run with hand-off on this backend.

mod common;

use std::sync::Arc;

use knutepunkt::journal::handoff::Handed;
use knutepunkt::journal::{
    AttemptRecord, Claimed, DeliveryTask, Journal, JournalError, LaneClass, NewEvent,
    SqliteJournal, Verdict,
};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;

fn event(id: &str, key: &str, alarm: bool, dests: &[&str]) -> NewEvent {
    common::journal_event("test", id, id, key, alarm, dests)
}

fn outcome(task: DeliveryTask, verdict: Verdict) -> AttemptRecord {
    AttemptRecord {
        attempt: task.attempts + 1,
        task,
        status: Some(200),
        error: None,
        latency_ms: 1.0,
        at_ms: knutepunkt::clock::now_ms(),
        verdict,
    }
}

struct Setup {
    journal: SqliteJournal,
    id: u64,
    rx: UnboundedReceiver<Handed>,
    alarm: Arc<Semaphore>,
    normal: Arc<Semaphore>,
}

/// A journal in `dir` with destination `a` registered for hand-off with the given slots.
fn open(dir: &std::path::Path, alarm_slots: usize, normal_slots: usize) -> Setup {
    let journal = SqliteJournal::open(dir, 64, 1024).expect("open journal");
    let (alarm, normal) = (
        Arc::new(Semaphore::new(alarm_slots)),
        Arc::new(Semaphore::new(normal_slots)),
    );
    let registration = journal
        .handoff()
        .expect("the embedded store hands off")
        .register("a", Arc::clone(&alarm), Arc::clone(&normal));
    Setup {
        journal,
        id: registration.id,
        rx: registration.rx,
        alarm,
        normal,
    }
}

impl Setup {
    /// Appends a new event (must be stored).
    async fn append(&self, id: &str, key: &str, alarm: bool, dests: &[&str]) {
        self.journal
            .append(event(id, key, alarm, dests))
            .await
            .expect("append");
    }

    /// Claims ready heads of `dest` (must succeed).
    async fn claim(&self, dest: &str, class: LaneClass, limit: usize, now: i64) -> Claimed {
        self.journal
            .claim(dest, class, limit, now)
            .await
            .expect("claim")
    }
}

/// The writer sends hand-offs before it answers the batch's callers, so whatever was handed
/// over for an append or an outcome is in the channel once that call returns.
fn taken(rx: &mut UnboundedReceiver<Handed>) -> Vec<Handed> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[tokio::test]
async fn a_new_lane_is_handed_over_with_a_slot_and_claims_skip_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(dir.path(), 1, 4);
    s.append("e1", "patient:1", true, &["a", "b"]).await;
    let handed = taken(&mut s.rx);
    assert_eq!(handed.len(), 1, "only the registered destination takes it");
    let h = &handed[0];
    assert_eq!(
        (h.task.event_id.as_str(), h.task.dest.as_str()),
        ("e1", "a")
    );
    assert_eq!(
        (h.task.class, h.task.lane_key.as_str(), h.task.attempts),
        (LaneClass::Alarm, "patient:1", 0)
    );
    assert_eq!(&*h.task.fhir, r#"{"resourceType":"Bundle","id":"e1"}"#);
    assert!(h.task.traceparent.is_some(), "trace context travels along");
    assert_ne!(h.task.lease, 0);
    assert_eq!(s.alarm.available_permits(), 0, "the slot travels with it");
    assert_eq!(s.normal.available_permits(), 4, "other class untouched");

    // The lane is leased: no claim hands it out again; `b` (no dispatcher) is claimed as usual.
    let now = knutepunkt::clock::now_ms() + 1;
    let a = s.claim("a", LaneClass::Alarm, 8, now).await;
    assert!(a.tasks.is_empty(), "{:?}", a.tasks);
    let b = s.claim("b", LaneClass::Alarm, 8, now).await;
    assert_eq!(b.tasks.len(), 1);
    assert_eq!(b.tasks[0].event_id, "e1");

    // The handed-over lease is the lane's lease: its outcome is accepted.
    let task = handed.into_iter().next().expect("one").task;
    s.journal
        .record(outcome(task, Verdict::Delivered))
        .await
        .expect("record handed-over outcome");
}

#[tokio::test]
async fn a_busy_lane_keeps_its_order_and_the_next_head_follows_the_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(dir.path(), 2, 2);
    for id in ["m1", "m2", "m3"] {
        s.append(id, "patient:7", false, &["a"]).await;
    }
    // Only the first opened the lane; the others queue behind it, whatever the free slots.
    let first = taken(&mut s.rx);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].task.event_id, "m1");
    assert_eq!(s.normal.available_permits(), 1);

    // Delivered while its own slot is still held: the next head takes the other free slot.
    let Handed { task, permit } = first.into_iter().next().expect("one");
    s.journal
        .record(outcome(task, Verdict::Delivered))
        .await
        .expect("record m1");
    let second = taken(&mut s.rx);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].task.event_id, "m2", "lane order");
    assert_eq!(s.normal.available_permits(), 0);

    // No slot free when m2 finishes: m3 is left for a claim, and the claim gets it.
    let Handed { task, permit: p2 } = second.into_iter().next().expect("one");
    s.journal
        .record(outcome(task, Verdict::Delivered))
        .await
        .expect("record m2");
    assert!(taken(&mut s.rx).is_empty(), "no free slot, no hand-off");
    drop((permit, p2));
    let now = knutepunkt::clock::now_ms() + 1;
    let c = s.claim("a", LaneClass::Normal, 8, now).await;
    assert_eq!(c.tasks.len(), 1);
    assert_eq!(c.tasks[0].event_id, "m3");
}

#[tokio::test]
async fn retries_are_claimed_and_restart_releases_handed_over_leases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(dir.path(), 1, 1);
    s.append("r1", "device:1", false, &["a"]).await;
    let h = taken(&mut s.rx).into_iter().next().expect("handed over");
    drop(h.permit);
    // A retry puts the head back on a schedule: it is not handed over again, a claim takes it
    // once due.
    let due = knutepunkt::clock::now_ms() + 60_000;
    s.journal
        .record(outcome(
            h.task,
            Verdict::Retry {
                next_attempt_ms: due,
            },
        ))
        .await
        .expect("record retry");
    assert!(taken(&mut s.rx).is_empty());
    let c = s.claim("a", LaneClass::Normal, 1, due).await;
    assert_eq!(c.tasks.len(), 1);
    assert_eq!(
        (c.tasks[0].event_id.as_str(), c.tasks[0].attempts),
        ("r1", 1)
    );

    // A second lane handed over, then the process "ends" with that lease held.
    s.append("r2", "device:2", false, &["a"]).await;
    let held = taken(&mut s.rx);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].task.event_id, "r2");
    drop((c, held));
    let Setup { journal, rx, .. } = s;
    drop((journal, rx));

    // Reopened (the writer thread of the old journal lets go of the file first).
    let reopened = loop {
        match SqliteJournal::open(dir.path(), 64, 1024) {
            Ok(j) => break j,
            Err(JournalError::Unavailable(m)) if m.contains("in use") => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    };
    let now = knutepunkt::clock::now_ms() + 120_000;
    let c = reopened
        .claim("a", LaneClass::Normal, 8, now)
        .await
        .expect("claim");
    let mut ids: Vec<_> = c.tasks.iter().map(|t| t.event_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["r1", "r2"], "every lease is released by the restart");
}

#[tokio::test]
async fn without_a_free_slot_or_a_registration_nothing_is_handed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(dir.path(), 0, 0);
    s.append("x1", "patient:1", true, &["a"]).await;
    s.append("x2", "patient:2", false, &["a"]).await;
    assert!(taken(&mut s.rx).is_empty());
    let now = knutepunkt::clock::now_ms() + 1;
    let alarm = s.claim("a", LaneClass::Alarm, 8, now).await;
    let normal = s.claim("a", LaneClass::Normal, 8, now).await;
    assert_eq!(alarm.tasks.len() + normal.tasks.len(), 2);

    // Unregistered (a dispatcher that stopped): claimed as usual even with slots free.
    let handoff = s.journal.handoff().expect("handoff");
    handoff.unregister("a", s.id);
    s.alarm.add_permits(4);
    s.append("x3", "patient:3", true, &["a"]).await;
    assert!(taken(&mut s.rx).is_empty());
    let c = s.claim("a", LaneClass::Alarm, 8, now + 10).await;
    assert_eq!(c.tasks.len(), 1);
    assert_eq!(c.tasks[0].event_id, "x3");
}
