//! Per-node in-flight request counting and quiescing (QEMU's drain).
//!
//! A request *enters* the node a user submitted it to, waiting there while
//! the node is quiesced, and is counted on every node it passes on the way
//! down until it completes. Quiescing a node also quiesces every ancestor
//! (the graph does that), so a request can only be held at its entry node,
//! never halfway down: draining a set of nodes can therefore not deadlock,
//! and "in flight == 0 on every node of the set" is an exact drain.
//!
//! ```text
//!   enter ──(quiesce > 0?)──yes──> wait for `resumed` ──┐
//!     │ no                                              │
//!     └─> count += 1 ──(quiesce became > 0?)──yes──> count -= 1, retry
//!               │ no
//!               └─> request runs ──> count -= 1 ──(0 and quiesced?)──> notify `drained`
//! ```
//!
//! All four atomics use SeqCst: `exit` reads `quiesce` after writing
//! `count`, `drain` reads `count` after writing `quiesce`, so one of the two
//! always sees the other (no lost wake-up). Nothing here allocates.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use tokio::sync::Notify;

use crate::sync::wait_for;

#[derive(Debug, Default)]
pub struct Inflight {
    /// Requests currently counted on this node.
    count: AtomicUsize,
    /// Nesting depth of quiesce sections; > 0 holds new requests at entry.
    quiesce: AtomicUsize,
    drained: Notify,
    resumed: Notify,
}

impl Inflight {
    /// Enter as a new request, waiting while the node is quiesced.
    pub async fn enter(&self) {
        loop {
            wait_for(&self.resumed, || self.quiesce.load(SeqCst) == 0).await;
            self.count.fetch_add(1, SeqCst);
            if self.quiesce.load(SeqCst) == 0 {
                return;
            }
            self.exit();
        }
    }

    /// Count a request passing through from a parent (never waits).
    pub fn pass(&self) {
        self.count.fetch_add(1, SeqCst);
    }

    /// A counted request completed.
    pub fn exit(&self) {
        if self.count.fetch_sub(1, SeqCst) == 1 && self.quiesce.load(SeqCst) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Hold new requests at entry.
    pub fn begin_quiesce(&self) {
        self.quiesce.fetch_add(1, SeqCst);
    }

    /// Release held requests (when the outermost quiesce section ends).
    pub fn end_quiesce(&self) {
        if self.quiesce.fetch_sub(1, SeqCst) == 1 {
            self.resumed.notify_waiters();
        }
    }

    /// Wait until no request is counted. Call inside a quiesce section.
    pub async fn wait_drained(&self) {
        wait_for(&self.drained, || self.count.load(SeqCst) == 0).await
    }

    pub fn in_flight(&self) -> usize {
        self.count.load(SeqCst)
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_request_and_holds_new_ones() {
        let f = Arc::new(Inflight::default());
        f.enter().await;
        f.begin_quiesce();
        let f2 = f.clone();
        let held = tokio::spawn(async move { f2.enter().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!held.is_finished(), "a new request is held while quiesced");
        let f3 = f.clone();
        let drain = tokio::spawn(async move { f3.wait_drained().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!drain.is_finished(), "drain waits for the request in flight");
        f.exit();
        drain.await.unwrap();
        f.end_quiesce();
        held.await.unwrap();
        assert_eq!(f.in_flight(), 1);
    }
}
