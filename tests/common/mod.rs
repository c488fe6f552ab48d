//! Shared test harness: a real HTTP destination on loopback that can be told to misbehave, and the
//! real `knutepunkt` binary run as a child process with a generated config.
#![allow(dead_code)]

pub mod pg_cluster;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the sink answers a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 with an empty body.
    Ok,
    /// This status, with `Retry-After: secs` when given, and this body.
    Status {
        code: u16,
        retry_after: Option<u64>,
        body: String,
    },
    /// Read the request and never answer (until the client gives up).
    Hang,
    /// Read the request and reset the connection (RST) without answering.
    Reset,
    /// Wait this many milliseconds, then answer 200 with an empty body (a slow but healthy receiver).
    Delay(u64),
}

impl Mode {
    pub fn status(code: u16) -> Self {
        Mode::Status {
            code,
            retry_after: None,
            body: String::new(),
        }
    }

    /// Whether the sink answers this mode with a 2xx.
    pub fn is_success(&self) -> bool {
        match self {
            Mode::Ok | Mode::Delay(_) => true,
            Mode::Status { code, .. } => (200..300).contains(code),
            Mode::Hang | Mode::Reset => false,
        }
    }
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub idempotency_key: String,
    pub attempt: u32,
    pub content_type: String,
    pub body: Value,
    /// The W3C `traceparent` header ("" when absent).
    pub traceparent: String,
    /// What the sink answered with.
    pub mode: Mode,
}

#[derive(Default)]
struct SinkState {
    default: Option<Mode>,
    script: VecDeque<Mode>,
    received: Vec<Received>,
    /// Per event id (Idempotency-Key): modes to use for that event first.
    per_event: std::collections::HashMap<String, VecDeque<Mode>>,
}

