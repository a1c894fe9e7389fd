//! The etcd v3 backend, for hosts that share nothing but an etcd cluster.
//!
//! Guest `K` has two keys:
//!
//! - `/baton/lease/K`: the same JSON record as the file backend
//!   (`{"owner": "...", "generation": N, "expires_ms": T}`), written under an
//!   etcd lease of ttl seconds rounded up, so a holder that dies (or is cut
//!   off) lets the key vanish even if nobody reads it; a release deletes it.
//! - `/baton/generation/K`: the generation alone, without an etcd lease. The
//!   generation must survive the first key's expiry (it is never reused), so
//!   it cannot live only under an etcd lease.
//!
//! Every operation reads both keys in one snapshot, applies the rules
//! ([`crate::rules::apply`]) and commits with ONE transaction that compares
//! both keys' `mod_revision` (`create_revision == 0` for an absent key) with
//! what was read. A lost compare re-reads and re-applies the rules, up to
//! [`RETRIES`] times, so two daemons never both win a generation.
//!
//! Renewal grants a fresh etcd lease and re-puts the record with it in the
//! compare transaction (then revokes the old etcd lease, best effort) rather
//! than sending a keep-alive on the old one: a keep-alive cannot be part of a
//! transaction, so it would extend the key's life even when the rules refuse
//! the renewal; a grant costs the same one round trip and takes effect only
//! if the transaction commits.
//!
//! Expiry is judged on the daemons' wall clocks (as with a shared lease
//! directory), so hosts need synchronized clocks; each holder's own deadline
//! is on its monotonic clock, from the send time of its first request.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::OnceCell;

use crate::error::{LeaseError, Result};
use crate::key::Key;
use crate::rules::{apply, wall_ms, Op, Record};
use crate::{BoxFuture, Lease};

/// How many times a transaction that lost its compare is re-read and retried.
pub const RETRIES: usize = 16;

/// How long connecting to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A guest's lease in etcd. Connects on first use; clones share the connection.
#[derive(Clone)]
pub struct EtcdLease {
    endpoints: Vec<String>,
    key: Key,
    ttl: Duration,
    margin: Duration,
    client: std::sync::Arc<OnceCell<Client>>,
}

impl std::fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLease")
            .field("endpoints", &self.endpoints)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("margin", &self.margin)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

/// Both keys as read in one snapshot.
struct Snapshot {
    rec: Record,
    lease_rev: Option<i64>,
    gen_rev: Option<i64>,
    etcd_lease: i64,
}

impl EtcdLease {
    /// The lease of guest `key` in the etcd cluster at `endpoints`
    /// (`http://host:port`), expiring `ttl` after each write; this daemon's
    /// deadline is `margin` earlier. Does not connect yet.
    pub fn new(endpoints: &[String], key: &str, ttl: Duration, margin: Duration) -> Result<Self> {
        let key = Key::new(key)?;
        if ttl < Duration::from_millis(1) || margin >= ttl {
            return Err(LeaseError::InvalidOption(format!(
                "the margin ({} ms) must be shorter than the ttl ({} ms), and the ttl at least 1 ms",
                margin.as_millis(),
                ttl.as_millis()
            )));
        }
        if endpoints.is_empty() || endpoints.iter().any(String::is_empty) {
            return Err(LeaseError::InvalidOption("etcd needs at least one endpoint, none empty".into()));
        }
        Ok(Self { endpoints: endpoints.to_vec(), key, ttl, margin, client: Default::default() })
    }

    /// `/baton/lease/<key>`: the record, under an etcd lease.
    pub fn lease_key(&self) -> String {
        format!("/baton/lease/{}", self.key)
    }

    /// `/baton/generation/<key>`: the generation, kept across expiry and release.
    pub fn generation_key(&self) -> String {
        format!("/baton/generation/{}", self.key)
    }

