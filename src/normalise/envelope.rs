//! The hand-over from normalise to journal: one vendor event, mapped, ready to store.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// What kind of clinical event this is; routes match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Alarm,
    Event,
    Measurement,
    Medication,
    Note,
}

impl Category {
    pub const ALL: [Category; 5] = [
        Category::Alarm,
        Category::Event,
        Category::Measurement,
        Category::Medication,
        Category::Note,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Alarm => "alarm",
            Category::Event => "event",
            Category::Measurement => "measurement",
            Category::Medication => "medication",
            Category::Note => "note",
        }
    }

    /// Alarms get their own lane class so they never queue behind other traffic.
    pub fn lane_class(self) -> LaneClass {
        match self {
            Category::Alarm => LaneClass::Alarm,
            _ => LaneClass::Normal,
        }
    }
}

impl FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            format!("unknown category {s:?}; expected one of alarm, event, measurement, medication, note")
        })
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown priority {s:?}; expected one of critical, high, normal, low")
            })
    }
}

/// Lanes are split by class: alarm lanes are claimed first and have reserved delivery slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaneClass {
    Alarm = 0,
    Normal = 1,
}

impl LaneClass {
    pub fn as_i64(self) -> i64 {
        self as i64
    }
    pub fn from_i64(v: i64) -> Self {
        if v == 0 {
            LaneClass::Alarm
        } else {
            LaneClass::Normal
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LaneClass::Alarm => "alarm",
            LaneClass::Normal => "normal",
        }
    }
}

/// A normalised event: what the journal stores and the router routes.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Gateway event id (UUID v7); also the delivered `Bundle.id`.
    pub id: String,
    pub vendor: String,
    /// The vendor's own id for the event, used to recognise repeats.
    pub vendor_event_id: Option<String>,
    pub category: Category,
    pub priority: Priority,
    /// Municipality number, when known.
    pub tenant: Option<String>,
    /// Ordering key: `patient:<id>` when the patient is known, else `device:<id>`.
    pub key: String,
    /// Mapping file version that produced `fhir`.
    pub mapping_version: String,
    /// The FHIR R4 Bundle delivered to destinations, serialised once.
    pub fhir: String,
}
