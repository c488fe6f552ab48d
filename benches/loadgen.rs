//! `knutepunkt-bench`: drives the release gateway binary over loopback with a load generator and a
//! sink in this process, and prints sustained throughput and latency figures. See BENCHMARKS.md.
//!
//! Phase 1 (closed loop): C keep-alive connections post FHIR Observations over K patient keys for
//! D seconds, each waiting for its 202 before the next post. Measures durable ingest events/s,
//! ingest latency, and end-to-end delivered events/s (sink arrivals, from the first send until
//! every acknowledged event has arrived).
//!
//! Phase 2 (open loop): background Observations at half the phase-1 end-to-end rate, sent on a
//! fixed schedule, plus one alarm (a DetectedIssue Bundle) every ~20 ms. Measures the alarm
//! ingest-to-delivery latency: from just before the generator writes the alarm POST to when the
//! sink has the whole delivery (same process, same monotonic clock).
//!
//! The generator uses a minimal HTTP/1.1 keep-alive client written here (not reqwest) so that as
//! little of the shared 2-core budget as possible goes to the generator; the sink is a minimal
//! HTTP/1.1 keep-alive server, for the same reason.
//! The two run on separate runtimes with named threads so their CPU use can be told apart.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The allocator the gateway uses, so the generator and sink cost what a lean client and server
/// would.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest one ingest request may take before the generator counts it as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A background send later than this behind its schedule counts as late.
const LATE: Duration = Duration::from_millis(5);
/// Sink map room reserved per second of phase 1: above any closed-loop rate seen on two cores.
const PHASE1_ROOM_PER_S: usize = 50_000;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "knutepunkt-bench",
    about = "Loopback benchmark of the knutepunkt release binary: durable ingest, end-to-end delivery and alarm latency"
)]
struct Args {
    /// The gateway binary to run (build it with `cargo build --release --bins`).
    #[arg(long, default_value = "target/release/knutepunkt")]
    gateway: PathBuf,
    /// Mappings directory for the gateway config.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/mappings"))]
    mappings: PathBuf,
    /// Phase 1: concurrent keep-alive connections (closed loop).
    #[arg(short = 'c', long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load in each phase.
    #[arg(short = 'd', long, default_value_t = 10)]
    duration_s: u64,
    /// Distinct ordering keys (patients) the measurements are spread over.
    #[arg(short = 'k', long, default_value_t = 1000)]
    keys: usize,
    /// Phase 2: one alarm every this many milliseconds.
    #[arg(long, default_value_t = 20)]
    alarm_interval_ms: u64,
    /// Phase 2 background rate in events/s (default: half the phase-1 end-to-end rate; 0 skips phase 2).
    #[arg(long)]
    bg_rate: Option<f64>,
    /// Skip phase 1 (needs --bg-rate).
    #[arg(long)]
    skip_phase1: bool,
    /// Phase 2: connections that carry the background load.
    #[arg(long, default_value_t = 64)]
    bg_connections: usize,
    /// Destination `concurrency` (measurement lanes delivered at once).
    #[arg(long, default_value_t = 256)]
    dest_concurrency: usize,
    /// Destination `alarm_concurrency`.
    #[arg(long, default_value_t = 16)]
    alarm_concurrency: usize,
    /// Gateway `storage.max_batch`.
    #[arg(long, default_value_t = 512)]
    max_batch: usize,
    /// Gateway `storage.queue_capacity`.
    #[arg(long, default_value_t = 8192)]
    queue_capacity: usize,
    /// Seconds to wait, after a phase's load, for every acknowledged event to reach the sink.
    #[arg(long, default_value_t = 120)]
    drain_timeout_s: u64,
    /// Worker threads of the generator runtime.
    #[arg(long, default_value_t = 1)]
    gen_threads: usize,
    /// Worker threads of the sink runtime.
    #[arg(long, default_value_t = 1)]
    sink_threads: usize,
    /// Keep the temp dir (config, journal, gateway stderr) for inspection.
    #[arg(long)]
    keep_dir: bool,
    /// Run on PostgreSQL instead of the embedded journal: libpq settings of a server without a
    /// database name (e.g. "host=127.0.0.1 user=postgres"). A fresh database is created for the
    /// run and dropped afterwards.
    #[arg(long)]
    pg_server: Option<String>,
    /// Gateway processes sharing the database (needs --pg-server); connections are spread over
    /// them round-robin.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Gateway `storage.writers` (PostgreSQL only).
    #[arg(long, default_value_t = 1)]
    pg_writers: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("knutepunkt-bench: verification failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("knutepunkt-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sink

/// Records the first arrival time of every Idempotency-Key.
#[derive(Default)]
struct Sink {
    arrivals: Mutex<HashMap<String, Instant>>,
    requests: AtomicU64,
    distinct: AtomicU64,
    duplicates: AtomicU64,
    /// No Idempotency-Key, or a body that does not carry it (Bundle.id must be the event id).
    malformed: AtomicU64,
}

impl Sink {
    /// Makes room for `more` arrivals before a phase starts: growing a map of a few hundred
    /// thousand keys under the lock stalls every sink connection for tens of milliseconds, and
    /// the bench would charge that stall to the gateway's delivery latency.
    fn reserve(&self, more: usize) {
        self.arrivals.lock().expect("sink lock").reserve(more);
    }

    fn arrival(&self, id: &str) -> Option<Instant> {
        self.arrivals.lock().expect("sink lock").get(id).copied()
    }

    /// Records one delivery that arrived at `at`; returns the status to answer.
    fn record(&self, at: Instant, key: Option<&str>, body: &[u8]) -> u16 {
        self.requests.fetch_add(1, Relaxed);
        let Some(key) = key else {
            self.malformed.fetch_add(1, Relaxed);
            return 400;
        };
        if find(body, key.as_bytes()).is_none() {
            self.malformed.fetch_add(1, Relaxed);
        }
        let fresh = {
            let mut map = self.arrivals.lock().expect("sink lock");
            match map.entry(key.to_owned()) {
                Entry::Vacant(e) => {
                    e.insert(at);
                    true
                }
                Entry::Occupied(_) => false,
            }
        };
        if fresh {
            self.distinct.fetch_add(1, Relaxed);
        } else {
            self.duplicates.fetch_add(1, Relaxed);
        }
        200
    }
}

/// The sink's HTTP/1.1 server: keep-alive, `Content-Length` bodies only (what the gateway's
/// client sends). Written here rather than on axum for the same reason as the generator's
/// client: the sink shares the 2-core budget with the gateway. Anything it does not understand
/// (a chunked body, a bad head) is answered 400 and counted as malformed, so the bench fails
/// loudly instead of mismeasuring.
fn start_sink(rt: &tokio::runtime::Runtime) -> Result<(Arc<Sink>, SocketAddr)> {
    let sink = Arc::new(Sink::default());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("bind sink")?;
    let addr = listener.local_addr()?;
    let shared = Arc::clone(&sink);
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_sink_conn(Arc::clone(&shared), stream));
                }
                Err(e) => {
                    // E.g. out of file descriptors: say so, and do not spin on it.
                    eprintln!("sink accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok((sink, addr))
}

async fn serve_sink_conn(sink: Arc<Sink>, stream: TcpStream) {
    let Ok(mut conn) = Conn::on(stream) else {
        return;
    };
    loop {
        let head = match conn.read_head().await {
            Ok(end) => SinkHead::parse(&conn.buf[..end]).map(|h| (end, h)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(e.to_string()),
            // The gateway closed the connection.
            Err(_) => return,
        };
        let (head_end, head) = match head {
            Ok(h) => h,
            Err(why) => {
                sink.requests.fetch_add(1, Relaxed);
                sink.malformed.fetch_add(1, Relaxed);
                eprintln!("sink: malformed request: {why}");
                let _ = conn.stream.write_all(SINK_BAD_REQUEST).await;
                return;
            }
        };
        let total = head_end + 4 + head.content_length;
        if conn.read_to(total).await.is_err() {
            return;
        }
        let at = Instant::now();
        let key = head.idempotency_key.as_deref();
        let status = sink.record(at, key, &conn.buf[head_end + 4..total]);
        conn.buf.drain(..total);
        let answer = if status == 200 {
            SINK_OK
        } else {
            SINK_BAD_REQUEST
        };
        if conn.stream.write_all(answer).await.is_err() || head.close || status != 200 {
            return;
        }
    }
}

/// A message head longer than this is refused by the sink and the generator (the gateway's are
/// a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;
const SINK_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
const SINK_BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// What the sink needs from a request head.
struct SinkHead {
    content_length: usize,
    idempotency_key: Option<String>,
    close: bool,
}

impl SinkHead {
    fn parse(head: &[u8]) -> std::result::Result<SinkHead, String> {
        let text = std::str::from_utf8(head).map_err(|_| "non-UTF-8 request head".to_string())?;
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        if !request_line.starts_with("POST /fhir ") {
            return Err(format!("unexpected request line {request_line:?}"));
        }
        let mut h = SinkHead {
            content_length: 0,
            idempotency_key: None,
            close: false,
        };
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                return Err(format!("bad header line {line:?}"));
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                h.content_length = v.parse().map_err(|_| format!("bad content-length {v:?}"))?;
            } else if k.eq_ignore_ascii_case("idempotency-key") {
                h.idempotency_key = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!(
                    "transfer-encoding {v:?} is not supported by the sink"
                ));
            } else if k.eq_ignore_ascii_case("connection") {
                h.close = v.eq_ignore_ascii_case("close");
            }
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL database for a run

/// A database created for one bench run on the given server, dropped at the end.
struct BenchDb {
    server: String,
    name: String,
    url: String,
}

impl BenchDb {
    fn create(rt: &tokio::runtime::Runtime, server: &str) -> Result<BenchDb> {
        let name = format!(
            "kp_bench_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        rt.block_on(admin_sql(server, &format!("CREATE DATABASE {name}")))?;
        println!("PostgreSQL database {name} on {server}");
        Ok(BenchDb {
            server: server.to_string(),
            url: format!("{server} dbname={name}"),
            name,
        })
    }

    fn drop_on(self, rt: &tokio::runtime::Runtime) {
        if let Err(e) = rt.block_on(admin_sql(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {}", self.name),
        )) {
            eprintln!("could not drop {}: {e:#}", self.name);
        }
    }
}

async fn admin_sql(server: &str, sql: &str) -> Result<()> {
    let (client, conn) =
        tokio_postgres::connect(&format!("{server} dbname=postgres"), tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL")?;
    let driver = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_string())?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gateway child process

struct Gateway {
    child: Option<Child>,
    dir: PathBuf,
    keep_dir: bool,
    addr: SocketAddr,
}

impl Gateway {
    fn start(args: &Args, sink: SocketAddr, pg_url: Option<&str>) -> Result<Gateway> {
        let bin = resolve_gateway(&args.gateway)?;
        let dir = std::env::temp_dir().join(format!(
            "knutepunkt-bench-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // From here on Drop removes the dir, whatever fails.
        let mut gw = Gateway {
            child: None,
            dir,
            keep_dir: args.keep_dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let config = gw.dir.join("knutepunkt.toml");
        std::fs::write(
            &config,
            config_text(args, &gw.dir.join("data"), sink, pg_url),
        )?;
        let stderr = std::fs::File::create(gw.dir.join("gateway.stderr"))?;
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            // Quiet unless the caller asks for more (to look into a run with `--keep-dir`).
            .env(
                "KNUTEPUNKT_LOG",
                std::env::var("KNUTEPUNKT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        gw.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(line))) => line,
            other => bail!(
                "gateway did not report its address ({other:?}); stderr:\n{}",
                std::fs::read_to_string(gw.dir.join("gateway.stderr")).unwrap_or_default()
            ),
        };
        let addr = line
            .strip_prefix("knutepunkt listening on ")
            .with_context(|| format!("unexpected gateway output: {line}"))?;
        gw.addr = addr.parse().context("gateway address")?;
        println!(
            "gateway {} pid {} listening on {}, data in {}",
            bin.display(),
            gw.pid(),
            gw.addr,
            gw.dir.join("data").display()
        );
        Ok(gw)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn journal_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.join("data"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        if self.keep_dir {
            println!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn resolve_gateway(p: &Path) -> Result<PathBuf> {
    let candidates = [
        p.to_path_buf(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p),
    ];
    for c in &candidates {
        if c.is_file() {
            if c.components().any(|x| x.as_os_str() == "debug") {
                eprintln!(
                    "warning: {} looks like a debug build; figures will not be representative",
                    c.display()
                );
            }
            return Ok(c.clone());
        }
    }
    bail!(
        "gateway binary {} not found; run `cargo build --release --bins` first or pass --gateway",
        p.display()
    )
}

fn config_text(args: &Args, data: &Path, sink: SocketAddr, pg_url: Option<&str>) -> String {
    let storage = match pg_url {
        Some(url) => format!(
            "kind = \"postgres\"\nurl = {url:?}\nwriters = {}",
            args.pg_writers
        ),
        None => format!("data_dir = {:?}", data.display().to_string()),
    };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace_s = 2

[storage]
{storage}
max_batch = {max_batch}
queue_capacity = {queue}

[ingest]
max_in_flight = 4096

[mappings]
dir = {mappings:?}

[[destination]]
name = "sink"
url = "http://{sink}/fhir"
timeout_ms = 10000
concurrency = {conc}
alarm_concurrency = {alarm_conc}

[[route]]
name = "everything-to-sink"
destinations = ["sink"]
"#,
        max_batch = args.max_batch,
        queue = args.queue_capacity,
        mappings = args.mappings.display().to_string(),
        conc = args.dest_concurrency,
        alarm_conc = args.alarm_concurrency,
    )
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 keep-alive client

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        Conn::on(stream)
    }

    /// A connection on `stream` (the generator's, or one the sink accepted).
    fn on(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<Response> {
        self.stream.write_all(request).await?;
        let head_end = self.read_head().await?;
        let (status, len) = parse_head(&self.buf[..head_end])?;
        let total = head_end + 4 + len;
        self.read_to(total).await?;
        let body = self.buf[head_end + 4..total].to_vec();
        self.buf.drain(..total);
        Ok(Response { status, body })
    }

    /// Reads until the buffer holds a whole message head; returns where it ends (the blank
    /// line). A head longer than [`MAX_HEAD`] is `InvalidData`.
    async fn read_head(&mut self) -> std::io::Result<usize> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                return Ok(pos);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("message head longer than {MAX_HEAD} bytes"),
                ));
            }
            self.fill().await?;
        }
    }

    /// Reads until the buffer holds at least `total` bytes.
    async fn read_to(&mut self, total: usize) -> std::io::Result<()> {
        while self.buf.len() < total {
            self.fill().await?;
        }
        Ok(())
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the gateway",
            ));
        }
        Ok(())
    }
}

fn parse_head(head: &[u8]) -> std::io::Result<(u16, usize)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let text = std::str::from_utf8(head).map_err(|_| bad("non-UTF-8 response head"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut len = 0;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().map_err(|_| bad("bad content-length"))?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(
                "chunked responses are not supported by the bench client",
            ));
        }
    }
    Ok((status, len))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends one request on `conn`, opening it first if needed; a failed connection is dropped.
async fn send(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    request: &[u8],
) -> std::result::Result<Response, String> {
    if conn.is_none() {
        *conn = Some(Conn::open(addr).await.map_err(|e| e.to_string())?);
    }
    let c = conn.as_mut().expect("connection just opened");
    match tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(request)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => {
            *conn = None;
            Err(e.to_string())
        }
        Err(_) => {
            *conn = None;
            Err("timeout".into())
        }
    }
}

fn request(host: SocketAddr, body: &str) -> Vec<u8> {
    let mut r = Vec::with_capacity(body.len() + 160);
    let _ = write!(
        r,
        "POST /v1/vendors/fhir/events HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    r.extend_from_slice(body.as_bytes());
    r
}

fn observation(run: &str, seq: u64, key: usize) -> String {
    let value = 50 + seq % 70;
    format!(
        r#"{{"resourceType":"Observation","status":"final","identifier":[{{"system":"urn:knutepunkt-bench","value":"{run}-m-{seq}"}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}}]}},"subject":{{"identifier":{{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"bench-{key:06}"}}}},"effectiveDateTime":"2026-01-01T12:00:00Z","valueQuantity":{{"value":{value},"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}}}"#
    )
}

fn alarm(run: &str, seq: u64) -> String {
    let key = seq % 64;
    format!(
        r#"{{"resourceType":"Bundle","type":"collection","identifier":{{"system":"urn:knutepunkt-bench","value":"{run}-a-{seq}"}},"entry":[{{"resource":{{"resourceType":"DetectedIssue","status":"final","severity":"high","code":{{"text":"fall detected"}},"patient":{{"identifier":{{"value":"bench-alarm-{key:03}"}}}},"author":{{"identifier":{{"value":"bench-sensor-{key:03}"}}}}}}}}]}}"#
    )
}

#[derive(Deserialize)]
struct AckBody {
    id: String,
}

// ---------------------------------------------------------------------------------------------
// Outcomes

/// One acknowledged (202) event.
struct Ack {
    id: String,
    sent: Instant,
    acked: Instant,
}

#[derive(Default)]
struct Tally {
    acks: Vec<Ack>,
    /// Non-202 answers by status.
    refused: BTreeMap<u16, u64>,
    errors: u64,
    last_error: Option<String>,
    late: u64,
    max_lag: Duration,
}

impl Tally {
    fn absorb(&mut self, other: Tally) {
        self.acks.extend(other.acks);
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        if other.last_error.is_some() {
            self.last_error = other.last_error;
        }
        self.late += other.late;
        self.max_lag = self.max_lag.max(other.max_lag);
    }

    /// Records the outcome of one send; true when the gateway shed load (caller may pause).
    fn note(&mut self, sent: Instant, outcome: std::result::Result<Response, String>) -> bool {
        let at = Instant::now();
        match outcome {
            Ok(r) if r.status == 202 => match serde_json::from_slice::<AckBody>(&r.body) {
                Ok(b) => self.acks.push(Ack {
                    id: b.id,
                    sent,
                    acked: at,
                }),
                Err(e) => {
                    self.errors += 1;
                    self.last_error = Some(format!("202 without id: {e}"));
                }
            },
            Ok(r) => {
                *self.refused.entry(r.status).or_default() += 1;
                if r.status != 503 && r.status != 429 {
                    self.last_error = Some(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
                return r.status == 503 || r.status == 429;
            }
            Err(e) => {
                self.errors += 1;
                self.last_error = Some(e);
                return true;
            }
        }
        false
    }

    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    fn describe_failures(&self) -> String {
        let mut s = format!(
            "{} refused {:?}, {} errors",
            self.refused_total(),
            self.refused,
            self.errors
        );
        if let Some(e) = &self.last_error {
            s.push_str(&format!(" (last: {})", truncate(e, 200)));
        }
        s
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Nearest-rank percentiles over durations, in milliseconds.
struct Dist {
    sorted: Vec<Duration>,
}

impl Dist {
    fn new(mut v: Vec<Duration>) -> Dist {
        v.sort_unstable();
        Dist { sorted: v }
    }
    fn pct(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        ms(self.sorted[rank - 1])
    }
    fn max(&self) -> f64 {
        self.sorted.last().map(|d| ms(*d)).unwrap_or(f64::NAN)
    }
    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            self.pct(0.50),
            self.pct(0.99),
            self.max(),
            self.sorted.len()
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    gateway: u64,
    writer: u64,
    bench: u64,
    sink: u64,
    generator: u64,
    system_busy: u64,
}

struct CpuSplit {
    gateway: f64,
    writer: f64,
    bench: f64,
    sink: f64,
    generator: f64,
    others: f64,
}

impl Cpu {
    fn sample(gateway_pids: &[u32]) -> Cpu {
        let threads = |dir: &str| -> Vec<(String, u64)> {
            std::fs::read_dir(format!("{dir}/task"))
                .map(|rd| {
                    rd.filter_map(|e| {
                        parse_stat(&std::fs::read_to_string(e.ok()?.path().join("stat")).ok()?)
                    })
                    .collect()
                })
                .unwrap_or_default()
        };
        let sum = |v: &[(String, u64)], prefix: &str| -> u64 {
            v.iter()
                .filter(|(c, _)| c.starts_with(prefix))
                .map(|(_, t)| t)
                .sum()
        };
        let dirs: Vec<String> = gateway_pids.iter().map(|p| format!("/proc/{p}")).collect();
        let own = threads("/proc/self");
        Cpu {
            at: Instant::now(),
            gateway: dirs.iter().map(|d| process_ticks(d)).sum(),
            writer: dirs
                .iter()
                .map(|d| sum(&threads(d), "journal-writer"))
                .sum(),
            bench: process_ticks("/proc/self"),
            sink: sum(&own, "bench-sink"),
            generator: sum(&own, "bench-gen"),
            system_busy: system_busy(),
        }
    }

    /// Cores used (CPU seconds per wall second) between `self` and `later`.
    fn split(&self, later: &Cpu, tck: f64) -> CpuSplit {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let c = |a: u64, b: u64| b.saturating_sub(a) as f64 / tck / wall;
        let gateway = c(self.gateway, later.gateway);
        let bench = c(self.bench, later.bench);
        let busy = c(self.system_busy, later.system_busy);
        CpuSplit {
            gateway,
            writer: c(self.writer, later.writer),
            bench,
            sink: c(self.sink, later.sink),
            generator: c(self.generator, later.generator),
            others: (busy - gateway - bench).max(0.0),
        }
    }
}

impl CpuSplit {
    /// CPU time per event at `rate` events/s, in µs: comparable across runs at other rates.
    fn per_event(&self, rate: f64) -> String {
        let us = |cores: f64| cores * 1e6 / rate.max(1e-9);
        format!(
            "gateway {:.0} µs (journal-writer {:.0}, rest {:.0}) | sink {:.0} µs | generator {:.0} µs",
            us(self.gateway),
            us(self.writer),
            us(self.gateway - self.writer),
            us(self.sink),
            us(self.generator)
        )
    }

    fn line(&self) -> String {
        format!(
            "gateway {:.2} (journal-writer thread {:.2}, rest {:.2}) | sink {:.2} | generator {:.2} | bench other {:.2} | other processes {:.2}",
            self.gateway,
            self.writer,
            self.gateway - self.writer,
            self.sink,
            self.generator,
            (self.bench - self.sink - self.generator).max(0.0),
            self.others
        )
    }
}

/// A fixed single-threaded workload, timed before the gateway starts: a serde_json round trip
/// of one bench Observation and a SHA-256 of 4 KiB, in µs each (best of three rounds). Machines
/// of the same kind have differed about fivefold in speed between sessions; this puts a
/// number on it, so that runs on different machines can be set side by side.
fn reference_work() -> (f64, f64) {
    const N: u32 = 10_000;
    let body = observation("reference", 1, 1);
    let block = [0x5au8; 4096];
    let (mut json_us, mut sha_us) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..N {
            let v: serde_json::Value = serde_json::from_str(std::hint::black_box(&body))
                .expect("the bench's own body parses");
            std::hint::black_box(serde_json::to_vec(&v).expect("serialises"));
        }
        json_us = json_us.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
        let t = Instant::now();
        for _ in 0..N {
            std::hint::black_box(sha2::Sha256::digest(std::hint::black_box(&block)));
        }
        sha_us = sha_us.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
    }
    (json_us, sha_us)
}

/// (comm, utime + stime) from a /proc stat line.
fn parse_stat(s: &str) -> Option<(String, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn process_ticks(dir: &str) -> u64 {
    std::fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .map(|(_, t)| t)
        .unwrap_or(0)
}

fn system_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    total.saturating_sub(idle)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Ctx {
    gateway: SocketAddr,
    run: String,
    seq: AtomicU64,
    keys: usize,
}

impl Ctx {
    fn next_observation(&self) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Relaxed);
        let key = rand::random_range(0..self.keys.max(1));
        request(self.gateway, &observation(&self.run, seq, key))
    }
}

/// Opens `n` connections spread round-robin over the gateway nodes. (A connection that fails
/// later reconnects to the first node.)
async fn open_all(addrs: &[SocketAddr], n: usize) -> Result<Vec<Conn>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(
            Conn::open(addrs[i % addrs.len()])
                .await
                .context("connect to gateway")?,
        );
    }
    Ok(v)
}

/// Closed loop: every connection posts, waits for the answer, posts again, until `deadline`.
async fn closed_loop(ctx: Arc<Ctx>, conns: Vec<Conn>, deadline: Instant) -> Tally {
    let mut tasks = Vec::new();
    for c in conns {
        let ctx = Arc::clone(&ctx);
        tasks.push(tokio::spawn(async move {
            let mut conn = Some(c);
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let req = ctx.next_observation();
                let sent = Instant::now();
                let out = send(&mut conn, ctx.gateway, &req).await;
                if tally.note(sent, out) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            tally
        }));
    }
    join_tallies(tasks).await
}

/// Open loop: event i is due at `t0 + i / rate`; connection j sends events j, j+n, j+2n, ...
async fn open_loop(ctx: Arc<Ctx>, conns: Vec<Conn>, rate: f64, t0: Instant, end: Instant) -> Tally {
    let n = conns.len().max(1);
    let mut tasks = Vec::new();
    for (j, c) in conns.into_iter().enumerate() {
        let ctx = Arc::clone(&ctx);
        tasks.push(tokio::spawn(async move {
            let mut conn = Some(c);
            let mut tally = Tally::default();
            let mut i = j;
            loop {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let req = ctx.next_observation();
                let sent = Instant::now();
                let lag = sent.saturating_duration_since(due);
                if lag > LATE {
                    tally.late += 1;
                }
                tally.max_lag = tally.max_lag.max(lag);
                let out = send(&mut conn, ctx.gateway, &req).await;
                tally.note(sent, out);
                i += n;
            }
            tally
        }));
    }
    join_tallies(tasks).await
}

/// One alarm every `interval`, each sent on its own task with a pooled connection, so a slow
/// alarm never delays the next one.
async fn alarms(
    ctx: Arc<Ctx>,
    pool: Vec<Conn>,
    interval: Duration,
    t0: Instant,
    end: Instant,
) -> Tally {
    let pool = Arc::new(Mutex::new(pool));
    let mut tasks = Vec::new();
    let mut i: u64 = 0;
    loop {
        let due = t0 + interval * i as u32;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let req = request(ctx.gateway, &alarm(&ctx.run, i));
        let ctx = Arc::clone(&ctx);
        let pool = Arc::clone(&pool);
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.lock().expect("pool").pop();
            let mut tally = Tally::default();
            let sent = Instant::now();
            tally.max_lag = sent.saturating_duration_since(due);
            if tally.max_lag > LATE {
                tally.late += 1;
            }
            let out = send(&mut conn, ctx.gateway, &req).await;
            tally.note(sent, out);
            if let Some(c) = conn {
                pool.lock().expect("pool").push(c);
            }
            tally
        }));
        i += 1;
    }
    join_tallies(tasks).await
}

