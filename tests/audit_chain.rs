//! The hash-chained audit trail: `knutepunkt audit verify` over the real binary, on the store the
//! suite runs on (SQLite, or PostgreSQL with `KNUTEPUNKT_TEST_STORAGE=postgres`). An untampered
//! chain verifies; editing one row's field or deleting one row is reported at exactly that row.

mod common;

use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Sink, observation};
use tokio::task::JoinSet;

/// Direct access to the gateway's store, as someone tampering with it would have.
enum Store {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Store {
    async fn open(gw: &Gateway) -> Store {
        if common::on_postgres() {
            let cfg = std::fs::read_to_string(&gw.config).expect("config");
            // The storage section comes last (after the destinations' urls).
            let line = cfg
                .lines()
                .rfind(|l| l.starts_with("url = "))
                .expect("url line");
            let url: String = toml::from_str::<toml::Value>(line).expect("toml")["url"]
                .as_str()
                .expect("url")
                .to_string();
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            Store::Postgres(client)
        } else {
            let path = gw.dir.path().join("data").join("journal.sqlite3");
            Store::Sqlite(rusqlite::Connection::open(path).expect("open sqlite"))
        }
    }

    async fn exec(&self, sql: &str) -> u64 {
        match self {
            Store::Sqlite(c) => c.execute(sql, []).expect(sql) as u64,
            Store::Postgres(c) => c.execute(sql, &[]).await.expect(sql),
        }
    }

    /// (id, chain position) of audit rows, in chain order.
    async fn chain(&self) -> Vec<(i64, i64)> {
        let sql = "SELECT id, chain_seq FROM audit WHERE chain_seq > 0 ORDER BY chain_seq";
        match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(sql).expect("prepare");
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .expect("query")
                    .map(|r| r.expect("row"))
                    .collect()
            }
            Store::Postgres(c) => c
                .query(sql, &[])
                .await
                .expect("query")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }
}

async fn run_events(gw: &Gateway, n: usize) {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/vendors/fhir/events", gw.base);
    let mut set = JoinSet::new();
    for i in 0..n {
        let http = http.clone();
        let url = url.clone();
        set.spawn(async move {
            let body = observation(&format!("1234567890{}", i % 10), &format!("audit-{i}"));
            let resp = http
                .post(&url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .expect("post");
            assert_eq!(resp.status().as_u16(), 202);
        });
        if set.len() >= 16 {
            set.join_next().await.expect("task").expect("join");
        }
    }
    while let Some(r) = set.join_next().await {
        r.expect("join");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = gw.get("/v1/admin/stats").await;
        if stats["delivered"].as_i64() == Some(n as i64) {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_verify_finds_exactly_the_tampered_row() {
    let sink = Sink::start(Mode::Ok).await;
    // Failures too, so the trail holds retries and a dead letter, not only the happy path.
    sink.script([Mode::status(503), Mode::status(400)]);
    let mut gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    // Concurrent ingest: many commands per batch (and, on PostgreSQL, several writers).
    let n = 60;
    run_events_allowing_dead(&gw, n).await;

    // The gateway keeps running while the chain is verified (read-only), then stops.
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: audit chain intact"), "{out}");
    gw.kill();

    let store = Store::open(&gw).await;
    let chain = store.chain().await;
    assert!(chain.len() > 4 * n, "{} audit rows", chain.len());
    assert_eq!(
        chain.last().expect("rows").1,
        chain.len() as i64,
        "gapless positions"
    );
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{} row(s)", chain.len())),
        "verify walks every row: {out}"
    );

    // Edit one field of one row in the middle.
    let (edited_id, edited_seq) = chain[chain.len() / 2];
    assert_eq!(
        store
            .exec(&format!(
                "UPDATE audit SET at = at + 1 WHERE id = {edited_id}"
            ))
            .await,
        1
    );
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "audit row id {edited_id} (chain position {edited_seq})"
        )),
        "{out}"
    );
    assert!(out.contains("edited"), "{out}");
    // Undo: intact again.
    store
        .exec(&format!(
            "UPDATE audit SET at = at - 1 WHERE id = {edited_id}"
        ))
        .await;
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 0, "{out}");

    // Delete the newest row: PostgreSQL's chain head row says where the chain must end; SQLite
    // has no head row (a truncated tail is found only against a head recorded elsewhere).
    let (last_id, last_seq) = *chain.last().expect("rows");
    store
        .exec(&format!("DELETE FROM audit WHERE id = {last_id}"))
        .await;
    let (code, out) = gw.audit_verify();
    if common::on_postgres() {
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("chain ends at position {}", last_seq - 1)),
            "{out}"
        );
    } else {
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("head position {}", last_seq - 1)),
            "{out}"
        );
    }

    // Delete one row: reported at the row after it, naming the missing position.
    let (deleted_id, deleted_seq) = chain[chain.len() / 3];
    let (next_id, next_seq) = chain[chain.len() / 3 + 1];
    assert_eq!(
        store
            .exec(&format!("DELETE FROM audit WHERE id = {deleted_id}"))
            .await,
        1
    );
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "audit row id {next_id} (chain position {next_seq})"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("chain position {deleted_seq} not found")),
        "{out}"
    );

    // A row forged outside the writer (no chain position) is reported too.
    let (code, _) = {
        store.exec("DELETE FROM audit").await;
        store
            .exec("INSERT INTO audit (at, event_id, kind) VALUES (1, 'forged', 'received')")
            .await;
        gw.audit_verify()
    };
    assert_eq!(code, 1);
}

