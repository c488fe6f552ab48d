//! TLS on the inbound listeners (`[tls]`): the main port (admin, API, health, and ingest when
//! there is no vendor port) with a server certificate, and the vendor port (`tls.vendor_listen`)
//! that also requires a client certificate and serves only ingest.
//!
//! Vendor identity: the client certificate's subject CN, mapped to one vendor by
//! `[[tls.client]]`. Each request on the vendor port carries a [`VendorPeer`] extension; ingest
//! answers 403 when the URL vendor is not the certificate's vendor.
//!
//! Refused in the handshake (no HTTP answer): no client certificate, a chain to another CA,
//! an expired or not-yet-valid certificate, and a certificate revoked by config
//! (`tls.revoked_serials`, `tls.revoked_fingerprints`; checked by [`RevocationCheck`]).
//!
//! Certificates are reloaded without a restart on SIGHUP and when the files' modification time
//! or size changes (polled every `tls.reload_interval_s`). Every new connection reads the
//! current `ServerConfig`; a broken new file keeps the previous one and logs an error.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use x509_cert::der::{Decode, Tag, Tagged};

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::config::validate::normal_serial;
use crate::config::{ConfigError, ValidTls};
use crate::journal::AuditNote;
use crate::journal::audit_chain::hex;

/// Who is on the other end of a vendor-port connection, from its verified client certificate.
#[derive(Debug, Clone)]
pub struct VendorPeer {
    /// The vendor the certificate's subject CN maps to; `None` when no `[[tls.client]]` matches.
    pub vendor: Option<String>,
    pub subject_cn: Option<String>,
}

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{field} {}: {message}", path.display())]
pub struct TlsFileError {
    pub field: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// The rustls configs in force; replaced whole on reload.
#[derive(Clone)]
struct Built {
    main: Arc<ServerConfig>,
    vendor: Option<Arc<ServerConfig>>,
    /// Unix milliseconds at which the server certificate expires, for the log.
    expires_ms: Option<i64>,
}

impl Built {
    /// Says which certificate is in force; warns while there are fewer than 14 days left.
    fn log_loaded(&self, what: &str) {
        let Some(at) = self.expires_ms else {
            tracing::info!("{what}");
            return;
        };
        let expires = crate::journal::registry_text::instant(at);
        let left_ms = at - crate::clock::now_ms();
        if left_ms < 14 * 86_400_000 {
            tracing::warn!(%expires, "{what}; the server certificate expires within 14 days");
        } else {
            tracing::info!(%expires, "{what}");
        }
    }
}

type Current = Arc<RwLock<Built>>;

/// Details of handshake refusals for revoked certificates, to be written as audit notes (the
/// verifier runs inside rustls, without the journal). Bounded: under a flood the surplus is only
/// logged.
type RevokedNotes = tokio::sync::mpsc::Sender<String>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Port {
    Main,
    Vendor,
}

impl Port {
    fn label(self) -> &'static str {
        match self {
            Port::Main => "main",
            Port::Vendor => "vendor",
        }
    }
}

/// Built TLS listeners: certificates loaded, vendor port bound, not yet serving.
pub struct TlsListeners {
    settings: ValidTls,
    current: Current,
    vendor: Option<TcpListener>,
    notes_tx: RevokedNotes,
    notes: tokio::sync::mpsc::Receiver<String>,
}

