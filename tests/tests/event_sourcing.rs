//! Event sourcing on real databases: aggregates appended with optimistic concurrency, snapshots,
//! upcasting of stored payloads, reading a stream as of an instant. Each scenario runs on a
//! SQLite file and on the PostgreSQL server (`INSEAM_TEST_POSTGRES`, default the local one).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Connection as _, Row as _};
use inseam::sql::{RelayOptions, SqlStoreOptions};
use inseam::{Conflict, MessageMeta, RetryOnConflict};
use inseam_tests::cart::{self, AddItems, Cart, CartEvent, CheckOut, Gate, ItemAdded};
use inseam_tests::{Backend, TestDb, eventually};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(30);

async fn store(db: &TestDb) -> SqlStore {
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        outbox_retention: Duration::ZERO,
        ..RelayOptions::default()
    };
    SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .expect("connect the store")
}

fn add(cart: &str, count: u32) -> AddItems {
    AddItems {
        cart: cart.to_owned(),
        sku: "tea".to_owned(),
        count,
    }
}

/// What the `cart_log` group received.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<ItemAdded>>>);

impl Log {
    fn items(&self) -> Vec<ItemAdded> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[event_handler(group = "cart_log")]
async fn log_added(ev: &Envelope<ItemAdded>, State(log): State<Log>) {
    log.0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((**ev).clone());
}

async fn stream_versions(store: &SqlStore, stream: &str) -> Vec<i64> {
    sqlx::query(
        "SELECT stream_version FROM inseam_outbox WHERE stream = $1 ORDER BY stream_version",
    )
    .bind(stream.to_owned())
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|row| row.get::<i64, _>(0))
    .collect()
}

/// Saved events are the stream and are published: subscribers get them through the outbox,
/// loading folds them, and retention never prunes them.
async fn appends_loads_and_publishes(backend: Backend) {
    let db = TestDb::new(backend, "es_basics").await;
    let store = store(&db).await;
    let log = Log::default();
    let app = cart::builder(store.clone(), Gate::default())
        .state(log.clone())
        .handler::<log_added>()
        .build()
        .await
        .unwrap();
    let relay = app.start();
    assert_eq!(app.send(add("c1", 3)).await.unwrap(), 3);
    assert_eq!(app.send(add("c1", 2)).await.unwrap(), 5);
    assert_eq!(
        app.send(CheckOut { cart: "c1".into() }).await.unwrap(),
        1250
    );
    let refused = app.send(add("c1", 1)).await.unwrap_err();
    assert_eq!(refused.to_string(), "cart `c1` is checked out");
    let empty = app.send(CheckOut { cart: "c2".into() }).await.unwrap_err();
    assert_eq!(empty.to_string(), "cart `c2` is empty");

    let loaded = app.load::<Cart>("c1").await.unwrap();
    assert_eq!(loaded.version(), 6);
    assert_eq!(loaded.stream(), "cart-c1");
    assert_eq!(loaded.items["tea"], (5, 250));
    assert!(loaded.checked_out);
    assert!(!app.load::<Cart>("c2").await.unwrap().exists());

    eventually(WAIT, "five ItemAdded delivered to cart_log", || async {
        (log.items().len() >= 5).then_some(())
    })
    .await;
    relay.shutdown().await;
    assert_eq!(log.items().len(), 5);
    // Retention zero prunes every delivered message, but not a stream's events.
    store.prune().await.unwrap();
    assert_eq!(stream_versions(&store, "cart-c1").await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(app.load::<Cart>("c1").await.unwrap().version(), 6);
}

/// Concurrent writers of one stream: on PostgreSQL, eight commands forced to load the same
/// version: exactly one appends, seven get the typed conflict; then, with `RetryOnConflict`,
/// all eight apply and the stream has no gap and no duplicate. On SQLite too: a command takes
/// the write lock only to commit, so all eight load before any of them writes.
async fn concurrent_writers(backend: Backend) {
    let db = TestDb::new(backend, "es_concurrency").await;
    let store = store(&db).await;
    const WRITERS: usize = 8;

    {
        let app = cart::builder(store.clone(), Gate::new(WRITERS))
            .build()
            .await
            .unwrap();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { app.send(add("race", 1)).await })
            })
            .collect();
        let mut won = 0;
        let mut conflicts = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(version) => {
                    assert_eq!(version, 1);
                    won += 1;
                }
                Err(error) => match error.conflict() {
                    Some(conflict) => conflicts.push(conflict.clone()),
                    None => panic!("unexpected error: {error}"),
                },
            }
        }
        assert_eq!(won, 1);
        assert_eq!(conflicts.len(), WRITERS - 1);
        let expected = Conflict {
            stream: "cart-race".into(),
            version: 1,
        };
        assert!(conflicts.iter().all(|c| *c == expected), "{conflicts:?}");
        assert_eq!(
            conflicts[0].to_string(),
            "stream `cart-race` changed concurrently: version 1 was appended by another writer first"
        );
        assert_eq!(stream_versions(&store, "cart-race").await, [1]);
    }

    let app = cart::builder(store.clone(), Gate::new(WRITERS))
        .layer(RetryOnConflict::new(WRITERS as u32 + 2).command::<AddItems>())
        .build()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.send(add("retried", 1)).await })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=WRITERS as u64).collect::<Vec<_>>());
    assert_eq!(
        stream_versions(&store, "cart-retried").await,
        (1..=WRITERS as i64).collect::<Vec<_>>()
    );
    let cart = app.load::<Cart>("retried").await.unwrap();
    assert_eq!(cart.items["tea"].0, WRITERS as u32);
}

