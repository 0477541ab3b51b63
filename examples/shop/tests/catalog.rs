//! The shop's message catalog: generated from its registrations, committed under
//! `examples/shop/docs/`, and checked here so that it never drifts from the code.

use std::path::Path;

use inseam::Routing;
use inseam::catalog::{Publisher, Role};
use shop::World;

fn docs() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"))
}

#[tokio::test]
async fn the_committed_catalog_is_current() {
    let files = shop::catalog_files().await.unwrap();
    let names: Vec<&str> = files.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "catalog.md",
            "asyncapi.yaml",
            "flow.mmd",
            "catalog-split.md",
            "asyncapi-split.yaml",
            "flow-split.mmd"
        ]
    );
    for (name, generated) in &files {
        let path = docs().join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == *generated,
            "{} is not what the registrations say: regenerate it with `cargo run -p shop -- catalog` and commit it",
            path.display()
        );
    }
    let markdown = &files[0].1;
    insta::assert_snapshot!("catalog.md", markdown);
}

#[tokio::test]
async fn the_catalog_shows_the_order_flow() {
    let dir = tempfile::tempdir().unwrap();
    let store = shop::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let catalog = app.catalog();

    assert_eq!(
        catalog.modules(),
        [
            "catalog",
            "inventory",
            "notifications",
            "orders",
            "payments",
            "shipping"
        ]
    );
    let placed = catalog.event("orders.order_placed").unwrap();
    assert_eq!(
        placed.publishers,
        [
            Publisher::CommandHandler("shop::orders::place_order"),
            Publisher::Aggregate("order"),
        ]
    );
    let groups: Vec<(Option<&str>, Role)> = placed
        .subscribers
        .iter()
        .map(|s| (s.group, s.role))
        .collect();
    assert_eq!(
        groups,
        [
            (Some("orders.fulfilment"), Role::Saga),
            (Some("orders.summaries"), Role::Projection)
        ]
    );
    let saga = catalog.group("orders.fulfilment").unwrap();
    assert_eq!(saga.sends.len(), 7);
    // Every command the saga sends is durable, and handled in this app.
    for command in &saga.sends {
        let doc = catalog.command(command).unwrap();
        assert!(doc.durable, "{command}");
        assert!(doc.handler.is_some(), "{command}");
    }
    // Every event of the shop has a publisher and a payload schema.
    for event in catalog.contracts() {
        assert!(!event.publishers.is_empty(), "{}", event.name);
        assert!(event.schema.is_some(), "{}", event.name);
    }
    store.pool().close().await;
}

/// Split in two, the shop's payments and shipping run in `billing`: the saga's commands to them
/// and the events they answer with cross between the processes over NATS; the rest stays in
/// the main process.
#[tokio::test]
async fn the_split_catalog_shows_what_crosses_processes() {
    let dir = tempfile::tempdir().unwrap();
    let store = shop::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let split = app
        .catalog()
        .routed(&Routing::from_toml(shop::SPLIT).unwrap())
        .unwrap();
    let billing: Vec<&str> = split
        .groups
        .iter()
        .filter(|g| g.process == "billing")
        .map(|g| g.name)
        .collect();
    assert_eq!(
        billing,
        [
            "command:payments.charge",
            "command:payments.refund",
            "command:shipping.create_shipment"
        ]
    );
    let doc = serde_json::to_value(split.asyncapi()).unwrap();
    let mut crossing: Vec<&str> = doc["channels"]
        .as_object()
        .unwrap()
        .values()
        .filter(|c| c.get("servers").is_some())
        .map(|c| c["address"].as_str().unwrap())
        .collect();
    crossing.sort_unstable();
    // `payments.refunded` is not among them: nothing subscribes to it, so it stays in `billing`.
    assert_eq!(
        crossing,
        [
            "inseam.*.payments.charge",
            "inseam.*.payments.charged",
            "inseam.*.payments.declined",
            "inseam.*.payments.refund",
            "inseam.*.shipping.create_shipment",
            "inseam.*.shipping.shipment_created",
            "inseam.*.shipping.shipment_failed"
        ]
    );
    store.pool().close().await;
}
