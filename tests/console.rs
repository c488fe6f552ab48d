//! The web console in a real browser: Debian's headless Chromium, driven by playwright-core
//! (`tests/browser/console.mjs`), against the real binary. A dead-lettered event is found on the
//! dead letters page, replayed with its button, and seen delivered on its event page; screenshots
//! of the main pages go to `target/console-screenshots/`.
//!
//! Needs `/usr/bin/chromium`, `node` and `tests/browser/node_modules` (install them with
//! `tests/browser/setup.sh`). Missing prerequisites FAIL this test; they never skip it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Dest, Gateway, Mode, Sink, alarm, observation, repo_path};
use serde_json::Value;

const PATIENT: &str = "console-patient-1";

fn require_prerequisites() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (Debian package `chromium`)"));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (Debian package `nodejs`)".into());
    }
    if !repo_path("tests/browser/node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules (npm ci in tests/browser)".into());
    }
    assert!(
        missing.is_empty(),
        "the console browser test needs: {}. Install them with `tests/browser/setup.sh`.",
        missing.join(", ")
    );
}

async fn wait_admin(gw: &Gateway, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = gw.get(path).await;
        if status == 200 && pred(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; last {path} -> {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn ingest(gw: &Gateway, body: &Value) -> String {
    let (status, resp) = gw.post(body).await;
    assert_eq!(status, 202, "ingest refused: {resp}");
    resp["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_replays_a_dead_letter_in_chromium() {
    require_prerequisites();

    // `epj` refuses the first request permanently (400: dead letter), then accepts everything.
    let epj = Sink::start(Mode::Ok).await;
    epj.script([Mode::status(400)]);
    // `archive` is down (503) and retries slowly, so the lanes page has pending lanes to show.
    let archive = Sink::start(Mode::status(503)).await;
    let mut archive_dest = Dest::new("archive", &archive.url);
    archive_dest.extra = archive_dest
        .extra
        .replace("retry.base_delay_ms = 50", "retry.base_delay_ms = 4000")
        .replace("retry.max_delay_ms = 400", "retry.max_delay_ms = 20000");
    let gw = Gateway::start(&[Dest::new("epj", &epj.url), archive_dest], "").await;

    let dead = ingest(&gw, &observation(PATIENT, "console-1")).await;
    wait_admin(
        &gw,
        "/v1/admin/dead-letters?destination=epj",
        "the first event dead-lettered at epj",
        |b| b["dead_letters"].as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    let ok1 = ingest(&gw, &alarm("console-patient-2", "dev-7", "console-2")).await;
    let ok2 = ingest(&gw, &observation("console-patient-3", "console-3")).await;
    epj.wait_for(Duration::from_secs(20), "two events delivered", |r| {
        let keys: Vec<&str> = r
            .iter()
            .filter(|r| r.mode.is_success())
            .map(|r| r.idempotency_key.as_str())
            .collect();
        keys.contains(&ok1.as_str()) && keys.contains(&ok2.as_str())
    })
    .await;
    assert!(
        !epj.delivered().iter().any(|r| r.idempotency_key == dead),
        "the dead-lettered event must not be delivered before the replay"
    );

    let shots = repo_path("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let (base, dir, id) = (gw.base.clone(), shots.clone(), dead.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(repo_path("tests/browser/console.mjs"))
            .arg(&base)
            .arg(&dir)
            .arg(&id)
            .env("CONSOLE_PATIENT_ID", PATIENT)
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "console.mjs exited with {}:\n{stdout}\n{stderr}",
        out.status
    );

    // The sink really received the replayed event, and the journal audited the replay.
    assert!(
        epj.delivered().iter().any(|r| r.idempotency_key == dead),
        "epj never received the replayed event {dead}"
    );
    let (_, ev) = gw.get(&format!("/v1/admin/events/{dead}")).await;
    let kinds: Vec<&str> = ev["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .filter(|a| a["destination"] == "epj")
        .filter_map(|a| a["kind"].as_str())
        .collect();
    let replayed = kinds
        .iter()
        .position(|k| *k == "replayed")
        .expect("replay audited");
    assert!(
        kinds[replayed..].contains(&"delivered"),
        "delivered after replay: {kinds:?}"
    );

    for name in ["overview.png", "lanes.png", "dead-letters.png", "event.png"] {
        let len = std::fs::metadata(shots.join(name))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {name} missing or empty");
    }
}

#[tokio::test]
async fn console_pages_are_html_and_escape_input() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(&[Dest::new("epj", &sink.url)], "").await;
    let http = reqwest::Client::new();
    for path in [
        "/console",
        "/console/lanes",
        "/console/dead-letters",
        "/console/events",
        "/console/quarantine",
    ] {
        let resp = http
            .get(format!("{}{path}", gw.base))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 200, "{path}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        assert!(resp.headers().contains_key("content-security-policy"));
    }
    // A hostile id is shown escaped on the not-found page, and the notice too.
    let resp = http
        .get(format!(
            "{}/console/events/%3Cscript%3Ex%3C%2Fscript%3E",
            gw.base
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 404);
    let body = resp.text().await.expect("body");
    assert!(!body.contains("<script>x"), "{body}");
    assert!(body.contains("&lt;script&gt;x&lt;/script&gt;"), "{body}");
    let body = http
        .get(format!(
            "{}/console/dead-letters?notice=%3Cimg%20src%3Dx%3E",
            gw.base
        ))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(!body.contains("<img src=x>"));
    assert!(body.contains("&lt;img src=x&gt;"));
    // Replay of nothing redirects back with a notice; a cross-site form is refused.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = no_redirect
        .post(format!("{}/console/dead-letters/replay", gw.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("destination=epj&vendor=&limit=5")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 303);
    let loc = resp.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with("/console/dead-letters?destination=epj&notice=Nothing"),
        "{loc}"
    );
    let resp = no_redirect
        .post(format!("{}/console/dead-letters/1/replay", gw.base))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 403);
}
