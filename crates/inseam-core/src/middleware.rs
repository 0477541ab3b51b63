//! Middleware: any tower [`Layer`] can wrap dispatch.
//!
//! Layers see a type-erased [`DispatchRequest`] (the message, its kind, name and metadata) and
//! a [`DispatchResponse`], so one layer serves every message type: timeouts, tracing,
//! authorization, validation and rate limits are ordinary tower layers. A handler's own error
//! travels through the layers as the service error, so a layer can observe it; `send` hands it
//! back to the caller typed.
//!
//! The framework's own failures travel as the [`DispatchFailure`](crate::DispatchFailure)
//! itself, and a conflict as the [`Conflict`](crate::Conflict), so that a layer such as
//! [`RetryOnConflict`] recognises it whatever the message. Any other error a layer returns
//! reaches the caller as `DispatchFailure::Middleware`, with that error as its source.
//!
//! Without layers, dispatch calls the handler directly, with no boxing.

use std::any::{Any, TypeId};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::app::App;
use crate::context::MessageMeta;
use crate::envelope::{Envelope, Headers, Metadata};
use crate::error::BoxError;
use crate::message::{Event, MessageKind};

/// A dispatch as middleware sees it.
pub struct DispatchRequest {
    pub(crate) app: App,
    pub(crate) kind: MessageKind,
    pub(crate) name: &'static str,
    pub(crate) type_name: &'static str,
    pub(crate) handler: &'static str,
    pub(crate) group: Option<&'static str>,
    /// The command or query, or for an event an `Arc<Envelope<E>>`.
    pub(crate) message: Box<dyn Any + Send>,
    pub(crate) meta: MessageMeta,
}

impl DispatchRequest {
    /// Command, query or event.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The message's stable name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The message's Rust type.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The handler or subscriber that will run.
    pub fn handler(&self) -> &'static str {
        self.handler
    }

    /// The subscriber group, for event deliveries.
    pub fn group(&self) -> Option<&'static str> {
        self.group
    }

    /// The message's ids (generated now if nobody needed them yet).
    pub fn metadata(&self) -> Metadata {
        self.meta.metadata(&self.app)
    }

    /// The message's headers.
    pub fn headers(&self) -> &Headers {
        &self.meta.headers
    }

    /// The command or query, if it is a `T`.
    pub fn message<T: 'static>(&self) -> Option<&T> {
        self.message.downcast_ref()
    }

    /// The event being delivered, if it is an `E`.
    pub fn event<E: Event>(&self) -> Option<&Envelope<E>> {
        self.message
            .downcast_ref::<Arc<Envelope<E>>>()
            .map(|e| &**e)
    }

    /// The app.
    pub fn app(&self) -> &App {
        &self.app
    }
}

impl fmt::Debug for DispatchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatchRequest")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("handler", &self.handler)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// The result of a dispatch as middleware sees it (opaque: the handler's typed output).
pub struct DispatchResponse(pub(crate) Box<dyn Any + Send>);

impl fmt::Debug for DispatchResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DispatchResponse")
    }
}

/// The service type every layer wraps.
pub type DispatchService = BoxCloneSyncService<DispatchRequest, DispatchResponse, BoxError>;

/// Where a layer applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerScope {
    All,
    Kind(MessageKind),
    Message(TypeId),
}

impl LayerScope {
    fn applies(self, kind: MessageKind, message: TypeId) -> bool {
        match self {
            LayerScope::All => true,
            LayerScope::Kind(k) => k == kind,
            LayerScope::Message(t) => t == message,
        }
    }
}

pub(crate) trait ErasedLayer: Send + Sync {
    fn apply(&self, service: DispatchService) -> DispatchService;
}

struct TowerLayer<L>(L);

impl<L, S> ErasedLayer for TowerLayer<L>
where
    L: Layer<DispatchService, Service = S> + Send + Sync,
    S: Service<DispatchRequest, Response = DispatchResponse> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn apply(&self, service: DispatchService) -> DispatchService {
        BoxCloneSyncService::new(MapErrInto(self.0.layer(service)))
    }
}

/// Converts a layer's error into a `BoxError` without boxing the future.
#[derive(Clone)]
struct MapErrInto<S>(S);

