//! The declarative mapping language (docs/mappings.md): raw TOML model, validation with precise
//! field names, and the compiled form the engine runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use serde::Deserialize;

use super::codes::{self, Kind};
use super::datetime::{TimeFormat, Zone};
use super::path::Path;
use super::{Category, Priority};

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// One field rule as written in TOML.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawField {
    pub path: Option<OneOrMany>,
    #[serde(rename = "const")]
    pub constant: Option<String>,
    pub template: Option<String>,
    pub default: Option<OneOrMany>,
    pub join: Option<String>,
    pub trim: Option<bool>,
    pub pad: Option<usize>,
    pub case: Option<String>,
    pub table: Option<String>,
    pub on_unknown: Option<String>,
    #[serde(rename = "type")]
    pub value_type: Option<String>,
    pub time: Option<String>,
    pub required: Option<bool>,
    pub max_len: Option<usize>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub shape: RawField,
    pub items: Option<String>,
    pub max_items: Option<usize>,
    pub missing_patient: Option<String>,
    pub identifier_system: Option<String>,
    pub max_future_minutes: Option<i64>,
}

/// The parts of a mapping file beyond the vendor header.
#[derive(Debug, Deserialize, Clone, Default)]
pub struct RawRules {
    pub xml_root: Option<String>,
    pub timezone: Option<String>,
    pub output: Option<RawOutput>,
    #[serde(default)]
    pub fields: BTreeMap<String, RawField>,
    #[serde(default)]
    pub tables: BTreeMap<String, BTreeMap<String, String>>,
}

/// Output shapes a mapping can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// DetectedIssue (+ Device, Encounter) in a `document` Bundle with a Composition first.
    Alarm,
    /// MedicationDispense in a `collection` Bundle.
    Dispense,
    /// Observation(s) in a `collection` Bundle.
    Measurement,
    /// Device liveness only; not a clinical event, never journaled as one.
    Heartbeat,
}

