//! The shop's metrics as Prometheus scrapes them: `GET /metrics` on the real router, through a
//! socket, on SQLite. A notification that keeps failing becomes a dead letter, and the
//! dead-letter gauge of its group rises to 1; once the cause is fixed and the dead letter
//! retried through the API, the gauge falls back to 0. The counters of dispatches, deliveries,
//! retries and dead letters, and the relay's batch durations, are there too.

use std::net::SocketAddr;
use std::time::Duration;

use inseam::sql::sqlx::{self, AssertSqlSafe};
use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam_tests::{Backend, TestDb, eventually};
use shop::World;
use shop::notifications::SentTo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends one HTTP/1.1 request and returns the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, where `labels` is
/// how the labels are written (`group="notifications"`).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, text) = request(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "{text}");
    text
}

async fn rename(store: &SqlStore, from: &str, to: &str) {
    sqlx::query(AssertSqlSafe(format!("ALTER TABLE {from} RENAME TO {to}")))
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_gauge_rises_with_a_dead_letter_and_falls_once_it_is_retried() {
    shop::telemetry::install_metrics().unwrap();
    let db = TestDb::new(Backend::Sqlite, "shop_metrics").await;
    let options = SqlStoreOptions::new().relay(RelayOptions {
        max_attempts: 2,
        backoff_base: Duration::from_millis(20),
        poll_interval: Duration::from_millis(50),
        ..RelayOptions::default()
    });
    let store = SqlStore::connect_with(&db.url, options).await.unwrap();
    shop::install(&store).await.unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let relay = app.start();
    shop::seed(&app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        axum::serve(listener, shop::http::router(app.clone(), store.clone())).into_future(),
    );

    let notifications = r#"group="notifications""#;
    let text = scrape(addr).await;
    assert_eq!(
        sample(&text, "inseam_dead_letter_depth", notifications),
        Some(0.0),
        "every group has its gauge from the first scrape:\n{text}"
    );

    // The notifications cannot write: their confirmation fails twice and is dead-lettered.
    rename(&store, "notifications_sent", "notifications_away").await;
    let (status, body) = request(
        addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The same order again: refused by its handler, a failed dispatch.
    let (status, body) = request(
        addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let text = eventually(Duration::from_secs(20), "a dead letter counted", || async {
        let text = scrape(addr).await;
        (sample(&text, "inseam_dead_letter_depth", notifications) == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "inseam_dead_letters_total", notifications),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_retries_total", notifications),
        Some(1.0),
        "{text}"
    );
    let place_order = r#"kind="command",message="orders.place_order""#;
    assert_eq!(
        sample(&text, "inseam_dispatches_total", place_order),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_dispatch_failures_total", place_order),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "inseam_deliveries_total",
            r#"group="orders.fulfilment""#
        )
        .is_some_and(|n| n >= 4.0),
        "{text}"
    );
    assert!(
        text.contains("inseam_relay_batch_duration_seconds_count{group=\"orders.fulfilment\"}"),
        "{text}"
    );
    let letters = store.dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].group.as_str(), letters[0].name.as_str()),
        ("notifications", "orders.order_confirmed")
    );

    // Fixed, then retried through the API: delivered, and the gauge falls back.
    rename(&store, "notifications_away", "notifications_sent").await;
    let (status, body) = request(
        addr,
        "POST",
        &format!("/dead-letters/{}/retry", letters[0].id),
        "",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let sent = eventually(Duration::from_secs(20), "the retry delivered", || async {
        let sent = app
            .query(SentTo {
                customer: "ann".into(),
            })
            .await
            .unwrap();
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    assert_eq!(sent, ["Your order o-1 is on its way."]);
    let text = scrape(addr).await;
    assert_eq!(
        sample(&text, "inseam_dead_letter_depth", notifications),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_deliveries_total", notifications),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_lag_messages", notifications),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "inseam_dead_letters_total", notifications),
        Some(1.0),
        "{text}"
    );
    server.abort();
    relay.shutdown().await;
}
