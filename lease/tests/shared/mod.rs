//! Behaviour every backend must show, run against the file backend and etcd.
//! Each function takes two handles on the same store (two daemons).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lease::{Held, Holder, Lease, LeaseError};

pub type Pair = [Arc<dyn Lease>; 2];

/// Generation +1 per acquire-after-free and per transfer; release keeps it.
pub async fn generations(d: Pair) {
    let [l, m] = d;
    assert_eq!(l.read().await.unwrap(), None);
    let a = l.acquire("a").await.unwrap();
    assert_eq!(a.generation, 1);
    assert_eq!(m.acquire("a").await.unwrap().generation, 1, "re-acquire by the holder keeps g");
    assert_eq!(l.renew(&a).await.unwrap().generation, 1);
    assert!(matches!(m.acquire("b").await, Err(LeaseError::HeldBy { generation: 1, .. })));
    l.release(a.clone()).await.unwrap();
    assert_eq!(m.read().await.unwrap(), None);
    assert!(matches!(l.renew(&a).await, Err(LeaseError::Lost { generation: 1, .. })));
    let b = m.acquire("b").await.unwrap();
    assert_eq!(b.generation, 2);
    assert_eq!(m.transfer(&b, "c").await.unwrap(), Holder { owner: "c".into(), generation: 3 });
    let c = l.claim("c", 3).await.unwrap();
    assert_eq!((c.owner.as_str(), c.generation), ("c", 3));
    l.release(c).await.unwrap();
    assert_eq!(m.acquire("a").await.unwrap().generation, 4, "a generation is never reused");
}

/// Several tasks on two handles race to acquire: exactly one winner per generation.
pub async fn race(d: Pair, rounds: u64) {
    let mut owner_of: BTreeMap<u64, String> = BTreeMap::new();
    for round in 1..=rounds {
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let l = d[i % 2].clone();
                tokio::spawn(async move { l.acquire(&format!("owner-{i}")).await })
            })
            .collect();
        let mut winners: Vec<Held> = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(h) => winners.push(h),
                Err(LeaseError::HeldBy { generation, .. }) => assert_eq!(generation, round),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let w = winners.remove(0);
        assert_eq!(w.generation, round);
        assert!(owner_of.insert(w.generation, w.owner.clone()).is_none(), "generation {} granted twice", w.generation);
        d[round as usize % 2].release(w).await.unwrap();
    }
}

/// Only the target claims a transfer at its generation; an older one is `Stale`.
pub async fn claims(d: Pair) {
    let [l, m] = d;
    let a = l.acquire("a").await.unwrap();
    assert_eq!(l.transfer(&a, "b").await.unwrap().generation, 2);
    assert!(matches!(m.transfer(&a, "c").await, Err(LeaseError::HeldBy { generation: 2, .. })), "a second transfer");
    assert!(matches!(m.claim("c", 2).await, Err(LeaseError::HeldBy { .. })), "the wrong owner claimed");
    assert!(matches!(m.claim("b", 3).await, Err(LeaseError::HeldBy { .. })), "the wrong generation claimed");
    let err = m.claim("b", 1).await.unwrap_err();
    assert!(matches!(err, LeaseError::Stale { presented: 1, current: 2, .. }), "{err}");
    assert_eq!(err.to_string(), "generation 1 of the lease of guest vm1 is stale: the lease is at generation 2");
    assert!(matches!(l.renew(&a).await, Err(LeaseError::HeldBy { .. })), "the source renewed after the transfer");
    assert_eq!(m.claim("b", 2).await.unwrap().generation, 2);
}

/// With a lease of `ttl`: a stale `Held` cannot transfer; expiry frees the
/// lease for another owner at g+1 and the old holder's renew fails.
/// Returns after b holds generation 2 (callers check the store did not change).
pub async fn expiry(d: Pair, ttl: Duration) -> Held {
    let [l, m] = d;
    let a = l.acquire("a").await.unwrap();
    let err = m.acquire("b").await;
    if std::time::Instant::now() < a.deadline {
        assert_eq!(err.unwrap_err().to_string(), "the lease of guest vm1 is held by a at generation 1");
    }
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(m.read().await.unwrap(), None, "an expired lease is free");
    assert!(matches!(l.renew(&a).await, Err(LeaseError::Lost { .. })), "renewed after expiry");
    let b = m.acquire("b").await.unwrap();
    assert_eq!(b.generation, 2);
    assert!(matches!(l.renew(&a).await, Err(LeaseError::HeldBy { generation: 2, .. })));
    let err = l.transfer(&a, "c").await.unwrap_err();
    assert!(matches!(err, LeaseError::HeldBy { ref owner, generation: 2, .. } if owner == "b"), "{err}");
    assert_eq!(l.read().await.unwrap(), Some(Holder { owner: "b".into(), generation: 2 }));
    b
}

/// Renewing every quarter ttl keeps the lease past one ttl.
pub async fn renewing(d: Pair, ttl: Duration) {
    let [l, m] = d;
    let mut a = l.acquire("a").await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(ttl / 4).await;
        a = l.renew(&a).await.unwrap();
    }
    let got = m.acquire("b").await;
    assert!(matches!(got, Err(LeaseError::HeldBy { generation: 1, .. })), "{got:?}");
}

/// Two handles transfer the same `Held` to different targets at once, many
/// times: exactly one transfer wins each time, at g+1.
pub async fn concurrent_transfers(d: Pair, rounds: u64) {
    let mut held = d[0].acquire("src").await.unwrap();
    for round in 0..rounds {
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let (l, h) = (d[i % 2].clone(), held.clone());
                tokio::spawn(async move { l.transfer(&h, &format!("dst-{i}")).await })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(h) => won.push(h),
                Err(LeaseError::HeldBy { generation, .. }) => assert_eq!(generation, held.generation + 1),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(won[0].generation, held.generation + 1);
        held = d[1].claim(&won[0].owner, won[0].generation).await.unwrap();
    }
}
