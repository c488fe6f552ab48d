//! PostgreSQL goes away under load (an immediate shutdown, as in a crash) and comes back. While it
//! is away ingest answers 503 and never 202; afterwards the gateway recovers by itself; every event
//! that got a 202 is in the database and is delivered.
//!
//! The test runs its own throwaway cluster (initdb + pg_ctl from the installed PostgreSQL) so it
//! can stop and start it without disturbing anything else.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pg_cluster::Cluster;
use common::{Dest, Gateway, Mode, Sink, config_text, observation};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_while_the_database_is_away_and_recovers() {
    let cluster = Cluster::create();
    let sink = Sink::start(Mode::Ok).await;
    let cfg = format!(
        "{}\n[storage]\nkind = \"postgres\"\nurl = {:?}\nlease_s = 4\n",
        config_text(
            &[Dest::new("epj", &sink.url)],
            "[ingest]\nrequest_timeout_s = 3\n"
        ),
        cluster.url()
    );
    let gw = Gateway::start_with_config(tempfile::tempdir().expect("tempdir"), &cfg).await;

    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let accepted_while_down = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (base, accepted, refused, down, stop, awd) = (
            gw.base.clone(),
            Arc::clone(&accepted),
            Arc::clone(&refused),
            Arc::clone(&down),
            Arc::clone(&stop),
            Arc::clone(&accepted_while_down),
        );
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = observation(&format!("p{w}"), &format!("w{w}-{n}"));
                let was_down = down.load(Ordering::SeqCst);
                let resp = http
                    .post(format!("{base}/v1/vendors/fhir/events"))
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await;
                let still_down = down.load(Ordering::SeqCst);
                match resp {
                    Ok(r) if r.status() == 202 => {
                        let json: serde_json::Value = r.json().await.expect("json");
                        if was_down && still_down {
                            awd.fetch_add(1, Ordering::Relaxed);
                        }
                        accepted
                            .lock()
                            .await
                            .push(json["id"].as_str().expect("id").to_string());
                    }
                    Ok(r) => {
                        assert_eq!(r.status(), 503, "only 202 or 503 are expected");
                        assert!(
                            r.headers().contains_key("retry-after"),
                            "503 must carry Retry-After"
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("request failed without an answer: {e}"),
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = accepted.lock().await.len();
    assert!(before > 0, "no events accepted before the outage");
    cluster.crash();
    down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ready, _) = gw.get("/readyz").await;
    assert_eq!(ready, 503, "/readyz must report the journal unavailable");
    down.store(false, Ordering::SeqCst);
    cluster.start();

    // Recovers by itself: 202s again within a bounded time.
    let restarted = Instant::now();
    let during = accepted.lock().await.len();
    loop {
        if accepted.lock().await.len() > during + 20 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "ingest did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = restarted.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    assert_eq!(gw.get("/readyz").await.0, 200);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "no 503 while the database was away"
    );
    assert_eq!(
        accepted_while_down.load(Ordering::Relaxed),
        0,
        "a 202 was sent while the database was down"
    );

    // Every 202 is in the database...
    let accepted = accepted.lock().await.clone();
    let (client, conn) = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let rows = client
        .query("SELECT id FROM events WHERE id = ANY($1)", &[&accepted])
        .await
        .expect("query");
    assert_eq!(
        rows.len(),
        accepted.len(),
        "acknowledged events missing from the journal"
    );
    // ...and delivered.
    sink.wait_for(
        Duration::from_secs(30),
        "all acknowledged events delivered",
        |r| {
            let got: std::collections::HashSet<&str> =
                r.iter().map(|x| x.idempotency_key.as_str()).collect();
            accepted.iter().all(|id| got.contains(id.as_str()))
        },
    )
    .await;
    println!(
        "accepted {} events ({} before the outage), refused {} with 503, recovered {:.2} s after restart",
        accepted.len(),
        before,
        refused.load(Ordering::Relaxed),
        recovery.as_secs_f64()
    );
}
