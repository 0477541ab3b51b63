//! Middleware: tower layers around dispatch, for all messages or one kind or one type.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use inseam::prelude::*;
use inseam::{BoxError, DispatchRequest, DispatchResponse, MessageKind, MessageMeta, TraceLayer};
use tower::{Layer, Service};

#[derive(Debug, Command)]
#[command(output = String, error = GreetError, name = "greetings.greet")]
struct Greet {
    name: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum GreetError {
    #[error("name must not be empty")]
    EmptyName,
    #[error("{0} may not be greeted")]
    Forbidden(String),
}

#[derive(Debug, Command)]
#[command(output = ())]
struct Nap {
    millis: u64,
}

#[derive(Debug, Query)]
#[query(output = u32)]
struct Count;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "greetings.greeted")]
struct Greeted {
    name: String,
}

#[command_handler]
async fn greet(cmd: Greet, ctx: &mut CommandContext<'_>) -> Result<String, GreetError> {
    if cmd.name.is_empty() {
        return Err(GreetError::EmptyName);
    }
    ctx.publish(Greeted {
        name: cmd.name.clone(),
    });
    Ok(format!("hello, {}", cmd.name))
}

#[command_handler]
async fn nap(cmd: Nap) -> Result<(), std::convert::Infallible> {
    tokio::time::sleep(Duration::from_millis(cmd.millis)).await;
    Ok(())
}

#[query_handler]
async fn count(_: Count) -> Result<u32, std::convert::Infallible> {
    Ok(7)
}

#[event_handler(group = "audit")]
async fn audit(_: &Greeted) {}

/// A user-written layer: records what it sees, and refuses commands from guests.
#[derive(Clone, Default)]
struct Guard {
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S> Layer<S> for Guard {
    type Service = GuardService<S>;
    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService {
            inner,
            seen: self.seen.clone(),
        }
    }
}

#[derive(Clone)]
struct GuardService<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("guests may not send {0}")]
struct Unauthorized(&'static str);

impl<S> Service<DispatchRequest> for GuardService<S>
where
    S: Service<DispatchRequest, Response = DispatchResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = DispatchResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: DispatchRequest) -> Self::Future {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!(
                "{} {} by {}",
                request.kind(),
                request.name(),
                request.handler()
            ));
        if request.kind() == MessageKind::Command && request.headers().get("role") == Some("guest")
        {
            let name = request.name();
            return Box::pin(async move { Err(Box::new(Unauthorized(name)) as BoxError) });
        }
        // A validation layer may answer with the command's own error type: it reaches the
        // caller typed, as if the handler had returned it.
        if let Some(greet) = request.message::<Greet>()
            && greet.name == "mallory"
        {
            let error = GreetError::Forbidden(greet.name.clone());
            return Box::pin(async move { Err(Box::new(error) as BoxError) });
        }
        let future = self.inner.call(request);
        Box::pin(future)
    }
}

fn lines(seen: &Mutex<Vec<String>>) -> Vec<String> {
    seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test]
async fn a_user_layer_sees_every_dispatch_and_can_refuse_one() {
    let guard = Guard::default();
    let app = App::builder()
        .handler::<greet>()
        .handler::<count>()
        .handler::<audit>()
        .layer(guard.clone())
        .build()
        .await
        .expect("wiring is valid");

    assert_eq!(
        app.send(Greet { name: "ada".into() })
            .await
            .expect("greeted"),
        "hello, ada"
    );
    assert_eq!(app.query(Count).await.expect("counted"), 7);
    app.wait_idle().await;
    let mut seen = lines(&guard.seen);
    seen.sort();
    assert_eq!(
        seen,
        [
            "command greetings.greet by middleware::greet",
            "event greetings.greeted by middleware::audit",
            "query Count by middleware::count",
        ]
    );

    let guest = MessageMeta::new()
        .header("role", "guest")
        .expect("valid header");
    match app
        .send_with(Greet { name: "ada".into() }, guest)
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::Middleware {
            kind,
            message,
            source,
        })) => {
            assert_eq!(kind, MessageKind::Command);
            assert_eq!(message, "greetings.greet");
            assert_eq!(source.to_string(), "guests may not send greetings.greet");
        }
        other => panic!("expected the guard's refusal, got {other:?}"),
    }

    match app
        .send(Greet {
            name: "mallory".into(),
        })
        .await
    {
        Err(DispatchError::Handler(GreetError::Forbidden(name))) => assert_eq!(name, "mallory"),
        other => panic!("expected the typed Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn the_handlers_typed_error_passes_through_layers() {
    let app = App::builder()
        .handler::<greet>()
        .layer(TraceLayer::new())
        .layer(Guard::default())
        .build()
        .await
        .expect("wiring is valid");
    match app
        .send(Greet {
            name: String::new(),
        })
        .await
    {
        Err(DispatchError::Handler(GreetError::EmptyName)) => {}
        other => panic!("expected the typed EmptyName, got {other:?}"),
    }
}

#[tokio::test]
async fn towers_timeout_bounds_a_slow_handler() {
    let app = App::builder()
        .handler::<nap>()
        .layer_for_kind(
            MessageKind::Command,
            tower::timeout::TimeoutLayer::new(Duration::from_millis(50)),
        )
        .build()
        .await
        .expect("wiring is valid");

    app.send(Nap { millis: 1 }).await.expect("a short nap fits");
    match app
        .send(Nap { millis: 2_000 })
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::Middleware { source, .. })) => {
            assert!(
                source.is::<tower::timeout::error::Elapsed>(),
                "expected Elapsed, got {source}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_layer_for_one_message_type_wraps_only_that_type() {
    let guard = Guard::default();
    let app = App::builder()
        .handler::<greet>()
        .handler::<count>()
        .layer_for::<Count, _, _>(guard.clone())
        .build()
        .await
        .expect("wiring is valid");
    app.send(Greet { name: "ada".into() })
        .await
        .expect("greeted");
    app.query(Count).await.expect("counted");
    assert_eq!(
        lines(&guard.seen),
        vec!["query Count by middleware::count".to_owned()]
    );
}

#[tokio::test]
async fn layers_run_outermost_first() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let app = App::builder()
        .handler::<count>()
        .layer(Tag("outer", order.clone()))
        .layer(Tag("inner", order.clone()))
        .build()
        .await
        .expect("wiring is valid");
    app.query(Count).await.expect("counted");
    assert_eq!(
        *order.lock().unwrap_or_else(|p| p.into_inner()),
        vec!["outer", "inner"]
    );
}

