//! The relay: claims due deliveries per group, runs the group's subscriber in the same
//! transaction as the inbox row, retries with backoff and dead-letters what keeps failing.
//!
//! Each group claims its rows in id order, in batches, and handles a whole batch in one
//! transaction: the handlers' effects, one multi-row inbox insert and the deletion of the
//! claimed rows commit together. When anything in a batch fails, the batch is rolled back and
//! its rows are handled one by one, each in its own transaction, so that only the failing
//! message is held back (with its key) and every other one is delivered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
}

impl Counters {
    pub(crate) fn snapshot(&self) -> RelayStats {
        RelayStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
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
                loop {
                    let outcome = deliver_batch(self, app, group).await?;
                    round += outcome.claimed as u64;
                    if outcome.claimed == 0 {
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
        for _ in 0..workers {
            tasks.spawn(worker(store.clone(), app.clone(), group, cancel.clone()));
        }
    }
    #[cfg(feature = "postgres")]
    if store.shared.backend == crate::Backend::Postgres {
        tasks.spawn(listen(store.clone(), cancel.clone()));
    }
    tasks.spawn(housekeeping(store, cancel.clone()));
    tracing::info!(target: "inseam::relay", groups = ?app.groups(), workers, "relay started");
    RelayHandle::new(cancel, tasks)
}

/// One claimed delivery.
struct Claimed {
    id: i64,
    message_id: String,
    key: Option<String>,
    attempts: i64,
    first_failed_at: Option<i64>,
    name: String,
    version: i64,
    envelope: Vec<u8>,
}

impl Claimed {
    fn from_row(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Claimed {
            id: row.try_get(0)?,
            message_id: row.try_get(1)?,
            key: row.try_get(2)?,
            attempts: row.try_get(3)?,
            first_failed_at: row.try_get(4)?,
            name: row.try_get(5)?,
            version: row.try_get(6)?,
            envelope: row.try_get(7)?,
        })
    }
}

/// Why one delivery failed, as the relay records it.
struct Failure {
    permanent: bool,
    /// The handler asked to stop its group (`Halt`).
    halt: bool,
    chain: String,
}

impl Failure {
    fn of(error: &(dyn std::error::Error + 'static), permanent: bool) -> Self {
        let chain = crate::error::chain(error);
        Failure {
            permanent,
            halt: false,
            chain,
        }
    }

    fn delivery(failure: &DeliveryFailure) -> Self {
        Failure {
            halt: matches!(failure, DeliveryFailure::Halted { .. }),
            ..Failure::of(failure, failure.is_permanent())
        }
    }
}

async fn worker(store: SqlStore, app: App, group: &'static str, cancel: CancellationToken) {
    let options = &store.shared.options;
    let mut wake = store.shared.wake.subscribe();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        wake.borrow_and_update();
        let mut idle_for = options.poll_interval;
        match deliver_batch(&store, &app, group).await {
            Ok(outcome) => {
                if outcome.claimed >= options.batch_size {
                    continue;
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
                    "relay batch failed; trying again after the poll interval"
                );
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = wake.changed() => {}
            () = tokio::time::sleep(idle_for) => {}
        }
    }
    tracing::debug!(target: "inseam::relay", group, "relay worker stopped");
}

struct BatchOutcome {
    claimed: usize,
    /// The earliest retry this batch scheduled (micros).
    retry_at: Option<i64>,
}

async fn claim(
    unit: &mut SqlUnitOfWork,
    group: &str,
    now: i64,
    limit: usize,
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
        .fetch_all(&mut unit.tx)
        .await
        .context("claim deliveries")?;
    rows.iter()
        .map(Claimed::from_row)
        .collect::<Result<_, _>>()
        .context("read claimed deliveries")
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
    let rows = claim(&mut unit, group, now, shared.options.batch_size).await?;
    let rows = key_heads(&mut unit, group, rows, now).await?;
    if !rows.is_empty() {
        // Deleted up front, still under the claim's plan settings: a failing batch rolls back,
        // and the rows are back.
        let claimed: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let claimed = serde_json::to_string(&claimed).unwrap_or_default();
        sqlx::query(AssertSqlSafe(shared.sql.delete_deliveries.clone()))
            .bind(claimed)
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
    tracing::Span::current().record("claimed", rows.len());
    if rows.is_empty() {
        unit.commit_unit().await.context("end an empty claim")?;
        return Ok(BatchOutcome {
            claimed: 0,
            retry_at: None,
        });
    }
    let mut failed = false;
    let mut notes = Vec::new();
    for row in &rows {
        let delivered = match RawEnvelope::from_json(&row.envelope) {
            Ok(raw) => app.deliver(group, &raw, &mut unit).await.is_ok(),
            Err(_) => false,
        };
        if !delivered {
            failed = true;
            break;
        }
        if let Some(note) = unit.take_note() {
            notes.push((row.message_id.as_str(), note));
        }
    }
    if !failed {
        let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
        let ids = serde_json::to_string(&ids).unwrap_or_default();
        // A plain insert: a message this group handled before fails it (and the transaction),
        // and the batch goes one by one, where the inbox is checked before the handler runs.
        let inserted = sqlx::query(AssertSqlSafe(shared.sql.insert_inbox_batch.clone()))
            .bind(group.to_owned())
            .bind(ids)
            .bind(now)
            .execute(&mut unit.tx)
            .await;
        if let Err(error) = &inserted {
            tracing::debug!(target: "inseam::relay", group, error = error as &dyn std::error::Error, "batch inbox insert failed; going one by one");
        }
        if inserted.is_ok_and(|done| done.rows_affected() == rows.len() as u64) {
            for (message_id, note) in notes {
                note_inbox(&mut unit, group, message_id, note).await?;
            }
            let wrote = unit.wrote_outbox();
            unit.commit_unit()
                .await
                .context("commit a delivered batch")?;
            if wrote {
                shared.wake();
            }
            shared
                .stats
                .delivered
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            shared.stats.batches.fetch_add(1, Ordering::Relaxed);
            return Ok(BatchOutcome {
                claimed: rows.len(),
                retry_at: None,
            });
        }
    }
    unit.rollback_unit()
        .await
        .context("roll back a failed batch")?;
    let claimed = rows.len();
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
    Ok(BatchOutcome { claimed, retry_at })
}

/// Keeps, for every key of the batch, only the rows that come before any row of that key this
/// batch does not hold (a row another relay holds, or one that became visible meanwhile), so
/// that a key is never delivered past an earlier row. SQLite has one writer at a time, so its
/// batches are already key prefixes.
async fn key_heads(
    unit: &mut SqlUnitOfWork,
    group: &str,
    rows: Vec<Claimed>,
    now: i64,
) -> Result<Vec<Claimed>> {
    let Some(sql) = unit.shared.sql.key_rows.clone() else {
        return Ok(rows);
    };
    let mut keys: Vec<&str> = rows.iter().filter_map(|r| r.key.as_deref()).collect();
    if keys.is_empty() {
        return Ok(rows);
    }
    keys.sort_unstable();
    keys.dedup();
    let max_id = rows.iter().map(|r| r.id).max().unwrap_or_default();
    let ours: HashSet<i64> = rows.iter().map(|r| r.id).collect();
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
    let Some(failure) = failure else {
        insert_inbox(&mut unit, group, &[&row.message_id], now).await?;
        if let Some(note) = unit.take_note() {
            note_inbox(&mut unit, group, &row.message_id, note).await?;
        }
        delete_delivery(&mut unit, row.id).await?;
        let wrote = unit.wrote_outbox();
        unit.commit_unit().await.context("commit a delivery")?;
        if wrote {
            shared.wake();
        }
        shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
        return Ok(One::Delivered);
    };
    // Undo the handler's effects but keep the claim, then record the failure.
    if sqlx::query(ROLLBACK_TO)
        .execute(&mut unit.tx)
        .await
        .is_err()
    {
        // The connection is in no state to go on (a handler left it mid-query): start over.
        drop(unit);
        unit = store.begin_unit().await?;
        if claim_one(&mut unit, group, now, id).await?.is_none() {
            unit.rollback_unit().await.context("release a claim")?;
            return Ok(One::Gone);
        }
    }
    let retry_at = record_failure(&mut unit, group, &row, &failure, now).await?;
    if failure.halt {
        // Stopped with the failure recorded, atomically: nothing past it is delivered.
        sqlx::query(AssertSqlSafe(shared.sql.pause.clone()))
            .bind(group)
            .bind(format!("stopped on an error: {}", failure.chain))
            .bind(now)
            .execute(&mut unit.tx)
            .await
            .context("stop a group")?;
        tracing::error!(target: "inseam::relay", group, error = %failure.chain, "group stopped; resume it with `store.resume(..)` once fixed");
    }
    unit.commit_unit()
        .await
        .context("record a failed delivery")?;
    Ok(One::Failed { retry_at })
}

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

/// Schedules a retry or moves the row to the dead letters. Returns when the retry is due.
async fn record_failure(
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
    if failure.permanent || attempts >= max {
        sqlx::query(AssertSqlSafe(shared.sql.insert_dead_letter.clone()))
            .bind(group.to_owned())
            .bind(row.message_id.clone())
            .bind(row.name.clone())
            .bind(row.version)
            .bind(row.key.clone())
            .bind(row.envelope.clone())
            .bind(failure.chain.clone())
            .bind(attempts)
            .bind(row.first_failed_at.unwrap_or(now))
            .bind(now)
            .execute(&mut unit.tx)
            .await
            .context("write a dead letter")?;
        delete_delivery(unit, row.id).await?;
        shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
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
    let delay = backoff(options.backoff_base, options.backoff_max, attempts);
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
    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
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
