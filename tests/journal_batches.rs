//! Many commands in one writer batch, on the backend under test (`KNUTEPUNKT_TEST_STORAGE`).
//! The journal model test sends one command at a time; here appends and outcomes arrive
//! together so that each batch holds many of them (PostgreSQL stores a batch's appends with one
//! statement and its outcomes with another). Checked: repeats inside one batch are recognised,
//! per-lane order is the order of the appends, outcomes with a stale lease are refused while the
//! rest of their batch applies, every step is audited and the audit chain verifies; on
//! PostgreSQL also that audit rows left without a chain position are sealed by the writer, and
//! that batches sent ahead on an assumed chain head run again when another node moved it.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use knutepunkt::journal::audit_chain::Verdict as ChainVerdict;
use knutepunkt::journal::{
    Appended, AttemptRecord, DeliveryTask, Journal, JournalError, LaneClass, PostgresJournal,
    SqliteJournal, Verdict,
};

const KEYS: usize = 24;
const PER_KEY: usize = 12;
const DESTS: [&str; 2] = ["a", "b"];

enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Store {
    async fn open() -> (Store, Arc<dyn Journal>) {
        if common::on_postgres() {
            let url = common::fresh_database().await;
            let j = open_postgres(&url).await;
            (Store::Postgres(url), j)
        } else {
            let dir = tempfile::tempdir().expect("tempdir");
            let j = SqliteJournal::open(dir.path(), 256, 4096).expect("open journal");
            (Store::Sqlite(dir), Arc::new(j))
        }
    }

    async fn verify_audit(&self) -> ChainVerdict {
        match self {
            Store::Sqlite(dir) => knutepunkt::journal::verify_sqlite_audit(dir.path()),
            Store::Postgres(url) => knutepunkt::journal::verify_postgres_audit(url, None).await,
        }
        .expect("verify audit chain")
    }
}

/// A node on the PostgreSQL database `url` (leases of 60 s, batches of up to 256 commands).
async fn open_postgres(url: &str) -> Arc<dyn Journal> {
    Arc::new(
        PostgresJournal::open(url, None, 2, Duration::from_secs(60), 256, 4096)
            .await
            .expect("open journal"),
    )
}

fn delivered(task: DeliveryTask) -> AttemptRecord {
    AttemptRecord {
        attempt: task.attempts + 1,
        task,
        status: Some(200),
        error: None,
        latency_ms: 2.5,
        at_ms: knutepunkt::clock::now_ms(),
        verdict: Verdict::Delivered,
    }
}

