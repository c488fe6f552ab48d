//! Vendor mapping files: one `*.toml` per vendor in the mappings directory (docs/mappings.md).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::mapping::{self, Mapping, RawField, RawOutput, RawRules};
use crate::config::ConfigError;
use crate::config::validate::{is_municipality_number, valid_name};

/// Raw mapping file as written by a municipality.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMappingFile {
    /// Vendor name used in `POST /v1/vendors/{vendor}/events`.
    vendor: String,
    /// Version of this mapping, recorded with every event it produced.
    version: String,
    /// Input format: `fhir` (FHIR R4 JSON pass-through), `json` or `xml` (mapping rules).
    format: String,
    /// Free text for humans.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    /// Municipality used when a request names none.
    #[serde(default)]
    default_tenant: Option<String>,
    /// Municipalities this vendor may post for; empty means any.
    #[serde(default)]
    tenants: Vec<String>,
    /// Municipalities (tenants) that are test environments: only there are synthetic test
    /// national identity numbers accepted.
    #[serde(default)]
    test_tenants: Vec<String>,
    #[serde(default)]
    xml_root: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    output: Option<RawOutput>,
    #[serde(default)]
    fields: BTreeMap<String, RawField>,
    #[serde(default)]
    tables: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// FHIR R4 JSON, passed through.
    Fhir,
    /// Vendor JSON through mapping rules.
    Json,
    /// Vendor XML (e.g. SCAIP) through mapping rules.
    Xml,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Fhir => "fhir",
            Format::Json => "json",
            Format::Xml => "xml",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VendorSpec {
    pub name: String,
    pub version: String,
    pub format: Format,
    pub default_tenant: Option<String>,
    pub tenants: Vec<String>,
    /// Tenants where synthetic test identity numbers are accepted.
    pub test_tenants: Vec<String>,
    pub file: String,
    /// Compiled rules for `json` / `xml`; `None` for `fhir`.
    pub mapping: Option<Arc<Mapping>>,
}

#[derive(Debug, Clone, Default)]
pub struct VendorRegistry {
    vendors: HashMap<String, VendorSpec>,
}

impl VendorRegistry {
    pub fn get(&self, name: &str) -> Option<&VendorSpec> {
        self.vendors.get(name)
    }
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.vendors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
    pub fn len(&self) -> usize {
        self.vendors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vendors.is_empty()
    }
}

