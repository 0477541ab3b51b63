//! A command's unit of work, which begins a transaction only when it needs one, and (on
//! PostgreSQL) the group commit that writes the outbox rows of those that never did.
//!
//! On SQLite the transaction is what holds the database's single write lock, so deferring it
//! is what lets a command that is merely slow between loading and saving leave the others
//! alone: reads run without the lock, and a unit that never asked for its transaction takes
//! the lock only for the short transaction that writes its rows at commit. Two commands that
//! loaded the same stream then meet in a stream [`Conflict`](inseam_core::Conflict), as on
//! PostgreSQL.
//!
//! Most event-sourced commands read a stream, decide, and append: nothing in that needs an
//! explicit transaction. The stream is read with a plain query (under PostgreSQL's default
//! isolation a read inside a transaction sees no more than one outside it), and the appended
//! rows are written at commit by a single statement, which PostgreSQL commits on its own:
//! atomic for all the rows of the unit of work, and checked by the unique stream position like
//! any append. Units of work that commit at the same time share that statement, and so one WAL
//! flush, instead of paying one each (group commit). A unit of work whose handler asks for the
//! transaction (`ctx.tx()`), or that stores a snapshot or a saga's state, begins one at that
//! point and from then on behaves exactly like [`SqlUnitOfWork`].

use std::any::Any as StdAny;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use inseam_core::store::{
    AppendError, OutboxMessage, ProcessState, Snapshot, StoreError, StoredEvent, UnitOfWork,
};
use sqlx::AssertSqlSafe;

use crate::conn::SqlTx;
use tokio::sync::oneshot;

use crate::error::{Context as _, Error, Result};
use crate::sql::Backend;
use crate::store::{OutboxRow, Shared, SqlUnitOfWork, begin_unit, conflict_or, micros};

/// Most outbox rows one group-commit statement writes (PostgreSQL allows 65,535 parameters, 11
/// per row); a unit of work with more is committed in a transaction of its own.
const MAX_ROWS: usize = 1_000;

/// A unit of work that begins its transaction when first needed; see the module
/// documentation. [`Transactional::tx`](crate::Transactional::tx) begins it.
pub struct DeferredUnitOfWork {
    shared: Arc<Shared>,
    /// The transaction, once begun.
    unit: Option<SqlUnitOfWork>,
    /// Rows appended before a transaction began: written at commit, or into the transaction
    /// when one begins.
    pending: Vec<OutboxMessage>,
    /// Set when moving `pending` into a new transaction failed: the unit of work cannot commit.
    broken: bool,
}

impl fmt::Debug for DeferredUnitOfWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredUnitOfWork")
            .field("in_transaction", &self.unit.is_some())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl DeferredUnitOfWork {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        DeferredUnitOfWork {
            shared,
            unit: None,
            pending: Vec::new(),
            broken: false,
        }
    }

    /// The transaction's connection, for the handler's own SQL; begins the transaction (and
    /// moves the rows appended so far into it) if it has not begun.
    pub async fn connection(&mut self) -> Result<&mut SqlTx> {
        Ok(self.transaction().await?.connection())
    }

    async fn transaction(&mut self) -> Result<&mut SqlUnitOfWork> {
        let unit = match self.unit.take() {
            Some(unit) => unit,
            None => {
                let mut unit = begin_unit(&self.shared).await?;
                if !self.pending.is_empty() {
                    let pending = std::mem::take(&mut self.pending);
                    if let Err(error) = unit.write(pending).await {
                        self.broken = true;
                        return Err(error);
                    }
                }
                unit
            }
        };
        Ok(self.unit.insert(unit))
    }

    async fn transaction_for(
        &mut self,
        operation: &'static str,
    ) -> Result<&mut SqlUnitOfWork, StoreError> {
        self.transaction()
            .await
            .map_err(|error| error.into_store(operation))
    }
}