impl TlsListeners {
    /// Reads the certificate files (a clear error naming the field and file when one is missing
    /// or unusable) and binds the vendor port.
    pub async fn bind(settings: &ValidTls) -> anyhow::Result<Self> {
        let (notes_tx, notes) = tokio::sync::mpsc::channel(64);
        let built = build(settings, Some(&notes_tx)).context("loading [tls] certificates")?;
        built.log_loaded("TLS certificates loaded");
        let vendor = match settings.vendor_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding tls.vendor_listen {addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            settings: settings.clone(),
            current: Arc::new(RwLock::new(built)),
            vendor,
            notes_tx,
            notes,
        })
    }

    pub fn vendor_addr(&self) -> Option<SocketAddr> {
        self.vendor.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves `main` (and the vendor port) until `shutdown` resolves, then stops accepting and
    /// lets open requests finish for up to `grace`.
    pub async fn serve(
        self,
        main: TcpListener,
        state: Arc<AppState>,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let opts = Arc::new(ConnOpts {
            handshake_timeout: self.settings.handshake_timeout,
            header_read_timeout: self.settings.header_read_timeout,
            max_header_bytes: self.settings.max_header_bytes,
            clients: self.settings.clients.clone(),
            grace,
        });
        let mut tasks = Vec::new();
        // Lives as long as the configs that hold senders; not awaited at shutdown.
        tokio::spawn(audit_revoked(self.notes, Arc::clone(&state)));
        let mut main_router = crate::app::http_router(Arc::clone(&state));
        if let Some(vendor) = self.vendor {
            // With a vendor port, ingest is only reachable with a client certificate.
            main_router = main_router.layer(axum::middleware::from_fn(refuse_ingest));
            let vendor_router = crate::ingest::router().with_state(Arc::clone(&state));
            tasks.push(tokio::spawn(accept_loop(
                vendor,
                Port::Vendor,
                Arc::clone(&self.current),
                vendor_router,
                Arc::clone(&opts),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(reload_loop(
            self.settings.clone(),
            Arc::clone(&self.current),
            self.notes_tx,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(accept_loop(
            main,
            Port::Main,
            Arc::clone(&self.current),
            main_router,
            opts,
            stop_rx,
        )));
        shutdown.await;
        // Both ports stop accepting at once and drain in parallel, each within `grace`.
        let _ = stop_tx.send(true);
        for t in tasks {
            t.await.context("TLS listener task")?;
        }
        Ok(())
    }
}

struct ConnOpts {
    handshake_timeout: Duration,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    clients: HashMap<String, String>,
    grace: Duration,
}

async fn refuse_ingest(req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/vendors/") {
        return ApiError::Forbidden {
            field: "tls.vendor_listen".into(),
            message: "vendors post events to the vendor port, with a client certificate".into(),
        }
        .into_response();
    }
    next.run(req).await
}

/// Accepts until `stop`, each connection in its own task: TLS handshake (bounded), then HTTP/1.1
/// with a header read timeout and a bounded request head.
async fn accept_loop(
    listener: TcpListener,
    port: Port,
    current: Current,
    router: Router,
    opts: Arc<ConnOpts>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_header_bytes);
    // HTTP/1.1 only, like the plain listener: the header read timeout is an HTTP/1 guard.
    let builder = Arc::new(builder.http1_only());
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, port = port.label(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = {
            let built = current.read().unwrap_or_else(|p| p.into_inner());
            match port {
                Port::Main => Arc::clone(&built.main),
                Port::Vendor => match &built.vendor {
                    Some(v) => Arc::clone(v),
                    None => continue,
                },
            }
        };
        let watcher = graceful.watcher();
        let builder = Arc::clone(&builder);
        let router = router.clone();
        let opts = Arc::clone(&opts);
        tokio::spawn(async move {
            let acceptor = TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%remote, port = port.label(), error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, port = port.label(), "TLS handshake timed out");
                    return;
                }
            };
            let peer = (port == Port::Vendor).then(|| identify(tls.get_ref().1, &opts.clients));
            let svc = router.map_request(move |mut req: axum::http::Request<Incoming>| {
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                req
            });
            let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, port = port.label(), error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            port = port.label(),
            "connections still open after the shutdown grace"
        );
    }
}

/// The vendor for a verified client certificate (subject CN → `[[tls.client]]`).
fn identify(conn: &rustls::ServerConnection, clients: &HashMap<String, String>) -> VendorPeer {
    let cn = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| subject_cn(c));
    VendorPeer {
        vendor: cn.as_ref().and_then(|cn| clients.get(cn).cloned()),
        subject_cn: cn,
    }
}

/// The subject's common name (first CN attribute) of a DER certificate.
pub fn subject_cn(der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    const CN: x509_cert::der::asn1::ObjectIdentifier =
        x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    cert.tbs_certificate.subject.0.iter().find_map(|rdn| {
        rdn.0.iter().find_map(|atv| {
            let text_tag = matches!(
                atv.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            );
            (atv.oid == CN && text_tag)
                .then(|| {
                    std::str::from_utf8(atv.value.value())
                        .ok()
                        .map(String::from)
                })
                .flatten()
        })
    })
}

