//! The relay: claims due deliveries per group, runs the group's subscriber in the same
//! transaction as the inbox row, retries with backoff and dead-letters what keeps failing.
//!
//! Each round of a group first reads the outbox by position (`position.rs`, decision 0024),
//! where events for this process's groups go by default, then claims the group's delivery rows:
//! scheduled messages, retries, the transports' rows, and whatever reading by position handed
//! over (a key held back, a batch that failed).
//!
//! Each group claims its rows in id order, in batches, and handles a whole batch in one
//! transaction: the handlers' effects, one multi-row inbox insert and the deletion of the
//! claimed rows commit together. When anything in a batch fails (a handler, the inbox insert,
//! or the commit itself), the batch is rolled back and its rows are handled one by one, each in
//! its own transaction, so that only the failing message is held back (with its key) and every
//! other one is delivered.
//!
//! A delivery fails when its handler fails, and also when its transaction does after the
//! handler returned `Ok`: the inbox insert or the delete is refused (a handler that swallowed a
//! failed statement left PostgreSQL's transaction aborted), or the commit is (a deferred
//! constraint, a serialization failure, the connection lost). Either way it is a failed attempt
//! with its error: it backs off, and is dead-lettered after `max_attempts`. When the
//! transaction that held the claim is gone, the attempt is recorded in a short transaction of
//! its own that claims the row again (decision 0014).
//!
//! A row that failed once (`attempts > 0`) is delivered alone from then on, never inside a
//! batch. Handler runs, for a message that always fails: two on its first attempt when it came
//! in a batch (the batch, then alone; the second is the attempt recorded), one on each later
//! attempt, so `max_attempts + 1` in all. Other messages run again only for a batch that
//! failed, which happens once per message failing for the first time in it: when a handler
//! failed, the messages before it in the batch run once more; when the inbox insert or the
//! commit failed, all of the batch does. Retries of a failing message run no other handler.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inseam_core::store::{DeliveryFailure, RelayHandle};
use inseam_core::{App, RawEnvelope};
use sqlx::{AssertSqlSafe, Row as _};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Context as _, Result};
use crate::store::{SqlStore, SqlUnitOfWork, micros};

/// Counters of the relay since the store connected.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    published: AtomicU64,
}

/// What the relay did since the store connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Deliveries handled and committed.
    pub delivered: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Messages moved to the dead letters.
    pub dead_lettered: u64,
    /// Redeliveries skipped because the group's inbox had them.
    pub duplicates: u64,
    /// Batches committed whole.
    pub batches: u64,
    /// Messages handed to a transport and acknowledged by its broker.
    pub published: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> RelayStats {
        RelayStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn published(&self, messages: usize) {
        self.published.fetch_add(messages as u64, Ordering::Relaxed);
    }
}

impl SqlStore {
    /// Delivers everything that is due, in this task, until nothing is left: each group's
    /// batches in turn, again while deliveries produce new messages. What a test calls instead
    /// of starting the relay and sleeping (scheduled messages wait for the app's clock).
    /// Returns how many deliveries were handled or dead-lettered.
    pub async fn deliver_due(&self, app: &App) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut round = 0;
            for &group in app.groups() {
                let transport = app.outbox_transport(group);
                if let Some(transport) = transport {
                    transport
                        .provision(&app.outbound_channels(transport.name()))
                        .await
                        .map_err(|source| crate::error::Error::Transport { source })?;
                }
                let mut publisher = transport.map(|transport| {
                    crate::bridge::Publisher::new(self, &**transport, group).eager()
                });
                loop {
                    let outcome = match &mut publisher {
                        Some(publisher) => publisher.step().await?,
                        None => deliver_round(self, app, group, true).await?,
                    };
                    round += outcome.claimed as u64;
                    if outcome.claimed == 0 && !outcome.full {
                        break;
                    }
                }
            }
            if round == 0 {
                return Ok(total);
            }
            total += round;
        }
    }
}

pub(crate) fn start(store: SqlStore, app: App) -> RelayHandle {
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let workers = store.shared.options.workers_per_group.max(1);
    for &group in app.groups() {
        if let Some(transport) = app.outbox_transport(group) {
            // One publisher per transport and process: the broker keeps a key's order as it
            // receives them.
            tasks.spawn(crate::bridge::publisher(
                store.clone(),
                app.clone(),
                group,
                transport.clone(),
                cancel.clone(),
            ));
            continue;
        }
        for _ in 0..workers {
            tasks.spawn(worker(store.clone(), app.clone(), group, cancel.clone()));
        }
    }
    for inbound in app.inbound() {
        tasks.spawn(crate::bridge::consumer(
            store.clone(),
            inbound,
            cancel.clone(),
        ));
    }
    #[cfg(feature = "postgres")]
    if store.shared.backend == crate::Backend::Postgres {
        tasks.spawn(listen(store.clone(), cancel.clone()));
    }
    tasks.spawn(housekeeping(store, cancel.clone()));
    tracing::info!(target: "inseam::relay", groups = ?app.groups(), workers, "relay started");
    RelayHandle::new(cancel, tasks)
}

