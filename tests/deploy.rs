//! Deployment files cannot be run here (no container engine, no cluster), so this test checks
//! what can be checked: every embedded config validates against the config schema, and the files
//! agree with each other (paths, ports, probe endpoints, secret and variable names).

use std::path::Path;

use knutepunkt::config::{RawConfig, Source, validate};
use yaml_rust2::{Yaml, YamlLoader};

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Parses and validates a config; returns it for further checks.
fn valid_config(name: &str, text: &str) -> RawConfig {
    let raw: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Err(errs) = validate(&raw, &Source { file: name.into() }) {
        panic!("{name} does not validate: {errs:?}");
    }
    raw
}

fn listen_port(raw: &RawConfig) -> i64 {
    raw.server
        .listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn by_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn kubernetes_manifests_agree_with_the_config_schema() {
    let cm_docs = yaml_docs("deploy/k8s/configmap.yaml");
    let cm = by_kind(&cm_docs, "ConfigMap");
    let cfg_text = cm["data"]["knutepunkt.toml"]
        .as_str()
        .expect("knutepunkt.toml in the ConfigMap");
    let raw = valid_config("configmap knutepunkt.toml", cfg_text);
    assert_eq!(raw.storage.kind, "postgres");
    let url_env = raw
        .storage
        .url_env
        .clone()
        .expect("the ConfigMap must not hold the database URL");
    assert!(raw.storage.url.is_none());

    let docs = yaml_docs("deploy/k8s/deployment.yaml");
    let dep = by_kind(&docs, "Deployment");
    let spec = &dep["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["ports"][0]["containerPort"].as_i64(),
        Some(listen_port(&raw))
    );
    assert!(
        spec["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace")
            > raw.server.shutdown_grace_s as i64
    );

    // The config file comes from the ConfigMap, mounted where the args point.
    let args: Vec<&str> = c["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let config_path = args[args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config")
        + 1];
    let config_mount = c["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .and_then(|m| m["mountPath"].as_str())
        .expect("config mount");
    assert_eq!(config_path, format!("{config_mount}/knutepunkt.toml"));
    let volumes = spec["volumes"].as_vec().expect("volumes");
    let cm_name = cm["metadata"]["name"].as_str();
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"].as_str() == cm_name),
        "ConfigMap not mounted"
    );

    // The database URL comes from a Secret into the variable the config names.
    let env = c["env"].as_vec().expect("env");
    let db = env
        .iter()
        .find(|e| e["name"].as_str() == Some(url_env.as_str()))
        .expect("url_env variable set");
    let secret_name = db["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .expect("from a Secret");
    let secrets = yaml_docs("deploy/k8s/secret.example.yaml");
    for wanted in [
        Some(secret_name),
        volumes
            .iter()
            .find_map(|v| v["secret"]["secretName"].as_str()),
    ] {
        let wanted = wanted.expect("secret name");
        assert!(
            secrets
                .iter()
                .any(|s| s["metadata"]["name"].as_str() == Some(wanted)),
            "Secret {wanted} has no example"
        );
    }
    let svc = by_kind(&docs, "Service");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_i64(),
        Some(listen_port(&raw))
    );
}

#[test]
fn container_image_and_compose_agree() {
    let containerfile = read("deploy/container/Containerfile");
    let baked = valid_config(
        "knutepunkt.container.toml",
        &read("deploy/knutepunkt.container.toml"),
    );
    assert!(
        containerfile
            .contains("COPY deploy/knutepunkt.container.toml /etc/knutepunkt/knutepunkt.toml")
    );
    assert!(
        containerfile.contains(r#"CMD ["serve", "--config", "/etc/knutepunkt/knutepunkt.toml"]"#)
    );
    assert!(containerfile.contains(&format!("EXPOSE {}", listen_port(&baked))));
    assert!(containerfile.contains(&format!("COPY mappings {}", baked.mappings.dir.display())));

    let compose = &yaml_docs("deploy/compose/compose.yaml")[0];
    let services = compose["services"].as_hash().expect("services");
    assert!(services.contains_key(&Yaml::String("postgres".into())));
    let raw = valid_config(
        "compose knutepunkt.toml",
        &read("deploy/compose/knutepunkt.toml"),
    );
    let var = raw.storage.url_env.clone().expect("url_env");
    let nodes: Vec<&Yaml> = services
        .iter()
        .filter(|(k, _)| k.as_str().is_some_and(|k| k.starts_with("knutepunkt")))
        .map(|(_, v)| v)
        .collect();
    assert!(nodes.len() >= 2, "compose should show multi-node operation");
    for n in nodes {
        let url = n["environment"][var.as_str()]
            .as_str()
            .expect("database URL variable");
        assert!(
            url.contains("@postgres:5432/"),
            "{url} must point at the postgres service"
        );
        let mounts: Vec<&str> = n["volumes"]
            .as_vec()
            .expect("volumes")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(
            mounts.contains(&"./knutepunkt.toml:/etc/knutepunkt/knutepunkt.toml:ro"),
            "{mounts:?}"
        );
        assert_eq!(
            n["build"]["dockerfile"].as_str(),
            Some("deploy/container/Containerfile")
        );
    }
}

#[test]
fn systemd_unit_checks_then_serves() {
    let unit = read("deploy/systemd/knutepunkt.service");
    assert!(unit.contains(
        "ExecStartPre=/usr/local/bin/knutepunkt check --config /etc/knutepunkt/knutepunkt.toml"
    ));
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/knutepunkt serve --config /etc/knutepunkt/knutepunkt.toml"
    ));
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec");
    let example = valid_config(
        "knutepunkt.example.toml",
        &read("deploy/knutepunkt.example.toml"),
    );
    assert!(
        stop > example.server.shutdown_grace_s,
        "systemd would kill before the drain ends"
    );
}
