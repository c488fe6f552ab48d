//! Runs a compiled [`Mapping`] over a vendor body: parse (JSON or XML), extract the canonical
//! fields, check identity and codes, and build the R4 Bundle for the chosen shape.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{Number, Value};
use uuid::Uuid;

use super::codes::{self, Kind};
use super::datetime::{self, TimeFormat};
use super::identity;
use super::mapping::{
    Field, Mapping, MissingPatient, OnUnknown, Shape, Source, TemplatePart, ValueType,
};
use super::r4::*;
use super::{
    Category, DeviceQuery, Envelope, Format, Heartbeat, MapError, Outcome, PatientResolver,
    Priority, RawEvent, VendorSpec, json_depth, xml,
};

/// Namespace for deterministic `urn:uuid` fullUrls: v5(namespace, "<event id>/<n>").
const FULL_URL_NS: Uuid = Uuid::from_u128(0x6b6e_7574_6570_556e_8b74_6d61_7070_0001);

pub fn full_url(event_id: &str, n: usize) -> String {
    format!(
        "urn:uuid:{}",
        Uuid::new_v5(&FULL_URL_NS, format!("{event_id}/{n}").as_bytes())
    )
}

/// When the gateway received the event: the UUID v7 timestamp of the event id (so output is a
/// pure function of body + event id), else the wall clock.
pub fn received_ms(event_id: &str) -> i64 {
    if let Ok(u) = Uuid::parse_str(event_id)
        && u.get_version_num() == 7
        && let Some(ts) = u.get_timestamp()
    {
        let (s, n) = ts.to_unix();
        return s as i64 * 1000 + i64::from(n / 1_000_000);
    }
    crate::clock::now_ms()
}

#[derive(Debug, Clone)]
struct Val {
    text: String,
    epoch_ms: Option<i64>,
}

struct Ctx<'a> {
    root: &'a Value,
    item: &'a Value,
    prefix: String,
    m: &'a Mapping,
    received_ms: i64,
}

impl Ctx<'_> {
    fn where_(&self, f: &Field) -> String {
        match &f.source {
            Source::Paths { paths, .. } => paths
                .iter()
                .map(|p| p.display(&self.prefix))
                .collect::<Vec<_>>()
                .join(" + "),
            _ => format!("fields.{}", f.name),
        }
    }
}

fn scalar(v: &Value) -> Option<Result<String, &'static str>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(Ok(s.clone())),
        Value::Number(n) => Some(Ok(n.to_string())),
        Value::Bool(b) => Some(Ok(b.to_string())),
        Value::Array(_) => Some(Err("expected a single value, found an array")),
        Value::Object(_) => Some(Err("expected a single value, found an object")),
    }
}

fn clean(f: &Field, s: String, _at: &str) -> Result<Option<String>, MapError> {
    let mut s = if f.trim { s.trim().to_string() } else { s };
    if s.is_empty() {
        return Ok(None);
    }
    // Numeric codes are re-padded ("3", "03", "0003" → "0003"); other values are left alone
    // (a code table then decides whether they are known).
    if let Some(w) = f.pad
        && s.bytes().all(|b| b.is_ascii_digit())
    {
        let t = s.trim_start_matches('0');
        s = format!("{t:0>w$}");
    }
    match f.upper {
        Some(true) => s = s.to_uppercase(),
        Some(false) => s = s.to_lowercase(),
        None => {}
    }
    Ok(Some(s))
}

fn lookup<'t>(
    table: &'t HashMap<String, String>,
    key: &str,
    parts: &[String],
    sep: &str,
) -> Option<&'t String> {
    if let Some(v) = table.get(key) {
        return Some(v);
    }
    let n = parts.len();
    if n > 1 && n <= 6 {
        let mut masks: Vec<u32> = (1..(1u32 << n) - 1).collect();
        masks.sort_by_key(|m| (m.count_ones(), std::cmp::Reverse(*m)));
        for mask in masks {
            let k: Vec<&str> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if mask & (1 << i) != 0 {
                        "*"
                    } else {
                        p.as_str()
                    }
                })
                .collect();
            if let Some(v) = table.get(&k.join(sep)) {
                return Some(v);
            }
        }
    }
    table.get("*")
}

