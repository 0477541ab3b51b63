//! Databases a test owns: a SQLite file in a temporary directory, or a PostgreSQL database
//! created for the test and dropped when it ends, whether it passed or failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use inseam::sql::sqlx::postgres::PgConnection;
use inseam::sql::sqlx::{self, AssertSqlSafe, Connection as _, Executor as _};

use crate::TestError;

/// The environment variable naming the PostgreSQL server tests run on.
pub(crate) const POSTGRES_ENV: &str = "INSEAM_TEST_POSTGRES";

/// The server tests run on when [`POSTGRES_ENV`] is not set: the local one, trust auth.
pub(crate) const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// How long creating or dropping a database may take before the test gives up on it.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The PostgreSQL server tests create their databases on: `INSEAM_TEST_POSTGRES`, or the local
/// server `postgres://postgres@127.0.0.1:5432`. A URL without a database; one with a database
/// works too, the database is replaced.
pub fn postgres_server() -> String {
    std::env::var(POSTGRES_ENV).unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned())
}

/// A database a test owns, for a [`TestApp`](crate::TestApp) or any test that wants a store:
/// a SQLite file in a fresh temporary directory, or a fresh PostgreSQL database.
///
/// A PostgreSQL database gets a name of its own (the given name, the process id and a counter,
/// so parallel tests and runs never meet), is migrated by the store that connects to it
/// (`SqlStore::connect` brings the schema up to date), and is dropped when the guard is
/// dropped: at the end of the test, and also when the test panics, since unwinding drops it.
/// The drop runs `DROP DATABASE .. WITH (FORCE)`, which ends the connections still open
/// (a store's pool, clones of it the test kept), on a thread of its own with a small runtime,
/// so it is safe inside any tokio runtime; a failure is logged (`inseam::test`).
/// [`close`](Self::close) drops it asynchronously and reports a failure instead.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use inseam_test::TestDatabase;
///
/// let db = TestDatabase::postgres("refunds").await?;
/// let store = inseam::SqlStore::connect(db.url()).await?; // migrated
/// // ... the test ...
/// drop(db); // gone, even if the test had panicked before this line
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres {
        /// The server's `postgres` database, to drop this one from.
        admin: String,
        name: String,
    },
    Gone,
}

impl TestDatabase {
    /// A SQLite file in a fresh temporary directory, removed with the guard.
    pub fn sqlite() -> Result<Self, TestError> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        Ok(TestDatabase {
            url,
            place: Place::Sqlite(dir),
        })
    }

    /// A fresh database on the PostgreSQL server of [`postgres_server`], its name made of
    /// `name` (say, the test's) and what makes it unique.
    ///
    /// Fails, naming the server, `INSEAM_TEST_POSTGRES` and how to start the local server,
    /// when the server cannot be reached.
    pub async fn postgres(name: &str) -> Result<Self, TestError> {
        Self::postgres_on(&postgres_server(), name).await
    }

    /// A fresh database on the PostgreSQL server at `server` (a URL such as
    /// `postgres://postgres@127.0.0.1:5432`).
    pub async fn postgres_on(server: &str, name: &str) -> Result<Self, TestError> {
        let name = unique_name(name);
        let admin = database_url(server, "postgres");
        let mut conn = connect(&admin).await?;
        let created = tokio::time::timeout(
            ADMIN_TIMEOUT,
            conn.execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out()));
        // Closing politely is a courtesy: the server ends the session either way.
        let _ = conn.close().await;
        if let Err(source) = created {
            return Err(TestError::Database {
                operation: "create",
                database: name,
                source,
            });
        }
        Ok(TestDatabase {
            url: database_url(server, &name),
            place: Place::Postgres { admin, name },
        })
    }

    /// The URL to connect a store to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PostgreSQL database's name (`None` for SQLite).
    pub fn name(&self) -> Option<&str> {
        match &self.place {
            Place::Postgres { name, .. } => Some(name),
            Place::Sqlite(_) | Place::Gone => None,
        }
    }

    /// Drops the database now, ending the connections still open to it, and reports a
    /// failure (dropping the guard does the same, and can only log one).
    pub async fn close(mut self) -> Result<(), TestError> {
        match std::mem::replace(&mut self.place, Place::Gone) {
            Place::Sqlite(dir) => Ok(dir.close()?),
            Place::Postgres { admin, name } => drop_database(&admin, &name).await,
            Place::Gone => Ok(()),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Place::Postgres { admin, name } = std::mem::replace(&mut self.place, Place::Gone)
        else {
            return;
        };
        // Drop cannot await, and blocking on the test's runtime could stall it (a
        // current-thread runtime has no other thread to drive the connection): a thread of
        // its own, with a runtime of its own, does the work while this one waits.
        let worker = std::thread::Builder::new()
            .name("inseam-test-drop-database".to_owned())
            .spawn({
                let name = name.clone();
                move || -> Result<(), String> {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|error| format!("no runtime to drop it on: {error}"))?
                        .block_on(drop_database(&admin, &name))
                        .map_err(|error| format!("{error:?}"))
                }
            });
        let outcome = match worker {
            Ok(worker) => worker
                .join()
                .unwrap_or_else(|_| Err("the thread dropping it panicked".to_owned())),
            Err(error) => Err(format!("no thread to drop it on: {error}")),
        };
        if let Err(error) = outcome {
            tracing::warn!(
                target: "inseam::test",
                database = %name,
                %error,
                "a test database was left behind; drop it by hand"
            );
        }
    }
}

