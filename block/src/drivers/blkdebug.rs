//! `blkdebug`: a filter that injects errors and delays into the requests
//! passing through it, with QEMU's `inject-error` rules, changeable at run time.
//!
//! Differences from QEMU, on purpose: a rule fires on the request of its
//! event's kind itself (QEMU's `immediately` behaviour for I/O events); a
//! `sector` rule fires for any request that covers that sector. baton adds
//! the events `activate` and `inactivate`, and delay rules.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::driver::{Driver, Filter, OpenCtx, Opened};
use crate::error::{libc_errno, BlockError, Op, Result};
use crate::sync;

crate::qapi_struct! {
    /// QEMU's `BlockdevOptionsBlkdebug`, the members baton implements (the
    /// child, `image`, is the graph's), and baton's delay rules.
    pub struct BlockdevOptionsBlkdebug {
        "inject-error" inject_error: Option<Vec<InjectError>>,
        "x-baton-inject-delay" inject_delay: Option<Vec<InjectDelay>>,
        /// Accepted; requests are not split to an alignment.
        "align" align: Option<u64>,
    }
}

/// The `blkdebug` driver.
#[derive(Debug)]
pub struct BlkdebugBdrv;

impl Driver for BlkdebugBdrv {
    const NAME: &'static str = "blkdebug";
    const CHILD: Option<&'static str> = Some("image");
    type Options = BlockdevOptionsBlkdebug;
    async fn open<'a>(&'a self, _ctx: OpenCtx<'a>, o: BlockdevOptionsBlkdebug) -> Result<Opened> {
        let b = Blkdebug::new(o.inject_error.unwrap_or_default(), o.inject_delay.unwrap_or_default());
        Ok(Opened::Filter(Box::new(b)))
    }
}

crate::qapi_enum! {
    /// Events a rule can fire on.
    pub enum Event {
        "read_aio" ReadAio,
        "write_aio" WriteAio,
        "flush_to_disk" FlushToDisk,
        "pwritev_zero" PwritevZero,
        "pdiscard" Pdiscard,
        /// baton: the node is being activated.
        "activate" Activate,
        /// baton: the node is being inactivated (after it was quiesced and flushed).
        "inactivate" Inactivate,
    }
}

impl Event {
    /// The event an I/O operation fires, if any.
    pub fn for_op(op: Op) -> Option<Event> {
        match op {
            Op::Read => Some(Event::ReadAio),
            Op::Write => Some(Event::WriteAio),
            Op::Flush => Some(Event::FlushToDisk),
            Op::WriteZeroes => Some(Event::PwritevZero),
            Op::Discard => Some(Event::Pdiscard),
            Op::BlockStatus | Op::Truncate => None,
        }
    }
}

fn default_errno() -> i32 {
    libc_errno::EIO
}

crate::qapi_struct! {
    /// One `inject-error` rule, with QEMU's member names.
    #[derive(PartialEq, Eq)]
    pub struct InjectError {
        "event" event: Event,
        "errno" errno: i32 = "default_errno",
        /// Only requests covering this 512-byte sector (QEMU: -1 or absent for any).
        "sector" sector: Option<i64>,
        /// Remove the rule after it fired once.
        "once" once: bool = "Default::default",
        /// Accepted for compatibility; rules always fire on the request itself.
        "immediately" immediately: bool = "Default::default",
    }
}

crate::qapi_struct! {
    /// A baton delay rule: matching requests wait `ms` milliseconds before they proceed.
    #[derive(PartialEq, Eq)]
    pub struct InjectDelay {
        "event" event: Event,
        "ms" ms: u64,
        "sector" sector: Option<i64>,
        "once" once: bool = "Default::default",
    }
}

#[derive(Debug, Default)]
struct Rules {
    errors: Vec<InjectError>,
    delays: Vec<InjectDelay>,
}

#[derive(Debug, Default)]
pub struct Blkdebug {
    rules: Mutex<Rules>,
    /// True iff any rule exists; lets requests skip the lock when there are none.
    armed: AtomicBool,
}

fn covers(sector: Option<i64>, offset: u64, len: u64) -> bool {
    match sector {
        None => true,
        Some(s) if s < 0 => true,
        Some(s) => {
            let start = (s as u64).saturating_mul(512);
            // A zero-length request (flush) covers the sector only if the rule has none.
            len > 0 && start < offset.saturating_add(len) && start.saturating_add(512) > offset
        }
    }
}

