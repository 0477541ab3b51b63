//! The admin page mounted at `/admin` (`shop::http::router_with_admin`), through its router
//! on every backend: each page renders what the store holds; retry, discard and repair change
//! the store; a request that is not authorised, comes from another site or lacks its CSRF token
//! is refused with a 403 and changes nothing; unknown and malformed ids get a 4xx that says
//! why, as a page or as JSON.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{DeadLetter, SqlStore};
use inseam_tests::{Backend, TestDb, eventually};
use shop::World;
use tower::ServiceExt as _;

const TOKEN: &str = "s3cret-admin";

/// Writes a dead letter of the notifications group: order `o-2`'s confirmation under a new
/// message id, with `payload`. Returns it.
async fn dead_confirmation(store: &SqlStore, payload: &str) -> DeadLetter {
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
         VALUES ('notifications', $1, 'orders.order_confirmed', 1, 'o-2', $2, 'cannot decode orders.order_confirmed v1: missing field `customer`', 3, 0, 0)",
    )
    .bind(envelope.metadata.message_id.to_string())
    .bind(envelope.to_json().unwrap())
    .execute(store.pool())
    .await
    .unwrap();
    let id = envelope.metadata.message_id;
    store.dead_letters_of(id).await.unwrap().remove(0)
}

async fn sent_to(store: &SqlStore, customer: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM notifications_sent WHERE customer = $1")
        .bind(customer.to_owned())
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0)
}

/// A response: status, headers, body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of cookie `name` among those the response sets.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_owned())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A browser of the admin page: its cookies, and the router it talks to.
struct Browser {
    router: Router,
    cookies: Vec<(String, String)>,
}

