//! The two synchronisation rules every crate of baton follows, written once.
//!
//! **Poisoning.** A lock is poisoned when a thread panicked while holding it.
//! baton's critical sections are short and leave their state consistent at
//! every point where they can unwind (a push, a remove, a field store), and
//! the state behind a lock (a bitmap, a job's status, the migration's owner)
//! matters more than the panic that interrupted it: losing it would turn one
//! bug into a lost handover. So a poisoned lock is taken over, never spread:
//! [`lock`], [`read`], [`write`] and [`wait`] all do that, and no code of
//! baton calls `Mutex::lock` and decides for itself.
//!
//! **Waiting for a condition.** [`wait_until`] is the one correct way to wait
//! on a [`Notify`] for a condition another task makes true: register first,
//! then check, then sleep. Checking before registering loses a
//! `notify_waiters` that lands between the two, and the waiter sleeps forever.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// Lock `m`, taking over a poisoned lock (see the module's policy).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-lock `l`, taking over a poisoned lock.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-lock `l`, taking over a poisoned lock.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// `Mutex::get_mut`, taking over a poisoned lock.
pub fn get_mut<T: ?Sized>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// `Condvar::wait`, taking over a poisoned lock.
pub fn wait<'a, T>(cond: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cond.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// `Condvar::wait_timeout`, taking over a poisoned lock; the guard only (a
/// caller that bounds its wait re-checks its own deadline).
pub fn wait_timeout<'a, T>(cond: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    match cond.wait_timeout(guard, timeout) {
        Ok((g, _)) => g,
        Err(p) => p.into_inner().0,
    }
}

/// Wait until `check` returns `Some`, re-checking each time `notify` wakes its
/// waiters. The wake-up is registered before every check, so a
/// `notify_waiters` that races with the check is never lost.
pub async fn wait_until<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(v) = check() {
            return v;
        }
        woken.await;
    }
}

/// Wait until `cond` holds; [`wait_until`] for a condition without a value.
pub async fn wait_for(notify: &Notify, mut cond: impl FnMut() -> bool) {
    wait_until(notify, || cond().then_some(())).await
}

/// Resolve once any of `futs` does (never, for none).
pub async fn select_any<F: std::future::Future>(futs: Vec<F>) {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            if f.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Run `futs` concurrently on this task; their outputs, in order.
pub async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_notification_between_check_and_sleep_is_not_lost() {
        let notify = Arc::new(Notify::new());
        let flag = Arc::new(AtomicBool::new(false));
        let (n, f) = (notify.clone(), flag.clone());
        let waiter = tokio::spawn(async move {
            let mut checks = 0;
            wait_for(&n, || {
                checks += 1;
                if checks == 1 {
                    // The condition becomes true and is announced right after
                    // the first check, before the waiter sleeps.
                    f.store(true, SeqCst);
                    n.notify_waiters();
                    return false;
                }
                f.load(SeqCst)
            })
            .await;
            checks
        });
        let checks = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(checks, Ok(Ok(2))), "the wake-up was lost: {checks:?}");
        assert!(flag.load(SeqCst));
    }

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = lock(&m2);
            #[allow(clippy::panic)]
            {
                panic!("poison it");
            }
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }

    #[test]
    fn join_all_runs_its_futures_side_by_side_and_keeps_their_order() {
        // Paused time: the clock moves only when every task waits, so the
        // elapsed time is exactly the longest sleep if they overlap.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let t = tokio::time::Instant::now();
            let futs: Vec<_> = [30u64, 10, 20]
                .into_iter()
                .map(|ms| async move {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    ms
                })
                .collect();
            assert_eq!(super::join_all(futs).await, [30, 10, 20]);
            assert_eq!(t.elapsed(), std::time::Duration::from_millis(30), "side by side, not one after another");
        });
    }
}