impl<S> Service<DispatchRequest> for MapErrInto<S>
where
    S: Service<DispatchRequest, Response = DispatchResponse>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = DispatchResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: DispatchRequest) -> Self::Future {
        let future = self.0.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

/// The layers registered on a builder, outermost first.
#[derive(Default)]
pub(crate) struct Layers(Vec<(LayerScope, Box<dyn ErasedLayer>)>);

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(scope, _)| scope))
            .finish()
    }
}

impl Layers {
    pub(crate) fn push<L, S>(&mut self, scope: LayerScope, layer: L)
    where
        L: Layer<DispatchService, Service = S> + Send + Sync + 'static,
        S: Service<DispatchRequest, Response = DispatchResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.0.push((scope, Box::new(TowerLayer(layer))));
    }

    fn wrap_with(
        &self,
        kind: MessageKind,
        message: TypeId,
        inner: impl FnOnce() -> DispatchService,
    ) -> Option<DispatchService> {
        let mut applying = self
            .0
            .iter()
            .filter(|(scope, _)| scope.applies(kind, message))
            .peekable();
        applying.peek()?;
        let layers: Vec<_> = applying.collect();
        // The first layer added is the outermost, as with tower's ServiceBuilder.
        Some(
            layers
                .iter()
                .rev()
                .fold(inner(), |service, (_, layer)| layer.apply(service)),
        )
    }

    /// The layered service for a command or query, or `None` when no layer applies.
    pub(crate) fn wrap<M: 'static>(
        &self,
        kind: MessageKind,
        inner: fn() -> DispatchService,
    ) -> Option<DispatchService> {
        self.wrap_with(kind, TypeId::of::<M>(), inner)
    }

    /// The layered service for a background event subscriber, or `None`.
    pub(crate) fn wrap_event<E: 'static>(
        &self,
        inner: impl FnOnce() -> DispatchService,
    ) -> Option<DispatchService> {
        self.wrap_with(MessageKind::Event, TypeId::of::<E>(), inner)
    }
}

/// A layer that opens a `tracing` span per dispatch (target `inseam::dispatch`) with the
/// message's kind, name, handler, group, message id and correlation id, and records the outcome.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer {
    _private: (),
}

impl TraceLayer {
    /// A tracing layer.
    pub fn new() -> Self {
        TraceLayer::default()
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService { inner }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
}

impl<S> Service<DispatchRequest> for TraceService<S>
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
        let metadata = request.metadata();
        let span = tracing::info_span!(
            target: "inseam::dispatch",
            "dispatch",
            kind = request.kind.as_str(),
            message_name = request.name,
            handler = request.handler,
            group = request.group,
            message_id = %metadata.message_id,
            correlation_id = %metadata.correlation_id,
        );
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let result = future.await;
                let elapsed_us = started.elapsed().as_micros() as u64;
                match &result {
                    Ok(_) => tracing::debug!(target: "inseam::dispatch", elapsed_us, "handled"),
                    Err(error) => tracing::warn!(target: "inseam::dispatch", elapsed_us, error = %error, "failed"),
                }
                result
            }
            .instrument(span),
        )
    }
}

/// A layer that counts dispatches through the [`metrics`] facade, per message kind and name:
/// `inseam_dispatches_total` (every dispatch), `inseam_dispatch_failures_total` (those that
/// failed: the handler's error, a layer's, a panic) and `inseam_dispatch_duration_seconds`
/// (a histogram). Labels: `kind` (`command`, `query`, `event`) and `message` (the stable
/// name). The app's recorder (Prometheus, OpenTelemetry, ...) receives them; without one
/// they cost nothing worth measuring.
///
/// It is a layer, so a dispatch without layers pays nothing for it:
///
/// ```ignore
/// App::builder().layer(MetricsLayer::new()).layer(TraceLayer::new())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer {
    _private: (),
}

impl MetricsLayer {
    /// A metrics layer.
    pub fn new() -> Self {
        MetricsLayer::default()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService { inner }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
}

impl<S> Service<DispatchRequest> for MetricsService<S>
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
        let kind = request.kind.as_str();
        let message = request.name;
        metrics::counter!("inseam_dispatches_total", "kind" => kind, "message" => message)
            .increment(1);
        let future = self.inner.call(request);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = future.await;
            metrics::histogram!("inseam_dispatch_duration_seconds", "kind" => kind, "message" => message)
                .record(started.elapsed());
            if result.is_err() {
                metrics::counter!("inseam_dispatch_failures_total", "kind" => kind, "message" => message)
                    .increment(1);
            }
            result
        })
    }
}

