//! Configuration: raw serde types (this file) → pure `validate` → `ValidConfig` → build.
//!
//! Every key is documented in `docs/configuration.md`; `deploy/knutepunkt.example.toml` is the
//! commented example that `knutepunkt check` must accept (a test enforces it).

pub mod adapter;
pub mod alarm;
pub mod auth;
pub mod ingest_vendor;
pub mod ops;
pub mod validate;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use validate::{
    ConfigError, PgUrl, Storage, ValidConfig, ValidDestination, ValidRoute, ValidTls, load, parse,
    validate,
};

/// Top-level config file. Every section has defaults, so an empty file (or none) is valid.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    pub mappings: MappingsConfig,
    #[serde(rename = "destination")]
    pub destinations: Vec<DestinationConfig>,
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// TLS on the inbound listeners; absent means plain HTTP (see `server.allow_plaintext`).
    pub tls: Option<TlsConfig>,
    /// Inbound OAuth2 bearer tokens; absent = open API (loopback listener only).
    pub auth: Option<auth::AuthConfig>,
    pub escalation: alarm::EscalationConfig,
    pub deactivation: alarm::DeactivationConfig,
    pub telemetry: ops::TelemetryConfig,
    pub log: ops::LogConfig,
    pub audit: ops::AuditConfig,
    pub no_contact: alarm::NoContactConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP listener (ingest, admin, health).
    pub listen: String,
    /// Seconds to let in-flight requests and deliveries finish on SIGTERM/SIGINT.
    pub shutdown_grace_s: u64,
    /// Accept a non-loopback `listen` address without `[tls]` (TLS terminated by a proxy).
    pub allow_plaintext: bool,
    /// Worker threads of the async runtime; unset: see [`ValidConfig::worker_threads`].
    pub worker_threads: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            shutdown_grace_s: 10,
            allow_plaintext: false,
            worker_threads: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite` (embedded, default) or `postgres`.
    pub kind: String,
    /// Directory for the embedded journal (`journal.sqlite3` and its WAL).
    pub data_dir: PathBuf,
    /// Most commands (ingests, outcomes, claims) that share one transaction and one fsync.
    pub max_batch: usize,
    /// Capacity of the writer queue; when full, ingest answers 503 with Retry-After.
    pub queue_capacity: usize,
    /// PostgreSQL connection string (key=value or `postgres://` URL), for `kind = "postgres"`.
    pub url: Option<String>,
    /// Name of an environment variable holding the connection string instead (keeps a
    /// password out of the config file, e.g. from a Kubernetes Secret).
    pub url_env: Option<String>,
    /// PEM file with the CA(s) that signed the PostgreSQL server certificate; when set, TLS is
    /// required and the server name is verified.
    pub tls_ca_file: Option<PathBuf>,
    /// PostgreSQL connections for reads and claims (the writer has its own).
    pub pool_size: usize,
    /// Seconds a node holds a lane before another node may take it over (PostgreSQL).
    pub lease_s: u64,
    /// Writer connections per node, each committing its own batches (PostgreSQL).
    pub writers: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: "sqlite".into(),
            data_dir: PathBuf::from("./data"),
            max_batch: 512,
            queue_capacity: 8192,
            url: None,
            url_env: None,
            tls_ca_file: None,
            pool_size: 8,
            lease_s: 30,
            writers: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest accepted request body in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Most ingest requests processed at once; beyond that ingest answers 503 + Retry-After.
    pub max_in_flight: usize,
    /// Seconds a vendor is told to wait in `Retry-After` when the gateway sheds load.
    pub retry_after_s: u64,
    /// Seconds an ingest request may take in total (reading the body, mapping, durable commit).
    pub request_timeout_s: u64,
    /// Largest JSON nesting depth accepted in a vendor body.
    pub max_json_depth: usize,
    /// Largest XML element nesting depth accepted in a vendor body.
    pub max_xml_depth: usize,
    /// Per-vendor limits (`[ingest.vendor.<name>]`), keyed by the mapping file's vendor name.
    pub vendor: std::collections::BTreeMap<String, ingest_vendor::VendorIngestConfig>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_in_flight: 4096,
            retry_after_s: 1,
            request_timeout_s: 30,
            max_json_depth: 64,
            max_xml_depth: crate::normalise::xml::MAX_DEPTH,
            vendor: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingsConfig {
    /// Directory holding one `*.toml` mapping file per vendor.
    pub dir: PathBuf,
}