#[derive(Clone)]
struct Tag(&'static str, Arc<Mutex<Vec<&'static str>>>);

impl<S> Layer<S> for Tag {
    type Service = TagService<S>;
    fn layer(&self, inner: S) -> TagService<S> {
        TagService(self.0, self.1.clone(), inner)
    }
}

#[derive(Clone)]
struct TagService<S>(&'static str, Arc<Mutex<Vec<&'static str>>>, S);

impl<S: Service<DispatchRequest>> Service<DispatchRequest> for TagService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.2.poll_ready(cx)
    }
    fn call(&mut self, request: DispatchRequest) -> S::Future {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.0);
        self.2.call(request)
    }
}

/// Collects formatted tracing output.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_trace_layer_opens_a_span_with_the_message_and_its_ids() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = App::builder()
        .handler::<greet>()
        .layer(TraceLayer::new())
        .build()
        .await
        .expect("valid");
    let id = uuid::Uuid::now_v7();
    let flow = uuid::Uuid::now_v7();
    app.send_with(
        Greet { name: "ada".into() },
        MessageMeta::new().message_id(id).correlation_id(flow),
    )
    .await
    .expect("greeted");

    let output = String::from_utf8(capture.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .expect("utf-8");
    let line = output
        .lines()
        .find(|l| l.contains("handled"))
        .unwrap_or_else(|| panic!("no span output in {output}"));
    assert!(line.contains("dispatch{kind=\"command\" message_name=\"greetings.greet\" handler=\"middleware::greet\""), "{line}");
    assert!(line.contains(&format!("message_id={id}")), "{line}");
    assert!(line.contains(&format!("correlation_id={flow}")), "{line}");
}

#[tokio::test]
async fn background_deliveries_go_through_event_layers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = App::builder()
        .handler::<greet>()
        .handler::<audit>()
        .layer_for_kind(MessageKind::Event, {
            let calls = calls.clone();
            tower::util::MapRequestLayer::new(move |request: DispatchRequest| {
                calls.fetch_add(1, Ordering::SeqCst);
                request
            })
        })
        .build()
        .await
        .expect("valid");
    app.send(Greet { name: "ada".into() })
        .await
        .expect("greeted");
    app.wait_idle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one delivery, to the audit group"
    );
}

#[derive(Debug, thiserror::Error)]
#[error("bob is not welcome")]
struct NotWelcome;

#[event_handler(inline)]
async fn refuse_bob(ev: &Greeted) -> Result<(), NotWelcome> {
    if ev.name == "bob" {
        Err(NotWelcome)
    } else {
        Ok(())
    }
}

#[tokio::test]
async fn an_inline_subscriber_failure_keeps_its_variant_through_layers() {
    let app = App::builder()
        .handler::<greet>()
        .handler::<refuse_bob>()
        .layer(TraceLayer::new())
        .layer(Guard::default())
        .build()
        .await
        .expect("wiring is valid");
    assert_eq!(
        app.send(Greet { name: "ada".into() })
            .await
            .expect("greeted"),
        "hello, ada"
    );
    match app
        .send(Greet { name: "bob".into() })
        .await
        .map_err(DispatchError::into_failure)
    {
        Err(Ok(DispatchFailure::Subscriber {
            handler,
            event,
            source,
            ..
        })) => {
            assert_eq!(handler, "middleware::refuse_bob");
            assert_eq!(event, "greetings.greeted");
            assert_eq!(source.to_string(), "bob is not welcome");
        }
        other => panic!("expected the subscriber failure, got {other:?}"),
    }
}
