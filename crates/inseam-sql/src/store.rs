//! The store: connection pool, schema, units of work and the outbox write.

use std::any::Any as StdAny;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use inseam_core::RawEnvelope;
use inseam_core::store::{
    AppendError, OutboxMessage, ProcessState, RelayHandle, Snapshot, Store, StoreError,
    StoredEvent, UnitOfWork,
};
use inseam_core::{App, Clock, CommandContext, EventContext, SystemClock};
use sqlx::{Any, AssertSqlSafe, Executor, Row as _};
use tokio::sync::watch;

use crate::conn::{SqlPool, SqlTx};
use crate::deferred::DeferredUnitOfWork;
use crate::error::{Context as _, Error, Result};
use crate::sql::{Backend, Statements, migrations, validate_prefix};

/// How the relay and the housekeeping behave. The defaults suit most apps.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Most rows one group claims and handles in one transaction. A batch that fails is
    /// handled again one by one; a row that failed once is delivered alone from then on.
    pub batch_size: usize,
    /// Relay workers per group; different keys proceed in parallel across workers
    /// (PostgreSQL; SQLite has one writer, so more workers only wait for each other).
    pub workers_per_group: usize,
    /// How often an idle relay looks for due rows without being woken.
    pub poll_interval: Duration,
    /// Attempts before a failing message becomes a dead letter. A delivery also fails when
    /// its handler returned `Ok` but its transaction did not commit (a deferred constraint, a
    /// serialization failure, a lost connection, or a statement the handler let fail).
    ///
    /// A message that keeps failing runs its handler `max_attempts + 1` times: twice on its
    /// first attempt (in its batch, then alone), then once per retry, alone. The other
    /// messages of the batch it first failed in run once more if they ran before it (all of
    /// them when the failure came at the inbox insert or at commit); its retries run no other
    /// handler.
    pub max_attempts: u32,
    /// The delay before the first retry; doubles with each attempt, with jitter.
    pub backoff_base: Duration,
    /// The longest delay between retries.
    pub backoff_max: Duration,
    /// How long outbox rows delivered to every group are kept.
    pub outbox_retention: Duration,
    /// How long inbox rows are kept (the window in which a redelivery is recognised).
    pub inbox_retention: Duration,
    /// How often retention runs and lag is reported.
    pub housekeeping_interval: Duration,
    /// How long a message a transport handed to this process may stay unacknowledged before
    /// the broker hands it out again. A process that dies holding a message (or staging it)
    /// holds back what follows it on the broker (its key, its NATS partition) that long.
    /// Staging and acknowledging a batch must take less.
    pub inbound_ack_wait: Duration,
    /// Whether the events this store writes are read by position (decision 0024): an event
    /// delivered at once to this process's groups is one outbox row, which each group reads
    /// past its cursor, instead of one delivery row per group, claimed and deleted; so is
    /// an event bound for other processes, which a transport's publisher reads past its own
    /// cursor (decision 0026). Failures, retries and scheduled messages still use delivery
    /// rows. The relay reads both kinds whatever this says, so it can change between runs. On
    /// by default.
    pub read_by_position: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 1000,
            workers_per_group: 1,
            poll_interval: Duration::from_millis(500),
            max_attempts: 10,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(300),
            outbox_retention: Duration::from_secs(24 * 3600),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            housekeeping_interval: Duration::from_secs(60),
            inbound_ack_wait: Duration::from_secs(30),
            read_by_position: true,
        }
    }
}

/// Options for [`SqlStore::connect_with`].
#[derive(Debug, Clone)]
pub struct SqlStoreOptions {
    prefix: String,
    max_connections: Option<u32>,
    relay: RelayOptions,
}

impl Default for SqlStoreOptions {
    fn default() -> Self {
        SqlStoreOptions {
            prefix: "inseam_".to_owned(),
            max_connections: None,
            relay: RelayOptions::default(),
        }
    }
}

impl SqlStoreOptions {
    /// Default options: tables prefixed `inseam_`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The prefix of the framework's tables (checked at connect: lowercase letters, digits,
    /// `_`, starting with a letter, at most 32 characters).
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The size of the connection pool (default: 10 for PostgreSQL, 4 for SQLite).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// The relay's behaviour.
    pub fn relay(mut self, relay: RelayOptions) -> Self {
        self.relay = relay;
        self
    }
}

