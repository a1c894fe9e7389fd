//! The lease's rules, as pure functions from the stored state to the next one.
//!
//! Every backend runs each operation as one transaction: read the state,
//! [`apply`] an [`Op`] at the store's wall-clock time, write the result only
//! if nothing changed in between (the file backend holds an OFD lock; an etcd
//! backend compares the key's `mod_revision`). The rules therefore live here
//! once, whatever the backend.
//!
//! ```text
//!              acquire (g+1)                   transfer (g+1)
//!   free(g) ─────────────────► held(A, g) ───────────────────► held(B, g+1)
//!     ▲  ▲                      │   ▲  │ renew / acquire by A     │ claim by B
//!     │  └──── release ─────────┘   └──┘ (same g)                 ▼
//!     └─────────── expiry (no renew within ttl) ───────────── held(B, g+1) ...
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{LeaseError, Result};
use crate::key::{check_owner, Key};
use crate::Holder;

/// What the store holds for one guest.
///
/// `owner` is empty when the lease is free; `generation` never goes down and
/// is kept across release and expiry, so the next holder gets a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub owner: String,
    pub generation: u64,
    /// Wall-clock (CLOCK_REALTIME) milliseconds since 1970 after which the lease is free.
    pub expires_ms: u64,
}

impl Record {
    /// The state of a lease never written: free at generation 0, so the first holder gets 1.
    pub const NEVER_HELD: Record = Record { owner: String::new(), generation: 0, expires_ms: 0 };

    /// Who holds the lease at `now_ms`, if anyone.
    pub fn live_holder(&self, now_ms: u64) -> Option<Holder> {
        let live = !self.owner.is_empty() && now_ms < self.expires_ms;
        live.then(|| Holder { owner: self.owner.clone(), generation: self.generation })
    }

    /// Why a record read from a backend cannot be a lease, if it cannot.
    pub fn defect(&self) -> Option<&'static str> {
        if !self.owner.is_empty() && self.generation == 0 {
            return Some("an owner at generation 0");
        }
        if !self.owner.is_empty() && check_owner(&self.owner).is_err() {
            return Some("an invalid owner");
        }
        None
    }

    fn held_by(&self, owner: &str, generation: u64, now_ms: u64) -> bool {
        self.live_holder(now_ms).is_some_and(|h| h.owner == owner && h.generation == generation)
    }
}

