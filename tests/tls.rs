//! TLS on the inbound listeners, over real TLS sockets against the real binary: vendor client
//! certificates on the vendor port (valid, missing, other CA, expired, revoked, wrong vendor,
//! municipality outside the allow-list), server TLS on the main port, certificate reload
//! without restart, the plaintext rule in `knutepunkt check`, and the slowloris guard.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, Mode, Sink, observation, repo_path};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A throwaway CA that signs server and client certificates into `dir`.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

struct Leaf<'a> {
    cn: &'a str,
    client: bool,
    expired: bool,
    serial: Option<u64>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("ca");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write ca");
        Ca {
            issuer: Issuer::new(p, key),
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `{file}.crt` and `{file}.key`; returns the certificate DER.
    fn sign(&self, file: &str, leaf: Leaf<'_>) -> Vec<u8> {
        self.sign_in(&self.dir, file, leaf)
    }

    fn sign_in(&self, dir: &Path, file: &str, leaf: Leaf<'_>) -> Vec<u8> {
        let sans = if leaf.client {
            vec![]
        } else {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        };
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, leaf.cn);
        p.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if !leaf.client {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().expect("dns")),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
        }
        if leaf.expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        if let Some(s) = leaf.serial {
            p.serial_number = Some(SerialNumber::from_slice(&s.to_be_bytes()));
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("key");
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).expect("crt");
        cert.der().to_vec()
    }
}

fn client(name: &str, client: bool) -> Leaf<'_> {
    Leaf {
        cn: name,
        client,
        expired: false,
        serial: None,
    }
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Mapping files for vendors `acme` (may post only for municipality 0301) and `bravo`: FHIR
/// pass-through like the shipped `fhir` vendor.
fn mappings(dir: &Path) -> PathBuf {
    let m = dir.join("mappings");
    std::fs::create_dir_all(&m).expect("mkdir");
    let base = std::fs::read_to_string(repo_path("mappings/fhir-passthrough.toml")).expect("read");
    for (vendor, tenants) in [("acme", "tenants = [\"0301\"]\n"), ("bravo", "")] {
        let text = base.replacen(
            "vendor = \"fhir\"",
            &format!("vendor = \"{vendor}\"\n{tenants}"),
            1,
        );
        std::fs::write(m.join(format!("{vendor}.toml")), text).expect("write mapping");
    }
    m
}

/// A gateway with `[tls]` and a vendor port; certificates in the temp dir.
struct TlsGateway {
    gw: Gateway,
    main: String,
    vendor: String,
    certs: PathBuf,
}

impl TlsGateway {
    async fn start(sink: &Sink, tls_extra: &str, setup: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().to_path_buf();
        let revoked = setup(&certs);
        // The audit assertions read the embedded journal file.
        let storage = format!(
            "[storage]\ndata_dir = {:?}\n",
            dir.path().join("data").display().to_string()
        );
        let cfg = format!(
            r#"[server]
listen = "127.0.0.1:0"
shutdown_grace_s = 1
[mappings]
dir = {mappings:?}
{storage}
[[destination]]
name = "sink"
url = {url:?}
[[route]]
name = "all"
destinations = ["sink"]
[tls]
cert_file = {cert:?}
key_file = {key:?}
client_ca_file = {ca:?}
vendor_listen = "127.0.0.1:0"
{revoked}
{tls_extra}
[[tls.client]]
subject_cn = "acme"
vendor = "acme"
[[tls.client]]
subject_cn = "bravo"
vendor = "bravo"
"#,
            mappings = mappings(&certs).display().to_string(),
            url = sink.url,
            cert = certs.join("server.crt").display().to_string(),
            key = certs.join("server.key").display().to_string(),
            ca = certs.join("vendor-ca.crt").display().to_string(),
        );
        let gw = Gateway::start_with_config(dir, &cfg).await;
        let main = gw.base.trim_start_matches("http://").to_string();
        let vendor = gw
            .stdout_line(
                "knutepunkt vendor port listening on ",
                Duration::from_secs(10),
            )
            .expect("vendor port line");
        TlsGateway {
            gw,
            main,
            vendor,
            certs,
        }
    }