pub(crate) struct Shared {
    pub(crate) pool: SqlPool,
    pub(crate) backend: Backend,
    pub(crate) sql: Statements,
    pub(crate) options: RelayOptions,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) url: String,
    /// Bumped after each local commit that wrote outbox rows; relay workers watch it.
    pub(crate) wake: watch::Sender<u64>,
    pub(crate) stats: crate::relay::Counters,
    /// The app's clock (the system's until an app is built on the store).
    pub(crate) clock: std::sync::RwLock<Arc<dyn Clock>>,
    /// SQLite: the in-process turn to write.
    pub(crate) writer: Arc<tokio::sync::Mutex<()>>,
    /// PostgreSQL: the outbox rows of units of work committing together.
    pub(crate) group: crate::deferred::GroupCommit,
    /// The groups whose cursor this store made sure of (reading by position).
    pub(crate) cursors: std::sync::RwLock<std::collections::HashSet<&'static str>>,
    /// PostgreSQL: per group, the window end the oldest running transaction holds it at, and
    /// since when (reading by position).
    pub(crate) stuck:
        std::sync::Mutex<std::collections::HashMap<&'static str, (i64, std::time::Instant)>>,
}

/// In-process turn to write to SQLite: held for the whole write transaction.
pub(crate) type WriteTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// How long a SQLite writer waits for its turn (and for the file lock, `busy_timeout`).
const SQLITE_BUSY: Duration = Duration::from_secs(10);

impl Shared {
    /// Begins a write transaction. On SQLite, writers first take their turn in process, so
    /// that waiting for the single write lock never holds a pool connection that a handler in
    /// the writing transaction may need for a read; the turn is released with the returned
    /// guard.
    pub(crate) async fn begin(&self) -> Result<(SqlTx, WriteTurn)> {
        match self.backend {
            Backend::Sqlite => {
                let turn = tokio::time::timeout(SQLITE_BUSY, self.writer.clone().lock_owned())
                    .await
                    .map_err(|_| Error::LockTimeout {
                        waited: SQLITE_BUSY,
                    })?;
                // Take SQLite's write lock up front: a transaction that reads before it
                // writes would otherwise fail when another process committed in between.
                let tx = self
                    .pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .context("begin a transaction")?;
                Ok((tx, Some(turn)))
            }
            Backend::Postgres => Ok((
                self.pool.begin().await.context("begin a transaction")?,
                None,
            )),
        }
    }

