//! `certs-example/gen-certs.sh` produces a CA, a server certificate and two vendor client
//! certificates that verify against that CA for their purpose, and the mutual-TLS walk-through in
//! `certs-example/README.md` works as written (its config and its `curl` commands).

mod common;

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

/// The fenced blocks of `lang` in the certs-example README.
fn readme_blocks(lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-example/README.md"),
    )
    .expect("README");
    readme
        .split(&format!("```{lang}\n"))
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or("").to_string())
        .collect()
}

/// Runs a README `curl` command with the paths and ports of this run; returns (exit ok, stdout).
fn curl(cmd: &str, certs: &Path, main: &str, vendor: &str) -> (bool, String) {
    let cmd = cmd
        .replace("\\\n", " ")
        .replace("certs-example/out/", &format!("{}/", certs.display()))
        .replace("localhost:8443", &format!("localhost:{vendor}"))
        .replace("localhost:8080", &format!("localhost:{main}"));
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --max-time 20 -w '\\n%{{http_code}}'",
            cmd.trim()
        ))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_mutual_tls_walkthrough_works() {
    let certs = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-example/gen-certs.sh");
    let ok = Command::new("bash")
        .arg(&script)
        .arg(certs.path())
        .status()
        .expect("gen-certs")
        .success();
    assert!(ok);

    let toml = readme_blocks("toml")
        .into_iter()
        .next()
        .expect("toml block");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "{}\n[mappings]\ndir = {:?}\n{}",
        toml.replace(
            "certs-example/out/",
            &format!("{}/", certs.path().display())
        )
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8443", "127.0.0.1:0"),
        common::repo_path("mappings").display().to_string(),
        common::storage_section(dir.path()).await
    );
    let gw = common::Gateway::start_with_config(dir, &cfg).await;
    let port = |addr: &str| addr.rsplit(':').next().expect("port").to_string();
    let main = port(&gw.base);
    let vendor = port(
        &gw.stdout_line(
            "knutepunkt vendor port listening on ",
            std::time::Duration::from_secs(10),
        )
        .expect("vendor port"),
    );

    let cmds: Vec<String> = readme_blocks("sh")
        .into_iter()
        .filter(|b| b.contains("curl"))
        .collect();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    let (ok, out) = curl(&cmds[0], certs.path(), &main, &vendor);
    assert!(
        ok && out.ends_with("202") && out.contains("stored"),
        "{out}"
    );
    // The same request with bravo's certificate: refused, 403 naming the vendor.
    let as_bravo = cmds[0].replace("vendor-acme", "vendor-bravo");
    let (ok, out) = curl(&as_bravo, certs.path(), &main, &vendor);
    assert!(
        ok && out.ends_with("403") && out.contains("vendor"),
        "{out}"
    );
    // Without a client certificate the handshake fails: curl exits non-zero.
    let anonymous = cmds[0].replace(
        "--cert certs-example/out/vendor-acme.crt --key certs-example/out/vendor-acme.key",
        "",
    );
    assert_ne!(anonymous, cmds[0]);
    let (ok, out) = curl(&anonymous, certs.path(), &main, &vendor);
    assert!(!ok && !out.ends_with("202"), "{out}");
    let (ok, out) = curl(&cmds[1], certs.path(), &main, &vendor);
    assert!(
        ok && out.ends_with("200") && out.contains("\"events\":1"),
        "{out}"
    );
}
