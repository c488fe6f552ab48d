//! FHIR subscriptions (R5 Backport IG on R4) and the pull feed, as stored in the journal.
//!
//! Numbering: when the writer stores an event (`append`), in the same transaction it gives the
//! event the next event number of every subscription whose filters match (`subscription_events`,
//! `subscriptions.events` is the per-subscription counter). The number is therefore durable with
//! the event, and assigned in commit order per subscription: SQLite has one writer; on PostgreSQL
//! the counter row is locked by the `UPDATE` until commit, so a later commit gets a higher number.
//! Delivery (`crate::fhir::notify`) sends numbers in order and records the highest acknowledged
//! one (`delivered`), so a restart resumes exactly where the subscriber stopped acknowledging.
//!
//! An event held in quarantine is numbered when it is released (with its new mapping), not when
//! it is held.
//!
//! Pull feed: events in commit order, the cursor being the audit-chain position of the event's
//! `stored` record, or of its `released` record for an event that was held in quarantine
//! (positions are handed out in commit order on both backends).

use serde::Serialize;

use crate::normalise::Envelope;

/// A validated subscription, ready to store (`crate::fhir::subscription` parses the resource).
#[derive(Debug, Clone, Serialize)]
pub struct NewSubscription {
    pub id: String,
    /// Event category the topic stands for (alarm, event, measurement, medication, note).
    pub topic: String,
    /// Filters; `None` matches any. `tenant` is also the hook for restricting a subscription to
    /// the caller's tenants (the request's tenant scope is checked against it at creation).
    pub tenant: Option<String>,
    pub patient: Option<String>,
    pub code: Option<String>,
    pub endpoint: String,
    /// `empty`, `id-only` or `full-resource`.
    pub payload: String,
    pub heartbeat_s: u32,
    pub timeout_s: u32,
    pub max_count: u32,
    /// `Name: value` headers to send with every notification (JSON array of strings).
    pub headers: Vec<String>,
    /// The resource as accepted (JSON), returned on read with the live status.
    pub resource: String,
    pub created_at_ms: i64,
}

/// A stored subscription: what was accepted, and its delivery state.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionRow {
    pub spec: NewSubscription,
    /// requested | active | error
    pub status: String,
    /// Events numbered so far (the last event number).
    pub events: i64,
    /// Highest event number the endpoint acknowledged (2xx).
    pub delivered: i64,
    pub handshake_done: bool,
    /// Consecutive failed attempts.
    pub failures: i64,
    pub next_attempt_at_ms: i64,
    pub last_sent_at_ms: i64,
    pub last_error: Option<String>,
    /// Lease (fencing token) held by the notifier working on it; 0 = free.
    pub lease_until_ms: i64,
}

impl SubscriptionRow {
    /// A just-created subscription: `requested`, nothing numbered or sent yet.
    pub fn new(spec: NewSubscription) -> Self {
        Self {
            spec,
            status: "requested".into(),
            events: 0,
            delivered: 0,
            handshake_done: false,
            failures: 0,
            next_attempt_at_ms: 0,
            last_sent_at_ms: 0,
            last_error: None,
            lease_until_ms: 0,
        }
    }
}

/// One numbered event of a subscription.
#[derive(Debug, Clone, Serialize)]
pub struct SubEvent {
    pub number: i64,
    pub event_id: String,
    pub at_ms: i64,
    /// The event's FHIR Bundle (JSON).
    pub fhir: String,
}

/// What one notification attempt ended in; the notifier computes the new state.
#[derive(Debug, Clone)]
pub struct SubOutcome {
    pub id: String,
    /// The lease the attempt held: a stale outcome (lease taken over) changes nothing.
    pub lease_until_ms: i64,
    pub status: String,
    pub handshake_done: bool,
    pub delivered: i64,
    pub failures: i64,
    pub next_attempt_at_ms: i64,
    pub last_sent_at_ms: i64,
    pub last_error: Option<String>,
    /// An audit record for a status change (`subscription-status`), if any.
    pub audit: Option<String>,
}