impl UnitOfWork for DeferredUnitOfWork {
    fn append<'a>(
        &'a mut self,
        messages: Vec<OutboxMessage>,
    ) -> BoxFuture<'a, Result<(), AppendError>> {
        Box::pin(async move {
            match &mut self.unit {
                Some(unit) => unit.append(messages).await,
                None => {
                    self.pending.extend(messages);
                    Ok(())
                }
            }
        })
    }

    fn read_stream<'a>(
        &'a mut self,
        stream: &'a str,
        after: u64,
        as_of: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(async move {
            if let Some(unit) = &mut self.unit {
                return unit.read_stream(stream, after, as_of).await;
            }
            let mut conn = self
                .shared
                .pool
                .acquire()
                .await
                .map_err(|e| StoreError::new("read a stream", e))?;
            crate::store::read_stream(&self.shared, &mut conn, stream, after, as_of).await
        })
    }

    fn load_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>> {
        Box::pin(async move {
            if let Some(unit) = &mut self.unit {
                return unit.load_snapshot(stream).await;
            }
            let mut conn = self
                .shared
                .pool
                .acquire()
                .await
                .map_err(|e| StoreError::new("load a snapshot", e))?;
            crate::store::load_snapshot(&self.shared, &mut conn, stream).await
        })
    }

    fn save_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
        snapshot: Snapshot,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let unit = self.transaction_for("save a snapshot").await?;
            unit.save_snapshot(stream, snapshot).await
        })
    }

    fn load_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProcessState>, StoreError>> {
        Box::pin(async move {
            let unit = self.transaction_for("load a process").await?;
            unit.load_process(kind, id).await
        })
    }

    fn save_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        state: ProcessState,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let unit = self.transaction_for("save a process").await?;
            unit.save_process(kind, id, state).await
        })
    }

    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), AppendError>> {
        Box::pin(async move {
            let DeferredUnitOfWork {
                shared,
                unit,
                pending,
                broken,
            } = *self;
            if broken {
                return Err(AppendError::Store(StoreError::new(
                    "commit",
                    "writing this unit of work's outbox rows into its transaction failed; nothing was committed",
                )));
            }
            if let Some(unit) = unit {
                return Box::new(unit).commit().await;
            }
            if pending.is_empty() {
                return Ok(());
            }
            // SQLite: one writer, no round trips, and a commit that does not wait for a flush:
            // a short transaction of its own, holding the write lock only while it writes.
            // PostgreSQL: one statement, shared with the units committing at the same time,
            // unless the unit has more rows than one statement may bind.
            let committed = if shared.backend == Backend::Sqlite || pending.len() > MAX_ROWS {
                commit_alone(&shared, pending).await
            } else {
                group_commit(&shared, pending).await
            };
            committed.map_err(|error| match error {
                Error::Conflict(conflict) => AppendError::Conflict(conflict),
                other => AppendError::Store(other.into_store("write the outbox")),
            })
        })
    }

    fn savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A nested command begins the transaction: a savepoint needs one, and the rows held
        // so far then sit before it, where undoing the nested command leaves them.
        Box::pin(async move {
            let unit = self
                .transaction_for("begin a transaction for a nested command")
                .await?;
            unit.savepoint().await
        })
    }

    fn release_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let unit = self.transaction_for("release a savepoint").await?;
            unit.release_savepoint().await
        })
    }

    fn rollback_to_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let unit = self.transaction_for("roll back a nested command").await?;
            unit.rollback_to_savepoint().await
        })
    }

    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            match self.unit {
                Some(unit) => Box::new(unit).rollback().await,
                // Nothing was written.
                None => Ok(()),
            }
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn StdAny {
        self
    }
}

/// The units of work waiting for the group commit.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    queue: Mutex<Queue>,
    /// Held by the caller that writes the next batch.
    turn: tokio::sync::Mutex<()>,
    statements: AtomicU64,
    units: AtomicU64,
    split: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Waiting>,
    next_id: u64,
}

/// What the group commit of a PostgreSQL store did since it connected: how many commands'
/// outbox rows were committed without an explicit transaction, in how many statements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Statements that committed outbox rows of one or more units of work.
    pub statements: u64,
    /// Units of work (commands, `App::schedule`, ...) committed by those statements.
    pub units: u64,
    /// Shared statements that the database refused (a stream conflict, most often) and whose
    /// units of work were then written in smaller groups.
    pub split: u64,
}