/// What a database operation that did not answer in time failed with.
fn timed_out() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {} s", ADMIN_TIMEOUT.as_secs()),
    ))
}

async fn connect(url: &str) -> Result<PgConnection, TestError> {
    let unreachable = |source| TestError::PostgresUnreachable {
        server: url.to_owned(),
        source,
    };
    tokio::time::timeout(ADMIN_TIMEOUT, PgConnection::connect(url))
        .await
        .unwrap_or_else(|_| Err(timed_out()))
        .map_err(unreachable)
}

async fn drop_database(admin: &str, name: &str) -> Result<(), TestError> {
    let mut conn = connect(admin).await?;
    // FORCE ends the sessions still connected to it: a pool the test did not close.
    let dropped = tokio::time::timeout(
        ADMIN_TIMEOUT,
        conn.execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        ))),
    )
    .await
    .unwrap_or_else(|_| Err(timed_out()));
    let _ = conn.close().await;
    dropped.map(drop).map_err(|source| TestError::Database {
        operation: "drop",
        database: name.to_owned(),
        source,
    })
}

/// `inseam_<name>_<pid>_<n>_<random>`: lowercase letters, digits and `_` only (so it needs no
/// escaping), at most 63 bytes (PostgreSQL's limit), unique in this process by the counter and
/// across processes and machines sharing the server by the process id and random digits.
fn unique_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let readable: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let random = uuid::Uuid::now_v7().as_u128() & 0xff_ffff;
    format!("inseam_{readable}_{}_{n}_{random:06x}", std::process::id())
}

/// `server` with its database (the path) replaced by `database`, its options kept.
fn database_url(server: &str, database: &str) -> String {
    let (base, options) = match server.split_once('?') {
        Some((base, options)) => (base, Some(options)),
        None => (server, None),
    };
    let host_at = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host_at..].find('/') {
        Some(slash) => &base[..host_at + slash],
        None => base,
    };
    match options {
        Some(options) => format!("{base}/{database}?{options}"),
        None => format!("{base}/{database}"),
    }
}

/// The running test's name (libtest names the thread after it), for database names.
pub(crate) fn current_test_name() -> String {
    std::thread::current()
        .name()
        .and_then(|name| name.rsplit("::").next())
        .unwrap_or("test")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_replaces_the_servers_path_and_keeps_its_options() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            database_url("postgres://u:p@db:5432/app?sslmode=disable", "t1"),
            "postgres://u:p@db:5432/t1?sslmode=disable"
        );
        assert_eq!(
            database_url("postgresql://localhost/", "t1"),
            "postgresql://localhost/t1"
        );
    }

    #[test]
    fn names_are_plain_short_and_unique() {
        let a = unique_name("Refunds::are-paid back, twice; and a very long name indeed");
        let b = unique_name("Refunds::are-paid back, twice; and a very long name indeed");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.starts_with("inseam_refunds__are_paid_back"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }
}
