//! Code systems and vital-sign definitions used by the output shapes, held as data.
//!
//! VKP code systems: HL7Norway/Velferdsteknologi `VKP-R4/CodeSystem/*` (version 0.9.0).
//! Vital signs: FHIR R4 core vital-signs profiles (LOINC + UCUM).

pub const VKP_ALERT: &str = "http://ehelse.no/fhir/CodeSystem/vkp-alert-code-v090";
pub const VKP_DISPENSE_EVENTS: &str =
    "http://ehelse.no/fhir/CodeSystem/vkp-medicationdispense-events-v090";
pub const VKP_COMPOSITION_CATEGORY: &str =
    "http://ehelse.no/fhir/CodeSystem/vkp-composition-category-v090";
pub const VKP_COMPOSITION_EVENT: &str =
    "http://ehelse.no/fhir/CodeSystem/vkp-composition-event-v090";
pub const VKP_COMPOSITION_SECTION: &str =
    "http://ehelse.no/fhir/CodeSystem/vkp-composition-section-v090";
pub const VKP_ENCOUNTER_REASON: &str = "http://ehelse.no/fhir/CodeSystem/vkp-encounter-reason-v090";
pub const PROFILE_BASE: &str = "http://ehelse.no/fhir/StructureDefinition/";
pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// `vkp-alert-code-v090`. Code `3` is Trygghetsalarm and `7` Sykesignalanlegg, as the
/// published code system says (NHN's sample bundle labels `7` "Trygghetsalarm"; see
/// docs/mappings.md, "Alert code 3 vs 7").
pub const ALERT_CODES: &[(&str, &str)] = &[
    ("1", "Elektronisk medisineringsstøtte"),
    ("1.1", "Ikke utlevert"),
    ("1.2", "Utlevering forhindret av medisinmangel"),
    ("1.3", "Mangler utleveringsbekreftelse"),
    ("1.4", "Melding ikke lest"),
    ("1.5", "Teknisk feil"),
    ("1.6", "Pose ikke lest"),
    ("1.7", "Feil ved rull"),
    ("1.8", "Rull sitter fast"),
    ("1.9", "Full skuff"),
    ("1.10", "Medisin venter"),
    ("1.11", "Mangler tilstrekkelig mengde medisin"),
    ("1.12", "Snart tomt for medisin"),
    ("1.13", "Tomt for medisin"),
    ("1.14", "Mangler tidsplan"),
    ("1.15", "Endringskontroll av medisinplan"),
    ("1.16", "Rull behandlet"),
    ("1.17", "Batteri lavt"),
    ("1.18", "Batteri tomt"),
    ("1.19", "Ikke tilkoblet strøm"),
    ("1.20", "Ingen kontakt"),
    ("1.21", "Dispenser åpen"),
    ("1.22", "Innbrudd"),
    ("1.23", "Dosett feilplassert"),
    ("2", "Lokaliseringsteknologi"),
    ("3", "Trygghetsalarm"),
    ("4", "Digitalt tilsyn"),
    ("4.1", "Fall"),
    ("4.2", "Forlatt sengen"),
    ("4.3", "Satt seg opp i seng"),
    ("4.4", "Reist seg fra stol"),
    ("4.5", "Kommet inn i rom"),
    ("4.6", "Forlatt rom"),
    ("4.7", "Uventet langt opphold"),
    ("4.8", "Aktivitet i rom"),
    ("4.9", "Inaktivitet"),
    ("4.10", "Høyt lydnivå"),
    ("4.11", "Brannalarm"),
    ("4.12", "Fravær"),
    ("4.13", "Knappetrykk"),
    ("4.14", "Snortrekk"),
    ("4.15", "Dør åpnet"),
    ("4.16", "Dør lukket"),
    ("4.17", "Vannalarm"),
    ("4.18", "Bevegelse"),
    ("4.19", "Manglende bevegelse"),
    ("4.20", "Lagt seg i seng"),
    ("4.21", "Forlatt bolig"),
    ("4.22", "Mislykket brukeranrop"),
    ("4.23", "Inaktivitet bad"),
    ("4.24", "Epilepsi"),
    ("4.25", "Hendelsesbasert kameratilsyn"),
    ("4.26", "Planlagt kameratilsyn"),
    ("5", "Digital hjemmeoppfølging"),
    ("5.1", "Oppsummerende varsel"),
    ("5.2", "Handling utført"),
    ("5.2.1", "Måledata rapportert"),
    ("5.2.2", "Skjemabesvarelse"),
    ("5.2.3", "Annen handling utført"),
    ("5.3", "Inaktiv pasient"),
    ("5.3.1", "Manglende skjemabesvarelse"),
    ("5.3.2", "Måling ikke rapportert"),
    ("6", "Elektronisk dørlås"),
    ("7", "Sykesignalanlegg"),
    ("7.1", "Inkontinens"),
];

/// `vkp-medicationdispense-events-v090` (successful dispenses).
pub const DISPENSE_EVENTS: &[(&str, &str)] = &[
    ("1", "Medisin utlevert"),
    ("1.1", "Medisin utlevert uassistert"),
    ("1.2", "Medisin utlevert assistert"),
    ("1.3", "Behovsmedisin utlevert"),
    ("2", "Medisin utlevert reise"),
    ("2.1", "Medisin utlevert reise uassistert"),
    ("2.2", "Medisin utlevert reise assistert"),
    ("3", "Medisin melding til bruker"),
];

pub const COMPOSITION_CATEGORIES: &[(&str, &str)] = &[
    ("1", "Trygghet og mestring"),
    ("2", "Digital hjemmeoppfølging"),
];