    /// Now, by the app's clock.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock
            .read()
            .map(|clock| clock.now())
            .unwrap_or_else(|p| p.into_inner().now())
    }

    /// The groups of `rows` whose cursor this store has not made sure of yet.
    pub(crate) fn new_cursors(&self, rows: &[&OutboxRow]) -> Vec<&'static str> {
        let mut new = Vec::new();
        let known = self.cursors.read().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            for group in &row.read_by {
                if !known.contains(group) && !new.contains(group) {
                    new.push(*group);
                }
            }
        }
        new
    }

    /// Remembers that the cursors of `groups` exist (once their transaction committed).
    pub(crate) fn cursors_made(&self, groups: &[&'static str]) {
        if groups.is_empty() {
            return;
        }
        let mut known = self.cursors.write().unwrap_or_else(|p| p.into_inner());
        known.extend(groups.iter().copied());
    }

    pub(crate) fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// SQLite: a file in WAL mode (created if missing), through the native driver. An existing
/// file only (`create` false) is opened as it is: neither created nor switched to WAL.
#[cfg(feature = "sqlite")]
async fn connect_sqlite(url: &str, max: Option<u32>, create: bool) -> Result<SqlPool, sqlx::Error> {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    use std::str::FromStr as _;
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(create)
        .busy_timeout(SQLITE_BUSY);
    // WAL: readers never block the writer. NORMAL: a commit survives the process being
    // killed; only an OS crash may lose the last commits, never part of one.
    let options = if create {
        options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
    } else {
        options
    };
    // No ping before handing out a connection: a SQLite connection is a file handle in this
    // process, which no server restart or idle timeout can break, and a command that reads
    // before it writes checks a connection out twice (decision 0015).
    let pool = SqlitePoolOptions::new()
        .max_connections(max.unwrap_or(4))
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    Ok(SqlPool::sqlite_pool(pool))
}

/// How long a PostgreSQL connection may have sat in the pool and still be handed out without
/// a ping first.
#[cfg(feature = "postgres")]
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

/// PostgreSQL, through the native driver.
///
/// sqlx pings a connection when it comes back to the pool, and by default again before
/// handing it out: a second round trip before every statement a command or the relay sends on
/// a pooled connection. Only a connection idle for longer than [`TRUSTED_IDLE`] is pinged
/// before it is handed out; one back within that time was pinged on its return (decision
/// 0028). A connection the server dropped in between (a restart) fails the statement that
/// meets it, as one dropped during the statement would, and is closed when it comes back.
#[cfg(feature = "postgres")]
async fn connect_postgres(url: &str, max: Option<u32>) -> Result<SqlPool, sqlx::Error> {
    use sqlx::Connection as _;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max.unwrap_or(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > TRUSTED_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect(url)
        .await?;
    Ok(SqlPool::postgres(pool))
}

/// A durable store on SQLite or PostgreSQL, selected by the database URL.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use inseam_sql::SqlStore;
/// let store = SqlStore::connect("sqlite://shop.db").await?; // or postgres://...
/// let app = inseam_core::App::builder().store(store.clone()).discover().build().await?;
/// let relay = app.start();
/// // ... app.send(..) ...
/// relay.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlStore {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.shared.backend)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Connects with default options and brings the schema up to date.
    ///
    /// `sqlite://path` opens (or creates) a database file in WAL mode; `postgres://...`
    /// connects to PostgreSQL.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SqlStoreOptions::default()).await
    }

    /// Connects with `options` and brings the schema up to date.
    pub async fn connect_with(url: &str, options: SqlStoreOptions) -> Result<Self> {
        let prefix = options.prefix.clone();
        let store = Self::connect_only(url, options, true).await?;
        store.migrate(&prefix).await?;
        Ok(store)
    }

    /// Connects without touching the schema; `create` lets SQLite create a missing file.
    pub(crate) async fn connect_only(
        url: &str,
        options: SqlStoreOptions,
        create: bool,
    ) -> Result<Self> {
        validate_prefix(&options.prefix)?;
        let backend = Backend::from_url(url)?;
        let max = options.max_connections;
        // Only SQLite creates a file.
        #[cfg(not(feature = "sqlite"))]
        let _ = create;
        let pool = match backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite => connect_sqlite(url, max, create).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres => connect_postgres(url, max).await,
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::UnsupportedUrl {
                    scheme: format!("{other:?}").to_lowercase(),
                });
            }
        }
        .context("connect to the database")?;
        let (wake, _) = watch::channel(0);
        let store = SqlStore {
            shared: Arc::new(Shared {
                pool,
                backend,
                sql: Statements::new(backend, &options.prefix),
                options: options.relay,
                url: url.to_owned(),
                wake,
                stats: crate::relay::Counters::default(),
                clock: std::sync::RwLock::new(Arc::new(SystemClock)),
                writer: Arc::new(tokio::sync::Mutex::new(())),
                group: crate::deferred::GroupCommit::default(),
                cursors: std::sync::RwLock::default(),
                stuck: std::sync::Mutex::default(),
            }),
        };
        Ok(store)
    }

    /// The prefix of the framework's tables.
    pub fn table_prefix(&self) -> &str {
        &self.shared.sql.prefix
    }

    /// The relay's options this store was opened with.
    pub fn relay_options(&self) -> &RelayOptions {
        &self.shared.options
    }

    /// The database behind this store.
    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    /// What the group commit did since the store connected (PostgreSQL; always zero on
    /// SQLite, where every command commits its own transaction).
    pub fn commit_stats(&self) -> crate::CommitStats {
        self.shared.group.stats()
    }

    /// The connection pool, for the app's own queries outside a command: the backend's native
    /// pool ([`SqlPool::pg`], [`SqlPool::sqlite`]), or `&SqlPool` itself as an executor of
    /// sqlx's `Any` database for SQL that runs on both.
    pub fn pool(&self) -> &SqlPool {
        &self.shared.pool
    }

    async fn migrate(&self, prefix: &str) -> Result<()> {
        let shared = &self.shared;
        sqlx::query(AssertSqlSafe(shared.sql.migrations_table.clone()))
            .execute(&shared.pool)
            .await
            .context("create the migrations table")?;
        for migration in migrations(shared.backend, prefix) {
            let mut tx = shared.pool.begin().await.context("begin a migration")?;
            if let Some(lock) = &shared.sql.lock_migrations {
                sqlx::query(AssertSqlSafe(lock.clone()))
                    .execute(&mut tx)
                    .await
                    .context("lock the migrations")?;
            }
            let applied: Vec<i64> = sqlx::query(AssertSqlSafe(shared.sql.applied.clone()))
                .fetch_all(&mut tx)
                .await
                .context("read the applied migrations")?
                .iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()
                .context("read the applied migrations")?;
            if applied.contains(&migration.version) {
                // Ended here, not dropped: a dropped transaction goes back to the pool with its
                // rollback still to run, and a SQLite connection in it keeps an old snapshot.
                tx.rollback().await.context("end a migration check")?;
                continue;
            }
            let version = migration.version;
            let failed = |source| Error::Migration { version, source };
            for statement in migration.statements {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut tx)
                    .await
                    .map_err(failed)?;
            }
            sqlx::query(AssertSqlSafe(shared.sql.record_migration.clone()))
                .bind(version)
                .bind(micros(self.shared.now()))
                .execute(&mut tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            tracing::info!(target: "inseam::store", version = migration.version, "schema migrated");
        }
        Ok(())
    }

    pub(crate) async fn begin_unit(&self) -> Result<SqlUnitOfWork> {
        begin_unit(&self.shared).await
    }
}

