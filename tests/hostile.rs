//! Hostile input over real sockets against the real binary: entity bombs, external entities,
//! absurd nesting, oversized and never-ending bodies, a vendor over its rate, and a flood of all
//! of these while a well-behaved client keeps posting. After each: the refusal is a FHIR
//! OperationOutcome, nothing was journaled, and the gateway still answers `/healthz`.

mod common;

use std::time::Duration;

use common::{Dest, Gateway, Mode, Sink, observation};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENT: &str = "13097248022";

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn send(gw: &Gateway, vendor: &str, content_type: &str, body: Vec<u8>) -> Answer {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/vendors/{vendor}/events", gw.base))
        .header("content-type", content_type)
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the gateway answers");
    Answer {
        status: resp.status().as_u16(),
        retry_after: resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_string()),
        body: resp.json().await.unwrap_or(Value::Null),
    }
}

/// A refusal is a FHIR OperationOutcome with this status whose diagnostics mention `needle`.
fn assert_outcome(a: &Answer, status: u16, needle: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["resourceType"], "OperationOutcome", "{}", a.body);
    let diag = a.body["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(
        diag.contains(needle),
        "diagnostics {diag:?} do not mention {needle:?}"
    );
}

async fn events(gw: &Gateway) -> u64 {
    let (s, stats) = gw.get("/v1/admin/stats").await;
    assert_eq!(s, 200, "{stats}");
    stats["events"].as_u64().expect("events count")
}

async fn assert_healthy(gw: &Gateway) {
    assert_eq!(gw.get("/healthz").await.0, 200, "gateway stopped answering");
}

fn billion_laughs() -> Vec<u8> {
    let mut s = String::from("<?xml version=\"1.0\"?>\n<!DOCTYPE mrq [\n<!ENTITY lol \"lol\">\n");
    for i in 1..=9 {
        let prev = if i == 1 {
            "lol".to_string()
        } else {
            format!("lol{}", i - 1)
        };
        s.push_str(&format!(
            "<!ENTITY lol{i} \"{}\">\n",
            format!("&{prev};").repeat(10)
        ));
    }
    s.push_str("]>\n<mrq><ref>&lol9;</ref><mty>ME</mty><cid>4711002</cid></mrq>");
    s.into_bytes()
}

fn scaip_alarm(reference: &str) -> Vec<u8> {
    format!(
        "<mrq><ref>{reference}</ref><mty>ME</mty><cid>4711002</cid><dty>0003</dty>\
         <stc>0010</stc><pri>9</pri></mrq>"
    )
    .into_bytes()
}

fn padded_observation(vendor_id: &str, total: usize) -> Vec<u8> {
    let mut b = observation(PATIENT, vendor_id).to_string().into_bytes();
    // Whitespace is valid JSON: the same event, just a bigger body.
    b.resize(total.max(b.len()), b' ');
    b
}

#[tokio::test]
async fn entity_declarations_and_external_entities_are_refused_unexpanded() {
    // Anything that connects here would be the gateway resolving an external entity.
    let trap = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let trap_url = format!("http://{}/evil.dtd", trap.local_addr().expect("addr"));
    let gw = Gateway::start(&[], "").await;

    let a = send(&gw, "scaip", "application/xml", billion_laughs()).await;
    assert_outcome(&a, 400, "DTD");
    assert_eq!(a.body["issue"][0]["code"], "structure");

    let xxe =
        b"<?xml version=\"1.0\"?><!DOCTYPE mrq [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\
                <mrq><ref>&xxe;</ref></mrq>"
            .to_vec();
    let a = send(&gw, "scaip", "application/xml", xxe).await;
    assert_outcome(&a, 400, "DTD");
    assert!(!a.body.to_string().contains("root:"), "{}", a.body);

    let external_dtd = format!("<!DOCTYPE mrq SYSTEM \"{trap_url}\"><mrq><ref>1</ref></mrq>");
    let a = send(&gw, "scaip", "text/xml", external_dtd.into_bytes()).await;
    assert_outcome(&a, 400, "DTD");

    // An entity reference without any declaration is refused too, never looked up.
    let a = send(
        &gw,
        "scaip",
        "application/xml",
        b"<mrq><ref>&xxe;</ref></mrq>".to_vec(),
    )
    .await;
    assert_outcome(&a, 400, "entity");
    let a = send(
        &gw,
        "scaip",
        "application/xml",
        b"<mrq><ref a=\"&xxe;\">1</ref></mrq>".to_vec(),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);

    let connected = tokio::time::timeout(Duration::from_millis(300), trap.accept()).await;
    assert!(
        connected.is_err(),
        "the gateway fetched an external DTD/entity"
    );
    assert_eq!(events(&gw).await, 0);
    assert_healthy(&gw).await;
}