    fn cfg(&self, identity: Option<&str>) -> Arc<ClientConfig> {
        client_config(&self.certs, identity)
    }

    /// Number of events in the journal, read over HTTPS from the admin API (main port).
    async fn events(&self) -> i64 {
        let r = https(
            &self.main,
            &self.cfg(None),
            "GET",
            "/v1/admin/stats",
            &[],
            "",
        )
        .await
        .expect("admin stats over TLS");
        assert_eq!(r.0, 200, "{r:?}");
        r.1["events"].as_i64().expect("events")
    }

    /// `refused` audit notes (detail column), read from the embedded journal.
    fn refusals(&self) -> Vec<String> {
        let db = self.gw.dir.path().join("data").join("journal.sqlite3");
        let c = rusqlite::Connection::open(db).expect("open journal");
        let mut st = c
            .prepare(
                "SELECT event_id || ' ' || detail FROM audit WHERE kind = 'refused' ORDER BY id",
            )
            .expect("prepare");
        st.query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    }
}

/// Trusts `server-ca.crt`; presents `{identity}.crt/.key` when given.
fn client_config(dir: &Path, identity: Option<&str>) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("server-ca.crt")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => b.with_no_client_auth(),
        Some(name) => {
            let certs = CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
                .expect("crt")
                .collect::<Result<Vec<_>, _>>()
                .expect("crt");
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).expect("key");
            b.with_client_auth_cert(certs, key).expect("client auth")
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One HTTP/1.1 request over TLS: `(status, JSON body, server certificate DER)`, or the error
/// (handshake refusals surface here).
async fn https(
    addr: &str,
    cfg: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Value, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = TlsConnector::from(Arc::clone(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut resp))
        .await
        .map_err(|_| "read timed out".to_string())?;
    read.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((
        status,
        serde_json::from_str(rest).unwrap_or(Value::Null),
        server_cert,
    ))
}

async fn post(
    addr: &str,
    cfg: &Arc<ClientConfig>,
    vendor: &str,
    id: &str,
    extra: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    let mut headers = vec![("content-type", "application/fhir+json")];
    headers.extend_from_slice(extra);
    let body = observation("13116900216", id).to_string();
    https(
        addr,
        cfg,
        "POST",
        &format!("/v1/vendors/{vendor}/events"),
        &headers,
        &body,
    )
    .await
    .map(|(s, b, _)| (s, b))
}

const REVOKED_SERIAL: u64 = 0x0bad_c0de_0042;

