//! The store's connections: the backend's native sqlx pool and transactions.
//!
//! A handler gets the transaction of its unit of work as a [`SqlTx`]. On it, the backend's own
//! connection is one call away ([`SqlTx::pg`], [`SqlTx::sqlite`]), so `sqlx::query!`, `Uuid`,
//! `chrono` and `Json<T>` work as sqlx users expect. Code that must run on both backends uses
//! `&mut SqlTx` itself as an executor of sqlx's [`Any`] database, with `Any`'s types (integers,
//! floats, text, bytes, booleans) and PostgreSQL's `$1` placeholders, which SQLite accepts.
//! The framework's own statements take that second form, which is what lets one store run on
//! either backend chosen by a URL. See docs/decisions/0015.

use std::fmt;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use sqlx::any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::{Any, Either, Execute, Executor, SqlStr, Transaction};
use sqlx_core::any::AnyConnectionBackend;

#[cfg(feature = "postgres")]
use sqlx::postgres::{PgConnection, PgPool, Postgres};
#[cfg(feature = "sqlite")]
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool};

use crate::sql::Backend;

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("inseam-sql needs a database: enable its `sqlite` or `postgres` feature (or both)");

/// The store's connection pool: the backend's native sqlx pool.
///
/// `&SqlPool` is an executor of sqlx's `Any` database for code that runs on both backends
/// (each query takes a connection from the pool); [`pg`](Self::pg) and
/// [`sqlite`](Self::sqlite) give the native pool.
#[derive(Clone)]
pub struct SqlPool {
    inner: PoolInner,
}

#[derive(Clone)]
enum PoolInner {
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
    #[cfg(feature = "sqlite")]
    Sqlite(SqlitePool),
}

impl fmt::Debug for SqlPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlPool")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl SqlPool {
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres(pool: PgPool) -> Self {
        SqlPool {
            inner: PoolInner::Postgres(pool),
        }
    }

    #[cfg(feature = "sqlite")]
    pub(crate) fn sqlite_pool(pool: SqlitePool) -> Self {
        SqlPool {
            inner: PoolInner::Sqlite(pool),
        }
    }

    /// The database behind the pool.
    pub fn backend(&self) -> Backend {
        match &self.inner {
            #[cfg(feature = "postgres")]
            PoolInner::Postgres(_) => Backend::Postgres,
            #[cfg(feature = "sqlite")]
            PoolInner::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The native PostgreSQL pool. Fails, saying so, when the store runs on SQLite.
    #[cfg(feature = "postgres")]
    pub fn pg(&self) -> Result<&PgPool, sqlx::Error> {
        match &self.inner {
            PoolInner::Postgres(pool) => Ok(pool),
            #[cfg(feature = "sqlite")]
            PoolInner::Sqlite(_) => Err(wrong_backend("pg", Backend::Sqlite)),
        }
    }

    /// The native SQLite pool. Fails, saying so, when the store runs on PostgreSQL.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(&self) -> Result<&SqlitePool, sqlx::Error> {
        match &self.inner {
            PoolInner::Sqlite(pool) => Ok(pool),
            #[cfg(feature = "postgres")]
            PoolInner::Postgres(_) => Err(wrong_backend("sqlite", Backend::Postgres)),
        }
    }

    /// Begins a transaction of its own (outside any unit of work of the app).
    pub async fn begin(&self) -> Result<SqlTx, sqlx::Error> {
        Ok(SqlTx {
            inner: match &self.inner {
                #[cfg(feature = "postgres")]
                PoolInner::Postgres(pool) => TxInner::Postgres(pool.begin().await?),
                #[cfg(feature = "sqlite")]
                PoolInner::Sqlite(pool) => TxInner::Sqlite(pool.begin().await?),
            },
        })
    }

    /// Begins a transaction with `statement` (SQLite's `BEGIN IMMEDIATE`).
    pub(crate) async fn begin_with(&self, statement: &'static str) -> Result<SqlTx, sqlx::Error> {
        Ok(SqlTx {
            inner: match &self.inner {
                #[cfg(feature = "postgres")]
                PoolInner::Postgres(pool) => TxInner::Postgres(pool.begin_with(statement).await?),
                #[cfg(feature = "sqlite")]
                PoolInner::Sqlite(pool) => TxInner::Sqlite(pool.begin_with(statement).await?),
            },
        })
    }

    /// A connection of the pool, outside any transaction.
    pub(crate) async fn acquire(&self) -> Result<SqlConn, sqlx::Error> {
        Ok(SqlConn {
            inner: match &self.inner {
                #[cfg(feature = "postgres")]
                PoolInner::Postgres(pool) => ConnInner::Postgres(pool.acquire().await?),
                #[cfg(feature = "sqlite")]
                PoolInner::Sqlite(pool) => ConnInner::Sqlite(pool.acquire().await?),
            },
        })
    }

    /// Closes the pool: waits for connections in use, closes the idle ones.
    pub async fn close(&self) {
        match &self.inner {
            #[cfg(feature = "postgres")]
            PoolInner::Postgres(pool) => pool.close().await,
            #[cfg(feature = "sqlite")]
            PoolInner::Sqlite(pool) => pool.close().await,
        }
    }
}

/// A transaction on the store's database: a unit of work's, as a handler gets it with
/// [`Transactional::tx`](crate::Transactional::tx), or one of its own from [`SqlPool::begin`].
///
/// - [`pg`](Self::pg) / [`sqlite`](Self::sqlite): the backend's native connection inside the
///   transaction, for `sqlx::query!`, `Uuid`, `chrono`, `Json<T>`, arrays, ...
/// - `&mut SqlTx` itself: an executor of sqlx's `Any` database, for SQL that runs unchanged
///   on both backends.
///
/// ```ignore
/// // PostgreSQL, with the types sqlx users expect:
/// sqlx::query!("INSERT INTO orders (id, placed_at) VALUES ($1, $2)", id, now)
///     .execute(ctx.tx().await?.pg()?)
///     .await?;
/// // Either backend:
/// sqlx::query("INSERT INTO audit (line) VALUES ($1)").bind(line).execute(ctx.tx().await?).await?;
/// ```
pub struct SqlTx {
    inner: TxInner,
}

