//! Support for the workspace's integration tests: databases to run against, a small bank
//! whose handlers write through the store's transaction, a small app split in two processes
//! over NATS, and a NATS server of a test's own.

pub mod bank;
pub mod billing;
pub mod brokers;
pub mod cart;
pub mod orders;

use std::time::{Duration, Instant};

use inseam_test::TestDatabase;

/// Where the PostgreSQL tests connect: `INSEAM_TEST_POSTGRES`, or the local server.
pub use inseam_test::postgres_server;

/// A database the test owns: a fresh PostgreSQL database or a SQLite file in a temporary
/// directory, dropped with the value (`inseam_test::TestDatabase`), also when the test fails.
#[derive(Debug)]
pub struct TestDb {
    /// The URL to give the store.
    pub url: String,
    _db: TestDatabase,
}

/// The backends the durable tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A database on the PostgreSQL server.
    Postgres,
}

impl TestDb {
    /// A fresh database on `backend`.
    ///
    /// # Panics
    /// When PostgreSQL is asked for and cannot be reached: the message names the server and
    /// how to start it.
    pub async fn new(backend: Backend, name: &str) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres(name).await,
        }
    }

    /// A SQLite file in a fresh temporary directory.
    pub fn sqlite() -> TestDb {
        TestDb::from(TestDatabase::sqlite().expect("a temporary directory"))
    }

    /// A fresh PostgreSQL database named after the test.
    pub async fn postgres(name: &str) -> TestDb {
        match TestDatabase::postgres(name).await {
            Ok(db) => TestDb::from(db),
            Err(error) => panic!("PostgreSQL is required for this test: {error:?}"),
        }
    }
}

impl From<TestDatabase> for TestDb {
    fn from(db: TestDatabase) -> Self {
        TestDb {
            url: db.url().to_owned(),
            _db: db,
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each scenario `fn(Backend)` as a test on a SQLite file (module `sqlite`) and on the
/// PostgreSQL server (module `postgres`).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await;
                }
            )*
        }
    };
}