pub fn lookup(table: &'static [(&'static str, &'static str)], code: &str) -> Option<&'static str> {
    table.iter().find(|(c, _)| *c == code).map(|(_, d)| *d)
}

/// A vital sign or home measurement the measurement shape can emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BloodPressure,
    HeartRate,
    Spo2,
    Weight,
    Temperature,
    Glucose,
    RespRate,
}

pub struct KindDef {
    pub name: &'static str,
    /// Core R4 vital-signs profile id, if the kind has one.
    pub profile: Option<&'static str>,
    pub category: &'static str,
    pub loinc: &'static str,
    pub display: &'static str,
    /// Extra LOINC codings, e.g. SpO2 by pulse oximetry.
    pub extra: &'static [(&'static str, &'static str)],
    /// Canonical UCUM unit and its human text.
    pub unit: &'static str,
    pub unit_text: &'static str,
    /// Decimals kept after a unit conversion.
    pub decimals: usize,
    /// Plausible range in the canonical unit; outside → 422.
    pub range: (f64, f64),
}

pub const KINDS: &[(Kind, KindDef)] = &[
    (
        Kind::BloodPressure,
        KindDef {
            name: "blood-pressure",
            profile: Some("bp"),
            category: "vital-signs",
            loinc: "85354-9",
            display: "Blood pressure panel with all children optional",
            extra: &[],
            unit: "mm[Hg]",
            unit_text: "mmHg",
            decimals: 0,
            range: (20.0, 300.0),
        },
    ),
    (
        Kind::HeartRate,
        KindDef {
            name: "heart-rate",
            profile: Some("heartrate"),
            category: "vital-signs",
            loinc: "8867-4",
            display: "Heart rate",
            extra: &[],
            unit: "/min",
            unit_text: "beats/minute",
            decimals: 0,
            range: (20.0, 300.0),
        },
    ),
    (
        Kind::Spo2,
        KindDef {
            name: "oxygen-saturation",
            profile: Some("oxygensat"),
            category: "vital-signs",
            loinc: "2708-6",
            display: "Oxygen saturation in Arterial blood",
            extra: &[(
                "59408-5",
                "Oxygen saturation in Arterial blood by Pulse oximetry",
            )],
            unit: "%",
            unit_text: "%",
            decimals: 0,
            range: (30.0, 100.0),
        },
    ),
    (
        Kind::Weight,
        KindDef {
            name: "body-weight",
            profile: Some("bodyweight"),
            category: "vital-signs",
            loinc: "29463-7",
            display: "Body weight",
            extra: &[],
            unit: "kg",
            unit_text: "kg",
            decimals: 1,
            range: (0.3, 500.0),
        },
    ),
    (
        Kind::Temperature,
        KindDef {
            name: "body-temperature",
            profile: Some("bodytemp"),
            category: "vital-signs",
            loinc: "8310-5",
            display: "Body temperature",
            extra: &[],
            unit: "Cel",
            unit_text: "°C",
            decimals: 1,
            range: (25.0, 45.0),
        },
    ),
    (
        Kind::Glucose,
        KindDef {
            name: "blood-glucose",
            profile: None,
            category: "laboratory",
            loinc: "15074-8",
            display: "Glucose [Moles/volume] in Blood",
            extra: &[],
            unit: "mmol/L",
            unit_text: "mmol/L",
            decimals: 1,
            range: (0.5, 60.0),
        },
    ),
    (
        Kind::RespRate,
        KindDef {
            name: "respiratory-rate",
            profile: Some("resprate"),
            category: "vital-signs",
            loinc: "9279-1",
            display: "Respiratory rate",
            extra: &[],
            unit: "/min",
            unit_text: "breaths/minute",
            decimals: 0,
            range: (2.0, 100.0),
        },
    ),
];

pub const BP_SYSTOLIC: (&str, &str) = ("8480-6", "Systolic blood pressure");
pub const BP_DIASTOLIC: (&str, &str) = ("8462-4", "Diastolic blood pressure");

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        KINDS.iter().find(|(_, d)| d.name == s).map(|(k, _)| *k)
    }
    pub fn def(self) -> &'static KindDef {
        &KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .expect("every kind is defined")
            .1
    }
    pub fn names() -> Vec<&'static str> {
        KINDS.iter().map(|(_, d)| d.name).collect()
    }
}

/// UCUM units the engine can convert from, to a kind's canonical unit:
/// `canonical = source * factor + offset` (temperature uses the affine form).
pub const CONVERSIONS: &[(&str, &str, f64, f64)] = &[
    // (from, to, factor, offset)
    ("kPa", "mm[Hg]", 7.500_615_75, 0.0),
    ("[degF]", "Cel", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("K", "Cel", 1.0, -273.15),
    ("[lb_av]", "kg", 0.453_592_37, 0.0),
    ("g", "kg", 0.001, 0.0),
    // Glucose molar mass 180.156 g/mol: 1 mmol/L = 18.0156 mg/dL.
    ("mg/dL", "mmol/L", 1.0 / 18.0156, 0.0),
    ("1", "%", 100.0, 0.0),
    ("/s", "/min", 60.0, 0.0),
];

/// Units a mapping's unit table may produce.
pub fn known_unit(u: &str) -> bool {
    KINDS.iter().any(|(_, d)| d.unit == u) || CONVERSIONS.iter().any(|(f, _, _, _)| *f == u)
}

pub fn conversion(from: &str, to: &str) -> Option<(f64, f64)> {
    CONVERSIONS
        .iter()
        .find(|(f, t, _, _)| *f == from && *t == to)
        .map(|(_, _, a, b)| (*a, *b))
}
