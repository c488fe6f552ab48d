//! Pure validation: no IO, every error at once, each naming file and field.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{RawConfig, RetryConfig, Source};
use crate::normalise::{Category, Priority};

/// One problem in a config or mapping file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.field, self.message)
    }
}

/// Which journal backend to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    Sqlite {
        data_dir: PathBuf,
    },
    Postgres {
        url: PgUrl,
        tls_ca_file: Option<PathBuf>,
        pool_size: usize,
        writers: usize,
        lease: Duration,
    },
}

/// Where the PostgreSQL connection string comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgUrl {
    Literal(String),
    /// Read from this environment variable when the journal is built.
    Env(String),
}

impl PgUrl {
    /// The connection string; reads the environment for `Env`.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            PgUrl::Literal(s) => Ok(s.clone()),
            PgUrl::Env(var) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} (storage.url_env) is not set")),
        }
    }
}

/// A config that passed validation; `build` code may rely on every invariant checked here.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// `server.worker_threads` as set (1..=256); `None` for the default of `worker_threads(cores)`.
    pub worker_threads: Option<usize>,
    pub storage: Storage,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub retry_after_s: u64,
    pub request_timeout: Duration,
    pub max_json_depth: usize,
    pub max_xml_depth: usize,
    /// Per-vendor limits by vendor name (names checked against the mappings by
    /// `ingest_vendor::check_known_vendors`).
    pub vendor_limits: std::collections::BTreeMap<String, super::ingest_vendor::ValidVendorLimits>,
    pub mappings_dir: PathBuf,
    pub destinations: Vec<ValidDestination>,
    pub routes: Vec<ValidRoute>,
    /// TLS on the listeners; `None` serves plain HTTP.
    pub tls: Option<ValidTls>,
    /// `None`: open API (only allowed on a loopback listener).
    pub auth: Option<super::auth::ValidAuth>,
    /// `[escalation]` and `[deactivation]`.
    pub alarm: super::alarm::ValidAlarm,
    /// `[telemetry]`, `[log]`, `[audit]`.
    pub ops: super::ops::ValidOps,
}

const MAX_WORKER_THREADS: usize = 256;

impl ValidConfig {
    /// Worker threads for the async runtime on a machine with `cores` cores: as configured, else
    /// one per core, less the one the embedded journal's writer thread needs to itself. On two
    /// cores a second worker preempted the writer, which every event passes twice, and cost
    /// 6–12 % of the end-to-end throughput (BENCHMARKS.md, 2026-12-05). With PostgreSQL the
    /// writing happens in the database server.
    pub fn worker_threads(&self, cores: usize) -> usize {
        let cores = cores.max(1);
        self.worker_threads.unwrap_or(match self.storage {
            Storage::Sqlite { .. } => (cores - 1).max(1),
            Storage::Postgres { .. } => cores,
        })
    }
}

/// `[tls]` after validation: both server files set; the vendor port has a CA; revocation
/// entries normalised to lowercase hex without colons (serials without leading zeros).
#[derive(Debug, Clone)]
pub struct ValidTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub vendor_listen: Option<SocketAddr>,
    pub revoked_serials: HashSet<String>,
    pub revoked_fingerprints: HashSet<String>,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub reload_interval: Duration,
    /// Subject CN → vendor name.
    pub clients: std::collections::HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ValidDestination {
    pub name: String,
    pub url: String,
    pub timeout: Duration,
    pub concurrency: usize,
    pub alarm_concurrency: usize,
    pub retry: RetryConfig,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub oauth: Option<super::auth::DestinationOAuth>,
    /// Alarm deliveries not delivered this long after they were stored escalate.
    pub deadline: Option<Duration>,
    /// Destination that also gets an escalated alarm.
    pub fallback: Option<String>,
    /// How requests are built and answers classified (`kind`).
    pub adapter: crate::deliver::adapter::Adapter,
}

