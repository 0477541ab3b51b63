//! What the relay and the bridge report through the `metrics` facade, scraped as Prometheus
//! text: two processes of one app over the in-process reference transport (each with its own
//! SQLite database), the main one publishing what the `billing` process consumes. The main
//! process counts what the broker confirmed per transport, billing what it received per
//! transport and group, and both their deliveries per group; a message received twice is
//! counted as an inbox duplicate once.

use std::time::Duration;

use inseam::Routing;
use inseam::prelude::*;
use inseam::transport::InProcess;
use inseam_tests::{TestDb, eventually};
use metrics_exporter_prometheus::PrometheusBuilder;

#[derive(Debug, Command)]
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
        key: format!("k{}", cmd.order % 3),
        order: cmd.order,
    });
    Ok(())
}

#[event_handler(group = "billing.ledger")]
async fn ledger(_: &Envelope<Placed>) {}

#[event_handler(group = "orders.audit")]
async fn audit(_: &Envelope<Placed>) {}

fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_relay_counters() {
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let routing = Routing::from_toml(
        r#"
        [processes.billing]
        transport = "in-process"
        modules = ["billing"]
        "#,
    )
    .unwrap();
    let transport = InProcess::new();
    let (main_db, billing_db) = (TestDb::sqlite(), TestDb::sqlite());
    let mut apps = Vec::new();
    for (db, routing) in [
        (&main_db, routing.clone()),
        (&billing_db, routing.this_process("billing")),
    ] {
        let store = SqlStore::connect(&db.url).await.unwrap();
        let app = App::builder()
            .store(store.clone())
            .handler::<place>()
            .handler::<ledger>()
            .handler::<audit>()
            .transport(transport.clone())
            .routing(routing)
            .build()
            .await
            .unwrap();
        let relay = app.start();
        apps.push((app, store, relay));
    }
    for order in 0..10 {
        apps[0].0.send(Place { order }).await.unwrap();
    }
    let ledger = r#"group="billing.ledger""#;
    let text = eventually(
        Duration::from_secs(20),
        "billing's ledger delivered",
        || async {
            let text = metrics.render();
            (sample(&text, "inseam_deliveries_total", ledger) == Some(10.0)).then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &text,
            "inseam_broker_published_total",
            r#"transport="in-process""#
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "inseam_broker_consumed_total",
            r#"transport="in-process",group="billing.ledger""#
        ),
        Some(10.0),
        "{text}"
    );
    let text = eventually(Duration::from_secs(20), "the audit delivered", || async {
        let text = metrics.render();
        (sample(&text, "inseam_deliveries_total", r#"group="orders.audit""#) == Some(10.0))
            .then_some(text)
    })
    .await;
    assert!(
        text.contains(r#"inseam_relay_batch_duration_seconds_count{group="orders.audit"}"#),
        "{text}"
    );
    assert_eq!(sample(&text, "inseam_inbox_duplicates_total", ledger), None);

    // The gauges: every group at 0 once everything is delivered.
    let (app, store, _) = &apps[1];
    store.record_gauges(app).await.unwrap();
    let text = metrics.render();
    assert_eq!(
        sample(&text, "inseam_lag_messages", ledger),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_dead_letter_depth", ledger),
        Some(0.0),
        "{text}"
    );
    for (_, _, relay) in apps {
        relay.shutdown().await;
    }
}
