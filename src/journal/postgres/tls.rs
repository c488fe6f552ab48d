//! TLS to PostgreSQL with rustls: the server certificate is verified against the configured CA
//! and the host name (or IP) in the connection string.

use std::path::Path;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::journal::JournalError;

/// The connector for every connection of this journal. Without a CA file TLS is switched off
/// (`sslmode=disable`), so the connector is never used; with one, TLS is required.
pub fn configure(
    config: &mut tokio_postgres::Config,
    ca_file: Option<&Path>,
) -> Result<MakeRustlsConnect, JournalError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => {
            config.ssl_mode(SslMode::Disable);
        }
        Some(path) => {
            let bad = |e: String| {
                JournalError::Unavailable(format!("storage.tls_ca_file {}: {e}", path.display()))
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate found".into()));
            }
            config.ssl_mode(SslMode::Require);
        }
    }
    let tls = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(tls))
}
