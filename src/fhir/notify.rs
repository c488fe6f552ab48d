//! Notification bundles (Backport IG, R4: `history` Bundle whose first entry is the
//! SubscriptionStatus as a `Parameters` resource) and the notifier that delivers them.
//!
//! The notifier leases subscriptions with work due from the journal (`SubsOp::Claim`): a
//! handshake not yet answered, numbered events beyond the acknowledged one, or a heartbeat due.
//! One attempt per subscription at a time, events sent in number order (up to `maxCount` per
//! notification), so each subscriber sees every key's events in journal order. The outcome is
//! written back before the next attempt; a restart resumes from `delivered`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use super::topics::TOPIC_BASE;
use crate::config::RetryConfig;
use crate::journal::subs::{SubEvent, SubOutcome, SubsOp, SubsOut, SubsRead, SubscriptionRow};
use crate::journal::{Journal, JournalError};
use crate::telemetry::{Telemetry, kv};

pub const STATUS_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";
/// Consecutive failed notifications after which an active subscription turns `error`.
pub const ERROR_AFTER_FAILURES: i64 = 3;
/// How often the notifier looks for work when nothing wakes it.
const POLL: Duration = Duration::from_millis(200);
/// Margin of a lease over the subscription's own timeout (the journal adds the timeout): an
/// attempt outlives neither, and a crashed node's subscriptions are taken over soon after.
const LEASE_MS: i64 = 5_000;
const CLAIM_LIMIT: usize = 32;
/// Least time between claims woken by stored events while the last claim found no work.
const IDLE_GAP: Duration = Duration::from_millis(50);

/// Woken when an event is stored or a subscription created, so notifications go out at once
/// (the poll is the fallback, e.g. for other nodes' events). Wake-ups coalesce into one claim.
pub static WAKE: Notify = Notify::const_new();

/// Retry schedule of notifications: the delivery backoff with a 30 s cap, never giving up
/// (the subscription stays in `error` and keeps being retried; `$events` covers the gap).
fn retry_policy() -> RetryConfig {
    RetryConfig {
        base_delay_ms: 500,
        max_delay_ms: 30_000,
        ..RetryConfig::default()
    }
}

pub fn instant(ms: i64) -> String {
    crate::normalise::datetime::render(ms, 0, true)
}

/// The SubscriptionStatus (R4: `Parameters`, profile backport-subscription-status-r4).
pub fn status(
    row: &SubscriptionRow,
    kind: &str,
    status: &str,
    events: &[SubEvent],
    content: &str,
) -> Value {
    let mut p = vec![
        json!({ "name": "subscription", "valueReference": { "reference": format!("Subscription/{}", row.spec.id) } }),
        json!({ "name": "topic", "valueCanonical": format!("{TOPIC_BASE}{}", row.spec.topic) }),
        json!({ "name": "status", "valueCode": status }),
        json!({ "name": "type", "valueCode": kind }),
        json!({ "name": "events-since-subscription-start", "valueString": row.events.to_string() }),
    ];
    for e in events {
        let mut part = vec![
            json!({ "name": "event-number", "valueString": e.number.to_string() }),
            json!({ "name": "timestamp", "valueInstant": instant(e.at_ms) }),
        ];
        if content != "empty" {
            part.push(json!({ "name": "focus", "valueReference": { "reference": format!("Bundle/{}", e.event_id) } }));
        }
        p.push(json!({ "name": "notification-event", "part": part }));
    }
    if let (Some(err), "error") = (&row.last_error, status) {
        p.push(json!({ "name": "error", "valueCodeableConcept": { "text": err } }));
    }
    json!({
        "resourceType": "Parameters",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "profile": [STATUS_PROFILE] },
        "parameter": p
    })
}

/// A notification: `history` Bundle, status first, then per event the focus (`id-only`: entry
/// without resource; `full-resource`: with the event's Bundle; `empty`: nothing).
pub fn bundle(
    row: &SubscriptionRow,
    kind: &str,
    st: &str,
    events: &[SubEvent],
    content: &str,
) -> Value {
    let status_id = uuid::Uuid::new_v4();
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{status_id}"),
        "resource": status(row, kind, st, events, content),
        "request": { "method": "GET", "url": format!("Subscription/{}/$status", row.spec.id) },
        "response": { "status": "200" }
    })];
    if content != "empty" {
        for e in events {
            let mut entry = json!({
                "fullUrl": format!("urn:uuid:{}", e.event_id),
                "request": { "method": "POST", "url": "Bundle" },
                "response": { "status": "201" }
            });
            if content == "full-resource" {
                entry["resource"] = serde_json::from_str(&e.fhir).unwrap_or(Value::Null);
            }
            entries.push(entry);
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": instant(crate::clock::now_ms()),
        "entry": entries
    })
}

