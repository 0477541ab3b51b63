//! Two processes of one app over a transport (the in-process reference transport, two apps
//! with their own databases in this test): the `billing` module runs in the second one by
//! configuration alone. Its group gets every order once, what it publishes comes back to the
//! main process's group, the bytes on the wire are the outbox rows, an outage makes rows wait
//! (lag grows) and loses nothing, and bytes that are not an envelope become a dead letter.

use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{RelayOptions, SqlStoreOptions};
use inseam::transport::{InProcess, Outgoing, Transport as _};
use inseam::{Routing, WiringProblem};
use inseam_tests::{Backend, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "orders.place", output = ())]
struct Place {
    order: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.placed", key = key)]
struct Placed {
    key: String,
    order: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "billing.charged", key = key)]
struct Charged {
    key: String,
    order: i64,
}

#[command_handler(publishes(Placed))]
async fn place(cmd: Place, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(Placed {
        key: format!("k{}", cmd.order % 5),
        order: cmd.order,
    });
    Ok(())
}

/// The billing module's group: records the charge in its own table, publishes `Charged`.
#[event_handler(group = "billing.ledger", publishes(Charged))]
async fn charge(ev: &Envelope<Placed>, ctx: &mut EventContext<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO billing_ledger (order_id) VALUES ($1)")
        .bind(ev.order)
        .execute(
            ctx.tx()
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?,
        )
        .await?;
    ctx.publish(Charged {
        key: ev.payload.key.clone(),
        order: ev.order,
    });
    Ok(())
}

/// The orders module's group, in the main process: records what billing charged.
#[event_handler(group = "orders.status")]
async fn charged(ev: &Envelope<Charged>, ctx: &mut EventContext<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO orders_charged (order_id) VALUES ($1)")
        .bind(ev.order)
        .execute(
            ctx.tx()
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?,
        )
        .await?;
    Ok(())
}

/// Answered by the billing process: how many orders it charged.
#[derive(Debug, Clone, Serialize, Deserialize, Query)]
#[query(name = "billing.balance", output = i64)]
struct Balance;

#[query_handler]
async fn balance(_: Balance, ctx: &QueryContext<'_>) -> Result<i64, std::convert::Infallible> {
    let store = ctx.app().state::<SqlStore>().cloned();
    let Some(store) = store else { return Ok(-1) };
    Ok(orders(&store, "billing_ledger").await.len() as i64)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum RefundError {
    #[error("order {0} was never charged")]
    NeverCharged(i64),
}

/// Answered by the billing process, with a typed error.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "billing.refund", output = String, error = RefundError)]
struct Refund {
    order: i64,
}

#[command_handler]
async fn refund(cmd: Refund, ctx: &mut CommandContext<'_>) -> Result<String, RefundError> {
    let row = sqlx::query("SELECT COUNT(*) FROM billing_ledger WHERE order_id = $1")
        .bind(cmd.order)
        .fetch_one(ctx.tx().await.map_err(|_| RefundError::NeverCharged(-1))?)
        .await
        .map_err(|_| RefundError::NeverCharged(-1))?;
    if row.get::<i64, _>(0) == 0 {
        return Err(RefundError::NeverCharged(cmd.order));
    }
    Ok(format!("refunded order {}", cmd.order))
}

/// Billing's audit: its error cannot travel, so it cannot be answered by another process.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "billing.audit", error = std::io::Error)]
struct Audit;

#[command_handler]
async fn audit(_: Audit) -> Result<(), std::io::Error> {
    Ok(())
}

fn routing() -> Routing {
    Routing::from_toml(
        r#"
        [processes.billing]
        transport = "in-process"
        modules = ["billing"]
        "#,
    )
    .unwrap()
}

async fn process(db: &TestDb, transport: &InProcess, routing: Routing) -> (App, SqlStore) {
    process_with(db, transport, routing, RelayOptions::default()).await
}

async fn process_with(
    db: &TestDb,
    transport: &InProcess,
    routing: Routing,
    relay: RelayOptions,
) -> (App, SqlStore) {
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    for table in ["billing_ledger", "orders_charged"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (order_id BIGINT NOT NULL)"
        )))
        .execute(store.pool())
        .await
        .unwrap();
    }
    let app = App::builder()
        .store(store.clone())
        .handler::<place>()
        .handler::<charge>()
        .handler::<charged>()
        .handler::<balance>()
        .handler::<refund>()
        .state(store.clone())
        .transport(transport.clone())
        .routing(routing)
        .build()
        .await
        .unwrap();
    (app, store)
}