async fn join_tallies(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for t in tasks {
        match t.await {
            Ok(t) => all.absorb(t),
            Err(e) => {
                all.errors += 1;
                all.last_error = Some(format!("task failed: {e}"));
            }
        }
    }
    all
}

/// Waits until the sink has `target` distinct events and every id in `acks` arrived.
async fn drain(sink: &Sink, target: u64, acks: &[&Ack], timeout: Duration) -> (bool, Instant) {
    let deadline = Instant::now() + timeout;
    while sink.distinct.load(Relaxed) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loop {
        let done = Instant::now();
        let missing = {
            let map = sink.arrivals.lock().expect("sink lock");
            acks.iter().filter(|a| !map.contains_key(&a.id)).count()
        };
        if missing == 0 {
            return (true, done);
        }
        if Instant::now() >= deadline {
            eprintln!("{missing} acknowledged events never reached the sink within {timeout:?}");
            return (false, done);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ingest → delivery latency of each ack that arrived, and the latest arrival.
fn deliveries(sink: &Sink, acks: &[&Ack]) -> (Vec<Duration>, Option<Instant>) {
    let mut lat = Vec::with_capacity(acks.len());
    let mut last: Option<Instant> = None;
    for a in acks {
        if let Some(at) = sink.arrival(&a.id) {
            lat.push(at.saturating_duration_since(a.sent));
            last = Some(last.map_or(at, |l| l.max(at)));
        }
    }
    (lat, last)
}

/// The `n` alarms with the longest ingest-to-delivery latency: when each was sent (seconds into
/// the phase), its ingest and its ingest-to-delivery latency, to tell a stall of the journal
/// (both long) from one of delivery (only the second long).
fn slowest(sink: &Sink, acks: &[&Ack], t0: Instant, n: usize) -> String {
    let mut lat: Vec<(Duration, &Ack)> = acks
        .iter()
        .filter_map(|a| Some((sink.arrival(&a.id)?.saturating_duration_since(a.sent), *a)))
        .collect();
    lat.sort_by_key(|l| std::cmp::Reverse(l.0));
    lat.iter()
        .take(n)
        .map(|(e2e, a)| {
            format!(
                "t={:.2}s ingest {:.1} ms e2e {:.1} ms",
                a.sent.saturating_duration_since(t0).as_secs_f64(),
                ms(a.acked - a.sent),
                ms(*e2e)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn arrivals_before(sink: &Sink, acks: &[&Ack], until: Instant) -> usize {
    acks.iter()
        .filter(|a| sink.arrival(&a.id).is_some_and(|t| t <= until))
        .count()
}

struct Phase1 {
    ingest_rate: f64,
    e2e_rate: f64,
    all_delivered: bool,
}

fn run(args: Args) -> Result<bool> {
    if args.skip_phase1 && args.bg_rate.is_none() {
        bail!("--skip-phase1 needs --bg-rate");
    }
    let tck = clock_ticks();
    let sink_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.sink_threads.max(1))
        .thread_name("bench-sink")
        .enable_all()
        .build()?;
    let gen_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.gen_threads.max(1))
        .thread_name("bench-gen")
        .enable_all()
        .build()?;
    // Before anything else runs, so that nothing of ours competes with it.
    let (ref_json_us, ref_sha_us) = reference_work();
    let reference = format!(
        "reference work {ref_json_us:.2} µs per JSON round trip, {ref_sha_us:.2} µs per SHA-256 of 4 KiB (one thread; lower is faster)"
    );
    let (sink, sink_addr) = start_sink(&sink_rt)?;
    if args.nodes > 1 && args.pg_server.is_none() {
        bail!("--nodes > 1 needs --pg-server: several nodes share a PostgreSQL database");
    }
    let db = match &args.pg_server {
        Some(server) => Some(BenchDb::create(&gen_rt, server)?),
        None => None,
    };
    let mut nodes = Vec::new();
    for _ in 0..args.nodes.max(1) {
        nodes.push(Gateway::start(
            &args,
            sink_addr,
            db.as_ref().map(|d| d.url.as_str()),
        )?);
    }
    let pids: Vec<u32> = nodes.iter().map(Gateway::pid).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|g| g.addr).collect();
    let gw = &nodes[0];
    let ctx = Arc::new(Ctx {
        gateway: gw.addr,
        run: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        seq: AtomicU64::new(0),
        keys: args.keys,
    });
    let load_start = loadavg();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {nproc} CPUs, load average {load_start} at start; sink on {sink_addr} ({} thread), generator {} thread",
        args.sink_threads, args.gen_threads
    );
    println!("machine: {reference}");
    let duration = Duration::from_secs(args.duration_s);
    let drain_timeout = Duration::from_secs(args.drain_timeout_s);
    let mut ok = true;
    let mut report: Vec<String> = Vec::new();

    // Phase 1 ----------------------------------------------------------------------------------
    let p1 = if args.skip_phase1 {
        None
    } else {
        println!(
            "phase 1: closed loop, {} connections, {} s, {} keys ...",
            args.connections, args.duration_s, args.keys
        );
        let conns = gen_rt.block_on(open_all(&addrs, args.connections))?;
        sink.reserve(PHASE1_ROOM_PER_S * args.duration_s as usize);
        let cpu0 = Cpu::sample(&pids);
        let start = Instant::now();
        let tally = gen_rt.block_on(closed_loop(Arc::clone(&ctx), conns, start + duration));
        let load_end = tally.acks.iter().map(|a| a.acked).max().unwrap_or(start);
        let cpu1 = Cpu::sample(&pids);
        let load_mid = loadavg();
        let acks: Vec<&Ack> = tally.acks.iter().collect();
        let n = acks.len() as f64;
        let backlog_rss = rss_kib(pids[0], "VmRSS:");
        let (delivered, _) = gen_rt.block_on(drain(&sink, acks.len() as u64, &acks, drain_timeout));
        let cpu2 = Cpu::sample(&pids);
        ok &= delivered;
        let ingest = Dist::new(acks.iter().map(|a| a.acked - a.sent).collect());
        let (e2e_lat, last_arrival) = deliveries(&sink, &acks);
        let e2e_lat = Dist::new(e2e_lat);
        let window = load_end.duration_since(start).as_secs_f64().max(1e-9);
        let ingest_rate = n / window;
        let e2e_window = last_arrival
            .unwrap_or(start)
            .duration_since(start)
            .as_secs_f64()
            .max(1e-9);
        let e2e_rate = if delivered { n / e2e_window } else { 0.0 };
        let during = arrivals_before(&sink, &acks, load_end);
        report.push(format!(
            "PHASE 1  closed loop: {} connections, {:.1} s, {} keys",
            args.connections, window, args.keys
        ));
        report.push(format!(
            "  durable ingest        {ingest_rate:>9.0} events/s   ({} acked 202; {})",
            acks.len(),
            tally.describe_failures()
        ));
        report.push(format!("  ingest latency        {}", ingest.line()));
        report.push(format!(
            "  end-to-end delivered  {e2e_rate:>9.0} events/s   (all {} acked events delivered {:.2} s after the first send: {})",
            acks.len(),
            e2e_window,
            if delivered { "yes" } else { "NO" }
        ));
        report.push(format!(
            "  delivered during load {:>9.0} events/s   (backlog at end of load: {} events)",
            during as f64 / window,
            acks.len() - during
        ));
        report.push(format!("  ingest->delivery      {}", e2e_lat.line()));
        let load_cpu = cpu0.split(&cpu1, tck);
        report.push(format!(
            "  CPU during load (cores of {nproc}): {}",
            load_cpu.line()
        ));
        report.push(format!(
            "  CPU per event (at the durable ingest rate): {}",
            load_cpu.per_event(ingest_rate)
        ));
        let drain_s = cpu2.at.duration_since(cpu1.at).as_secs_f64();
        if drain_s >= 0.5 {
            report.push(format!(
                "  CPU while draining   (cores of {nproc}): {} [{drain_s:.1} s]",
                cpu1.split(&cpu2, tck).line()
            ));
        }
        report.push(format!(
            "  gateway RSS at end of load {} MiB; load average after load {load_mid}",
            backlog_rss / 1024
        ));
        Some(Phase1 {
            ingest_rate,
            e2e_rate,
            all_delivered: delivered,
        })
    };

    // Phase 2 ----------------------------------------------------------------------------------
    let bg_rate = args
        .bg_rate
        .unwrap_or_else(|| p1.as_ref().map_or(0.0, |p| p.e2e_rate / 2.0));
    let mut alarm_p99 = f64::NAN;
    if bg_rate > 0.0 {
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "phase 2: open loop {bg_rate:.0} events/s background on {} connections + one alarm every {} ms, {} s ...",
            args.bg_connections, args.alarm_interval_ms, args.duration_s
        );
        let bg_conns = gen_rt.block_on(open_all(&addrs, args.bg_connections))?;
        let alarm_conns = gen_rt.block_on(open_all(&addrs, 8))?;
        let before = sink.distinct.load(Relaxed);
        // Twice the background and alarm counts: the open loop never sends more than its schedule.
        sink.reserve(
            2 * (bg_rate as usize + 1000 / args.alarm_interval_ms.max(1) as usize)
                * args.duration_s as usize,
        );
        let cpu0 = Cpu::sample(&pids);
        let t0 = Instant::now() + Duration::from_millis(20);
        let end = t0 + duration;
        let interval = Duration::from_millis(args.alarm_interval_ms.max(1));
        let (bg, al) = gen_rt.block_on(async {
            let bg = tokio::spawn(open_loop(Arc::clone(&ctx), bg_conns, bg_rate, t0, end));
            let al = tokio::spawn(alarms(Arc::clone(&ctx), alarm_conns, interval, t0, end));
            (bg.await, al.await)
        });
        let (bg, al) = (bg?, al?);
        let cpu1 = Cpu::sample(&pids);
        let load_mid = loadavg();
        let bg_acks: Vec<&Ack> = bg.acks.iter().collect();
        let al_acks: Vec<&Ack> = al.acks.iter().collect();
        let all: Vec<&Ack> = bg_acks.iter().chain(al_acks.iter()).copied().collect();
        let (delivered, _) =
            gen_rt.block_on(drain(&sink, before + all.len() as u64, &all, drain_timeout));
        ok &= delivered;
        let last_ack = bg.acks.iter().map(|a| a.acked).max().unwrap_or(t0);
        let window = last_ack.duration_since(t0).as_secs_f64().max(1e-9);
        let (bg_e2e, bg_last) = deliveries(&sink, &bg_acks);
        let bg_e2e = Dist::new(bg_e2e);
        let (al_e2e, _) = deliveries(&sink, &al_acks);
        let al_e2e = Dist::new(al_e2e);
        alarm_p99 = al_e2e.pct(0.99);
        let al_ingest = Dist::new(al_acks.iter().map(|a| a.acked - a.sent).collect());
        let bg_ingest = Dist::new(bg_acks.iter().map(|a| a.acked - a.sent).collect());
        let bg_e2e_window = bg_last
            .unwrap_or(t0)
            .duration_since(t0)
            .as_secs_f64()
            .max(1e-9);
        report.push(format!(
            "PHASE 2  open loop: background target {bg_rate:.0} events/s on {} connections + alarm every {} ms, {} s",
            args.bg_connections, args.alarm_interval_ms, args.duration_s
        ));
        report.push(format!(
            "  background achieved   {:>9.0} events/s   ({} acked; {}; {} sends > {} ms behind schedule, max lag {:.1} ms)",
            bg_acks.len() as f64 / window,
            bg_acks.len(),
            bg.describe_failures(),
            bg.late,
            LATE.as_millis(),
            ms(bg.max_lag)
        ));
        report.push(format!(
            "  background delivered  {:>9.0} events/s   (ingest {}; ingest->delivery p50 {:.2} ms, p99 {:.2} ms)",
            bg_acks.len() as f64 / bg_e2e_window,
            bg_ingest.line(),
            bg_e2e.pct(0.5),
            bg_e2e.pct(0.99)
        ));
        report.push(format!(
            "  alarms                {} sent, {} acked, {} delivered; {}; {} sent > {} ms late",
            al.acks.len() as u64 + al.refused_total() + al.errors,
            al_acks.len(),
            al_e2e.sorted.len(),
            al.describe_failures(),
            al.late,
            LATE.as_millis()
        ));
        report.push(format!("  alarm ingest latency  {}", al_ingest.line()));
        report.push(format!("  ALARM ingest->delivery {}", al_e2e.line()));
        report.push(format!(
            "  slowest alarms        {}",
            slowest(&sink, &al_acks, t0, 3)
        ));
        let load_cpu = cpu0.split(&cpu1, tck);
        report.push(format!(
            "  CPU during load (cores of {nproc}): {}",
            load_cpu.line()
        ));
        report.push(format!(
            "  CPU per event (background and alarms): {}",
            load_cpu.per_event(all.len() as f64 / window)
        ));
        report.push(format!("  load average after load {load_mid}"));
    }

    // Summary ----------------------------------------------------------------------------------
    let requests = sink.requests.load(Relaxed);
    let distinct = sink.distinct.load(Relaxed);
    report.push(format!(
        "SINK  {requests} requests, {distinct} distinct events, {} redeliveries, {} malformed (missing/mismatched Idempotency-Key)",
        sink.duplicates.load(Relaxed),
        sink.malformed.load(Relaxed)
    ));
    ok &= sink.malformed.load(Relaxed) == 0;
    let storage = match &db {
        Some(_) => format!("PostgreSQL, {} node(s)", nodes.len()),
        None => format!(
            "embedded, journal on disk {} MiB",
            gw.journal_bytes() / (1024 * 1024)
        ),
    };
    let peak: Vec<String> = pids
        .iter()
        .map(|p| format!("{}", rss_kib(*p, "VmHWM:") / 1024))
        .collect();
    report.push(format!(
        "GATEWAY  peak RSS {} MiB; {storage}",
        peak.join(" / ")
    ));
    report.push(format!(
        "MACHINE  {nproc} CPUs; load average at start {load_start}, at end {}; {reference}",
        loadavg()
    ));
    // Issue targets: 15 000/s on the embedded store, 8 000/s on PostgreSQL with one node; none
    // is set for several nodes.
    let target = match (&args.pg_server, args.nodes.max(1)) {
        (None, _) => Some(15_000.0),
        (Some(_), 1) => Some(8_000.0),
        (Some(_), _) => None,
    };
    if let (Some(p), Some(target)) = (&p1, target) {
        report.push(format!(
            "TARGETS  end-to-end durable >= {target:.0} events/s ({storage}): {:.0} -> {}; durable ingest alone {:.0}",
            p.e2e_rate,
            if p.e2e_rate >= target && p.all_delivered {
                "met"
            } else {
                "NOT met"
            },
            p.ingest_rate
        ));
    }
    if !alarm_p99.is_nan() {
        report.push(format!(
            "TARGETS  alarm p99 <= 20 ms at {bg_rate:.0} events/s background: {alarm_p99:.2} ms -> {}",
            if alarm_p99 <= 20.0 { "met" } else { "NOT met" }
        ));
    }
    for n in &mut nodes {
        n.stop();
    }
    println!();
    println!("==================== knutepunkt-bench summary ====================");
    for l in &report {
        println!("{l}");
    }
    println!("==================================================================");
    println!(
        "verification: {}",
        if ok {
            "every acknowledged event was delivered"
        } else {
            "FAILED"
        }
    );
    drop(nodes);
    if let Some(db) = db {
        db.drop_on(&gen_rt);
    }
    drop(gen_rt);
    drop(sink_rt);
    Ok(ok)
}
