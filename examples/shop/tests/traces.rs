//! One order's spans make one trace: from the HTTP request (`POST /orders`) through the
//! command's dispatch, the outbox and the saga's durable commands to every subscriber, each
//! delivery's span a child of the span that published what it delivers. The spans are
//! exported through OpenTelemetry into memory; the app runs on SQLite with its relay.

use std::net::SocketAddr;
use std::time::Duration;

use inseam::sql::SqlStore;
use inseam_tests::{Backend, TestDb, eventually};
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use shop::World;
use shop::notifications::SentTo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The `deliver` spans of `(group, message name)`.
fn deliveries<'a>(spans: &'a [SpanData], group: &str, message: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == "deliver"
                && attribute(s, "group").as_deref() == Some(group)
                && attribute(s, "message_name").as_deref() == Some(message)
        })
        .collect()
}

/// Checks that every delivery of `(group, message)` is a child of one of `parents` (a message
/// delivered again after a failed batch is still a child of what published it; what a failed
/// attempt published was rolled back).
fn children_of(spans: &[SpanData], parents: &[&SpanData], group: &str, message: &str) {
    let found = deliveries(spans, group, message);
    assert!(!found.is_empty(), "no delivery of {message} to {group}");
    for span in &found {
        let parent = parents
            .iter()
            .find(|p| p.span_context.span_id() == span.parent_span_id)
            .unwrap_or_else(|| {
                panic!("the delivery of {message} to {group} is a child of none of {parents:#?}")
            });
        assert_eq!(
            span.span_context.trace_id(),
            parent.span_context.trace_id(),
            "{message} to {group}"
        );
    }
}

/// The order's flow, as `(group, message, group, message)`: the delivery of the second is a
/// child of the delivery of the first (whose subscriber published or dispatched it).
const CAUSES: &[(&str, &str, &str, &str)] = &[
    (
        "orders.fulfilment",
        "orders.order_placed",
        "command:inventory.reserve_stock",
        "inventory.reserve_stock",
    ),
    (
        "command:inventory.reserve_stock",
        "inventory.reserve_stock",
        "orders.fulfilment",
        "inventory.stock_reserved",
    ),
    (
        "orders.fulfilment",
        "inventory.stock_reserved",
        "command:payments.charge",
        "payments.charge",
    ),
    (
        "command:payments.charge",
        "payments.charge",
        "orders.fulfilment",
        "payments.charged",
    ),
    (
        "orders.fulfilment",
        "payments.charged",
        "command:shipping.create_shipment",
        "shipping.create_shipment",
    ),
    (
        "command:shipping.create_shipment",
        "shipping.create_shipment",
        "orders.fulfilment",
        "shipping.shipment_created",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_from_the_request_to_every_subscriber() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    shop::telemetry::install_tracing(provider).unwrap();
    let db = TestDb::new(Backend::Sqlite, "shop_traces").await;
    let store = SqlStore::connect(&db.url).await.unwrap();
    shop::install(&store).await.unwrap();
    let app = shop::app(&store, &World::default()).await.unwrap();
    let relay = app.start();
    shop::seed(&app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        axum::serve(listener, shop::http::router(app.clone(), store.clone())).into_future(),
    );

    let (status, body) = request(
        addr,
        "POST",
        "/orders",
        r#"{"order_id": "o-1", "customer": "ann", "lines": [{"sku": "tea", "quantity": 2}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(20), "ann notified", || async {
        let sent = app
            .query(SentTo {
                customer: "ann".into(),
            })
            .await
            .unwrap();
        (!sent.is_empty()).then_some(())
    })
    .await;
    // The spans of the last deliveries end once their transactions committed.
    let spans = eventually(Duration::from_secs(20), "every delivery's span", || async {
        let spans = exporter.get_finished_spans().unwrap();
        let done = ["orders.fulfilment", "orders.summaries", "notifications"]
            .iter()
            .all(|group| !deliveries(&spans, group, "orders.order_confirmed").is_empty());
        done.then_some(spans)
    })
    .await;

    // The request is the root; the command's dispatch its child.
    let request = spans
        .iter()
        .find(|s| {
            s.name == "POST /orders"
                && attribute(s, "url.path").as_deref() == Some("/orders")
                && attribute(s, "http.request.method").as_deref() == Some("POST")
        })
        .expect("the request's span");
    assert_eq!(request.parent_span_id, SpanId::INVALID);
    assert_eq!(
        attribute(request, "http.response.status_code").as_deref(),
        Some("201")
    );
    let trace = request.span_context.trace_id();
    let place = spans
        .iter()
        .find(|s| {
            s.name == "dispatch"
                && attribute(s, "message_name").as_deref() == Some("orders.place_order")
        })
        .expect("the command's span");
    assert_eq!(place.span_context.trace_id(), trace);
    assert_eq!(place.parent_span_id, request.span_context.span_id());

    // The event the command published reaches its groups as children of the command's span.
    children_of(&spans, &[place], "orders.fulfilment", "orders.order_placed");
    children_of(&spans, &[place], "orders.summaries", "orders.order_placed");
    // Then each step of the saga is a child of the delivery that caused it.
    for (group, message, next_group, next_message) in CAUSES {
        let parents = deliveries(&spans, group, message);
        assert!(!parents.is_empty(), "no delivery of {message} to {group}");
        children_of(&spans, &parents, next_group, next_message);
    }
    // The saga's last step confirms the order; every group gets the confirmation in the trace.
    for group in ["orders.fulfilment", "orders.summaries", "notifications"] {
        for span in deliveries(&spans, group, "orders.order_confirmed") {
            assert_eq!(span.span_context.trace_id(), trace, "{group}");
            let parent = spans
                .iter()
                .find(|s| s.span_context.span_id() == span.parent_span_id)
                .expect("the confirmation's parent was exported");
            assert_eq!(parent.span_context.trace_id(), trace);
        }
    }
    // Nothing of the order went to another trace.
    let correlation = attribute(place, "correlation_id").expect("a correlation id");
    let elsewhere: Vec<&SpanData> = spans
        .iter()
        .filter(|s| attribute(s, "correlation_id").as_deref() == Some(correlation.as_str()))
        .filter(|s| s.span_context.trace_id() != trace)
        .collect();
    assert!(elsewhere.is_empty(), "{elsewhere:#?}");
    server.abort();
    relay.shutdown().await;
}