/// A scriptable HTTP/1.1 destination on 127.0.0.1.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    /// Starts a sink on an ephemeral loopback port, answering `default` unless scripted otherwise.
    pub async fn start(default: Mode) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(SinkState {
            default: Some(default),
            ..Default::default()
        }));
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let _ = serve_conn(sock, st).await;
                });
            }
        });
        Sink {
            url: format!("http://{addr}/fhir"),
            state,
        }
    }

    /// Answers for all requests from now on (after any scripted ones).
    pub fn set_default(&self, mode: Mode) {
        self.state.lock().expect("lock").default = Some(mode);
    }

    /// The next requests get these answers, in order, before the default applies again.
    pub fn script(&self, modes: impl IntoIterator<Item = Mode>) {
        self.state.lock().expect("lock").script.extend(modes);
    }

    /// Requests carrying this event id get these answers first.
    pub fn script_event(&self, event_id: &str, modes: impl IntoIterator<Item = Mode>) {
        self.state
            .lock()
            .expect("lock")
            .per_event
            .entry(event_id.to_string())
            .or_default()
            .extend(modes);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("lock").received.clone()
    }

    /// Requests that were answered 2xx.
    pub fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.mode.is_success())
            .collect()
    }

    /// Waits until `pred` holds for the received list, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.received()) {
                return;
            }
            if Instant::now() > deadline {
                let n = self.received().len();
                panic!("timed out after {timeout:?} waiting for: {what} ({n} requests received)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve_conn(mut sock: TcpStream, state: Arc<Mutex<SinkState>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Read headers.
        let header_end = loop {
            if let Some(pos) = find(&buf, b"\r\n\r\n") {
                break pos + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        while buf.len() < header_end + len {
            let mut chunk = [0u8; 65536];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Value =
            serde_json::from_slice(&buf[header_end..header_end + len]).unwrap_or(Value::Null);
        buf.drain(..header_end + len);
        let key = header("idempotency-key");
        let mode = {
            let mut st = state.lock().expect("lock");
            let scripted = st.per_event.get_mut(&key).and_then(VecDeque::pop_front);
            let mode = scripted
                .or_else(|| st.script.pop_front())
                .or_else(|| st.default.clone())
                .unwrap_or(Mode::Ok);
            st.received.push(Received {
                at: Instant::now(),
                idempotency_key: key.clone(),
                attempt: header("x-knutepunkt-attempt").parse().unwrap_or(0),
                content_type: header("content-type"),
                body,
                traceparent: header("traceparent"),
                mode: mode.clone(),
            });
            mode
        };
        match mode {
            Mode::Ok => {
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            }
            Mode::Delay(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            }
            Mode::Status {
                code,
                retry_after,
                body,
            } => {
                let ra = retry_after
                    .map(|s| format!("retry-after: {s}\r\n"))
                    .unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 {code} X\r\n{ra}content-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await?;
            }
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
            Mode::Reset => {
                sock.set_zero_linger()?;
                return Ok(());
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Which backend the suite runs on: `KNUTEPUNKT_TEST_STORAGE=postgres` runs the same tests on
/// PostgreSQL (server from `KNUTEPUNKT_TEST_PG`, default the local one), else the embedded store.
pub fn on_postgres() -> bool {
    std::env::var("KNUTEPUNKT_TEST_STORAGE").is_ok_and(|v| v == "postgres")
}

/// libpq-style connection settings of the test server, without a database name.
pub fn pg_server() -> String {
    std::env::var("KNUTEPUNKT_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

/// Creates an empty database on the test server and returns its connection string.
pub async fn fresh_database() -> String {
    let (client, conn) = tokio_postgres::connect(
        &format!("{} dbname=test", pg_server()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect to the test PostgreSQL server (is it running? see scripts/test.sh)");
    tokio::spawn(conn);
    let name = format!("kp_t_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    format!("{} dbname={name}", pg_server())
}

/// The `[storage]` section for a generated config: a data dir under `dir`, or a fresh database.
pub async fn storage_section(dir: &Path) -> String {
    if on_postgres() {
        // Short leases so takeover after a SIGKILL is quick; must exceed destination timeouts.
        let url = fresh_database().await;
        format!("[storage]\nkind = \"postgres\"\nurl = {url:?}\nlease_s = 4\n")
    } else {
        format!(
            "[storage]\ndata_dir = {:?}\n",
            dir.join("data").display().to_string()
        )
    }
}

/// A destination entry for the generated config.
pub struct Dest {
    pub name: String,
    pub url: String,
    /// Extra TOML lines inside `[[destination]]`, e.g. `timeout_ms = 500`.
    pub extra: String,
}

impl Dest {
    pub fn new(name: &str, url: &str) -> Self {
        Dest {
            name: name.into(),
            url: url.into(),
            extra: "retry.base_delay_ms = 50\nretry.max_delay_ms = 400\ntimeout_ms = 2000\n".into(),
        }
    }
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
}

/// The real gateway binary, run as a child process on an ephemeral port.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub base: String,
    child: Option<Child>,
    http: reqwest::Client,
    /// stdout lines after the "listening on" line (e.g. the vendor port line with `[tls]`).
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// Log lines of this gateway that held an 11-digit identity number (checked on drop).
    leaks: Arc<Mutex<Vec<String>>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Config text routing every event to every destination (one route per destination).
pub fn config_text(dests: &[Dest], extra: &str) -> String {
    let mut cfg = String::new();
    cfg.push_str(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 1\n[mappings]\ndir = {:?}\n{extra}\n",
        repo_path("mappings").display().to_string()
    ));
    for d in dests {
        cfg.push_str(&format!(
            "[[destination]]\nname = {:?}\nurl = {:?}\n{}\n",
            d.name, d.url, d.extra
        ));
    }
    for d in dests {
        cfg.push_str(&format!(
            "[[route]]\nname = \"to-{}\"\ndestinations = [{:?}]\n",
            d.name, d.name
        ));
    }
    cfg
}

impl Gateway {
    /// Runs `knutepunkt audit verify` on this gateway's config; (exit code, stdout + stderr).
    pub fn audit_verify(&self) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
            .args(["audit", "verify", "--config"])
            .arg(&self.config)
            .output()
            .expect("run audit verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Writes the config (data dir inside a fresh temp dir) and starts the gateway.
    pub async fn start(dests: &[Dest], extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = storage_section(dir.path()).await;
        let cfg = format!("{}\n{storage}", config_text(dests, extra));
        Self::start_with_config(dir, &cfg).await
    }

    pub async fn start_with_config(dir: tempfile::TempDir, cfg: &str) -> Gateway {
        let config = dir.path().join("knutepunkt.toml");
        std::fs::write(&config, cfg).expect("write config");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let mut gw = Gateway {
            dir,
            config,
            base: String::new(),
            child: None,
            http,
            stdout: Arc::default(),
            leaks: Arc::default(),
            log_reader: None,
        };
        gw.spawn();
        gw
    }

    /// Starts the process and waits for its "listening on" line.
    pub fn spawn(&mut self) {
        self.stdout.lock().expect("lock").clear();
        let mut child = Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("KNUTEPUNKT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn knutepunkt");
        // Pass the log through to the test's stderr, noting any line with an identity number:
        // every gateway of the suite is checked for leaks when it is dropped.
        let stderr = child.stderr.take().expect("stderr");
        let leaks = Arc::clone(&self.leaks);
        self.log_reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if knutepunkt::telemetry::redact::contains_identity_number(&line) {
                    leaks.lock().expect("lock").push(line);
                }
            }
        }));
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .expect("gateway printed nothing")
            .expect("read stdout");
        let addr = line
            .strip_prefix("knutepunkt listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line}"));
        self.base = format!("http://{addr}");
        // Keep draining stdout so the child never blocks on a full pipe.
        let keep = Arc::clone(&self.stdout);
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                keep.lock().expect("lock").push(l);
            }
        });
        self.child = Some(child);
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest of it.
    pub fn stdout_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stdout
                .lock()
                .expect("lock")
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(String::from));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The pipe closed with the process: the reader has seen every line.
        if let Some(r) = self.log_reader.take() {
            let _ = r.join();
        }
    }

    /// Waits for the process to exit by itself; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL then start again on a new port with the same data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Resident memory of the gateway process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// POSTs a FHIR JSON body as vendor `fhir`; returns status and JSON body.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        self.post_as("fhir", body, &[]).await
    }

    pub async fn post_as(
        &self,
        vendor: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/vendors/{vendor}/events", self.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let json = resp.json::<Value>().await.unwrap_or(Value::Null);
                (status, json)
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_admin(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .send()
            .await
            .expect("post");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        let leaks = self.leaks.lock().map(|l| l.clone()).unwrap_or_default();
        if !leaks.is_empty() && !std::thread::panicking() {
            panic!(
                "the gateway logged {} line(s) with an 11-digit identity number, e.g.: {}",
                leaks.len(),
                leaks[0]
            );
        }
    }
}

/// A measurement for `patient` with a vendor id, so each call is a distinct vendor event.
pub fn observation(patient: &str, vendor_id: &str) -> Value {
    serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{ "system": "urn:test", "value": vendor_id }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "identifier": { "system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": patient } },
        "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" }
    })
}

