//! Vendor mapping files: one `*.toml` per vendor in the mappings directory.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::config::validate::{is_municipality_number, toml_position, valid_name};

/// Raw mapping file as written by a municipality.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMappingFile {
    /// Vendor name used in `POST /v1/vendors/{vendor}/events`.
    vendor: String,
    /// Version of this mapping, recorded with every event it produced.
    version: String,
    /// Input format: `fhir` (FHIR R4 JSON pass-through).
    format: String,
    /// Municipality used when a request names none.
    #[serde(default)]
    default_tenant: Option<String>,
    /// Municipalities this vendor may post for; empty means any.
    #[serde(default)]
    tenants: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Fhir,
}

#[derive(Debug, Clone)]
pub struct VendorSpec {
    pub name: String,
    pub version: String,
    pub format: Format,
    pub default_tenant: Option<String>,
    pub tenants: Vec<String>,
    pub file: String,
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
        let file = path.display().to_string();
        let err = |field: &str, message: String| ConfigError {
            file: file.clone(),
            field: field.into(),
            message,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(err("-", e.to_string()));
                continue;
            }
        };
        let raw: RawMappingFile = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                errors.push(err(&toml_position(&text, &e), e.message().to_string()));
                continue;
            }
        };
        let before = errors.len();
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
            other => {
                errors.push(err(
                    "format",
                    format!("unknown format {other:?}; expected \"fhir\""),
                ));
                Format::Fhir
            }
        };
        for t in raw.default_tenant.iter().chain(raw.tenants.iter()) {
            if !is_municipality_number(t) {
                errors.push(err(
                    "tenants",
                    format!("{t:?} is not a 4-digit municipality number"),
                ));
            }
        }
        if let Some(d) = &raw.default_tenant
            && !raw.tenants.is_empty()
            && !raw.tenants.contains(d)
        {
            errors.push(err("default_tenant", format!("{d:?} is not in tenants")));
        }
        if let Some(prev) = registry.vendors.get(&raw.vendor) {
            errors.push(err(
                "vendor",
                format!(
                    "vendor {:?} is already defined in {}",
                    raw.vendor, prev.file
                ),
            ));
        }
        if errors.len() > before {
            continue;
        }
        registry.vendors.insert(
            raw.vendor.clone(),
            VendorSpec {
                name: raw.vendor,
                version: raw.version,
                format,
                default_tenant: raw.default_tenant,
                tenants: raw.tenants,
                file,
            },
        );
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
    fn shipped_mappings_load() {
        let reg = load_vendors(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings")))
            .expect("valid");
        assert!(reg.get("fhir").is_some());
    }
}
