//! `shop inseam ...`: the `inseam` commands mounted in the shop's binary, with its
//! registrations, on a database the shop ran its demo orders on.

use std::time::Duration;

use inseam_tests::{Backend, TestDb};
use shop::World;

const SHOP: &str = env!("CARGO_BIN_EXE_shop");

fn shop_inseam(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(SHOP)
        .arg("inseam")
        .args(args)
        .env("SHOP_DATABASE_URL", url)
        .env_remove("INSEAM_DATABASE_URL")
        .output()
        .expect("run the shop binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_shop_mounts_the_inseam_commands() {
    let db = TestDb::new(Backend::Sqlite, "shop_operate").await;
    let store = shop::open(&db.url).await.expect("open the shop");
    let world = World::default();
    let app = shop::app(&store, &world).await.expect("build the shop");
    let relay = app.start();
    shop::seed(&app).await.expect("seed");
    let order = &shop::DEMO_ORDERS[0];
    shop::place(&app, order.order_id, order.customer, order.lines)
        .await
        .expect("place an order");
    shop::settled(&app, order.order_id, Duration::from_secs(20))
        .await
        .expect("the order settles");
    relay.shutdown().await;

    // status knows the shop's groups, also the idle ones.
    let (code, out, err) = shop_inseam(&db.url, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let groups: Vec<&str> = status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    for group in app.groups() {
        assert!(groups.contains(group), "{group} missing from {groups:?}");
    }

    // Embedded-only commands run: the catalog is the shop's, the read model rebuilds.
    let (code, out, err) = shop_inseam(&db.url, &["catalog"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, app.catalog().markdown());
    let (code, out, err) = shop_inseam(
        &db.url,
        &["--json", "projection", "rebuild", "orders.summaries"],
    );
    assert_eq!(code, 0, "{err}");
    let rebuilt: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(rebuilt["events"].as_u64().unwrap_or(0) >= 1, "{rebuilt}");
    let summary = shop::settled(&app, order.order_id, Duration::from_secs(1))
        .await
        .expect("the summary survives the rebuild");
    assert_eq!(summary.status, "confirmed");
}
