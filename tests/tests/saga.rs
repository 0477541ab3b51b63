//! The order saga on real databases, under a manual clock: the happy path, a failure at each
//! step with exactly its compensations (most recent first), and the payment timeout firing when
//! the clock passes it. Each path's flow is pinned by a snapshot.

use std::time::Duration;

use inseam::ManualClock;
use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{RelayOptions, SqlStoreOptions};
use inseam_tests::orders::{self, Faults, Flow, Outbox, PAYMENT_TIMEOUT, PlaceOrder};
use inseam_tests::{Backend, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn start() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-03-01T09:00:00Z")
        .map(|t| t.to_utc())
        .unwrap_or_default()
}

async fn complete(flow: &Flow) {
    eventually(WAIT, "the saga to complete", || async {
        flow.lines()
            .iter()
            .any(|l| l == "✓ saga complete")
            .then_some(())
    })
    .await;
}

/// Runs one order through the saga with `faults`; returns its flow and the notifications.
async fn run(store: &SqlStore, faults: Faults, order: &str) -> (Vec<String>, Vec<String>) {
    let flow = Flow::default();
    let outbox = Outbox::default();
    let clock = ManualClock::new(start());
    let app = orders::with_notifications(
        orders::builder(store.clone(), faults, flow.clone(), clock.clone()),
        outbox.clone(),
    )
    .build()
    .await
    .unwrap();
    let relay = app.start();
    let correlation = uuid::Uuid::now_v7();
    app.send_with(
        PlaceOrder {
            order: order.to_owned(),
        },
        inseam::MessageMeta::new().correlation_id(correlation),
    )
    .await
    .unwrap();
    if faults == Faults::PaymentTimeout {
        eventually(WAIT, "the payment timeout to be set", || async {
            flow.lines()
                .iter()
                .any(|l| l.starts_with("⏲ payment timeout set"))
                .then_some(())
        })
        .await;
        // The gateway never answers; nothing happens until the clock passes the timeout.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !flow.lines().iter().any(|l| l.contains("fired")),
            "fired before its time: {:?}",
            flow.lines()
        );
        clock.advance(PAYMENT_TIMEOUT - Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!flow.lines().iter().any(|l| l.contains("fired")));
        clock.advance(Duration::from_secs(2));
    }
    complete(&flow).await;
    eventually(WAIT, "the notification", || async {
        (!outbox.sent().is_empty()).then_some(())
    })
    .await;
    // A timeout set on the way fires after completion, and is ignored.
    clock.advance(PAYMENT_TIMEOUT * 2);
    // Let everything still queued drain, then check nothing is left anywhere.
    eventually(WAIT, "every group drained", || async {
        let lag = store.lag().await.unwrap();
        lag.groups.iter().all(|g| g.pending == 0).then_some(())
    })
    .await;
    relay.shutdown().await;
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
    let done: i64 = sqlx::query("SELECT done FROM inseam_processes WHERE kind = 'order_saga'")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 1, "the saga's state is terminal");
    // The stored flow: every command the saga issued and every event, under one correlation
    // id (the timeout is the saga's own message, in the same flow).
    let mut stored: Vec<String> = store
        .flow(correlation)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| {
            let name = entry.envelope.name;
            let kind = if app.is_durable_command(&name) {
                "command"
            } else {
                "event"
            };
            format!("{kind} {name}")
        })
        .collect();
    stored.sort();
    if faults == Faults::None {
        assert_eq!(
            stored,
            [
                "command inventory.reserve_stock",
                "command orders.confirm",
                "command payments.charge",
                "command shipping.create_shipment",
                "event inseam.saga_timeout",
                "event inventory.stock_reserved",
                "event orders.confirmed",
                "event orders.placed",
                "event payments.charged",
                "event shipping.shipment_created",
            ]
        );
    }
    // What the services actually ran, from their inbox rows: each command exactly once.
    let mut lines = flow.lines();
    lines.push("-- commands run (inbox rows):".to_owned());
    let ran = sqlx::query(
        "SELECT grp, COUNT(*) FROM inseam_inbox WHERE grp LIKE 'command:%' GROUP BY grp ORDER BY grp",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    for row in ran {
        let (group, count): (String, i64) = (row.get(0), row.get(1));
        lines.push(format!("{group} ×{count}"));
    }
    (lines, outbox.sent())
}

async fn every_path(backend: Backend) {
    let paths = [
        ("happy", Faults::None, "order 1 confirmed"),
        ("out_of_stock", Faults::Stock, "order 2 rejected"),
        ("payment_declined", Faults::Payment, "order 3 rejected"),
        (
            "payment_timeout",
            Faults::PaymentTimeout,
            "order 4 rejected",
        ),
        ("shipping_failed", Faults::Shipping, "order 5 rejected"),
    ];
    for (n, (name, faults, notification)) in paths.into_iter().enumerate() {
        // A database per path: the flows must not see each other.
        let db = TestDb::new(backend, &format!("saga_{name}")).await;
        let relay = RelayOptions {
            poll_interval: Duration::from_millis(50),
            ..RelayOptions::default()
        };
        let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
            .await
            .unwrap();
        let (flow, sent) = run(&store, faults, &(n + 1).to_string()).await;
        assert_eq!(sent, [notification], "{name}");
        insta::assert_snapshot!(name, flow.join("\n"));
    }
}

inseam_tests::on_every_backend!(every_path);
