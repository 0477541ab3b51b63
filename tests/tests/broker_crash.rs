//! The consuming process killed with SIGKILL across the broker, for every broker: the main
//! process (this test) places an order every 20 ms, published over a broker server of the
//! test's own, while the
//! process that runs the billing module (`billing_child`, with its own SQLite database) is
//! killed at random moments, again and again, and restarted each time. At the end every order
//! has exactly one row in the billing database and exactly one answer in the main one, and the
//! broker handed out again messages that a killed process had held.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam_tests::brokers::Broker;
use inseam_tests::{TestDb, billing, eventually};

const CHILD: &str = env!("CARGO_BIN_EXE_billing_child");

fn rounds() -> u32 {
    std::env::var("INSEAM_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20)
}

fn billing_process(broker: Broker, url: &str, db_url: &str) -> Child {
    Command::new(CHILD)
        .args([broker.name(), url, db_url])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the billing process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_consumer_killed() {
    consumer_killed(Broker::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_consumer_killed() {
    consumer_killed(Broker::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_consumer_killed() {
    consumer_killed(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_killed() {
    consumer_killed(Broker::Kafka).await;
}

async fn consumer_killed(broker: Broker) {
    let _alone = inseam_tests::brokers::alone().await;
    let started = Instant::now();
    let server = broker.start();
    let main_db = TestDb::sqlite();
    let billing_db = TestDb::sqlite();
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        inbound_ack_wait: Duration::from_secs(2),
        ..RelayOptions::default()
    };
    let main_store = SqlStore::connect_with(&main_db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    billing::create_schema(&main_store, "main").await.unwrap();
    let main = billing::app(
        &main_store,
        broker.transport(&server.url()).await.unwrap(),
        "main",
    )
    .await
    .unwrap();
    let main_relay = main.start();
    // The billing database, read by this test while the billing process writes it.
    let billing_store = SqlStore::connect(&billing_db.url).await.unwrap();
    billing::create_schema(&billing_store, "billing")
        .await
        .unwrap();
    let main_pool = main_store.pool().clone();
    let billing_pool = billing_store.pool().clone();

    let sent = Arc::new(AtomicI64::new(0));
    // Stopped by a flag, not by aborting the task: an abort can land after a `send` committed
    // and before `sent` counts it, leaving an order the test does not expect.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = Arc::clone(&stop);
        let main = main.clone();
        let sent = Arc::clone(&sent);
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
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

    let rounds = rounds();
    // Rounds in which the billing process recorded orders before it was killed.
    let mut busy = 0;
    for round in 0..rounds {
        let before = billing::orders(&billing_pool, "billing_ledger").await.len();
        let mut child = billing_process(broker, &server.url(), &billing_db.url);
        // Killed at a random moment once it can have taken messages.
        tokio::time::sleep(broker.takeover() + Duration::from_millis(fastrand::u64(500..2500)))
            .await;
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the billing process stopped by itself in round {round}: {status}");
        }
        // `kill` is SIGKILL on Unix: no destructor, no acknowledgement, no flush.
        child.kill().expect("kill the billing process");
        child.wait().expect("reap the billing process");
        if billing::orders(&billing_pool, "billing_ledger").await.len() > before {
            busy += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    if let Err(error) = load.await
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
    let total = sent.load(Ordering::SeqCst);

    // One last billing process, left to finish.
    let drain = Instant::now();
    let mut child = billing_process(broker, &server.url(), &billing_db.url);
    eventually(
        Duration::from_secs(90),
        "every order answered by the last billing process",
        || async {
            let answered = billing::orders(&main_pool, "sales_charged").await.len();
            (answered >= total as usize).then_some(())
        },
    )
    .await;
    let drained = drain.elapsed();
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
    assert_eq!(main_store.lag().await.unwrap().dead_letters, 0);
    assert_eq!(billing_store.lag().await.unwrap().dead_letters, 0);
    let url = server.url();
    let redelivered = if broker.counts_redeliveries() {
        let redelivered = eventually(
            Duration::from_secs(30),
            "the billing group's consumers settled",
            || broker.redeliveries(&url, "billing.ledger", total as u64),
        )
        .await;
        assert!(
            redelivered > 0,
            "no message was handed out again: no kill caught the billing process holding one"
        );
        format!("{redelivered}")
    } else {
        "(not counted by this broker)".to_owned()
    };
    child.kill().expect("stop the last billing process");
    child.wait().expect("reap the last billing process");
    main_relay.shutdown().await;
    assert!(
        busy * 2 >= rounds,
        "the billing process recorded orders in only {busy} of {rounds} rounds: the kills did not land under load"
    );
    eprintln!(
        "{}: {rounds} kills ({busy} of them after the billing process had recorded orders), {total} orders, each recorded and answered once, {redelivered} messages handed out again; drained in {drained:?}; {:?} in all",
        broker.name(),
        started.elapsed()
    );
}