    /// Each request's timeout: half the ttl, at most 5 s.
    pub fn request_timeout(&self) -> Duration {
        (self.ttl / 2).min(Duration::from_secs(5))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// The etcd lease's ttl: the lease's, rounded up to whole seconds (so
    /// the key outlives the record's `expires_ms`, never the reverse).
    fn etcd_ttl_secs(&self) -> i64 {
        let ms = self.ttl_ms();
        i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> LeaseError {
        LeaseError::Backend(format!(
            "etcd at {}: cannot {what} the lease of guest {}: {e}",
            self.endpoints.join(","),
            self.key
        ))
    }

    async fn client(&self) -> Result<Client> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let opts =
                    ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(self.request_timeout());
                let connect = Client::connect(&self.endpoints, Some(opts));
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(r) => r.map_err(|e| self.err("connect for", e)),
                    Err(_) => Err(self.err("connect for", format!("no answer within {CONNECT_TIMEOUT:?}"))),
                }
            })
            .await?;
        Ok(client.clone())
    }

    /// Bounds a request by the request timeout (tonic's own one does not
    /// cover a connection that never comes up). A request refused at
    /// connect (a member down: it never reached etcd, so it cannot have
    /// taken effect) is sent again, to whichever member the client's
    /// balancer picks next, within the same bound.
    async fn bounded<T, F>(&self, what: &str, mut f: impl FnMut() -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let limit = self.request_timeout() + CONNECT_TIMEOUT;
        let tries = async {
            let mut pause = Duration::from_millis(20);
            loop {
                match f().await {
                    Err(e) if e.to_string().contains("connect error") => {
                        tracing::debug!(error = %e, "an etcd member refused the connection: trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                    r => return r,
                }
            }
        };
        match tokio::time::timeout(limit, tries).await {
            Ok(r) => r.map_err(|e| self.err(what, e)),
            Err(_) => Err(self.err(what, format!("no answer within {limit:?}"))),
        }
    }

    /// Reads both keys in one snapshot.
    async fn snapshot(&self, client: &mut Client) -> Result<Snapshot> {
        let txn = Txn::new().and_then([TxnOp::get(self.lease_key(), None), TxnOp::get(self.generation_key(), None)]);
        let resp = self
            .bounded("read", || {
                let (mut c, t) = (client.clone(), txn.clone());
                async move { c.txn(t).await }
            })
            .await?;
        let mut gets = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let (lease_kv, gen_kv) = (gets.next().flatten(), gets.next().flatten());
        self.decode(lease_kv.as_ref(), gen_kv.as_ref())
    }

    fn decode(&self, lease_kv: Option<&KeyValue>, gen_kv: Option<&KeyValue>) -> Result<Snapshot> {
        let stored_gen = match gen_kv {
            None => 0,
            Some(kv) => std::str::from_utf8(kv.value()).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                LeaseError::Backend(format!(
                    "etcd key {} is not a lease generation: {:?}",
                    self.generation_key(),
                    String::from_utf8_lossy(kv.value())
                ))
            })?,
        };
        let rec = match lease_kv {
            None => Record { generation: stored_gen, ..Record::NEVER_HELD },
            Some(kv) => {
                let corrupt =
                    |why: String| LeaseError::Backend(format!("etcd key {} is not a lease: {why}", self.lease_key()));
                let rec: Record = serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
                if let Some(why) = rec.defect() {
                    return Err(corrupt(format!("it names {why}")));
                }
                if rec.generation < stored_gen {
                    return Err(corrupt(format!(
                        "its generation {} is below {}'s {stored_gen}",
                        rec.generation,
                        self.generation_key()
                    )));
                }
                rec
            }
        };
        Ok(Snapshot {
            rec,
            lease_rev: lease_kv.map(KeyValue::mod_revision),
            gen_rev: gen_kv.map(KeyValue::mod_revision),
            etcd_lease: lease_kv.map_or(0, KeyValue::lease),
        })
    }

    /// Revokes etcd lease `id` (best effort: unused, it expires by itself).
    async fn revoke(&self, client: &Client, id: i64) -> Result<()> {
        self.bounded("revoke", || {
            let mut c = client.clone();
            async move { c.lease_revoke(id).await }
        })
        .await
        .map(|_| ())
    }

    /// Runs `op` as one compare-and-swap transaction, retried on a lost
    /// compare; returns the new record and the local deadline it grants.
    async fn run(&self, op: Op) -> Result<(Record, Instant)> {
        let mut client = self.client().await?;
        let mut granted: Option<(i64, Instant)> = None;
        let result = self.attempts(&mut client, &op, &mut granted).await;
        if result.is_err() {
            if let Some((id, _)) = granted {
                // Best effort: unused, it would expire by itself after the ttl.
                let _ = self.revoke(&client, id).await;
            }
        }
        result
    }

    async fn attempts(
        &self,
        client: &mut Client,
        op: &Op,
        granted: &mut Option<(i64, Instant)>,
    ) -> Result<(Record, Instant)> {
        for _ in 0..=RETRIES {
            let sent = Instant::now();
            let snap = self.snapshot(client).await?;
            let next = apply(&self.key, &snap.rec, op, wall_ms()?, self.ttl_ms())?;
            let mut compares = vec![match snap.lease_rev {
                Some(rev) => Compare::mod_revision(self.lease_key(), CompareOp::Equal, rev),
                None => Compare::create_revision(self.lease_key(), CompareOp::Equal, 0),
            }];
            compares.push(match snap.gen_rev {
                Some(rev) => Compare::mod_revision(self.generation_key(), CompareOp::Equal, rev),
                None => Compare::create_revision(self.generation_key(), CompareOp::Equal, 0),
            });
            let mut ops = Vec::new();
            if next.owner.is_empty() {
                ops.push(TxnOp::delete(self.lease_key(), None));
            } else {
                // An etcd lease granted in an earlier try is reused; it started
                // its ttl then, so the deadline counts from the earlier send time.
                let id = match *granted {
                    Some((id, _)) => id,
                    None => {
                        let grant_sent = Instant::now();
                        let ttl = self.etcd_ttl_secs();
                        let resp = self
                            .bounded("grant an etcd lease for", || {
                                let mut c = client.clone();
                                async move { c.lease_grant(ttl, None).await }
                            })
                            .await?;
                        granted.insert((resp.id(), grant_sent)).0
                    }
                };
                let json = serde_json::to_vec(&next).map_err(|e| self.err("encode", e))?;
                ops.push(TxnOp::put(self.lease_key(), json, Some(PutOptions::new().with_lease(id))));
            }
            if snap.gen_rev.is_none() || next.generation != snap.rec.generation {
                ops.push(TxnOp::put(self.generation_key(), next.generation.to_string(), None));
            }
            let txn = Txn::new().when(compares).and_then(ops);
            let resp = self
                .bounded("write", || {
                    let (mut c, t) = (client.clone(), txn.clone());
                    async move { c.txn(t).await }
                })
                .await?;
            if resp.succeeded() {
                let used = if next.owner.is_empty() { None } else { granted.take() };
                if snap.etcd_lease != 0 && used.map(|(id, _)| id) != Some(snap.etcd_lease) {
                    // The old etcd lease holds no key now; free it early (best effort).
                    let _ = self.revoke(client, snap.etcd_lease).await;
                }
                // Deadline: send time + ttl - margin, from the earlier of this
                // try's read and the grant of the etcd lease now on the key.
                let since = used.map_or(sent, |(_, grant_sent)| grant_sent.min(sent));
                return Ok((next, since + self.ttl - self.margin));
            }
        }
        Err(self.err("change", format!("the keys kept changing under {} tries", RETRIES + 1)))
    }
}

impl Lease for EtcdLease {
    fn key(&self) -> &str {
        self.key.as_str()
    }

    fn inspect(&self) -> BoxFuture<'_, Result<Record>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            Ok(self.snapshot(&mut client).await?.rec)
        })
    }

    crate::transactions!();
}
