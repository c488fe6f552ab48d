//! Direct hand-off of a lane head from the journal writer to its destination's dispatcher.
//!
//! When an append creates a lane (nothing else queued for that destination and key), its first
//! delivery is ready at once. Going through a claim would cost it a second writer commit before
//! the POST goes out; instead the writer takes a free delivery slot of the destination here,
//! leases the lane in the same transaction as the append, and after the commit passes the leased
//! task and its slot to the dispatcher. No slot free, or no dispatcher running: nothing is
//! handed over and the lane is claimed as usual.
//!
//! The channel to a dispatcher is unbounded, but each message carries one of the destination's
//! slot permits, so it never holds more than the destination's slots. The one exception is the
//! next head of a lane whose outcome was just recorded on PostgreSQL: it comes without a slot and
//! waits for the one its recorded attempt frees, so there are never more such tasks than slots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{DeliveryTask, LaneClass};

/// A leased lane head with the delivery slot it will use; without one, the dispatcher starts it
/// when a slot frees (PostgreSQL hands over a lane's next head when the outcome before it is
/// recorded, and that attempt's slot is the one freed next).
pub struct Handed {
    pub task: DeliveryTask,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// The dispatchers that take hand-offs, by destination. Shared by a backend's writer (which
/// reserves slots and sends) and the dispatchers (which register and receive).
#[derive(Default)]
pub struct Handoff {
    by_dest: RwLock<HashMap<String, Taker>>,
    next_id: AtomicU64,
}

/// A dispatcher's registration: its id (for [`Handoff::unregister`]) and what it receives.
pub struct Registration {
    pub id: u64,
    pub rx: mpsc::UnboundedReceiver<Handed>,
}

struct Taker {
    /// Tells registrations apart, so a stopping dispatcher removes only its own.
    id: u64,
    alarm: Arc<Semaphore>,
    normal: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Handed>,
}

impl Handoff {
    /// Registers `dest`'s dispatcher with its slots (replacing an earlier registration); the
    /// dispatcher must start every task it receives.
    pub fn register(
        &self,
        dest: &str,
        alarm: Arc<Semaphore>,
        normal: Arc<Semaphore>,
    ) -> Registration {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let taker = Taker {
            id,
            alarm,
            normal,
            tx,
        };
        self.write().insert(dest.to_string(), taker);
        Registration { id, rx }
    }

    /// Stops hand-offs to `dest` under registration `id` (its dispatcher is stopping); a newer
    /// registration for `dest` stays.
    pub fn unregister(&self, dest: &str, id: u64) {
        let mut map = self.write();
        if map.get(dest).is_some_and(|t| t.id == id) {
            map.remove(dest);
        }
    }

    /// A free slot of `dest` for a lane of `class`, if its dispatcher is registered and has one.
    pub fn reserve(&self, dest: &str, class: LaneClass) -> Option<OwnedSemaphorePermit> {
        let map = self.by_dest.read().unwrap_or_else(|p| p.into_inner());
        let taker = map.get(dest)?;
        let slots = match class {
            LaneClass::Alarm => &taker.alarm,
            LaneClass::Normal => &taker.normal,
        };
        Arc::clone(slots).try_acquire_owned().ok()
    }

    /// Whether `dest` has a dispatcher taking hand-offs.
    pub fn takes(&self, dest: &str) -> bool {
        let map = self.by_dest.read().unwrap_or_else(|p| p.into_inner());
        map.contains_key(dest)
    }

    /// Passes committed hand-offs to their dispatchers. One whose dispatcher has gone (it is
    /// shutting down) keeps its lease until the journal is opened again, like any lease held
    /// when a process ends; it is reported, never silently dropped.
    pub fn send(&self, handed: Vec<Handed>) {
        if handed.is_empty() {
            return;
        }
        let map = self.by_dest.read().unwrap_or_else(|p| p.into_inner());
        for h in handed {
            let sent = match map.get(&h.task.dest) {
                Some(taker) => taker.tx.send(h).map_err(|e| e.0),
                None => Err(h),
            };
            if let Err(h) = sent {
                tracing::warn!(
                    dest = %h.task.dest,
                    event_id = %h.task.event_id,
                    "dispatcher gone: leased delivery waits for the next start"
                );
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Taker>> {
        self.by_dest.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(dest: &str) -> DeliveryTask {
        DeliveryTask {
            delivery_id: 1,
            event_id: "e1".into(),
            dest: dest.into(),
            class: LaneClass::Alarm,
            lane_key: "k".into(),
            attempts: 0,
            created_at_ms: 0,
            fhir: Arc::from("{}"),
            lease: 7,
            traceparent: None,
        }
    }

    #[test]
    fn reserves_only_free_slots_of_registered_destinations() {
        let h = Handoff::default();
        assert!(h.reserve("a", LaneClass::Alarm).is_none(), "not registered");
        let alarm = Arc::new(Semaphore::new(1));
        let normal = Arc::new(Semaphore::new(0));
        let reg = h.register("a", Arc::clone(&alarm), normal);
        let held = h.reserve("a", LaneClass::Alarm).expect("one alarm slot");
        assert_eq!(alarm.available_permits(), 0);
        assert!(h.reserve("a", LaneClass::Alarm).is_none(), "slot taken");
        assert!(
            h.reserve("a", LaneClass::Normal).is_none(),
            "no normal slots"
        );
        drop(held);
        assert!(h.reserve("a", LaneClass::Alarm).is_some(), "slot back");
        h.unregister("a", reg.id + 1);
        assert!(
            h.reserve("a", LaneClass::Alarm).is_some(),
            "someone else's id"
        );
        h.unregister("a", reg.id);
        assert!(h.reserve("a", LaneClass::Alarm).is_none(), "unregistered");
    }

    #[test]
    fn sends_to_the_registered_dispatcher_with_the_slot() {
        let h = Handoff::default();
        let alarm = Arc::new(Semaphore::new(1));
        let mut rx = h
            .register("a", Arc::clone(&alarm), Arc::new(Semaphore::new(1)))
            .rx;
        let permit = h.reserve("a", LaneClass::Alarm).expect("slot");
        h.send(vec![Handed {
            task: task("a"),
            permit: Some(permit),
        }]);
        let got = rx.try_recv().expect("handed over");
        assert_eq!(got.task.lease, 7);
        assert_eq!(
            alarm.available_permits(),
            0,
            "the slot travels with the task"
        );
        drop(got);
        assert_eq!(alarm.available_permits(), 1);
        // A dispatcher that went away: the slot comes back, nothing is queued anywhere.
        drop(rx);
        let permit = h.reserve("a", LaneClass::Alarm).expect("slot");
        h.send(vec![Handed {
            task: task("a"),
            permit: Some(permit),
        }]);
        assert_eq!(alarm.available_permits(), 1);
    }
}