/// 10,050 events with a snapshot every 100: loading replays the 50 after the last snapshot and
/// yields the state of a full replay; a snapshot of another schema version, or one that does
/// not deserialize, is ignored and the stream replayed.
async fn snapshots_bound_the_replay(backend: Backend) {
    let db = TestDb::new(backend, "es_snapshots").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    for _ in 0..100 {
        app.send(add("big", 100)).await.unwrap();
    }
    assert_eq!(app.send(add("big", 50)).await.unwrap(), 10_050);

    let loaded = app.load::<Cart>("big").await.unwrap();
    assert_eq!(loaded.version(), 10_050);
    assert_eq!(loaded.replayed(), 50);
    let with_snapshot = loaded.into_state();
    assert_eq!(with_snapshot.events, 10_050);

    sqlx::query("DELETE FROM inseam_snapshots")
        .execute(store.pool())
        .await
        .unwrap();
    let full = app.load::<Cart>("big").await.unwrap();
    assert_eq!(full.replayed(), 10_050);
    assert_eq!(*full.state(), with_snapshot);

    // A snapshot that would be misread if trusted: an empty cart claimed at version 10,000.
    let empty = serde_json::to_vec(&Cart::default()).unwrap();
    for (schema, state) in [(99_i64, empty.clone()), (1, b"{not json".to_vec())] {
        sqlx::query("DELETE FROM inseam_snapshots")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO inseam_snapshots (stream, version, schema_version, state, taken_at) VALUES ('cart-big', 10000, $1, $2, 0)",
        )
        .bind(schema)
        .bind(state)
        .execute(store.pool())
        .await
        .unwrap();
        let loaded = app.load::<Cart>("big").await.unwrap();
        assert_eq!(loaded.replayed(), 10_050, "schema {schema}");
        assert_eq!(*loaded.state(), with_snapshot, "schema {schema}");
    }
    // The next save that crosses a multiple of 100 writes a good snapshot again.
    app.send(add("big", 50)).await.unwrap();
    assert_eq!(app.load::<Cart>("big").await.unwrap().replayed(), 0);
}

fn fixture_v1() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/upcasting/cart_item_added_v1.json"
    ))
    .expect("the v1 fixture")
}