/// Begins a unit of work with its transaction.
pub(crate) async fn begin_unit(shared: &Arc<Shared>) -> Result<SqlUnitOfWork> {
    let (tx, turn) = shared.begin().await?;
    Ok(SqlUnitOfWork {
        tx,
        shared: shared.clone(),
        notified: false,
        savepoints: 0,
        note: None,
        cursors: Vec::new(),
        _turn: turn,
    })
}

/// A unit of work on the SQL store: one database transaction.
pub struct SqlUnitOfWork {
    pub(crate) tx: SqlTx,
    pub(crate) shared: Arc<Shared>,
    notified: bool,
    /// Savepoints of nested commands open in the transaction.
    savepoints: u32,
    /// Why the delivery being handled was not needed, for its inbox row.
    note: Option<&'static str>,
    /// Cursors this transaction created: known to exist once it commits.
    cursors: Vec<&'static str>,
    /// Declared after `tx`: released once the transaction is over.
    _turn: WriteTurn,
}

impl fmt::Debug for SqlUnitOfWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlUnitOfWork")
            .field("backend", &self.shared.backend)
            .finish_non_exhaustive()
    }
}

impl SqlUnitOfWork {
    pub(crate) fn wrote_outbox(&self) -> bool {
        self.notified
    }

    /// Why the delivery just handled was not needed, if its handler said so; cleared for the
    /// next delivery of the batch.
    pub(crate) fn take_note(&mut self) -> Option<&'static str> {
        self.note.take()
    }

    /// Commits, then gives up the write turn.
    pub(crate) async fn commit_unit(self) -> Result<(), sqlx::Error> {
        let SqlUnitOfWork {
            tx,
            _turn,
            shared,
            cursors,
            ..
        } = self;
        tx.commit().await?;
        shared.cursors_made(&cursors);
        Ok(())
    }

    /// Rolls back, then gives up the write turn.
    pub(crate) async fn rollback_unit(self) -> Result<(), sqlx::Error> {
        let SqlUnitOfWork { tx, _turn, .. } = self;
        tx.rollback().await
    }

    /// The transaction, for the handler's own SQL.
    pub fn connection(&mut self) -> &mut SqlTx {
        &mut self.tx
    }

    pub(crate) async fn write(&mut self, messages: Vec<OutboxMessage>) -> Result<()> {
        let shared = self.shared.clone();
        let sql = &shared.sql;
        let now = micros(shared.now());
        let by_position = shared.options.read_by_position;
        let mut to_deliver = false;
        for message in messages {
            let row = OutboxRow::encode(&message, now, by_position)?;
            let cursors = shared.new_cursors(&[&row]);
            for group in &cursors {
                sqlx::query(AssertSqlSafe(sql.ensure_cursor.clone()))
                    .bind(*group)
                    .execute(&mut self.tx)
                    .await
                    .context("create a group's cursor")?;
            }
            self.cursors.extend(cursors);
            // A row no group receives (an event of a stream, or a kept unsubscribed event)
            // has no deliveries to insert and nothing to wake a relay for.
            let delivered = !message.groups.is_empty();
            if delivered && let Some(write) = &sql.write_outbox {
                row.bind(sqlx::query(AssertSqlSafe(write.clone())))
                    .bind(sql.channel.to_string())
                    .execute(&mut self.tx)
                    .await
                    .map_err(|e| conflict_or(e, [&message]))?;
                self.notified = true;
                continue;
            }
            sqlx::query(AssertSqlSafe(sql.insert_outbox.clone()))
                .bind(row.message_id.clone())
                .bind(row.name)
                .bind(row.version)
                .bind(row.key.clone())
                .bind(row.envelope)
                .bind(row.created_at)
                .bind(row.stream)
                .bind(row.stream_version)
                .bind(row.correlation)
                .bind(row.read_by_json)
                .execute(&mut self.tx)
                .await
                .map_err(|e| conflict_or(e, [&message]))?;
            if !delivered {
                continue;
            }
            to_deliver = true;
            if row.read_by_all {
                continue;
            }
            to_deliver = true;
            sqlx::query(AssertSqlSafe(sql.insert_deliveries.clone()))
                .bind(row.groups)
                .bind(row.message_id)
                .bind(row.key)
                .bind(row.deliver_at)
                .bind(row.created_at)
                .execute(&mut self.tx)
                .await
                .context("write the outbox deliveries")?;
        }
        if to_deliver && !self.notified {
            if let Some(notify) = &sql.notify {
                // Delivered by PostgreSQL on commit, to the relays of every instance.
                sqlx::query(AssertSqlSafe(notify.clone()))
                    .bind(sql.channel.to_string())
                    .execute(&mut self.tx)
                    .await
                    .context("notify the relays")?;
            }
            self.notified = true;
        }
        Ok(())
    }
}

