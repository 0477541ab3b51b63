//! A broker outage under load, for every broker: two processes of one app (two apps with their
//! own SQLite databases in this test) over a broker server of the test's own. Orders keep
//! coming every 20 ms while the server is down for 35 s; then it starts again on the same port
//! and store.
//! Nothing is lost and nothing takes effect twice: every order is recorded once by the billing
//! process and its answer once by the main process, and everything drains. While the server
//! is down the main process's rows for the transport wait, and its lag shows them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam_tests::brokers::Broker;
use inseam_tests::{TestDb, billing, eventually};

const OUTAGE: Duration = Duration::from_secs(35);
/// How often an order is placed.
const EVERY: Duration = Duration::from_millis(20);

async fn store(db: &TestDb, process: &str) -> SqlStore {
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    billing::create_schema(&store, process).await.unwrap();
    store
}

/// The rows waiting for `transport`, and the age of the oldest.
async fn waiting(store: &SqlStore, transport: &str) -> (i64, Duration) {
    let lag = store.lag().await.unwrap();
    lag.groups
        .iter()
        .find(|g| g.group == transport)
        .map_or((0, Duration::ZERO), |g| {
            (g.pending, g.oldest_age.unwrap_or_default())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_under_load() {
    outage_under_load(Broker::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_under_load() {
    outage_under_load(Broker::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_outage_under_load() {
    outage_under_load(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_under_load() {
    outage_under_load(Broker::Kafka).await;
}

async fn outage_under_load(broker: Broker) {
    // `RUST_LOG=inseam=debug` shows the transports' reconnections when a run goes wrong.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let _alone = inseam_tests::brokers::alone().await;
    let started = Instant::now();
    let transport = format!("transport:{}", broker.name());
    let mut server = broker.start_restartable();
    let main_db = TestDb::sqlite();
    let billing_db = TestDb::sqlite();
    let main_store = store(&main_db, "main").await;
    let billing_store = store(&billing_db, "billing").await;
    let main = billing::app(
        &main_store,
        broker.transport(&server.url()).await.unwrap(),
        "main",
    )
    .await
    .unwrap();
    let billing_app = billing::app(
        &billing_store,
        broker.transport(&server.url()).await.unwrap(),
        "billing",
    )
    .await
    .unwrap();
    assert_eq!(main.groups(), ["sales.status", transport.as_str()]);
    assert_eq!(billing_app.groups(), ["billing.ledger", transport.as_str()]);
    let main_relay = main.start();
    let billing_relay = billing_app.start();

    // Orders every 20 ms, for the whole test; each `send` commits in the main database only.
    let sent = Arc::new(AtomicI64::new(0));
    // Stopped by a flag, not by aborting the task: an abort can land after a `send` committed
    // and before `sent` counts it, leaving an order the test does not expect.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = Arc::clone(&stop);
        let main = main.clone();
        let sent = Arc::clone(&sent);
        async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let order = sent.load(Ordering::SeqCst);
                main.send(billing::Place { order }).await.unwrap();
                sent.store(order + 1, Ordering::SeqCst);
            }
        }
    });
    let main_pool = main_store.pool().clone();
    let billing_pool = billing_store.pool().clone();
    let answered = |at_least: usize| {
        let pool = main_pool.clone();
        async move {
            let n = billing::orders(&pool, "sales_charged").await.len();
            (n >= at_least).then_some(())
        }
    };
    eventually(
        Duration::from_secs(30),
        "the first orders answered over the broker",
        || answered(20),
    )
    .await;

    // The outage.
    server
        .stop()
        .unwrap_or_else(|error| panic!("stopping the broker: {error}"));
    let stopped_at = Instant::now();
    let sent_at_stop = sent.load(Ordering::SeqCst);
    // What was on its way when the server stopped has landed or waits by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ledger_early = billing::orders(&billing_pool, "billing_ledger").await.len();
    tokio::time::sleep(OUTAGE.saturating_sub(stopped_at.elapsed())).await;
    let sent_during = sent.load(Ordering::SeqCst) - sent_at_stop;
    let (waiting_at_end, oldest) = waiting(&main_store, &transport).await;
    let ledger_late = billing::orders(&billing_pool, "billing_ledger").await;
    // No order placed during the outage got through (the one being placed when the broker
    // stopped may have been published just before).
    let crossed: Vec<i64> = ledger_late
        .iter()
        .copied()
        .filter(|order| *order > sent_at_stop)
        .collect();
    assert_eq!(
        crossed,
        Vec::<i64>::new(),
        "orders placed while the broker was down reached the billing process"
    );
    // Nor did any other, except, over Kafka, what the billing process's consumer had already
    // fetched before the stop: librdkafka reads ahead, and the transport hands those records
    // out one per partition while the broker is away (their offsets are committed, or they
    // come again and the inbox skips them, once it is back).
    if broker != Broker::Kafka {
        assert_eq!(
            ledger_late.len(),
            ledger_early,
            "the billing process received orders while the broker was down"
        );
    }
    assert!(
        sent_during >= (OUTAGE.as_millis() / EVERY.as_millis() / 2) as i64,
        "too little load during the outage: {sent_during} orders"
    );
    // Every order placed during the outage waits in the main database, the oldest since
    // about when the broker stopped.
    assert!(
        waiting_at_end >= sent_during,
        "{waiting_at_end} rows wait for the transport, {sent_during} orders were placed during the outage"
    );
    assert!(
        oldest >= OUTAGE - Duration::from_secs(5),
        "the oldest waiting row is {oldest:?} old after a {OUTAGE:?} outage"
    );

    server.start_again();
    let restarted_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    if let Err(error) = load.await
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
    let total = sent.load(Ordering::SeqCst);
    let drained = loop {
        let answered = billing::orders(&main_pool, "sales_charged").await.len();
        if answered >= total as usize {
            break restarted_at.elapsed();
        }
        if restarted_at.elapsed() > Duration::from_secs(60) {
            // Where the orders stand, to tell which leg stopped: the main process's
            // publishing, the billing process's consuming or publishing, or the answers'
            // consuming back in the main process.
            let ledger = billing::orders(&billing_pool, "billing_ledger").await.len();
            let main_lag = main_store.lag().await.unwrap();
            let billing_lag = billing_store.lag().await.unwrap();
            panic!(
                "timed out 60 s after the restart waiting for every order answered: {total} placed, \
                 {ledger} in the billing ledger, {answered} answered; main lag {main_lag:?}; \
                 billing lag {billing_lag:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let all: Vec<i64> = (0..total).collect();
    let ledger = billing::orders(&billing_pool, "billing_ledger").await;
    let charged = billing::orders(&main_pool, "sales_charged").await;
    assert_eq!(billing::duplicates(&ledger), [], "orders recorded twice");
    assert_eq!(billing::duplicates(&charged), [], "answers recorded twice");
    assert_eq!(ledger, all, "the billing process's orders");
    assert_eq!(charged, all, "the answers in the main process");
    eventually(Duration::from_secs(10), "both processes idle", || async {
        let main_lag = main_store.lag().await.unwrap();
        let billing_lag = billing_store.lag().await.unwrap();
        (main_lag.groups.is_empty() && billing_lag.groups.is_empty()).then_some(())
    })
    .await;
    for store in [&main_store, &billing_store] {
        assert_eq!(store.lag().await.unwrap().dead_letters, 0);
    }
    main_relay.shutdown().await;
    billing_relay.shutdown().await;
    eprintln!(
        "{}: {total} orders, {sent_during} placed during a {OUTAGE:?} outage ({waiting_at_end} rows waiting at its end, the oldest {oldest:?}); drained {drained:?} after the restart; {:?} in all",
        broker.name(),
        started.elapsed()
    );
}