/// A v1 `cart.item_added` written by an earlier build is read as v2 through the upcaster,
/// from the event store and from the dead letters.
async fn upcasting_stored_payloads(backend: Backend) {
    let db = TestDb::new(backend, "es_upcasting").await;
    let store = store(&db).await;
    let log = Log::default();
    let app = cart::builder(store.clone(), Gate::default())
        .state(log.clone())
        .handler::<log_added>()
        .build()
        .await
        .unwrap();
    let v1 = fixture_v1();
    sqlx::query(
        "INSERT INTO inseam_outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version)
         VALUES ('01933b5e-7a00-7000-8000-000000000001', 'cart.item_added', 1, NULL, $1, 0, 'cart-old', 1)",
    )
    .bind(v1.clone())
    .execute(store.pool())
    .await
    .unwrap();
    let old = app.load::<Cart>("old").await.unwrap();
    assert_eq!(old.version(), 1);
    // Read forward from a version, as the current version.
    let stored = app.read_stream("cart-old", 0).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].envelope.version, 2);
    assert_eq!(
        stored[0].envelope.decode::<ItemAdded>().unwrap().payload,
        ItemAdded {
            sku: "tea".into(),
            qty: 3,
            unit_price: 0
        }
    );
    assert_eq!(old.items["tea"], (3, 0));
    assert_eq!(app.send(add("old", 1)).await.unwrap(), 2);
    assert_eq!(
        app.load::<Cart>("old").await.unwrap().items["tea"],
        (4, 250)
    );

    // The same v1 payload, dead-lettered by an earlier build, retried now.
    let dead = String::from_utf8(v1)
        .unwrap()
        .replace("000000000001\"", "000000000002\"");
    sqlx::query(
        "INSERT INTO inseam_dead_letters (grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
         VALUES ('cart_log', '01933b5e-7a00-7000-8000-000000000002', 'cart.item_added', 1, NULL, $1, 'ledger down', 3, 0, 0)",
    )
    .bind(dead.into_bytes())
    .execute(store.pool())
    .await
    .unwrap();
    let relay = app.start();
    let letters = store.dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    store.retry_dead_letter(letters[0].id).await.unwrap();
    eventually(WAIT, "the upcast dead letter delivered", || async {
        log.items()
            .contains(&ItemAdded {
                sku: "tea".into(),
                qty: 3,
                unit_price: 0,
            })
            .then_some(())
    })
    .await;
    relay.shutdown().await;
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
}