/// CLOCK_REALTIME in milliseconds since 1970: the time expiry is judged on.
pub fn wall_ms() -> Result<u64> {
    let since = std::time::SystemTime::now().duration_since(std::time::SystemTime::UNIX_EPOCH);
    let since = since.map_err(|_| LeaseError::Backend("the wall clock is before 1970".into()))?;
    Ok(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// One change a caller asks of the store.
#[derive(Debug, Clone)]
pub enum Op {
    Acquire { owner: String },
    Renew { owner: String, generation: u64 },
    Transfer { owner: String, generation: u64, to: String },
    Claim { owner: String, generation: u64 },
    Release { owner: String, generation: u64 },
}

/// The state after `op` on `rec` at wall-clock `now_ms` with a time-to-live of
/// `ttl_ms`, or why `op` is refused (then the store must not change).
pub fn apply(key: &Key, rec: &Record, op: &Op, now_ms: u64, ttl_ms: u64) -> Result<Record> {
    let expires_ms = now_ms.saturating_add(ttl_ms);
    match op {
        Op::Acquire { owner } => {
            check_owner(owner)?;
            match rec.live_holder(now_ms) {
                Some(h) if h.owner == *owner => Ok(Record { expires_ms, ..rec.clone() }),
                Some(h) => Err(held_by(key, h)),
                None => Ok(Record { owner: owner.clone(), generation: next(key, rec)?, expires_ms }),
            }
        }
        Op::Renew { owner, generation } => {
            ours(key, rec, owner, *generation, now_ms)?;
            Ok(Record { expires_ms, ..rec.clone() })
        }
        Op::Transfer { owner, generation, to } => {
            check_owner(to)?;
            ours(key, rec, owner, *generation, now_ms)?;
            Ok(Record { owner: to.clone(), generation: next(key, rec)?, expires_ms })
        }
        Op::Claim { owner, generation } => claim(key, rec, owner, *generation, now_ms, expires_ms),
        Op::Release { owner, generation } => {
            // Expired but still naming us: nobody took it, so freeing it is harmless.
            if rec.owner != *owner || rec.generation != *generation {
                return Err(lost(key, owner, *generation, rec, now_ms));
            }
            Ok(Record { owner: String::new(), ..rec.clone() })
        }
    }
}

fn claim(key: &Key, rec: &Record, owner: &str, generation: u64, now_ms: u64, expires_ms: u64) -> Result<Record> {
    if generation < rec.generation {
        return Err(LeaseError::Stale { key: key.to_string(), presented: generation, current: rec.generation });
    }
    if rec.held_by(owner, generation, now_ms) {
        return Ok(Record { expires_ms, ..rec.clone() });
    }
    match rec.live_holder(now_ms) {
        Some(h) => Err(held_by(key, h)),
        None => Err(LeaseError::NotOffered { key: key.to_string(), owner: owner.to_owned(), generation }),
    }
}

/// Succeeds only if the store says (owner, generation) and has not expired.
fn ours(key: &Key, rec: &Record, owner: &str, generation: u64, now_ms: u64) -> Result<()> {
    if rec.held_by(owner, generation, now_ms) {
        Ok(())
    } else {
        Err(lost(key, owner, generation, rec, now_ms))
    }
}

/// `HeldBy` when someone else holds it now, else `Lost`.
fn lost(key: &Key, owner: &str, generation: u64, rec: &Record, now_ms: u64) -> LeaseError {
    match rec.live_holder(now_ms) {
        Some(h) if !(h.owner == owner && h.generation == generation) => held_by(key, h),
        _ => LeaseError::Lost { key: key.to_string(), owner: owner.to_owned(), generation },
    }
}

fn held_by(key: &Key, h: Holder) -> LeaseError {
    LeaseError::HeldBy { key: key.to_string(), owner: h.owner, generation: h.generation }
}

fn next(key: &Key, rec: &Record) -> Result<u64> {
    rec.generation
        .checked_add(1)
        .ok_or_else(|| LeaseError::Backend(format!("the lease of guest {key} is out of generations")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const TTL: u64 = 1000;

    fn key() -> Key {
        Key::new("vm1").unwrap()
    }

    fn run(rec: &Record, op: Op, now: u64) -> Result<Record> {
        apply(&key(), rec, &op, now, TTL)
    }

    fn acq(o: &str) -> Op {
        Op::Acquire { owner: o.into() }
    }

    #[test]
    fn first_acquire_is_generation_1_and_each_acquire_after_free_adds_one() {
        let r1 = run(&Record::NEVER_HELD, acq("a"), 10).unwrap();
        assert_eq!((r1.owner.as_str(), r1.generation, r1.expires_ms), ("a", 1, 10 + TTL));
        let freed = run(&r1, Op::Release { owner: "a".into(), generation: 1 }, 20).unwrap();
        assert_eq!((freed.owner.as_str(), freed.generation), ("", 1));
        let r2 = run(&freed, acq("b"), 30).unwrap();
        assert_eq!(r2.generation, 2);
        let r3 = run(&r2, acq("a"), 30 + TTL).unwrap(); // expired at exactly expires_ms
        assert_eq!((r3.owner.as_str(), r3.generation), ("a", 3));
    }

    #[test]
    fn acquire_by_the_holder_renews_at_the_same_generation_and_others_get_held_by() {
        let r = run(&Record::NEVER_HELD, acq("a"), 0).unwrap();
        let again = run(&r, acq("a"), 500).unwrap();
        assert_eq!((again.generation, again.expires_ms), (1, 500 + TTL));
        let err = run(&again, acq("b"), 600).unwrap_err();
        assert!(matches!(err, LeaseError::HeldBy { ref owner, generation: 1, .. } if owner == "a"), "{err}");
        assert_eq!(err.to_string(), "the lease of guest vm1 is held by a at generation 1");
    }

    #[test]
    fn transfer_moves_to_the_next_generation_and_only_the_target_claims_it() {
        let r = run(&Record::NEVER_HELD, acq("a"), 0).unwrap();
        let t = run(&r, Op::Transfer { owner: "a".into(), generation: 1, to: "b".into() }, 100).unwrap();
        assert_eq!((t.owner.as_str(), t.generation, t.expires_ms), ("b", 2, 100 + TTL));
        assert!(matches!(
            run(&t, Op::Claim { owner: "b".into(), generation: 1 }, 200),
            Err(LeaseError::Stale { presented: 1, current: 2, .. })
        ));
        assert!(matches!(run(&t, Op::Claim { owner: "c".into(), generation: 2 }, 200), Err(LeaseError::HeldBy { .. })));
        assert!(matches!(run(&t, Op::Claim { owner: "b".into(), generation: 3 }, 200), Err(LeaseError::HeldBy { .. })));
        assert!(matches!(run(&t, Op::Renew { owner: "a".into(), generation: 1 }, 200), Err(LeaseError::HeldBy { .. })));
        let c = run(&t, Op::Claim { owner: "b".into(), generation: 2 }, 200).unwrap();
        assert_eq!((c.owner.as_str(), c.generation, c.expires_ms), ("b", 2, 200 + TTL));
        assert!(matches!(
            run(&t, Op::Claim { owner: "b".into(), generation: 2 }, 100 + TTL),
            Err(LeaseError::NotOffered { .. })
        ));
    }

    #[test]
    fn renew_and_transfer_after_expiry_are_lost() {
        let r = run(&Record::NEVER_HELD, acq("a"), 0).unwrap();
        assert!(matches!(run(&r, Op::Renew { owner: "a".into(), generation: 1 }, TTL), Err(LeaseError::Lost { .. })));
        let t = Op::Transfer { owner: "a".into(), generation: 1, to: "b".into() };
        assert!(matches!(run(&r, t, TTL), Err(LeaseError::Lost { .. })));
    }

    #[test]
    fn release_by_someone_else_is_refused() {
        let r = run(&Record::NEVER_HELD, acq("a"), 0).unwrap();
        assert!(matches!(run(&r, Op::Release { owner: "b".into(), generation: 1 }, 1), Err(LeaseError::HeldBy { .. })));
        assert!(matches!(run(&r, Op::Release { owner: "a".into(), generation: 0 }, 1), Err(LeaseError::HeldBy { .. })));
    }

    #[test]
    fn transfer_to_an_empty_owner_is_refused() {
        let r = run(&Record::NEVER_HELD, acq("a"), 0).unwrap();
        let t = Op::Transfer { owner: "a".into(), generation: 1, to: String::new() };
        assert!(matches!(run(&r, t, 1), Err(LeaseError::InvalidOwner(_))));
    }
}
