//! Combining of concurrent claims and completions.
//!
//! Every claim and every completion is a transaction, and on PostgreSQL a transaction's fixed cost
//! (round trips, snapshot, plan execution, commit) is paid per statement, not per row: sixteen claims of
//! 32 runs cost far more than one claim of 512. So calls that arrive while earlier ones of their kind
//! run are queued, and each queue is drained by a task that runs the compatible calls waiting in it as
//! one statement ([`PgOptions::combine_max_runs`](crate::PgOptions::combine_max_runs) runs at most),
//! with at most [`PgOptions::combine_in_flight`](crate::PgOptions::combine_in_flight) such statements of
//! each kind at once. A call that finds nothing of its kind running runs at once: combining adds no wait
//! at low load. While statements run, another starts only when it carries at least a quarter of the
//! maximum; smaller groups wait for a running one to finish (two small statements side by side cost
//! more than one larger one a moment later), beside a free slot at most a second (so a statement that
//! hangs does not hold up the calls behind it).
//!
//! - Claims combine when their capabilities and lease durations are equal. Each keeps its agent, its
//!   limit, its lease and its `now` (the rows are selected as due at the earliest of them); the first
//!   queued call gets the first rows in claim order.
//! - Completions combine when their retry defaults are equal; each is judged (lease expiry) and stamped
//!   at its own caller's `now`. A combined transaction waits at most 100 ms for a row lock (a host's
//!   open transaction may hold an item): when it fails, for that or any reason, each of its calls runs
//!   again on its own, outside the slots, so a waiting completion holds up nobody else.
//! - A combined claim that fails for another reason than the server being unavailable is run again
//!   call by call, so one bad call cannot fail the others.
//! - The statement runs in a task of its own: a caller that goes away does not cancel the others' work,
//!   and a completion whose caller went away is still applied.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use orchestrator_core::error::{StoreError, StoreResult};
use orchestrator_core::store::{Claim, ClaimedRun, CompleteMany, CompletionResult};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::Shared;

/// Counts of calls and of the statements that ran them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claim_calls: AtomicU64,
    pub(crate) claim_statements: AtomicU64,
    pub(crate) completion_calls: AtomicU64,
    pub(crate) completion_transactions: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self) -> CombiningStats {
        CombiningStats {
            claim_calls: self.claim_calls.load(Ordering::Relaxed),
            claim_statements: self.claim_statements.load(Ordering::Relaxed),
            completion_calls: self.completion_calls.load(Ordering::Relaxed),
            completion_transactions: self.completion_transactions.load(Ordering::Relaxed),
        }
    }
}

/// How many claim and completion calls a store took and how many statements ran them (see
/// [`PgStore::combining`](crate::PgStore::combining)). A call run again after a failure counts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CombiningStats {
    /// `runs_claim` calls (a `runs_complete_and_claim` call counts as one, and as a completion call
    /// when it completes anything).
    pub claim_calls: u64,
    /// Claim statements run for them.
    pub claim_statements: u64,
    /// `runs_complete_many` calls.
    pub completion_calls: u64,
    /// Completion transactions run for them.
    pub completion_transactions: u64,
}

/// The queue of one kind of call.
pub(crate) type Sender<J> = mpsc::UnboundedSender<J>;

/// A call that can be combined with others of its kind.
pub(crate) trait Job: Send + Sized + 'static {
    /// Its size toward the combined statement's limit.
    fn size(&self) -> usize;
    /// Whether it may run in one statement with `first`.
    fn joins(&self, first: &Self) -> bool;
    /// Whether its caller has gone away.
    fn abandoned(&self) -> bool;
    /// Runs the calls as one statement and answers each.
    fn run(shared: Arc<Shared>, group: Vec<Self>) -> impl Future<Output = ()> + Send;
}

/// Starts the task that drains a queue of `J`s into combined statements of at most `max` runs, at most
/// `in_flight` at once. It ends when the sender (the store) is dropped.
pub(crate) fn spawn<J: Job>(shared: Arc<Shared>, max: u32, in_flight: u32) -> Sender<J> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(drain(shared, rx, max.max(1) as usize, in_flight.max(1) as usize));
    tx
}