impl GroupCommit {
    pub(crate) fn stats(&self) -> CommitStats {
        CommitStats {
            statements: self.statements.load(Ordering::Relaxed),
            units: self.units.load(Ordering::Relaxed),
            split: self.split.load(Ordering::Relaxed),
        }
    }

    fn committed(&self, units: usize) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.units.fetch_add(units as u64, Ordering::Relaxed);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `messages`; returns the entry's id.
    fn push(&self, messages: Vec<OutboxMessage>, done: oneshot::Sender<Result<()>>) -> u64 {
        let mut queue = self.queue();
        let id = queue.next_id;
        queue.next_id += 1;
        queue.waiting.push(Waiting { id, messages, done });
        id
    }

    /// Takes the next batch: whole units of work, at most [`MAX_ROWS`] rows. Entries whose
    /// caller has gone are dropped: their command was never acknowledged, and must not commit
    /// later with someone else's statement.
    fn next_batch(&self) -> Vec<Waiting> {
        let mut queue = self.queue();
        queue.waiting.retain(|waiting| !waiting.done.is_closed());
        let mut rows = 0;
        let mut take = 0;
        for waiting in &queue.waiting {
            if take > 0 && rows + waiting.messages.len() > MAX_ROWS {
                break;
            }
            rows += waiting.messages.len();
            take += 1;
        }
        queue.waiting.drain(..take).collect()
    }

    /// Removes entry `id` if it is still queued.
    fn withdraw(&self, id: u64) {
        self.queue().waiting.retain(|waiting| waiting.id != id);
    }
}

#[derive(Debug)]
struct Waiting {
    id: u64,
    messages: Vec<OutboxMessage>,
    done: oneshot::Sender<Result<()>>,
}

/// Withdraws a queued entry when the caller that queued it goes away (a timeout, a dropped
/// request) before a statement took it.
struct Withdraw<'g> {
    group: &'g GroupCommit,
    id: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.group.withdraw(self.id);
        }
    }
}

/// Writes `messages` with those of every unit of work committing at the same time, in one
/// statement, and returns this unit's outcome.
///
/// Whoever gets the turn writes everything queued, while those arriving meanwhile queue up for
/// the next statement, so batches grow with the load and a lone writer waits for nobody. A
/// statement that carries other units than the caller's runs in a task of its own, so that a
/// caller that goes away never leaves the others without an outcome; a lone writer's runs in
/// the caller. A caller that goes away while its rows are queued withdraws them; once
/// a statement took them, whether they commit is that statement's outcome, as with a commit in
/// flight. A statement that waits (on a lock, for a connection) holds up the units queued
/// behind it until it ends.
async fn group_commit(shared: &Arc<Shared>, messages: Vec<OutboxMessage>) -> Result<()> {
    let group = &shared.group;
    // Nobody queued and no statement in flight: the statement would carry this unit alone, so
    // it runs here instead of in a task. Going away mid-statement then leaves nobody else
    // without an outcome. Those arriving meanwhile queue up behind the turn, as behind any
    // statement.
    if let Ok(turn) = group.turn.try_lock() {
        if group.queue().waiting.is_empty() {
            let all: Vec<&OutboxMessage> = messages.iter().collect();
            let outcome = write_rows(shared, &all).await;
            drop(turn);
            if outcome.is_ok() {
                group.committed(1);
            }
            return outcome;
        }
        drop(turn);
    }
    let (done, mut outcome) = oneshot::channel();
    let mut queued = Withdraw {
        group,
        id: group.push(messages, done),
        armed: true,
    };
    loop {
        tokio::select! {
            biased;
            result = &mut outcome => {
                queued.armed = false;
                return result.unwrap_or(Err(Error::Database {
                    operation: "write the outbox",
                    source: sqlx::Error::WorkerCrashed,
                }));
            }
            turn = group.turn.lock() => {
                let batch = group.next_batch();
                if !batch.is_empty() {
                    // A panic in the task drops the senders: their units get `WorkerCrashed`.
                    let _ = tokio::spawn(write_batch(shared.clone(), batch)).await;
                }
                drop(turn);
            }
        }
    }
}