enum TxInner {
    #[cfg(feature = "postgres")]
    Postgres(Transaction<'static, Postgres>),
    #[cfg(feature = "sqlite")]
    Sqlite(Transaction<'static, Sqlite>),
}

impl fmt::Debug for SqlTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlTx")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl SqlTx {
    /// The database the transaction runs on.
    pub fn backend(&self) -> Backend {
        match &self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(_) => Backend::Postgres,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The native PostgreSQL connection inside the transaction. Fails, saying so, when the
    /// store runs on SQLite.
    #[cfg(feature = "postgres")]
    pub fn pg(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        match &mut self.inner {
            TxInner::Postgres(tx) => Ok(&mut **tx),
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(_) => Err(wrong_backend("pg", Backend::Sqlite)),
        }
    }

    /// The native SQLite connection inside the transaction. Fails, saying so, when the store
    /// runs on PostgreSQL.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => Ok(&mut **tx),
            #[cfg(feature = "postgres")]
            TxInner::Postgres(_) => Err(wrong_backend("sqlite", Backend::Postgres)),
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => tx.commit().await,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => tx.commit().await,
        }
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => tx.rollback().await,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => tx.rollback().await,
        }
    }

    fn any_backend(&mut self) -> &mut dyn AnyConnectionBackend {
        match &mut self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => &mut **tx,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => &mut **tx,
        }
    }
}

#[cfg(all(feature = "sqlite", feature = "postgres"))]
fn wrong_backend(method: &str, backend: Backend) -> sqlx::Error {
    sqlx::Error::Configuration(
        format!(
            "`.{method}()` asked for the native connection of another database: this store runs on {backend}; use `.{}()`, or the `Any` form (the transaction or pool itself) for SQL that runs on both",
            match backend {
                Backend::Postgres => "pg",
                Backend::Sqlite => "sqlite",
            }
        )
        .into(),
    )
}

/// A connection of the pool outside any transaction (reads of a unit of work that has not
/// begun one).
pub(crate) struct SqlConn {
    inner: ConnInner,
}

enum ConnInner {
    #[cfg(feature = "postgres")]
    Postgres(sqlx::pool::PoolConnection<Postgres>),
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::pool::PoolConnection<Sqlite>),
}

impl fmt::Debug for SqlConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConn").finish_non_exhaustive()
    }
}

impl SqlConn {
    fn any_backend(&mut self) -> &mut dyn AnyConnectionBackend {
        match &mut self.inner {
            #[cfg(feature = "postgres")]
            ConnInner::Postgres(conn) => &mut **conn,
            #[cfg(feature = "sqlite")]
            ConnInner::Sqlite(conn) => &mut **conn,
        }
    }
}

/// `Executor<Database = Any>` for a connection type with an `any_backend()`: the same thing
/// sqlx's `AnyConnection` does with the backend it boxes.
macro_rules! any_executor {
    ($ty:ty) => {
        impl<'c> Executor<'c> for &'c mut $ty {
            type Database = Any;

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                mut query: E,
            ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, Any>,
            {
                let arguments = match query.take_arguments().map_err(sqlx::Error::Encode) {
                    Ok(arguments) => arguments,
                    Err(error) => return futures_util::stream::once(async { Err(error) }).boxed(),
                };
                let persistent = query.persistent();
                self.any_backend()
                    .fetch_many(query.sql(), persistent, arguments)
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                mut query: E,
            ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, Any>,
            {
                let arguments = match query.take_arguments().map_err(sqlx::Error::Encode) {
                    Ok(arguments) => arguments,
                    Err(error) => return async { Err(error) }.boxed(),
                };
                let persistent = query.persistent();
                self.any_backend()
                    .fetch_optional(query.sql(), persistent, arguments)
            }

            fn prepare_with<'e>(
                self,
                sql: SqlStr,
                parameters: &'e [AnyTypeInfo],
            ) -> BoxFuture<'e, Result<AnyStatement, sqlx::Error>>
            where
                'c: 'e,
            {
                self.any_backend().prepare_with(sql, parameters)
            }

            fn describe<'e>(
                self,
                sql: SqlStr,
            ) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>>
            where
                'c: 'e,
            {
                self.any_backend().describe(sql)
            }
        }
    };
}

any_executor!(SqlTx);
any_executor!(SqlConn);

impl<'p> Executor<'p> for &'_ SqlPool {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        mut query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        let arguments = query.take_arguments().map_err(sqlx::Error::Encode);
        let persistent = query.persistent();
        let sql = query.sql();
        Box::pin(sqlx_core::try_stream! {
            let arguments = arguments?;
            let mut conn = pool.acquire().await?;
            let mut rows = conn.any_backend().fetch_many(sql, persistent, arguments);
            while let Some(row) = rows.try_next().await? {
                r#yield!(row);
            }
            Ok(())
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        mut query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        let arguments = query.take_arguments().map_err(sqlx::Error::Encode);
        let persistent = query.persistent();
        let sql = query.sql();
        Box::pin(async move {
            let arguments = arguments?;
            let mut conn = pool.acquire().await?;
            conn.any_backend()
                .fetch_optional(sql, persistent, arguments)
                .await
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            conn.any_backend().prepare_with(sql, parameters).await
        })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>> {
        let pool = self.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            conn.any_backend().describe(sql).await
        })
    }
}