/// Claims every ready head of destination `a` and records it delivered, round after round,
/// until none is left; returns the event ids each lane handed out, in order.
async fn drain_a(journal: &dyn Journal) -> HashMap<String, Vec<String>> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let far = knutepunkt::clock::now_ms() + 3_600_000;
    loop {
        let claimed = journal
            .claim("a", LaneClass::Normal, 1000, far)
            .await
            .expect("claim");
        if claimed.tasks.is_empty() {
            return seen;
        }
        for t in &claimed.tasks {
            seen.entry(t.lane_key.clone())
                .or_default()
                .push(t.event_id.clone());
        }
        let outcomes = claimed
            .tasks
            .into_iter()
            .map(|t| journal.record(delivered(t)));
        for r in join_all(outcomes).await {
            r.expect("outcome");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_appends_and_outcomes_keep_order_and_audit() {
    let (store, journal) = Store::open().await;

    // One task per key appends its events one after another (so each key has a defined order)
    // while all keys run at once (so batches mix keys). Every third event is sent three times at
    // once under different event ids: the copies share a batch and only one may be stored.
    let per_key = join_all((0..KEYS).map(|k| {
        let journal = Arc::clone(&journal);
        async move {
            let key = format!("patient:{k}");
            let mut stored = Vec::new();
            for i in 0..PER_KEY {
                let vendor_id = format!("v-{k}-{i}");
                let copies = if i % 3 == 0 { 3 } else { 1 };
                let results = join_all((0..copies).map(|c| {
                    let ev = common::journal_event(
                        "test",
                        &format!("e-{k}-{i}-{c}"),
                        &vendor_id,
                        &key,
                        false,
                        &DESTS,
                    );
                    journal.append(ev)
                }))
                .await;
                let mut new = Vec::new();
                let mut repeats = Vec::new();
                for r in results {
                    match r.expect("append") {
                        Appended::Stored { id } => new.push(id),
                        Appended::Duplicate { id } => repeats.push(id),
                    }
                }
                assert_eq!(new.len(), 1, "{vendor_id}: exactly one copy is stored");
                assert!(
                    repeats.iter().all(|id| id == &new[0]),
                    "{vendor_id}: repeats name the stored event: {repeats:?} vs {new:?}"
                );
                stored.push(new.remove(0));
            }
            (key, stored)
        }
    }))
    .await;
    let expected: HashMap<String, Vec<String>> = per_key.into_iter().collect();
    let stats = journal.stats().await.expect("stats");
    assert_eq!(
        stats.events,
        (KEYS * PER_KEY) as i64,
        "no copy stored twice"
    );

    // Drain both destinations: claim every ready head, then record all outcomes at once (one
    // batch), together with one outcome whose lease is stale.
    let mut seen: HashMap<(String, String), Vec<String>> = HashMap::new();
    let far = knutepunkt::clock::now_ms() + 3_600_000;
    let mut rounds = 0;
    for _round in 0..(PER_KEY * 4) {
        let mut tasks = Vec::new();
        for dest in DESTS {
            let claimed = journal
                .claim(dest, LaneClass::Normal, 1000, far)
                .await
                .expect("claim");
            tasks.extend(claimed.tasks);
        }
        if tasks.is_empty() {
            break;
        }
        let mut stale = tasks[0].clone();
        stale.lease += 1_000_000_007;
        for t in &tasks {
            seen.entry((t.dest.clone(), t.lane_key.clone()))
                .or_default()
                .push(t.event_id.clone());
        }
        let mut outcomes: Vec<AttemptRecord> = tasks.into_iter().map(delivered).collect();
        outcomes.insert(outcomes.len() / 2, delivered(stale));
        let results = join_all(outcomes.into_iter().map(|o| journal.record(o))).await;
        let mut refused = 0;
        for r in results {
            match r {
                Err(JournalError::Conflict(_)) => refused += 1,
                Ok(()) => {}
                Err(e) => panic!("outcome: {e}"),
            }
        }
        assert_eq!(refused, 1, "only the stale outcome is refused");
        rounds += 1;
    }
    assert_eq!(
        rounds, PER_KEY,
        "one lane head per key and destination per round"
    );

    for dest in DESTS {
        for (key, ids) in &expected {
            assert_eq!(
                seen.get(&(dest.to_string(), key.clone())),
                Some(ids),
                "{dest}/{key}: each event handed out once, in append order"
            );
        }
    }
    let stats = journal.stats().await.expect("stats");
    assert_eq!(stats.events, (KEYS * PER_KEY) as i64);

    // Every stored event: received, stored, routed, then per destination an attempt and its
    // delivery, with the attempt's status and latency.
    for ids in expected.values() {
        for id in ids {
            let ev = journal.event(id).await.expect("event").expect("stored");
            let kinds: Vec<&str> = ev.audit.iter().map(|a| a.kind.as_str()).collect();
            assert_eq!(&kinds[..3], ["received", "stored", "routed"], "{id}");
            for dest in DESTS {
                let steps: Vec<_> = ev
                    .audit
                    .iter()
                    .filter(|a| a.destination.as_deref() == Some(dest))
                    .collect();
                assert_eq!(steps.len(), 2, "{id} -> {dest}: {steps:?}");
                assert_eq!(steps[0].kind, "attempt");
                assert_eq!(steps[0].status, Some(200));
                assert_eq!(steps[0].latency_ms, Some(2.5));
                assert_eq!(steps[1].kind, "delivered");
            }
            assert!(ev.deliveries.iter().all(|d| d.state == "delivered"), "{id}");
        }
    }
    drop(journal);
    tokio::time::sleep(Duration::from_millis(200)).await;
    match store.verify_audit().await {
        ChainVerdict::Intact { rows, .. } => assert_eq!(
            rows,
            (KEYS * PER_KEY * (3 + 2 * DESTS.len())) as u64,
            "one chained audit row per step"
        ),
        broken => panic!("audit chain: {broken:?}"),
    }
}

/// PostgreSQL: two nodes (two journals on one database) store the same vendor events at the
/// same moment. Each event is stored once, the other node answers with its id, and the audit
/// chain written by both stays gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_storing_the_same_events_store_each_once() {
    if !common::on_postgres() {
        return;
    }
    let (store, first) = Store::open().await;
    let Store::Postgres(url) = &store else {
        unreachable!("on_postgres")
    };
    let second = open_postgres(url).await;
    let sends = (0..200).flat_map(|i| {
        [&first, &second].map(|node| {
            let node = Arc::clone(node);
            async move {
                let ev = common::journal_event(
                    "test",
                    &format!("e-{i}-{:p}", Arc::as_ptr(&node)),
                    &format!("v-{i}"),
                    &format!("patient:{}", i % 7),
                    false,
                    &DESTS,
                );
                (i, node.append(ev).await.expect("append"))
            }
        })
    });
    let mut by_vendor_id: HashMap<usize, Vec<Appended>> = HashMap::new();
    for (i, a) in join_all(sends).await {
        by_vendor_id.entry(i).or_default().push(a);
    }
    for (i, results) in &by_vendor_id {
        let stored: Vec<&String> = results
            .iter()
            .filter_map(|a| match a {
                Appended::Stored { id } => Some(id),
                Appended::Duplicate { .. } => None,
            })
            .collect();
        assert_eq!(stored.len(), 1, "v-{i}: {results:?}");
        assert!(
            results.iter().all(|a| match a {
                Appended::Duplicate { id } => id == stored[0],
                Appended::Stored { .. } => true,
            }),
            "v-{i}: {results:?}"
        );
    }
    assert_eq!(first.stats().await.expect("stats").events, 200);
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(200)).await;
    match store.verify_audit().await {
        ChainVerdict::Intact { rows, .. } => assert_eq!(rows, 200 * 3, "received, stored, routed"),
        broken => panic!("audit chain: {broken:?}"),
    }
}

