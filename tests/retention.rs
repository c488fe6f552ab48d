//! Retention on the store the suite runs on (SQLite, or PostgreSQL with
//! `KNUTEPUNKT_TEST_STORAGE=postgres`): a sweep deletes the finished events and the prefix of
//! the audit chain before the first unfinished event, keeps everything of a pending event,
//! anchors the chain so `knutepunkt audit verify` still passes, audits itself, and tampering
//! after the anchor (or with the anchor) is still detected.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Dest, Gateway, Mode, Sink, observation};
use knutepunkt::journal::{Journal, PgOptions, PostgresJournal, SqliteJournal, retention};

fn pg_url(gw: &Gateway) -> String {
    let cfg = std::fs::read_to_string(&gw.config).expect("config");
    let line = cfg
        .lines()
        .rfind(|l| l.starts_with("url = "))
        .expect("url line");
    toml::from_str::<toml::Value>(line).expect("toml")["url"]
        .as_str()
        .expect("url")
        .to_string()
}

/// The gateway's journal opened by this process (the gateway is stopped first on SQLite).
async fn open(gw: &Gateway) -> Arc<dyn Journal> {
    if common::on_postgres() {
        let opts = PgOptions {
            pool_size: 2,
            lease: Duration::from_secs(30),
            max_batch: 16,
            queue_capacity: 64,
            writers: 1,
        };
        Arc::new(
            PostgresJournal::open_with(&pg_url(gw), None, opts)
                .await
                .expect("open postgres"),
        )
    } else {
        Arc::new(SqliteJournal::open(&gw.dir.path().join("data"), 16, 64).expect("open sqlite"))
    }
}

/// Runs one SQL statement on the store (tampering); returns rows affected.
async fn exec(gw: &Gateway, sql: &str) -> u64 {
    if common::on_postgres() {
        let (c, conn) = tokio_postgres::connect(&pg_url(gw), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.execute(sql, &[]).await.expect(sql)
    } else {
        let c = rusqlite::Connection::open(gw.dir.path().join("data").join("journal.sqlite3"))
            .expect("open");
        c.execute(sql, []).expect(sql) as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_deletes_finished_prefix_and_the_chain_still_verifies() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    // Two events delivered completely, then one that stays pending (its destination fails).
    let mut done = Vec::new();
    for i in 0..2 {
        let (s, b) = gw
            .post(&observation("13097248022", &format!("old-{i}")))
            .await;
        assert_eq!(s, 202, "{b}");
        let id = b["id"].as_str().expect("id").to_string();
        sink.wait_for(Duration::from_secs(10), "delivered", |r| {
            r.iter().any(|x| x.idempotency_key == id)
        })
        .await;
        done.push(id);
    }
    // Let the last outcome be recorded before the pending event's rows follow.
    for _ in 0..100 {
        let (_, v) = gw.get(&format!("/v1/admin/events/{}", done[1])).await;
        if v["deliveries"][0]["state"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.set_default(Mode::status(503));
    let (s, b) = gw.post(&observation("13097248022", "pending-1")).await;
    assert_eq!(s, 202, "{b}");
    let pending = b["id"].as_str().expect("id").to_string();
    sink.wait_for(Duration::from_secs(10), "a failed attempt", |r| {
        r.iter().any(|x| x.idempotency_key == pending)
    })
    .await;
    gw.kill();
    assert_eq!(gw.audit_verify().0, 0, "intact before the sweep");

    let journal = open(&gw).await;
    // Retention zero: everything before now is old; only finished events may go.
    let report = retention::sweep_once(journal.as_ref(), Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(
        report.events, 2,
        "both delivered events deleted: {report:?}"
    );
    assert!(
        report.audit_rows >= 10,
        "their audit rows deleted: {report:?}"
    );
    let (anchor_seq, _) = report.anchor.clone().expect("anchored");
    for id in &done {
        assert!(
            journal.event(id).await.expect("read").is_none(),
            "{id} deleted"
        );
    }
    let kept = journal
        .event(&pending)
        .await
        .expect("read")
        .expect("pending kept");
    assert!(
        kept.audit.iter().any(|a| a.kind == "received"),
        "its trail is kept"
    );
    let notes = journal
        .audit_search(knutepunkt::journal::AuditQuery {
            outcome: Some("retention".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("search");
    assert_eq!(notes.len(), 1, "the sweep is audited");
    assert!(
        notes[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains(&format!("chain position {anchor_seq}")),
        "{notes:?}"
    );
    // A second sweep finds nothing more (the pending event blocks the rest).
    let again = retention::sweep_once(journal.as_ref(), Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(
        (again.events, again.anchor.is_none()),
        (0, true),
        "{again:?}"
    );
    drop(journal);

    let (code, text) = gw.audit_verify();
    assert_eq!(code, 0, "verify walks from the anchor: {text}");
    // Deleting the first row after the anchor is still detected.
    let first = anchor_seq + 1;
    assert_eq!(
        exec(&gw, &format!("DELETE FROM audit WHERE chain_seq = {first}")).await,
        1
    );
    let (code, text) = gw.audit_verify();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("chain position {first}")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_anchor_is_detected() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    for i in 0..2 {
        let (s, _) = gw
            .post(&observation("13097248022", &format!("f-{i}")))
            .await;
        assert_eq!(s, 202);
    }
    sink.wait_for(Duration::from_secs(10), "both delivered", |r| r.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.kill();
    let journal = open(&gw).await;
    let report = retention::sweep_once(journal.as_ref(), Duration::ZERO)
        .await
        .expect("sweep");
    assert!(report.anchor.is_some(), "{report:?}");
    drop(journal);
    assert_eq!(gw.audit_verify().0, 0);
    // Moving the anchor (to hide deleted rows) breaks the walk at the first remaining row.
    let changed = exec(
        &gw,
        "UPDATE audit_anchor SET hash = '1111111111111111111111111111111111111111111111111111111111111111' WHERE id = 1",
    )
    .await;
    assert_eq!(changed, 1);
    let (code, text) = gw.audit_verify();
    assert_eq!(code, 1, "{text}");
}
