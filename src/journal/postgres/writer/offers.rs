//! Direct hand-off on PostgreSQL: a batch's appends that open a lane lease it and pass its head
//! to the destination's dispatcher after the commit, instead of leaving it to the next claim (a
//! second batch, and the claim's wait, before the POST goes out). Same contract as on SQLite
//! (`journal::handoff`): only while the dispatcher has a free slot, which travels with the task.
//!
//! The writer cannot know before the append statement which lanes are empty, so it *offers* one
//! lease per lane the batch's new events touch, each with a reserved slot; the statement leases
//! only offered lanes it finds empty (new, or `head_id = 0`) and returns which ones. The slots of
//! the other offers are released at once.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio_postgres::types::ToSql;

use crate::journal::handoff::{Handed, Handoff};
use crate::journal::{DeliveryTask, LaneClass, NewEvent};

/// Offered lanes as `APPEND_ALL_SQL` takes them (`$26`–`$29`), with what a task needs.
pub struct Offers<'a> {
    dest: Vec<&'a str>,
    class: Vec<i16>,
    key: Vec<&'a str>,
    /// Lease expiry for the offered lanes (ms since the epoch).
    lease_until: i64,
    /// Per offer: the new event whose delivery opens the lane, and its reserved slot.
    taken: Vec<(&'a NewEvent, LaneClass, OwnedSemaphorePermit)>,
}

impl<'a> Offers<'a> {
    /// One offer per lane of `evs` (the batch's new events, in order; the first event routed to
    /// a lane holds its head) for which `handoff` has a free slot.
    pub fn of(evs: &[&'a NewEvent], handoff: Option<&Handoff>, lease_until: i64) -> Self {
        let mut o = Offers {
            dest: Vec::new(),
            class: Vec::new(),
            key: Vec::new(),
            lease_until,
            taken: Vec::new(),
        };
        let Some(handoff) = handoff else { return o };
        let mut seen = HashSet::new();
        for ev in evs {
            let class = ev.envelope.category.lane_class();
            for dest in &ev.destinations {
                if !seen.insert((dest.as_str(), class, ev.envelope.key.as_str())) {
                    continue;
                }
                if let Some(permit) = handoff.reserve(dest, class) {
                    o.dest.push(dest);
                    o.class.push(class.as_i64() as i16);
                    o.key.push(&ev.envelope.key);
                    o.taken.push((ev, class, permit));
                }
            }
        }
        o
    }

    /// `$26`–`$29` of `APPEND_ALL_SQL`.
    pub fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.dest, &self.class, &self.key, &self.lease_until]
    }

    /// The tasks of the offers the statement accepted, given as parallel columns: 1-based offer
    /// position, head delivery id, lease token. Every other offer's slot is released.
    pub fn accept(self, n: &[i64], head: &[i64], lease: &[i64], now: i64) -> Vec<Handed> {
        let mut taken: Vec<Option<_>> = self.taken.into_iter().map(Some).collect();
        let mut handed = Vec::with_capacity(n.len());
        for ((&n, &head), &lease) in n.iter().zip(head).zip(lease) {
            let Some(Some((ev, class, permit))) = taken.get_mut(n as usize - 1).map(Option::take)
            else {
                continue;
            };
            let env = &ev.envelope;
            let dest = self.dest[n as usize - 1];
            handed.push(Handed {
                task: DeliveryTask {
                    delivery_id: head,
                    event_id: env.id.clone(),
                    dest: dest.to_string(),
                    class,
                    lane_key: env.key.clone(),
                    attempts: 0,
                    created_at_ms: now,
                    fhir: Arc::from(env.fhir.as_str()),
                    lease,
                    traceparent: ev.traceparent.clone(),
                },
                permit: Some(permit),
            });
        }
        handed
    }
}