/// PostgreSQL: an outcome whose lease has run out, arriving in the same batch as the claim that
/// takes the lane over, is refused (`Conflict`) or applied before the takeover, and never costs
/// the batch: every other command of it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_racing_the_takeover_of_its_lane_fails_alone() {
    if !common::on_postgres() {
        return;
    }
    let url = common::fresh_database().await;
    let journal = open_postgres(&url).await;
    let mut took_over = 0;
    for round in 0..30 {
        let key = format!("patient:{round}");
        for i in 0..2 {
            let id = format!("e-{round}-{i}");
            journal
                .append(common::journal_event("test", &id, &id, &key, false, &["a"]))
                .await
                .expect("append");
        }
        let now = knutepunkt::clock::now_ms();
        let task = journal
            .claim("a", LaneClass::Normal, 1000, now)
            .await
            .expect("claim")
            .tasks
            .into_iter()
            .find(|t| t.lane_key == key)
            .expect("head claimed");
        // Far past the lease: the claim may take the lane over from the outcome's holder.
        let later = now + 3_600_000;
        let other = format!("e-{round}-x");
        let (outcome, claimed, appended) = tokio::join!(
            journal.record(delivered(task)),
            journal.claim("a", LaneClass::Normal, 1000, later),
            journal.append(common::journal_event(
                "test",
                &other,
                &other,
                "patient:other",
                false,
                &["a"],
            )),
        );
        appended.expect("the append in the same batch goes through");
        let claimed = claimed.expect("the claim goes through");
        match outcome {
            Ok(()) => {}
            Err(JournalError::Conflict(_)) => {
                took_over += 1;
                assert!(
                    claimed.tasks.iter().any(|t| t.lane_key == key),
                    "refused only because the claim took the lane over"
                );
            }
            Err(e) => panic!("round {round}: the outcome failed with {e}"),
        }
        // Release whatever the second claim leased, so the next round starts clean.
        for t in claimed.tasks {
            let _ = journal.record(delivered(t)).await;
        }
    }
    eprintln!("takeovers before the outcome: {took_over} of 30");
}