/// Server CA + server cert, vendor CA + acme/bravo/stranger/expired/revoked client certs, and a
/// rogue CA's "acme". Returns the revocation lines for `[tls]`.
fn standard_pki(dir: &Path) -> String {
    let server_ca = Ca::new(dir, "server-ca");
    server_ca.sign("server", client("localhost", false));
    let vendor_ca = Ca::new(dir, "vendor-ca");
    vendor_ca.sign("acme", client("acme", true));
    vendor_ca.sign("bravo", client("bravo", true));
    vendor_ca.sign("stranger", client("stranger", true));
    vendor_ca.sign(
        "expired",
        Leaf {
            expired: true,
            ..client("acme", true)
        },
    );
    vendor_ca.sign(
        "revoked-serial",
        Leaf {
            serial: Some(REVOKED_SERIAL),
            ..client("acme", true)
        },
    );
    let der = vendor_ca.sign("revoked-fp", client("acme", true));
    Ca::new(dir, "rogue-ca").sign("rogue", client("acme", true));
    format!(
        "revoked_serials = [\"00:{:x}\"]\nrevoked_fingerprints = [{:?}]",
        REVOKED_SERIAL,
        sha256_hex(&der)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_port_authenticates_vendors_by_client_certificate() {
    let sink = Sink::start(Mode::Ok).await;
    let g = TlsGateway::start(&sink, "", standard_pki).await;

    // A valid certificate for acme posts as acme.
    let (status, body) = post(&g.vendor, &g.cfg(Some("acme")), "acme", "a-1", &[])
        .await
        .expect("acme posts");
    assert_eq!(status, 202, "{body}");
    let (status, _) = post(&g.vendor, &g.cfg(Some("bravo")), "bravo", "b-1", &[])
        .await
        .expect("bravo posts");
    assert_eq!(status, 202);
    assert_eq!(g.events().await, 2);

    // Refused in the handshake: no HTTP answer at all.
    for (who, cfg) in [
        ("no client certificate", g.cfg(None)),
        ("another CA", g.cfg(Some("rogue"))),
        ("expired", g.cfg(Some("expired"))),
        ("revoked by serial", g.cfg(Some("revoked-serial"))),
        ("revoked by fingerprint", g.cfg(Some("revoked-fp"))),
    ] {
        let r = post(&g.vendor, &cfg, "acme", &format!("x-{who}"), &[]).await;
        assert!(r.is_err(), "{who}: must fail the handshake, got {r:?}");
    }

    // acme's certificate posting as bravo: 403 naming `vendor`, nothing stored, audited.
    let (status, body) = post(&g.vendor, &g.cfg(Some("acme")), "bravo", "a-2", &[])
        .await
        .expect("answer");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["expression"][0], "vendor", "{body}");
    // A certificate the CA signed but no [[tls.client]] maps.
    let (status, _) = post(&g.vendor, &g.cfg(Some("stranger")), "acme", "s-1", &[])
        .await
        .expect("answer");
    assert_eq!(status, 403);
    // acme may only post for municipality 0301.
    let (status, body) = post(
        &g.vendor,
        &g.cfg(Some("acme")),
        "acme",
        "a-3",
        &[("x-tenant", "4601")],
    )
    .await
    .expect("answer");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["issue"][0]["expression"][0], "X-Tenant", "{body}");
    let (status, _) = post(
        &g.vendor,
        &g.cfg(Some("acme")),
        "acme",
        "a-4",
        &[("x-tenant", "0301")],
    )
    .await
    .expect("answer");
    assert_eq!(status, 202);
    assert_eq!(g.events().await, 3, "refused requests stored nothing");

    let all = g.refusals();
    let (refusals, revoked): (Vec<String>, Vec<String>) =
        all.into_iter().partition(|r| r.starts_with("vendor:"));
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    // The two revoked certificates are audited although no HTTP request was made.
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    assert!(
        revoked
            .iter()
            .all(|r| r.starts_with("tls:vendor-port ") && r.contains("CN \"acme\"")),
        "{revoked:?}"
    );
    assert!(
        revoked
            .iter()
            .any(|r| r.contains(&format!("serial {REVOKED_SERIAL:x}"))),
        "{revoked:?}"
    );
    assert!(
        refusals[0].starts_with("vendor:bravo ")
            && refusals[0].contains("vendor acme may not post as vendor bravo"),
        "{refusals:?}"
    );
    assert!(refusals[1].contains("\"stranger\""), "{refusals:?}");
    assert!(
        refusals[2].starts_with("vendor:acme ") && refusals[2].contains("municipality 4601"),
        "{refusals:?}"
    );
    // No payload or patient data in the audit notes.
    assert!(refusals.iter().all(|r| !r.contains("13116900216")));

    // The main port: server TLS without client certificates, admin and health, no ingest.
    let (status, _, cert) = https(&g.main, &g.cfg(None), "GET", "/healthz", &[], "")
        .await
        .expect("healthz over TLS");
    assert_eq!(status, 200);
    assert!(!cert.is_empty());
    let (status, body) = post(&g.main, &g.cfg(None), "acme", "m-1", &[])
        .await
        .expect("answer");
    assert_eq!(status, 403, "{body}");
    assert_eq!(g.events().await, 3);
    // Plain HTTP to a TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", g.main))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()));
}

/// Rewrites the server certificate and key (same CA, new key) the way an operator would.
fn rotate_server_cert(dir: &Path, ca: &Ca) -> Vec<u8> {
    let tmp = dir.join("rotate");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let der = ca.sign_in(&tmp, "server", client("localhost", false));
    std::fs::rename(tmp.join("server.key"), dir.join("server.key")).expect("mv key");
    std::fs::rename(tmp.join("server.crt"), dir.join("server.crt")).expect("mv crt");
    der
}