#[derive(Debug, Clone)]
pub struct ValidRoute {
    pub name: String,
    pub vendors: Vec<String>,
    pub categories: Vec<Category>,
    pub tenants: Vec<String>,
    pub priorities: Vec<Priority>,
    pub destinations: Vec<String>,
}

/// Reads and parses a config file (or the defaults when `path` is `None`), then validates it.
pub fn load(path: Option<&Path>) -> Result<ValidConfig, Vec<ConfigError>> {
    let (raw, source) = parse(path)?;
    validate(&raw, &source)
}

/// Reads and parses a config file without validating it (the defaults when `path` is `None`).
pub fn parse(path: Option<&Path>) -> Result<(RawConfig, Source), Vec<ConfigError>> {
    let Some(path) = path else {
        return Ok((RawConfig::default(), Source::defaults()));
    };
    let source = Source::file(path);
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: source.file.clone(),
            field: "-".into(),
            message: e.to_string(),
        }]
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| {
        vec![ConfigError {
            file: source.file.clone(),
            field: toml_position(&text, &e),
            message: e.message().to_string(),
        }]
    })?;
    Ok((raw, source))
}

/// "line N" of a TOML error, 1-based.
pub fn toml_position(text: &str, e: &toml::de::Error) -> String {
    e.span().map_or("-".to_string(), |s| {
        let upto = &text.as_bytes()[..s.start.min(text.len())];
        format!("line {}", upto.iter().filter(|&&b| b == b'\n').count() + 1)
    })
}

