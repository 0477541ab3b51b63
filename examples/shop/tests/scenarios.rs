//! The shop's behaviour as scenarios, written with `inseam-test`: each test builds the real app
//! on a fresh SQLite file (or a fresh PostgreSQL database) with a manual clock, says what is
//! given, does one thing, and checks what it caused. Copy one to start testing your own app.

use std::time::Duration;

use inseam::sql::sqlx::{self, AssertSqlSafe};
use inseam_test::TestApp;
use shop::World;
use shop::notifications::SentTo;
use shop::orders::{
    ConfirmOrder, Order, OrderConfirmed, OrderLine, OrderPlaced, PAYMENT_TIMEOUT, PlaceOrder,
    PricedLine,
};

/// The shop with its tables and its demo catalog, talking to `world`.
async fn shop(world: World) -> TestApp {
    let test = TestApp::new(|builder, store| shop::configure(builder, store, &world))
        .await
        .unwrap();
    stock(test).await
}

/// The same on a PostgreSQL database of its own, dropped when the test ends.
async fn shop_on_postgres(world: World) -> TestApp {
    let test = TestApp::postgres(|builder, store| shop::configure(builder, store, &world))
        .await
        .unwrap();
    stock(test).await
}

async fn stock(test: TestApp) -> TestApp {
    shop::install(&test.store).await.unwrap();
    shop::seed(&test.app).await.unwrap();
    test
}

/// The lines of the flow's saga timeout, with where it went.
fn timeout_lines(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .skip_while(|line| !line.starts_with("timer inseam.saga_timeout"))
        .take(2)
        .map(String::as_str)
        .collect()
}

fn order(order_id: &str, customer: &str, sku: &str, quantity: u32) -> PlaceOrder {
    PlaceOrder {
        order_id: order_id.into(),
        customer: customer.into(),
        lines: vec![OrderLine {
            sku: sku.into(),
            quantity,
        }],
    }
}

#[tokio::test]
async fn an_order_goes_through_the_saga() {
    let test = shop(World::default()).await;

    let flow = test.when(order("o-1", "ann", "tea", 2)).await;

    assert_eq!(*flow.assert_ok(), 1300);
    flow.assert_events(&[
        "orders.order_placed",
        "inventory.stock_reserved",
        "payments.charged",
        "shipping.shipment_created",
        "orders.order_confirmed",
    ]);
    insta::assert_snapshot!(flow.text());
}

/// The same order on PostgreSQL causes the same flow, line for line, also once its payment
/// timeout fired.
#[tokio::test]
async fn an_order_goes_through_the_saga_on_postgres_too() {
    let on_sqlite = shop(World::default()).await;
    let on_postgres = shop_on_postgres(World::default()).await;

    let expected = on_sqlite.when(order("o-1", "ann", "tea", 2)).await;
    let flow = on_postgres.when(order("o-1", "ann", "tea", 2)).await;

    assert_eq!(*flow.assert_ok(), 1300);
    assert_eq!(flow.text(), expected.text());

    on_sqlite.advance(PAYMENT_TIMEOUT).await.unwrap();
    on_postgres.advance(PAYMENT_TIMEOUT).await.unwrap();
    let lines = on_postgres.lines(flow.correlation).await;
    assert_eq!(lines, on_sqlite.lines(expected.correlation).await);
    assert_eq!(
        timeout_lines(&lines)[1],
        "  -> orders.fulfilment: not needed (the saga completed)"
    );
    assert!(on_postgres.store.lag().await.unwrap().groups.is_empty());
}

/// Releasing the stock publishes `inventory.stock_released`, which no group subscribes to: the
/// flow shows it all the same.
#[tokio::test]
async fn a_declined_payment_releases_the_stock_and_rejects_the_order() {
    let world = World::default();
    world.gateway.decline("bo");
    let test = shop(world).await;

    let flow = test.when(order("o-2", "bo", "tea", 1)).await;

    flow.assert_ok();
    flow.assert_events(&[
        "orders.order_placed",
        "inventory.stock_reserved",
        "payments.declined",
        "inventory.stock_released",
        "orders.order_rejected",
    ]);
    insta::assert_snapshot!(flow.text());
}

