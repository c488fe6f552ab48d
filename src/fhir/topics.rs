//! Subscription topics (one per event category) and the CapabilityStatement.
//!
//! R4 has no SubscriptionTopic resource. Following the Backport IG for R4, the topics are
//! advertised by canonical URL in the CapabilityStatement
//! (`capabilitystatement-subscriptiontopic-canonical` on the Subscription resource), and each
//! topic is also served as a `Basic` resource (code `SubscriptionTopic`) carrying the R5
//! SubscriptionTopic elements as cross-version extensions, at `/fhir/SubscriptionTopic/{name}`
//! (and as a searchset at `/fhir/SubscriptionTopic`).

use serde_json::{Value, json};

use super::subscription::{FILTERS, PROFILE};
use crate::normalise::Category;

/// Canonical base of the topics; a topic is `{TOPIC_BASE}{category}`.
pub const TOPIC_BASE: &str = "https://knutepunkt.no/fhir/SubscriptionTopic/";
const XVER: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport";

pub fn topic_url(c: Category) -> String {
    format!("{TOPIC_BASE}{c}")
}

fn filter_description(key: &str) -> &'static str {
    match key {
        "municipality" => "Municipality number (tenant) of the event, 4 digits, e.g. 0301",
        "patient" => "Patient the event concerns: Patient/<id>, <system>|<id> or <id>",
        _ => "Code of a resource in the event (code or system|code), e.g. a VKP alert code",
    }
}

/// The topic of one category as an R4 `Basic` resource.
pub fn topic(c: Category) -> Value {
    let mut ext = vec![
        json!({ "url": format!("{XVER}.url"), "valueUri": topic_url(c) }),
        json!({ "url": format!("{XVER}.title"), "valueString": format!("knutepunkt {c} events") }),
        json!({ "url": format!("{XVER}.status"), "valueCode": "active" }),
        json!({ "url": format!("{XVER}.description"), "valueMarkdown": format!(
            "Every {c} event knutepunkt journals (after mapping to FHIR R4), as its FHIR Bundle.") }),
    ];
    for key in FILTERS {
        ext.push(json!({
            "url": format!("{XVER}.canFilterBy"),
            "extension": [
                { "url": "description", "valueMarkdown": filter_description(key) },
                { "url": "resource", "valueUri": "Bundle" },
                { "url": "filterParameter", "valueString": key }
            ]
        }));
    }
    json!({
        "resourceType": "Basic",
        "id": c.as_str(),
        "extension": ext,
        "code": { "coding": [{ "system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic" }] }
    })
}

pub fn topics_bundle() -> Value {
    let entries: Vec<Value> = Category::ALL
        .into_iter()
        .map(|c| {
            json!({
                "fullUrl": topic_url(c),
                "resource": topic(c),
                "search": { "mode": "match" }
            })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "entry": entries
    })
}

pub fn capability_statement(now: &str) -> Value {
    let topics: Vec<Value> = Category::ALL
        .into_iter()
        .map(|c| {
            json!({
                "url": format!("{BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"),
                "valueCanonical": topic_url(c)
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "publisher": "knutepunkt",
        "kind": "instance",
        "instantiates": [format!("{BACKPORT}/CapabilityStatement/backport-subscription-server-r4")],
        "software": { "name": "knutepunkt", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": "knutepunkt welfare-technology gateway: FHIR R4 subscriptions (R5 Backport IG) and pull feed over the journal"
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Vendors post events to POST /v1/vendors/{vendor}/events (not FHIR REST; see docs/api.md). Each accepted event is journaled as a FHIR R4 Bundle, numbered for every matching Subscription and offered on the pull feed (GET /fhir/Bundle).",
            "resource": [
                {
                    "type": "Subscription",
                    "extension": topics,
                    "supportedProfile": [PROFILE],
                    "documentation": "Topic-based subscriptions (criteria = topic canonical; filters municipality, patient, code via backport-filter-criteria). Channel rest-hook only; payload content empty, id-only or full-resource.",
                    "interaction": [
                        { "code": "create" }, { "code": "read" }, { "code": "delete" }, { "code": "search-type" }
                    ],
                    "operation": [
                        { "name": "status", "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-status") },
                        { "name": "events", "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-events") }
                    ]
                },
                {
                    "type": "Basic",
                    "documentation": "Subscription topics as Basic resources (code SubscriptionTopic) at /fhir/SubscriptionTopic and /fhir/SubscriptionTopic/{alarm|event|measurement|medication|note}.",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }]
                },
                {
                    "type": "Bundle",
                    "documentation": "Pull feed: GET /fhir/Bundle?_cursor=&_count=&municipality= returns journaled events in commit order with an opaque cursor (link next). Journaling status per event: GET /fhir/Bundle/{id}/$status; acknowledge with POST /fhir/Bundle/{id}/$ack (status journaled | failed).",
                    "interaction": [{ "code": "search-type" }],
                    "searchParam": [
                        { "name": "_cursor", "type": "string", "documentation": "Opaque position from the previous page's next link" },
                        { "name": "_count", "type": "number" },
                        { "name": "municipality", "type": "token", "documentation": "Municipality number (tenant)" }
                    ]
                }
            ]
        }]
    })
}