/// One event of the pull feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedItem {
    /// Cursor position (audit-chain position of the `stored` record).
    pub position: i64,
    pub event_id: String,
    pub tenant: Option<String>,
    pub category: String,
    pub stored_at_ms: i64,
    pub fhir: String,
    /// registered | read | journaled | failed
    pub state: String,
}

/// Journaling status of an event taken from the pull feed (JFT: registered → read →
/// journaled | failed).
#[derive(Debug, Clone, Serialize)]
pub struct AckState {
    pub event_id: String,
    pub state: String,
    pub reason: Option<String>,
    pub updated_at_ms: Option<i64>,
}

pub enum SubsOp {
    Create(Box<NewSubscription>),
    /// `NotFound` when there is no such subscription.
    Delete(String),
    /// Leases up to `limit` subscriptions with work due (handshake, events, heartbeat), each
    /// for `lease_ms` plus its own timeout.
    Claim {
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    },
    Outcome(Box<SubOutcome>),
    /// Marks feed events `read` (those still `registered`).
    FeedRead {
        event_ids: Vec<String>,
        at_ms: i64,
    },
    /// Sets `journaled` or `failed`; `NotFound` for an unknown event, `Conflict` when the
    /// event is already in a final state.
    Ack {
        event_id: String,
        state: String,
        reason: Option<String>,
        at_ms: i64,
    },
}

pub enum SubsRead {
    Get(String),
    /// Every subscription, oldest first.
    List,
    /// Events numbered `from..=to` of a subscription, at most `limit`.
    Events {
        id: String,
        from: i64,
        to: i64,
        limit: usize,
    },
    Feed {
        after: i64,
        tenant: Option<String>,
        limit: usize,
    },
    Ack(String),
}

pub enum SubsOut {
    Unit,
    Sub(Option<Box<SubscriptionRow>>),
    Subs(Vec<SubscriptionRow>),
    Events(Vec<SubEvent>),
    Feed(Vec<FeedItem>),
    Ack(Option<AckState>),
}

/// What `append` matches subscriptions on: the event's topic, tenant, patient and codes.
pub struct MatchFacts {
    pub topic: &'static str,
    pub tenant: Option<String>,
    pub patient: Option<String>,
    /// Every `code` and `system|code` of the bundle's resources' `code` elements.
    pub codes: Vec<String>,
}

impl MatchFacts {
    pub fn of(env: &Envelope) -> Self {
        Self {
            topic: env.category.as_str(),
            tenant: env.tenant.clone(),
            patient: env.key.strip_prefix("patient:").map(str::to_string),
            codes: event_codes(&env.fhir),
        }
    }
}

/// The codes of a FHIR Bundle's resources (`resource.code.coding`), in both `code` and
/// `system|code` form, for the `code` filter.
pub fn event_codes(fhir: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(fhir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let entries = v["entry"].as_array().cloned().unwrap_or_default();
    let resources = entries
        .iter()
        .map(|e| &e["resource"])
        .chain(std::iter::once(&v));
    for r in resources {
        for coding in r["code"]["coding"].as_array().into_iter().flatten() {
            if let Some(code) = coding["code"].as_str() {
                out.push(code.to_string());
                if let Some(system) = coding["system"].as_str() {
                    out.push(format!("{system}|{code}"));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Statuses in which a subscription numbers events (all but deleted ones, which are removed).
pub const LIVE_STATUSES: [&str; 3] = ["requested", "active", "error"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_come_from_every_resource() {
        let fhir = r#"{"resourceType":"Bundle","entry":[
            {"resource":{"resourceType":"DetectedIssue","code":{"coding":[{"system":"urn:s","code":"3"}]}}},
            {"resource":{"resourceType":"Observation","code":{"coding":[{"code":"8867-4"}]}}}]}"#;
        assert_eq!(event_codes(fhir), vec!["3", "8867-4", "urn:s|3"]);
        assert!(event_codes("not json").is_empty());
    }
}
