//! Tests on PostgreSQL, each on a database of its own: created for it, migrated, and dropped when
//! it ends, also when it panics. Needs the server at `INSEAM_TEST_POSTGRES` (default the local
//! one).

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use inseam::prelude::*;
use inseam::sql::sqlx::{self, Connection as _, postgres::PgConnection};
use inseam_test::{TestApp, TestDatabase, TestError, postgres_server};

#[derive(Debug, Command)]
#[command(output = u32, name = "counter.bump")]
struct Bump {
    counter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "counter.bumped", key = counter)]
struct Bumped {
    counter: String,
}

#[command_handler(publishes(Bumped))]
async fn bump(cmd: Bump, ctx: &mut CommandContext<'_>) -> Result<u32, Infallible> {
    ctx.publish(Bumped {
        counter: cmd.counter,
    });
    Ok(1)
}

#[event_handler(group = "tally")]
async fn tally(ev: &Envelope<Bumped>) {
    let _ = &ev.counter;
}

fn counter(builder: inseam::AppBuilder, _: &SqlStore) -> inseam::AppBuilder {
    builder.handler::<bump>().handler::<tally>()
}

/// Whether the server has a database named `name`, asked on a connection of its own.
async fn exists(name: &str) -> bool {
    let url = format!("{}/postgres", postgres_server().trim_end_matches('/'));
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    found.is_some()
}

#[tokio::test]
async fn a_test_app_runs_a_scenario_on_a_database_of_its_own() {
    let test = TestApp::postgres(counter).await.unwrap();
    let name = test
        .database()
        .and_then(TestDatabase::name)
        .unwrap()
        .to_owned();
    assert!(
        name.starts_with("inseam_a_test_app_runs_a_scenar_"),
        "named after the test: {name}"
    );
    assert!(exists(&name).await, "the database exists during the test");
    assert_eq!(test.store.backend(), inseam::sql::Backend::Postgres);

    let flow = test
        .when(Bump {
            counter: "c".into(),
        })
        .await;

    assert_eq!(*flow.assert_ok(), 1);
    assert_eq!(
        flow.text(),
        "when counter.bump -> ok: 1\n\
         event counter.bumped {\"counter\":\"c\"}\n  -> tally: handled\n"
    );
    drop(test);
    assert!(!exists(&name).await, "the database is dropped with the app");
}

/// The guard drops its database although a store is still connected to it: the pool's
/// connections are ended with it.
#[tokio::test]
async fn the_database_goes_when_its_guard_is_dropped() {
    let db = TestDatabase::postgres("guard").await.unwrap();
    let name = db.name().unwrap().to_owned();
    let store = SqlStore::connect(db.url()).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'inseam_outbox'",
    )
    .fetch_one(store.pool().pg().unwrap())
    .await
    .unwrap();
    assert_eq!(tables, 1, "migrated by the store");
    assert!(exists(&name).await);

    drop(db);

    assert!(!exists(&name).await, "dropped, open connections and all");
    drop(store);
}

#[tokio::test]
async fn close_drops_the_database_now() {
    let test = TestApp::postgres(counter).await.unwrap();
    let name = test
        .database()
        .and_then(TestDatabase::name)
        .unwrap()
        .to_owned();
    test.close().await.unwrap();
    assert!(!exists(&name).await);
}

/// A test body that panics, run as a task: the panic unwinds through it, which drops its
/// `TestApp` and with it the database.
#[tokio::test]
async fn the_database_goes_when_the_test_panics_in_a_task() {
    let seen = Arc::new(Mutex::new(None));
    let body = {
        let seen = seen.clone();
        async move {
            let test = TestApp::postgres(counter).await.unwrap();
            let name = test.database().and_then(TestDatabase::name).unwrap();
            *seen.lock().unwrap() = Some(name.to_owned());
            test.when(Bump {
                counter: "c".into(),
            })
            .await
            .assert_ok();
            panic!("the test failed");
        }
    };
    let outcome = tokio::spawn(body).await;

    assert!(outcome.unwrap_err().is_panic());
    let name = seen.lock().unwrap().clone().unwrap();
    assert!(!exists(&name).await, "{name} was left behind");
}

/// The same, with the panic caught around the body, on the test's own (current-thread)
/// runtime: the guard's drop does not need this runtime to make progress.
#[tokio::test]
async fn the_database_goes_when_the_test_panics_in_place() {
    let mut seen = None;
    let outcome = AssertUnwindSafe(async {
        let db = TestDatabase::postgres("in_place").await.unwrap();
        seen = db.name().map(str::to_owned);
        let test = TestApp::on_database(db, counter).await.unwrap();
        test.when(Bump {
            counter: "c".into(),
        })
        .await
        .assert_error("not this");
    })
    .catch_unwind()
    .await;

    assert!(outcome.is_err(), "the body panicked");
    let name = seen.unwrap();
    assert!(!exists(&name).await, "{name} was left behind");
}

#[tokio::test]
async fn an_unreachable_server_is_named_with_how_to_start_it() {
    let error = TestDatabase::postgres_on("postgres://postgres@127.0.0.1:1", "nowhere")
        .await
        .unwrap_err();
    assert!(matches!(error, TestError::PostgresUnreachable { .. }));
    let message = format!("{error:?}");
    for part in [
        "PostgreSQL is not reachable at postgres://postgres@127.0.0.1:1/postgres",
        "INSEAM_TEST_POSTGRES",
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ] {
        assert!(message.contains(part), "{part:?} is not in: {message}");
    }
}

#[tokio::test]
async fn a_sqlite_database_is_a_file_removed_with_its_guard() {
    let db = TestDatabase::sqlite().unwrap();
    let store = SqlStore::connect(db.url()).await.unwrap();
    let path = std::path::PathBuf::from(db.url().trim_start_matches("sqlite://"));
    assert!(path.exists());
    assert_eq!(db.name(), None);
    store.pool().close().await;
    drop(db);
    assert!(!path.exists());
}
