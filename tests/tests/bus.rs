//! The bus: typed results, inline and background subscribers, units of work, ids.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use inseam::prelude::*;
use inseam::{MessageMeta, Stats};
use uuid::Uuid;

#[derive(Debug, Command)]
#[command(output = u64, error = OrderError, name = "orders.place_order")]
struct PlaceOrder {
    sku: String,
    quantity: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum OrderError {
    #[error("quantity must be positive")]
    ZeroQuantity,
    #[error("sku {0} is blocked")]
    Blocked(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 1, key = sku)]
struct OrderPlaced {
    order: u64,
    sku: String,
    quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.stock_reserved")]
struct StockReserved {
    order: u64,
}

#[derive(Debug, Query)]
#[query(output = Vec<u64>)]
struct ListOrders;

/// What the handlers record, shared through `State`.
#[derive(Debug, Clone, Default)]
struct Log {
    orders: Arc<Mutex<Vec<u64>>>,
    inline: Arc<Mutex<Vec<(u64, Metadata)>>>,
    background: Arc<Mutex<Vec<(u64, Metadata)>>>,
    reserved: Arc<Mutex<Vec<(u64, Metadata)>>>,
    next: Arc<AtomicU32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[command_handler]
async fn place_order(
    cmd: PlaceOrder,
    ctx: &mut CommandContext<'_>,
    State(log): State<Log>,
) -> Result<u64, OrderError> {
    if cmd.quantity == 0 {
        return Err(OrderError::ZeroQuantity);
    }
    let order = u64::from(log.next.fetch_add(1, Ordering::SeqCst)) + 1;
    ctx.publish(OrderPlaced {
        order,
        sku: cmd.sku.clone(),
        quantity: cmd.quantity,
    });
    if cmd.sku == "late-failure" {
        // The event above was published, but the command fails: nobody may see it.
        return Err(OrderError::Blocked(cmd.sku));
    }
    lock(&log.orders).push(order);
    Ok(order)
}

#[query_handler]
async fn list_orders(
    _: ListOrders,
    State(log): State<Log>,
) -> Result<Vec<u64>, std::convert::Infallible> {
    Ok(lock(&log.orders).clone())
}

#[derive(Debug, thiserror::Error)]
#[error("inline check refused sku {0}")]
struct Refused(String);

#[event_handler(inline)]
async fn check_inline(
    ev: &Envelope<OrderPlaced>,
    ctx: &mut EventContext<'_>,
    State(log): State<Log>,
) -> Result<(), Refused> {
    if ev.sku == "refused-inline" {
        return Err(Refused(ev.sku.clone()));
    }
    lock(&log.inline).push((ev.order, ctx.metadata()));
    Ok(())
}

#[event_handler(group = "inventory")]
async fn reserve(ev: Envelope<OrderPlaced>, ctx: &mut EventContext<'_>, State(log): State<Log>) {
    lock(&log.background).push((ev.order, ev.metadata));
    ctx.publish(StockReserved { order: ev.order });
}

#[event_handler(group = "shipping")]
async fn on_reserved(ev: &StockReserved, meta: Metadata, State(log): State<Log>) {
    lock(&log.reserved).push((ev.order, meta));
}

async fn app(log: &Log) -> App {
    App::builder()
        .handler::<place_order>()
        .handler::<list_orders>()
        .handler::<check_inline>()
        .handler::<reserve>()
        .handler::<on_reserved>()
        .state(log.clone())
        .build()
        .await
        .expect("wiring is valid")
}

#[tokio::test]
async fn send_returns_the_handlers_typed_output_and_error() {
    let log = Log::default();
    let app = app(&log).await;

    let order = app
        .send(PlaceOrder {
            sku: "a".into(),
            quantity: 2,
        })
        .await
        .expect("placed");
    assert_eq!(order, 1);

    // The declared error arrives typed: a plain match, no downcast.
    match app
        .send(PlaceOrder {
            sku: "a".into(),
            quantity: 0,
        })
        .await
    {
        Err(DispatchError::Handler(OrderError::ZeroQuantity)) => {}
        other => panic!("expected the handler's ZeroQuantity, got {other:?}"),
    }
    assert_eq!(app.query(ListOrders).await.expect("listed"), vec![1]);
}

#[tokio::test]
async fn inline_subscribers_run_before_send_returns_and_background_ones_after() {
    let log = Log::default();
    let app = app(&log).await;

    let order = app
        .send(PlaceOrder {
            sku: "b".into(),
            quantity: 1,
        })
        .await
        .expect("placed");
    assert_eq!(
        lock(&log.inline)
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![order]
    );

    app.wait_idle().await;
    assert_eq!(
        lock(&log.background)
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![order]
    );
    assert_eq!(
        lock(&log.reserved)
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![order]
    );
    assert_eq!(
        app.stats(),
        Stats {
            delivered: 2,
            ..Stats::default()
        }
    );
}

#[tokio::test]
async fn a_failing_inline_subscriber_fails_the_command_and_nothing_is_delivered() {
    let log = Log::default();
    let app = app(&log).await;

    let error = app
        .send(PlaceOrder {
            sku: "refused-inline".into(),
            quantity: 1,
        })
        .await
        .expect_err("refused");
    match error.failure() {
        Some(DispatchFailure::Subscriber {
            handler,
            event,
            source,
            ..
        }) => {
            assert_eq!(*handler, "bus::check_inline");
            assert_eq!(*event, "orders.order_placed");
            assert_eq!(
                source.to_string(),
                "inline check refused sku refused-inline"
            );
        }
        other => panic!("expected a subscriber failure, got {other:?}"),
    }
    assert!(error.to_string().starts_with(
        "inline subscriber `bus::check_inline` failed on event `orders.order_placed`"
    ));

    app.wait_idle().await;
    assert!(
        lock(&log.background).is_empty(),
        "a failed command's events reached a group"
    );
    assert_eq!(app.stats(), Stats::default());
}

#[tokio::test]
async fn events_of_a_failed_command_are_discarded() {
    let log = Log::default();
    let app = app(&log).await;

    let result = app
        .send(PlaceOrder {
            sku: "late-failure".into(),
            quantity: 1,
        })
        .await;
    assert!(
        matches!(result, Err(DispatchError::Handler(OrderError::Blocked(ref s))) if s == "late-failure")
    );
    app.wait_idle().await;
    assert!(lock(&log.inline).is_empty());
    assert!(lock(&log.background).is_empty());
}

#[tokio::test]
async fn correlation_and_causation_follow_the_flow() {
    let log = Log::default();
    let app = app(&log).await;
    let flow = Uuid::now_v7();
    let command_id = Uuid::now_v7();

    let meta = MessageMeta::new()
        .message_id(command_id)
        .correlation_id(flow);
    app.send_with(
        PlaceOrder {
            sku: "c".into(),
            quantity: 1,
        },
        meta,
    )
    .await
    .expect("placed");
    app.wait_idle().await;

    let (_, placed) = lock(&log.background)[0];
    assert_eq!(placed.correlation_id, flow);
    assert_eq!(placed.causation_id, Some(command_id));

    // The inline subscriber sees the event's own metadata.
    let (_, inline) = lock(&log.inline)[0];
    assert_eq!(inline, placed);

    // StockReserved was published by the inventory subscriber: caused by OrderPlaced.
    let (_, reserved) = lock(&log.reserved)[0];
    assert_eq!(reserved.correlation_id, flow);
    assert_eq!(reserved.causation_id, Some(placed.message_id));
    assert_ne!(reserved.message_id, placed.message_id);
}

#[tokio::test]
async fn without_a_given_correlation_the_command_starts_its_own_flow() {
    let log = Log::default();
    let app = app(&log).await;
    app.send(PlaceOrder {
        sku: "d".into(),
        quantity: 1,
    })
    .await
    .expect("placed");
    app.wait_idle().await;
    let (_, placed) = lock(&log.background)[0];
    let command_id = placed.causation_id.expect("caused by the command");
    assert_eq!(placed.correlation_id, command_id);
    assert_eq!(placed.message_id.get_version_num(), 7, "ids are UUID v7");
}

#[tokio::test]
async fn publish_outside_a_command_reaches_inline_and_background_subscribers() {
    let log = Log::default();
    let app = app(&log).await;
    app.publish(OrderPlaced {
        order: 42,
        sku: "e".into(),
        quantity: 1,
    })
    .await
    .expect("published");
    assert_eq!(lock(&log.inline).len(), 1);
    app.wait_idle().await;
    assert_eq!(
        lock(&log.background)
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![42]
    );
}

#[tokio::test]
async fn a_command_without_handler_is_a_typed_error() {
    let app = App::builder().build().await.expect("empty app");
    match app
        .send(PlaceOrder {
            sku: "x".into(),
            quantity: 1,
        })
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::NoHandler { kind, message })) => {
            assert_eq!(kind, inseam::MessageKind::Command);
            assert_eq!(message, "bus::PlaceOrder");
        }
        other => panic!("expected NoHandler, got {other:?}"),
    }
}

