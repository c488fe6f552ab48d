//! Retention (`[audit] retention_days`): a periodic sweep deletes finished events and their
//! audit records once they are older than the retention period, without breaking the audit
//! hash chain.
//!
//! The chain can only lose a *prefix*: a sweep deletes the chained rows up to the last one
//! before the first row that is recent or concerns an unfinished event (pending delivery, held
//! in quarantine), never the head, and stores that last deleted row's position and hash as the
//! anchor (`audit_anchor`). `audit verify` starts from the anchor. Events go once no audit row
//! refers to them and nothing of them is pending. Each sweep that deleted something writes a
//! `retention` audit record naming the new anchor, so the chain itself says where it starts;
//! record the anchor outside the database too if truncation by an attacker is a concern.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{AuditNote, Journal, RetentionReport};
use crate::clock::now_ms;

/// One sweep with the cutoff `now - retention`; audited when it deleted anything.
pub async fn sweep_once(
    journal: &dyn Journal,
    retention: Duration,
) -> Result<RetentionReport, super::JournalError> {
    let cutoff = now_ms() - retention.as_millis() as i64;
    let report = journal.retention_sweep(cutoff).await?;
    if report.audit_rows > 0 || report.events > 0 {
        let anchor = report
            .anchor
            .as_ref()
            .map_or("unchanged".to_string(), |(s, h)| {
                format!("chain position {s}, hash {h}")
            });
        journal
            .audit_note(AuditNote {
                kind: "retention".into(),
                subject: "audit".into(),
                dest: None,
                detail: format!(
                    "deleted {} audit record(s) and {} event(s) older than {}; anchor {anchor}",
                    report.audit_rows,
                    report.events,
                    super::registry_text::instant(cutoff)
                ),
            })
            .await?;
        tracing::info!(
            audit_rows = report.audit_rows,
            events = report.events,
            "retention sweep"
        );
    }
    Ok(report)
}

/// Sweeps every `interval` until `stop` turns true (the first one a minute after start, so a
/// restart loop does not sweep over and over).
pub async fn run(
    journal: Arc<dyn Journal>,
    retention: Duration,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = interval.min(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = sweep_once(journal.as_ref(), retention).await {
            tracing::warn!(error = %e, "retention sweep failed; will retry");
        }
        wait = interval;
    }
}