/// Checks every rule and returns all violations, or the validated config.
pub fn validate(raw: &RawConfig, source: &Source) -> Result<ValidConfig, Vec<ConfigError>> {
    let mut errs = Errors {
        file: &source.file,
        list: Vec::new(),
    };

    let listen = raw.server.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        errs.push(
            "server.listen",
            format!(
                "{:?} is not an address, e.g. \"127.0.0.1:8080\"",
                raw.server.listen
            ),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    if let Some(n) = raw.server.worker_threads
        && !(1..=MAX_WORKER_THREADS).contains(&n)
    {
        errs.push(
            "server.worker_threads",
            format!("{n} is out of range: 1 to {MAX_WORKER_THREADS}, or leave it unset"),
        );
    }
    let storage = match raw.storage.kind.as_str() {
        "sqlite" => {
            if raw.storage.data_dir.as_os_str().is_empty() {
                errs.push("storage.data_dir", "must not be empty, e.g. \"./data\"");
            }
            Storage::Sqlite {
                data_dir: raw.storage.data_dir.clone(),
            }
        }
        "postgres" => {
            let url = match (&raw.storage.url, &raw.storage.url_env) {
                (Some(url), None) => {
                    if url.parse::<tokio_postgres::Config>().is_err() {
                        errs.push(
                            "storage.url",
                            "must be a PostgreSQL connection string, e.g. \"postgres://knutepunkt@127.0.0.1/knutepunkt\"",
                        );
                    }
                    PgUrl::Literal(url.clone())
                }
                (None, Some(var)) if !var.trim().is_empty() => PgUrl::Env(var.clone()),
                _ => {
                    errs.push(
                        "storage.url",
                        "set exactly one of storage.url or storage.url_env",
                    );
                    PgUrl::Literal(String::new())
                }
            };
            positive(&mut errs, "storage.pool_size", raw.storage.pool_size as u64);
            positive(&mut errs, "storage.writers", raw.storage.writers as u64);
            let slowest = raw
                .destinations
                .iter()
                .map(|d| {
                    // JFT attempts poll the status after the POST.
                    let poll = if d.kind.as_deref() == Some("jft") {
                        d.status_window_s.unwrap_or(15).saturating_mul(1000)
                    } else {
                        0
                    };
                    d.timeout_ms.saturating_add(poll)
                })
                .max()
                .unwrap_or(0);
            if raw.storage.lease_s.saturating_mul(1000) <= slowest.saturating_add(1000) {
                errs.push(
                    "storage.lease_s",
                    format!(
                        "must exceed the slowest destination timeout ({slowest} ms) by at least 1 s"
                    ),
                );
            }
            Storage::Postgres {
                url,
                tls_ca_file: raw.storage.tls_ca_file.clone(),
                pool_size: raw.storage.pool_size,
                writers: raw.storage.writers,
                lease: Duration::from_secs(raw.storage.lease_s),
            }
        }
        other => {
            errs.push(
                "storage.kind",
                format!("{other:?} is not a storage kind; use \"sqlite\" or \"postgres\""),
            );
            Storage::Sqlite {
                data_dir: raw.storage.data_dir.clone(),
            }
        }
    };
    positive(&mut errs, "storage.max_batch", raw.storage.max_batch as u64);
    positive(
        &mut errs,
        "storage.queue_capacity",
        raw.storage.queue_capacity as u64,
    );
    positive(
        &mut errs,
        "ingest.max_body_bytes",
        raw.ingest.max_body_bytes as u64,
    );
    positive(
        &mut errs,
        "ingest.max_in_flight",
        raw.ingest.max_in_flight as u64,
    );
    positive(
        &mut errs,
        "ingest.request_timeout_s",
        raw.ingest.request_timeout_s,
    );
    positive(
        &mut errs,
        "ingest.max_json_depth",
        raw.ingest.max_json_depth as u64,
    );
    positive(
        &mut errs,
        "ingest.max_xml_depth",
        raw.ingest.max_xml_depth as u64,
    );
    let vendor_limits =
        super::ingest_vendor::validate(errs.file, &raw.ingest.vendor, &mut errs.list);

    let destinations = validate_destinations(raw, &mut errs);
    let routes = validate_routes(raw, &destinations, &mut errs);
    let tls = validate_tls(raw, listen, &mut errs);
    let auth = super::auth::validate_auth(raw.auth.as_ref(), &listen, &mut |f, m| errs.push(f, m));
    let alarm = super::alarm::validate(raw, &destinations, &mut errs);
    let (ops, ops_errs) = super::ops::validate(&raw.telemetry, &raw.log, &raw.audit);
    for (field, message) in ops_errs {
        errs.push(field, message);
    }

    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(ValidConfig {
        listen,
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_s),
        worker_threads: raw.server.worker_threads,
        storage,
        max_batch: raw.storage.max_batch,
        queue_capacity: raw.storage.queue_capacity,
        max_body_bytes: raw.ingest.max_body_bytes,
        max_in_flight: raw.ingest.max_in_flight,
        retry_after_s: raw.ingest.retry_after_s.max(1),
        request_timeout: Duration::from_secs(raw.ingest.request_timeout_s),
        max_json_depth: raw.ingest.max_json_depth,
        max_xml_depth: raw.ingest.max_xml_depth,
        vendor_limits,
        mappings_dir: raw.mappings.dir.clone(),
        destinations,
        routes,
        tls,
        auth,
        alarm,
        ops,
    })
}