/// Serial number (lowercase hex, no leading zeros) and SHA-256 fingerprint of a certificate.
fn serial_and_fingerprint(der: &[u8]) -> (Option<String>, String) {
    let fingerprint = hex(&Sha256::digest(der));
    let serial = x509_cert::Certificate::from_der(der)
        .ok()
        .map(|c| normal_serial(&hex(c.tbs_certificate.serial_number.as_bytes())));
    (serial, fingerprint)
}

/// Refusal of a vendor-port request whose certificate does not speak for the URL vendor.
/// Records one audit note (vendor names and CN only: no payload, no patient data).
pub(crate) async fn authorise(
    state: &AppState,
    peer: Option<&VendorPeer>,
    vendor: &str,
) -> Result<(), ApiError> {
    let Some(peer) = peer else {
        // Not the vendor port: nothing to compare.
        return Ok(());
    };
    if peer.vendor.as_deref() == Some(vendor) {
        return Ok(());
    }
    let detail = match (&peer.vendor, &peer.subject_cn) {
        (Some(v), _) => format!("client certificate of vendor {v} may not post as vendor {vendor}"),
        (None, Some(cn)) => {
            format!("client certificate CN {cn:?} is not mapped to a vendor ([[tls.client]])")
        }
        (None, None) => "client certificate has no subject CN".to_string(),
    };
    refusal(state, vendor, &detail).await;
    Err(ApiError::Forbidden {
        field: "vendor".into(),
        message: format!("{detail}; nothing was stored"),
    })
}

/// Writes a `refused` audit note; a journal failure is logged, the request is refused anyway.
pub(crate) async fn refusal(state: &AppState, vendor: &str, detail: &str) {
    tracing::warn!(vendor, detail, "ingest refused");
    let note = AuditNote {
        kind: "refused".into(),
        subject: format!("vendor:{vendor}"),
        dest: None,
        detail: detail.to_string(),
    };
    if let Err(e) = state.journal.audit_note(note).await {
        tracing::error!(error = %e, vendor, "could not audit an ingest refusal");
    }
}

async fn audit_revoked(mut notes: tokio::sync::mpsc::Receiver<String>, state: Arc<AppState>) {
    while let Some(detail) = notes.recv().await {
        let note = AuditNote {
            kind: "refused".into(),
            subject: "tls:vendor-port".into(),
            dest: None,
            detail,
        };
        if let Err(e) = state.journal.audit_note(note).await {
            tracing::error!(error = %e, "could not audit a revoked client certificate");
        }
    }
}

/// Polls the files and listens for SIGHUP; rebuilds and swaps the configs on a change.
async fn reload_loop(
    settings: ValidTls,
    current: Current,
    notes: RevokedNotes,
    mut stop: watch::Receiver<bool>,
) {
    let files: Vec<PathBuf> = [
        Some(settings.cert_file.clone()),
        Some(settings.key_file.clone()),
        settings.client_ca_file.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut seen = stamps(&files);
    let mut tick = tokio::time::interval(settings.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => false,
            _ = hangup => true,
        };
        let now = stamps(&files);
        if !forced && now == seen {
            continue;
        }
        // Remember the failed state too: a half-written pair is retried when the next file
        // lands, not logged every few seconds.
        seen = now;
        match build(&settings, Some(&notes)) {
            Ok(b) => {
                b.log_loaded(if forced {
                    "TLS certificates reloaded on SIGHUP"
                } else {
                    "TLS certificates reloaded after a file change"
                });
                *current.write().unwrap_or_else(|p| p.into_inner()) = b;
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the previous certificates");
            }
        }
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A PEM problem in words (the library's Debug form shows markers as byte arrays).
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line; the file may be half-written",
            String::from_utf8_lossy(end_marker)
        ),
        E::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        other => other.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bad = |message: String| TlsFileError {
        field,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_error(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_error(&e)))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Both rustls configs from the files, or the first problem.
fn build(s: &ValidTls, notes: Option<&RevokedNotes>) -> Result<Built, TlsFileError> {
    let certs = read_certs("tls.cert_file", &s.cert_file)?;
    let key_err = |message: String| TlsFileError {
        field: "tls.key_file",
        path: s.key_file.clone(),
        message,
    };
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| key_err(pem_error(&e)))?;
    let server_config = |verifier: Arc<dyn ClientCertVerifier>| {
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| key_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| key_err(format!("does not fit tls.cert_file: {e}")))?;
        // HTTP/1.1 only, like the plain listener (see `accept_loop`).
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok::<_, TlsFileError>(Arc::new(c))
    };
    let main = server_config(WebPkiClientVerifier::no_client_auth())?;
    let vendor = match &s.client_ca_file {
        None => None,
        Some(ca) => {
            let ca_err = |message: String| TlsFileError {
                field: "tls.client_ca_file",
                path: ca.clone(),
                message,
            };
            let mut roots = RootCertStore::empty();
            for c in read_certs("tls.client_ca_file", ca)? {
                roots.add(c).map_err(|e| ca_err(e.to_string()))?;
            }
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| ca_err(e.to_string()))?;
            Some(server_config(Arc::new(RevocationCheck {
                inner,
                serials: s.revoked_serials.clone(),
                fingerprints: s.revoked_fingerprints.clone(),
                notes: notes.cloned(),
            }))?)
        }
    };
    let expires_ms = x509_cert::Certificate::from_der(&certs[0])
        .ok()
        .and_then(|c| {
            let t = c.tbs_certificate.validity.not_after.to_unix_duration();
            i64::try_from(t.as_millis()).ok()
        });
    Ok(Built {
        main,
        vendor,
        expires_ms,
    })
}