// Background subscribers that fail or panic never take the app down.

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "tests.flaky")]
struct Flaky {
    mode: String,
}

#[derive(Debug, thiserror::Error)]
#[error("flaky subscriber failed on purpose")]
struct FlakyError;

#[event_handler(group = "flaky")]
async fn flaky(ev: &Flaky, State(seen): State<Arc<AtomicU32>>) -> Result<(), FlakyError> {
    seen.fetch_add(1, Ordering::SeqCst);
    match ev.mode.as_str() {
        "fail" => Err(FlakyError),
        "panic" => panic!("flaky subscriber panicked on purpose"),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn failing_and_panicking_background_subscribers_are_counted_and_the_app_keeps_working() {
    let seen = Arc::new(AtomicU32::new(0));
    let app = App::builder()
        .handler::<flaky>()
        .state(seen.clone())
        .build()
        .await
        .expect("wiring is valid");

    for mode in ["fail", "panic", "ok", "panic", "ok"] {
        app.publish(Flaky { mode: mode.into() })
            .await
            .expect("publishing never fails for a background subscriber");
    }
    app.wait_idle().await;

    assert_eq!(seen.load(Ordering::SeqCst), 5);
    assert_eq!(
        app.stats(),
        Stats {
            delivered: 2,
            failed: 1,
            panicked: 2
        }
    );
}

// An inline cycle is stopped with a typed error instead of looping forever.

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "tests.ping")]
struct Ping(u64);

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "tests.pong")]
struct Pong(u64);

