//! Process-level behaviour: load shedding with 503 + Retry-After instead of unbounded queueing,
//! graceful shutdown on SIGTERM, and one process per embedded data directory.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Sink, observation};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_with_retry_after_and_nothing_acknowledged_is_lost() {
    let sink = Sink::start(Mode::Ok).await;
    // Two requests in flight at most: a burst of 200 concurrent requests must be shed.
    let gw = Gateway::start(
        &[Dest::new("epj", &sink.url)],
        "[ingest]\nmax_in_flight = 2\nretry_after_s = 3\n",
    )
    .await;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (http, base) = (http.clone(), gw.base.clone());
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(format!("{base}/v1/vendors/fhir/events"))
                .header("content-type", "application/fhir+json")
                .body(observation(&format!("p{}", i % 7), &format!("burst-{i}")).to_string())
                .send()
                .await
                .expect("answer");
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            (status, retry_after, body)
        }));
    }
    let mut accepted = Vec::new();
    let mut shed = 0;
    for t in tasks {
        let (status, retry_after, body) = t.await.expect("task");
        match status {
            202 => accepted.push(body["id"].as_str().expect("id").to_string()),
            503 => {
                shed += 1;
                assert_eq!(
                    retry_after.as_deref(),
                    Some("3"),
                    "503 must carry Retry-After"
                );
                assert_eq!(body["issue"][0]["code"], "throttled", "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    println!("accepted {}, shed {shed}", accepted.len());
    assert!(
        shed > 0,
        "a burst of 200 against max_in_flight = 2 must shed some requests"
    );
    assert!(!accepted.is_empty());
    let (_, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(
        stats["events"],
        accepted.len(),
        "stored exactly the acknowledged events: {stats}"
    );
    sink.wait_for(
        Duration::from_secs(20),
        "every accepted event delivered",
        |r| {
            accepted
                .iter()
                .all(|id| r.iter().any(|x| &x.idempotency_key == id))
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let sink = Sink::start(Mode::Ok).await;
    let mut gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let (s, _) = gw.post(&observation("p1", "term-1")).await;
    assert_eq!(s, 202);
    sink.wait_for(Duration::from_secs(10), "delivery", |r| !r.is_empty())
        .await;
    let pid = gw.pid().to_string();
    let started = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "clean exit code, got {status:?}");
    println!(
        "exited {:.2} s after SIGTERM",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    if common::on_postgres() {
        // Several nodes on one database is how PostgreSQL is meant to be used (tests/multinode.rs).
        return;
    }
    let gw = Gateway::start(&[], "").await;
    let out = Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["serve", "--config"])
        .arg(&gw.config)
        .stdout(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another knutepunkt process"),
        "{err}"
    );
    assert_eq!(
        gw.get("/healthz").await.0,
        200,
        "the first process is unaffected"
    );
}
