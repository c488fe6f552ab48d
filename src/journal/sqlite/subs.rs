//! Subscriptions and pull feed on SQLite: schema (version 4) and reads (see `journal::subs`).

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::journal::subs::{
    AckState, FeedItem, NewSubscription, SubEvent, SubsOut, SubsRead, SubscriptionRow,
};

/// Version 4: subscriptions, their numbered events, pull-feed acknowledgements. Idempotent (runs
/// at every start after the version-3 step, which created `audit.chain_seq`).
pub const SCHEMA_V5: &str = "
    CREATE TABLE IF NOT EXISTS subscriptions (
        id              TEXT PRIMARY KEY,
        topic           TEXT NOT NULL,
        tenant          TEXT,
        patient         TEXT,
        code            TEXT,
        endpoint        TEXT NOT NULL,
        payload         TEXT NOT NULL,
        heartbeat_s     INTEGER NOT NULL,
        timeout_s       INTEGER NOT NULL,
        max_count       INTEGER NOT NULL,
        headers         TEXT NOT NULL,
        resource        TEXT NOT NULL,
        status          TEXT NOT NULL,
        events          INTEGER NOT NULL DEFAULT 0,
        delivered       INTEGER NOT NULL DEFAULT 0,
        handshake_done  INTEGER NOT NULL DEFAULT 0,
        failures        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        last_sent_at    INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        lease_until     INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS subscriptions_topic ON subscriptions(topic);
    CREATE TABLE IF NOT EXISTS subscription_events (
        sub_id   TEXT NOT NULL,
        event_no INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        at       INTEGER NOT NULL,
        PRIMARY KEY (sub_id, event_no)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS feed_acks (
        event_id   TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        reason     TEXT,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS audit_feed ON audit(chain_seq) WHERE kind IN ('stored', 'released');
";

/// The columns `sub_row` decodes, in order.
pub const SUB_COLS: &str = "id, topic, tenant, patient, code, endpoint, payload, heartbeat_s,
    timeout_s, max_count, headers, resource, status, events, delivered, handshake_done, failures,
    next_attempt_at, last_sent_at, last_error, lease_until, created_at";

pub fn sub_row(r: &Row<'_>) -> Result<SubscriptionRow, rusqlite::Error> {
    let headers: String = r.get(10)?;
    Ok(SubscriptionRow {
        spec: NewSubscription {
            id: r.get(0)?,
            topic: r.get(1)?,
            tenant: r.get(2)?,
            patient: r.get(3)?,
            code: r.get(4)?,
            endpoint: r.get(5)?,
            payload: r.get(6)?,
            heartbeat_s: r.get(7)?,
            timeout_s: r.get(8)?,
            max_count: r.get(9)?,
            headers: serde_json::from_str(&headers).unwrap_or_default(),
            resource: r.get(11)?,
            created_at_ms: r.get(21)?,
        },
        status: r.get(12)?,
        events: r.get(13)?,
        delivered: r.get(14)?,
        handshake_done: r.get::<_, i64>(15)? != 0,
        failures: r.get(16)?,
        next_attempt_at_ms: r.get(17)?,
        last_sent_at_ms: r.get(18)?,
        last_error: r.get(19)?,
        lease_until_ms: r.get(20)?,
    })
}

pub fn read(c: &Connection, q: SubsRead) -> Result<SubsOut, rusqlite::Error> {
    match q {
        SubsRead::Get(id) => c
            .prepare_cached(&format!(
                "SELECT {SUB_COLS} FROM subscriptions WHERE id = ?1"
            ))?
            .query_row([id], sub_row)
            .optional()
            .map(|r| SubsOut::Sub(r.map(Box::new))),
        SubsRead::List => {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SUB_COLS} FROM subscriptions ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], sub_row)?;
            rows.collect::<Result<_, _>>().map(SubsOut::Subs)
        }
        SubsRead::Events {
            id,
            from,
            to,
            limit,
        } => {
            let mut stmt = c.prepare_cached(
                "SELECT s.event_no, s.event_id, s.at, e.fhir
                 FROM subscription_events s JOIN events e ON e.id = s.event_id
                 WHERE s.sub_id = ?1 AND s.event_no BETWEEN ?2 AND ?3
                 ORDER BY s.event_no LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![id, from, to, limit as i64], |r| {
                Ok(SubEvent {
                    number: r.get(0)?,
                    event_id: r.get(1)?,
                    at_ms: r.get(2)?,
                    fhir: r.get(3)?,
                })
            })?;
            rows.collect::<Result<_, _>>().map(SubsOut::Events)
        }
        SubsRead::Feed {
            after,
            tenant,
            limit,
        } => {
            let mut stmt = c.prepare_cached(
                "SELECT a.chain_seq, e.id, e.tenant, e.category, e.stored_at, e.fhir,
                        coalesce(f.state, 'registered')
                 FROM audit a JOIN events e ON e.id = a.event_id
                 LEFT JOIN feed_acks f ON f.event_id = e.id
                 WHERE a.kind IN ('stored', 'released') AND a.chain_seq > ?1
                   AND (?2 IS NULL OR e.tenant = ?2)
                   -- A held event enters the feed at its release, once.
                   AND (a.kind = 'released' OR NOT EXISTS (SELECT 1 FROM quarantine q
                                                            WHERE q.event_id = e.id))
                 ORDER BY a.chain_seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![after, tenant, limit as i64], |r| {
                Ok(FeedItem {
                    position: r.get(0)?,
                    event_id: r.get(1)?,
                    tenant: r.get(2)?,
                    category: r.get(3)?,
                    stored_at_ms: r.get(4)?,
                    fhir: r.get(5)?,
                    state: r.get(6)?,
                })
            })?;
            rows.collect::<Result<_, _>>().map(SubsOut::Feed)
        }
        SubsRead::Ack(event_id) => {
            let found = c
                .prepare_cached(
                    "SELECT e.id, coalesce(f.state, 'registered'), f.reason, f.updated_at
                     FROM events e LEFT JOIN feed_acks f ON f.event_id = e.id WHERE e.id = ?1",
                )?
                .query_row([event_id], |r| {
                    Ok(AckState {
                        event_id: r.get(0)?,
                        state: r.get(1)?,
                        reason: r.get(2)?,
                        updated_at_ms: r.get(3)?,
                    })
                })
                .optional()?;
            Ok(SubsOut::Ack(found))
        }
    }
}