/// PostgreSQL: a batch of appends does not run the seal (its rows are chained as inserted), yet
/// an audit row committed without a chain position (as an older binary during a rolling
/// upgrade leaves it) is still sealed into the chain: by the writer's periodic seal of
/// leftovers, within its 10 s interval, and the chain then verifies with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_left_unsealed_are_sealed_by_the_writer() {
    if !common::on_postgres() {
        return;
    }
    let url = common::fresh_database().await;
    let journal = open_postgres(&url).await;
    let append = |n: usize| {
        let ev = common::journal_event(
            "test",
            &format!("e-{n}"),
            &format!("v-{n}"),
            "patient:1",
            false,
            &DESTS,
        );
        journal.append(ev)
    };
    append(0).await.expect("append");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.execute(
        "INSERT INTO audit (at, event_id, kind, detail) VALUES (1, 'e-0', 'note', 'older binary')",
        &[],
    )
    .await
    .expect("insert an unsealed row");
    let unsealed = || async {
        db.query_one("SELECT count(*) FROM audit WHERE chain_seq IS NULL", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    append(1).await.expect("append");
    assert_eq!(unsealed().await, 1, "a batch of appends does not seal");
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while unsealed().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the leftover row was never sealed"
        );
        // The periodic seal runs after a batch, so keep the writer busy.
        append(2).await.expect("append");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events = journal.stats().await.expect("stats").events;
    assert!(events >= 2, "{events} events stored");
    drop(journal);
    tokio::time::sleep(Duration::from_millis(200)).await;
    match knutepunkt::journal::verify_postgres_audit(&url, None).await {
        Ok(ChainVerdict::Intact { rows, .. }) => {
            assert_eq!(
                rows as i64,
                events as i64 * 3 + 1,
                "three rows per event, one note"
            )
        }
        other => panic!("audit chain: {other:?}"),
    }
}

/// PostgreSQL: a node's writer sends its next batch before the previous one is answered, on the
/// chain head that one will leave. Here a second node keeps moving the head meanwhile, so
/// batches sent that way keep finding their assumption broken, and with them every batch sent
/// after them. Each is run again the careful way: every append is stored once, with no error,
/// per-key order holds, and the audit chain verifies with exactly one row per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_that_lose_the_chain_head_run_again() {
    if !common::on_postgres() {
        return;
    }
    let url = common::fresh_database().await;
    let (first, second) = (open_postgres(&url).await, open_postgres(&url).await);
    // Keys that pause briefly between their appends keep new commands arriving while a batch
    // is on the wire, so the first node's writer sends the next one ahead; the second node
    // moves the chain head every 250 ms (after a miss, the first rests 1 s from sending ahead).
    const KEYS: usize = 40;
    const RUN: Duration = Duration::from_secs(4);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let interferer = {
        let (second, done) = (Arc::clone(&second), Arc::clone(&done));
        tokio::spawn(async move {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let ev = common::journal_event(
                    "other",
                    &format!("o-{n}"),
                    &format!("ov-{n}"),
                    &format!("other:{}", n % 5),
                    false,
                    &["a"],
                );
                second.append(ev).await.expect("append on the second node");
                n += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            n
        })
    };
    let until = std::time::Instant::now() + RUN;
    let per_key = join_all((0..KEYS).map(|k| {
        let first = Arc::clone(&first);
        async move {
            let key = format!("patient:{k}");
            let mut ids = Vec::new();
            for i in 0.. {
                if std::time::Instant::now() >= until {
                    break;
                }
                let ev = common::journal_event(
                    "test",
                    &format!("e-{k}-{i}"),
                    &format!("v-{k}-{i}"),
                    &key,
                    false,
                    &["a"],
                );
                match first.append(ev).await {
                    Ok(Appended::Stored { id }) => ids.push(id),
                    other => panic!("e-{k}-{i}: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(1 + (k % 3) as u64)).await;
            }
            (key, ids)
        }
    }))
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let others = interferer.await.expect("second node");
    assert!(others > 0, "the second node wrote while the first did");
    let total = per_key.iter().map(|(_, ids)| ids.len()).sum::<usize>() + others;
    assert_eq!(first.stats().await.expect("stats").events, total as i64);

    // Drain: each round hands out every lane's head once; record them all delivered.
    let seen = drain_a(&*first).await;
    for (key, ids) in &per_key {
        assert_eq!(seen.get(key), Some(ids), "{key}: delivered in append order");
    }
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(200)).await;
    match knutepunkt::journal::verify_postgres_audit(&url, None).await {
        Ok(ChainVerdict::Intact { rows, .. }) => {
            assert_eq!(rows as usize, total * (3 + 2), "one chained row per step")
        }
        other => panic!("audit chain: {other:?}"),
    }
}