/// One claimed delivery (or, read by position, a message with its position as `id`).
#[derive(Clone)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) message_id: String,
    pub(crate) key: Option<String>,
    pub(crate) attempts: i64,
    first_failed_at: Option<i64>,
    pub(crate) name: String,
    version: i64,
    /// Shared with the message handed to a transport, not copied.
    pub(crate) envelope: bytes::Bytes,
}

impl Claimed {
    /// A message read by position: never attempted.
    pub(crate) fn positioned(
        position: i64,
        message_id: String,
        key: Option<String>,
        name: String,
        version: i64,
        envelope: bytes::Bytes,
    ) -> Self {
        Claimed {
            id: position,
            message_id,
            key,
            attempts: 0,
            first_failed_at: None,
            name,
            version,
            envelope,
        }
    }

    fn from_row(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Claimed {
            id: row.try_get(0)?,
            message_id: row.try_get(1)?,
            key: row.try_get(2)?,
            attempts: row.try_get(3)?,
            first_failed_at: row.try_get(4)?,
            name: row.try_get(5)?,
            version: row.try_get(6)?,
            envelope: row.try_get::<Vec<u8>, _>(7)?.into(),
        })
    }
}

/// Why one delivery failed, as the relay records it.
pub(crate) struct Failure {
    permanent: bool,
    /// A broker that did not take a message: the row waits for it however long, and is never
    /// dead-lettered for it.
    waits: bool,
    /// The handler asked to stop its group (`Halt`).
    halt: bool,
    chain: String,
}

