//! The admin page in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! against `shop serve` on a fresh SQLite database. A confirmation reaches the notifications
//! without its customer and becomes a dead letter; on the admin page, a click on Retry before
//! logging in is refused; logged in with the token, a payload the decoder refuses is refused
//! with the reason, the repaired payload is saved, Retry delivers it: the store has sent the
//! notification and the flow's page shows it handled.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`; other paths in `CHROMIUM` and `CHROMEDRIVER`). With
//! `INSEAM_ADMIN_SCREENSHOT=<file.png>` it also writes a screenshot of the overview there (the
//! one in `docs/admin.png` was made so).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use inseam::sql::SqlStore;
use inseam::sql::sqlx::{self, Row as _};
use inseam_tests::eventually;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SHOP: &str = env!("CARGO_BIN_EXE_shop");
const TOKEN: &str = "browser-test-token";
const INSTALL: &str = "apt-get install -y chromium chromium-driver";

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("the free port").port()
}

/// Waits until something listens on `addr`; fails naming `what` when `child` exits first.
fn listening(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {addr}: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The program at `CHROMIUM`/`CHROMEDRIVER`, or Debian's; fails saying how to install it.
fn program(env: &str, default: &str) -> String {
    let path = std::env::var(env).unwrap_or_else(|_| default.to_owned());
    assert!(
        Path::new(&path).exists(),
        "the admin page's browser test needs Chromium and chromedriver, and {path} is missing: \
         install Debian's packages `chromium` and `chromium-driver` ({INSTALL}), or set {env} to \
         the program's path"
    );
    path
}

/// One HTTP/1.1 request to the shop's API; the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, body.to_owned())
}

/// Writes a dead letter of the notifications group: order `o-1`'s confirmation under a new
/// message id, without its customer. Returns its id, message id and correlation id.
async fn dead_confirmation(store: &SqlStore) -> (i64, uuid::Uuid, uuid::Uuid) {
    let stored: Vec<u8> =
        sqlx::query("SELECT envelope FROM inseam_outbox WHERE name = 'orders.order_confirmed'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
    let mut envelope = inseam::RawEnvelope::from_json(&stored).unwrap();
    envelope.metadata.message_id = uuid::Uuid::now_v7();
    envelope.payload = br#"{"order_id": "o-1"}"#.to_vec();
    sqlx::query(
        "INSERT INTO inseam_dead_letters (grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
         VALUES ('notifications', $1, 'orders.order_confirmed', 1, 'o-1', $2, 'cannot decode orders.order_confirmed v1: missing field `customer` at line 1 column 19', 5, 0, 0)",
    )
    .bind(envelope.metadata.message_id.to_string())
    .bind(envelope.to_json().unwrap())
    .execute(store.pool())
    .await
    .unwrap();
    let letters = store
        .dead_letters_of(envelope.metadata.message_id)
        .await
        .unwrap();
    (
        letters[0].id,
        envelope.metadata.message_id,
        envelope.metadata.correlation_id,
    )
}

async fn sent_to(store: &SqlStore, customer: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM notifications_sent WHERE customer = $1")
        .bind(customer.to_owned())
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0)
}