fn eval(f: &Field, ctx: &Ctx<'_>, done: &HashMap<String, Val>) -> Result<Option<Val>, MapError> {
    let at = ctx.where_(f);
    let mut parts: Vec<String> = Vec::new();
    let mut sep = "";
    let raw: Option<String> = match &f.source {
        Source::Const(c) => Some(c.clone()),
        Source::Template(tpl) => {
            let mut out = String::new();
            for p in tpl {
                match p {
                    TemplatePart::Lit(l) => out.push_str(l),
                    TemplatePart::Field(name) => match done.get(name) {
                        Some(v) => out.push_str(&v.text),
                        None => return Ok(None),
                    },
                }
            }
            Some(out)
        }
        Source::Paths {
            paths,
            join,
            defaults,
        } => {
            if let Some(j) = join {
                sep = j.as_str();
                for (i, p) in paths.iter().enumerate() {
                    let found = match p.eval(ctx.root, ctx.item).and_then(scalar) {
                        Some(Err(m)) => {
                            return Err(MapError::unmappable(p.display(&ctx.prefix), m));
                        }
                        Some(Ok(s)) => clean(f, s, &p.display(&ctx.prefix))?,
                        None => None,
                    };
                    let part = match found {
                        Some(s) => s,
                        None => match defaults.get(i).cloned().flatten() {
                            Some(d) => d,
                            None => {
                                parts.clear();
                                break;
                            }
                        },
                    };
                    parts.push(part);
                }
                (parts.len() == paths.len()).then(|| parts.join(sep))
            } else {
                let mut found = None;
                for p in paths {
                    match p.eval(ctx.root, ctx.item).and_then(scalar) {
                        Some(Err(m)) => {
                            return Err(MapError::unmappable(p.display(&ctx.prefix), m));
                        }
                        Some(Ok(s)) => {
                            if let Some(s) = clean(f, s, &p.display(&ctx.prefix))? {
                                found = Some(s);
                                break;
                            }
                        }
                        None => {}
                    }
                }
                found.or_else(|| f.default.clone())
            }
        }
    };
    let Some(mut text) = raw else {
        if f.required {
            return Err(MapError::unmappable(
                at,
                format!("required ({}) but missing or empty", f.name),
            ));
        }
        return Ok(None);
    };
    if let Some(tname) = &f.table {
        let table = &ctx.m.tables[tname];
        match lookup(table, &text, &parts, sep) {
            Some(v) => text = v.clone(),
            None => match f.on_unknown {
                OnUnknown::Keep => {}
                OnUnknown::Drop => return Ok(None),
                OnUnknown::Error => {
                    let mut known: Vec<&str> = table.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    let more = if known.len() > 12 { ", …" } else { "" };
                    known.truncate(12);
                    return Err(MapError::unmappable(
                        at,
                        format!(
                            "unknown code {text:?} for {} (table {tname}); known: {}{more}",
                            f.name,
                            known.join(", ")
                        ),
                    ));
                }
            },
        }
    }
    if let Some(max) = f.max_len
        && text.chars().count() > max
    {
        return Err(MapError::unmappable(
            at,
            format!("{} is longer than {max} characters", f.name),
        ));
    }
    let mut epoch_ms = None;
    match f.value_type {
        ValueType::String => {}
        ValueType::Integer => {
            if text.parse::<i64>().is_err() {
                return Err(MapError::unmappable(
                    at,
                    format!("{text:?} is not an integer ({})", f.name),
                ));
            }
        }
        ValueType::Decimal => text = decimal(&text).map_err(|m| MapError::unmappable(&at, m))?,
        ValueType::DateTime(tf) => {
            let dt =
                datetime::parse(&text, tf, ctx.m.zone).map_err(|m| MapError::unmappable(&at, m))?;
            if dt.epoch_ms < 946_684_800_000 {
                return Err(MapError::unmappable(
                    &at,
                    format!(
                        "{} {} is before 2000; is the device clock set?",
                        f.name, dt.text
                    ),
                ));
            }
            if dt.epoch_ms > ctx.received_ms + ctx.m.max_future_ms {
                return Err(MapError::unmappable(
                    &at,
                    format!(
                        "{} {} is {} minutes after the gateway received the event; is the device clock set?",
                        f.name,
                        dt.text,
                        (dt.epoch_ms - ctx.received_ms) / 60_000
                    ),
                ));
            }
            epoch_ms = Some(dt.epoch_ms);
            text = dt.text;
        }
    }
    Ok(Some(Val { text, epoch_ms }))
}

/// A FHIR decimal: keeps the vendor's digits (precision) when already canonical.
fn decimal(s: &str) -> Result<String, String> {
    let t = s.trim();
    let v: f64 = t.parse().map_err(|_| format!("{t:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!(
            "{t:?} is not a finite number (device special value?)"
        ));
    }
    let canonical = {
        let b = t.as_bytes();
        let body = t.strip_prefix('-').unwrap_or(t);
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (body, None),
        };
        !b.is_empty()
            && !int.is_empty()
            && int.bytes().all(|c| c.is_ascii_digit())
            && (int == "0" || !int.starts_with('0'))
            && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()))
    };
    if canonical {
        Ok(t.to_string())
    } else {
        Ok(format_decimal(v, None))
    }
}