/// The CA's chain check, then the revocation lists from config: a revoked certificate fails the
/// handshake like an expired one.
#[derive(Debug)]
struct RevocationCheck {
    inner: Arc<dyn ClientCertVerifier>,
    serials: HashSet<String>,
    fingerprints: HashSet<String>,
    notes: Option<RevokedNotes>,
}

impl ClientCertVerifier for RevocationCheck {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (serial, fingerprint) = serial_and_fingerprint(end_entity);
        let by_serial = serial.as_ref().is_some_and(|s| self.serials.contains(s));
        if by_serial || self.fingerprints.contains(&fingerprint) {
            let serial = serial.as_deref().unwrap_or("-");
            let cn = subject_cn(end_entity).unwrap_or_else(|| "-".into());
            tracing::warn!(
                serial,
                %fingerprint,
                cn,
                "client certificate revoked by config; handshake refused"
            );
            if let Some(tx) = &self.notes {
                let _ = tx.try_send(format!(
                    "revoked client certificate refused in the TLS handshake: CN {cn:?}, \
                     serial {serial}, SHA-256 {fingerprint}"
                ));
            }
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `knutepunkt check`: the files load, and every `[[tls.client]]` vendor has a mapping file.
pub fn check(tls: &ValidTls, vendor_names: &[&str], file: &str) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    if let Err(e) = build(tls, None) {
        errs.push(ConfigError {
            file: file.to_string(),
            field: e.field.to_string(),
            message: format!("{}: {}", e.path.display(), e.message),
        });
    }
    let mut clients: Vec<_> = tls.clients.iter().collect();
    clients.sort();
    for (cn, vendor) in clients {
        if !vendor_names.contains(&vendor.as_str()) {
            errs.push(ConfigError {
                file: file.to_string(),
                field: format!("tls.client ({cn}).vendor"),
                message: format!("no mapping file for vendor {vendor:?}"),
            });
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, serial: &[u8]) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Vendor AS");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        let key = rcgen::KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn identity_is_the_subject_cn_and_serials_are_normalised() {
        let der = cert("acme-alarm", &[0x00, 0x0b, 0xad]);
        assert_eq!(subject_cn(&der).as_deref(), Some("acme-alarm"));
        let (serial, fingerprint) = serial_and_fingerprint(&der);
        assert_eq!(serial.as_deref(), Some("bad"));
        assert_eq!(fingerprint, hex(&Sha256::digest(&der)));
        assert_eq!(fingerprint.len(), 64);
        // The config side normalises the same way.
        let configured = crate::config::validate::normal_hex("00:0B:AD").expect("hex");
        assert_eq!(normal_serial(&configured), "bad");
        assert_eq!(subject_cn(b"not a certificate"), None);
    }
}
