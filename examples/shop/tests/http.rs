//! The HTTP API end to end, through a real socket: orders placed and read back, and bad input
//! (malformed JSON, an unknown product, a zero or negative quantity, an unknown order) answered
//! with a 4xx that says what was wrong, with nothing written; a dead letter repaired (a payload
//! that does not decode is refused with a 422 naming the field) and retried.

use std::net::SocketAddr;
use std::time::Duration;

use inseam::sql::sqlx::{self, Row as _};
use inseam_tests::{Backend, TestDb, eventually};
use shop::World;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends one HTTP/1.1 request and returns the status and the JSON body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
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
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn written(store: &inseam::sql::SqlStore) -> (i64, i64) {
    let count = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get::<i64, _>(0)
    };
    (
        count("SELECT COUNT(*) FROM inseam_outbox WHERE stream IS NOT NULL").await,
        count("SELECT COUNT(*) FROM orders_summaries").await,
    )
}

/// Writes a dead letter of the notifications group: o-2's confirmation under a new message id,
/// with `payload`. Returns its id.
async fn dead_confirmation(store: &inseam::sql::SqlStore, payload: &str) -> i64 {
    let stored: Vec<u8> =
        sqlx::query("SELECT envelope FROM inseam_outbox WHERE name = 'orders.order_confirmed'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
    let mut envelope = inseam::RawEnvelope::from_json(&stored).unwrap();
    envelope.metadata.message_id = uuid::Uuid::now_v7();
    envelope.payload = payload.as_bytes().to_vec();
    sqlx::query(
        "INSERT INTO inseam_dead_letters (grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
         VALUES ('notifications', $1, 'orders.order_confirmed', 1, 'o-2', $2, 'does not decode', 1, 0, 0)",
    )
    .bind(envelope.metadata.message_id.to_string())
    .bind(envelope.to_json().unwrap())
    .execute(store.pool())
    .await
    .unwrap();
    store.dead_letters(0, 10).await.unwrap()[0].id
}

async fn sent_to(store: &inseam::sql::SqlStore, customer: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM notifications_sent WHERE customer = $1")
        .bind(customer.to_owned())
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0)
}

async fn api(backend: Backend) {
    let db = TestDb::new(backend, "shop_http").await;
    let store = shop::open(&db.url).await.unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let relay = app.start();
    shop::seed(&app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(axum::serve(listener, shop::http::router(app, store.clone())).into_future());

    let bad = [
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 1}"#,
            400,
            "Failed to parse the request body as JSON: lines: EOF while parsing a list at line 1 column 78",
        ),
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "mystery", "quantity": 1}]}"#,
            422,
            "unknown product `mystery`",
        ),
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 0}]}"#,
            422,
            "the quantity of `tea` must be at least 1, got 0",
        ),
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": -2}]}"#,
            422,
            "the quantity of `tea` must be at least 1, got -2",
        ),
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": []}"#,
            422,
            "an order needs at least one line",
        ),
        (
            r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "qty": 1}]}"#,
            422,
            "Failed to deserialize the JSON body into the target type: lines[0].qty: unknown field `qty`, expected `sku` or `quantity` at line 1 column 69",
        ),
    ];
    for (body, status, error) in bad {
        let (got, json) = request(addr, "POST", "/orders", body).await;
        assert_eq!(
            (got, json["error"].as_str()),
            (status, Some(error)),
            "{body}"
        );
    }
    assert_eq!(written(&store).await, (0, 0), "bad input wrote nothing");
    let (status, json) = request(addr, "GET", "/orders/nope", "").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (404, Some("no order `nope`"))
    );

    let (status, json) = request(
        addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-2", "customer": "ann", "lines": [{"sku": "tea", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        json,
        serde_json::json!({"order_id": "o-2", "total_cents": 1300})
    );
    let (status, json) = request(
        addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-2", "customer": "ann", "lines": [{"sku": "tea", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (409, Some("order `o-2` was already placed"))
    );
    let order = eventually(Duration::from_secs(20), "the order confirmed", || async {
        let (status, json) = request(addr, "GET", "/orders/o-2", "").await;
        (status == 200 && json["status"] == "confirmed").then_some(json)
    })
    .await;
    assert_eq!(order["total_cents"], 1300);
    let (status, json) = request(addr, "GET", "/customers/ann/orders", "").await;
    assert_eq!(status, 200);
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    let (status, json) = request(addr, "GET", "/dead-letters", "").await;
    assert_eq!((status, json), (200, serde_json::json!([])));
    let (status, json) = request(addr, "POST", "/dead-letters/42/retry", "").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (
            404,
            Some("dead letter 42 does not exist (already retried or discarded, or never written)")
        )
    );

    // A confirmation that reached the notifications without its customer: repaired through
    // the API (bad repairs refused, saying why), then retried and delivered.
    let id = dead_confirmation(&store, r#"{"order_id": "o-2"}"#).await;
    let path = format!("/dead-letters/{id}/payload");
    let (status, json) = request(addr, "GET", "/dead-letters", "").await;
    assert_eq!((status, json[0]["id"].as_i64()), (200, Some(id)));
    let refused = [
        (r#"{"order_id": "o-2"}"#, 422, "missing field `customer`"),
        (
            r#"{"order_id": "o-2", "customer": 7}"#,
            422,
            "invalid type: integer `7`, expected a string",
        ),
        (
            r#"{"order_id": "o-2", "#,
            400,
            "Failed to parse the request body as JSON",
        ),
    ];
    for (body, status, why) in refused {
        let (got, json) = request(addr, "PUT", &path, body).await;
        let error = json["error"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{body}: {json}");
        assert!(error.contains(why), "{body}: {error}");
    }
    let (status, json) = request(
        addr,
        "PUT",
        "/dead-letters/4242/payload",
        r#"{"order_id": "o-2", "customer": "bob"}"#,
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (
            404,
            Some(
                "dead letter 4242 does not exist (already retried or discarded, or never written)"
            )
        )
    );
    assert_eq!(sent_to(&store, "bob").await, 0, "nothing was delivered");
    let (status, json) = request(
        addr,
        "PUT",
        &path,
        r#"{"order_id": "o-2", "customer": "bob"}"#,
    )
    .await;
    assert_eq!(
        (status, json["id"].as_i64(), json["group"].as_str()),
        (200, Some(id), Some("notifications"))
    );
    let (status, _) = request(addr, "POST", &format!("/dead-letters/{id}/retry"), "").await;
    assert_eq!(status, 202);
    eventually(
        Duration::from_secs(20),
        "the repaired confirmation sent",
        || async { (sent_to(&store, "bob").await == 1).then_some(()) },
    )
    .await;
    let (status, json) = request(addr, "GET", "/dead-letters", "").await;
    assert_eq!((status, json), (200, serde_json::json!([])));
    server.abort();
    relay.shutdown().await;
}

inseam_tests::on_every_backend!(api);