/// Reads and validates one mapping file; returns every error in it.
pub fn load_vendor_file(path: &Path) -> Result<VendorSpec, Vec<ConfigError>> {
    let file = path.display().to_string();
    let err = |field: &str, message: String| ConfigError {
        file: file.clone(),
        field: field.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| vec![err("-", e.to_string())])?;
    let raw: RawMappingFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        vec![err(&format!("line {line}"), e.message().to_string())]
    })?;
    let mut errors = Vec::new();
    if !valid_name(&raw.vendor) {
        errors.push(err(
            "vendor",
            format!(
                "{:?} must be 1-64 characters of a-z, 0-9, '-' or '_'",
                raw.vendor
            ),
        ));
    }
    if raw.version.trim().is_empty() {
        errors.push(err("version", "must not be empty, e.g. \"1.0.0\"".into()));
    }
    let format = match raw.format.as_str() {
        "fhir" => Format::Fhir,
        "json" => Format::Json,
        "xml" => Format::Xml,
        other => {
            errors.push(err(
                "format",
                format!("unknown format {other:?}; expected \"fhir\", \"json\" or \"xml\""),
            ));
            Format::Fhir
        }
    };
    for (what, list) in [
        (
            "default_tenant",
            raw.default_tenant.iter().collect::<Vec<_>>(),
        ),
        ("tenants", raw.tenants.iter().collect()),
        ("test_tenants", raw.test_tenants.iter().collect()),
    ] {
        for t in list {
            if !is_municipality_number(t) {
                errors.push(err(
                    what,
                    format!("{t:?} is not a 4-digit municipality number"),
                ));
            }
        }
    }
    if let Some(d) = &raw.default_tenant
        && !raw.tenants.is_empty()
        && !raw.tenants.contains(d)
    {
        errors.push(err("default_tenant", format!("{d:?} is not in tenants")));
    }
    let has_rules = raw.output.is_some()
        || !raw.fields.is_empty()
        || !raw.tables.is_empty()
        || raw.xml_root.is_some()
        || raw.timezone.is_some();
    let mapping = match format {
        Format::Fhir => {
            if has_rules {
                errors.push(err(
                    "format",
                    "format = \"fhir\" is a pass-through and takes no output/fields/tables/xml_root/timezone".into(),
                ));
            }
            None
        }
        Format::Json | Format::Xml => {
            let rules = RawRules {
                xml_root: raw.xml_root,
                timezone: raw.timezone,
                output: raw.output,
                fields: raw.fields,
                tables: raw.tables,
            };
            match mapping::compile(format == Format::Xml, rules, &raw.vendor) {
                Ok(m) => Some(Arc::new(m)),
                Err(es) => {
                    errors.extend(es.into_iter().map(|(f, m)| err(&f, m)));
                    None
                }
            }
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(VendorSpec {
        name: raw.vendor,
        version: raw.version,
        format,
        default_tenant: raw.default_tenant,
        tenants: raw.tenants,
        test_tenants: raw.test_tenants,
        file,
        mapping,
    })
}

/// Loads every `*.toml` in `dir`; returns all errors of all files at once.
pub fn load_vendors(dir: &Path) -> Result<VendorRegistry, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut registry = VendorRegistry::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(vec![ConfigError {
                file: dir.display().to_string(),
                field: "mappings.dir".into(),
                message: format!("cannot read mappings directory: {e}"),
            }]);
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        match load_vendor_file(&path) {
            Err(es) => errors.extend(es),
            Ok(spec) => {
                if let Some(prev) = registry.vendors.get(&spec.name) {
                    errors.push(ConfigError {
                        file: spec.file.clone(),
                        field: "vendor".into(),
                        message: format!(
                            "vendor {:?} is already defined in {}",
                            spec.name, prev.file
                        ),
                    });
                    continue;
                }
                registry.vendors.insert(spec.name.clone(), spec);
            }
        }
    }
    if errors.is_empty() {
        Ok(registry)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_reports_all_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("a.toml"),
            "vendor = \"acme\"\nversion = \"1\"\nformat = \"fhir\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("b.toml"),
            "vendor = \"Bad\"\nversion = \"\"\nformat = \"csv\"\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("c.toml"), "vendor = 3").expect("write");
        let errs = load_vendors(dir.path()).expect_err("errors");
        let fields: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.file.rsplit('/').next().unwrap_or(""), e.field.as_str()))
            .collect();
        assert!(fields.contains(&("b.toml", "vendor")), "{errs:?}");
        assert!(fields.contains(&("b.toml", "version")), "{errs:?}");
        assert!(fields.contains(&("b.toml", "format")), "{errs:?}");
        assert!(fields.contains(&("c.toml", "line 1")), "{errs:?}");
    }

    #[test]
    fn rule_errors_name_file_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("bad.toml"),
            r#"vendor = "bad"
version = "1"
format = "xml"
timezone = "Mars/Olympus"
test_tenants = ["abc"]
[output]
shape = { path = "kind" }
[fields]
alert_code = { path = "code", table = "alerts" }
colour = { const = "red" }
priority = { path = "p" }
occurred = { path = "t", time = "epoch_ns" }
reading_id = { template = "{nope}" }
[tables.alerts]
A = "3"
B = "9.9"
[tables.unused]
x = "y"
"#,
        )
        .expect("write");
        let errs = load_vendors(dir.path()).expect_err("errors");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "xml_root",
            "timezone",
            "test_tenants",
            "output.shape",
            "fields.colour",
            "fields.priority.table",
            "fields.occurred.time",
            "fields.reading_id.template",
            "tables.alerts.\"B\"",
            "tables.unused",
        ] {
            assert!(fields.contains(&want), "missing {want}: {errs:#?}");
        }
        assert!(errs.iter().all(|e| e.file.ends_with("bad.toml")));
    }

    #[test]
    fn shipped_mappings_load() {
        let reg = load_vendors(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings")))
            .expect("valid");
        for v in ["fhir", "scaip", "supervision", "dispenser", "homemeasure"] {
            assert!(reg.get(v).is_some(), "{v}");
        }
    }
}