fn validate_tls(raw: &RawConfig, listen: SocketAddr, errs: &mut Errors<'_>) -> Option<ValidTls> {
    let Some(t) = &raw.tls else {
        // Plain HTTP is for development on loopback, or behind a proxy that terminates TLS.
        if !listen.ip().is_loopback() && !raw.server.allow_plaintext {
            errs.push(
                "server.listen",
                format!(
                    "{listen} is reachable from the network but [tls] is not configured; \
                     configure [tls] (cert_file, key_file), or set server.allow_plaintext = true \
                     when a proxy in front terminates TLS"
                ),
            );
        }
        return None;
    };
    let mut file = |field: &str, v: &Option<PathBuf>, required: bool| match v {
        Some(p) if !p.as_os_str().is_empty() => Some(p.clone()),
        Some(_) => {
            errs.push(field, "must not be empty");
            None
        }
        None => {
            if required {
                errs.push(
                    field,
                    "is required in [tls], e.g. \"/etc/knutepunkt/tls/server.crt\"",
                );
            }
            None
        }
    };
    let cert_file = file("tls.cert_file", &t.cert_file, true);
    let key_file = file("tls.key_file", &t.key_file, true);
    let client_ca_file = file("tls.client_ca_file", &t.client_ca_file, false);
    let vendor_listen = t
        .vendor_listen
        .as_ref()
        .and_then(|v| match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(
                    "tls.vendor_listen",
                    format!("{v:?} is not an address, e.g. \"0.0.0.0:8443\""),
                );
                None
            }
        });
    if let Some(v) = vendor_listen
        && v.port() != 0
        && v == listen
    {
        errs.push("tls.vendor_listen", "must differ from server.listen");
    }
    match (t.vendor_listen.is_some(), client_ca_file.is_some()) {
        (true, false) => errs.push(
            "tls.client_ca_file",
            "is required with tls.vendor_listen: the CA bundle that signs vendor client certificates",
        ),
        (false, true) => errs.push(
            "tls.client_ca_file",
            "is only used by the vendor port; set tls.vendor_listen too",
        ),
        _ => {}
    }
    let mut revoked_serials = HashSet::new();
    for s in &t.revoked_serials {
        match normal_hex(s) {
            Some(h) if !h.is_empty() && h.len() <= 40 => {
                revoked_serials.insert(normal_serial(&h));
            }
            _ => errs.push(
                "tls.revoked_serials",
                format!("{s:?} is not a hex serial number, e.g. \"1f:a3:09\" or \"1FA309\""),
            ),
        }
    }
    let mut revoked_fingerprints = HashSet::new();
    for s in &t.revoked_fingerprints {
        match normal_hex(s) {
            Some(h) if h.len() == 64 => {
                revoked_fingerprints.insert(h);
            }
            _ => errs.push(
                "tls.revoked_fingerprints",
                format!("{s:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"),
            ),
        }
    }
    positive(errs, "tls.handshake_timeout_s", t.handshake_timeout_s);
    positive(errs, "tls.header_read_timeout_s", t.header_read_timeout_s);
    positive(errs, "tls.reload_interval_s", t.reload_interval_s);
    // hyper refuses read buffers below 8 KiB.
    if !(8192..=1024 * 1024).contains(&t.max_header_bytes) {
        errs.push("tls.max_header_bytes", "must be between 8192 and 1048576");
    }
    let mut clients = std::collections::HashMap::new();
    for (i, c) in t.clients.iter().enumerate() {
        let at = |field: &str| format!("tls.client[{i}] ({}).{field}", c.subject_cn);
        if c.subject_cn.trim().is_empty() || c.subject_cn.trim() != c.subject_cn {
            errs.push(
                at("subject_cn"),
                "must be non-empty without surrounding spaces",
            );
        }
        if !valid_name(&c.vendor) {
            errs.push(at("vendor"), "must be a vendor name (a-z, 0-9, '-', '_')");
        }
        if clients
            .insert(c.subject_cn.clone(), c.vendor.clone())
            .is_some()
        {
            errs.push(
                at("subject_cn"),
                "duplicate subject_cn: one certificate identity maps to one vendor",
            );
        }
    }
    if !t.clients.is_empty() && t.vendor_listen.is_none() {
        errs.push(
            "tls.client",
            "client certificates are only used by the vendor port; set tls.vendor_listen",
        );
    }
    Some(ValidTls {
        cert_file: cert_file?,
        key_file: key_file?,
        client_ca_file,
        vendor_listen,
        revoked_serials,
        revoked_fingerprints,
        handshake_timeout: Duration::from_secs(t.handshake_timeout_s),
        header_read_timeout: Duration::from_secs(t.header_read_timeout_s),
        max_header_bytes: t.max_header_bytes,
        reload_interval: Duration::from_secs(t.reload_interval_s),
        clients,
    })
}

