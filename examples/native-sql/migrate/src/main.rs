//! `native-sql-migrate reset <database-url> <migrations-dir>`: drops the database if it
//! exists, creates it and applies the migrations. `native-sql-migrate drop <database-url>`:
//! drops it.
//!
//! prepare.sh runs this before it builds a native-sql example against the live database. The
//! examples cannot apply their own migrations at that point: compiling them expands their
//! `sqlx::query!` calls, which need either the schema this step creates or offline data that
//! may be stale. It needs no `psql` or `sqlite3` either.

use std::path::Path;
use std::process::ExitCode;

use sqlx::migrate::{MigrateDatabase as _, MigrateError, Migrator};
use sqlx::postgres::{PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["reset", url, dir] => reset(url, Path::new(dir)).await,
        ["drop", url] => drop_database(url).await,
        _ => {
            eprintln!(
                "usage: native-sql-migrate reset <database-url> <migrations-dir>\n       native-sql-migrate drop <database-url>"
            );
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("native-sql-migrate: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn reset(url: &str, dir: &Path) -> Result<(), MigrateError> {
    drop_database(url).await?;
    let migrator = Migrator::new(dir).await?;
    if url.starts_with("sqlite:") {
        Sqlite::create_database(url).await?;
        let pool = SqlitePool::connect(url).await?;
        migrator.run(&pool).await?;
        pool.close().await;
    } else {
        Postgres::create_database(url).await?;
        let pool = PgPool::connect(url).await?;
        migrator.run(&pool).await?;
        pool.close().await;
    }
    Ok(())
}

async fn drop_database(url: &str) -> Result<(), MigrateError> {
    if url.starts_with("sqlite:") {
        if Sqlite::database_exists(url).await? {
            Sqlite::drop_database(url).await?;
        }
    } else if Postgres::database_exists(url).await? {
        Postgres::force_drop_database(url).await?;
    }
    Ok(())
}