#[tokio::test]
async fn absurd_nesting_is_refused_without_recursion() {
    let gw = Gateway::start(&[], "[ingest]\nmax_xml_depth = 4\n").await;

    // 100,000-deep JSON to the pass-through and to a mapped JSON vendor.
    let deep = "[".repeat(100_000).into_bytes();
    for vendor in ["fhir", "homemeasure"] {
        let a = send(&gw, vendor, "application/json", deep.clone()).await;
        assert_outcome(
            &a,
            400,
            "nesting deeper than 64 levels (ingest.max_json_depth)",
        );
    }
    let balanced = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let a = send(&gw, "fhir", "application/json", balanced.into_bytes()).await;
    assert_outcome(
        &a,
        400,
        "nesting deeper than 64 levels (ingest.max_json_depth)",
    );

    // XML: 100,000 open elements, and one level past the configured limit.
    let a = send(
        &gw,
        "scaip",
        "application/xml",
        "<a>".repeat(100_000).into_bytes(),
    )
    .await;
    assert_outcome(&a, 400, "ingest.max_xml_depth");
    let five = b"<mrq><a><b><c><d>1</d></c></b></a></mrq>".to_vec();
    let a = send(&gw, "scaip", "application/xml", five).await;
    assert_outcome(&a, 400, "deeper than 4 levels");
    assert_eq!(events(&gw).await, 0);

    // A real alarm (depth 2) still passes the same limit.
    let a = send(&gw, "scaip", "application/xml", scaip_alarm("N1")).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(events(&gw).await, 1);
    assert_healthy(&gw).await;
}

/// A NUL character (which PostgreSQL text cannot hold and no FHIR string may) is refused with
/// 400 before anything is stored, on every backend, while the events around it are stored: it
/// never turns into a journal failure (503) that the vendor would retry forever.
#[tokio::test]
async fn nul_characters_are_refused_not_journaled() {
    let gw = Gateway::start(&[], "").await;
    // serde_json writes the NUL of this id as the escape `\u0000`.
    let escaped = observation(PATIENT, "nul\u{0}id").to_string();
    assert!(escaped.contains(r"nul\u0000id"), "{escaped}");
    let sends = [
        (
            "fhir",
            "application/fhir+json",
            observation(PATIENT, "before").to_string().into_bytes(),
        ),
        ("fhir", "application/fhir+json", escaped.into_bytes()),
        (
            "fhir",
            "application/fhir+json",
            b"{\"resourceType\":\"Observation\",\"status\":\"fin\0al\"}".to_vec(),
        ),
        (
            "homemeasure",
            "application/json",
            br#"{"uploadId":"u-\u0000","x":1}"#.to_vec(),
        ),
        (
            "scaip",
            "application/xml",
            b"<mrq><ref>N\0</ref></mrq>".to_vec(),
        ),
        (
            "fhir",
            "application/fhir+json",
            observation(PATIENT, "after").to_string().into_bytes(),
        ),
    ];
    let answers = futures_util::future::join_all(
        sends
            .iter()
            .map(|(v, ct, body)| send(&gw, v, ct, body.clone())),
    )
    .await;
    assert_eq!(answers[0].status, 202, "{}", answers[0].body);
    for a in &answers[1..5] {
        assert_outcome(a, 400, "NUL character (U+0000)");
    }
    assert_eq!(answers[5].status, 202, "{}", answers[5].body);
    assert_eq!(events(&gw).await, 2, "only the two clean events are stored");
    assert_healthy(&gw).await;
}