/// A serial number's hex without leading zeros (DER may pad a positive serial with `00`).
pub(crate) fn normal_serial(hex: &str) -> String {
    match hex.trim_start_matches('0') {
        "" => "0".into(),
        h => h.into(),
    }
}

/// Lowercase hex without `:` separators, or `None` if anything else is in it.
pub(crate) fn normal_hex(s: &str) -> Option<String> {
    let h: String = s.trim().chars().filter(|&c| c != ':').collect();
    h.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| h.to_ascii_lowercase())
}

fn validate_destinations(raw: &RawConfig, errs: &mut Errors<'_>) -> Vec<ValidDestination> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, d) in raw.destinations.iter().enumerate() {
        let at = |field: &str| format!("destination[{i}] ({}).{field}", d.name);
        if !valid_name(&d.name) {
            errs.push(
                at("name"),
                "must be 1-64 characters of a-z, 0-9, '-' or '_', e.g. \"epj-oslo\"",
            );
        }
        if !seen.insert(d.name.clone()) {
            errs.push(
                at("name"),
                format!("duplicate destination name {:?}", d.name),
            );
        }
        let url_ok = (d.url.starts_with("http://") || d.url.starts_with("https://"))
            && reqwest::Url::parse(&d.url).is_ok_and(|u| u.host().is_some());
        if !url_ok {
            errs.push(
                at("url"),
                format!(
                    "{:?} is not an absolute http(s) URL, e.g. \"https://epj.example/fhir\"",
                    d.url
                ),
            );
        }
        positive(errs, &at("timeout_ms"), d.timeout_ms);
        positive(errs, &at("concurrency"), d.concurrency as u64);
        positive(errs, &at("alarm_concurrency"), d.alarm_concurrency as u64);
        positive(errs, &at("retry.base_delay_ms"), d.retry.base_delay_ms);
        positive(
            errs,
            &at("retry.max_attempts"),
            u64::from(d.retry.max_attempts),
        );
        positive(errs, &at("retry.max_age_s"), d.retry.max_age_s);
        if d.retry.max_delay_ms < d.retry.base_delay_ms {
            errs.push(
                at("retry.max_delay_ms"),
                "must be at least retry.base_delay_ms",
            );
        }
        super::auth::validate_outbound(
            d.client_cert_file.as_ref(),
            d.client_key_file.as_ref(),
            d.oauth.as_ref(),
            &mut |f, m| errs.push(at(f), m),
        );
        out.push(ValidDestination {
            name: d.name.clone(),
            url: d.url.clone(),
            timeout: Duration::from_millis(d.timeout_ms),
            concurrency: d.concurrency,
            alarm_concurrency: d.alarm_concurrency,
            retry: d.retry.clone(),
            client_cert_file: d.client_cert_file.clone(),
            client_key_file: d.client_key_file.clone(),
            oauth: d.oauth.clone(),
            deadline: d.deadline_s.map(Duration::from_secs),
            fallback: d.fallback.clone(),
            adapter: super::adapter::validate(i, d, errs),
        });
    }
    out
}

