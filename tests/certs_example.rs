//! `certs-example/gen-certs.sh` produces a CA, a server certificate and two vendor client
//! certificates that verify against that CA for their purpose.

use std::path::Path;
use std::process::Command;

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn script_generates_a_verifiable_ca_server_and_vendor_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-example/gen-certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("run gen-certs.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dir.path();

    let (ok, text) = openssl(
        &[
            "verify",
            "-CAfile",
            "ca.crt",
            "-purpose",
            "sslserver",
            "server.crt",
        ],
        d,
    );
    assert!(ok && text.contains("server.crt: OK"), "{text}");
    let (_, text) = openssl(
        &[
            "x509",
            "-in",
            "server.crt",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        d,
    );
    assert!(
        text.contains("DNS:localhost") && text.contains("IP Address:127.0.0.1"),
        "{text}"
    );

    for vendor in ["acme", "bravo"] {
        let crt = format!("vendor-{vendor}.crt");
        let (ok, text) = openssl(
            &["verify", "-CAfile", "ca.crt", "-purpose", "sslclient", &crt],
            d,
        );
        assert!(ok, "{text}");
        // A client certificate must not be usable as a server certificate.
        let (ok, _) = openssl(
            &["verify", "-CAfile", "ca.crt", "-purpose", "sslserver", &crt],
            d,
        );
        assert!(!ok, "{crt} must not verify for serverAuth");
        let (_, text) = openssl(
            &[
                "x509",
                "-in",
                &crt,
                "-noout",
                "-subject",
                "-ext",
                "subjectAltName",
            ],
            d,
        );
        assert!(text.contains(&format!("CN = {vendor}")), "{text}");
        assert!(
            text.contains(&format!("URI:urn:knutepunkt:vendor:{vendor}")),
            "{text}"
        );
    }
    // Keys are private to the user.
    use std::os::unix::fs::PermissionsExt;
    for key in [
        "ca.key",
        "server.key",
        "vendor-acme.key",
        "vendor-bravo.key",
    ] {
        let mode = std::fs::metadata(d.join(key))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
}
