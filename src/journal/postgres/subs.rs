//! Subscriptions and pull feed on PostgreSQL: reads (see `journal::subs`).

use tokio_postgres::GenericClient;
use tokio_postgres::Row;

use crate::journal::JournalError;
use crate::journal::subs::{
    AckState, FeedItem, NewSubscription, SubEvent, SubsOut, SubsRead, SubscriptionRow,
};

/// The columns `sub_row` decodes, in order.
pub const SUB_COLS: &str = "id, topic, tenant, patient, code, endpoint, payload, heartbeat_s,
    timeout_s, max_count, headers, resource, status, events, delivered, handshake_done, failures,
    next_attempt_at, last_sent_at, last_error, lease_until, created_at";

pub fn sub_row(r: &Row) -> SubscriptionRow {
    let headers: String = r.get(10);
    SubscriptionRow {
        spec: NewSubscription {
            id: r.get(0),
            topic: r.get(1),
            tenant: r.get(2),
            patient: r.get(3),
            code: r.get(4),
            endpoint: r.get(5),
            payload: r.get(6),
            heartbeat_s: r.get::<_, i64>(7) as u32,
            timeout_s: r.get::<_, i64>(8) as u32,
            max_count: r.get::<_, i64>(9) as u32,
            headers: serde_json::from_str(&headers).unwrap_or_default(),
            resource: r.get(11),
            created_at_ms: r.get(21),
        },
        status: r.get(12),
        events: r.get(13),
        delivered: r.get(14),
        handshake_done: r.get(15),
        failures: r.get(16),
        next_attempt_at_ms: r.get(17),
        last_sent_at_ms: r.get(18),
        last_error: r.get(19),
        lease_until_ms: r.get(20),
    }
}

/// When a subscription is due for a notifier attempt (`$1`: now, ms): not leased, its backoff
/// over, and a handshake, events or a heartbeat to send. The writer's claim leases these.
pub const DUE: &str = "lease_until < $1 AND next_attempt_at <= $1
    AND (NOT handshake_done OR events > delivered
         OR (heartbeat_s > 0 AND last_sent_at + heartbeat_s * 1000 <= $1))";

/// Whether any subscription is [`DUE`] at `now_ms`, read without the writer.
pub async fn any_due(c: &impl GenericClient, now_ms: i64) -> Result<bool, JournalError> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE {DUE})");
    Ok(c.query_one(&sql, &[&now_ms]).await?.get(0))
}

pub async fn read(c: &impl GenericClient, q: SubsRead) -> Result<SubsOut, JournalError> {
    Ok(match q {
        SubsRead::Get(id) => SubsOut::Sub(
            c.query_opt(
                &format!("SELECT {SUB_COLS} FROM subscriptions WHERE id = $1"),
                &[&id],
            )
            .await?
            .map(|r| Box::new(sub_row(&r))),
        ),
        SubsRead::List => SubsOut::Subs(
            c.query(
                &format!("SELECT {SUB_COLS} FROM subscriptions ORDER BY created_at, id"),
                &[],
            )
            .await?
            .iter()
            .map(sub_row)
            .collect(),
        ),
        SubsRead::Events {
            id,
            from,
            to,
            limit,
        } => SubsOut::Events(
            c.query(
                "SELECT s.event_no, s.event_id, s.at, e.fhir
                 FROM subscription_events s JOIN events e ON e.id = s.event_id
                 WHERE s.sub_id = $1 AND s.event_no BETWEEN $2 AND $3
                 ORDER BY s.event_no LIMIT $4",
                &[&id, &from, &to, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| SubEvent {
                number: r.get(0),
                event_id: r.get(1),
                at_ms: r.get(2),
                fhir: r.get(3),
            })
            .collect(),
        ),
        SubsRead::Feed {
            after,
            tenant,
            limit,
        } => SubsOut::Feed(
            c.query(
                "SELECT a.chain_seq, e.id, e.tenant, e.category, e.stored_at, e.fhir,
                        coalesce(f.state, 'registered')
                 FROM audit a JOIN events e ON e.id = a.event_id
                 LEFT JOIN feed_acks f ON f.event_id = e.id
                 WHERE a.kind IN ('stored', 'released') AND a.chain_seq > $1
                   AND ($2::TEXT IS NULL OR e.tenant = $2)
                   -- A held event enters the feed at its release, once.
                   AND (a.kind = 'released' OR NOT EXISTS (SELECT 1 FROM quarantine q
                                                            WHERE q.event_id = e.id))
                 ORDER BY a.chain_seq LIMIT $3",
                &[&after, &tenant, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| FeedItem {
                position: r.get(0),
                event_id: r.get(1),
                tenant: r.get(2),
                category: r.get(3),
                stored_at_ms: r.get(4),
                fhir: r.get(5),
                state: r.get(6),
            })
            .collect(),
        ),
        SubsRead::Ack(event_id) => SubsOut::Ack(
            c.query_opt(
                "SELECT e.id, coalesce(f.state, 'registered'), f.reason, f.updated_at
                 FROM events e LEFT JOIN feed_acks f ON f.event_id = e.id WHERE e.id = $1",
                &[&event_id],
            )
            .await?
            .map(|r| AckState {
                event_id: r.get(0),
                state: r.get(1),
                reason: r.get(2),
                updated_at_ms: r.get(3),
            }),
        ),
    })
}