fn validate_routes(
    raw: &RawConfig,
    destinations: &[ValidDestination],
    errs: &mut Errors<'_>,
) -> Vec<ValidRoute> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let at = |field: &str| format!("route[{i}] ({}).{field}", r.name);
        if !valid_name(&r.name) {
            errs.push(
                at("name"),
                "must be 1-64 characters of a-z, 0-9, '-' or '_'",
            );
        }
        if !seen.insert(r.name.clone()) {
            errs.push(at("name"), format!("duplicate route name {:?}", r.name));
        }
        let mut categories = Vec::new();
        for c in &r.categories {
            match c.parse::<Category>() {
                Ok(c) => categories.push(c),
                Err(e) => errs.push(at("categories"), e),
            }
        }
        let mut priorities = Vec::new();
        for p in &r.priorities {
            match p.parse::<Priority>() {
                Ok(p) => priorities.push(p),
                Err(e) => errs.push(at("priorities"), e),
            }
        }
        for t in &r.tenants {
            if !is_municipality_number(t) {
                errs.push(
                    at("tenants"),
                    format!("{t:?} is not a 4-digit municipality number, e.g. \"0301\""),
                );
            }
        }
        if r.destinations.is_empty() {
            errs.push(at("destinations"), "must name at least one destination");
        }
        for d in &r.destinations {
            if !destinations.iter().any(|v| &v.name == d) {
                errs.push(at("destinations"), format!("unknown destination {d:?}"));
            }
        }
        out.push(ValidRoute {
            name: r.name.clone(),
            vendors: r.vendors.clone(),
            categories,
            tenants: r.tenants.clone(),
            priorities,
            destinations: r.destinations.clone(),
        });
    }
    out
}

/// Municipality numbers are four digits (kommunenummer).
pub fn is_municipality_number(s: &str) -> bool {
    s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn positive(errs: &mut Errors<'_>, field: &str, v: u64) {
    if v == 0 {
        errs.push(field, "must be greater than 0");
    }
}

pub(super) struct Errors<'a> {
    file: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ValidConfig, Vec<ConfigError>> {
        let raw: RawConfig = toml::from_str(text).expect("toml");
        validate(
            &raw,
            &Source {
                file: "t.toml".into(),
            },
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("").expect("valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            c.storage,
            Storage::Sqlite {
                data_dir: PathBuf::from("./data")
            }
        );
        assert_eq!(c.mappings_dir, PathBuf::from("./mappings"));
    }

    #[test]
    fn reports_every_error_with_field() {
        let errs = parse(
            r#"
            server.listen = "nope"
            [[destination]]
            name = "Bad Name"
            url = "ftp://x"
            concurrency = 0
            [[route]]
            name = "r"
            categories = ["alarm", "gossip"]
            tenants = ["31"]
            destinations = ["missing"]
            "#,
        )
        .expect_err("invalid");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"server.listen"), "{errs:?}");
        assert!(
            fields.contains(&"destination[0] (Bad Name).name"),
            "{errs:?}"
        );
        assert!(
            fields.contains(&"destination[0] (Bad Name).url"),
            "{errs:?}"
        );
        assert!(
            fields.contains(&"destination[0] (Bad Name).concurrency"),
            "{errs:?}"
        );
        assert!(fields.contains(&"route[0] (r).categories"), "{errs:?}");
        assert!(fields.contains(&"route[0] (r).tenants"), "{errs:?}");
        assert!(fields.contains(&"route[0] (r).destinations"), "{errs:?}");
        assert!(errs.iter().all(|e| e.file == "t.toml"));
    }

    #[test]
    fn worker_threads_leave_the_embedded_writer_a_core() {
        let embedded = parse("").expect("valid");
        assert_eq!(embedded.worker_threads(2), 1);
        assert_eq!(embedded.worker_threads(8), 7);
        assert_eq!(embedded.worker_threads(1), 1);
        assert_eq!(embedded.worker_threads(0), 1);
        let pg = parse(
            r#"
            [storage]
            kind = "postgres"
            url = "host=db"
            "#,
        )
        .expect("valid");
        assert_eq!(pg.worker_threads(2), 2);
        let set = parse("server.worker_threads = 3").expect("valid");
        assert_eq!(set.worker_threads(2), 3);
        for bad in ["0", "257"] {
            let errs = parse(&format!("server.worker_threads = {bad}")).expect_err("invalid");
            assert!(
                errs.iter().any(|e| e.field == "server.worker_threads"),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let raw: Result<RawConfig, _> = toml::from_str("[server]\nlisten_on = \"x\"");
        assert!(raw.is_err());
    }
}