/// Makes every insert of a delivery to destination `boom` fail inside the database, after the
/// append has already written its event row and first audit rows: a command that fails half
/// way, as a full disk or a broken constraint would.
async fn refuse_deliveries_to_boom(store: &Store) {
    match store {
        Store::Sqlite(dir) => {
            let c = rusqlite::Connection::open(dir.path().join("journal.sqlite3")).expect("open");
            c.execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON deliveries WHEN NEW.dest = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'boom refused'); END;",
            )
            .expect("trigger");
        }
        Store::Postgres(url) => {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.batch_execute(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.dest = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF;
                 RETURN NEW; END $$;
                 CREATE TRIGGER boom BEFORE INSERT ON deliveries
                 FOR EACH ROW EXECUTE FUNCTION boom();",
            )
            .await
            .expect("trigger");
        }
    }
}

/// Appends that fail half way share batches with appends that succeed. The failing ones leave
/// no row and no audit record (their event, audit rows and chain positions are undone); the
/// others are stored, queued and audited as if alone, and the chain stays gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_failing_half_way_leaves_nothing_and_spoils_nothing() {
    let (store, journal) = Store::open().await;
    refuse_deliveries_to_boom(&store).await;
    let sends = (0..240).map(|i| {
        let journal = Arc::clone(&journal);
        async move {
            let bad = i % 8 == 3;
            let dests: &[&str] = if bad { &["a", "boom"] } else { &["a"] };
            let ev = common::journal_event(
                "test",
                &format!("e-{i}"),
                &format!("v-{i}"),
                &format!("patient:{}", i % 11),
                false,
                dests,
            );
            (i, bad, journal.append(ev).await)
        }
    });
    let results = join_all(sends).await;
    let mut good = Vec::new();
    for (i, bad, r) in results {
        match (bad, r) {
            (false, Ok(Appended::Stored { id })) => good.push(id),
            (true, Err(e)) => assert!(e.to_string().contains("boom"), "e-{i}: {e}"),
            (bad, other) => panic!("e-{i} (bad: {bad}): {other:?}"),
        }
    }
    assert_eq!(good.len(), 210);
    let stats = journal.stats().await.expect("stats");
    assert_eq!(stats.events, 210, "no half-stored event");
    for i in (0..240).filter(|i| i % 8 == 3) {
        let id = format!("e-{i}");
        assert!(
            journal.event(&id).await.expect("event").is_none(),
            "{id} left nothing behind"
        );
    }
    // Every stored event is queued for `a`, in order per key, and fully audited.
    let seen = drain_a(&*journal).await;
    let handed: usize = seen.values().map(Vec::len).sum();
    for (key, ids) in &seen {
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id[2..].parse::<u32>().expect("number"));
        assert_eq!(ids, &sorted, "{key}: in append order");
    }
    assert_eq!(handed, 210, "each stored event delivered once");
    drop(journal);
    tokio::time::sleep(Duration::from_millis(200)).await;
    match store.verify_audit().await {
        ChainVerdict::Intact { rows, .. } => {
            assert_eq!(
                rows,
                210 * (3 + 2),
                "one chained row per step, none of the failed"
            )
        }
        broken => panic!("audit chain: {broken:?}"),
    }
}