type CloneMessage = fn(&(dyn Any + Send)) -> Option<Box<dyn Any + Send>>;

/// A layer that runs a command again, on fresh state, when it failed with a concurrency
/// [`Conflict`](crate::Conflict) (another writer appended to a stream it appended to). Each
/// attempt is a whole new unit of work: the handler loads its aggregates again and decides
/// again. After `max_attempts` the conflict reaches the caller.
///
/// Only the commands named with [`command`](Self::command) are retried (they must be `Clone`,
/// so that each attempt gets its own copy); everything else passes through.
///
/// ```ignore
/// App::builder().layer(RetryOnConflict::new(5).command::<AddLine>().command::<Checkout>())
/// ```
#[derive(Clone)]
pub struct RetryOnConflict {
    max_attempts: u32,
    commands: Arc<std::collections::HashMap<TypeId, CloneMessage>>,
}

impl fmt::Debug for RetryOnConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryOnConflict")
            .field("max_attempts", &self.max_attempts)
            .field("commands", &self.commands.len())
            .finish()
    }
}

impl RetryOnConflict {
    /// Retries up to `max_attempts` attempts in all (at least 1).
    pub fn new(max_attempts: u32) -> Self {
        RetryOnConflict {
            max_attempts: max_attempts.max(1),
            commands: Arc::default(),
        }
    }

    /// Retries command `C` on conflicts.
    pub fn command<C: crate::Command + Clone>(mut self) -> Self {
        fn clone_message<C: Clone + Send + 'static>(
            message: &(dyn Any + Send),
        ) -> Option<Box<dyn Any + Send>> {
            let message: &dyn Any = message;
            message
                .downcast_ref::<C>()
                .map(|m| Box::new(m.clone()) as Box<dyn Any + Send>)
        }
        Arc::make_mut(&mut self.commands).insert(TypeId::of::<C>(), clone_message::<C>);
        self
    }
}

impl<S> Layer<S> for RetryOnConflict {
    type Service = RetryOnConflictService<S>;

    fn layer(&self, inner: S) -> RetryOnConflictService<S> {
        RetryOnConflictService {
            inner,
            policy: self.clone(),
        }
    }
}

/// The service of [`RetryOnConflict`].
#[derive(Debug, Clone)]
pub struct RetryOnConflictService<S> {
    inner: S,
    policy: RetryOnConflict,
}

impl<S> Service<DispatchRequest> for RetryOnConflictService<S>
where
    S: Service<DispatchRequest, Response = DispatchResponse, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = DispatchResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: DispatchRequest) -> Self::Future {
        let clone_message = self
            .policy
            .commands
            .get(&(*request.message).type_id())
            .copied();
        let Some(clone_message) = clone_message else {
            return Box::pin(self.inner.call(request));
        };
        // Every attempt drives its own clone to readiness.
        let service = self.inner.clone();
        let max_attempts = self.policy.max_attempts;
        Box::pin(async move {
            use tower::ServiceExt as _;
            // Every attempt carries the same ids.
            let _ = request.metadata();
            let mut request = request;
            let mut attempt = 1;
            loop {
                let next = (attempt < max_attempts)
                    .then(|| clone_message(&*request.message))
                    .flatten()
                    .map(|message| DispatchRequest {
                        app: request.app.clone(),
                        kind: request.kind,
                        name: request.name,
                        type_name: request.type_name,
                        handler: request.handler,
                        group: request.group,
                        message,
                        meta: request.meta.clone(),
                    });
                let name = request.name;
                let result = service.clone().oneshot(request).await;
                match (result, next) {
                    (Err(error), Some(next)) if error.is::<crate::store::Conflict>() => {
                        tracing::debug!(target: "inseam::dispatch", command = name, attempt, error = %error, "conflict; running the command again on fresh state");
                        attempt += 1;
                        request = next;
                    }
                    (result, _) => return result,
                }
            }
        })
    }
}