/// The main process on a store that reads the outbox by position or not.
async fn main_process(db: &TestDb, transport: &InProcess, by_position: bool) -> (App, SqlStore) {
    let relay = RelayOptions {
        read_by_position: by_position,
        poll_interval: Duration::from_millis(20),
        ..RelayOptions::default()
    };
    process_with(db, transport, routing(), relay).await
}

/// Events bound for another process, written while the store read the outbox by position (no
/// delivery row) and then while it did not (a row each), or the other way round: a publisher
/// started under either setting publishes both kinds, each once.
async fn either_kind_is_published(backend: Backend, first_by_position: bool) {
    let main_db = TestDb::new(backend, "remote_kinds_main").await;
    let billing_db = TestDb::new(backend, "remote_kinds_billing").await;
    let transport = InProcess::new();
    let (billing, billing_store) =
        process(&billing_db, &transport, routing().this_process("billing")).await;
    let billing_relay = billing.start();
    let (before, _) = main_process(&main_db, &transport, first_by_position).await;
    for order in 0..10 {
        before.send(Place { order }).await.unwrap();
    }
    drop(before);
    let (after, main_store) = main_process(&main_db, &transport, !first_by_position).await;
    for order in 10..20 {
        after.send(Place { order }).await.unwrap();
    }
    let relay = after.start();
    let all: Vec<i64> = (0..20).collect();
    eventually(
        WAIT,
        "every order charged back in the main process",
        || async { (orders(&main_store, "orders_charged").await.len() >= 20).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(orders(&billing_store, "billing_ledger").await, all);
    assert_eq!(orders(&main_store, "orders_charged").await, all);
    assert_eq!(pending(&main_store, "transport:in-process").await, 0);
    relay.shutdown().await;
    billing_relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_positions_then_rows_are_published() {
    either_kind_is_published(Backend::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rows_then_positions_are_published() {
    either_kind_is_published(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_positions_then_rows_are_published() {
    either_kind_is_published(Backend::Postgres, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_then_positions_are_published() {
    either_kind_is_published(Backend::Postgres, false).await;
}

async fn orders(store: &SqlStore, table: &str) -> Vec<i64> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT order_id FROM {table} ORDER BY order_id"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.iter().map(|r| r.get::<i64, _>(0)).collect()
}

async fn envelope_bytes(store: &SqlStore, name: &str) -> Vec<(String, Vec<u8>)> {
    let rows = sqlx::query(
        "SELECT message_id, envelope FROM inseam_outbox WHERE name = $1 ORDER BY message_id",
    )
    .bind(name.to_owned())
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.iter()
        .map(|r| (r.get::<String, _>(0), r.get::<Vec<u8>, _>(1)))
        .collect()
}

async fn pending(store: &SqlStore, group: &str) -> i64 {
    store
        .lag()
        .await
        .unwrap()
        .groups
        .iter()
        .find(|g| g.group == group)
        .map_or(0, |g| g.pending)
}

async fn split_over_a_transport(backend: Backend) {
    let main_db = TestDb::new(backend, "remote_main").await;
    let billing_db = TestDb::new(backend, "remote_billing").await;
    let transport = InProcess::new();
    let (main, main_store) = process(&main_db, &transport, routing()).await;
    let (_billing, billing_store) =
        process(&billing_db, &transport, routing().this_process("billing")).await;
    // The main process runs its own group and publishes to the transport; billing's runs
    // elsewhere.
    assert_eq!(main.groups(), ["orders.status", "transport:in-process"]);
    assert_eq!(
        _billing.groups(),
        ["billing.ledger", "transport:in-process"]
    );
    let main_relay = main.start();
    let billing_relay = _billing.start();

    for order in 0..20 {
        main.send(Place { order }).await.unwrap();
    }
    let all: Vec<i64> = (0..20).collect();
    eventually(
        WAIT,
        "every order charged back in the main process",
        || async { (orders(&main_store, "orders_charged").await.len() >= 20).then_some(()) },
    )
    .await;
    assert_eq!(orders(&billing_store, "billing_ledger").await, all);
    assert_eq!(orders(&main_store, "orders_charged").await, all);
    // The bytes billing received are the rows the main process wrote, byte for byte.
    let sent = envelope_bytes(&main_store, "orders.placed").await;
    assert_eq!(sent.len(), 20);
    assert_eq!(envelope_bytes(&billing_store, "orders.placed").await, sent);

    // A query and a command answered by the billing process, over request-reply: typed
    // output, and a typed error.
    assert_eq!(main.query(Balance).await.unwrap(), 20);
    assert_eq!(
        main.send(Refund { order: 3 }).await.unwrap(),
        "refunded order 3"
    );
    match main.send(Refund { order: 99 }).await {
        Err(DispatchError::Handler(error)) => assert_eq!(error, RefundError::NeverCharged(99)),
        other => panic!("expected the typed error, got {other:?}"),
    }

    // Broker outage: rows wait in the outbox, lag shows them, nothing is lost.
    transport.set_available(false);
    for order in 20..40 {
        main.send(Place { order }).await.unwrap();
    }
    eventually(WAIT, "the transport's rows waiting", || async {
        (pending(&main_store, "transport:in-process").await == 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(orders(&billing_store, "billing_ledger").await.len(), 20);
    transport.set_available(true);
    let all: Vec<i64> = (0..40).collect();
    eventually(WAIT, "the backlog drained after the outage", || async {
        (orders(&main_store, "orders_charged").await.len() >= 40).then_some(())
    })
    .await;
    assert_eq!(orders(&billing_store, "billing_ledger").await, all);
    assert_eq!(orders(&main_store, "orders_charged").await, all);
    assert_eq!(pending(&main_store, "transport:in-process").await, 0);

    // A message published again (a relay that crashed before deleting its row) has no second
    // effect; bytes that are not an envelope become a dead letter with the reason.
    let (message_id, bytes) = sent[0].clone();
    let again = Outgoing {
        channel: "orders.placed".to_owned(),
        message_id: uuid::Uuid::now_v7(),
        key: None,
        headers: Vec::new(),
        payload: bytes.into(),
    };
    let garbage = Outgoing {
        channel: "orders.placed".to_owned(),
        message_id: uuid::Uuid::now_v7(),
        key: None,
        headers: vec![("ce-type".to_owned(), "orders.placed".to_owned())],
        payload: b"{not json".to_vec().into(),
    };
    for outcome in transport.publish(&[again, garbage]).await {
        outcome.unwrap();
    }
    let letters = eventually(WAIT, "the malformed message dead-lettered", || async {
        let letters = billing_store.dead_letters(0, 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].group, "billing.ledger");
    assert_eq!(letters[0].envelope, b"{not json");
    assert!(
        letters[0].error.contains("malformed envelope"),
        "{}",
        letters[0].error
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(orders(&billing_store, "billing_ledger").await, all);
    assert!(!message_id.is_empty());

    main_relay.shutdown().await;
    billing_relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_split_over_a_transport() {
    split_over_a_transport(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_split_over_a_transport() {
    split_over_a_transport(Backend::Postgres).await;
}

/// An envelope with a NUL in its key, which PostgreSQL's text columns refuse, becomes a dead
/// letter instead of failing its batch at every redelivery; the message received with it goes
/// through. On SQLite it is kept and delivered like any other.
async fn a_nul_in_a_received_key(backend: Backend) {
    let db = TestDb::new(backend, "remote_nul").await;
    let transport = InProcess::new();
    let (billing, store) = process(&db, &transport, routing().this_process("billing")).await;
    let relay = billing.start();
    let envelope = |id: u32, key: &str, order: i64| Outgoing {
        channel: "orders.placed".to_owned(),
        message_id: uuid::Uuid::now_v7(),
        key: Some(key.to_owned()),
        headers: vec![("ce-type".to_owned(), "orders.placed".to_owned())],
        payload: serde_json::json!({
            "specversion": "1.0",
            "id": format!("01937a5e-7c00-7000-8000-{id:012}"),
            "source": "elsewhere",
            "type": "orders.placed",
            "typeversion": 1,
            "time": "2026-12-02T00:00:00Z",
            "partitionkey": key,
            "correlationid": format!("01937a5e-7c00-7000-8000-{id:012}"),
            "data": {"key": key, "order": order},
        })
        .to_string()
        .into_bytes()
        .into(),
    };
    transport
        .provision(&["orders.placed".to_owned()])
        .await
        .unwrap();
    for outcome in transport
        .publish(&[envelope(1, "a\0b", 1), envelope(2, "k2", 2)])
        .await
    {
        outcome.unwrap();
    }
    match backend {
        Backend::Postgres => {
            eventually(WAIT, "the message after it charged", || async {
                (orders(&store, "billing_ledger").await == [2]).then_some(())
            })
            .await;
            let letters = store.dead_letters(0, 10).await.unwrap();
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0].key.as_deref(), Some("a\u{fffd}b"));
            assert!(
                letters[0]
                    .error
                    .contains("`partitionkey` has a NUL character"),
                "{}",
                letters[0].error
            );
        }
        Backend::Sqlite => {
            eventually(WAIT, "both charged", || async {
                (orders(&store, "billing_ledger").await == [1, 2]).then_some(())
            })
            .await;
            assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
        }
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_nul_in_a_received_key() {
    a_nul_in_a_received_key(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_nul_in_a_received_key() {
    a_nul_in_a_received_key(Backend::Postgres).await;
}

#[tokio::test]
async fn routing_problems_are_build_errors() {
    let db = TestDb::sqlite();
    let store = SqlStore::connect(&db.url).await.unwrap();
    let error = App::builder()
        .store(store)
        .handler::<place>()
        .handler::<charge>()
        .handler::<charged>()
        .routing(
            Routing::from_toml(
                r#"
                [processes.billing]
                transport = "nats"
                modules = ["biling"]
                "#,
            )
            .unwrap()
            .this_process("billing"),
        )
        .build()
        .await
        .unwrap_err();
    let problems: Vec<String> = error
        .problems()
        .iter()
        .map(|p| match p {
            WiringProblem::Routing(text) => text.clone(),
            other => panic!("unexpected problem: {other}"),
        })
        .collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains("transport `nats`, which is not configured"));
    assert!(problems[1].contains("module `biling`"));
    assert!(problems[1].contains("`billing`"), "{}", problems[1]);
}

#[tokio::test]
async fn a_routed_command_that_cannot_travel_is_a_build_error() {
    let db = TestDb::sqlite();
    let store = SqlStore::connect(&db.url).await.unwrap();
    let error = App::builder()
        .store(store)
        .handler::<audit>()
        .handler::<charge>()
        .transport(InProcess::new())
        .routing(routing())
        .build()
        .await
        .unwrap_err();
    let problems: Vec<String> = error.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains("command `billing.audit`")
            && problems[0].contains("process `billing`")
            && problems[0].contains("cannot travel"),
        "{}",
        problems[0]
    );
}
