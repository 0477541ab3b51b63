//! Trace context carried with messages (`AppBuilder::trace_propagation`), with a hook that
//! stamps headers instead of a tracing backend: what is published gets the hook's headers,
//! through the outbox and a transport, and every delivery (and every request served for
//! another process) hands its envelope's headers to the hook. Without a hook no header is
//! written, and a `send` whose handler publishes nothing never calls the hook.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::prelude::*;
use inseam::transport::InProcess;
use inseam::{Headers, Routing, TracePropagation};
use inseam_tests::{Backend, TestDb, eventually};

/// Stamps what is published with `stamp = s<n>`, and records the stamps deliveries carry.
#[derive(Debug, Clone, Default)]
struct Stamp {
    injected: Arc<AtomicUsize>,
    parents: Arc<Mutex<Vec<String>>>,
}

impl TracePropagation for Stamp {
    fn inject(&self, headers: &mut Headers) {
        let n = self.injected.fetch_add(1, Ordering::SeqCst) + 1;
        headers.insert("stamp", format!("s{n}")).unwrap();
    }

    fn set_parent(&self, _span: &tracing::Span, headers: &Headers) {
        if let Some(stamp) = headers.get("stamp") {
            self.parents.lock().unwrap().push(stamp.to_owned());
        }
    }
}

/// A group and the stamp its subscriber saw.
type Sighting = (&'static str, Option<String>);

/// What the subscribers saw.
#[derive(Debug, Clone, Default)]
struct Seen(Arc<Mutex<Vec<Sighting>>>);

impl Seen {
    fn saw(&self, group: &'static str, headers: &Headers) {
        let stamp = headers.get("stamp").map(str::to_owned);
        self.0.lock().unwrap().push((group, stamp));
    }

    fn all(&self) -> Vec<Sighting> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Debug, Command)]
#[command(name = "shop.quiet", output = u32)]
struct Quiet;

#[command_handler]
async fn quiet(_: Quiet) -> Result<u32, std::convert::Infallible> {
    Ok(7)
}

#[derive(Debug, Command)]
#[command(name = "shop.order", output = ())]
struct Order {
    id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "shop.ordered")]
struct Ordered {
    id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "ledger.recorded")]
struct Recorded {
    id: u32,
}

#[command_handler(publishes(Ordered))]
async fn order(cmd: Order, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(Ordered { id: cmd.id });
    Ok(())
}

#[event_handler(group = "ledger", publishes(Recorded))]
async fn ledger(
    ev: &Envelope<Ordered>,
    ctx: &mut EventContext<'_>,
    State(seen): State<Seen>,
) -> Result<(), std::convert::Infallible> {
    seen.saw("ledger", &ev.headers);
    ctx.publish(Recorded { id: ev.id });
    Ok(())
}

#[event_handler(group = "audit")]
async fn audit(ev: &Envelope<Recorded>, State(seen): State<Seen>) {
    seen.saw("audit", &ev.headers);
}

async fn app(db: &TestDb, stamp: Option<Stamp>, seen: &Seen) -> (App, SqlStore) {
    let store = SqlStore::connect(&db.url).await.unwrap();
    let builder = App::builder()
        .store(store.clone())
        .handler::<quiet>()
        .handler::<order>()
        .handler::<ledger>()
        .handler::<audit>()
        .state(seen.clone());
    let builder = match stamp {
        Some(stamp) => builder.trace_propagation(stamp),
        None => builder,
    };
    (builder.build().await.unwrap(), store)
}

async fn carried_through_the_outbox(backend: Backend) {
    let db = TestDb::new(backend, "propagation").await;
    let (stamp, seen) = (Stamp::default(), Seen::default());
    let (app, store) = app(&db, Some(stamp.clone()), &seen).await;

    assert_eq!(app.send(Quiet).await.unwrap(), 7);
    assert_eq!(
        stamp.injected.load(Ordering::SeqCst),
        0,
        "a send that publishes nothing never calls the hook"
    );
    app.send(Order { id: 1 }).await.unwrap();
    assert_eq!(store.deliver_due(&app).await.unwrap(), 2);
    // The command's event carries the first stamp, the event its subscriber published the
    // second; each delivery handed its envelope's stamp to the hook.
    assert_eq!(
        seen.all(),
        [("ledger", Some("s1".into())), ("audit", Some("s2".into()))]
    );
    assert_eq!(*stamp.parents.lock().unwrap(), ["s1", "s2"]);
    assert_eq!(stamp.injected.load(Ordering::SeqCst), 2);
}

async fn nothing_without_a_hook(backend: Backend) {
    let db = TestDb::new(backend, "propagation_off").await;
    let seen = Seen::default();
    let (app, store) = app(&db, None, &seen).await;
    app.send(Order { id: 1 }).await.unwrap();
    assert_eq!(store.deliver_due(&app).await.unwrap(), 2);
    assert_eq!(seen.all(), [("ledger", None), ("audit", None)]);
}

inseam_tests::on_every_backend!(carried_through_the_outbox, nothing_without_a_hook);

/// Answered by the `billing` process.
#[derive(Debug, Clone, Serialize, Deserialize, Query)]
#[query(name = "billing.balance", output = i64)]
struct Balance;

/// The billing module's group (a module that runs in a process has at least one).
#[event_handler(group = "billing.ledger")]
async fn billing_ledger(_: &Envelope<Ordered>) {}

#[query_handler]
async fn balance(_: Balance) -> Result<i64, std::convert::Infallible> {
    Ok(42)
}

/// A query answered by another process over a transport's request-reply carries the caller's
/// stamp, and the process that serves it hands it to its hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carried_to_a_request_served_by_another_process() {
    let routing = |process: Option<&str>| {
        let routing = Routing::from_toml(
            r#"
            [processes.billing]
            transport = "in-process"
            modules = ["billing"]
            "#,
        )
        .unwrap();
        match process {
            Some(process) => routing.this_process(process),
            None => routing,
        }
    };
    let transport = InProcess::new();
    let (caller, server) = (Stamp::default(), Stamp::default());
    let (main_db, billing_db) = (TestDb::sqlite(), TestDb::sqlite());
    let mut apps = Vec::new();
    for (db, stamp, process) in [
        (&main_db, caller.clone(), None),
        (&billing_db, server.clone(), Some("billing")),
    ] {
        let store = SqlStore::connect(&db.url).await.unwrap();
        let app = App::builder()
            .store(store)
            .handler::<balance>()
            .handler::<billing_ledger>()
            .transport(transport.clone())
            .routing(routing(process))
            .trace_propagation(stamp)
            .build()
            .await
            .unwrap();
        let relay = app.start();
        apps.push((app, relay));
    }
    let answer = eventually(Duration::from_secs(10), "billing answers", || async {
        apps[0].0.query(Balance).await.ok()
    })
    .await;
    assert_eq!(answer, 42);
    assert!(caller.injected.load(Ordering::SeqCst) >= 1);
    let served = server.parents.lock().unwrap().clone();
    assert!(
        !served.is_empty() && served.iter().all(|s| s.starts_with('s')),
        "{served:?}"
    );
    assert_eq!(server.injected.load(Ordering::SeqCst), 0);
    for (_, relay) in apps {
        relay.shutdown().await;
    }
}