/// A stream read as of an instant holds the events recorded up to then.
async fn as_of_an_instant(backend: Backend) {
    let db = TestDb::new(backend, "es_as_of").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    app.send(add("t", 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    app.send(add("t", 2)).await.unwrap();
    let then = app.load_as_of::<Cart>("t", at).await.unwrap();
    assert_eq!((then.version(), then.items["tea"].0), (1, 1));
    let now = app.load::<Cart>("t").await.unwrap();
    assert_eq!((now.version(), now.items["tea"].0), (3, 3));
    let before = app
        .load_as_of::<Cart>("t", at - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert!(!before.exists());
}

/// A command whose caller goes away while its rows wait for the group commit (a timeout, a
/// dropped request) is withdrawn: its rows never commit with a later statement. A command whose
/// rows a statement already took commits with it, as a commit in flight does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_abandoned_in_the_group_commit_queue_never_commits() {
    let db = TestDb::new(Backend::Postgres, "es_group_abandoned").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    // Holds back every insert into the outbox (reads go on).
    let mut lock = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE inseam_outbox IN SHARE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let in_flight = {
        let app = app.clone();
        tokio::spawn(async move { app.send(add("in-flight", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), app.send(add("abandoned", 1))).await;
    assert!(abandoned.is_err(), "the command should still be waiting");
    lock.rollback().await.unwrap();
    assert_eq!(in_flight.await.unwrap().unwrap(), 1);
    assert_eq!(app.send(add("after", 1)).await.unwrap(), 1);
    assert_eq!(stream_versions(&store, "cart-in-flight").await, [1]);
    assert_eq!(stream_versions(&store, "cart-after").await, [1]);
    assert_eq!(
        stream_versions(&store, "cart-abandoned").await,
        Vec::<i64>::new()
    );
}

/// A unit of work with more outbox rows than one statement takes commits them in a
/// transaction of its own.
#[tokio::test]
async fn a_unit_larger_than_a_group_statement_commits_alone() {
    let db = TestDb::new(Backend::Postgres, "es_group_large").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    let events = (0..1_500)
        .map(|_| {
            CartEvent::Added(ItemAdded {
                sku: "tea".into(),
                qty: 1,
                unit_price: 250,
            })
        })
        .collect();
    let version = app
        .append::<Cart>("large", events, MessageMeta::new())
        .await
        .unwrap();
    assert_eq!(version, 1_500);
    assert_eq!(
        stream_versions(&store, "cart-large").await,
        (1..=1_500).collect::<Vec<i64>>()
    );
}

/// Why the inline check refused an item.
#[derive(Debug, thiserror::Error)]
#[error("sku `{0}` is refused")]
struct Refused(String);

/// Refuses the sku `refused`, failing the command after its cart was saved.
#[event_handler(inline)]
async fn refuse(ev: &Envelope<ItemAdded>) -> Result<(), Refused> {
    if ev.sku == "refused" {
        return Err(Refused(ev.sku.clone()));
    }
    Ok(())
}

/// An aggregate cache: loads of a saved cart read nothing from the store, which shows when
/// another app (another instance) appends behind its back: the cached app's next command
/// appends at the version it cached and gets the typed conflict, the stream is forgotten, and
/// the next attempt loads the store and applies on fresh state, with no gap. A command that
/// saved its cart and then failed leaves the cache as it was.
async fn cached_aggregates(backend: Backend) {
    let db = TestDb::new(backend, "es_cache").await;
    let store = store(&db).await;
    let cached = cart::builder(store.clone(), Gate::default())
        .cache_aggregate::<Cart>(100)
        .handler::<refuse>()
        .build()
        .await
        .unwrap();
    let other = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    // Declared by the builder and again by the cache: one aggregate.
    assert_eq!(cached.catalog().aggregates.len(), 1);

    assert_eq!(cached.send(add("c", 2)).await.unwrap(), 2);
    assert_eq!(cached.send(add("c", 1)).await.unwrap(), 3);
    // Another instance appends version 4; the cached app still holds version 3.
    assert_eq!(other.send(add("c", 1)).await.unwrap(), 4);
    match cached
        .send(add("c", 1))
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::Conflict(conflict))) => assert_eq!(
            conflict,
            Conflict {
                stream: "cart-c".into(),
                version: 4
            }
        ),
        other => panic!("expected a conflict from the cached version, got {other:?}"),
    }
    // Forgotten: this load reads the store, sees version 4 and appends 5.
    assert_eq!(cached.send(add("c", 1)).await.unwrap(), 5);
    assert_eq!(stream_versions(&store, "cart-c").await, [1, 2, 3, 4, 5]);

    // Saved, then failed by the inline check: nothing committed, and nothing cached.
    let refused = AddItems {
        cart: "c".into(),
        sku: "refused".into(),
        count: 1,
    };
    assert!(matches!(
        cached
            .send(refused)
            .await
            .map_err(DispatchError::into_failure),
        Err(Ok(DispatchFailure::Subscriber { .. }))
    ));
    assert_eq!(cached.send(add("c", 1)).await.unwrap(), 6);
    assert_eq!(stream_versions(&store, "cart-c").await, [1, 2, 3, 4, 5, 6]);
    let cart = cached.load::<Cart>("c").await.unwrap();
    assert_eq!((cart.version(), cart.items["tea"].0), (6, 6));
    assert!(!cart.items.contains_key("refused"));

    // With `RetryOnConflict`, a stale cache costs one retry and no error.
    let retried = cart::builder(store.clone(), Gate::default())
        .cache_aggregate::<Cart>(100)
        .layer(RetryOnConflict::new(2).command::<AddItems>())
        .build()
        .await
        .unwrap();
    assert_eq!(retried.send(add("r", 1)).await.unwrap(), 1);
    assert_eq!(other.send(add("r", 1)).await.unwrap(), 2);
    assert_eq!(retried.send(add("r", 1)).await.unwrap(), 3);
    assert_eq!(stream_versions(&store, "cart-r").await, [1, 2, 3]);

    // Through a layer that does not retry, the conflict reaches the caller as itself.
    let layered = cart::builder(store.clone(), Gate::default())
        .cache_aggregate::<Cart>(100)
        .layer(inseam::TraceLayer::new())
        .build()
        .await
        .unwrap();
    assert_eq!(layered.send(add("l", 1)).await.unwrap(), 1);
    assert_eq!(other.send(add("l", 1)).await.unwrap(), 2);
    let error = layered.send(add("l", 1)).await.unwrap_err();
    assert_eq!(
        error.conflict(),
        Some(&Conflict {
            stream: "cart-l".into(),
            version: 2
        }),
        "{error:?}"
    );
    assert_eq!(stream_versions(&store, "cart-l").await, [1, 2]);
}

inseam_tests::on_every_backend!(
    appends_loads_and_publishes,
    concurrent_writers,
    snapshots_bound_the_replay,
    upcasting_stored_payloads,
    as_of_an_instant,
    cached_aggregates,
);

/// PostgreSQL commits the outbox rows of commands that never asked for a transaction in
/// statements shared by whoever commits at the same time. 64 commands committing together:
/// 60 to carts of their own, 4 racing for version 1 of one cart. Each of the 60 applies once,
/// exactly one racer wins and three get the typed conflict, whatever batch they shared; and
/// fewer statements than commands were needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_statements_and_isolates_conflicts() {
    let db = TestDb::new(Backend::Postgres, "es_group_commit").await;
    let store = store(&db).await;
    const OWN: usize = 60;
    const RACERS: usize = 4;
    let app = cart::builder(store.clone(), Gate::new(OWN + RACERS))
        .build()
        .await
        .unwrap();
    let before = store.commit_stats();
    let tasks: Vec<_> = (0..OWN + RACERS)
        .map(|i| {
            let app = app.clone();
            let cart = if i < OWN {
                format!("own-{i}")
            } else {
                "raced".to_owned()
            };
            tokio::spawn(async move { (i, app.send(add(&cart, 1)).await) })
        })
        .collect();
    let (mut won, mut conflicts) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (i, Ok(version)) if i < OWN => assert_eq!(version, 1),
            (_, Ok(version)) => {
                assert_eq!(version, 1);
                won += 1;
            }
            (i, Err(error)) if i >= OWN && error.is_conflict() => {
                assert_eq!(
                    error.conflict(),
                    Some(&Conflict {
                        stream: "cart-raced".into(),
                        version: 1
                    })
                );
                conflicts += 1;
            }
            (i, Err(other)) => panic!("command {i}: {other}"),
        }
    }
    assert_eq!((won, conflicts), (1, RACERS - 1));
    for i in 0..OWN {
        assert_eq!(stream_versions(&store, &format!("cart-own-{i}")).await, [1]);
    }
    assert_eq!(stream_versions(&store, "cart-raced").await, [1]);
    let rows: i64 = sqlx::query("SELECT count(*) FROM inseam_outbox")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, (OWN + 1) as i64);
    let stats = store.commit_stats();
    let units = stats.units - before.units;
    let statements = stats.statements - before.statements;
    assert_eq!(units, (OWN + 1) as u64, "{stats:?}");
    assert!(statements < units, "no statement was shared: {stats:?}");
}