impl Blkdebug {
    pub fn new(errors: Vec<InjectError>, delays: Vec<InjectDelay>) -> Self {
        let b = Self::default();
        b.set_rules(errors, delays);
        b
    }

    /// Replace every rule at once.
    pub fn set_rules(&self, errors: Vec<InjectError>, delays: Vec<InjectDelay>) {
        let mut r = sync::lock(&self.rules);
        let armed = !errors.is_empty() || !delays.is_empty();
        *r = Rules { errors, delays };
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// The current rules.
    pub fn rules(&self) -> (Vec<InjectError>, Vec<InjectDelay>) {
        let r = sync::lock(&self.rules);
        (r.errors.clone(), r.delays.clone())
    }

    fn rearm(&self, r: &Rules) {
        self.armed.store(!r.errors.is_empty() || !r.delays.is_empty(), Ordering::SeqCst);
    }

    /// The delay to apply to this request, consuming `once` rules.
    fn take_delay(&self, event: Event, offset: u64, len: u64) -> Option<Duration> {
        let mut r = sync::lock(&self.rules);
        let i = r.delays.iter().position(|d| d.event == event && covers(d.sector, offset, len))?;
        let ms = r.delays[i].ms;
        if r.delays[i].once {
            r.delays.remove(i);
            self.rearm(&r);
        }
        Some(Duration::from_millis(ms))
    }

    /// The error to fail this request with, consuming `once` rules.
    pub fn take_error(&self, node: &str, event: Event, offset: u64, len: u64) -> Result<()> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut r = sync::lock(&self.rules);
        let Some(i) = r.errors.iter().position(|e| e.event == event && covers(e.sector, offset, len)) else {
            return Ok(());
        };
        let errno = r.errors[i].errno;
        if r.errors[i].once {
            r.errors.remove(i);
            self.rearm(&r);
        }
        Err(BlockError::Injected { node: node.to_string(), event: event.as_str(), errno })
    }
}

/// An I/O request passing through waits out a delay rule's delay, then fails
/// if an error rule says so; activation and inactivation fire their events.
impl Filter for Blkdebug {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn delay(&self, op: Op, offset: u64, len: u64) -> Option<Duration> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        self.take_delay(Event::for_op(op)?, offset, len)
    }
    fn check(&self, node: &str, op: Op, offset: u64, len: u64) -> Result<()> {
        match Event::for_op(op) {
            Some(event) => self.take_error(node, event, offset, len),
            None => Ok(()),
        }
    }
    fn activate(&self, node: &str) -> Result<()> {
        self.take_error(node, Event::Activate, 0, 0)
    }
    fn inactivate(&self, node: &str) -> Result<()> {
        self.take_error(node, Event::Inactivate, 0, 0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_rule_fires_once_and_names_node() {
        let b = Blkdebug::new(
            vec![InjectError { event: Event::FlushToDisk, errno: 5, sector: None, once: true, immediately: false }],
            vec![],
        );
        let e = b.take_error("n1", Event::FlushToDisk, 0, 0).unwrap_err();
        assert!(e.to_string().contains("n1"), "{e}");
        assert_eq!(e.errno(), 5);
        assert!(b.take_error("n1", Event::FlushToDisk, 0, 0).is_ok());
    }

    #[test]
    fn sector_rule_matches_only_covering_requests() {
        let b = Blkdebug::new(
            vec![InjectError { event: Event::ReadAio, errno: 28, sector: Some(8), once: false, immediately: false }],
            vec![],
        );
        assert!(b.take_error("n", Event::ReadAio, 0, 4096).is_ok());
        assert!(b.take_error("n", Event::ReadAio, 4096, 512).is_err());
        assert!(b.take_error("n", Event::ReadAio, 4096 + 512, 512).is_ok());
        assert!(b.take_error("n", Event::WriteAio, 4096, 512).is_ok());
    }

    #[test]
    fn rules_parse_with_qemu_names() {
        let r: InjectError = serde_json::from_str(r#"{"event":"pwritev_zero","errno":28,"once":true}"#).unwrap();
        assert_eq!(r.event, Event::PwritevZero);
        assert!(serde_json::from_str::<InjectError>(r#"{"event":"bogus"}"#).is_err());
    }
}
