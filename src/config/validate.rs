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
    pub storage: Storage,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub retry_after_s: u64,
    pub request_timeout: Duration,
    pub max_json_depth: usize,
    pub mappings_dir: PathBuf,
    pub destinations: Vec<ValidDestination>,
    pub routes: Vec<ValidRoute>,
    /// `[escalation]` and `[deactivation]`.
    pub alarm: super::alarm::ValidAlarm,
}

#[derive(Debug, Clone)]
pub struct ValidDestination {
    pub name: String,
    pub url: String,
    pub timeout: Duration,
    pub concurrency: usize,
    pub alarm_concurrency: usize,
    pub retry: RetryConfig,
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

    let destinations = validate_destinations(raw, &mut errs);
    let routes = validate_routes(raw, &destinations, &mut errs);
    let alarm = super::alarm::validate(raw, &destinations, &mut errs);

    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(ValidConfig {
        listen,
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_s),
        storage,
        max_batch: raw.storage.max_batch,
        queue_capacity: raw.storage.queue_capacity,
        max_body_bytes: raw.ingest.max_body_bytes,
        max_in_flight: raw.ingest.max_in_flight,
        retry_after_s: raw.ingest.retry_after_s.max(1),
        request_timeout: Duration::from_secs(raw.ingest.request_timeout_s),
        max_json_depth: raw.ingest.max_json_depth,
        mappings_dir: raw.mappings.dir.clone(),
        destinations,
        routes,
        alarm,
    })
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
        out.push(ValidDestination {
            name: d.name.clone(),
            url: d.url.clone(),
            timeout: Duration::from_millis(d.timeout_ms),
            concurrency: d.concurrency,
            alarm_concurrency: d.alarm_concurrency,
            retry: d.retry.clone(),
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
    fn unknown_keys_are_rejected() {
        let raw: Result<RawConfig, _> = toml::from_str("[server]\nlisten_on = \"x\"");
        assert!(raw.is_err());
    }
}
