//! What the SQL store returns when something goes wrong.

/// An error of the SQL store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The table prefix is not a plain identifier.
    #[error(
        "invalid table prefix `{prefix}`: use 1 to 32 lowercase ASCII letters, digits or `_`, starting with a letter"
    )]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// The database URL names a database the store does not support (or whose feature is off).
    #[error(
        "unsupported database URL scheme `{scheme}`: use `sqlite://path` (feature `sqlite`) or `postgres://...` (feature `postgres`)"
    )]
    UnsupportedUrl {
        /// The URL's scheme.
        scheme: String,
    },
    /// The database has none of the framework's tables (no `<prefix>migrations`): it is not
    /// an inseam database, or the app uses another table prefix. Reported by
    /// [`SqlStore::open`](crate::SqlStore::open), which never creates them.
    #[error(
        "no inseam tables in this database (no table `{prefix}migrations`): it is not an inseam app's database, its app never started, or its tables have another prefix"
    )]
    NoSchema {
        /// The table prefix looked for.
        prefix: String,
    },
    /// The database's schema was migrated by a newer inseam than this program's.
    #[error(
        "schema version {found} is newer than this binary's {supported}: use a build of the same inseam version as the app"
    )]
    SchemaTooNew {
        /// The database's schema version.
        found: i64,
        /// The newest schema version this program knows.
        supported: i64,
    },
    /// The database's schema is older than this program's and [`SqlStore::open`](crate::SqlStore::open)
    /// does not migrate.
    #[error(
        "schema version {found} is older than this binary's {supported}: start the app (which migrates its database) before operating it with this binary"
    )]
    SchemaTooOld {
        /// The database's schema version.
        found: i64,
        /// The schema version this program expects.
        supported: i64,
    },
    /// No projection of this name is registered on the app.
    #[error("no projection `{name}` in this app (projections: {known})")]
    UnknownProjection {
        /// The name asked for.
        name: String,
        /// The registered projections, comma-separated.
        known: String,
    },
    /// A database operation failed.
    #[error("database error while trying to {operation}")]
    Database {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A transport failed (preparing its channels, most often).
    #[error("transport error")]
    Transport {
        /// The transport's error.
        #[source]
        source: inseam_core::transport::TransportError,
    },
    /// A schema migration failed; nothing of it was applied.
    #[error("schema migration {version} failed")]
    Migration {
        /// The migration's version.
        version: i64,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The statement that was committing this unit of work's outbox rows, together with other
    /// units', failed without an answer from the database (the connection failed): whether it
    /// committed is unknown. Check before retrying (`SqlStore::flow`, the stream).
    #[error("committing the outbox rows failed, and whether they committed is unknown: {reason}")]
    CommitUnknown {
        /// The failure, with its causes.
        reason: String,
    },
    /// SQLite: another unit of work of this app held the database's write lock for the whole
    /// wait. SQLite has one writer; a unit of work holds the lock from its first write
    /// (`ctx.tx()`, a saga's state, a snapshot) or, without one, during its commit.
    #[error(
        "waited {waited:?} for SQLite's write lock, which another unit of work of this app held all that time (a handler that holds `ctx.tx()` while it waits on something slow?)"
    )]
    LockTimeout {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// Another writer appended to the stream first (optimistic concurrency).
    #[error(transparent)]
    Conflict(#[from] inseam_core::Conflict),
    /// Replaying a stored event into a projection failed; the rebuild stopped.
    #[error("replaying event {message_id} failed")]
    Replay {
        /// The event.
        message_id: String,
        /// Why.
        #[source]
        source: inseam_core::BoxError,
    },
    /// A projection named a table that is not a plain identifier.
    #[error("invalid table name `{name}`: use ASCII letters, digits and `_`")]
    InvalidTable {
        /// The name given.
        name: String,
    },
    /// No dead letter has this id: it was retried or discarded already (perhaps at the same
    /// moment, by another caller), or never existed. Dead letter ids are never given out
    /// twice, so a stale id never reaches another message.
    #[error("dead letter {id} does not exist (already retried or discarded, or never written)")]
    DeadLetterNotFound {
        /// The id asked for.
        id: i64,
    },
    /// A new payload for a dead letter was refused, because its group could not read it;
    /// the dead letter is unchanged.
    #[error(
        "dead letter {id} was not repaired: group `{group}` cannot read the new payload: {reason}"
    )]
    RepairRefused {
        /// The dead letter.
        id: i64,
        /// Its group.
        group: String,
        /// Why, with its causes (the decoder's own message names the field: ``missing field
        /// `seq` ``, ``invalid type: string "x", expected i64``).
        reason: String,
    },
}

impl Error {
    /// As a `StoreError` of `operation`; a lock timeout names itself as the operation, so that
    /// the top-level message says what happened.
    pub(crate) fn into_store(self, operation: &'static str) -> inseam_core::StoreError {
        let operation = match self {
            Error::LockTimeout { .. } => "take SQLite's write lock in time",
            _ => operation,
        };
        inseam_core::StoreError::new(operation, self)
    }

    /// As a `sqlx::Error`, for the handler-facing API whose error is sqlx's: a driver error as
    /// it is, anything else as a protocol error carrying the whole chain.
    pub(crate) fn into_sqlx(self) -> sqlx::Error {
        match self {
            Error::Database { source, .. } => source,
            other => sqlx::Error::Protocol(chain(&other)),
        }
    }
}

/// `error` and its causes, one line: `a: b: c` (see [`Report`](inseam_core::error::Report)).
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    inseam_core::error::Report(error).to_string()
}

/// A result of the SQL store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait Context<T> {
    fn context(self, operation: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, operation: &'static str) -> Result<T> {
        self.map_err(|source| Error::Database { operation, source })
    }
}