/// One outbox row as the statements bind it.
pub(crate) struct OutboxRow {
    message_id: String,
    name: String,
    version: i64,
    key: Option<String>,
    envelope: Vec<u8>,
    created_at: i64,
    stream: Option<String>,
    stream_version: Option<i64>,
    correlation: String,
    deliver_at: i64,
    /// The groups that get a delivery row, as a JSON array.
    groups: String,
    /// The groups that read the row by position.
    pub(crate) read_by: Vec<&'static str>,
    /// `read_by` as a JSON array, or `None` when empty.
    read_by_json: Option<String>,
    /// Whether every group reads the row by position (no delivery rows).
    read_by_all: bool,
    /// Whether some group gets a delivery row.
    delivered: bool,
}

/// Binds an [`OutboxRow`]'s parameters on a query of either database, in the order of
/// [`ROW_PARAMS`](crate::sql::ROW_PARAMS).
macro_rules! bind_row {
    ($row:expr, $query:expr) => {{
        let row = $row;
        $query
            .bind(row.message_id)
            .bind(row.name)
            .bind(row.version)
            .bind(row.key)
            .bind(row.envelope)
            .bind(row.created_at)
            .bind(row.stream)
            .bind(row.stream_version)
            .bind(row.correlation)
            .bind(row.deliver_at)
            .bind(row.groups)
            .bind(row.read_by_json)
    }};
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;
#[cfg(feature = "postgres")]
pub(crate) type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl OutboxRow {
    /// `message` as written at `now` (microseconds).
    /// With `by_position`, the groups that get it at once (this process's groups and the
    /// transports' publishers) read it by position; a scheduled message gets delivery rows.
    pub(crate) fn encode(message: &OutboxMessage, now: i64, by_position: bool) -> Result<Self> {
        let envelope = &message.envelope;
        let bytes = envelope.to_json().map_err(|source| Error::Database {
            operation: "encode an envelope for the outbox",
            source: sqlx::Error::Encode(Box::new(source)),
        })?;
        let (read_by, rows): (Vec<&'static str>, Vec<&'static str>) =
            if by_position && message.deliver_at.is_none() {
                (message.groups.clone(), Vec::new())
            } else {
                (Vec::new(), message.groups.clone())
            };
        let json = |groups: &[&str]| {
            serde_json::to_string(groups).map_err(|source| Error::Database {
                operation: "encode the groups of an outbox row",
                source: sqlx::Error::Encode(Box::new(source)),
            })
        };
        let groups = json(&rows)?;
        let read_by_json = if read_by.is_empty() {
            None
        } else {
            Some(json(&read_by)?)
        };
        let read_by_all = rows.is_empty() && !read_by.is_empty();
        let delivered = !rows.is_empty();
        Ok(OutboxRow {
            message_id: envelope.metadata.message_id.to_string(),
            name: envelope.name.clone(),
            version: i64::from(envelope.version),
            key: envelope.key.clone(),
            envelope: bytes,
            created_at: now,
            stream: message.stream.as_ref().map(|s| s.stream.clone()),
            stream_version: message
                .stream
                .as_ref()
                .map(|s| i64::try_from(s.version).unwrap_or(i64::MAX)),
            correlation: envelope.metadata.correlation_id.to_string(),
            deliver_at: message.deliver_at.map_or(now, micros),
            groups,
            read_by,
            read_by_json,
            read_by_all,
            delivered,
        })
    }

    /// What a statement writing `rows` must write besides them.
    pub(crate) fn shape(rows: &[OutboxRow]) -> crate::sql::RowsShape {
        use crate::sql::RowsShape;
        if rows.iter().any(|row| row.delivered) {
            RowsShape::Deliveries
        } else if rows.iter().any(|row| !row.read_by.is_empty()) {
            RowsShape::Wake
        } else {
            RowsShape::Quiet
        }
    }

    /// Binds the row's [`ROW_PARAMS`](crate::sql::ROW_PARAMS) parameters in the order of
    /// PostgreSQL's outbox statements.
    pub(crate) fn bind(self, query: AnyQuery<'_>) -> AnyQuery<'_> {
        bind_row!(self, query)
    }

    /// [`bind`](Self::bind) on a native PostgreSQL query: the same parameters, without
    /// converting them from `Any`'s on every call.
    #[cfg(feature = "postgres")]
    pub(crate) fn bind_pg(self, query: PgQuery<'_>) -> PgQuery<'_> {
        bind_row!(self, query)
    }
}

/// A unique violation on a stream position is a concurrency conflict; anything else is a
/// database error. The conflict names the position the database reports (PostgreSQL's detail
/// `Key (stream, stream_version)=(cart-7, 3) already exists.`) when it is one of `messages`'
/// positions, else their first (a unit of work appends each aggregate's events in version
/// order, so the first is the one another writer took).
pub(crate) fn conflict_or<'m>(
    error: sqlx::Error,
    messages: impl IntoIterator<Item = &'m OutboxMessage>,
) -> Error {
    if let Some(db) = error.as_database_error()
        && db.is_unique_violation()
        && (db
            .constraint()
            .is_some_and(|c| c.ends_with("outbox_stream"))
            || db.message().contains(".stream"))
    {
        let positions: Vec<_> = messages
            .into_iter()
            .filter_map(|m| m.stream.as_ref())
            .collect();
        let position = reported_position(db)
            .and_then(|(stream, version)| {
                positions
                    .iter()
                    .find(|p| p.stream == stream && p.version == version)
            })
            .or(positions.first());
        if let Some(position) = position {
            return Error::Conflict(inseam_core::Conflict {
                stream: position.stream.clone(),
                version: position.version,
            });
        }
    }
    Error::Database {
        operation: "write the outbox",
        source: error,
    }
}

/// The stream position a unique violation reports, where the driver gives it.
fn reported_position(db: &dyn sqlx::error::DatabaseError) -> Option<(String, u64)> {
    #[cfg(feature = "postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.detail().and_then(parse_key_detail);
    }
    let _ = db;
    None
}

/// `Key (stream, stream_version)=(cart-7, 3) already exists.` → `("cart-7", 3)`.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn parse_key_detail(detail: &str) -> Option<(String, u64)> {
    let values = detail.split_once(")=(")?.1;
    let values = values.rsplit_once(") already exists")?.0;
    let (stream, version) = values.rsplit_once(", ")?;
    Some((stream.to_owned(), version.parse().ok()?))
}

