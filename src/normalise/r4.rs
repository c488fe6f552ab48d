//! Our own small typed FHIR R4 model for the resources the mappings emit. Field order follows
//! the R4 StructureDefinitions so output is stable and diffable; decimals are
//! `serde_json::Number` (arbitrary precision), so `2.0` stays `2.0`.

use serde::Serialize;
use serde_json::Number;

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Meta {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<String>,
}

impl Meta {
    pub fn profile(url: impl Into<String>) -> Option<Meta> {
        Some(Meta {
            profile: vec![url.into()],
        })
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Coding {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Coding {
    pub fn new(system: &str, code: &str, display: Option<&str>) -> Coding {
        Coding {
            system: Some(system.to_string()),
            code: Some(code.to_string()),
            display: display.map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct CodeableConcept {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub coding: Vec<Coding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl CodeableConcept {
    pub fn one(c: Coding) -> CodeableConcept {
        CodeableConcept {
            coding: vec![c],
            text: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Identifier {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub value: String,
}

impl Identifier {
    pub fn new(system: &str, value: &str) -> Identifier {
        Identifier {
            system: Some(system.to_string()),
            value: value.to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Reference {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Reference {
    pub fn to(full_url: &str) -> Reference {
        Reference {
            reference: Some(full_url.to_string()),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Period {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantity {
    pub value: Number,
    pub unit: String,
    pub system: String,
    pub code: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Narrative {
    pub status: String,
    pub div: String,
}

impl Narrative {
    /// XHTML narrative with escaped text, one paragraph per line.
    pub fn text(status: &str, lines: &[String]) -> Narrative {
        let mut div = String::from("<div xmlns=\"http://www.w3.org/1999/xhtml\">");
        for l in lines {
            div.push_str("<p>");
            div.push_str(&escape(l));
            div.push_str("</p>");
        }
        div.push_str("</div>");
        Narrative {
            status: status.to_string(),
            div,
        }
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DetectedIssue {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    pub code: CodeableConcept,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<Reference>,
    #[serde(rename = "identifiedDateTime", skip_serializing_if = "Option::is_none")]
    pub identified_date_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author: Option<Reference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceName {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Device {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    #[serde(rename = "deviceName", skip_serializing_if = "Vec::is_empty")]
    pub device_name: Vec<DeviceName>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<CodeableConcept>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Reference>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompositionEvent {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub code: Vec<CodeableConcept>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Section {
    pub title: String,
    pub code: CodeableConcept,
    pub text: Narrative,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entry: Vec<Reference>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Composition {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    pub status: String,
    #[serde(rename = "type")]
    pub type_: CodeableConcept,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    pub date: String,
    pub author: Vec<Reference>,
    pub title: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub event: Vec<CompositionEvent>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub section: Vec<Section>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EncounterParticipant {
    pub individual: Reference,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Encounter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    pub class: Coding,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub participant: Vec<EncounterParticipant>,
    pub period: Period,
    #[serde(rename = "reasonCode", skip_serializing_if = "Vec::is_empty")]
    pub reason_code: Vec<CodeableConcept>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Performer {
    pub actor: Reference,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dosage {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MedicationDispense {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<CodeableConcept>,
    #[serde(rename = "medicationCodeableConcept")]
    pub medication: CodeableConcept,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub performer: Vec<Performer>,
    #[serde(rename = "whenHandedOver", skip_serializing_if = "Option::is_none")]
    pub when_handed_over: Option<String>,
    #[serde(rename = "dosageInstruction", skip_serializing_if = "Vec::is_empty")]
    pub dosage_instruction: Vec<Dosage>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ObservationComponent {
    pub code: CodeableConcept,
    #[serde(rename = "valueQuantity")]
    pub value_quantity: Quantity,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Observation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    pub category: Vec<CodeableConcept>,
    pub code: CodeableConcept,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    #[serde(rename = "effectiveDateTime")]
    pub effective_date_time: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub performer: Vec<Reference>,
    #[serde(rename = "valueQuantity", skip_serializing_if = "Option::is_none")]
    pub value_quantity: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Reference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub component: Vec<ObservationComponent>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "resourceType")]
pub enum Resource {
    Composition(Box<Composition>),
    DetectedIssue(Box<DetectedIssue>),
    Device(Box<Device>),
    Encounter(Box<Encounter>),
    MedicationDispense(Box<MedicationDispense>),
    Observation(Box<Observation>),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BundleEntry {
    #[serde(rename = "fullUrl")]
    pub full_url: String,
    pub resource: Resource,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bundle {
    #[serde(rename = "resourceType")]
    pub resource_type: &'static str,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    pub identifier: Identifier,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    pub entry: Vec<BundleEntry>,
}