/// The payment timeout of a confirmed order fires later all the same; the saga had completed,
/// so it was not needed, and the flow says so (before it fires too).
#[tokio::test]
async fn a_payment_timeout_after_confirmation_is_not_needed() {
    let test = shop(World::default()).await;
    let flow = test.when(order("o-1", "ann", "tea", 1)).await;
    flow.assert_ok();
    let waiting = [
        "timer inseam.saga_timeout {\"id\":\"f10f0000-0000-0000-0000-000000000001\",\"name\":\"payment\",\"saga\":\"orders.fulfilment\"}",
        "  -> orders.fulfilment: not needed (the saga completed)",
    ];
    assert_eq!(timeout_lines(&flow.lines), waiting);

    let fired = test.advance(PAYMENT_TIMEOUT).await.unwrap();

    assert_eq!(fired, 1, "the timeout was delivered");
    let lines = test.lines(flow.correlation).await;
    assert_eq!(timeout_lines(&lines), waiting);
    assert!(
        !lines.iter().any(|l| l.contains("orders.order_rejected")),
        "the saga did nothing on it: {lines:#?}"
    );
    let lag = test.store.lag().await.unwrap();
    assert!(lag.groups.is_empty(), "nothing waits: {lag:?}");
}

#[tokio::test]
async fn a_silent_payment_gateway_times_out_and_the_stock_is_released() {
    let world = World::default();
    world.gateway.time_out("ann");
    let test = shop(world).await;

    let flow = test.when(order("o-1", "ann", "tea", 1)).await;
    flow.assert_ok();
    flow.assert_events(&["orders.order_placed", "inventory.stock_reserved"]);

    test.advance(PAYMENT_TIMEOUT).await.unwrap();

    insta::assert_snapshot!(test.lines(flow.correlation).await.join("\n"));
}

#[tokio::test]
async fn an_order_id_is_used_once() {
    let test = shop(World::default()).await;
    let placed = OrderPlaced {
        order_id: "o-7".into(),
        customer: "bo".into(),
        lines: vec![PricedLine {
            sku: "tea".into(),
            quantity: 1,
            unit_price_cents: 650,
        }],
        total_cents: 650,
    };
    let confirmed = OrderConfirmed {
        order_id: "o-7".into(),
        customer: "bo".into(),
    };
    test.given_events::<Order>("o-7", [placed.into(), confirmed.into()])
        .await
        .unwrap();

    test.when(order("o-7", "bo", "tea", 1))
        .await
        .assert_error("order `o-7` was already placed");
    let again = test
        .when(ConfirmOrder {
            order_id: "o-7".into(),
        })
        .await;
    again.assert_ok();
    again.assert_events(&[]);
}

#[tokio::test]
async fn bad_orders_are_refused_with_what_is_wrong() {
    let test = shop(World::default()).await;
    test.when(order("o-1", "ann", "tea", 0))
        .await
        .assert_error("the quantity of `tea` must be at least 1, got 0");
    test.when(order("o-2", "ann", "caviar", 1))
        .await
        .assert_error("unknown product `caviar`");
    let nothing = test.advance(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(nothing, 0, "nothing was written, nothing is delivered");
}

/// A subscriber that keeps failing is retried with backoff while the rest of the flow goes on,
/// then dead-lettered; once the cause is fixed, retrying the dead letter delivers it, once.
#[tokio::test]
async fn a_failing_notification_is_retried_dead_lettered_and_retried_by_hand() {
    let test = shop(World::default()).await;
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    let pool = test.store.pool().clone();
    sqlx::query(AssertSqlSafe(rename(
        "notifications_sent",
        "notifications_away",
    )))
    .execute(&pool)
    .await
    .unwrap();

    let flow = test.when(order("o-1", "ann", "tea", 1)).await;
    flow.assert_ok();
    for _ in 0..10 {
        test.advance(Duration::from_secs(600)).await.unwrap();
    }
    insta::assert_snapshot!(
        "notification_dead_lettered",
        test.lines(flow.correlation).await.join("\n")
    );

    let dead = test.store.dead_letters(0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].group.as_str(),
            dead[0].name.as_str(),
            dead[0].attempts
        ),
        ("notifications", "orders.order_confirmed", 10)
    );
    sqlx::query(AssertSqlSafe(rename(
        "notifications_away",
        "notifications_sent",
    )))
    .execute(&pool)
    .await
    .unwrap();
    test.store.retry_dead_letter(dead[0].id).await.unwrap();
    test.settle().await.unwrap();

    let sent = test
        .app
        .query(SentTo {
            customer: "ann".into(),
        })
        .await
        .unwrap();
    assert_eq!(sent, ["Your order o-1 is on its way."]);
    assert!(test.store.dead_letters(0, 10).await.unwrap().is_empty());
    let confirmed = test
        .lines(flow.correlation)
        .await
        .into_iter()
        .skip_while(|line| !line.starts_with("event orders.order_confirmed"))
        .take(4)
        .collect::<Vec<_>>();
    assert_eq!(
        confirmed[1..],
        [
            "  -> notifications: handled",
            "  -> orders.fulfilment: handled",
            "  -> orders.summaries: handled",
        ]
    );
}