fn format_decimal(v: f64, decimals: Option<usize>) -> String {
    let s = match decimals {
        Some(d) => format!("{v:.d$}"),
        None => format!("{v}"),
    };
    if s == "-0" || s.starts_with("-0.") && s[3..].bytes().all(|b| b == b'0') {
        s[1..].to_string()
    } else {
        s
    }
}

fn number(s: &str) -> Number {
    Number::from_str(s).unwrap_or_else(|_| Number::from(0))
}

/// Fields evaluated for one item.
struct Record {
    vals: HashMap<String, Val>,
    /// Where each field was read from, for errors.
    at: HashMap<String, String>,
}

impl Record {
    fn get(&self, k: &str) -> Option<&str> {
        self.vals.get(k).map(|v| v.text.as_str())
    }
    fn at(&self, k: &str) -> String {
        self.at
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("fields.{k}"))
    }
}

fn evaluate(ctx: &Ctx<'_>, shape: Shape) -> Result<Record, MapError> {
    let mut vals = HashMap::new();
    let mut at = HashMap::new();
    // A heartbeat needs only who and when; nothing clinical is evaluated (or can fail).
    const HEARTBEAT_FIELDS: [&str; 5] = [
        "event_id",
        "occurred",
        "tenant",
        "device_id",
        "device_system",
    ];
    let relevant = |f: &Field| {
        if shape == Shape::Heartbeat {
            return HEARTBEAT_FIELDS.contains(&f.name.as_str());
        }
        let s = super::mapping::field_shapes(&f.name);
        s.is_empty() || s.contains(&shape)
    };
    let mut names: Vec<&String> = ctx.m.fields.keys().collect();
    names.sort();
    for pass in [false, true] {
        for name in &names {
            let f = &ctx.m.fields[*name];
            if matches!(f.source, Source::Template(_)) != pass || !relevant(f) {
                continue;
            }
            at.insert((*name).clone(), ctx.where_(f));
            if let Some(v) = eval(f, ctx, &vals)? {
                vals.insert((*name).clone(), v);
            }
        }
    }
    Ok(Record { vals, at })
}

