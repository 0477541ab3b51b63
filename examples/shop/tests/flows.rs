//! The shop's three demo orders, on a SQLite file and on the PostgreSQL server, with the same
//! code: each flow's timeline is pinned by a snapshot, and the read models and notifications
//! agree with it.

use std::time::Duration;

use inseam_tests::{Backend, TestDb};
use shop::World;
use shop::notifications::SentTo;
use shop::orders::CustomerOrders;

async fn three_orders(backend: Backend) {
    let db = TestDb::new(backend, "shop_flows").await;
    let store = shop::open(&db.url).await.unwrap();
    let world = World::default();
    world.gateway.decline("bob");
    let app = shop::app(&store, &world).await.unwrap();
    let relay = app.start();
    shop::seed(&app).await.unwrap();
    for (order, status) in shop::DEMO_ORDERS
        .into_iter()
        .zip(["confirmed", "rejected", "rejected"])
    {
        let order_id = order.order_id;
        let flow = shop::place(&app, order_id, order.customer, order.lines)
            .await
            .unwrap();
        let summary = shop::settled(&app, order_id, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(summary.status, status, "{order_id}");
        let timeline = shop::timeline(&store, &app, flow, false)
            .await
            .unwrap()
            .replace(&flow.to_string(), "<flow>");
        insta::assert_snapshot!(order_id, timeline);
    }
    // Choreography: every customer heard of the outcome, once.
    inseam_tests::eventually(Duration::from_secs(20), "notifications", || async {
        let carol = app
            .query(SentTo {
                customer: "carol".into(),
            })
            .await
            .ok()?;
        (!carol.is_empty()).then_some(())
    })
    .await;
    relay.shutdown().await;
    let sent = |customer: &'static str| {
        let app = app.clone();
        async move {
            app.query(SentTo {
                customer: customer.into(),
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(sent("alice").await, ["Your order order-1 is on its way."]);
    assert_eq!(
        sent("bob").await,
        ["Sorry, your order order-2 was cancelled: payment declined."]
    );
    let history = app
        .query(CustomerOrders {
            customer: "alice".into(),
        })
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].total_cents, 2500);
}

inseam_tests::on_every_backend!(three_orders);