/// Like `run_events`, but the sink's scripted 400 dead-letters one event.
async fn run_events_allowing_dead(gw: &Gateway, n: usize) {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/vendors/fhir/events", gw.base);
    let mut set = JoinSet::new();
    for i in 0..n {
        let http = http.clone();
        let url = url.clone();
        set.spawn(async move {
            let body = observation(&format!("1234567890{}", i % 10), &format!("audit-{i}"));
            let resp = http
                .post(&url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .expect("post");
            assert_eq!(resp.status().as_u16(), 202);
        });
        if set.len() >= 16 {
            set.join_next().await.expect("task").expect("join");
        }
    }
    while let Some(r) = set.join_next().await {
        r.expect("join");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = gw.get("/v1/admin/stats").await;
        let done = stats["delivered"].as_i64().unwrap_or(0) + stats["dead"].as_i64().unwrap_or(0);
        if done == n as i64 && stats["pending"].as_i64() == Some(0) {
            assert_eq!(stats["dead"].as_i64(), Some(1), "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "not all finished: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untampered_chain_verifies_after_restart() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    run_events(&gw, 10).await;
    // After a restart the chain continues from the stored head.
    gw.restart();
    let (status, resp) = gw.post(&observation("12345678901", "after-restart")).await;
    assert_eq!(status, 202, "{resp}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.kill();
    let (code, out) = gw.audit_verify();
    assert_eq!(code, 0, "{out}");
}

/// PostgreSQL only: three nodes (each with several writer connections) append audit rows at the
/// same time; the chain stays one gapless, verifiable sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_writing_concurrently_keep_one_chain() {
    if !common::on_postgres() {
        return;
    }
    let sink = Sink::start(Mode::Ok).await;
    let url = common::fresh_database().await;
    let cfg = format!(
        "{}\n[storage]\nkind = \"postgres\"\nurl = {url:?}\nlease_s = 4\n",
        common::config_text(&[Dest::new("epj", &sink.url)], "")
    );
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Gateway::start_with_config(tempfile::tempdir().expect("tempdir"), &cfg).await);
    }
    let n = 40;
    let mut set = JoinSet::new();
    for (k, gw) in nodes.iter().enumerate() {
        let base = gw.base.clone();
        set.spawn(async move {
            let http = reqwest::Client::new();
            let mut inner = JoinSet::new();
            for i in 0..n {
                let http = http.clone();
                let url = format!("{base}/v1/vendors/fhir/events");
                inner.spawn(async move {
                    let body = observation(&format!("1234567890{}", i % 10), &format!("n{k}-{i}"));
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                        .await
                        .expect("post");
                    assert_eq!(resp.status().as_u16(), 202);
                });
            }
            while let Some(r) = inner.join_next().await {
                r.expect("join");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("join");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = nodes[0].get("/v1/admin/stats").await;
        if stats["delivered"].as_i64() == Some(3 * n as i64) {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Verified while the nodes still run (one snapshot), then again after they stop.
    let (code, out) = nodes[1].audit_verify();
    assert_eq!(code, 0, "{out}");
    for gw in &mut nodes {
        gw.kill();
    }
    let (code, out) = nodes[2].audit_verify();
    assert_eq!(code, 0, "{out}");
    let store = Store::open(&nodes[0]).await;
    let chain = store.chain().await;
    assert!(chain.len() >= 3 * n * 4, "{} rows", chain.len());
    assert!(out.contains(&format!("{} row(s)", chain.len())), "{out}");
}