pub fn run(
    spec: &VendorSpec,
    m: &Mapping,
    raw: &RawEvent<'_>,
    resolver: &dyn PatientResolver,
) -> Result<Outcome, MapError> {
    let doc: Value = match spec.format {
        Format::Xml => {
            let (root, v) = xml::parse_with_depth(raw.body, raw.max_xml_depth)?;
            if let Some(want) = &m.xml_root
                && &root != want
            {
                return Err(MapError::unmappable(
                    root.clone(),
                    format!("expected a <{want}> document, got <{root}>"),
                ));
            }
            v
        }
        _ => {
            let depth = json_depth::max_depth(raw.body, raw.max_json_depth);
            if depth > raw.max_json_depth {
                return Err(MapError::Malformed(format!(
                    "JSON nesting deeper than {} levels (ingest.max_json_depth)",
                    raw.max_json_depth
                )));
            }
            serde_json::from_slice(raw.body)
                .map_err(|e| MapError::Malformed(format!("invalid JSON: {e}")))?
        }
    };
    let received = received_ms(&raw.id);
    let items: Vec<(&Value, String)> = match &m.items {
        None => vec![(&doc, String::new())],
        Some(p) => {
            let name = p.display("");
            let arr = p
                .eval(&doc, &doc)
                .and_then(Value::as_array)
                .ok_or_else(|| MapError::unmappable(&name, "expected an array of readings"))?;
            if arr.is_empty() {
                return Err(MapError::unmappable(&name, "holds no readings"));
            }
            if arr.len() > m.max_items {
                return Err(MapError::unmappable(
                    &name,
                    format!(
                        "holds {} readings; at most {} per request",
                        arr.len(),
                        m.max_items
                    ),
                ));
            }
            arr.iter()
                .enumerate()
                .map(|(i, v)| (v, format!("{name}[{i}]")))
                .collect()
        }
    };
    let ctx0 = Ctx {
        root: &doc,
        item: items[0].0,
        prefix: items[0].1.clone(),
        m,
        received_ms: received,
    };
    let shape_val = eval(&m.shape, &ctx0, &HashMap::new())?.ok_or_else(|| {
        MapError::unmappable(
            ctx0.where_(&m.shape),
            "missing; it decides what kind of event this is",
        )
    })?;
    let shape = Shape::parse(&shape_val.text).ok_or_else(|| {
        MapError::unmappable(
            ctx0.where_(&m.shape),
            format!("{:?} is not a shape", shape_val.text),
        )
    })?;
    let rec = evaluate(&ctx0, shape)?;

    // Tenant: request header, else payload, else (for device-only payloads) the device's
    // assignment, else the vendor default.
    let named_tenant = match (&raw.tenant, rec.get("tenant")) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(t)) => {
            if !crate::config::validate::is_municipality_number(t) {
                return Err(MapError::unmappable(
                    rec.at("tenant"),
                    format!("{t:?} is not a 4-digit municipality number"),
                ));
            }
            if !spec.tenants.is_empty() && !spec.tenants.iter().any(|x| x == t) {
                return Err(MapError::unmappable(
                    rec.at("tenant"),
                    format!("vendor {:?} may not post for municipality {t}", spec.name),
                ));
            }
            Some(t.to_string())
        }
        (None, None) => None,
    };
    let vendor_event_id = rec.get("event_id").map(str::to_string);

    if shape == Shape::Heartbeat {
        let device = rec.get("device_id").ok_or_else(|| {
            MapError::unmappable(rec.at("device_id"), "a heartbeat needs the device id")
        })?;
        let at = rec
            .vals
            .get("occurred")
            .and_then(|v| v.epoch_ms)
            .unwrap_or(received);
        return Ok(Outcome::Heartbeat(Heartbeat {
            vendor: spec.name.clone(),
            device_key: format!("device:{device}"),
            tenant: named_tenant.or_else(|| spec.default_tenant.clone()),
            vendor_event_id,
            at_ms: at,
        }));
    }

    let device = DeviceInfo::from(&rec, &spec.name);
    let allow_synth = |tenant: &Option<String>| {
        tenant
            .as_ref()
            .is_some_and(|t| spec.test_tenants.contains(t))
    };
    let mut tenant = named_tenant;
    let patient = match rec.get("patient_id") {
        Some(p) => {
            tenant = tenant.or_else(|| spec.default_tenant.clone());
            Some(
                identity::parse_person_id(p, allow_synth(&tenant))
                    .map_err(|e| MapError::unmappable(rec.at("patient_id"), e))?,
            )
        }
        None => {
            // Only a device id: ask the device registry at the event's time.
            let at = rec
                .vals
                .get("occurred")
                .and_then(|v| v.epoch_ms)
                .unwrap_or(received);
            let query = device.as_ref().map(|d| DeviceQuery {
                vendor: spec.name.clone(),
                device_system: d.system.clone(),
                device_id: d.id.clone(),
                device_field: rec.at("device_id"),
                at_ms: at,
            });
            let resolved = query
                .as_ref()
                .and_then(|q| resolver.resolve(q).map(|r| (q, r)));
            match resolved {
                Some((q, r)) => {
                    if let Some(t) = &tenant
                        && *t != r.tenant
                    {
                        return Err(MapError::unmappable(
                            &q.device_field,
                            format!(
                                "device {} is assigned (assignment {}) to a patient of municipality \
                                 {}, but the event is for municipality {t}",
                                q.device_id, r.assignment_id, r.tenant
                            ),
                        ));
                    }
                    tenant = Some(r.tenant.clone());
                    // Registry entries are validated when added; checked again here so an entry
                    // can never bypass the identity rules (never echoing the number).
                    Some(
                        identity::parse_person_id(&r.patient_id, allow_synth(&tenant)).map_err(
                            |_| {
                                MapError::unmappable(
                                    &q.device_field,
                                    format!(
                                        "device {} is assigned (assignment {}) to a patient \
                                         identifier that is not valid for municipality {}",
                                        q.device_id, r.assignment_id, r.tenant
                                    ),
                                )
                            },
                        )?,
                    )
                }
                None if m.missing_patient != MissingPatient::Reject && device.is_some() => None,
                None => {
                    return Err(match &query {
                        Some(q) => MapError::unmappable(
                            &q.device_field,
                            format!(
                                "no patient identifier in the payload ({}) and no device \
                                 assignment covers device {} at {}",
                                rec.at("patient_id"),
                                q.device_id,
                                datetime_render(m, q.at_ms)
                            ),
                        ),
                        None => MapError::unmappable(
                            rec.at("patient_id"),
                            "no patient identifier and no device id in the payload",
                        ),
                    });
                }
            }
        }
    };
    let tenant = tenant.or_else(|| spec.default_tenant.clone());
    let patient_ref = patient.as_ref().map(|p| Reference {
        identifier: Some(Identifier::new(p.kind.system(), &p.value)),
        display: rec.get("patient_name").map(str::to_string),
        ..Default::default()
    });
    let key = match (&patient, &device) {
        (Some(p), _) => format!("patient:{}", p.value),
        (None, Some(d)) => format!("device:{}", d.id),
        (None, None) => unreachable!("checked above"),
    };
    let category = match rec.get("category") {
        Some(c) => {
            Category::from_str(c).map_err(|e| MapError::unmappable(rec.at("category"), e))?
        }
        None => match shape {
            Shape::Alarm => Category::Alarm,
            Shape::Dispense => Category::Medication,
            _ => Category::Measurement,
        },
    };
    let priority = match rec.get("priority") {
        Some(p) => {
            Priority::from_str(p).map_err(|e| MapError::unmappable(rec.at("priority"), e))?
        }
        None if shape == Shape::Alarm => Priority::High,
        None => Priority::Normal,
    };
    let zone_render = |ms: i64| datetime_render(m, ms);
    let occurred = rec
        .vals
        .get("occurred")
        .map(|v| v.text.clone())
        .unwrap_or_else(|| zone_render(received));
    let b = Build {
        spec,
        m,
        raw,
        rec: &rec,
        patient: patient_ref,
        device,
        occurred,
        received_text: zone_render(received),
    };
    let bundle = match shape {
        Shape::Alarm => b.alarm()?,
        Shape::Dispense => b.dispense()?,
        Shape::Measurement => {
            let mut recs = vec![rec_clone(&rec)];
            for (item, prefix) in items.iter().skip(1) {
                let ctx = Ctx {
                    root: &doc,
                    item,
                    prefix: prefix.clone(),
                    m,
                    received_ms: received,
                };
                recs.push(evaluate(&ctx, shape)?);
            }
            b.measurements(&recs)?
        }
        Shape::Heartbeat => unreachable!("handled above"),
    };
    let fhir = serde_json::to_string(&bundle)
        .map_err(|e| MapError::Malformed(format!("cannot serialise FHIR output: {e}")))?;
    Ok(Outcome::Event(Envelope {
        id: raw.id.clone(),
        vendor: spec.name.clone(),
        vendor_event_id,
        category,
        priority,
        tenant,
        key,
        mapping_version: spec.version.clone(),
        fhir,
    }))
}