async fn drain<J: Job>(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<J>, max: usize, in_flight: usize) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let finished = Arc::new(Notify::new());
    // While a statement runs, another starts only with this many runs: small statements side by side
    // cost more than one larger one a moment later.
    let fill = (max / 4).max(1);
    let mut queued: VecDeque<J> = VecDeque::new();
    // Since when a group below the fill has waited beside a free slot (it starts at `FILL_WAIT`).
    let mut short_since: Option<tokio::time::Instant> = None;
    // Cleared when the store is dropped: what is queued still runs (a completion whose caller went
    // away is still applied), then the task ends.
    let mut open = true;
    loop {
        if queued.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(j) => queued.push_back(j),
                None => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            queued.push_back(j);
        }
        queued.retain(|j| !j.abandoned());
        if queued.is_empty() {
            continue;
        }
        let running = in_flight - slots.available_permits();
        let size: usize = queued.iter().map(Job::size).sum();
        let short = running < in_flight && running > 0 && size < fill;
        let waited_enough = short_since.is_some_and(|t| t.elapsed() >= FILL_WAIT);
        if running >= in_flight || (short && !waited_enough) {
            // Wait for a running statement to finish, or for more calls; a short group beside a free
            // slot waits at most `FILL_WAIT` (a statement that hangs must not hold up the calls queued
            // behind it).
            let until = match (short, short_since) {
                (true, Some(t)) => Some(t + FILL_WAIT),
                (true, None) => {
                    let now = tokio::time::Instant::now();
                    short_since = Some(now);
                    Some(now + FILL_WAIT)
                }
                (false, _) => None,
            };
            tokio::select! {
                j = rx.recv(), if open => match j {
                    Some(j) => queued.push_back(j),
                    None => open = false,
                },
                _ = finished.notified() => {}
                _ = sleep_until(until), if until.is_some() => {}
            }
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let Some(group) = take_group(&mut queued, max) else { continue };
        short_since = None;
        let done = Done { slot: Some(slot), finished: finished.clone() };
        let shared = shared.clone();
        tokio::spawn(async move {
            J::run(shared, group).await;
            drop(done);
        });
    }
}

/// How long calls below the fill wait beside a free slot for a running statement to finish: far longer
/// than a statement takes, so it only matters when one hangs (a lost connection, say).
const FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Frees a statement's slot and wakes the draining task when the statement ends, also by a panic.
struct Done {
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    finished: Arc<Notify>,
}

impl Drop for Done {
    fn drop(&mut self) {
        // The slot first: the woken task counts the free slots at once, and a wake-up that finds this
        // slot still taken would be its last (it waits for the next one, which may never come).
        drop(self.slot.take());
        self.finished.notify_one();
    }
}

/// The first queued call and, in arrival order, every later one that joins it within `max`.
fn take_group<J: Job>(queued: &mut VecDeque<J>, max: usize) -> Option<Vec<J>> {
    let first = queued.pop_front()?;
    let mut total = first.size();
    let mut group = vec![first];
    let mut rest = VecDeque::with_capacity(queued.len());
    for j in queued.drain(..) {
        if total + j.size() <= max && j.joins(&group[0]) {
            total += j.size();
            group.push(j);
        } else {
            rest.push_back(j);
        }
    }
    *queued = rest;
    Some(group)
}

