//! The guest's lease across hosts.
//!
//! "The lease owner always represents where the guest is unpaused." Each
//! guest has one lease, named by its key, held by at most one owner (a
//! daemon on some host) at a time:
//!
//! - **The owner is where the guest may run.** A daemon runs the guest's vCPUs
//!   only while it holds the lease, and only until its [`Held::deadline`]:
//!   the instant it *sent* its last successful acquire/renew, plus the ttl,
//!   minus a margin. A holder that cannot renew in time stops its guest by
//!   itself (self-fencing), before the store could hand the lease to anyone
//!   else.
//! - **The generation is the fencing token.** It goes up by exactly one each
//!   time the lease changes hands (an acquire of a free lease, or a
//!   [`Lease::transfer`]) and is never reused, not even after a release. The
//!   VMM checks it: it runs vCPUs only on a generation it just proved.
//! - **The handover's commit point is [`Lease::transfer`]**: one
//!   compare-and-swap from (source, g) to (destination, g+1). The destination
//!   then [`Lease::claim`]s it; the source may resume after a failed handover
//!   only if [`Lease::renew`] still finds it at g.
//!
//! Every operation is one transaction in the store; the rules are in one
//! place (`rules`), the backends only make them atomic: [`FileLease`] (OFD
//! locks, one host or a shared directory) and [`EtcdLease`] (etcd v3, hosts
//! that share nothing).

mod config;
mod error;
mod etcd;
mod file;
mod key;
mod rules;

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

pub use config::{default_margin, parse_option, Backend, LeaseConfig, TTL_MS};
pub use error::{LeaseError, Result};
pub use etcd::{EtcdLease, CONNECT_TIMEOUT, RETRIES};
pub use file::{FileLease, LOCK_BYTE};
pub use key::{Key, MAX_KEY_LEN, MAX_OWNER_LEN};
pub use rules::{wall_ms, Record};

/// A future a [`Lease`] returns (boxed, so `dyn Lease` works).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the store says: who holds the lease, at which generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub owner: String,
    pub generation: u64,
}

/// Proof that this daemon holds the lease at `generation`, until `deadline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub owner: String,
    pub generation: u64,
    /// Local monotonic instant after which the guest must not run: the send
    /// time of the request that granted this, plus ttl, minus the margin.
    /// Always before the store's own expiry (on synchronized clocks).
    pub deadline: Instant,
}

/// The transactions of [`Lease`] every backend shares, written once: each
/// is one `self.run(op)` (the backend's atomic read, [`rules::apply`],
/// write, returning the new record and this daemon's deadline).
macro_rules! transactions {
    () => {
        fn acquire<'a>(&'a self, owner: &'a str) -> $crate::BoxFuture<'a, $crate::Result<$crate::Held>> {
            Box::pin(async move {
                $crate::key::check_owner(owner)?;
                let (rec, deadline) = self.run($crate::rules::Op::Acquire { owner: owner.to_owned() }).await?;
                Ok($crate::Held { owner: rec.owner, generation: rec.generation, deadline })
            })
        }

        fn renew<'a>(&'a self, held: &'a $crate::Held) -> $crate::BoxFuture<'a, $crate::Result<$crate::Held>> {
            Box::pin(async move {
                let op = $crate::rules::Op::Renew { owner: held.owner.clone(), generation: held.generation };
                let (rec, deadline) = self.run(op).await?;
                Ok($crate::Held { owner: rec.owner, generation: rec.generation, deadline })
            })
        }

        fn transfer<'a>(
            &'a self,
            held: &'a $crate::Held,
            to: &'a str,
        ) -> $crate::BoxFuture<'a, $crate::Result<$crate::Holder>> {
            Box::pin(async move {
                let op = $crate::rules::Op::Transfer {
                    owner: held.owner.clone(),
                    generation: held.generation,
                    to: to.to_owned(),
                };
                let (rec, _) = self.run(op).await?;
                Ok($crate::Holder { owner: rec.owner, generation: rec.generation })
            })
        }

        fn claim<'a>(&'a self, owner: &'a str, generation: u64) -> $crate::BoxFuture<'a, $crate::Result<$crate::Held>> {
            Box::pin(async move {
                $crate::key::check_owner(owner)?;
                let op = $crate::rules::Op::Claim { owner: owner.to_owned(), generation };
                let (rec, deadline) = self.run(op).await?;
                Ok($crate::Held { owner: rec.owner, generation: rec.generation, deadline })
            })
        }

        fn release(&self, held: $crate::Held) -> $crate::BoxFuture<'_, $crate::Result<()>> {
            Box::pin(async move {
                self.run($crate::rules::Op::Release { owner: held.owner, generation: held.generation }).await?;
                Ok(())
            })
        }
    };
}
pub(crate) use transactions;

/// One guest's lease in some store. Every method is one atomic transaction;
/// a failed one changes nothing.
pub trait Lease: Send + Sync + std::fmt::Debug {
    /// The guest's key.
    fn key(&self) -> &str;

    /// The stored record as it is, expired or not (what a destination
    /// waiting for the handover's decision reads: a renewal shows as a new
    /// `expires_ms`).
    fn inspect(&self) -> BoxFuture<'_, Result<Record>>;

    /// The live holder; `None` if never held, released, or expired.
    fn read(&self) -> BoxFuture<'_, Result<Option<Holder>>> {
        Box::pin(async move { Ok(self.inspect().await?.live_holder(wall_ms()?)) })
    }

    /// Takes the lease if free (at generation + 1; the first ever is 1), or
    /// renews it if `owner` already holds it. Else [`LeaseError::HeldBy`].
    fn acquire<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<Held>>;

    /// Extends `held` if the store still says (owner, generation) and it has
    /// not expired; else [`LeaseError::Lost`] or [`LeaseError::HeldBy`].
    fn renew<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Held>>;

    /// The handover's commit point: moves the lease from `held` (unexpired)
    /// to `to` at generation + 1, with a fresh ttl for `to` to claim it.
    fn transfer<'a>(&'a self, held: &'a Held, to: &'a str) -> BoxFuture<'a, Result<Holder>>;

    /// Takes what was transferred to (owner, generation), renewing it. An older
    /// generation than the store's is [`LeaseError::Stale`].
    fn claim<'a>(&'a self, owner: &'a str, generation: u64) -> BoxFuture<'a, Result<Held>>;

    /// Frees the lease if the store still says (owner, generation); the
    /// generation is kept, so the next acquire gets generation + 1.
    fn release(&self, held: Held) -> BoxFuture<'_, Result<()>>;
}