fn rec_clone(r: &Record) -> Record {
    Record {
        vals: r.vals.clone(),
        at: r.at.clone(),
    }
}

/// Renders an instant in the mapping's zone (seconds precision).
fn datetime_render(m: &Mapping, ms: i64) -> String {
    let secs = ms - ms.rem_euclid(1000);
    datetime::parse(&(secs / 1000).to_string(), TimeFormat::EpochS, m.zone)
        .map(|d| d.text)
        .unwrap_or_else(|_| datetime::render(secs, 0, false))
}

struct DeviceInfo {
    id: String,
    system: String,
    type_code: Option<String>,
    type_system: String,
    type_display: Option<String>,
    name: Option<String>,
}

impl DeviceInfo {
    fn from(rec: &Record, vendor: &str) -> Option<DeviceInfo> {
        let id = rec.get("device_id")?.to_string();
        Some(DeviceInfo {
            id,
            system: rec
                .get("device_system")
                .map_or_else(|| format!("urn:knutepunkt:{vendor}:device"), str::to_string),
            type_code: rec.get("device_type").map(str::to_string),
            type_system: rec.get("device_type_system").map_or_else(
                || format!("urn:knutepunkt:{vendor}:device-type"),
                str::to_string,
            ),
            type_display: rec.get("device_type_display").map(str::to_string),
            name: rec.get("device_name").map(str::to_string),
        })
    }

    fn identifier(&self) -> Identifier {
        Identifier::new(&self.system, &self.id)
    }

    fn label(&self) -> String {
        match (&self.type_display, &self.name) {
            (Some(t), _) => t.clone(),
            (None, Some(n)) => n.clone(),
            _ => format!("Enhet {}", self.id),
        }
    }
}

struct Build<'a> {
    spec: &'a VendorSpec,
    m: &'a Mapping,
    raw: &'a RawEvent<'a>,
    rec: &'a Record,
    patient: Option<Reference>,
    device: Option<DeviceInfo>,
    occurred: String,
    received_text: String,
}

fn severity(p: Option<&str>) -> Option<String> {
    Some(
        match p {
            Some("critical" | "high") | None => "high",
            Some("normal") => "moderate",
            Some(_) => "low",
        }
        .to_string(),
    )
}

fn profile(name: &str) -> Option<Meta> {
    Meta::profile(format!("{}{name}", codes::PROFILE_BASE))
}

fn uri_or(s: Option<&str>, fallback: String) -> String {
    match s {
        Some(s) if super::mapping::is_uri(s) => s.to_string(),
        _ => fallback,
    }
}