impl UnitOfWork for SqlUnitOfWork {
    fn append<'a>(
        &'a mut self,
        messages: Vec<OutboxMessage>,
    ) -> BoxFuture<'a, Result<(), AppendError>> {
        Box::pin(async move {
            self.write(messages).await.map_err(|error| match error {
                Error::Conflict(conflict) => AppendError::Conflict(conflict),
                other => AppendError::Store(StoreError::new("write the outbox", other)),
            })
        })
    }

    fn read_stream<'a>(
        &'a mut self,
        stream: &'a str,
        after: u64,
        as_of: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(read_stream(
            &self.shared,
            &mut self.tx,
            stream,
            after,
            as_of,
        ))
    }

    fn load_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>> {
        Box::pin(load_snapshot(&self.shared, &mut self.tx, stream))
    }

    fn save_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
        snapshot: Snapshot,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(self.shared.sql.save_snapshot.clone()))
                .bind(stream.to_owned())
                .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
                .bind(i64::from(snapshot.schema))
                .bind(snapshot.state)
                .bind(micros(self.shared.now()))
                .execute(&mut self.tx)
                .await
                .map_err(|e| StoreError::new("save a snapshot", e))?;
            Ok(())
        })
    }

    fn load_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProcessState>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(AssertSqlSafe(self.shared.sql.load_process.clone()))
                .bind(kind.to_owned())
                .bind(id.to_owned())
                .fetch_optional(&mut self.tx)
                .await
                .map_err(|e| StoreError::new("load a process", e))?;
            let Some(row) = row else {
                return Ok(None);
            };
            let read = || -> Result<ProcessState, sqlx::Error> {
                let done: i64 = row.try_get(1)?;
                Ok(ProcessState {
                    state: row.try_get(0)?,
                    done: done != 0,
                })
            };
            read()
                .map(Some)
                .map_err(|e| StoreError::new("load a process", e))
        })
    }

    fn save_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        state: ProcessState,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(self.shared.sql.save_process.clone()))
                .bind(kind.to_owned())
                .bind(id.to_owned())
                .bind(state.state)
                .bind(i64::from(state.done))
                .bind(micros(self.shared.now()))
                .execute(&mut self.tx)
                .await
                .map_err(|e| StoreError::new("save a process", e))?;
            Ok(())
        })
    }

    fn savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let name = self.savepoints + 1;
            sqlx::query(AssertSqlSafe(format!("SAVEPOINT inseam_nested_{name}")))
                .execute(&mut self.tx)
                .await
                .map_err(|e| StoreError::new("set a savepoint for a nested command", e))?;
            self.savepoints = name;
            Ok(())
        })
    }

    fn release_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let name = self.savepoints;
            sqlx::query(AssertSqlSafe(format!(
                "RELEASE SAVEPOINT inseam_nested_{name}"
            )))
            .execute(&mut self.tx)
            .await
            .map_err(|e| StoreError::new("release a nested command's savepoint", e))?;
            self.savepoints = name.saturating_sub(1);
            Ok(())
        })
    }

    fn rollback_to_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let name = self.savepoints;
            sqlx::query(AssertSqlSafe(format!(
                "ROLLBACK TO SAVEPOINT inseam_nested_{name}"
            )))
            .execute(&mut self.tx)
            .await
            .map_err(|e| StoreError::new("roll back a nested command", e))?;
            // Rolling back to a savepoint keeps it: release it too.
            sqlx::query(AssertSqlSafe(format!(
                "RELEASE SAVEPOINT inseam_nested_{name}"
            )))
            .execute(&mut self.tx)
            .await
            .map_err(|e| StoreError::new("roll back a nested command", e))?;
            self.savepoints = name.saturating_sub(1);
            Ok(())
        })
    }

    fn not_needed(&mut self, reason: &'static str) {
        self.note = Some(reason);
    }

    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), AppendError>> {
        Box::pin(async move {
            self.commit_unit()
                .await
                .map_err(|e| AppendError::Store(StoreError::new("commit", e)))
        })
    }

    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            self.rollback_unit()
                .await
                .map_err(|e| StoreError::new("roll back", e))
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn StdAny {
        self
    }
}