#[event_handler(inline)]
async fn ping_to_pong(ev: &Ping, ctx: &mut EventContext<'_>) {
    ctx.publish(Pong(ev.0 + 1));
}

#[event_handler(inline)]
async fn pong_to_ping(ev: &Pong, ctx: &mut EventContext<'_>) {
    ctx.publish(Ping(ev.0 + 1));
}

#[tokio::test]
async fn inline_subscribers_publishing_in_a_cycle_are_stopped() {
    let app = App::builder()
        .handler::<ping_to_pong>()
        .handler::<pong_to_ping>()
        .build()
        .await
        .expect("wiring is valid");
    match app
        .publish(Ping(0))
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::TooManyEvents { limit, event })) => {
            assert_eq!(limit, inseam::error::MAX_EVENTS_PER_UNIT);
            assert!(event == "tests.ping" || event == "tests.pong", "{event}");
        }
        other => panic!("expected TooManyEvents, got {other:?}"),
    }
}

// Apps find handlers by a per-type slot index (derived, non-generic messages) or by type id
// (generic messages, hand-written impls); each app sees only its own handlers.

#[derive(Debug, Command)]
#[command(output = String)]
struct Echo(String);

#[command_handler]
async fn echo(cmd: Echo) -> Result<String, std::convert::Infallible> {
    Ok(cmd.0)
}

#[derive(Debug, Command)]
#[command(output = String)]
struct Wrapped<T: std::fmt::Debug + Send + 'static>(T);

#[command_handler]
async fn wrapped_number(cmd: Wrapped<u32>) -> Result<String, std::convert::Infallible> {
    Ok(format!("number {}", cmd.0))
}

#[command_handler]
async fn wrapped_text(cmd: Wrapped<&'static str>) -> Result<String, std::convert::Infallible> {
    Ok(format!("text {}", cmd.0))
}

#[derive(Debug)]
struct Shout(String);

impl inseam::Query for Shout {
    type Output = String;
    type Error = std::convert::Infallible;
    const NAME: &'static str = "tests.shout";
}

#[query_handler]
async fn shout(q: Shout) -> Result<String, std::convert::Infallible> {
    Ok(q.0.to_uppercase())
}

#[tokio::test]
async fn each_app_finds_its_own_handlers_by_slot_index_or_type() {
    let full = App::builder()
        .handler::<echo>()
        .handler::<wrapped_number>()
        .handler::<wrapped_text>()
        .handler::<shout>()
        .build()
        .await
        .expect("full app");
    let partial = App::builder()
        .handler::<wrapped_text>()
        .build()
        .await
        .expect("partial app");

    assert_eq!(full.send(Echo("hi".into())).await.expect("echo"), "hi");
    assert_eq!(full.send(Wrapped(7_u32)).await.expect("number"), "number 7");
    assert_eq!(
        full.send(Wrapped("seven")).await.expect("text"),
        "text seven"
    );
    assert_eq!(full.query(Shout("hey".into())).await.expect("shout"), "HEY");

    assert_eq!(
        partial.send(Wrapped("eight")).await.expect("text"),
        "text eight"
    );
    for outcome in [
        partial.send(Echo("hi".into())).await.map(drop),
        partial.send(Wrapped(8_u32)).await.map(drop),
    ] {
        assert!(
            matches!(
                outcome.as_ref().map_err(DispatchError::failure),
                Err(Some(DispatchFailure::NoHandler { .. }))
            ),
            "{outcome:?}"
        );
    }
    assert!(matches!(
        partial
            .query(Shout("hey".into()))
            .await
            .map_err(DispatchError::into_failure),
        Err(Ok(DispatchFailure::NoHandler { .. }))
    ));
}
