//! Reading the outbox by position (decision 0024): a group's messages delivered from the
//! outbox rows that list it, past the group's cursor, with the cursor moved in the transaction
//! of the handlers' effects.
//!
//! The common case costs one read per batch: no delivery row is written, claimed or deleted.
//! Whatever does not go through at once becomes a delivery row, and from there the row relay
//! (`relay.rs`) takes it with its every rule: a message whose key has a due or failing delivery
//! row waits behind it as a row of its own (parked), and a batch that fails is turned into rows
//! whole, then handled one by one, exactly as a claimed batch that failed.
//!
//! SQLite has one writer at a time, so positions are drawn in commit order and a cursor is one
//! position. PostgreSQL draws positions when rows are inserted but shows them when their
//! transaction commits, in any order; so its cursor reads in windows of transaction ids: the
//! window `[lo, hi)` holds the rows written by transactions with ids in it, and `hi` is the
//! oldest transaction running when the window was opened, so that no row can appear in it
//! later. Within a window, rows go in position order. A transaction that stays open holds the
//! next window back; after [`STUCK`] the cursor also reads the committed rows past its window
//! (early), in position order, and once the window reaches them it skips what the group has
//! handled or holds as a delivery row or a dead letter.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use inseam_core::App;
use inseam_core::transport::{Transport, TransportError};
use sqlx::{AssertSqlSafe, Row as _};

use crate::error::{Context as _, Result};
use crate::relay::{BatchOutcome, Claimed, Failure, deliver_together, one_by_one, record_failure};
use crate::sql::Backend;
use crate::store::{SqlStore, SqlUnitOfWork, micros};

/// How long a window may be held back by a running transaction before the cursor reads the
/// committed rows past it.
const STUCK: Duration = Duration::from_millis(50);

/// How long a failed batch waits, at most, for the cursor its own failed transaction may
/// still hold (doubling from 10 ms, as a failed delivery waits for its row).
const SETTLE_WAIT: Duration = Duration::from_millis(320);

/// A group's place in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// PostgreSQL: rows of transactions below `lo` are done.
    lo: i64,
    /// PostgreSQL: the window is `[lo, hi)`.
    hi: i64,
    /// The last position read (PostgreSQL: within the window).
    pos: i64,
    /// PostgreSQL: the last position read past the window.
    early_pos: i64,
    /// PostgreSQL: the highest transaction id read past the window; a window reaching it
    /// skips what the group has already.
    early_tx: i64,
}