impl Failure {
    pub(crate) fn of(error: &(dyn std::error::Error + 'static), permanent: bool) -> Self {
        // PostgreSQL refuses NUL in text: an error that prints one must still be recorded.
        let chain = crate::error::chain(error).replace('\0', "\u{fffd}");
        Failure {
            permanent,
            waits: false,
            halt: false,
            chain,
        }
    }

    /// A broker did not take a message: a transient failure waits for it, a permanent one
    /// (a channel it refuses) is a dead letter at once.
    pub(crate) fn transport(error: &inseam_core::transport::TransportError) -> Self {
        Failure {
            waits: error.transient,
            ..Failure::of(error, !error.transient)
        }
    }

    /// The handler returned `Ok`, then its transaction failed: the inbox insert, the delete
    /// or the commit. Worth retrying, like a handler error.
    fn after_handler(error: crate::error::Error) -> Self {
        Failure::of(&AfterHandler(error), false)
    }

    fn delivery(failure: &DeliveryFailure) -> Self {
        Failure {
            halt: matches!(failure, DeliveryFailure::Halted { .. }),
            ..Failure::of(failure, failure.is_permanent())
        }
    }
}

/// A delivery whose handler returned `Ok` but whose transaction failed.
#[derive(Debug, thiserror::Error)]
#[error("the handler returned Ok, but its delivery's transaction failed")]
struct AfterHandler(#[source] crate::error::Error);

async fn worker(store: SqlStore, app: App, group: &'static str, cancel: CancellationToken) {
    let (store_ref, app) = (&store, &app);
    run_batches(
        store_ref,
        group,
        &cancel,
        "relay batch",
        move || async move {
            let started = std::time::Instant::now();
            let outcome = deliver_round(store_ref, app, group, false).await;
            if matches!(&outcome, Ok(batch) if batch.claimed > 0) {
                crate::metrics::batch(group, started.elapsed());
            }
            outcome
        },
    )
    .await;
}

/// How long a group whose read was held back by a running transaction waits before it reads
/// again, at first (doubling while it stays held back, up to [`HELD_BACK_WAIT_MAX`], for up to
/// [`HELD_BACK_FOR`]).
const HELD_BACK_WAIT: Duration = Duration::from_millis(2);

/// The longest wait between reads held back: about when a read passes a window held back
/// by a running transaction (50 ms).
const HELD_BACK_WAIT_MAX: Duration = Duration::from_millis(50);

/// How long a group held back by one transaction reads again soon, before it leaves the rest
/// to the wake-ups and the poll interval.
const HELD_BACK_FOR: Duration = Duration::from_secs(1);

/// Runs `batch` for `group` until cancelled: again at once while batches come full, else
/// after a local commit's wake-up, the earliest retry due, a short wait when a running
/// transaction held the read back, or the poll interval. What a
/// relay worker and a transport's publisher share.
pub(crate) async fn run_batches<F, Fut>(
    store: &SqlStore,
    group: &'static str,
    cancel: &CancellationToken,
    what: &'static str,
    mut batch: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BatchOutcome>>,
{
    let options = &store.shared.options;
    let mut wake = store.shared.wake.subscribe();
    let mut held_wait = HELD_BACK_WAIT;
    // The transaction the last read was held back by, and since when.
    let mut held: Option<(i64, Instant)> = None;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        wake.borrow_and_update();
        let mut idle_for = options.poll_interval;
        match batch().await {
            Ok(outcome) => {
                if outcome.full || outcome.claimed >= options.batch_size {
                    continue;
                }
                match outcome.held_back {
                    // Mostly another relay's short transaction: read again in a moment. One
                    // that stays open (its rows are read past it after a while) is left to
                    // the wake-ups and the poll interval after a second.
                    Some(by) => {
                        let since = match held {
                            Some((was, since)) if was == by => since,
                            _ => {
                                held_wait = HELD_BACK_WAIT;
                                Instant::now()
                            }
                        };
                        held = Some((by, since));
                        if since.elapsed() < HELD_BACK_FOR {
                            idle_for = idle_for.min(held_wait);
                            held_wait = (held_wait * 2).min(HELD_BACK_WAIT_MAX);
                        }
                    }
                    None => held = None,
                }
                if let Some(at) = outcome.retry_at {
                    let until = Duration::from_micros(
                        u64::try_from(at - micros(store.shared.now())).unwrap_or_default(),
                    );
                    idle_for = idle_for.min(until);
                }
            }
            Err(error) => {
                tracing::warn!(
                    target: "inseam::relay",
                    group,
                    error = &error as &dyn std::error::Error,
                    "{what} failed; trying again after the poll interval"
                );
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = wake.changed() => {}
            () = tokio::time::sleep(idle_for) => {}
        }
    }
    tracing::debug!(target: "inseam::relay", group, "{what} stopped");
}

pub(crate) struct BatchOutcome {
    /// Messages handled (or turned into delivery rows).
    pub(crate) claimed: usize,
    /// Whether the batch came full, so there may be more at once (reading by position, rows
    /// the group had already count here but not in `claimed`).
    pub(crate) full: bool,
    /// The earliest retry this batch scheduled (micros).
    pub(crate) retry_at: Option<i64>,
    /// PostgreSQL, reading by position: the id of a transaction older than the read's own
    /// that was running, so that messages committed since may lie past the window the read
    /// could open. No wake-up comes when that transaction ends (it need not write to the
    /// outbox): the batch is tried again soon rather than after the poll interval.
    pub(crate) held_back: Option<i64>,
}

impl BatchOutcome {
    pub(crate) fn nothing() -> Self {
        BatchOutcome {
            claimed: 0,
            full: false,
            retry_at: None,
            held_back: None,
        }
    }

    /// Both outcomes of one round.
    pub(crate) fn and(self, other: BatchOutcome) -> Self {
        BatchOutcome {
            claimed: self.claimed + other.claimed,
            full: self.full || other.full,
            retry_at: match (self.retry_at, other.retry_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            held_back: self.held_back.or(other.held_back),
        }
    }
}

/// Claims up to `limit` due rows of `group` with ids above `after` (0 for all), in id order.
pub(crate) async fn claim(
    unit: &mut SqlUnitOfWork,
    group: &str,
    now: i64,
    limit: usize,
    after: i64,
) -> Result<Vec<Claimed>> {
    if let Some(plan) = unit.shared.sql.plan_claim.clone() {
        // On a fresh table without statistics PostgreSQL would read every row of the group
        // and sort them; walking the (grp, id) index stops after `limit` rows.
        sqlx::query(AssertSqlSafe(plan))
            .execute(&mut unit.tx)
            .await
            .context("plan the claim")?;
    }
    let sql = unit.shared.sql.claim.clone();
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(group.to_owned())
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(after)
        .fetch_all(&mut unit.tx)
        .await
        .context("claim deliveries")?;
    rows.iter()
        .map(Claimed::from_row)
        .collect::<Result<_, _>>()
        .context("read claimed deliveries")
}

/// One round of a group of this process: a batch read by position, then a batch of delivery
/// rows.
async fn deliver_round(
    store: &SqlStore,
    app: &App,
    group: &'static str,
    eager: bool,
) -> Result<BatchOutcome> {
    let read = crate::position::deliver_batch(store, app, group, eager).await?;
    let claimed = deliver_batch(store, app, group).await?;
    Ok(read.and(claimed))
}

#[tracing::instrument(
    target = "inseam::relay",
    name = "relay_batch",
    skip_all,
    fields(group, claimed)
)]
async fn deliver_batch(store: &SqlStore, app: &App, group: &'static str) -> Result<BatchOutcome> {
    let shared = &store.shared;
    let mut unit = store.begin_unit().await?;
    let now = micros(shared.now());
    let rows = claim(&mut unit, group, now, shared.options.batch_size, 0).await?;
    let rows = key_heads(&mut unit, group, rows, &[], now).await?;
    let claimed = rows.len();
    // A row that failed before goes alone (after this batch, which holds its claim until then):
    // its retries run no other handler, and it fails no batch again. It is the first of its
    // key here (the claim passes no failing row), so the batch and it never share a key.
    let (batch, alone): (Vec<Claimed>, Vec<Claimed>) =
        rows.into_iter().partition(|r| r.attempts == 0);
    if !batch.is_empty() {
        // Deleted up front, still under the claim's plan settings: a failing batch rolls back,
        // and the rows are back.
        let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
        let ids = serde_json::to_string(&ids).unwrap_or_default();
        sqlx::query(AssertSqlSafe(shared.sql.delete_deliveries.clone()))
            .bind(ids)
            .execute(&mut unit.tx)
            .await
            .context("delete claimed rows")?;
    }
    if let Some(unplan) = shared.sql.unplan_claim.clone() {
        sqlx::raw_sql(AssertSqlSafe(unplan))
            .execute(&mut unit.tx)
            .await
            .context("restore the planner settings")?;
    }
    tracing::Span::current().record("claimed", claimed);
    let rows = if batch.is_empty() {
        unit.commit_unit().await.context("end a claim")?;
        alone
    } else if deliver_together(unit, app, group, &batch, now).await? {
        alone
    } else {
        // The batch failed and was rolled back: its rows go one by one, in id order with the
        // rows that go alone anyway.
        let mut rows = batch;
        rows.extend(alone);
        rows.sort_unstable_by_key(|r| r.id);
        rows
    };
    let retry_at = one_by_one(store, app, group, rows).await?;
    Ok(BatchOutcome {
        claimed,
        full: false,
        retry_at,
        held_back: None,
    })
}

/// Runs the handlers of `rows` in `unit`, writes their inbox rows and commits. Returns whether
/// the batch committed; when anything failed (a handler, the inbox insert, the commit), its
/// transaction is over and nothing of it was kept.
pub(crate) async fn deliver_together(
    mut unit: SqlUnitOfWork,
    app: &App,
    group: &'static str,
    rows: &[Claimed],
    now: i64,
) -> Result<bool> {
    let shared = unit.shared.clone();
    let mut notes = Vec::new();
    for row in rows {
        let delivered = match RawEnvelope::from_json(&row.envelope) {
            Ok(raw) => app.deliver(group, &raw, &mut unit).await.is_ok(),
            Err(_) => false,
        };
        if !delivered {
            // Whoever failed is found one by one: a handler can also fail because one before
            // it left the transaction aborted (PostgreSQL) and returned `Ok`.
            rollback_failed_batch(unit, group).await;
            return Ok(false);
        }
        if let Some(note) = unit.take_note() {
            notes.push((row.message_id.as_str(), note));
        }
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
    let ids = serde_json::to_string(&ids).unwrap_or_default();
    // A plain insert: a message this group handled before fails it (and the transaction), and
    // the batch goes one by one, where the inbox is checked before the handler runs.
    let inserted = sqlx::query(AssertSqlSafe(shared.sql.insert_inbox_batch.clone()))
        .bind(group.to_owned())
        .bind(ids)
        .bind(now)
        .execute(&mut unit.tx)
        .await;
    match inserted {
        Ok(done) if done.rows_affected() == rows.len() as u64 => {
            for (message_id, note) in notes {
                if let Err(error) = note_inbox(&mut unit, group, message_id, note).await {
                    tracing::debug!(target: "inseam::relay", group, error = &error as &dyn std::error::Error, "noting a delivery failed; going one by one");
                    rollback_failed_batch(unit, group).await;
                    return Ok(false);
                }
            }
        }
        Ok(_) => {
            rollback_failed_batch(unit, group).await;
            return Ok(false);
        }
        Err(error) => {
            tracing::debug!(target: "inseam::relay", group, error = &error as &dyn std::error::Error, "batch inbox insert failed; going one by one");
            rollback_failed_batch(unit, group).await;
            return Ok(false);
        }
    }
    let wrote = unit.wrote_outbox();
    if let Err(error) = unit.commit_unit().await {
        // A deferred constraint, a serialization failure, a lost connection: the batch is
        // gone (or, when the connection was lost, possibly committed: then its rows are gone
        // and the one-by-one pass finds nothing to do).
        tracing::debug!(target: "inseam::relay", group, error = &error as &dyn std::error::Error, "batch commit failed; going one by one");
        return Ok(false);
    }
    if wrote {
        shared.wake();
    }
    shared
        .stats
        .delivered
        .fetch_add(rows.len() as u64, Ordering::Relaxed);
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    crate::metrics::delivered(group, rows.len());
    Ok(true)
}

/// Rolls back a failed batch. A rollback that fails leaves nothing to keep either (the
/// connection is gone, and with it the transaction): the rows go one by one all the same.
async fn rollback_failed_batch(unit: SqlUnitOfWork, group: &'static str) {
    if let Err(error) = unit.rollback_unit().await {
        tracing::debug!(target: "inseam::relay", group, error = &error as &dyn std::error::Error, "rolling back a failed batch failed");
    }
}

/// Delivers `rows` one by one, each in its own transaction, skipping the rows of a key once
/// one of its rows failed. Returns the earliest retry scheduled.
pub(crate) async fn one_by_one(
    store: &SqlStore,
    app: &App,
    group: &'static str,
    rows: Vec<Claimed>,
) -> Result<Option<i64>> {
    let mut blocked: HashSet<String> = HashSet::new();
    let mut retry_at: Option<i64> = None;
    for row in rows {
        if let Some(key) = &row.key
            && blocked.contains(key)
        {
            continue;
        }
        if let One::Failed { retry_at: at } = deliver_one(store, app, group, row.id).await? {
            if let Some(key) = row.key {
                blocked.insert(key);
            }
            if let Some(at) = at {
                retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
            }
        }
    }
    Ok(retry_at)
}

/// Keeps, for every key of the batch, only the rows that come before any row of that key this
/// batch does not hold (a row another relay holds, or one that became visible meanwhile), so
/// that a key is never delivered past an earlier row. SQLite has one writer at a time, so its
/// batches are already key prefixes.
/// Keeps of `rows` the prefix of each key that nothing holds back: a due or failing row of
/// a key stops the batch's later rows of that key, unless the batch has it or it is one of
/// the rows this relay holds `in_flight` (claimed earlier, not yet settled).
///
/// On PostgreSQL such a row is one another relay claimed (locked, so the claim skipped it).
/// On SQLite the claim is the only one and sees every row, so the check is needed only for
/// a claim that started past the rows in flight (the transport publisher's): it must not
/// pass a row below them that was left behind, and take a later row of its key.
pub(crate) async fn key_heads(
    unit: &mut SqlUnitOfWork,
    group: &str,
    rows: Vec<Claimed>,
    in_flight: &[i64],
    now: i64,
) -> Result<Vec<Claimed>> {
    if unit.shared.backend == crate::Backend::Sqlite && in_flight.is_empty() {
        return Ok(rows);
    }
    let sql = unit.shared.sql.key_rows.clone();
    let mut keys: Vec<&str> = rows.iter().filter_map(|r| r.key.as_deref()).collect();
    if keys.is_empty() {
        return Ok(rows);
    }
    keys.sort_unstable();
    keys.dedup();
    let max_id = rows.iter().map(|r| r.id).max().unwrap_or_default();
    let ours: HashSet<i64> = rows
        .iter()
        .map(|r| r.id)
        .chain(in_flight.iter().copied())
        .collect();
    let visible = sqlx::query(AssertSqlSafe(sql))
        .bind(group.to_owned())
        .bind(max_id)
        .bind(serde_json::to_string(&keys).unwrap_or_default())
        .bind(now)
        .fetch_all(&mut unit.tx)
        .await
        .context("check the order of keys")?;
    // The first id of each key this batch must not go past.
    let mut stop: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for row in &visible {
        let id: i64 = row.try_get(0).context("check the order of keys")?;
        let key: String = row.try_get(1).context("check the order of keys")?;
        if !ours.contains(&id) {
            let first = stop.entry(key).or_insert(id);
            *first = (*first).min(id);
        }
    }
    if stop.is_empty() {
        return Ok(rows);
    }
    Ok(rows
        .into_iter()
        .filter(
            |r| match (&r.key, r.key.as_ref().and_then(|k| stop.get(k))) {
                (Some(_), Some(&limit)) => r.id < limit,
                _ => true,
            },
        )
        .collect())
}

async fn insert_inbox(
    unit: &mut SqlUnitOfWork,
    group: &str,
    message_ids: &[&str],
    now: i64,
) -> Result<u64> {
    let ids = serde_json::to_string(message_ids).unwrap_or_default();
    let done = sqlx::query(AssertSqlSafe(unit.shared.sql.insert_inbox.clone()))
        .bind(group.to_owned())
        .bind(ids)
        .bind(now)
        .execute(&mut unit.tx)
        .await
        .context("write the inbox")?;
    Ok(done.rows_affected())
}

enum One {
    Delivered,
    Duplicate,
    Gone,
    Failed { retry_at: Option<i64> },
}

const SAVEPOINT: &str = "SAVEPOINT inseam_delivery";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT inseam_delivery";

async fn deliver_one(store: &SqlStore, app: &App, group: &'static str, id: i64) -> Result<One> {
    let shared = &store.shared;
    let mut unit = store.begin_unit().await?;
    let now = micros(shared.now());
    let Some(row) = claim_one(&mut unit, group, now, id).await? else {
        unit.rollback_unit().await.context("release a claim")?;
        return Ok(One::Gone);
    };
    let row = Claimed::from_row(&row).context("read a claimed delivery")?;
    let seen: i64 = sqlx::query(AssertSqlSafe(shared.sql.in_inbox.clone()))
        .bind(group.to_owned())
        .bind(row.message_id.clone())
        .fetch_one(&mut unit.tx)
        .await
        .and_then(|r| r.try_get(0))
        .context("check the inbox")?;
    if seen > 0 {
        delete_delivery(&mut unit, row.id).await?;
        unit.commit_unit().await.context("skip a duplicate")?;
        shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        crate::metrics::duplicate(group);
        tracing::info!(target: "inseam::relay", group, message_id = %row.message_id, "redelivery skipped: already in the inbox");
        return Ok(One::Duplicate);
    }
    sqlx::query(SAVEPOINT)
        .execute(&mut unit.tx)
        .await
        .context("set a savepoint")?;
    let failure = match RawEnvelope::from_json(&row.envelope) {
        Ok(raw) => match app.deliver(group, &raw, &mut unit).await {
            Ok(()) => None,
            Err(failure) => Some(Failure::delivery(&failure)),
        },
        Err(error) => Some(Failure::of(&error, true)),
    };
    let failure = match failure {
        Some(failure) => failure,
        None => match finish(&mut unit, group, &row, now).await {
            Ok(()) => {
                let wrote = unit.wrote_outbox();
                if let Err(error) = unit.commit_unit().await {
                    // The transaction that held the claim is gone: record the attempt in one
                    // of its own.
                    let failure = Failure::after_handler(crate::error::Error::Database {
                        operation: "commit a delivery",
                        source: error,
                    });
                    return settle_anew(store, group, &row, &failure, now).await;
                }
                if wrote {
                    shared.wake();
                }
                shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
                crate::metrics::delivered(group, 1);
                return Ok(One::Delivered);
            }
            // Refused after the handler returned `Ok` (PostgreSQL refuses everything in a
            // transaction a handler left aborted): a failure like the handler's own.
            Err(error) => Failure::after_handler(error),
        },
    };
    // Undo the handler's effects (and its deferred checks) but keep the claim, then record
    // the failure.
    if sqlx::query(ROLLBACK_TO).execute(&mut unit.tx).await.is_ok() {
        match settle(unit, group, &row, &failure, now).await {
            Ok(retry_at) => return Ok(One::Failed { retry_at }),
            Err(error) => {
                tracing::debug!(target: "inseam::relay", group, message_id = %row.message_id, error = &error as &dyn std::error::Error, "recording a failed delivery failed; recording it anew");
            }
        }
    } else {
        // The connection is in no state to go on (a handler left it mid-query, or it is
        // lost): start over.
        if let Err(error) = unit.rollback_unit().await {
            tracing::debug!(target: "inseam::relay", group, error = &error as &dyn std::error::Error, "rolling back a failed delivery failed");
        }
    }
    settle_anew(store, group, &row, &failure, now).await
}

/// What follows a handler that returned `Ok`: the inbox row, and the delivery row deleted.
async fn finish(unit: &mut SqlUnitOfWork, group: &str, row: &Claimed, now: i64) -> Result<()> {
    insert_inbox(unit, group, &[&row.message_id], now).await?;
    if let Some(note) = unit.take_note() {
        note_inbox(unit, group, &row.message_id, note).await?;
    }
    delete_delivery(unit, row.id).await
}

/// Keeps, with a delivery's inbox row, why it was not needed.
async fn note_inbox(
    unit: &mut SqlUnitOfWork,
    group: &str,
    message_id: &str,
    note: &str,
) -> Result<()> {
    sqlx::query(AssertSqlSafe(unit.shared.sql.note_inbox.clone()))
        .bind(group.to_owned())
        .bind(message_id.to_owned())
        .bind(note.to_owned())
        .execute(&mut unit.tx)
        .await
        .context("note why a delivery was not needed")?;
    Ok(())
}

/// Records `failure` of `row` in `unit`, which holds the row's claim: a retry or a dead letter,
/// and the group stopped when the handler asked for it; then commits. Returns when the retry
/// is due.
async fn settle(
    mut unit: SqlUnitOfWork,
    group: &'static str,
    row: &Claimed,
    failure: &Failure,
    now: i64,
) -> Result<Option<i64>> {
    let shared = unit.shared.clone();
    let retry_at = record_failure(&mut unit, group, row, failure, now).await?;
    if failure.halt {
        // Stopped with the failure recorded, atomically: nothing past it is delivered.
        sqlx::query(AssertSqlSafe(shared.sql.pause.clone()))
            .bind(group)
            .bind(format!("stopped on an error: {}", failure.chain))
            .bind(now)
            .execute(&mut unit.tx)
            .await
            .context("stop a group")?;
    }
    unit.commit_unit()
        .await
        .context("record a failed delivery")?;
    match retry_at {
        Some(_) => {
            shared.stats.retried.fetch_add(1, Ordering::Relaxed);
            crate::metrics::retried(group);
        }
        None => {
            shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            crate::metrics::dead_lettered(group);
        }
    }
    if failure.halt {
        tracing::error!(target: "inseam::relay", group, error = %failure.chain, "group stopped; resume it with `store.resume(..)` once fixed");
    }
    Ok(retry_at)
}

/// Records `failure` of `row` once the transaction that held its claim is gone (its commit
/// failed, or its connection): in a short transaction that claims the row again, if it is
/// still there, due, first of its key and unchanged. When another relay delivered it, holds
/// it, or recorded an attempt of its own meanwhile, this attempt is not counted (`Gone`).
async fn settle_anew(
    store: &SqlStore,
    group: &'static str,
    seen: &Claimed,
    failure: &Failure,
    now: i64,
) -> Result<One> {
    let shared = &store.shared;
    let mut wait = Duration::from_millis(10);
    loop {
        let mut unit = store.begin_unit().await?;
        if let Some(row) = claim_one(&mut unit, group, now, seen.id).await? {
            let row = Claimed::from_row(&row).context("read a claimed delivery")?;
            if row.attempts != seen.attempts {
                unit.rollback_unit().await.context("release a claim")?;
                return Ok(One::Gone);
            }
            let retry_at = settle(unit, group, &row, failure, now).await?;
            return Ok(One::Failed { retry_at });
        }
        // Not claimable: delivered after all (a lost connection may have taken the answer of
        // a commit that went through), held by another relay, or, on PostgreSQL, still locked
        // by the failed transaction itself: a backend whose connection failed ends its
        // transaction a moment after the client learns of it. Worth a few short waits.
        let delivered: i64 = sqlx::query(AssertSqlSafe(shared.sql.in_inbox.clone()))
            .bind(group.to_owned())
            .bind(seen.message_id.clone())
            .fetch_one(&mut unit.tx)
            .await
            .and_then(|r| r.try_get(0))
            .context("check the inbox")?;
        unit.rollback_unit().await.context("release a claim")?;
        if delivered > 0 || shared.backend != crate::Backend::Postgres || wait > SETTLE_WAIT {
            return Ok(One::Gone);
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}

/// How long a failed attempt waits, at most, for the lock of its own failed transaction
/// (doubling from 10 ms: 10 + 20 + .. + 320 = 630 ms in all).
const SETTLE_WAIT: Duration = Duration::from_millis(320);

/// Claims one row by id, if it is still there, due and first of its key.
async fn claim_one(
    unit: &mut SqlUnitOfWork,
    group: &str,
    now: i64,
    id: i64,
) -> Result<Option<sqlx::any::AnyRow>> {
    sqlx::query(AssertSqlSafe(unit.shared.sql.claim_one.clone()))
        .bind(group.to_owned())
        .bind(now)
        .bind(id)
        .fetch_optional(&mut unit.tx)
        .await
        .context("claim a delivery")
}

async fn delete_delivery(unit: &mut SqlUnitOfWork, id: i64) -> Result<()> {
    sqlx::query(AssertSqlSafe(unit.shared.sql.delete_delivery.clone()))
        .bind(id)
        .execute(&mut unit.tx)
        .await
        .context("delete a delivered row")?;
    Ok(())
}

/// The longest a message waits between two attempts to hand it to a broker that refused it:
/// short, so that a broker back from an outage gets the backlog soon.
const TRANSPORT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Schedules a retry or moves the row to the dead letters. Returns when the retry is due
/// (`None`: dead-lettered).
pub(crate) async fn record_failure(
    unit: &mut SqlUnitOfWork,
    group: &'static str,
    row: &Claimed,
    failure: &Failure,
    now: i64,
) -> Result<Option<i64>> {
    let shared = unit.shared.clone();
    let options = &shared.options;
    let attempts = row.attempts + 1;
    let max = i64::from(options.max_attempts.max(1));
    if failure.permanent || (attempts >= max && !failure.waits) {
        sqlx::query(AssertSqlSafe(shared.sql.insert_dead_letter.clone()))
            .bind(group.to_owned())
            .bind(row.message_id.clone())
            .bind(row.name.clone())
            .bind(row.version)
            .bind(row.key.clone())
            .bind(row.envelope.to_vec())
            .bind(failure.chain.clone())
            .bind(attempts)
            .bind(row.first_failed_at.unwrap_or(now))
            .bind(now)
            .execute(&mut unit.tx)
            .await
            .context("write a dead letter")?;
        delete_delivery(unit, row.id).await?;
        tracing::error!(
            target: "inseam::relay",
            group,
            message_id = %row.message_id,
            event = %row.name,
            version = row.version,
            attempts,
            permanent = failure.permanent,
            error = %failure.chain,
            "delivery dead-lettered"
        );
        return Ok(None);
    }
    let cap = if failure.waits {
        options.backoff_max.min(TRANSPORT_BACKOFF_MAX)
    } else {
        options.backoff_max
    };
    let delay = backoff(options.backoff_base, cap, attempts);
    let at = now.saturating_add(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX));
    sqlx::query(AssertSqlSafe(shared.sql.retry_later.clone()))
        .bind(row.id)
        .bind(attempts)
        .bind(at)
        .bind(failure.chain.clone())
        .bind(now)
        .execute(&mut unit.tx)
        .await
        .context("schedule a retry")?;
    tracing::warn!(
        target: "inseam::relay",
        group,
        message_id = %row.message_id,
        event = %row.name,
        attempts,
        retry_in_ms = delay.as_millis() as u64,
        error = %failure.chain,
        "delivery failed; will retry"
    );
    Ok(Some(at))
}

/// Exponential backoff with jitter: `base * 2^(attempts-1)`, capped at `max`, then scaled by a
/// random factor in [0.5, 1) so that failing consumers do not retry in lockstep.
pub(crate) fn backoff(base: Duration, max: Duration, attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let full = base.saturating_mul(1u32 << exponent).min(max);
    full.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(feature = "postgres")]
async fn listen(store: SqlStore, cancel: CancellationToken) {
    let shared = &store.shared;
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect(&shared.url).await?;
            listener.listen(&shared.sql.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = cancel.cancelled() => return,
            listener = listener => match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(target: "inseam::relay", error = &error as &dyn std::error::Error, "LISTEN failed; polling meanwhile");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                notification = listener.recv() => match notification {
                    Ok(_) => shared.wake(),
                    Err(error) => {
                        tracing::warn!(target: "inseam::relay", error = &error as &dyn std::error::Error, "LISTEN connection lost");
                        break;
                    }
                },
            }
        }
    }
}

async fn housekeeping(store: SqlStore, cancel: CancellationToken) {
    let interval = store.shared.options.housekeeping_interval;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match store.prune().await {
            Ok(pruned) if pruned.outbox + pruned.inbox > 0 => {
                tracing::debug!(target: "inseam::relay", outbox = pruned.outbox, inbox = pruned.inbox, "pruned");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(target: "inseam::relay", error = &error as &dyn std::error::Error, "pruning failed");
            }
        }
        match store.lag().await {
            Ok(lag) => {
                for group in &lag.groups {
                    tracing::info!(
                        target: "inseam::relay",
                        group = %group.group,
                        pending = group.pending,
                        oldest_age_ms = group.oldest_age.map(|a| a.as_millis() as u64),
                        "lag"
                    );
                }
                tracing::info!(target: "inseam::relay", dead_letters = lag.dead_letters, "dead letter depth");
            }
            Err(error) => {
                tracing::warn!(target: "inseam::relay", error = &error as &dyn std::error::Error, "lag query failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempts in 1..=8 {
            let full = (base * (1 << (attempts - 1))).min(max);
            let d = backoff(base, max, attempts);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempts}: {d:?} vs {full:?}"
            );
        }
    }
}