/// A group-committed statement wakes the relays (PostgreSQL's `NOTIFY` on the outbox channel)
/// only when a group reads one of its rows: an event nobody subscribed to is written without a
/// wake-up, one a group reads with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_wakes_the_relays_only_for_events_a_group_reads() {
    let db = TestDb::new(Backend::Postgres, "es_group_wake").await;
    let store = store(&db).await;
    let quiet = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    let read = cart::builder(store.clone(), Gate::default())
        .state(Log::default())
        .handler::<log_added>()
        .build()
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("inseam_outbox").await.unwrap();

    assert_eq!(quiet.send(add("quiet", 1)).await.unwrap(), 1);
    let woken = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(
        woken.is_err(),
        "an event no group reads woke the relays: {woken:?}"
    );
    assert_eq!(stream_versions(&store, "cart-quiet").await, [1]);

    assert_eq!(read.send(add("read", 1)).await.unwrap(), 1);
    let woken = tokio::time::timeout(WAIT, listener.recv())
        .await
        .unwrap_or_else(|_| panic!("an event the group `cart_log` reads did not wake the relays"))
        .unwrap();
    assert_eq!(woken.channel(), "inseam_outbox");
    assert_eq!(stream_versions(&store, "cart-read").await, [1]);
}

/// A pooled connection the server closed while it sat idle (a restart, an idle timeout, an
/// operator's `pg_terminate_backend`) is pinged and replaced before a command uses it, once it
/// has been idle for more than a second (decision 0028).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_replaced_before_use() {
    let db = TestDb::new(Backend::Postgres, "es_pool_closed").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .build()
        .await
        .unwrap();
    assert_eq!(app.send(add("kept", 1)).await.unwrap(), 1);

    let mut admin = sqlx::postgres::PgConnection::connect(&db.url)
        .await
        .unwrap();
    let closed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        !closed.is_empty() && closed.iter().all(|c| *c),
        "the app's pooled connections were not closed: {closed:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    assert_eq!(app.send(add("kept", 1)).await.unwrap(), 2);
    assert_eq!(stream_versions(&store, "cart-kept").await, [1, 2]);
}