/// An alarm (DetectedIssue) raised by `device` for `patient`.
pub fn alarm(patient: &str, device: &str, vendor_id: &str) -> Value {
    serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "identifier": { "system": "urn:test", "value": vendor_id },
        "entry": [{ "resource": {
            "resourceType": "DetectedIssue",
            "status": "final",
            "severity": "high",
            "patient": { "identifier": { "value": patient } },
            "author": { "identifier": { "value": device } }
        }}]
    })
}

/// The value of one sample on `/metrics`: the first series of metric `name` whose line contains
/// `label` (e.g. `destination="rc"`; `""` for any).
pub async fn metric_value(gw: &Gateway, name: &str, label: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Posts a SCAIP manual alarm from controller `cid` as vendor `scaip` (keyed `device:{cid}` when
/// the device is not assigned); asserts 202 and returns the event id.
pub async fn scaip_alarm(gw: &Gateway, cid: &str, reference: &str) -> String {
    let xml = format!(
        "<mrq><ref>{reference}</ref><mty>ME</mty><cid>{cid}</cid><dty>0004</dty><stc>0010</stc></mrq>"
    );
    let resp = post_scaip(gw, xml).await;
    assert_eq!(resp.status().as_u16(), 202);
    let v: Value = resp.json().await.expect("json");
    v["id"].as_str().expect("id").to_string()
}

/// Posts a SCAIP XML message as vendor `scaip`.
pub async fn post_scaip(gw: &Gateway, xml: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/vendors/scaip/events", gw.base))
        .header("content-type", "application/scaip+xml")
        .body(xml)
        .send()
        .await
        .expect("post")
}

/// Stored with every event built by [`journal_event`]; tasks must carry it back.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An event for the journal API directly (no HTTP, no mapping): a minimal FHIR Bundle with id
/// `id`, keyed by `key`, of the alarm or measurement category, routed to `dests`.
pub fn journal_event(
    vendor: &str,
    id: &str,
    vendor_id: &str,
    key: &str,
    alarm: bool,
    dests: &[&str],
) -> knutepunkt::journal::NewEvent {
    use knutepunkt::normalise::{Category, Envelope, Priority};
    knutepunkt::journal::NewEvent {
        envelope: Envelope {
            id: id.to_string(),
            vendor: vendor.into(),
            vendor_event_id: Some(vendor_id.to_string()),
            category: if alarm {
                Category::Alarm
            } else {
                Category::Measurement
            },
            priority: Priority::Normal,
            tenant: None,
            key: key.to_string(),
            mapping_version: "1".into(),
            fhir: format!(r#"{{"resourceType":"Bundle","id":"{id}"}}"#),
        },
        raw: b"{}".to_vec(),
        content_type: "application/fhir+json".into(),
        idempotency_key: None,
        received_at_ms: knutepunkt::clock::now_ms(),
        destinations: dests.iter().map(|d| d.to_string()).collect(),
        routes: vec!["r".into()],
        traceparent: Some(TRACEPARENT.into()),
    }
}
