//! The shop killed with SIGKILL again and again while orders go through the saga, restarted
//! each time: afterwards every order finished the way it should, and every step of every flow
//! happened exactly once (stock, charges, shipments, notifications).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use inseam::sql::sqlx::{self, Row as _};
use inseam_tests::{Backend, TestDb};
use shop::World;

const SHOP: &str = env!("CARGO_BIN_EXE_shop");
const ORDERS: u32 = 60;

fn worker(url: &str) -> Child {
    Command::new(SHOP)
        .args(["worker", "0", &ORDERS.to_string()])
        .env("SHOP_DATABASE_URL", url)
        .stdout(Stdio::null())
        .spawn()
        .expect("start a shop worker")
}

async fn rows(store: &inseam::sql::SqlStore, sql: &'static str) -> Vec<(String, String)> {
    sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn killed_between_saga_steps(backend: Backend) {
    let db = TestDb::new(backend, "shop_crash").await;
    let store = shop::open(&db.url).await.unwrap();
    {
        let app = shop::app(&store, &World::default()).await.unwrap();
        shop::seed(&app).await.unwrap();
    }
    let rounds = std::env::var("INSEAM_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8_u32);
    let mut interrupted = 0;
    for round in 0..rounds {
        let mut child = worker(&db.url);
        if round == 0 {
            // The first kill lands mid-way: some orders placed, not all of them finished.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let placed = rows(&store, "SELECT order_id, status FROM orders_summaries").await;
                if !placed.is_empty() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(100..600))).await;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the worker stopped by itself in round {round}: {status}");
        }
        child.kill().expect("kill the worker");
        child.wait().expect("reap the worker");
        let settled = rows(
            &store,
            "SELECT order_id, status FROM orders_summaries WHERE status <> 'placed'",
        )
        .await;
        if settled.len() < ORDERS as usize {
            interrupted += 1;
        }
    }
    assert!(
        interrupted > 0,
        "every flow had finished before the first kill: the test killed nothing in flight"
    );
    // One last worker, left to finish every flow.
    let mut child = worker(&db.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    let summaries = loop {
        let summaries = rows(
            &store,
            "SELECT order_id, status FROM orders_summaries ORDER BY order_id",
        )
        .await;
        if summaries.len() == ORDERS as usize && summaries.iter().all(|(_, s)| s != "placed") {
            break summaries;
        }
        assert!(
            Instant::now() < deadline,
            "orders did not finish: {summaries:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let the last notifications land, then stop.
    let notified = loop {
        let sent = rows(&store, "SELECT customer, message FROM notifications_sent").await;
        if sent.len() >= ORDERS as usize || Instant::now() > deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().expect("kill the last worker");
    child.wait().expect("reap the last worker");

    let expected = |i: u32| match i % 3 {
        1 => "rejected",
        2 => "rejected",
        _ => "confirmed",
    };
    for (order_id, status) in &summaries {
        let i: u32 = order_id.trim_start_matches("w-").parse().unwrap();
        assert_eq!(status, expected(i), "{order_id}");
    }
    let confirmed: Vec<String> = summaries
        .iter()
        .filter(|(_, s)| s == "confirmed")
        .map(|(o, _)| o.clone())
        .collect();
    let declined: Vec<String> = (0..ORDERS)
        .filter(|i| i % 3 == 1)
        .map(|i| format!("w-{i}"))
        .collect();
    // Stock: each confirmed order holds one tea; declined ones were reserved and released.
    let stock = rows(
        &store,
        "SELECT sku, CAST(available AS TEXT) FROM inventory_stock ORDER BY sku",
    )
    .await;
    let tea = 100 - confirmed.len() as i64;
    assert_eq!(
        stock,
        [
            ("cup".to_owned(), "20".to_owned()),
            ("tea".to_owned(), tea.to_string()),
            ("teapot".to_owned(), "1".to_owned()),
        ]
    );
    let mut reserved: Vec<String> = rows(
        &store,
        "SELECT order_id, sku FROM inventory_reservations ORDER BY order_id",
    )
    .await
    .into_iter()
    .map(|(o, _)| o)
    .collect();
    reserved.sort();
    let mut want = confirmed.clone();
    want.sort();
    assert_eq!(reserved, want, "one reservation per confirmed order");
    // One charge per order that reached payment, with the right outcome.
    let charges = rows(
        &store,
        "SELECT order_id, status FROM payments_charges ORDER BY order_id",
    )
    .await;
    let mut want: Vec<(String, String)> = confirmed
        .iter()
        .map(|o| (o.clone(), "charged".to_owned()))
        .chain(declined.iter().map(|o| (o.clone(), "declined".to_owned())))
        .collect();
    want.sort();
    assert_eq!(charges, want);
    let shipped: Vec<String> = rows(
        &store,
        "SELECT order_id, tracking FROM shipping_shipments ORDER BY order_id",
    )
    .await
    .into_iter()
    .map(|(o, _)| o)
    .collect();
    let mut want = confirmed.clone();
    want.sort();
    assert_eq!(shipped, want, "one shipment per confirmed order");
    // Exactly one notification per order.
    assert_eq!(notified.len(), ORDERS as usize, "{notified:?}");
    let mut customers: Vec<&str> = notified.iter().map(|(c, _)| c.as_str()).collect();
    customers.sort_unstable();
    customers.dedup();
    assert_eq!(customers.len(), ORDERS as usize);
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
}

inseam_tests::on_every_backend!(killed_between_saga_steps);
