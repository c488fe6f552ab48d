//! The command line: `check` accepts the shipped example, reports every error with file and
//! field, and the docs name every config key the example uses.

use std::process::Command;

fn knutepunkt(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_knutepunkt"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run knutepunkt");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_example_and_defaults() {
    let (code, out, err) = knutepunkt(&["check", "--config", "deploy/knutepunkt.example.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");
    let (code, out, err) = knutepunkt(&["check"]);
    assert_eq!(
        code, 0,
        "defaults with ./mappings must be valid: {out}{err}"
    );
}

#[test]
fn check_reports_all_errors_with_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let maps = dir.path().join("maps");
    std::fs::create_dir(&maps).expect("mkdir");
    std::fs::write(
        maps.join("bad.toml"),
        "vendor = \"Bad Vendor\"\nversion = \"1\"\nformat = \"fhir\"\n",
    )
    .expect("write");
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"localhost\"\n[mappings]\ndir = {:?}\n[[destination]]\nname = \"d\"\nurl = \"nope\"\n\
             [[route]]\nname = \"r\"\ndestinations = [\"x\"]\n",
            maps.display().to_string()
        ),
    )
    .expect("write");
    let cfg = cfg.display().to_string();
    let (code, _, err) = knutepunkt(&["check", "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    for needle in [
        format!("{cfg}: server.listen:"),
        format!("{cfg}: destination[0] (d).url:"),
        format!("{cfg}: route[0] (r).destinations: unknown destination \"x\""),
        "bad.toml: vendor:".to_string(),
        "4 error(s)".to_string(),
    ] {
        assert!(err.contains(&needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn check_reports_toml_syntax_and_unknown_keys_with_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").expect("write");
    let (code, _, err) = knutepunkt(&["check", "--config", &cfg.display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("line 3") && err.contains("lisen"), "{err}");
}

#[test]
fn help_lists_commands() {
    let (code, out, _) = knutepunkt(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("serve") && out.contains("check"), "{out}");
}

/// Every key set in the example config is documented in docs/configuration.md.
#[test]
fn configuration_doc_names_every_example_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example =
        std::fs::read_to_string(format!("{root}/deploy/knutepunkt.example.toml")).expect("example");
    let doc = std::fs::read_to_string(format!("{root}/docs/configuration.md")).expect("doc");
    let table: toml::Table = example.parse().expect("example parses");
    let mut keys = Vec::new();
    collect_keys("", &toml::Value::Table(table), &mut keys);
    assert!(keys.len() > 20, "{keys:?}");
    for k in keys {
        assert!(
            doc.contains(&format!("`{k}`")),
            "docs/configuration.md does not document `{k}`"
        );
    }
}

fn collect_keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_keys(&path, v, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(toml::Value::is_table) => {
            for item in a {
                collect_keys(prefix, item, out);
            }
        }
        _ => {
            if !out.contains(&prefix.to_string()) {
                out.push(prefix.to_string());
            }
        }
    }
}