impl Default for MappingsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./mappings"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    pub name: String,
    /// Absolute http(s) URL the FHIR Bundle is POSTed to.
    pub url: String,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Lanes of this destination delivered at once (non-alarm lanes).
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Extra slots reserved for alarm lanes, so alarms never wait for a measurement slot.
    #[serde(default = "defaults::alarm_concurrency")]
    pub alarm_concurrency: usize,
    #[serde(default)]
    pub retry: RetryConfig,
    /// PEM client certificate (chain) presented to the destination (mTLS).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// OAuth2 client credentials (`private_key_jwt`) for the destination's access token.
    #[serde(default)]
    pub oauth: Option<auth::DestinationOAuth>,
    /// Seconds within which an alarm must be delivered (2xx) before it escalates; unset: never.
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// Destination that also receives an alarm that escalated here.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Adapter: `fhir-bundle` (default), `fhir-rest`, `vkp`, `jft` or `pmd` (docs/adapters.md).
    #[serde(default)]
    pub kind: Option<String>,
    /// Municipality organisation number in the VKP path (`kind = "vkp"`).
    #[serde(default)]
    pub orgnr: Option<String>,
    /// Municipality number tagged on PMD Bundles (`kind = "pmd"`).
    #[serde(default)]
    pub municipality: Option<String>,
    /// Milliseconds between JFT status polls (`kind = "jft"`).
    #[serde(default)]
    pub status_poll_ms: Option<u64>,
    /// Seconds a JFT status is polled before the attempt ends (`kind = "jft"`).
    #[serde(default)]
    pub status_window_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff ceiling in milliseconds; doubles per attempt (full jitter below it).
    pub base_delay_ms: u64,
    /// Largest backoff in milliseconds.
    pub max_delay_ms: u64,
    /// Attempts before the delivery is dead-lettered.
    pub max_attempts: u32,
    /// Seconds after the event was stored at which it is dead-lettered instead of retried.
    pub max_age_s: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base_delay_ms: 500,
            max_delay_ms: 60_000,
            max_attempts: 50,
            max_age_s: 86_400,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Vendors this route matches; empty means any.
    #[serde(default)]
    pub vendors: Vec<String>,
    /// Categories: alarm, event, measurement, medication, note; empty means any.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Municipality numbers (4 digits); empty means any.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Priorities: critical, high, normal, low; empty means any.
    #[serde(default)]
    pub priorities: Vec<String>,
    pub destinations: Vec<String>,
}

/// `[tls]`: server certificate for both listeners, client certificates on the vendor port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM server certificate chain (leaf first).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the server certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle that signs vendor client certificates; required with `vendor_listen`.
    pub client_ca_file: Option<PathBuf>,
    /// Second listener that requires a client certificate and serves only ingest.
    pub vendor_listen: Option<String>,
    /// Revoked client certificate serial numbers (hex, colons allowed).
    pub revoked_serials: Vec<String>,
    /// Revoked client certificates by SHA-256 fingerprint of the DER (hex, colons allowed).
    pub revoked_fingerprints: Vec<String>,
    /// Seconds a client may take to complete the TLS handshake.
    pub handshake_timeout_s: u64,
    /// Seconds a client may take to send the request headers (slowloris guard).
    pub header_read_timeout_s: u64,
    /// Largest request head (request line and headers) in bytes; at least 8192.
    pub max_header_bytes: usize,
    /// Seconds between checks of the certificate files for changes; also reloaded on SIGHUP.
    pub reload_interval_s: u64,
    /// Client certificate subject CN → vendor name.
    #[serde(rename = "client")]
    pub clients: Vec<TlsClientConfig>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            vendor_listen: None,
            revoked_serials: Vec::new(),
            revoked_fingerprints: Vec::new(),
            handshake_timeout_s: 10,
            header_read_timeout_s: 10,
            max_header_bytes: 16 * 1024,
            reload_interval_s: 5,
            clients: Vec::new(),
        }
    }
}

/// `[[tls.client]]`: which vendor a client certificate speaks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// The certificate's subject common name (CN), matched exactly.
    pub subject_cn: String,
    /// The vendor (mapping file `vendor`) this certificate may post for.
    pub vendor: String,
}

mod defaults {
    pub fn timeout_ms() -> u64 {
        10_000
    }
    pub fn concurrency() -> usize {
        32
    }
    pub fn alarm_concurrency() -> usize {
        8
    }
}

/// Where a config came from, for error messages.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: String,
}

impl Source {
    pub fn defaults() -> Self {
        Self {
            file: "<defaults>".into(),
        }
    }
    pub fn file(path: &Path) -> Self {
        Self {
            file: path.display().to_string(),
        }
    }
}