impl Browser {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, answer: &Answer) {
        for name in ["inseam_admin_csrf", "inseam_admin_login"] {
            if let Some(value) = answer.cookie(name) {
                self.cookies.retain(|(k, _)| k != name);
                self.cookies.push((name.to_owned(), value));
            }
        }
    }

    fn csrf(&self) -> String {
        self.cookies
            .iter()
            .find(|(k, _)| k == "inseam_admin_csrf")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    async fn get(&mut self, path: &str) -> Answer {
        let request = Request::get(path)
            .header(header::COOKIE, self.cookie_header())
            .body(Body::empty())
            .unwrap();
        let answer = self.send(request).await;
        self.keep(&answer);
        answer
    }

    async fn get_json(&self, path: &str) -> Answer {
        let request = Request::get(path)
            .header(header::ACCEPT, "application/json")
            .body(Body::empty())
            .unwrap();
        self.send(request).await
    }

    /// A form posted as the browser would from one of the pages (same origin), with extra
    /// `headers`.
    async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut request = Request::post(path)
            .header(header::HOST, "shop.test")
            .header(header::ORIGIN, "http://shop.test")
            .header("sec-fetch-site", "same-origin")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, self.cookie_header());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = self.send(request.body(Body::from(body)).unwrap()).await;
        self.keep(&answer);
        answer
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn admin(backend: Backend) {
    let db = TestDb::new(backend, "shop_admin").await;
    let store = shop::open(&db.url).await.unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let relay = app.start();
    shop::seed(&app).await.unwrap();
    let flow = shop::place(&app, "o-2", "ann", &[("tea", 2)])
        .await
        .unwrap();
    let order = shop::settled(&app, "o-2", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(order.status, "confirmed");
    let letter = dead_confirmation(&store, r#"{"order_id": "o-2"}"#).await;
    let id = letter.id;
    let mut browser = Browser {
        router: shop::http::router_with_admin(app.clone(), store.clone(), Some(TOKEN.into())),
        cookies: Vec::new(),
    };

    // Every page renders what the store holds.
    let page = browser.get("/admin").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let set_cookie = page.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set_cookie.starts_with("inseam_admin_csrf=")
            && set_cookie.ends_with("; Path=/admin; HttpOnly; SameSite=Strict"),
        "the CSRF cookie: {set_cookie}"
    );
    assert_eq!(
        page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap(),
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    assert!(
        page.body.contains("<svg class=\"flow\""),
        "the flow diagram"
    );
    assert!(page.body.contains("orders.place_order"), "a command in it");
    assert!(
        page.body
            .contains(">1</a></td><td><span class=\"running\">running</span>"),
        "the notifications group has one dead letter: {}",
        page.body
    );
    let overview = browser.get_json("/admin").await;
    let groups = overview.json()["groups"].clone();
    let notifications = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "notifications")
        .unwrap()
        .clone();
    assert_eq!(
        (
            notifications["dead_letters"].as_i64(),
            notifications["paused"].is_null()
        ),
        (Some(1), true)
    );
    assert_eq!(overview.json()["dead_letters"], 1);

    let page = browser.get("/admin/dead-letters").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(&format!("id=\"dead-letter-{id}\"")));
    assert!(
        page.body.contains(
            "<ol class=\"chain\"><li>cannot decode orders.order_confirmed v1</li><li>missing field `customer`</li></ol>"
        ),
        "the error chain: {}",
        page.body
    );
    let page = browser.get(&format!("/admin/dead-letters/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("&quot;order_id&quot;: &quot;o-2&quot;"),
        "{}",
        page.body
    );
    let page = browser.get(&format!("/admin/flows/{flow}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("orders.order_placed"), "{}", page.body);
    assert!(
        page.body.contains("notifications: handled"),
        "{}",
        page.body
    );
    let page = browser
        .get(&format!("/admin/messages/{}", letter.message_id))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(&format!(
        "dead letter {id}</a> of <code>notifications</code>"
    )));
    let placed = store.flow(flow).await.unwrap()[0]
        .envelope
        .metadata
        .message_id;
    let page = browser.get(&format!("/admin/messages/{placed}")).await;
    assert_eq!(
        (page.status, page.location()),
        (
            StatusCode::SEE_OTHER,
            format!("/admin/flows/{flow}#m-{placed}").as_str()
        )
    );
    let page = browser
        .get(&format!("/admin/flows?correlation_id={flow}"))
        .await;
    assert_eq!(page.location(), format!("/admin/flows/{flow}"));
    let page = browser.get("/admin/assets/admin.css").await;
    assert_eq!(
        (
            page.status,
            page.headers[header::CONTENT_TYPE].to_str().unwrap()
        ),
        (StatusCode::OK, "text/css; charset=utf-8")
    );

    // Unknown and malformed ids: a 4xx that says why, as a page or as JSON.
    let cases = [
        (
            "/admin/dead-letters/4242".to_owned(),
            StatusCode::NOT_FOUND,
            "dead letter 4242 does not exist (already retried or discarded, or never written)",
        ),
        (
            "/admin/dead-letters/abc".to_owned(),
            StatusCode::BAD_REQUEST,
            "malformed dead letter id `abc`: expected a whole number",
        ),
        (
            "/admin/flows/0190a0e4-0000-7000-8000-000000000000".to_owned(),
            StatusCode::NOT_FOUND,
            "no message of flow 0190a0e4-0000-7000-8000-000000000000 in the outbox (never written, or pruned by the retention)",
        ),
        (
            "/admin/messages/0190a0e4-0000-7000-8000-000000000000".to_owned(),
            StatusCode::NOT_FOUND,
            "no message 0190a0e4-0000-7000-8000-000000000000 in the outbox or the dead letters",
        ),
        (
            "/admin/messages?message_id=nope".to_owned(),
            StatusCode::BAD_REQUEST,
            "malformed message id `nope`: invalid character: found `n` at 0",
        ),
        (
            "/admin/dead-letters?after=x".to_owned(),
            StatusCode::BAD_REQUEST,
            "Failed to deserialize query string: after: invalid digit found in string",
        ),
        (
            "/admin/nowhere".to_owned(),
            StatusCode::NOT_FOUND,
            "no such page",
        ),
    ];
    for (path, status, reason) in &cases {
        let page = browser.get(path).await;
        assert_eq!(page.status, *status, "{path}: {}", page.body);
        assert!(
            page.body
                .contains(&format!("<p id=\"reason\">{}</p>", html_escape(reason))),
            "{path}: {}",
            page.body
        );
        let answer = browser.get_json(path).await;
        assert_eq!(
            (answer.status, answer.json()),
            (*status, serde_json::json!({ "error": reason })),
            "{path}"
        );
    }

    // Refused: not logged in; from another site; without the CSRF token. Nothing changes.
    let csrf = browser.csrf();
    let retry = format!("/admin/dead-letters/{id}/retry");
    let refused = browser.post(&retry, &[("csrf", &csrf)], &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        refused
            .body
            .contains("not authorised to change anything: log in first"),
        "{}",
        refused.body
    );
    let bad_login = browser
        .post("/admin/login", &[("csrf", &csrf), ("token", "guess")], &[])
        .await;
    assert_eq!(bad_login.status, StatusCode::FORBIDDEN);
    assert!(bad_login.cookie("inseam_admin_login").is_none());
    let login = browser
        .post("/admin/login", &[("csrf", &csrf), ("token", TOKEN)], &[])
        .await;
    assert_eq!(
        (login.status, login.location()),
        (StatusCode::SEE_OTHER, "/admin?done=login")
    );
    assert!(login.cookie("inseam_admin_login").is_some());
    let cross_site = [
        (
            ("sec-fetch-site", "cross-site"),
            "cross-site request refused (Sec-Fetch-Site: cross-site)",
        ),
        (
            ("origin", "https://evil.example"),
            "cross-site request refused (Origin https://evil.example is not this host, shop.test)",
        ),
    ];
    for (header, reason) in cross_site {
        let answer = browser.post(&retry, &[("csrf", &csrf)], &[header]).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{header:?}");
        assert!(answer.body.contains(reason), "{header:?}: {}", answer.body);
    }
    let answer = browser.post(&retry, &[("csrf", "forged")], &[]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.body.contains(&html_escape(
        "the form's CSRF token does not match its cookie"
    )));
    let answer = browser.post(&retry, &[], &[]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        store.dead_letter(id).await.unwrap(),
        letter,
        "refused requests changed nothing"
    );
    assert_eq!(sent_to(&store, "bob").await, 0);

    // Repair: a payload the group's decoder refuses is refused, saying why; a good one is kept.
    let repair = format!("/admin/dead-letters/{id}/payload");
    let refused = browser
        .post(
            &repair,
            &[
                ("csrf", &csrf),
                ("payload", r#"{"order_id": "o-2", "customer": 7}"#),
            ],
            &[],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        refused
            .body
            .contains("invalid type: integer `7`, expected a string"),
        "{}",
        refused.body
    );
    assert!(
        refused.body.contains("&quot;customer&quot;: 7"),
        "what was typed is kept"
    );
    let by_tool = |body: &'static str| {
        Request::post(format!("/admin/dead-letters/{id}/payload"))
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap()
    };
    let answer = browser
        .send(by_tool("payload=%7B%22order_id%22%3A%22o-2%22%7D"))
        .await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = answer.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with(&format!(
            "dead letter {id} was not repaired: group `notifications` cannot read the new payload"
        )) && error.contains("missing field `customer`"),
        "{error}"
    );
    let answer = browser.send(by_tool("text=hello")).await;
    assert_eq!(
        (answer.status, answer.json()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({"error": "the form has no `payload` field"})
        )
    );
    assert_eq!(store.dead_letter(id).await.unwrap(), letter);
    let repaired = browser
        .post(
            &repair,
            &[
                ("csrf", &csrf),
                ("payload", r#"{"order_id": "o-2", "customer": "bob"}"#),
            ],
            &[],
        )
        .await;
    assert_eq!(
        (repaired.status, repaired.location()),
        (
            StatusCode::SEE_OTHER,
            format!("/admin/dead-letters/{id}?done=repaired&id={id}").as_str()
        )
    );
    let stored = store.dead_letter(id).await.unwrap();
    let envelope = inseam::RawEnvelope::from_json(&stored.envelope).unwrap();
    assert_eq!(
        envelope.payload,
        br#"{"order_id": "o-2", "customer": "bob"}"#
    );

    // Retry: the dead letter is gone and the notification sent.
    let retried = browser.post(&retry, &[("csrf", &csrf)], &[]).await;
    assert_eq!(
        (retried.status, retried.location()),
        (
            StatusCode::SEE_OTHER,
            format!("/admin/dead-letters?done=retried&id={id}").as_str()
        )
    );
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
    eventually(
        Duration::from_secs(20),
        "the repaired confirmation sent",
        || async { (sent_to(&store, "bob").await == 1).then_some(()) },
    )
    .await;
    let page = browser.get("/admin/dead-letters?done=retried&id=1").await;
    assert!(page.body.contains("id=\"no-dead-letters\""));
    let again = browser.post(&retry, &[("csrf", &csrf)], &[]).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert!(
        again
            .body
            .contains(&format!("dead letter {id} does not exist"))
    );

    // Discard, by a tool with the bearer token and JSON.
    let other = dead_confirmation(&store, r#"{"order_id": "o-2", "customer": "carol"}"#).await;
    let discard = |id: i64, token: &str| {
        Request::post(format!("/admin/dead-letters/{id}/discard"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/json")
            .body(Body::empty())
            .unwrap()
    };
    let answer = browser.send(discard(other.id, "wrong")).await;
    assert_eq!(
        (answer.status, answer.json()),
        (
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "not authorised to change anything: log in first"})
        )
    );
    assert_eq!(store.dead_letter(other.id).await.unwrap(), other);
    let answer = browser.send(discard(other.id, TOKEN)).await;
    assert_eq!(
        (answer.status, answer.json()),
        (StatusCode::OK, serde_json::json!({"discarded": other.id}))
    );
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
    let answer = browser.send(discard(other.id, TOKEN)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    // Pause and resume a group.
    let paused = browser
        .post(
            "/admin/groups/notifications/pause",
            &[("csrf", &csrf), ("reason", "carrier down")],
            &[],
        )
        .await;
    assert_eq!(paused.status, StatusCode::SEE_OTHER);
    let groups: Vec<_> = store.paused().await.unwrap();
    assert_eq!(
        groups
            .iter()
            .map(|p| (p.group.as_str(), p.reason.as_str()))
            .collect::<Vec<_>>(),
        [("notifications", "carrier down")]
    );
    let page = browser.get("/admin").await;
    assert!(page.body.contains("<span class=\"paused\">paused</span>"));
    let resumed = browser
        .post(
            "/admin/groups/notifications/resume",
            &[("csrf", &csrf)],
            &[],
        )
        .await;
    assert_eq!(resumed.status, StatusCode::SEE_OTHER);
    assert!(store.paused().await.unwrap().is_empty());
    let unknown = browser
        .post("/admin/groups/nobody/pause", &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.body.contains("no group `nobody` in this app"));

    // Logged out, changes are refused again.
    let out = browser.post("/admin/logout", &[("csrf", &csrf)], &[]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    let refused = browser
        .post("/admin/groups/notifications/pause", &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(store.paused().await.unwrap().is_empty());
    relay.shutdown().await;
}

/// Without a token, the admin page reads and refuses every change.
async fn read_only(backend: Backend) {
    let db = TestDb::new(backend, "shop_admin_ro").await;
    let store = shop::open(&db.url).await.unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let mut browser = Browser {
        router: shop::http::router_with_admin(app, store.clone(), None),
        cookies: Vec::new(),
    };
    let page = browser.get("/admin").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("read only"));
    let csrf = browser.csrf();
    let refused = browser
        .post("/admin/groups/notifications/pause", &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        refused.body.contains(
            "not authorised to change anything: the app&#39;s authorisation hook refused it"
        ),
        "{}",
        refused.body
    );
    assert!(store.paused().await.unwrap().is_empty());
    let login = browser.get("/admin/login").await;
    assert_eq!(login.status, StatusCode::NOT_FOUND);
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

inseam_tests::on_every_backend!(admin, read_only);