/// Writes the rows of a unit of work too large for one statement in a transaction of its own.
async fn commit_alone(shared: &Arc<Shared>, messages: Vec<OutboxMessage>) -> Result<()> {
    let mut unit = begin_unit(shared).await?;
    unit.write(messages).await?;
    unit.commit_unit().await.map_err(|source| Error::Database {
        operation: "commit the outbox rows",
        source,
    })
}

/// Writes `batch` in one statement. If the database refuses it (a stream conflict, most
/// often), nothing of it was written: the batch is halved and each half written the same way,
/// so that a conflict fails only the unit of work that caused it while the others still share
/// statements. Any other failure (the connection) leaves unknown whether the statement
/// committed, and is every unit's outcome: nothing is written again.
fn write_batch(shared: Arc<Shared>, batch: Vec<Waiting>) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let all: Vec<&OutboxMessage> = batch.iter().flat_map(|w| &w.messages).collect();
        let outcome = write_rows(&shared, &all).await;
        drop(all);
        match outcome {
            Ok(()) => {
                shared.group.committed(batch.len());
                for waiting in batch {
                    let _ = waiting.done.send(Ok(()));
                }
            }
            Err(error) if batch.len() == 1 => {
                if let Some(waiting) = batch.into_iter().next() {
                    let _ = waiting.done.send(Err(error));
                }
            }
            Err(error) if refused(&error) => {
                shared.group.split.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    target: "inseam::store",
                    units = batch.len(),
                    error = &error as &dyn std::error::Error,
                    "a group commit was refused; writing its units of work in halves"
                );
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                write_batch(shared.clone(), first).await;
                write_batch(shared, second).await;
            }
            Err(error) => {
                let reason = crate::error::chain(&error);
                for waiting in batch {
                    let _ = waiting.done.send(Err(Error::CommitUnknown {
                        reason: reason.clone(),
                    }));
                }
            }
        }
    })
}

/// Whether the database refused the statement (so nothing of it was written), as opposed to
/// the statement's fate being unknown.
fn refused(error: &Error) -> bool {
    match error {
        Error::Conflict(_) => true,
        Error::Database { source, .. } => source.as_database_error().is_some(),
        _ => false,
    }
}

/// Writes `messages` (with their deliveries and the relays' wake-up) in one statement that
/// commits on its own.
async fn write_rows(shared: &Shared, messages: &[&OutboxMessage]) -> Result<()> {
    let now = micros(shared.now());
    let rows = messages
        .iter()
        .map(|message| OutboxRow::encode(message, now, shared.options.read_by_position))
        .collect::<Result<Vec<_>>>()?;
    // The cursors of the groups reading these rows by position exist before the rows do.
    let cursors = shared.new_cursors(&rows.iter().collect::<Vec<_>>());
    for group in &cursors {
        sqlx::query(AssertSqlSafe(shared.sql.ensure_cursor.clone()))
            .bind(*group)
            .execute(&shared.pool)
            .await
            .context("create a group's cursor")?;
    }
    shared.cursors_made(&cursors);
    let shape = OutboxRow::shape(&rows);
    let sql = shared.sql.write_outbox_rows(rows.len(), shape);
    // A group commit runs on PostgreSQL only: bound natively there, without converting every
    // parameter from `Any`'s.
    #[cfg(feature = "postgres")]
    let written = {
        let pool = shared.pool.pg().context("write the outbox")?;
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in rows {
            query = row.bind_pg(query);
        }
        if shape.wakes() {
            query = query.bind(shared.sql.channel.to_string());
        }
        query.execute(pool).await.map(|_| ())
    };
    #[cfg(not(feature = "postgres"))]
    let written = {
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in rows {
            query = row.bind(query);
        }
        if shape.wakes() {
            query = query.bind(shared.sql.channel.to_string());
        }
        query.execute(&shared.pool).await.map(|_| ())
    };
    written.map_err(|e| conflict_or(e, messages.iter().copied()))
}