async fn server_cert(addr: &str, cfg: &Arc<ClientConfig>) -> Vec<u8> {
    https(addr, cfg, "GET", "/healthz", &[], "")
        .await
        .expect("healthz")
        .2
}

async fn wait_for_cert(addr: &str, cfg: &Arc<ClientConfig>, want: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while server_cert(addr, cfg).await != want {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_file_change_and_broken_files_keep_the_old_ones() {
    let sink = Sink::start(Mode::Ok).await;
    let ca_slot = std::sync::Mutex::new(None);
    let g = TlsGateway::start(&sink, "reload_interval_s = 1", |dir| {
        let ca = Ca::new(dir, "server-ca");
        ca.sign("server", client("localhost", false));
        let vendor_ca = Ca::new(dir, "vendor-ca");
        vendor_ca.sign("acme", client("acme", true));
        *ca_slot.lock().expect("lock") = Some(ca);
        String::new()
    })
    .await;
    let ca = ca_slot.lock().expect("lock").take().expect("ca");
    let cfg = g.cfg(None);
    let first = server_cert(&g.main, &cfg).await;

    // A new certificate on disk: new connections see it, on both ports, without a restart.
    let second = rotate_server_cert(&g.certs, &ca);
    assert_ne!(first, second);
    wait_for_cert(
        &g.main,
        &cfg,
        &second,
        "main port never served the new certificate",
    )
    .await;
    let acme = g.cfg(Some("acme"));
    let (status, _) = post(&g.vendor, &acme, "acme", "r-1", &[])
        .await
        .expect("vendor port after reload");
    assert_eq!(status, 202);
    assert_eq!(server_cert(&g.vendor, &acme).await, second);

    // A broken file: the previous certificate stays in force.
    std::fs::write(
        g.certs.join("server.crt"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(server_cert(&g.main, &cfg).await, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates() {
    let sink = Sink::start(Mode::Ok).await;
    let ca_slot = std::sync::Mutex::new(None);
    // Polling effectively off: only the signal can reload.
    let mut g = TlsGateway::start(&sink, "reload_interval_s = 3600", |dir| {
        let ca = Ca::new(dir, "server-ca");
        ca.sign("server", client("localhost", false));
        Ca::new(dir, "vendor-ca");
        *ca_slot.lock().expect("lock") = Some(ca);
        String::new()
    })
    .await;
    let ca = ca_slot.lock().expect("lock").take().expect("ca");
    let cfg = g.cfg(None);
    let first = server_cert(&g.main, &cfg).await;
    let second = rotate_server_cert(&g.certs, &ca);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        server_cert(&g.main, &cfg).await,
        first,
        "reloaded without SIGHUP"
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &g.gw.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    wait_for_cert(
        &g.main,
        &cfg,
        &second,
        "never served the certificate after SIGHUP",
    )
    .await;
    assert!(
        g.gw.wait_exit(Duration::from_millis(200)).is_none(),
        "SIGHUP must not stop the gateway"
    );
    // SIGTERM still stops it cleanly with TLS listeners.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &g.gw.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status =
        g.gw.wait_exit(Duration::from_secs(15))
            .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

fn check(cfg: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        format!(
            "[mappings]\ndir = {:?}\n{cfg}",
            repo_path("mappings").display().to_string()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_refuses_plaintext_on_network_addresses_and_unusable_tls_files() {
    let (ok, err) = check("[server]\nlisten = \"0.0.0.0:8080\"\n");
    assert!(!ok);
    assert!(
        err.contains("server.listen") && err.contains("allow_plaintext"),
        "{err}"
    );
    // A network address also needs [auth] (docs/security.md); with both, plain HTTP behind a
    // TLS-terminating proxy is accepted.
    let (ok, err) = check(
        "[server]\nlisten = \"0.0.0.0:8080\"\nallow_plaintext = true\n\
         [auth]\nissuer = \"https://idp.example\"\naudience = \"knutepunkt\"\n\
         jwks_url = \"https://idp.example/jwks\"\n",
    );
    assert!(ok, "{err}");
    let (ok, err) = check("[server]\nlisten = \"127.0.0.1:8080\"\n");
    assert!(ok, "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, err) = check(&format!(
        "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\ncert_file = {:?}\nkey_file = \"/nonexistent/server.key\"\n",
        dir.path().join("missing.crt").display().to_string()
    ));
    assert!(!ok);
    assert!(
        err.contains("tls.cert_file") && err.contains("missing.crt"),
        "{err}"
    );

    let (ok, err) = check(
        "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nvendor_listen = \"nope\"\nrevoked_serials = [\"xyz\"]\nrevoked_fingerprints = [\"abcd\"]\n[[tls.client]]\nsubject_cn = \"acme\"\nvendor = \"Acme Inc\"\n",
    );
    assert!(!ok);
    for field in [
        "tls.vendor_listen",
        "tls.client_ca_file",
        "tls.revoked_serials",
        "tls.revoked_fingerprints",
        "tls.client[0] (acme).vendor",
    ] {
        assert!(err.contains(field), "{field} missing in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_normal_clients_are_served() {
    let sink = Sink::start(Mode::Ok).await;
    let g = TlsGateway::start(
        &sink,
        "header_read_timeout_s = 3\nhandshake_timeout_s = 3",
        standard_pki,
    )
    .await;
    let cfg = g.cfg(None);

    // Slowloris: a valid TLS session whose request head arrives one byte per second.
    let main = g.main.clone();
    let slow_cfg = Arc::clone(&cfg);
    let slow = tokio::spawn(async move {
        let tcp = TcpStream::connect(&main).await.expect("connect");
        let mut tls = TlsConnector::from(slow_cfg)
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("handshake");
        let started = Instant::now();
        let head =
            b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for b in head {
            if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                return (started.elapsed(), Instant::now(), false);
            }
            // A closed connection shows up as EOF on a read that does not block.
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), Instant::now(), false),
                Ok(Ok(_)) => {
                    // hyper may answer 408 before closing: the request never completed.
                    return (started.elapsed(), Instant::now(), false);
                }
                Err(_) => {}
            }
        }
        (started.elapsed(), Instant::now(), true)
    });
    // A silent TCP client (no ClientHello) is dropped after the handshake timeout.
    let main = g.main.clone();
    let silent = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(&main).await.expect("connect");
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
        (started.elapsed(), r.is_ok())
    });

    // Meanwhile ordinary requests are answered promptly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let started = Instant::now();
        let (status, _, _) = https(&g.main, &cfg, "GET", "/healthz", &[], "")
            .await
            .expect("normal client");
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "request {i} took {:?}",
            started.elapsed()
        );
        let (status, _) = post(
            &g.vendor,
            &g.cfg(Some("acme")),
            "acme",
            &format!("n-{i}"),
            &[],
        )
        .await
        .expect("vendor client");
        assert_eq!(status, 202);
    }
    let normal_done = Instant::now();

    // A request head above tls.max_header_bytes (16 KiB default) is refused with 431.
    let big = "a".repeat(20_000);
    let r = https(&g.main, &cfg, "GET", "/healthz", &[("x-big", &big)], "").await;
    assert!(matches!(r, Ok((431, _, _))), "oversized head: {r:?}");

    let (slow_for, slow_cut, finished) = slow.await.expect("slow task");
    assert!(!finished, "the slow client was never cut off");
    assert!(
        slow_for >= Duration::from_millis(2500) && slow_for < Duration::from_secs(12),
        "cut off after {slow_for:?}, expected about the 3 s header timeout"
    );
    assert!(
        normal_done < slow_cut,
        "normal clients were only served after the slow one was cut off"
    );
    let (silent_for, closed) = silent.await.expect("silent task");
    assert!(
        closed,
        "a client that never sends a ClientHello must be dropped"
    );
    assert!(
        silent_for >= Duration::from_millis(2500) && silent_for < Duration::from_secs(12),
        "dropped after {silent_for:?}"
    );
}