/// Delivers the next batch of `group` read by position. Returns how many rows it read.
/// `eager` reads past a window held back by a running transaction at once (what
/// `deliver_due` wants), rather than after [`STUCK`].
pub(crate) async fn deliver_batch(
    store: &SqlStore,
    app: &App,
    group: &'static str,
    eager: bool,
) -> Result<BatchOutcome> {
    let shared = &store.shared;
    let limit = shared.options.batch_size.max(1);
    let mut unit = store.begin_unit().await?;
    let Some(cursor) = lock(&mut unit, group).await? else {
        unit.rollback_unit().await.context("release a cursor")?;
        return Ok(BatchOutcome::nothing());
    };
    let now = micros(shared.now());
    let Read {
        rows,
        after,
        fetched,
        early,
        held_back,
    } = read(store, &mut unit, group, cursor, limit, eager).await?;
    let full = fetched >= limit;
    let read = rows.len();
    if rows.is_empty() {
        if after != cursor {
            update(&mut unit, group, after).await?;
            unit.commit_unit().await.context("move a cursor")?;
        } else {
            unit.rollback_unit().await.context("release a cursor")?;
        }
        return Ok(BatchOutcome {
            claimed: read,
            full,
            retry_at: None,
            held_back,
        });
    }
    let parked = parked_keys(&mut unit, group, &rows, now).await?;
    let (waiting, batch): (Vec<&Claimed>, Vec<&Claimed>) = rows
        .iter()
        .partition(|r| r.key.as_ref().is_some_and(|k| parked.contains(k)));
    for row in &waiting {
        materialize(&mut unit, group, row, now).await?;
    }
    update(&mut unit, group, after).await?;
    mark_read_ahead(&mut unit, group, &early).await?;
    if batch.is_empty() {
        unit.commit_unit()
            .await
            .context("park messages behind their key")?;
        return Ok(BatchOutcome {
            claimed: read,
            full,
            retry_at: None,
            held_back,
        });
    }
    let batch: Vec<Claimed> = batch.into_iter().cloned().collect();
    if deliver_together(unit, app, group, &batch, now).await? {
        return Ok(BatchOutcome {
            claimed: read,
            full,
            retry_at: None,
            held_back,
        });
    }
    // The batch failed and was rolled back: its messages become delivery rows, in the order
    // read, and go one by one as a claimed batch that failed does.
    let mut wait = Duration::from_millis(10);
    let mut unit = loop {
        let mut unit = store.begin_unit().await?;
        match lock(&mut unit, group).await? {
            Some(now) if now == cursor => break unit,
            Some(_) => {
                // The commit went through after all (a lost connection took its answer).
                unit.rollback_unit().await.context("release a cursor")?;
                return Ok(BatchOutcome::nothing());
            }
            None => {
                // Paused meanwhile, held by another relay, or still locked by the failed
                // transaction itself: a backend whose connection failed ends its transaction
                // a moment after the client learns of it. Worth a few short waits.
                unit.rollback_unit().await.context("release a cursor")?;
                if shared.backend != Backend::Postgres || wait > SETTLE_WAIT {
                    return Ok(BatchOutcome::nothing());
                }
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    };
    let mut rows_now = Vec::with_capacity(batch.len());
    for row in &rows {
        let id = materialize(&mut unit, group, row, now).await?;
        if !row.key.as_ref().is_some_and(|k| parked.contains(k)) {
            let mut row = row.clone();
            row.id = id;
            rows_now.push(row);
        }
    }
    update(&mut unit, group, after).await?;
    mark_read_ahead(&mut unit, group, &early).await?;
    unit.commit_unit()
        .await
        .context("turn a failed batch into delivery rows")?;
    let retry_at = one_by_one(store, app, group, rows_now).await?;
    Ok(BatchOutcome {
        claimed: read,
        full,
        retry_at,
        held_back,
    })
}

/// How long [`publish_batch`] goes on reading the next batch while the broker takes the
/// current one, before it lets the row publisher (retries, parked keys, scheduled messages)
/// take its turn.
const PIPELINE_FOR: Duration = Duration::from_millis(500);

/// Publishes the next batches of transport group `group` read by position to `transport`,
/// reading each next batch while the broker takes the current one, for as long as the batches
/// come full (up to [`PIPELINE_FOR`]). Returns how many rows it read.
///
/// PostgreSQL keeps the cursor locked while the broker answers, so that another relay does
/// not publish the same messages, and reads the next batch in that transaction; each batch's
/// outcome commits with the cursor past it, and the next batch is published only once the
/// cursor is locked again where that commit left it. SQLite has one publisher per transport
/// and process: its reads let the write turn go before publishing, and the cursor moves in a
/// second transaction, which first checks that the cursor did not move (decision 0026). A
/// message the broker did not take becomes a delivery row, its failure recorded: the row
/// publisher retries it, and the key's later messages wait behind it as rows (parked), as do
/// the messages of a key that had a row already. A batch read ahead was checked for parked
/// keys before the batch published meanwhile was recorded: the keys that batch turned into
/// rows are parked too (decision 0026).
pub(crate) async fn publish_batch(
    store: &SqlStore,
    transport: &dyn Transport,
    group: &'static str,
    eager: bool,
) -> Result<BatchOutcome> {
    let shared = &store.shared;
    let limit = shared.options.batch_size.max(1);
    let sqlite = shared.backend == Backend::Sqlite;
    let started = Instant::now();
    let mut unit = store.begin_unit().await?;
    let Some(cursor) = lock(&mut unit, group).await? else {
        unit.rollback_unit().await.context("release a cursor")?;
        return Ok(BatchOutcome::nothing());
    };
    let mut taken = take(store, &mut unit, group, cursor, limit, eager).await?;
    // PostgreSQL: the transaction holding the cursor. SQLite: none while publishing.
    let mut held = if sqlite {
        unit.rollback_unit().await.context("end a read")?;
        None
    } else {
        Some(unit)
    };
    // Keys this call turned into delivery rows: parked for the batches read before that.
    let mut parked_here: HashSet<String> = HashSet::new();
    let mut total = BatchOutcome::nothing();
    loop {
        let Taken {
            cursor,
            read,
            parked,
        } = taken;
        let Read {
            rows,
            after,
            fetched,
            early,
            held_back,
        } = read;
        let full = fetched >= limit;
        total.held_back = held_back;
        if rows.is_empty() && after == cursor {
            if let Some(unit) = held {
                unit.rollback_unit().await.context("release a cursor")?;
            }
            total.full = full;
            return Ok(total);
        }
        let (waiting, batch): (Vec<&Claimed>, Vec<&Claimed>) = rows.iter().partition(|r| {
            r.key
                .as_ref()
                .is_some_and(|k| parked.contains(k) || parked_here.contains(k))
        });
        let messages = crate::bridge::outgoing(batch.iter().copied());
        // A batch with rows read past its window is not read past until it is recorded: the
        // next read would find those rows again, as they are not marked read until then.
        let ahead = full && early.is_empty() && started.elapsed() < PIPELINE_FOR;
        let (outcomes, next) = tokio::join!(
            async {
                if messages.is_empty() {
                    Vec::new()
                } else {
                    transport.publish(&messages).await
                }
            },
            async {
                if !ahead {
                    return Ok::<_, crate::error::Error>(None);
                }
                match held.as_mut() {
                    Some(unit) => take(store, unit, group, after, limit, eager)
                        .await
                        .map(Some),
                    None => {
                        let mut unit = store.begin_unit().await?;
                        let next = take(store, &mut unit, group, after, limit, eager).await;
                        unit.rollback_unit().await.context("end a read")?;
                        next.map(Some)
                    }
                }
            }
        );
        let next: Option<Taken> = next?;
        let mut unit = match held.take() {
            Some(unit) => unit,
            None => {
                let mut unit = store.begin_unit().await?;
                if lock(&mut unit, group).await? != Some(cursor) {
                    // Another publisher of this database moved the cursor meanwhile: what was
                    // published here went twice, and that one records it.
                    unit.rollback_unit().await.context("release a cursor")?;
                    return Ok(total);
                }
                unit
            }
        };
        let now = micros(shared.now());
        for row in &waiting {
            materialize(&mut unit, group, row, now).await?;
            parked_here.extend(row.key.clone());
        }
        let mut sent = 0;
        for (index, row) in batch.iter().enumerate() {
            let missing;
            let error = match outcomes.get(index) {
                Some(Ok(())) => {
                    sent += 1;
                    continue;
                }
                Some(Err(error)) => error,
                None => {
                    missing = TransportError::transient(
                        transport.name(),
                        format!("publish `{}`", row.name),
                        "the transport returned no outcome for this message",
                    );
                    &missing
                }
            };
            let mut row = (*row).clone();
            row.id = materialize(&mut unit, group, &row, now).await?;
            let at =
                record_failure(&mut unit, group, &row, &Failure::transport(error), now).await?;
            parked_here.extend(row.key);
            total.retry_at = match (total.retry_at, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if after != cursor {
            update(&mut unit, group, after).await?;
        }
        mark_read_ahead(&mut unit, group, &early).await?;
        unit.commit_unit()
            .await
            .context("commit what was published")?;
        shared.stats.published(sent);
        crate::metrics::published(transport.name(), sent);
        total.claimed += rows.len();
        total.full = full;
        let Some(next) = next else {
            return Ok(total);
        };
        if !sqlite {
            let mut unit = store.begin_unit().await?;
            if lock(&mut unit, group).await? != Some(after) {
                // Another relay took the cursor (or the group was paused) between the two
                // transactions: the batch read ahead is its to publish.
                unit.rollback_unit().await.context("release a cursor")?;
                return Ok(total);
            }
            held = Some(unit);
        }
        taken = next;
    }
}

/// A batch read by position, not yet published.
struct Taken {
    /// The cursor it was read past.
    cursor: Cursor,
    read: Read,
    /// Its keys that had a due or failing delivery row of the group when it was read.
    parked: HashSet<String>,
}

/// Reads the batch of `group` past `cursor` and checks its keys for delivery rows.
async fn take(
    store: &SqlStore,
    unit: &mut SqlUnitOfWork,
    group: &'static str,
    cursor: Cursor,
    limit: usize,
    eager: bool,
) -> Result<Taken> {
    let read = read(store, unit, group, cursor, limit, eager).await?;
    let now = micros(store.shared.now());
    let parked = parked_keys(unit, group, &read.rows, now).await?;
    Ok(Taken {
        cursor,
        read,
        parked,
    })
}

/// The cursor of `group`, unless the group is paused or (PostgreSQL) another relay holds it.
async fn lock(unit: &mut SqlUnitOfWork, group: &str) -> Result<Option<Cursor>> {
    let row = sqlx::query(AssertSqlSafe(unit.shared.sql.lock_cursor.clone()))
        .bind(group.to_owned())
        .fetch_optional(&mut unit.tx)
        .await
        .context("lock a group's cursor")?;
    let Some(row) = row else { return Ok(None) };
    let get = |i: usize| row.try_get::<i64, _>(i);
    (|| {
        Ok(Cursor {
            lo: get(0)?,
            hi: get(1)?,
            pos: get(2)?,
            early_pos: get(3)?,
            early_tx: get(4)?,
        })
    })()
    .map(Some)
    .context("read a group's cursor")
}

async fn update(unit: &mut SqlUnitOfWork, group: &str, cursor: Cursor) -> Result<()> {
    sqlx::query(AssertSqlSafe(unit.shared.sql.update_cursor.clone()))
        .bind(group.to_owned())
        .bind(cursor.lo)
        .bind(cursor.hi)
        .bind(cursor.pos)
        .bind(cursor.early_pos)
        .bind(cursor.early_tx)
        .execute(&mut unit.tx)
        .await
        .context("move a group's cursor")?;
    Ok(())
}

/// The group as it appears in an outbox row's JSON array of groups.
fn needle(group: &str) -> String {
    serde_json::to_string(group).unwrap_or_else(|_| format!("\"{group}\""))
}

/// A message read by position, and its transaction id (PostgreSQL; 0 on SQLite), from a row of
/// any driver: `Any` for the read past the window, the backend's own for the read by position.
fn from_row<'r, R>(row: &'r R) -> Result<(Claimed, i64), sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let claimed = Claimed::positioned(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get::<Vec<u8>, _>(5)?.into(),
    );
    let tx = if row.len() > 6 { row.try_get(6)? } else { 0 };
    Ok((claimed, tx))
}

/// What one read by position found.
struct Read {
    /// The messages to deliver, in order.
    rows: Vec<Claimed>,
    /// The cursor past them.
    after: Cursor,
    /// How many rows were read (some may have been dropped: the group read them early).
    fetched: usize,
    /// PostgreSQL: the messages read past the window.
    early: Vec<String>,
    /// PostgreSQL: a transaction older than the read's own that was running (see
    /// [`BatchOutcome::held_back`]).
    held_back: Option<i64>,
}

/// Up to `limit` rows of `group` past `cursor`.
async fn read(
    store: &SqlStore,
    unit: &mut SqlUnitOfWork,
    group: &'static str,
    cursor: Cursor,
    limit: usize,
    eager: bool,
) -> Result<Read> {
    let shared = unit.shared.clone();
    let sql = &shared.sql;
    let needle = needle(group);
    if shared.backend == Backend::Sqlite {
        let rows = fetch(unit, &needle, cursor, limit).await?;
        let mut after = cursor;
        if let Some((last, _)) = rows.last() {
            after.pos = last.id;
        }
        if rows.len() < limit
            && let Some(last) = &sql.last_position
        {
            // Nothing else of the group up to the last position written: none can appear
            // below it (one writer at a time).
            let top: Option<i64> = sqlx::query(AssertSqlSafe(last.clone()))
                .fetch_one(&mut unit.tx)
                .await
                .and_then(|r| r.try_get(0))
                .context("read the last position")?;
            after.pos = after.pos.max(top.unwrap_or_default());
        }
        let fetched = rows.len();
        return Ok(Read {
            rows: strip(rows),
            after,
            fetched,
            early: Vec::new(),
            held_back: None,
        });
    }

    let mut current = cursor;
    let mut after = current;
    let raw = fetch(unit, &needle, current, limit).await?;
    let mut fetched = raw.len();
    if let Some((last, _)) = raw.last() {
        after.pos = last.id;
    }
    let mut rows = dedupe(unit, group, current, raw).await?;
    if fetched >= limit {
        return Ok(Read {
            rows: strip(rows),
            after,
            fetched,
            early: Vec::new(),
            held_back: None,
        });
    }
    // The window has nothing more for the group: open the next one, up to the oldest
    // transaction running now.
    // The read's own transaction has an id (it locked the cursor): an older one running may
    // commit rows past the window at any moment, and no wake-up tells when it ends.
    let (oldest, own): (i64, i64) = match &sql.oldest_running {
        Some(statement) => sqlx::query(AssertSqlSafe(statement.clone()))
            .fetch_one(&mut unit.tx)
            .await
            .and_then(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .context("read the oldest running transaction")?,
        None => (current.hi, current.hi),
    };
    // Whether the window the cursor ends in has been read to its end: only then may rows past
    // it go, so that a key's rows in the window come before its rows past it.
    let mut window_done = true;
    let mut early = Vec::new();
    if oldest > current.hi {
        let start: Option<i64> = match &sql.window_start {
            Some(statement) => sqlx::query(AssertSqlSafe(statement.clone()))
                .bind(current.hi)
                .bind(oldest)
                .fetch_one(&mut unit.tx)
                .await
                .and_then(|r| r.try_get(0))
                .context("open a window of the outbox")?,
            None => None,
        };
        // A window without rows stays without: every transaction in it has ended. Its
        // position is then past every row, so that reading it ends at once, rather than walk
        // the position index from the start of the outbox (which took 35–155 ms a read after
        // a backlog of 100,000 events).
        let next = Cursor {
            lo: current.hi,
            hi: oldest,
            pos: start.map_or(i64::MAX, |s| s - 1),
            ..current
        };
        after = next;
        window_done = false;
        if fetched == 0 {
            current = next;
            let raw = fetch(unit, &needle, current, limit).await?;
            fetched = raw.len();
            if let Some((last, _)) = raw.last() {
                after.pos = last.id;
            }
            rows = dedupe(unit, group, current, raw).await?;
            if fetched >= limit {
                return Ok(Read {
                    rows: strip(rows),
                    after,
                    fetched,
                    early: Vec::new(),
                    held_back: None,
                });
            }
            window_done = true;
        }
    }
    if window_done
        && fetched < limit
        && (eager || store.stuck_for(group, after.hi) >= STUCK)
        && let Some(past) = &sql.read_early
    {
        // A running transaction holds the window back: read what committed past it.
        let more = sqlx::query(AssertSqlSafe(past.clone()))
            .bind(needle.clone())
            .bind(group.to_owned())
            .bind(i64::try_from(limit - fetched).unwrap_or(i64::MAX))
            .bind(after.hi)
            .fetch_all(&mut unit.tx)
            .await
            .context("read the outbox past its window")?;
        fetched += more.len();
        early.reserve(more.len());
        for row in &more {
            let (claimed, tx) = from_row(row).context("read the outbox past its window")?;
            after.early_pos = after.early_pos.max(claimed.id);
            after.early_tx = after.early_tx.max(tx);
            early.push(claimed.message_id.clone());
            rows.push((claimed, tx));
        }
    }
    if after.early_tx != 0 && after.early_tx < after.lo {
        // Every row read early is below the window now: nothing left to skip.
        after.early_pos = 0;
        after.early_tx = 0;
    }
    Ok(Read {
        rows: strip(rows),
        after,
        fetched,
        early,
        held_back: (oldest < own).then_some(oldest),
    })
}

/// The group's rows past `c` (PostgreSQL: in its window), in position order.
async fn fetch(
    unit: &mut SqlUnitOfWork,
    needle: &str,
    c: Cursor,
    limit: usize,
) -> Result<Vec<(Claimed, i64)>> {
    let shared = unit.shared.clone();
    let read = AssertSqlSafe(shared.sql.read_position.clone());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // Read with the backend's own driver: through `Any`, every row would first be copied into
    // an `AnyRow` (its values and a description of each column), then decoded from that copy.
    #[cfg(feature = "postgres")]
    if let Ok(conn) = unit.tx.pg() {
        if let Some(plan) = &shared.sql.plan_claim {
            // Walk the position index and stop after `limit` rows. Without these settings, on
            // a table whose statistics do not know the backlog yet (a burst since the last
            // `ANALYZE`), PostgreSQL reads every row past the cursor and sorts them: 31 ms per
            // batch with 30,000 rows past the cursor, growing with the backlog.
            sqlx::query(AssertSqlSafe(plan.clone()))
                .execute(&mut *conn)
                .await
                .context("plan the read by position")?;
        }
        let rows = sqlx::query(read)
            .bind(needle)
            .bind(c.pos)
            .bind(limit)
            .bind(c.lo)
            .bind(c.hi)
            .fetch_all(&mut *conn)
            .await
            .context("read the outbox by position")?;
        if let Some(unplan) = &shared.sql.unplan_claim {
            sqlx::raw_sql(AssertSqlSafe(unplan.clone()))
                .execute(&mut *conn)
                .await
                .context("restore the planner settings")?;
        }
        return decode(&rows);
    }
    #[cfg(feature = "sqlite")]
    if let Ok(conn) = unit.tx.sqlite() {
        let rows = sqlx::query(read)
            .bind(needle)
            .bind(c.pos)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .context("read the outbox by position")?;
        return decode(&rows);
    }
    // Not reached: a transaction is of one of the compiled backends.
    Err(sqlx::Error::Configuration(
        "the transaction is of no backend compiled in".into(),
    ))
    .context("read the outbox by position")
}

/// The messages of the rows of a read by position.
fn decode<R>(rows: &[R]) -> Result<Vec<(Claimed, i64)>>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()
        .context("read the outbox by position")
}

fn strip(rows: Vec<(Claimed, i64)>) -> Vec<Claimed> {
    rows.into_iter().map(|(r, _)| r).collect()
}

/// Drops from `rows` (read in the window of `cursor`) the messages the group read past an
/// earlier window, and forgets them there (in this transaction).
async fn dedupe(
    unit: &mut SqlUnitOfWork,
    group: &str,
    cursor: Cursor,
    rows: Vec<(Claimed, i64)>,
) -> Result<Vec<(Claimed, i64)>> {
    let Some(take) = unit.shared.sql.take_read_ahead.clone() else {
        return Ok(rows);
    };
    if cursor.early_tx < cursor.lo || rows.is_empty() {
        return Ok(rows);
    }
    let ids: Vec<&str> = rows.iter().map(|(r, _)| r.message_id.as_str()).collect();
    let seen = sqlx::query(AssertSqlSafe(take))
        .bind(group.to_owned())
        .bind(serde_json::to_string(&ids).unwrap_or_default())
        .fetch_all(&mut unit.tx)
        .await
        .context("check what a group read early")?;
    let seen: HashSet<String> = seen
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()
        .context("check what a group read early")?;
    Ok(rows
        .into_iter()
        .filter(|(r, _)| !seen.contains(&r.message_id))
        .collect())
}

/// Remembers the messages `group` read past its window, so that it reads them once.
async fn mark_read_ahead(unit: &mut SqlUnitOfWork, group: &str, early: &[String]) -> Result<()> {
    let Some(mark) = unit.shared.sql.mark_read_ahead.clone() else {
        return Ok(());
    };
    if early.is_empty() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(mark))
        .bind(group.to_owned())
        .bind(serde_json::to_string(early).unwrap_or_default())
        .execute(&mut unit.tx)
        .await
        .context("remember what a group read early")?;
    Ok(())
}

/// The keys of `rows` that have a due or failing delivery row of `group`.
async fn parked_keys(
    unit: &mut SqlUnitOfWork,
    group: &str,
    rows: &[Claimed],
    now: i64,
) -> Result<HashSet<String>> {
    let mut keys: Vec<&str> = rows.iter().filter_map(|r| r.key.as_deref()).collect();
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    keys.sort_unstable();
    keys.dedup();
    let found = sqlx::query(AssertSqlSafe(unit.shared.sql.parked_keys.clone()))
        .bind(group.to_owned())
        .bind(serde_json::to_string(&keys).unwrap_or_default())
        .bind(now)
        .fetch_all(&mut unit.tx)
        .await
        .context("check the keys waiting behind a delivery")?;
    found
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()
        .context("check the keys waiting behind a delivery")
}

/// Turns `row` into a delivery row of `group`, due now; returns its id.
async fn materialize(
    unit: &mut SqlUnitOfWork,
    group: &str,
    row: &Claimed,
    now: i64,
) -> Result<i64> {
    sqlx::query(AssertSqlSafe(unit.shared.sql.materialize.clone()))
        .bind(group.to_owned())
        .bind(row.message_id.clone())
        .bind(now)
        .fetch_one(&mut unit.tx)
        .await
        .and_then(|r| r.try_get(0))
        .context("turn a message into a delivery row")
}

impl SqlStore {
    /// How long the window of `group` has ended at `hi` (zero when it just moved).
    fn stuck_for(&self, group: &'static str, hi: i64) -> Duration {
        let mut stuck = self.shared.stuck.lock().unwrap_or_else(|p| p.into_inner());
        let entry = stuck.entry(group).or_insert((hi, Instant::now()));
        if entry.0 != hi {
            *entry = (hi, Instant::now());
        }
        entry.1.elapsed()
    }
}