#[tokio::test]
async fn wide_and_long_xml_is_bounded_by_the_body_limit() {
    let gw = Gateway::start(&[], "[ingest]\nmax_body_bytes = 262144\n").await;

    let attrs: String = (0..20_000).map(|i| format!(" a{i}=\"x\"")).collect();
    let wide = format!("<mrq{attrs}><ref>W1</ref></mrq>");
    assert!(wide.len() < 262_144);
    let a = send(&gw, "scaip", "application/xml", wide.into_bytes()).await;
    assert!(
        a.status == 202 || (400..500).contains(&a.status),
        "{} {}",
        a.status,
        a.body
    );

    let long = format!("<mrq><ref>{}</ref></mrq>", "x".repeat(300_000));
    let a = send(&gw, "scaip", "application/xml", long.into_bytes()).await;
    assert_outcome(&a, 413, "larger than 262144 bytes");
    assert_eq!(a.body["issue"][0]["code"], "too-long");
    assert_healthy(&gw).await;
}

#[tokio::test]
async fn body_limits_global_and_per_vendor() {
    let gw = Gateway::start(
        &[],
        "[ingest]\nmax_body_bytes = 65536\n[ingest.vendor.scaip]\nmax_body_bytes = 512\n",
    )
    .await;

    // The vendor override: 600 bytes is too much for scaip ...
    let mut xml = scaip_alarm("B1");
    xml.resize(600, b' ');
    let a = send(&gw, "scaip", "application/xml", xml).await;
    assert_outcome(&a, 413, "larger than 512 bytes");
    // ... while another vendor still has the global limit.
    let a = send(
        &gw,
        "fhir",
        "application/fhir+json",
        padded_observation("b-1", 4_000),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let a = send(
        &gw,
        "fhir",
        "application/fhir+json",
        padded_observation("b-2", 70_000),
    )
    .await;
    assert_outcome(&a, 413, "larger than 65536 bytes");
    assert_eq!(events(&gw).await, 1);

    // A body that never ends: 413 arrives while the client is still sending, so the gateway
    // did not wait for (or buffer) the rest of it.
    let addr = gw.base.strip_prefix("http://").expect("http");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /v1/vendors/scaip/events HTTP/1.1\r\nhost: x\r\n\
          content-type: application/xml\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .expect("head");
    let chunk = format!("400\r\n{}\r\n", "<".repeat(0x400));
    for _ in 0..8 {
        // The gateway may answer and close before the client is done sending: that is the point.
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // A declared length over the limit is refused before any body byte is sent.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /v1/vendors/fhir/events HTTP/1.1\r\nhost: x\r\n\
          content-type: application/json\r\ncontent-length: 1000000000\r\n\r\n",
    )
    .await
    .expect("head");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    assert_eq!(events(&gw).await, 1);
    let metrics = metrics_text(&gw).await;
    assert!(
        metric_value(
            &metrics,
            "knutepunkt_ingest_rejected_total",
            "too_large",
            "scaip"
        ) >= 2.0,
        "{metrics}"
    );
    assert_healthy(&gw).await;
}

/// Reads an HTTP response head (up to the blank line), with a deadline.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            // A reset after the answer ends the read; the caller checks what arrived.
            let n = s.read(&mut byte).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&byte[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the gateway answered while the body was still open");
    String::from_utf8_lossy(&buf).to_string()
}

async fn metrics_text(gw: &Gateway) -> String {
    reqwest::get(format!("{}/metrics", gw.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The value of `name{reason=..., vendor=...}` in a Prometheus text scrape (0 if absent).
fn metric_value(text: &str, name: &str, reason: &str, vendor: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| {
            l.contains(&format!("reason=\"{reason}\""))
                && l.contains(&format!("vendor=\"{vendor}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn vendor_over_its_rate_gets_429_then_is_served_again() {
    let sink = Sink::start(Mode::Ok).await;
    let gw = Gateway::start(
        &[Dest::new("epj", &sink.url)],
        "[ingest.vendor.fhir]\nrate_per_s = 1\nburst = 2\n",
    )
    .await;
    let post = |id: &str| {
        send(
            &gw,
            "fhir",
            "application/fhir+json",
            observation(PATIENT, id).to_string().into_bytes(),
        )
    };
    assert_eq!(post("r-1").await.status, 202);
    assert_eq!(post("r-2").await.status, 202);
    let a = post("r-3").await;
    assert_outcome(&a, 429, "rate limit");
    assert_eq!(a.body["issue"][0]["code"], "throttled");
    let wait: u64 = a
        .retry_after
        .as_deref()
        .expect("Retry-After on 429")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=2).contains(&wait), "{wait}");
    assert_eq!(events(&gw).await, 2, "the refused request stored nothing");

    // Another vendor is not limited by fhir's bucket.
    let a = send(&gw, "scaip", "application/xml", scaip_alarm("R9")).await;
    assert_eq!(a.status, 202, "{}", a.body);

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let a = post("r-3").await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(events(&gw).await, 4);

    let metrics = metrics_text(&gw).await;
    assert_eq!(
        metric_value(
            &metrics,
            "knutepunkt_ingest_rejected_total",
            "rate_limited",
            "fhir"
        ),
        1.0,
        "{metrics}"
    );
    assert_healthy(&gw).await;
}

#[tokio::test]
async fn well_behaved_client_is_served_during_a_hostile_flood() {
    // scaip is rate-limited too: its share of the flood is turned away before the body is read.
    let gw = Gateway::start(
        &[],
        "[ingest]\nmax_body_bytes = 131072\n[ingest.vendor.scaip]\nrate_per_s = 5\nburst = 5\n",
    )
    .await;
    let base = gw.base.clone();

    let hostile: Vec<(&str, &str, Vec<u8>)> = vec![
        ("scaip", "application/xml", billion_laughs()),
        (
            "scaip",
            "application/xml",
            "<a>".repeat(40_000).into_bytes(),
        ),
        ("fhir", "application/json", "[".repeat(120_000).into_bytes()),
        (
            "homemeasure",
            "application/json",
            "{\"a\":".repeat(20_000).into_bytes(),
        ),
        ("fhir", "application/json", vec![b'x'; 200_000]),
        ("scaip", "application/xml", vec![0xff; 50_000]),
        ("nobody", "application/json", b"{}".to_vec()),
        ("fhir", "text/plain", b"hello".to_vec()),
    ];
    let mut flood = Vec::new();
    for worker in 0..4 {
        let base = base.clone();
        let hostile = hostile.clone();
        flood.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            for round in 0..6 {
                for (i, (vendor, ct, body)) in hostile.iter().enumerate() {
                    if (i + worker + round) % 2 == 1 {
                        continue;
                    }
                    let r = client
                        .post(format!("{base}/v1/vendors/{vendor}/events"))
                        .header("content-type", *ct)
                        .body(body.clone())
                        .send()
                        .await;
                    // A connection closed after a 413 is fine; any answer must be a refusal.
                    if let Ok(r) = r {
                        statuses.push(r.status().as_u16());
                    }
                }
            }
            statuses
        }));
    }

    let mut served = 0;
    for n in 0..30 {
        let body = observation(PATIENT, &format!("good-{n}"))
            .to_string()
            .into_bytes();
        let a = tokio::time::timeout(
            Duration::from_secs(20),
            send(&gw, "fhir", "application/fhir+json", body),
        )
        .await
        .expect("a good request is answered during the flood");
        assert_eq!(a.status, 202, "good request {n}: {}", a.body);
        served += 1;
    }
    let mut refused = 0;
    for f in flood {
        for s in f.await.expect("flood task") {
            assert!((400..500).contains(&s), "hostile request got {s}");
            refused += 1;
        }
    }
    assert_eq!(served, 30);
    let metrics = metrics_text(&gw).await;
    assert!(
        metric_value(
            &metrics,
            "knutepunkt_ingest_rejected_total",
            "rate_limited",
            "scaip"
        ) > 0.0,
        "{metrics}"
    );
    assert!(refused > 50, "the flood ran ({refused} refusals)");
    assert_eq!(
        events(&gw).await,
        30,
        "only the good events are in the journal"
    );
    assert_healthy(&gw).await;
}

/// `knutepunkt check` refuses per-vendor limits for a vendor without a mapping file together
/// with every other error, each naming its field.
#[test]
fn check_reports_unknown_vendor_limits_with_the_other_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[mappings]\ndir = {:?}\n[ingest]\nmax_xml_depth = 0\n\
             [ingest.vendor.scaipp]\nrate_per_s = 5\n[ingest.vendor.fhir]\nburst = 0\n",
            common::repo_path("mappings").display().to_string()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for field in [
        "ingest.max_xml_depth",
        "ingest.vendor.fhir.burst",
        "ingest.vendor.scaipp: no mapping file defines vendor",
    ] {
        assert!(err.contains(field), "missing {field:?} in:\n{err}");
    }
}
