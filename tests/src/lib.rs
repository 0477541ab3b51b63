//! Support for the workspace's integration tests: databases to run against and a small bank
//! whose handlers write through the store's transaction.

pub mod bank;
pub mod cart;
pub mod orders;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use inseam::sql::sqlx::{self, Connection as _, Executor as _};

/// Where the PostgreSQL tests connect: `INSEAM_TEST_POSTGRES`, or the local server.
pub fn postgres_server() -> String {
    std::env::var("INSEAM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A database the test owns: a fresh PostgreSQL database or a SQLite file in a temporary
/// directory. Dropped with the value (PostgreSQL databases are dropped at the next run).
#[derive(Debug)]
pub struct TestDb {
    /// The URL to give the store.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
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
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path: PathBuf = dir.path().join("inseam.db");
        TestDb {
            url: format!("sqlite://{}", path.display()),
            _dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL database named after the test.
    pub async fn postgres(name: &str) -> TestDb {
        let server = postgres_server();
        sqlx::any::install_default_drivers();
        let admin_url = format!("{server}/postgres");
        let mut admin = match sqlx::AnyConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(error) => panic!(
                "PostgreSQL is required for this test and is not reachable at {admin_url}: {error}\n\
                 start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                 or point INSEAM_TEST_POSTGRES at a server (trust auth)"
            ),
        };
        let db = format!(
            "inseam_{}_{}",
            name.to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>(),
            std::process::id()
        );
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await
            .expect("drop an old test database");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .await
            .expect("create a test database");
        TestDb {
            url: format!("{server}/{db}"),
            _dir: None,
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