/// Runs until `stop`: claims due subscriptions and notifies each (one attempt at a time each).
pub async fn run(
    journal: Arc<dyn Journal>,
    telemetry: Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder().build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "subscription notifier: HTTP client");
            return;
        }
    };
    // Every series exists from the start, so rates and alerts work before the first failure.
    for kind in ["handshake", "heartbeat", "event-notification"] {
        for outcome in ["accepted", "failed"] {
            telemetry
                .subscription_notifications
                .add(0, &[kv("type", kind), kv("outcome", outcome)]);
        }
    }
    let mut attempts = JoinSet::new();
    loop {
        let claimed = journal
            .subs(SubsOp::Claim {
                now_ms: crate::clock::now_ms(),
                lease_ms: LEASE_MS,
                limit: CLAIM_LIMIT,
            })
            .await;
        let claimed_at = tokio::time::Instant::now();
        let mut idle = true;
        match claimed {
            Ok(SubsOut::Subs(rows)) => {
                idle = rows.is_empty();
                for row in rows {
                    attempts.spawn(attempt(
                        Arc::clone(&journal),
                        Arc::clone(&telemetry),
                        client.clone(),
                        row,
                    ));
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "subscription notifier: claim failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = WAKE.notified() => {
                // Every stored event wakes the notifier, and each claim is a journal write: while
                // there is nothing to notify, wake-ups coalesce into at most one claim per
                // IDLE_GAP instead of one per batch of events.
                if idle {
                    tokio::time::sleep_until(claimed_at + IDLE_GAP).await;
                }
            }
            Some(_) = attempts.join_next() => {}
            _ = stop.changed() => break,
        }
    }
    // Unfinished attempts are dropped: their leases expire (SQLite clears them at start) and the
    // same events are sent again — at least once.
    attempts.shutdown().await;
}

async fn attempt(
    journal: Arc<dyn Journal>,
    telemetry: Arc<Telemetry>,
    client: reqwest::Client,
    row: SubscriptionRow,
) {
    if let Err(e) = try_attempt(&*journal, &telemetry, &client, &row).await {
        tracing::warn!(subscription = %row.spec.id, error = %e, "subscription notification not recorded");
    }
}

async fn try_attempt(
    journal: &dyn Journal,
    telemetry: &Telemetry,
    client: &reqwest::Client,
    row: &SubscriptionRow,
) -> Result<(), JournalError> {
    let now = crate::clock::now_ms();
    let (kind, events) = if !row.handshake_done {
        ("handshake", Vec::new())
    } else if row.events > row.delivered {
        let to = row.delivered + i64::from(row.spec.max_count.max(1));
        let out = journal
            .subs_read(SubsRead::Events {
                id: row.spec.id.clone(),
                from: row.delivered + 1,
                to,
                limit: row.spec.max_count.max(1) as usize,
            })
            .await?;
        let SubsOut::Events(evs) = out else {
            return Err(JournalError::Unavailable("unexpected read result".into()));
        };
        ("event-notification", evs)
    } else {
        ("heartbeat", Vec::new())
    };
    let st = if kind == "handshake" {
        "requested"
    } else {
        row.status.as_str()
    };
    let body = bundle(row, kind, st, &events, &row.spec.payload);
    let mut req = client
        .post(&row.spec.endpoint)
        .timeout(Duration::from_secs(u64::from(row.spec.timeout_s.max(1))))
        .header("content-type", "application/fhir+json")
        .body(body.to_string());
    for h in &row.spec.headers {
        if let Some((n, v)) = h.split_once(':') {
            req = req.header(n.trim(), v.trim());
        }
    }
    let result = req.send().await;
    let (ok, error, retry_after) = match &result {
        Ok(r) if r.status().is_success() => (true, None, None),
        Ok(r) => (
            false,
            Some(format!("{kind}: HTTP {}", r.status().as_u16())),
            r.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        ),
        Err(e) => (false, Some(format!("{kind}: {}", transport_error(e))), None),
    };
    let done = crate::clock::now_ms();
    telemetry.subscription_notifications.add(
        1,
        &[
            kv("type", kind),
            kv("outcome", if ok { "accepted" } else { "failed" }),
        ],
    );
    let outcome = if ok {
        let delivered = events.last().map_or(row.delivered, |e| e.number);
        SubOutcome {
            id: row.spec.id.clone(),
            lease_until_ms: row.lease_until_ms,
            status: "active".into(),
            handshake_done: true,
            delivered,
            failures: 0,
            next_attempt_at_ms: 0,
            last_sent_at_ms: done,
            last_error: None,
            audit: (row.status != "active")
                .then(|| format!("{} -> active ({kind} accepted)", row.status)),
        }
    } else {
        let failures = row.failures + 1;
        let wait = crate::deliver::backoff::delay(
            &retry_policy(),
            failures as u32,
            retry_after,
            rand::random::<f64>(),
        );
        // A failed handshake is an error at once (IG); notifications after a few in a row.
        let status = if !row.handshake_done || failures >= ERROR_AFTER_FAILURES {
            "error"
        } else {
            row.status.as_str()
        };
        SubOutcome {
            id: row.spec.id.clone(),
            lease_until_ms: row.lease_until_ms,
            status: status.into(),
            handshake_done: row.handshake_done,
            delivered: row.delivered,
            failures,
            next_attempt_at_ms: done + wait.as_millis() as i64,
            last_sent_at_ms: row.last_sent_at_ms,
            last_error: error.clone(),
            audit: (row.status != status).then(|| {
                format!(
                    "{} -> {status} ({})",
                    row.status,
                    error.as_deref().unwrap_or("")
                )
            }),
        }
    };
    tracing::debug!(subscription = %row.spec.id, kind, ok, events = events.len(), elapsed_ms = done - now, "notification");
    journal
        .subs(SubsOp::Outcome(Box::new(outcome)))
        .await
        .map(|_| ())
}

/// The innermost cause (connection refused, timed out) without the URL.
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut text = String::from("request failed");
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text = inner.to_string();
        source = inner.source();
    }
    text
}
