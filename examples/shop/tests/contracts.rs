//! The shop's event contracts: for every event, its name, version, content type and payload
//! schema are recorded under `examples/shop/contracts/`. Changing an event's payload without
//! bumping its version fails here, saying so.

use std::path::Path;

use inseam_test::{TestApp, assert_contract};
use shop::World;
use shop::inventory::{StockReleased, StockReserved, StockUnavailable};
use shop::orders::{OrderConfirmed, OrderPlaced, OrderRejected};
use shop::payments::{PaymentCharged, PaymentDeclined, PaymentRefunded};
use shop::shipping::{ShipmentCreated, ShipmentFailed};

fn dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/contracts"))
}

/// Checks one event's contract in a directory.
type Check = fn(&Path);

/// Every event the shop's modules publish, with the check of its contract.
const EVENTS: [(&str, Check); 11] = [
    ("orders.order_placed", assert_contract::<OrderPlaced>),
    ("orders.order_confirmed", assert_contract::<OrderConfirmed>),
    ("orders.order_rejected", assert_contract::<OrderRejected>),
    ("inventory.stock_reserved", assert_contract::<StockReserved>),
    (
        "inventory.stock_unavailable",
        assert_contract::<StockUnavailable>,
    ),
    ("inventory.stock_released", assert_contract::<StockReleased>),
    ("payments.charged", assert_contract::<PaymentCharged>),
    ("payments.declined", assert_contract::<PaymentDeclined>),
    ("payments.refunded", assert_contract::<PaymentRefunded>),
    (
        "shipping.shipment_created",
        assert_contract::<ShipmentCreated>,
    ),
    (
        "shipping.shipment_failed",
        assert_contract::<ShipmentFailed>,
    ),
];

#[test]
fn every_event_keeps_its_contract() {
    for (_, check) in EVENTS {
        check(dir());
    }
}

/// The list above covers every event some module subscribes to.
#[tokio::test]
async fn the_list_covers_every_subscribed_event() {
    let test = TestApp::new(|builder, store| shop::configure(builder, store, &World::default()))
        .await
        .unwrap();
    let listed: Vec<&str> = EVENTS.iter().map(|(name, _)| *name).collect();
    for (name, _) in test.app.events() {
        if !name.starts_with("inseam.") {
            assert!(
                listed.contains(&name),
                "event `{name}` has no contract check"
            );
        }
    }
}

/// A payload changed under the same version is caught, with a message that says what to do.
#[test]
fn a_payload_change_without_a_version_bump_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut recorded = inseam_test::contract::<PaymentCharged>();
    recorded["schema"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("amount_cents");
    std::fs::write(
        dir.path().join("payments.charged.v1.json"),
        serde_json::to_string_pretty(&recorded).unwrap() + "\n",
    )
    .unwrap();
    let failure = std::panic::catch_unwind(|| assert_contract::<PaymentCharged>(dir.path()))
        .expect_err("a changed payload must fail");
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.starts_with(
            "event `payments.charged` version 1 changed its payload without a version bump."
        ),
        "{message}"
    );
    assert!(
        message.ends_with(
            "keep the payload, or bump `#[event(version = 2)]` and register an upcaster from 1."
        ),
        "{message}"
    );
}