/// The text of the element `css`, once it is there. An element found while the page it was
/// on is being replaced (after a click that submits a form) goes stale before its text is
/// read: it is looked for again, on the new page.
async fn text(client: &Client, css: &str) -> String {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        let found = client
            .wait()
            .at_most(left.max(Duration::from_millis(100)))
            .for_element(Locator::Css(css))
            .await;
        let error = match found {
            Ok(element) => match element.text().await {
                Ok(text) => return text,
                Err(error) => error.to_string(),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() >= give_up {
            let page = client.source().await.unwrap_or_default();
            panic!("no `{css}` ({error}) on this page:\n{page}")
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the element at `css` reads `expected`: after a click, the page that answers
/// it may not have replaced the one clicked on yet, whose element still reads what it did.
async fn text_is(client: &Client, css: &str, expected: &str) {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let now = text(client, css).await;
        if now == expected {
            return;
        }
        if Instant::now() >= give_up {
            assert_eq!(now, expected, "`{css}` after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces the payload in the editor and saves it.
async fn save_payload(client: &Client, payload: &str) {
    let editor = client.find(Locator::Id("payload")).await.unwrap();
    editor.clear().await.unwrap();
    editor.send_keys(payload).await.unwrap();
    client
        .find(Locator::Id("save-payload"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_repaired_and_retried_in_the_browser() {
    let chromium = program("CHROMIUM", "/usr/bin/chromium");
    let chromedriver = program("CHROMEDRIVER", "/usr/bin/chromedriver");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shop.db").display());

    let shop_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut shop = Killed(
        Command::new(SHOP)
            .args(["serve", &shop_addr.to_string()])
            .env("SHOP_DATABASE_URL", &url)
            .env("SHOP_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .spawn()
            .expect("start `shop serve`"),
    );
    listening(shop_addr, &mut shop.0, "shop serve");
    let (status, body) = request(
        shop_addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 1}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(30), "order o-1 confirmed", || async {
        let (status, body) = request(shop_addr, "GET", "/orders/o-1", "").await;
        (status == 200 && body.contains("\"confirmed\"")).then_some(())
    })
    .await;
    let store = shop::open(&url).await.unwrap();
    let (id, message_id, correlation) = dead_confirmation(&store).await;

    let driver_port = free_port();
    let mut driver = Killed(
        Command::new(&chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver} ({e}): {INSTALL}")),
    );
    listening(
        format!("127.0.0.1:{driver_port}").parse().unwrap(),
        &mut driver.0,
        "chromedriver",
    );
    let profile = tempfile::tempdir().unwrap();
    let capabilities = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1440,1000",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!("an object")
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .unwrap_or_else(|e| panic!("cannot start a Chromium session over chromedriver: {e}"));
    let admin = format!("http://{shop_addr}/admin");

    // The dead letter is listed with its error chain; Retry before logging in is refused.
    client.goto(&format!("{admin}/dead-letters")).await.unwrap();
    let row = text(&client, &format!("#dead-letter-{id}")).await;
    assert!(row.contains("notifications"), "{row}");
    assert!(row.contains("missing field `customer`"), "{row}");
    client
        .find(Locator::Css(&format!("#dead-letter-{id} button.retry")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_is(
        &client,
        "#reason",
        "not authorised to change anything: log in first",
    )
    .await;
    assert_eq!(
        store.dead_letters(0, 10).await.unwrap().len(),
        1,
        "the refused retry changed nothing"
    );

    // Logged in with the token.
    client.goto(&format!("{admin}/login")).await.unwrap();
    client
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    client
        .find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_is(&client, "#notice", "Logged in.").await;
    let notifications = text(&client, "#groups tr[data-group='notifications']").await;
    assert!(notifications.contains("running"), "{notifications}");
    client
        .wait()
        .for_element(Locator::Css("svg.flow"))
        .await
        .unwrap();
    // The whole overview: groups and the flow diagram.
    let height = client
        .execute("return document.documentElement.scrollHeight", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(1000);
    client
        .set_window_size(1440, u32::try_from(height).unwrap_or(1000) + 140)
        .await
        .unwrap();
    let png = client.screenshot().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    if let Ok(path) = std::env::var("INSEAM_ADMIN_SCREENSHOT") {
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }

    // A payload the decoder refuses is refused with the reason; the repaired one is kept.
    client
        .goto(&format!("{admin}/dead-letters/{id}"))
        .await
        .unwrap();
    save_payload(&client, r#"{"order_id": "o-1", "customer": 7}"#).await;
    let refused = text(&client, "#refused").await;
    assert!(
        refused.contains("invalid type: integer `7`, expected a string"),
        "{refused}"
    );
    save_payload(&client, r#"{"order_id": "o-1", "customer": "bob"}"#).await;
    text_is(
        &client,
        "#notice",
        &format!("Dead letter {id} repaired: retry it to deliver the new payload."),
    )
    .await;
    let letter = store.dead_letter(id).await.unwrap();
    let envelope = inseam::RawEnvelope::from_json(&letter.envelope).unwrap();
    assert_eq!(
        envelope.payload,
        br#"{"order_id": "o-1", "customer": "bob"}"#
    );

    // Retry: delivered.
    client
        .find(Locator::Css("form[action$='/retry'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_is(
        &client,
        "#notice",
        &format!("Dead letter {id} requeued: its group will receive it again."),
    )
    .await;
    assert_eq!(text(&client, "#no-dead-letters").await, "No dead letters.");
    eventually(
        Duration::from_secs(30),
        "the repaired confirmation sent",
        || async { (sent_to(&store, "bob").await == 1).then_some(()) },
    )
    .await;
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
    client
        .goto(&format!("{admin}/flows/{correlation}"))
        .await
        .unwrap();
    assert_eq!(
        text(
            &client,
            &format!("#m-{message_id} li[data-group='notifications']")
        )
        .await,
        "notifications: handled"
    );
    client.close().await.unwrap();
    drop(driver);
    drop(shop);
}