impl Shape {
    pub const NAMES: [&'static str; 4] = ["alarm", "dispense", "measurement", "heartbeat"];
    pub fn parse(s: &str) -> Option<Shape> {
        Some(match s {
            "alarm" => Shape::Alarm,
            "dispense" => Shape::Dispense,
            "measurement" => Shape::Measurement,
            "heartbeat" => Shape::Heartbeat,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingPatient {
    /// No patient and no device assignment: 422.
    Reject,
    /// Emit without a patient, keyed by device.
    Device,
    /// Journal the event without routing it (quarantine) until an operator adds the device
    /// assignment and replays it.
    Quarantine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknown {
    Error,
    Keep,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    String,
    Decimal,
    Integer,
    DateTime(TimeFormat),
}

#[derive(Debug, Clone)]
pub enum Source {
    Paths {
        paths: Vec<Path>,
        join: Option<String>,
        defaults: Vec<Option<String>>,
    },
    Const(String),
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Lit(String),
    Field(String),
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub source: Source,
    /// Whole-value default when nothing is found (single path or first-present list).
    pub default: Option<String>,
    pub trim: bool,
    pub pad: Option<usize>,
    pub upper: Option<bool>,
    pub table: Option<String>,
    pub on_unknown: OnUnknown,
    pub value_type: ValueType,
    pub required: bool,
    pub max_len: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub xml_root: Option<String>,
    pub zone: Zone,
    pub shape: Field,
    pub items: Option<Path>,
    pub max_items: usize,
    pub missing_patient: MissingPatient,
    pub identifier_system: String,
    pub max_future_ms: i64,
    pub fields: HashMap<String, Field>,
    pub tables: HashMap<String, HashMap<String, String>>,
}

/// What the values of a field mean, for checking table entries and constants at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Domain {
    Free,
    Shape,
    Category,
    Priority,
    IssueStatus,
    DispenseStatus,
    AlertCode,
    DispenseCategory,
    Kind,
    Unit,
    CompositionCategory,
    EncounterClass,
}

/// Every field name the engine knows: (name, shapes that use it (empty = all), domain, type).
const FIELDS: &[(&str, &[Shape], Domain)] = &[
    ("event_id", &[], Domain::Free),
    ("occurred", &[], Domain::Free),
    ("patient_id", &[], Domain::Free),
    ("patient_name", &[], Domain::Free),
    ("tenant", &[], Domain::Free),
    ("priority", &[], Domain::Priority),
    ("category", &[], Domain::Category),
    ("device_id", &[], Domain::Free),
    ("device_system", &[], Domain::Free),
    ("device_type", &[], Domain::Free),
    ("device_type_system", &[], Domain::Free),
    ("device_type_display", &[], Domain::Free),
    ("device_name", &[], Domain::Free),
    ("text", &[], Domain::Free),
    ("alert_code", &[Shape::Alarm], Domain::AlertCode),
    ("vendor_code", &[Shape::Alarm], Domain::Free),
    ("vendor_code_system", &[Shape::Alarm], Domain::Free),
    ("vendor_code_display", &[Shape::Alarm], Domain::Free),
    ("status", &[Shape::Alarm], Domain::IssueStatus),
    ("location", &[Shape::Alarm], Domain::Free),
    ("note", &[Shape::Alarm], Domain::Free),
    ("operator", &[Shape::Alarm], Domain::Free),
    ("operator_system", &[Shape::Alarm], Domain::Free),
    ("accepted_at", &[Shape::Alarm], Domain::Free),
    ("closed_at", &[Shape::Alarm], Domain::Free),
    (
        "composition_category",
        &[Shape::Alarm],
        Domain::CompositionCategory,
    ),
    ("encounter_class", &[Shape::Alarm], Domain::EncounterClass),
    (
        "dispense_category",
        &[Shape::Dispense],
        Domain::DispenseCategory,
    ),
    (
        "dispense_status",
        &[Shape::Dispense],
        Domain::DispenseStatus,
    ),
    ("medication", &[Shape::Dispense], Domain::Free),
    ("dosage_text", &[Shape::Dispense], Domain::Free),
    ("kind", &[Shape::Measurement], Domain::Kind),
    ("value", &[Shape::Measurement], Domain::Free),
    ("value2", &[Shape::Measurement], Domain::Free),
    ("unit", &[Shape::Measurement], Domain::Unit),
    ("effective", &[Shape::Measurement], Domain::Free),
    ("reading_id", &[Shape::Measurement], Domain::Free),
];

const DATETIME_FIELDS: [&str; 4] = ["occurred", "accepted_at", "closed_at", "effective"];
const DECIMAL_FIELDS: [&str; 2] = ["value", "value2"];

pub fn field_names() -> Vec<&'static str> {
    FIELDS.iter().map(|(n, _, _)| *n).collect()
}

pub fn field_shapes(name: &str) -> &'static [Shape] {
    FIELDS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or(&[], |(_, s, _)| s)
}

fn check_domain(domain: Domain, v: &str) -> Result<(), String> {
    let ok = match domain {
        Domain::Free => true,
        Domain::Shape => Shape::parse(v).is_some(),
        Domain::Category => Category::from_str(v).is_ok(),
        Domain::Priority => Priority::from_str(v).is_ok(),
        Domain::IssueStatus => [
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
        ]
        .contains(&v),
        Domain::DispenseStatus => [
            "preparation",
            "in-progress",
            "cancelled",
            "on-hold",
            "completed",
            "entered-in-error",
            "stopped",
            "declined",
        ]
        .contains(&v),
        Domain::AlertCode => codes::lookup(codes::ALERT_CODES, v).is_some(),
        Domain::DispenseCategory => codes::lookup(codes::DISPENSE_EVENTS, v).is_some(),
        Domain::Kind => Kind::parse(v).is_some(),
        Domain::Unit => codes::known_unit(v),
        Domain::CompositionCategory => codes::lookup(codes::COMPOSITION_CATEGORIES, v).is_some(),
        Domain::EncounterClass => ["VR", "HH", "AMB", "FLD"].contains(&v),
    };
    if ok {
        return Ok(());
    }
    Err(match domain {
        Domain::Shape => format!(
            "{v:?} is not a shape; expected one of {}",
            Shape::NAMES.join(", ")
        ),
        Domain::Category => Category::from_str(v).err().unwrap_or_default(),
        Domain::Priority => Priority::from_str(v).err().unwrap_or_default(),
        Domain::IssueStatus => format!(
            "{v:?} is not a DetectedIssue status (registered, preliminary, final, amended, corrected, cancelled, entered-in-error)"
        ),
        Domain::DispenseStatus => format!(
            "{v:?} is not a MedicationDispense status (e.g. completed, in-progress, declined)"
        ),
        Domain::AlertCode => format!("{v:?} is not a code in vkp-alert-code-v090"),
        Domain::DispenseCategory => {
            format!("{v:?} is not a code in vkp-medicationdispense-events-v090")
        }
        Domain::Kind => format!(
            "{v:?} is not a measurement kind; expected one of {}",
            Kind::names().join(", ")
        ),
        Domain::Unit => format!(
            "{v:?} is not a UCUM unit the engine knows (e.g. mm[Hg], kPa, /min, %, kg, [lb_av], Cel, [degF], mmol/L, mg/dL)"
        ),
        Domain::CompositionCategory => {
            format!("{v:?} is not a code in vkp-composition-category-v090 (1, 2)")
        }
        Domain::EncounterClass => format!("{v:?} is not an encounter class (VR, HH, AMB, FLD)"),
        Domain::Free => String::new(),
    })
}

/// Validates and compiles the rules of one file. Errors are `(field, message)`.
pub fn compile(
    format_is_xml: bool,
    rules: RawRules,
    vendor: &str,
) -> Result<Mapping, Vec<(String, String)>> {
    let mut errs: Vec<(String, String)> = Vec::new();
    let zone = match rules.timezone.as_deref() {
        None => Zone::EuropeOslo,
        Some(z) => Zone::parse(z).unwrap_or_else(|| {
            errs.push((
                "timezone".into(),
                format!("{z:?} is not supported; use \"Europe/Oslo\", \"UTC\" or a fixed offset like \"+01:00\""),
            ));
            Zone::Utc
        }),
    };
    if format_is_xml && rules.xml_root.as_deref().is_none_or(str::is_empty) {
        errs.push((
            "xml_root".into(),
            "required for format = \"xml\" (the expected root element, e.g. \"mrq\")".into(),
        ));
    }
    if !format_is_xml && rules.xml_root.is_some() {
        errs.push((
            "xml_root".into(),
            "only allowed with format = \"xml\"".into(),
        ));
    }
    let Some(output) = rules.output else {
        errs.push((
            "output".into(),
            "missing [output] section with at least `shape`".into(),
        ));
        return Err(errs);
    };
    // Tables: non-empty, keys and values non-empty.
    for (name, t) in &rules.tables {
        if t.is_empty() {
            errs.push((format!("tables.{name}"), "table is empty".into()));
        }
        for (k, v) in t {
            if k.is_empty() || v.trim().is_empty() {
                errs.push((
                    format!("tables.{name}.{k:?}"),
                    "keys and values must not be empty".into(),
                ));
            }
        }
    }
    let mut used_tables = BTreeSet::new();
    let shape = compile_field(
        "output.shape",
        "shape",
        &output.shape,
        Domain::Shape,
        &rules.tables,
        &mut used_tables,
        &mut errs,
    );
    let reachable: BTreeSet<Shape> = match &shape.source {
        Source::Const(c) => Shape::parse(c).into_iter().collect(),
        _ => match &shape.table {
            Some(t) => rules
                .tables
                .get(t)
                .map(|t| t.values().filter_map(|v| Shape::parse(v)).collect())
                .unwrap_or_default(),
            None => {
                errs.push((
                    "output.shape".into(),
                    "a shape read from the payload must go through a `table` (vendor value → shape)".into(),
                ));
                BTreeSet::new()
            }
        },
    };
    let mut fields = HashMap::new();
    for (name, raw) in &rules.fields {
        let Some((_, shapes, domain)) = FIELDS.iter().find(|(n, _, _)| n == name) else {
            errs.push((
                format!("fields.{name}"),
                format!("unknown field; known fields: {}", field_names().join(", ")),
            ));
            continue;
        };
        if !shapes.is_empty() && !shapes.iter().any(|s| reachable.contains(s)) {
            errs.push((
                format!("fields.{name}"),
                format!(
                    "only used by shape(s) {} which this mapping never produces",
                    shapes
                        .iter()
                        .map(|s| Shape::NAMES[*s as usize])
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let f = compile_field(
            &format!("fields.{name}"),
            name,
            raw,
            *domain,
            &rules.tables,
            &mut used_tables,
            &mut errs,
        );
        fields.insert(name.clone(), f);
    }
    // Templates may only name other, non-template fields.
    for (name, f) in &fields {
        if let Source::Template(parts) = &f.source {
            for p in parts {
                if let TemplatePart::Field(r) = p {
                    match fields.get(r) {
                        None => errs.push((
                            format!("fields.{name}.template"),
                            format!("refers to {{{r}}}, which is not defined in [fields]"),
                        )),
                        Some(t) if matches!(t.source, Source::Template(_)) => errs.push((
                            format!("fields.{name}.template"),
                            format!("refers to {{{r}}}, which is itself a template"),
                        )),
                        _ => {}
                    }
                }
            }
        }
    }
    for t in rules.tables.keys() {
        if !used_tables.contains(t) {
            errs.push((
                format!("tables.{t}"),
                "table is not used by any field".into(),
            ));
        }
    }
    let missing_patient = match output.missing_patient.as_deref() {
        None | Some("reject") => MissingPatient::Reject,
        Some("device") => MissingPatient::Device,
        Some("quarantine") => MissingPatient::Quarantine,
        Some(o) => {
            errs.push((
                "output.missing_patient".into(),
                format!("{o:?}: expected \"reject\", \"device\" or \"quarantine\""),
            ));
            MissingPatient::Reject
        }
    };
    // What each reachable shape needs.
    let need = |name: &str, why: &str, errs: &mut Vec<(String, String)>| {
        if !fields.contains_key(name) {
            errs.push((format!("fields.{name}"), format!("required: {why}")));
        }
    };
    if missing_patient == MissingPatient::Reject
        && reachable.iter().any(|s| *s != Shape::Heartbeat)
        && !fields.contains_key("device_id")
    {
        need(
            "patient_id",
            "the patient's national identifier, or a device_id to resolve it through the device \
             registry",
            &mut errs,
        );
    }
    for s in &reachable {
        match s {
            Shape::Alarm => need(
                "alert_code",
                "shape alarm needs a VKP alert code",
                &mut errs,
            ),
            Shape::Dispense => need(
                "dispense_category",
                "shape dispense needs a vkp-medicationdispense-events code",
                &mut errs,
            ),
            Shape::Measurement => {
                need(
                    "kind",
                    "shape measurement needs the measurement kind",
                    &mut errs,
                );
                need("value", "shape measurement needs the value", &mut errs);
            }
            Shape::Heartbeat => need(
                "device_id",
                "shape heartbeat needs the device id",
                &mut errs,
            ),
        }
    }
    if missing_patient == MissingPatient::Device {
        need(
            "device_id",
            "output.missing_patient = \"device\" keys events by device",
            &mut errs,
        );
    }
    if missing_patient == MissingPatient::Quarantine {
        need(
            "device_id",
            "output.missing_patient = \"quarantine\" resolves patients through the device registry",
            &mut errs,
        );
    }
    let items = match &output.items {
        None => None,
        Some(p) => match Path::parse(p) {
            Ok(p) => {
                if !reachable.contains(&Shape::Measurement) || reachable.len() > 1 {
                    errs.push((
                        "output.items".into(),
                        "items (one Observation per element) is only for mappings that produce only shape measurement".into(),
                    ));
                }
                Some(p)
            }
            Err(e) => {
                errs.push(("output.items".into(), e));
                None
            }
        },
    };
    if let Some(sys) = &output.identifier_system
        && !is_uri(sys)
    {
        errs.push((
            "output.identifier_system".into(),
            format!("{sys:?} is not an absolute URI"),
        ));
    }
    let max_future_minutes = output.max_future_minutes.unwrap_or(24 * 60);
    if max_future_minutes < 0 {
        errs.push((
            "output.max_future_minutes".into(),
            "must not be negative".into(),
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Mapping {
        xml_root: rules.xml_root,
        zone,
        shape,
        items,
        max_items: output.max_items.unwrap_or(500),
        missing_patient,
        identifier_system: output
            .identifier_system
            .unwrap_or_else(|| format!("urn:knutepunkt:{vendor}:event-id")),
        max_future_ms: max_future_minutes * 60_000,
        fields,
        tables: rules
            .tables
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect(),
    })
}

pub fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    !rest.is_empty()
        && !s.contains(char::is_whitespace)
        && scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn parse_template(s: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(TemplatePart::Lit(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in template {s:?}"))?
            + open;
        let name = &rest[open + 1..close];
        if name.is_empty() {
            return Err(format!("empty {{}} in template {s:?}"));
        }
        parts.push(TemplatePart::Field(name.to_string()));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unmatched '}}' in template {s:?}"));
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Lit(rest.to_string()));
    }
    if !parts.iter().any(|p| matches!(p, TemplatePart::Field(_))) {
        return Err("template names no {field}; use const instead".into());
    }
    Ok(parts)
}

#[allow(clippy::too_many_arguments)]
fn compile_field(
    at: &str,
    name: &str,
    raw: &RawField,
    domain: Domain,
    tables: &BTreeMap<String, BTreeMap<String, String>>,
    used_tables: &mut BTreeSet<String>,
    errs: &mut Vec<(String, String)>,
) -> Field {
    let mut err = |sub: &str, m: String| {
        let f = if sub.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{sub}")
        };
        errs.push((f, m));
    };
    let sources = [
        raw.path.is_some(),
        raw.constant.is_some(),
        raw.template.is_some(),
    ];
    let n_sources = sources.iter().filter(|b| **b).count();
    if n_sources != 1 {
        err(
            "",
            "needs exactly one of `path`, `const` or `template`".into(),
        );
    }
    let defaults = raw
        .default
        .as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default();
    let mut whole_default = None;
    let source = if let Some(p) = &raw.path {
        let list = p.to_vec();
        if list.is_empty() {
            err("path", "must name at least one path".into());
        }
        let mut paths = Vec::new();
        for s in &list {
            match Path::parse(s) {
                Ok(p) => paths.push(p),
                Err(e) => err("path", e),
            }
        }
        let per_part: Vec<Option<String>> = if raw.join.is_some() {
            match &raw.default {
                Some(OneOrMany::Many(v)) => {
                    if v.len() != list.len() {
                        err(
                            "default",
                            format!(
                                "with `join`, a list default needs one entry per path ({})",
                                list.len()
                            ),
                        );
                    }
                    v.iter()
                        .map(|d| (!d.is_empty()).then(|| d.clone()))
                        .collect()
                }
                Some(OneOrMany::One(d)) => vec![Some(d.clone()); list.len()],
                None => vec![None; list.len()],
            }
        } else {
            if let Some(OneOrMany::Many(_)) = &raw.default {
                err("default", "a list default needs `join`".into());
            }
            whole_default = defaults.first().cloned();
            Vec::new()
        };
        Source::Paths {
            paths,
            join: raw.join.clone(),
            defaults: per_part,
        }
    } else if let Some(c) = &raw.constant {
        if c.is_empty() {
            err("const", "must not be empty".into());
        }
        Source::Const(c.clone())
    } else if let Some(t) = &raw.template {
        match parse_template(t) {
            Ok(p) => Source::Template(p),
            Err(e) => {
                err("template", e);
                Source::Const(String::new())
            }
        }
    } else {
        Source::Const(String::new())
    };
    if raw.join.is_some() && raw.path.is_none() {
        err("join", "only meaningful with a list of paths".into());
    }
    if raw.constant.is_some() && raw.default.is_some() {
        err("default", "a constant needs no default".into());
    }
    let upper = match raw.case.as_deref() {
        None => None,
        Some("upper") => Some(true),
        Some("lower") => Some(false),
        Some(o) => {
            err("case", format!("{o:?}: expected \"upper\" or \"lower\""));
            None
        }
    };
    if let Some(p) = raw.pad
        && !(1..=16).contains(&p)
    {
        err("pad", "must be between 1 and 16".into());
    }
    let on_unknown = match raw.on_unknown.as_deref() {
        None | Some("error") => OnUnknown::Error,
        Some("keep") => OnUnknown::Keep,
        Some("drop") => OnUnknown::Drop,
        Some(o) => {
            err(
                "on_unknown",
                format!("{o:?}: expected \"error\", \"keep\" or \"drop\""),
            );
            OnUnknown::Error
        }
    };
    if raw.on_unknown.is_some() && raw.table.is_none() {
        err("on_unknown", "only meaningful with a `table`".into());
    }
    if let Some(t) = &raw.table {
        used_tables.insert(t.clone());
        match tables.get(t) {
            None => err(
                "table",
                format!("table {t:?} is not defined under [tables]"),
            ),
            Some(entries) => {
                for (k, v) in entries {
                    if let Err(m) = check_domain(domain, v) {
                        errs.push((format!("tables.{t}.{k:?}"), format!("used by {at}: {m}")));
                    }
                }
            }
        }
        if on_unknown == OnUnknown::Keep && domain != Domain::Free {
            errs.push((
                format!("{at}.on_unknown"),
                "\"keep\" would pass unchecked vendor values into a coded element; use \"error\", \"drop\" or a \"*\" table entry".into(),
            ));
        }
    } else {
        // Values used directly must already be valid for the domain.
        let mut direct: Vec<String> = Vec::new();
        if let Some(c) = &raw.constant {
            direct.push(c.clone());
        }
        if raw.path.is_some() && raw.join.is_none() {
            direct.extend(defaults.iter().cloned());
        }
        for v in direct {
            if let Err(m) = check_domain(domain, &v) {
                errs.push((at.to_string(), m));
            }
        }
        if raw.path.is_some()
            && domain != Domain::Free
            && domain != Domain::Unit
            && domain != Domain::Kind
        {
            errs.push((
                format!("{at}.table"),
                "a coded field read from the payload must translate through a `table`".into(),
            ));
        }
    }
    let is_dt = DATETIME_FIELDS.contains(&name);
    let value_type = match (raw.value_type.as_deref(), is_dt) {
        (None | Some("datetime"), true) => {
            let tf = match raw.time.as_deref() {
                None | Some("iso") => TimeFormat::Iso,
                Some("epoch_ms") => TimeFormat::EpochMs,
                Some("epoch_s") => TimeFormat::EpochS,
                Some(o) => {
                    errs.push((
                        format!("{at}.time"),
                        format!("{o:?}: expected \"iso\", \"epoch_ms\" or \"epoch_s\""),
                    ));
                    TimeFormat::Iso
                }
            };
            ValueType::DateTime(tf)
        }
        (Some(t), true) => {
            errs.push((
                format!("{at}.type"),
                format!("{t:?}: {name} is always a datetime"),
            ));
            ValueType::DateTime(TimeFormat::Iso)
        }
        (t, false) => {
            if raw.time.is_some() {
                errs.push((
                    format!("{at}.time"),
                    format!("only for datetime fields ({})", DATETIME_FIELDS.join(", ")),
                ));
            }
            match t {
                None if DECIMAL_FIELDS.contains(&name) => ValueType::Decimal,
                None | Some("string") => ValueType::String,
                Some("decimal") => ValueType::Decimal,
                Some("integer") => ValueType::Integer,
                Some(o) => {
                    errs.push((
                        format!("{at}.type"),
                        format!("{o:?}: expected \"string\", \"decimal\" or \"integer\""),
                    ));
                    ValueType::String
                }
            }
        }
    };
    if DECIMAL_FIELDS.contains(&name) && value_type != ValueType::Decimal {
        errs.push((format!("{at}.type"), format!("{name} is always a decimal")));
    }
    if let Some(0) = raw.max_len {
        errs.push((format!("{at}.max_len"), "must be at least 1".into()));
    }
    Field {
        name: name.to_string(),
        source,
        default: whole_default,
        trim: raw.trim.unwrap_or(true),
        pad: raw.pad,
        upper,
        table: raw.table.clone(),
        on_unknown,
        value_type,
        required: raw.required.unwrap_or(false),
        max_len: raw.max_len,
    }
}
