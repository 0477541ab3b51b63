//! The publisher reads the next batch by position (and claims the next batch of rows) while
//! the broker takes the current one. A message the broker fails to take must still hold back
//! the later messages of its key, also those of the batch already read or claimed behind it:
//! here a transport fails the first publish of about one message in six (and, as a transport
//! must, the later ones of its key in that batch), with batches of 8 over 5 keys, so that
//! almost every batch read ahead has messages of a key that failed in the batch before it.
//! The consuming process handles every order once, and each key's orders in the order they
//! were placed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use inseam::Routing;
use inseam::prelude::*;
use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam::transport::{
    Capabilities, Consumer, InProcess, Outgoing, Subscription, Transport, TransportError,
};
use inseam_tests::{Backend, TestDb, eventually};

const ORDERS: i64 = 300;
const KEYS: i64 = 5;

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

#[command_handler(publishes(Placed))]
async fn place(cmd: Place, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(Placed {
        key: format!("k{}", cmd.order % KEYS),
        order: cmd.order,
    });
    Ok(())
}

/// The orders the billing group handled, in the order it handled them.
#[derive(Debug, Clone, Default)]
struct Handled(Arc<Mutex<Vec<(String, i64)>>>);

impl Handled {
    fn all(&self) -> Vec<(String, i64)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[event_handler(group = "billing.ledger")]
async fn charge(ev: &Envelope<Placed>, ctx: &mut EventContext<'_>) -> Result<(), std::io::Error> {
    let Some(handled) = ctx.app().state::<Handled>() else {
        return Err(std::io::Error::other("no `Handled` in the app's state"));
    };
    handled
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((ev.payload.key.clone(), ev.order));
    Ok(())
}

/// The in-process transport, failing the first publish of every message whose id's hash
/// says so, and then the later messages of its key in that batch.
#[derive(Debug, Clone)]
struct Flaky {
    inner: InProcess,
    failed_once: Arc<Mutex<HashSet<uuid::Uuid>>>,
    failures: Arc<Mutex<u64>>,
}

#[inseam::transport::async_trait]
impl Transport for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn provision(&self, channels: &[String]) -> Result<(), TransportError> {
        self.inner.provision(channels).await
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut failed_keys: HashSet<Option<String>> = HashSet::new();
        for message in batch {
            let first = self
                .failed_once
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(message.message_id);
            let fails = failed_keys.contains(&message.key)
                || (first && message.message_id.as_u128() % 6 == 0);
            if fails {
                *self.failures.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                failed_keys.insert(message.key.clone());
                outcomes.push(Err(TransportError::transient(
                    "flaky",
                    "publish",
                    "the broker did not take it this time",
                )));
            } else {
                let mut one = self.inner.publish(std::slice::from_ref(message)).await;
                outcomes.push(one.pop().unwrap_or_else(|| Ok(())));
            }
        }
        outcomes
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.inner.subscribe(subscription).await
    }
}

async fn process(db: &TestDb, transport: &Flaky, routing: Routing, handled: &Handled) -> App {
    let relay = RelayOptions {
        batch_size: 8,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    App::builder()
        .store(store)
        .handler::<place>()
        .handler::<charge>()
        .state(handled.clone())
        .transport(transport.clone())
        .routing(routing)
        .build()
        .await
        .unwrap()
}

/// `publishers` instances of the main process on one database publish its events.
async fn failed_publishes_hold_back_their_keys(backend: Backend, publishers: usize) {
    let main_db = TestDb::new(backend, "pipeline_main").await;
    let billing_db = TestDb::new(backend, "pipeline_billing").await;
    let transport = Flaky {
        inner: InProcess::new(),
        failed_once: Arc::default(),
        failures: Arc::default(),
    };
    let routing = Routing::from_toml(
        r#"
        [processes.billing]
        transport = "flaky"
        modules = ["billing"]
        "#,
    )
    .unwrap();
    let handled = Handled::default();
    let mut mains = Vec::new();
    for _ in 0..publishers {
        mains.push(process(&main_db, &transport, routing.clone(), &handled).await);
    }
    let billing = process(
        &billing_db,
        &transport,
        routing.this_process("billing"),
        &handled,
    )
    .await;
    // A backlog first, so that the publisher's batches are full and it claims ahead.
    for order in 0..ORDERS {
        mains[0].send(Place { order }).await.unwrap();
    }
    let main_relays: Vec<_> = mains.iter().map(App::start).collect();
    let billing_relay = billing.start();
    eventually(
        Duration::from_secs(60),
        "every order handled by the billing process",
        || async { (handled.all().len() >= ORDERS as usize).then_some(()) },
    )
    .await;
    // Anything handled twice would show up after the last one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for relay in main_relays {
        relay.shutdown().await;
    }
    billing_relay.shutdown().await;

    let failures = *transport
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    assert!(
        failures >= 20,
        "the transport failed only {failures} publishes"
    );
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, order) in handled.all() {
        per_key.entry(key).or_default().push(order);
    }
    assert_eq!(per_key.len(), KEYS as usize);
    for (key, orders) in per_key {
        let index: i64 = key[1..].parse().unwrap();
        let expected: Vec<i64> = (0..ORDERS).filter(|o| o % KEYS == index).collect();
        assert_eq!(
            orders, expected,
            "key {key}: handled out of order or not once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failed_publishes_hold_back_their_keys() {
    failed_publishes_hold_back_their_keys(Backend::Sqlite, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_publishes_hold_back_their_keys() {
    failed_publishes_hold_back_their_keys(Backend::Postgres, 1).await;
}

/// Two relays on one database take the group's cursor from each other between batches, and
/// share the delivery rows the failed publishes leave: every order is still handled once, and
/// each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_publishers_keep_each_key_in_order() {
    failed_publishes_hold_back_their_keys(Backend::Postgres, 2).await;
}