async fn queue<J, R>(tx: &Sender<J>, job: impl FnOnce(oneshot::Sender<StoreResult<R>>) -> J) -> StoreResult<R> {
    let (reply, answer) = oneshot::channel();
    tx.send(job(reply)).map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

fn stopped() -> StoreError {
    StoreError::Unavailable { retryable: true, message: "the store's combining task stopped".into() }
}

/// A claim waiting to be combined.
pub(crate) struct ClaimJob {
    claim: Claim,
    reply: oneshot::Sender<StoreResult<Vec<ClaimedRun>>>,
}

impl ClaimJob {
    pub(crate) async fn submit(tx: &Sender<ClaimJob>, claim: Claim) -> StoreResult<Vec<ClaimedRun>> {
        queue(tx, |reply| ClaimJob { claim, reply }).await
    }
}

impl Job for ClaimJob {
    fn size(&self) -> usize {
        self.claim.limit as usize
    }
    fn joins(&self, first: &Self) -> bool {
        self.claim.capabilities == first.claim.capabilities && self.claim.lease_ttl == first.claim.lease_ttl
    }
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
    async fn run(shared: Arc<Shared>, group: Vec<Self>) {
        let claims: Vec<&Claim> = group.iter().map(|j| &j.claim).collect();
        let res = shared.claim(&claims).await;
        match res {
            Ok(runs) => {
                for (j, r) in group.into_iter().zip(runs) {
                    answer_claim(j, Ok(r));
                }
            }
            Err(e) if group.len() == 1 => {
                if let Some(j) = group.into_iter().next() {
                    answer_claim(j, Err(e));
                }
            }
            // The server is unavailable: every call gets that answer.
            Err(StoreError::Unavailable { retryable, message }) => {
                for j in group {
                    answer_claim(j, Err(StoreError::Unavailable { retryable, message: message.clone() }));
                }
            }
            // Anything else: each call runs again on its own, so one bad call cannot fail the others.
            Err(_) => {
                for j in group {
                    let r = shared.claim(&[&j.claim]).await.map(|mut v| v.pop().unwrap_or_default());
                    answer_claim(j, r);
                }
            }
        }
    }
}

fn answer_claim(j: ClaimJob, r: StoreResult<Vec<ClaimedRun>>) {
    if let Err(Ok(runs)) = j.reply.send(r) {
        if !runs.is_empty() {
            // Its caller went away after the statement ran: the leases expire and the reaper hands the
            // items out again.
            tracing::warn!(agent = %j.claim.agent_id, runs = runs.len(), "claimed runs not delivered: the caller went away");
        }
    }
}

/// How long a combined completion waits for a row lock before its calls run on their own.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// A completion call waiting to be combined.
pub(crate) struct CompleteJob {
    p: CompleteMany,
    reply: oneshot::Sender<StoreResult<Vec<StoreResult<CompletionResult>>>>,
}

impl CompleteJob {
    pub(crate) async fn submit(
        tx: &Sender<CompleteJob>,
        p: CompleteMany,
    ) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        queue(tx, |reply| CompleteJob { p, reply }).await
    }
}

impl Job for CompleteJob {
    fn size(&self) -> usize {
        self.p.completions.len()
    }
    fn joins(&self, first: &Self) -> bool {
        self.p.retry_defaults == first.p.retry_defaults
    }
    fn abandoned(&self) -> bool {
        // A completion is applied even when its caller has gone away: the work was done.
        false
    }
    async fn run(shared: Arc<Shared>, group: Vec<Self>) {
        let mut completions = Vec::with_capacity(group.iter().map(|j| j.p.completions.len()).sum());
        let mut nows = Vec::with_capacity(completions.capacity());
        for j in &group {
            completions.extend(j.p.completions.iter().cloned());
            nows.extend(std::iter::repeat_n(j.p.now, j.p.completions.len()));
        }
        let res = shared.complete_combined(&completions, &nows, &group[0].p.retry_defaults, LOCK_TIMEOUT).await;
        match res {
            Ok(results) => {
                let mut results = results.into_iter();
                for j in group {
                    let mine: Vec<_> = results.by_ref().take(j.p.completions.len()).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            }
            // A row lock not granted in time (a host transaction holding an item, say), or any other
            // failure: each call runs on its own, outside the slots, so it waits (or fails) alone.
            Err(_) => {
                for j in group {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let r = shared.complete_many(&j.p).await;
                        let _ = j.reply.send(r);
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    /// Records how many slots were free when the draining task was woken.
    struct Seen {
        slots: Arc<Semaphore>,
        free: Mutex<Option<usize>>,
    }

    impl Wake for Seen {
        fn wake(self: Arc<Self>) {
            *self.free.lock().unwrap() = Some(self.slots.available_permits());
        }
    }

    #[test]
    fn a_finished_statement_frees_its_slot_before_it_wakes_the_drain() {
        let slots = Arc::new(Semaphore::new(1));
        let finished = Arc::new(Notify::new());
        let done = Done { slot: Some(slots.clone().try_acquire_owned().unwrap()), finished: finished.clone() };
        let seen = Arc::new(Seen { slots: slots.clone(), free: Mutex::new(None) });
        let waker = Waker::from(seen.clone());
        let notified = finished.notified();
        let mut notified = std::pin::pin!(notified);
        assert!(notified.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        drop(done);
        // Woken with the slot already free: a task that counts the slots at once finds it.
        assert_eq!(*seen.free.lock().unwrap(), Some(1));
        assert!(notified.as_mut().poll(&mut Context::from_waker(&waker)).is_ready());
    }
}