impl Build<'_> {
    fn event_identifier(&self) -> Vec<Identifier> {
        self.rec
            .get("event_id")
            .map(|v| vec![Identifier::new(&self.m.identifier_system, v)])
            .unwrap_or_default()
    }

    fn bundle(&self, type_: &str, entry: Vec<BundleEntry>) -> Bundle {
        Bundle {
            resource_type: "Bundle",
            id: self.raw.id.clone(),
            meta: None,
            identifier: Identifier::new("urn:ietf:rfc:3986", &format!("urn:uuid:{}", self.raw.id)),
            type_: type_.to_string(),
            timestamp: Some(self.received_text.clone()),
            entry,
        }
    }

    fn device_resource(&self, d: &DeviceInfo) -> Device {
        Device {
            identifier: vec![d.identifier()],
            status: "active".into(),
            device_name: d
                .name
                .iter()
                .map(|n| DeviceName {
                    name: n.clone(),
                    type_: "model-name".into(),
                })
                .collect(),
            type_: d.type_code.as_ref().map(|c| {
                CodeableConcept::one(Coding::new(&d.type_system, c, d.type_display.as_deref()))
            }),
            owner: None,
        }
    }

    fn alarm(&self) -> Result<Bundle, MapError> {
        let rec = self.rec;
        let id = &self.raw.id;
        let alert = rec.get("alert_code").ok_or_else(|| {
            MapError::unmappable(rec.at("alert_code"), "no VKP alert code for this event")
        })?;
        let alert_display = codes::lookup(codes::ALERT_CODES, alert).ok_or_else(|| {
            MapError::unmappable(
                rec.at("alert_code"),
                format!("{alert:?} is not in vkp-alert-code-v090"),
            )
        })?;
        let (comp_url, issue_url, dev_url, enc_url) = (
            full_url(id, 0),
            full_url(id, 1),
            full_url(id, 2),
            full_url(id, 3),
        );
        let mut code =
            CodeableConcept::one(Coding::new(codes::VKP_ALERT, alert, Some(alert_display)));
        if let Some(vc) = rec.get("vendor_code") {
            let sys = uri_or(
                rec.get("vendor_code_system"),
                format!("urn:knutepunkt:{}:code", self.spec.name),
            );
            code.coding
                .push(Coding::new(&sys, vc, rec.get("vendor_code_display")));
        }
        code.text = Some(
            rec.get("vendor_code_display")
                .or(rec.get("text"))
                .unwrap_or(alert_display)
                .to_string(),
        );
        let status = rec.get("status").unwrap_or("final").to_string();
        let issue = DetectedIssue {
            meta: profile("vkp-DetectedIssue-v090"),
            identifier: self.event_identifier(),
            status,
            code,
            severity: severity(rec.get("priority")),
            patient: self.patient.clone(),
            identified_date_time: Some(self.occurred.clone()),
            author: self.device.as_ref().map(|d| Reference {
                reference: Some(dev_url.clone()),
                display: Some(d.label()),
                ..Default::default()
            }),
            detail: rec.get("location").map(|l| format!("Sted: {l}")),
        };
        let closed = rec.get("closed_at").map(str::to_string);
        let accepted = rec.get("accepted_at").map(str::to_string);
        let operator = rec.get("operator").map(|o| Reference {
            identifier: rec
                .get("operator_system")
                .filter(|s| super::mapping::is_uri(s))
                .map(|s| Identifier::new(s, o)),
            display: Some(o.to_string()),
            ..Default::default()
        });
        let encounter = closed.as_ref().map(|end| Encounter {
            meta: profile("vkp-Encounter-v090"),
            identifier: vec![Identifier::new("urn:ietf:rfc:3986", &enc_url)],
            status: "finished".into(),
            class: {
                let c = rec.get("encounter_class").unwrap_or("VR");
                let d = match c {
                    "HH" => "home health",
                    "AMB" => "ambulatory",
                    "FLD" => "field",
                    _ => "virtual",
                };
                Coding::new(codes::ACT_CODE, c, Some(d))
            },
            subject: self.patient.clone(),
            participant: operator
                .iter()
                .map(|o| EncounterParticipant {
                    individual: o.clone(),
                })
                .collect(),
            period: Period {
                start: Some(accepted.clone().unwrap_or_else(|| self.occurred.clone())),
                end: Some(end.clone()),
            },
            reason_code: vec![CodeableConcept::one(Coding::new(
                codes::VKP_ENCOUNTER_REASON,
                "2",
                Some("Hendelsesbasert tilsyn"),
            ))],
        });

        // Composition: the document's header, always first.
        let mut summary = vec![format!("Hendelse: {alert_display} ({alert})")];
        if let Some(vc) = rec.get("vendor_code") {
            let d = rec
                .get("vendor_code_display")
                .map(|d| format!(" {d}"))
                .unwrap_or_default();
            summary.push(format!("Leverandørkode: {vc}{d}"));
        }
        if let Some(d) = &self.device {
            summary.push(format!("Enhet: {} ({})", d.label(), d.id));
        }
        if let Some(l) = rec.get("location") {
            summary.push(format!("Sted: {l}"));
        }
        if let Some(t) = rec.get("text") {
            summary.push(format!("Tekst: {t}"));
        }
        summary.push(format!("Tidspunkt: {}", self.occurred));
        let section_code = |c: &str, d: &str| {
            CodeableConcept::one(Coding::new(codes::VKP_COMPOSITION_SECTION, c, Some(d)))
        };
        let mut sections = vec![Section {
            title: "Hendelse".into(),
            code: section_code("2", "Sammenstilt tekst"),
            text: Narrative::text("generated", &summary),
            entry: vec![Reference::to(&issue_url)],
        }];
        if let Some(note) = rec.get("note") {
            sections.push(Section {
                title: "Oppfølging".into(),
                code: section_code("1.1", "Beskrivelse av oppfølging"),
                text: Narrative::text(
                    "additional",
                    &note.lines().map(str::to_string).collect::<Vec<_>>(),
                ),
                entry: encounter.iter().map(|_| Reference::to(&enc_url)).collect(),
            });
        }
        let ev = |c: &str, d: &str, at: &str, who: Option<&Reference>| CompositionEvent {
            code: vec![CodeableConcept {
                coding: vec![Coding::new(codes::VKP_COMPOSITION_EVENT, c, Some(d))],
                text: who.and_then(|w| w.display.clone()),
            }],
            period: Some(Period {
                start: Some(at.to_string()),
                end: None,
            }),
        };
        let mut events = vec![ev("0", "Hendelse meldt", &self.occurred, None)];
        if let Some(a) = &accepted {
            events.push(ev("1", "Hendelse behandles", a, operator.as_ref()));
        }
        if let Some(c) = &closed {
            events.push(ev("3", "Hendelse kvittert", c, operator.as_ref()));
        }
        let cat = rec.get("composition_category").unwrap_or("1");
        let author = operator.clone().unwrap_or_else(|| match &self.device {
            Some(d) => Reference {
                reference: Some(dev_url.clone()),
                display: Some(d.label()),
                ..Default::default()
            },
            None => Reference {
                display: Some(self.spec.name.clone()),
                ..Default::default()
            },
        });
        let title = match rec.get("event_id") {
            Some(e) => format!("Journalnotat for respons på hendelse {e}"),
            None => "Journalnotat for respons på hendelse".to_string(),
        };
        let composition = Composition {
            meta: profile("vkp-Composition-v090"),
            status: "final".into(),
            type_: CodeableConcept::one(Coding::new(
                codes::LOINC,
                "34133-9",
                Some("Summarization of episode note"),
            )),
            category: vec![CodeableConcept::one(Coding::new(
                codes::VKP_COMPOSITION_CATEGORY,
                cat,
                codes::lookup(codes::COMPOSITION_CATEGORIES, cat),
            ))],
            subject: self.patient.clone(),
            date: closed.clone().unwrap_or_else(|| self.occurred.clone()),
            author: vec![author],
            title,
            event: events,
            section: sections,
        };
        let mut entry = vec![
            BundleEntry {
                full_url: comp_url,
                resource: Resource::Composition(Box::new(composition)),
            },
            BundleEntry {
                full_url: issue_url,
                resource: Resource::DetectedIssue(Box::new(issue)),
            },
        ];
        if let Some(d) = &self.device {
            entry.push(BundleEntry {
                full_url: dev_url,
                resource: Resource::Device(Box::new(self.device_resource(d))),
            });
        }
        if let Some(e) = encounter {
            entry.push(BundleEntry {
                full_url: enc_url,
                resource: Resource::Encounter(Box::new(e)),
            });
        }
        Ok(self.bundle("document", entry))
    }

    fn dispense(&self) -> Result<Bundle, MapError> {
        let rec = self.rec;
        let url = full_url(&self.raw.id, 0);
        let cat = rec.get("dispense_category").ok_or_else(|| {
            MapError::unmappable(
                rec.at("dispense_category"),
                "no vkp-medicationdispense-events code",
            )
        })?;
        let mut identifier = vec![Identifier::new("urn:ietf:rfc:3986", &url)];
        identifier.extend(self.event_identifier());
        let md = MedicationDispense {
            meta: profile("vkp-MedicationDispense-v090"),
            identifier,
            status: rec
                .get("dispense_status")
                .unwrap_or("completed")
                .to_string(),
            category: Some(CodeableConcept::one(Coding::new(
                codes::VKP_DISPENSE_EVENTS,
                cat,
                codes::lookup(codes::DISPENSE_EVENTS, cat),
            ))),
            medication: CodeableConcept {
                coding: vec![],
                text: Some(
                    rec.get("medication")
                        .unwrap_or("Ukjent medisin")
                        .to_string(),
                ),
            },
            subject: self.patient.clone(),
            performer: self
                .device
                .iter()
                .map(|d| Performer {
                    actor: Reference {
                        identifier: Some(d.identifier()),
                        display: Some(d.label()),
                        ..Default::default()
                    },
                })
                .collect(),
            when_handed_over: Some(self.occurred.clone()),
            dosage_instruction: rec
                .get("dosage_text")
                .map(|t| {
                    vec![Dosage {
                        text: t.to_string(),
                    }]
                })
                .unwrap_or_default(),
        };
        Ok(self.bundle(
            "collection",
            vec![BundleEntry {
                full_url: url,
                resource: Resource::MedicationDispense(Box::new(md)),
            }],
        ))
    }

    fn measurements(&self, recs: &[Record]) -> Result<Bundle, MapError> {
        let mut entry = Vec::with_capacity(recs.len());
        for (i, rec) in recs.iter().enumerate() {
            let obs = self.observation(rec)?;
            entry.push(BundleEntry {
                full_url: full_url(&self.raw.id, i),
                resource: Resource::Observation(Box::new(obs)),
            });
        }
        Ok(self.bundle("collection", entry))
    }

    fn quantity(&self, rec: &Record, field: &str, kind: Kind) -> Result<Quantity, MapError> {
        let def = kind.def();
        let raw = rec.get(field).ok_or_else(|| {
            MapError::unmappable(rec.at(field), format!("{} needs {field}", def.name))
        })?;
        let unit = rec.get("unit").unwrap_or(def.unit);
        let text = if unit == def.unit {
            raw.to_string()
        } else {
            let (a, b) = codes::conversion(unit, def.unit).ok_or_else(|| {
                MapError::unmappable(
                    rec.at("unit"),
                    format!(
                        "unit {unit} cannot be used for {} (expected {} or a convertible unit)",
                        def.name, def.unit
                    ),
                )
            })?;
            let v: f64 = raw.parse().unwrap_or(f64::NAN);
            format_decimal(v * a + b, Some(def.decimals))
        };
        let v: f64 = text.parse().unwrap_or(f64::NAN);
        if !(def.range.0..=def.range.1).contains(&v) {
            return Err(MapError::unmappable(
                rec.at(field),
                format!(
                    "{} {text} {} is outside the plausible range {}-{}; wrong unit?",
                    def.name, def.unit, def.range.0, def.range.1
                ),
            ));
        }
        Ok(Quantity {
            value: number(&text),
            unit: def.unit_text.to_string(),
            system: codes::UCUM.to_string(),
            code: def.unit.to_string(),
        })
    }

    fn observation(&self, rec: &Record) -> Result<Observation, MapError> {
        let kind_s = rec.get("kind").ok_or_else(|| {
            MapError::unmappable(rec.at("kind"), "which measurement this is is missing")
        })?;
        let kind = Kind::parse(kind_s).ok_or_else(|| {
            MapError::unmappable(
                rec.at("kind"),
                format!("{kind_s:?} is not a measurement kind"),
            )
        })?;
        let def = kind.def();
        let mut code =
            CodeableConcept::one(Coding::new(codes::LOINC, def.loinc, Some(def.display)));
        for (c, d) in def.extra {
            code.coding.push(Coding::new(codes::LOINC, c, Some(d)));
        }
        code.text = Some(def.display.to_string());
        let (value_quantity, component) = if kind == Kind::BloodPressure {
            let sys = self.quantity(rec, "value", kind)?;
            let dia = self.quantity(rec, "value2", kind)?;
            let comp = |(c, d): (&str, &str), q: Quantity| ObservationComponent {
                code: CodeableConcept::one(Coding::new(codes::LOINC, c, Some(d))),
                value_quantity: q,
            };
            (
                None,
                vec![
                    comp(codes::BP_SYSTOLIC, sys),
                    comp(codes::BP_DIASTOLIC, dia),
                ],
            )
        } else {
            (Some(self.quantity(rec, "value", kind)?), vec![])
        };
        let device = DeviceInfo::from(rec, &self.spec.name);
        let effective = rec
            .get("effective")
            .or(rec.get("occurred"))
            .map_or_else(|| self.occurred.clone(), str::to_string);
        let identifier = rec
            .get("reading_id")
            .map(|r| {
                vec![Identifier::new(
                    &format!("urn:knutepunkt:{}:measurement", self.spec.name),
                    r,
                )]
            })
            .unwrap_or_default();
        Ok(Observation {
            meta: def.profile.and_then(|p| {
                Meta::profile(format!("http://hl7.org/fhir/StructureDefinition/{p}"))
            }),
            identifier,
            status: "final".into(),
            category: vec![CodeableConcept::one(Coding::new(
                codes::OBS_CATEGORY,
                def.category,
                Some(if def.category == "vital-signs" {
                    "Vital Signs"
                } else {
                    "Laboratory"
                }),
            ))],
            code,
            subject: self.patient.clone(),
            effective_date_time: effective,
            performer: vec![],
            value_quantity,
            device: device.map(|d| Reference {
                identifier: Some(d.identifier()),
                display: Some(d.label()),
                ..Default::default()
            }),
            component,
        })
    }
}
