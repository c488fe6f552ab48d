//! Logs never carry national identity numbers or names: the real binary runs with JSON logs at
//! debug level, ingests events with synthetic identity numbers and a patient name, and is made
//! to log refusals (a bad code that quotes the number, a bad check digit) and a dead letter whose
//! reason quotes the destination's answer (which echoes the number and the name). Every line of
//! its stderr must be JSON, the ingest lines must carry the vendor's trace id, and no line may
//! contain an 11-digit identity number or the name.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Dest, Mode, Sink, config_text, storage_section};
use serde_json::{Value, json};

/// Synthetic test numbers (month + 40), valid check digits, accepted for test tenant 5001.
const NIN: &str = "13497248005";
const NIN2: &str = "13497248196";
const NAME: &str = "Kari Nordmann";

fn upload(id: &str, nin: &str, metric: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    json!({
        "uploadId": id,
        "municipality": "5001",
        "patient": { "nin": nin, "name": NAME },
        "readings": [{
            "deviceId": "d-1", "deviceModel": "BP", "metric": metric,
            "value_1": "72", "unit": "bpm", "timestamp": now.to_string()
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_trace_ids_and_no_identity_numbers_or_names() {
    // The destination refuses permanently and echoes the patient in its answer.
    let echo = format!(
        r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"invalid","diagnostics":"unknown patient {NIN} / {} {}","name":"{NAME}"}}]}}"#,
        &NIN2[..6],
        &NIN2[6..]
    );
    let sink = Sink::start(Mode::Status {
        code: 400,
        retry_after: None,
        body: echo,
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = storage_section(dir.path()).await;
    let cfg = format!(
        "{}\n{storage}",
        config_text(&[Dest::new("epj", &sink.url)], "[log]\nformat = \"json\"\n")
    );
    let path = dir.path().join("knutepunkt.toml");
    std::fs::write(&path, cfg).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("KNUTEPUNKT_LOG", "debug")
        .env_remove("KNUTEPUNKT_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    let addr = first
        .strip_prefix("knutepunkt listening on ")
        .unwrap_or_else(|| panic!("unexpected: {first}"))
        .to_string();
    let mut stderr = child.stderr.take().expect("stderr");
    let captured = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let http = reqwest::Client::new();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let post = |body: Value| {
        http.post(format!("http://{addr}/v1/vendors/homemeasure/events"))
            .header("content-type", "application/json")
            .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
            .body(body.to_string())
            .send()
    };
    // Stored, then dead-lettered by the destination's 400.
    let r = post(upload("u-ok", NIN, "pulse")).await.expect("post");
    assert_eq!(r.status().as_u16(), 202);
    // Refused: the unknown code is the identity number itself (the error quotes the value).
    let r = post(upload("u-bad-code", NIN, NIN)).await.expect("post");
    assert_eq!(r.status().as_u16(), 422);
    // Refused: bad check digit.
    let bad = format!("{}{}", &NIN[..10], (NIN.as_bytes()[10] - b'0' + 1) % 10);
    let r = post(upload("u-bad-nin", &bad, "pulse"))
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 422);
    sink.wait_for(Duration::from_secs(10), "the refused delivery", |r| {
        !r.is_empty()
    })
    .await;
    // Let the dead letter be logged, then stop the gateway so stderr closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(child.id());
    let _ = child.wait();
    let log = captured.join().expect("stderr reader");

    assert!(
        log.lines().count() > 5,
        "debug logging produced lines:\n{log}"
    );
    let mut traced = 0;
    let mut saw_dead_letter = false;
    let mut saw_refusal = false;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["trace_id"] == trace_id {
            traced += 1;
            assert_eq!(v["span_id"].as_str().map(str::len), Some(16), "{line}");
        }
        let msg = v["message"].as_str().unwrap_or("");
        if msg == "dead-lettered" {
            saw_dead_letter = true;
            assert_eq!(
                v["trace_id"], trace_id,
                "the attempt's log line is in the event's trace"
            );
            assert_eq!(v["attempt"], 1, "numbers stay numbers: {line}");
        }
        saw_refusal |= msg == "ingest refused";
        assert!(
            !knutepunkt::telemetry::redact::contains_identity_number(line),
            "identity number in a log line: {line}"
        );
        for n in [NIN, NIN2, &bad] {
            assert!(!line.contains(n), "identity number {n} in: {line}");
        }
        assert!(!line.contains("Nordmann"), "patient name in: {line}");
    }
    assert!(saw_dead_letter, "the dead letter was logged:\n{log}");
    assert!(saw_refusal, "the refusals were logged:\n{log}");
    assert!(
        traced >= 3,
        "ingest log lines carry the vendor's trace id:\n{log}"
    );
}

/// SIGTERM through the `kill` command (no libc dependency in the tests).
fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