/// The events of `stream` after version `after` (recorded at or before `as_of`), read on
/// `conn`: in a unit of work's transaction or, before it begins one, on its own.
pub(crate) async fn read_stream<'c>(
    shared: &Shared,
    conn: impl Executor<'c, Database = Any>,
    stream: &str,
    after: u64,
    as_of: Option<DateTime<Utc>>,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(shared.sql.read_stream.clone()))
        .bind(stream.to_owned())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(as_of.map_or(i64::MAX, micros))
        .fetch_all(conn)
        .await
        .map_err(|e| StoreError::new("read a stream", e))?;
    rows.iter()
        .map(|row| {
            let version: i64 = row.try_get(0)?;
            let bytes: Vec<u8> = row.try_get(1)?;
            let recorded: i64 = row.try_get(2)?;
            let envelope =
                RawEnvelope::from_json(&bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok(StoredEvent {
                version: u64::try_from(version).unwrap_or_default(),
                envelope,
                recorded_at: from_micros(recorded),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|e| StoreError::new("read a stream", e))
}

/// The latest snapshot of `stream`, read on `conn` (see [`read_stream`]).
pub(crate) async fn load_snapshot<'c>(
    shared: &Shared,
    conn: impl Executor<'c, Database = Any>,
    stream: &str,
) -> Result<Option<Snapshot>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(shared.sql.load_snapshot.clone()))
        .bind(stream.to_owned())
        .fetch_optional(conn)
        .await
        .map_err(|e| StoreError::new("load a snapshot", e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let read = || -> Result<Snapshot, sqlx::Error> {
        let version: i64 = row.try_get(0)?;
        let schema: i64 = row.try_get(1)?;
        Ok(Snapshot {
            version: u64::try_from(version).unwrap_or_default(),
            schema: u32::try_from(schema).unwrap_or_default(),
            state: row.try_get(2)?,
        })
    };
    read()
        .map(Some)
        .map_err(|e| StoreError::new("load a snapshot", e))
}

impl Store for SqlStore {
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn UnitOfWork>, StoreError>> {
        // Nothing is sent until the unit of work needs a transaction (see
        // `DeferredUnitOfWork`); on SQLite, that is when it takes the write lock.
        let unit = DeferredUnitOfWork::new(self.shared.clone());
        Box::pin(async move { Ok(Box::new(unit) as Box<dyn UnitOfWork>) })
    }

    fn committed(&self) {
        self.shared.wake();
    }

    fn use_clock(&self, clock: Arc<dyn Clock>) {
        *self.shared.clock.write().unwrap_or_else(|p| p.into_inner()) = clock;
    }

    fn start(&self, app: App) -> RelayHandle {
        crate::relay::start(self.clone(), app)
    }
}

/// The transaction of the command or delivery a handler runs in: `ctx.tx().await?`, or the
/// backend's native connection inside it: `ctx.pg().await?`, `ctx.sqlite().await?`.
///
/// ```ignore
/// #[command_handler]
/// async fn open_account(cmd: OpenAccount, ctx: &mut CommandContext<'_>) -> Result<(), BankError> {
///     // PostgreSQL's own types, checked at build by sqlx:
///     sqlx::query!("INSERT INTO accounts (id, opened_at) VALUES ($1, $2)", cmd.id, Utc::now())
///         .execute(ctx.pg().await?)
///         .await?;
///     // or SQL that runs on either backend:
///     sqlx::query("INSERT INTO audit (line) VALUES ($1)").bind("opened").execute(ctx.tx().await?).await?;
///     ctx.publish(AccountOpened { id: cmd.id });
///     Ok(())
/// }
/// ```
pub trait Transactional {
    /// The unit of work's transaction: what the handler writes through it commits together
    /// with the outbox rows, or not at all. On PostgreSQL a command's transaction begins here,
    /// the first time it is asked for (see [`DeferredUnitOfWork`]); on SQLite this is when the
    /// command takes the database's write lock. Fails when the app has no [`SqlStore`], or when
    /// the transaction cannot begin.
    fn tx(&mut self) -> impl Future<Output = Result<&mut SqlTx, sqlx::Error>> + Send;

    /// The native PostgreSQL connection inside [`tx`](Self::tx), for `sqlx::query!`, `Uuid`,
    /// `chrono`, `Json<T>`, arrays. Fails, saying so, on SQLite.
    #[cfg(feature = "postgres")]
    fn pg(
        &mut self,
    ) -> impl Future<Output = Result<&mut sqlx::postgres::PgConnection, sqlx::Error>> + Send;

    /// The native SQLite connection inside [`tx`](Self::tx). Fails, saying so, on PostgreSQL.
    #[cfg(feature = "sqlite")]
    fn sqlite(
        &mut self,
    ) -> impl Future<Output = Result<&mut sqlx::sqlite::SqliteConnection, sqlx::Error>> + Send;
}

fn no_transaction() -> sqlx::Error {
    sqlx::Error::Configuration(
        "this handler runs without an inseam-sql transaction: give the app a store with `App::builder().store(SqlStore::connect(url).await?)`".into(),
    )
}

/// The store's unit of work behind a context.
enum Unit<'u> {
    Begun(&'u mut SqlUnitOfWork),
    Deferred(&'u mut DeferredUnitOfWork),
}

fn unit_of(uow: Option<&mut dyn UnitOfWork>) -> Result<Unit<'_>, sqlx::Error> {
    let any = uow.ok_or_else(no_transaction)?.as_any_mut();
    if any.is::<SqlUnitOfWork>() {
        return any
            .downcast_mut::<SqlUnitOfWork>()
            .map(Unit::Begun)
            .ok_or_else(no_transaction);
    }
    any.downcast_mut::<DeferredUnitOfWork>()
        .map(Unit::Deferred)
        .ok_or_else(no_transaction)
}

async fn connection_of(uow: Option<&mut dyn UnitOfWork>) -> Result<&mut SqlTx, sqlx::Error> {
    match unit_of(uow)? {
        Unit::Begun(unit) => Ok(unit.connection()),
        Unit::Deferred(unit) => unit.connection().await.map_err(Error::into_sqlx),
    }
}

macro_rules! transactional {
    ($ctx:ty) => {
        impl Transactional for $ctx {
            fn tx(&mut self) -> impl Future<Output = Result<&mut SqlTx, sqlx::Error>> + Send {
                connection_of(self.unit_of_work())
            }

            #[cfg(feature = "postgres")]
            fn pg(
                &mut self,
            ) -> impl Future<Output = Result<&mut sqlx::postgres::PgConnection, sqlx::Error>> + Send
            {
                let uow = self.unit_of_work();
                async move { connection_of(uow).await?.pg() }
            }

            #[cfg(feature = "sqlite")]
            fn sqlite(
                &mut self,
            ) -> impl Future<Output = Result<&mut sqlx::sqlite::SqliteConnection, sqlx::Error>> + Send
            {
                let uow = self.unit_of_work();
                async move { connection_of(uow).await?.sqlite() }
            }
        }
    };
}

transactional!(CommandContext<'_>);
transactional!(EventContext<'_>);

/// Microseconds since the Unix epoch: how the store keeps instants, alike on both backends.
pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::parse_key_detail;

    #[test]
    fn the_conflicting_position_is_read_from_the_key_detail() {
        assert_eq!(
            parse_key_detail("Key (stream, stream_version)=(cart-7, 3) already exists."),
            Some(("cart-7".to_owned(), 3))
        );
        assert_eq!(
            parse_key_detail("Key (stream, stream_version)=(order-a, b, 12) already exists."),
            Some(("order-a, b".to_owned(), 12))
        );
        assert_eq!(
            parse_key_detail("Key (message_id)=(x) already exists."),
            None
        );
        assert_eq!(parse_key_detail("something else"), None);
    }
}