/// An event at version 2 without the upcaster from 1, and an upcaster from a version that is
/// not older than the event's: both reported by `build()`, with everything else wrong.
#[tokio::test]
async fn upcasting_gaps_are_build_errors() {
    let error = App::builder()
        .aggregate::<Cart>()
        .upcaster("cart.item_added", 2, Ok)
        .upcaster("cart.item_renamed", 1, Ok)
        .build()
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the app has 3 wiring problems:
  1. event `cart.item_added` is at version 2 but has no upcaster from version 1; add `.upcaster(\"cart.item_added\", 1, ..)` to the builder so that stored v1 payloads can be read
  2. an upcaster reads `cart.item_added` version 2, but the event is at version 2; upcasters read older versions only
  3. an upcaster reads `cart.item_renamed` version 1, but no registered event or aggregate has that name"
    );
}

fn cart_event() -> impl Strategy<Value = CartEvent> {
    let sku = prop::sample::select(vec!["tea", "cup", "pot", "lid"]);
    prop_oneof![
        4 => (sku.clone(), 1..5_u32, 0..1_000_u64).prop_map(|(sku, qty, unit_price)| {
            CartEvent::Added(ItemAdded { sku: sku.to_owned(), qty, unit_price })
        }),
        2 => sku.prop_map(|sku| CartEvent::Removed(cart::ItemRemoved { sku: sku.to_owned() })),
        1 => (0..10_000_u64).prop_map(|total| CartEvent::CheckedOut(cart::CheckedOut { total })),
    ]
}

proptest! {
    /// Restoring a snapshot taken after any prefix and applying the rest equals replaying the
    /// whole sequence.
    #[test]
    fn a_snapshot_then_the_rest_equals_a_full_replay(
        events in prop::collection::vec(cart_event(), 0..300),
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(events.len() + 1);
        let mut full = Cart::default();
        for event in &events {
            full.apply(event);
        }
        let mut prefix = Cart::default();
        for event in &events[..cut] {
            prefix.apply(event);
        }
        let snapshot = serde_json::to_vec(&prefix).unwrap();
        let mut restored: Cart = serde_json::from_slice(&snapshot).unwrap();
        for event in &events[cut..] {
            restored.apply(event);
        }
        prop_assert_eq!(restored, full);
    }
}
