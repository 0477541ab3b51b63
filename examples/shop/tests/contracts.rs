//! The shop's event contracts: for every event in the app's catalog, its name, version, content
//! type, payload schema and wire form are recorded under `examples/shop/contracts/`. Changing an
//! event's payload without bumping its version fails here, saying so.

use std::path::Path;

use inseam_test::{TestApp, assert_contract, assert_contracts};
use shop::World;
use shop::payments::PaymentCharged;

fn dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/contracts"))
}

async fn shop() -> TestApp {
    TestApp::new(|builder, store| shop::configure(builder, store, &World::default()))
        .await
        .unwrap()
}

#[tokio::test]
async fn every_event_keeps_its_contract() {
    let test = shop().await;
    assert_contracts(test.app.catalog(), dir());
}

/// The catalog, and so the check above, covers all eleven events of the shop: the ones that
/// are subscribed to and the ones that handlers declare they publish.
#[tokio::test]
async fn every_event_of_the_shop_has_a_recorded_contract() {
    let test = shop().await;
    let mut catalogued: Vec<String> = test
        .app
        .catalog()
        .contracts()
        .map(|e| format!("{}.v{}.json", e.name, e.version))
        .collect();
    catalogued.sort();
    let mut recorded: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    recorded.sort();
    assert_eq!(catalogued, recorded);
    assert_eq!(catalogued.len(), 11);
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
    let message = panic_message(|| assert_contract::<PaymentCharged>(dir.path()));
    assert!(
        message.starts_with(
            "event `payments.charged` version 1 changed its contract without a version bump."
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

/// The catalog-wide check finds the same change, and a contract that was never recorded.
#[tokio::test]
async fn the_catalog_check_reports_every_problem() {
    let test = shop().await;
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(self::dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let charged = dir.path().join("payments.charged.v1.json");
    let text = std::fs::read_to_string(&charged).unwrap();
    std::fs::write(&charged, text.replace("\"amount_cents\"", "\"amount\"")).unwrap();
    std::fs::remove_file(dir.path().join("orders.order_placed.v1.json")).unwrap();

    let catalog = test.app.catalog().clone();
    let message = panic_message(|| assert_contracts(&catalog, dir.path()));
    assert!(message.starts_with("2 contract problem(s):"), "{message}");
    assert!(
        message.contains("new contract recorded in ")
            && message.contains("orders.order_placed.v1.json: review it and commit it"),
        "{message}"
    );
    assert!(
        message.contains(
            "event `payments.charged` version 1 changed its contract without a version bump."
        ),
        "{message}"
    );
    // The missing contract was written, for review.
    assert!(dir.path().join("orders.order_placed.v1.json").exists());
}

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let failure = std::panic::catch_unwind(f).expect_err("the check must fail");
    failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default()
}
