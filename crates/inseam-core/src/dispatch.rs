//! The dispatch machinery: prepared handlers, the slots the app looks them up in, units of work,
//! background deliveries and durable commands.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tower::ServiceExt as _;
use tower::service_fn;
use tower::util::BoxCloneSyncService;

use crate::app::App;
use crate::codec::CodecError;
use crate::context::{
    CommandContext, DispatchMeta, EventContext, MessageMeta, PendingEvent, QueryContext,
};
use crate::envelope::{Envelope, RawEnvelope};
use crate::error::{BoxError, DeliveryError, DispatchError, DispatchFailure, MAX_EVENTS_PER_UNIT};
use crate::handler::{
    CommandHandler, CommandResult, Delivery, EventHandler, HandlerFuture, QueryHandler, QueryResult,
};
use crate::message::{Command, Event, MessageKind, Query};
use crate::middleware::{DispatchRequest, DispatchResponse, DispatchService};
use crate::store::{DeliveryFailure, OutboxMessage, Store, UnitOfWork};

tokio::task_local! {
    /// Set while a handler runs in a unit of work of the store.
    static IN_UNIT: ();
}

/// Whether the current task runs a handler inside a unit of work of the store.
pub(crate) fn in_unit() -> bool {
    IN_UNIT.try_with(|()| ()).is_ok()
}

/// Runs `future` (a handler in a unit of work of the store) with [`in_unit`] set.
pub(crate) async fn within_unit<F: Future>(future: F) -> F::Output {
    IN_UNIT.scope((), future).await
}

/// A handler together with what its arguments need.
pub(crate) struct Prepared<P>(pub(crate) P);

pub(crate) trait ErasedCommandHandler<C: Command>: Send + Sync {
    fn call<'a>(
        &'a self,
        command: C,
        ctx: &'a mut CommandContext<'_>,
    ) -> HandlerFuture<'a, CommandResult<C>>;

    /// Like `call`, with the future written into `future`, where it is then polled: returned
    /// from the dynamic call instead, it would be copied into the caller's state machine.
    fn start<'a>(
        &'a self,
        command: C,
        ctx: &'a mut CommandContext<'_>,
        future: Pin<&mut Option<HandlerFuture<'a, CommandResult<C>>>>,
    );
}

pub(crate) trait ErasedQueryHandler<Q: Query>: Send + Sync {
    /// Starts the handler with its future written into `future` (see
    /// `ErasedCommandHandler::start`).
    fn start<'a>(
        &'a self,
        query: Q,
        ctx: &'a QueryContext<'_>,
        future: Pin<&mut Option<HandlerFuture<'a, QueryResult<Q>>>>,
    );
}

pub(crate) trait ErasedEventHandler<E: Event>: Send + Sync {
    fn call<'a>(
        &'a self,
        event: &'a Envelope<E>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>>;
}

/// Ties a prepared value to its handler type without storing the handler.
pub(crate) struct Bound<H: ?Sized, P> {
    prepared: P,
    _handler: std::marker::PhantomData<fn() -> Box<H>>,
}

impl<H: CommandHandler> Prepared<Bound<H, H::Prepared>> {
    pub(crate) fn command(prepared: H::Prepared) -> Self {
        Prepared(Bound {
            prepared,
            _handler: std::marker::PhantomData,
        })
    }
}

impl<H: CommandHandler> ErasedCommandHandler<H::Command> for Prepared<Bound<H, H::Prepared>> {
    #[inline]
    fn call<'a>(
        &'a self,
        command: H::Command,
        ctx: &'a mut CommandContext<'_>,
    ) -> HandlerFuture<'a, CommandResult<H::Command>> {
        H::call(&self.0.prepared, command, ctx)
    }

    #[inline]
    fn start<'a>(
        &'a self,
        command: H::Command,
        ctx: &'a mut CommandContext<'_>,
        mut future: Pin<&mut Option<HandlerFuture<'a, CommandResult<H::Command>>>>,
    ) {
        future.set(Some(H::call(&self.0.prepared, command, ctx)));
    }
}

impl<H: QueryHandler> Prepared<Bound<H, H::Prepared>> {
    pub(crate) fn query(prepared: H::Prepared) -> Self {
        Prepared(Bound {
            prepared,
            _handler: std::marker::PhantomData,
        })
    }
}

impl<H: QueryHandler> ErasedQueryHandler<H::Query> for Prepared<Bound<H, H::Prepared>> {
    #[inline]
    fn start<'a>(
        &'a self,
        query: H::Query,
        ctx: &'a QueryContext<'_>,
        mut future: Pin<&mut Option<HandlerFuture<'a, QueryResult<H::Query>>>>,
    ) {
        future.set(Some(H::call(&self.0.prepared, query, ctx)));
    }
}

impl<H: EventHandler> Prepared<Bound<H, H::Prepared>> {
    pub(crate) fn event(prepared: H::Prepared) -> Self {
        Prepared(Bound {
            prepared,
            _handler: std::marker::PhantomData,
        })
    }
}

impl<H: EventHandler> ErasedEventHandler<H::Event> for Prepared<Bound<H, H::Prepared>> {
    fn call<'a>(
        &'a self,
        event: &'a Envelope<H::Event>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>> {
        H::call(&self.0.prepared, event, ctx)
    }
}

/// Where the app finds a command's handler.
pub(crate) struct CommandSlot<C: Command> {
    pub(crate) handler: Box<dyn ErasedCommandHandler<C>>,
    pub(crate) handler_name: &'static str,
    /// The layered service, when any layer applies to this command.
    pub(crate) service: Option<DispatchService>,
}

/// Where the app finds a query's handler.
pub(crate) struct QuerySlot<Q: Query> {
    pub(crate) handler: Box<dyn ErasedQueryHandler<Q>>,
    pub(crate) handler_name: &'static str,
    pub(crate) service: Option<DispatchService>,
}

/// One subscriber of an event.
pub(crate) struct Subscriber<E: Event> {
    pub(crate) name: &'static str,
    pub(crate) delivery: Delivery,
    pub(crate) handler: Arc<dyn ErasedEventHandler<E>>,
    pub(crate) service: Option<DispatchService>,
}

/// The subscribers of one event type.
pub(crate) struct EventSlot<E: Event> {
    inline: Vec<Subscriber<E>>,
    background: Vec<Arc<Subscriber<E>>>,
    /// The distinct groups of `background`, in order.
    groups: Vec<&'static str>,
}

impl<E: Event> EventSlot<E> {
    pub(crate) fn assemble(subscribers: Vec<Box<dyn Any + Send + Sync>>) -> Box<dyn EventRoute> {
        let mut slot = EventSlot::<E> {
            inline: Vec::new(),
            background: Vec::new(),
            groups: Vec::new(),
        };
        for subscriber in subscribers {
            // Every element was built for this event type by the same registration entry.
            let Ok(subscriber) = subscriber.downcast::<Subscriber<E>>() else {
                continue;
            };
            match subscriber.delivery {
                Delivery::Inline => slot.inline.push(*subscriber),
                Delivery::Group(group) => {
                    if !slot.groups.contains(&group) {
                        slot.groups.push(group);
                    }
                    slot.background.push(Arc::from(subscriber));
                }
            }
        }
        Box::new(slot)
    }

    /// The envelope `group`'s subscribers receive from `raw`: what delivering and checking a
    /// stored event share.
    fn decode_for(&self, group: &str, raw: &RawEnvelope) -> Result<Envelope<E>, DeliveryFailure> {
        if !self.background.iter().any(|s| in_group(s, group)) {
            return Err(DeliveryFailure::Unroutable {
                group: group.to_owned(),
                name: raw.name.clone(),
                version: raw.version,
            });
        }
        raw.decode::<E>().map_err(|source| DeliveryFailure::Decode {
            name: raw.name.clone(),
            version: raw.version,
            source,
        })
    }
}

/// Whether `subscriber` is one of `group`'s.
fn in_group<E: Event>(subscriber: &Subscriber<E>, group: &str) -> bool {
    matches!(subscriber.delivery, Delivery::Group(g) if g == group)
}

/// An event type's subscribers, behind a type-erased interface.
pub(crate) trait EventRoute: Send + Sync {
    /// Runs the inline subscribers inside the publishing unit of work.
    fn run_inline<'a>(
        &'a self,
        app: &'a App,
        event: &'a PendingEvent,
        outgoing: &'a mut Vec<PendingEvent>,
        uow: Option<&'a mut dyn UnitOfWork>,
    ) -> Option<BoxFuture<'a, Result<(), DispatchError<Infallible>>>>;

    /// Starts a background delivery per group subscriber (apps without a store).
    fn spawn_background(&self, app: &App, event: &PendingEvent);

    /// The distinct groups subscribed.
    fn durable_groups(&self) -> &[&'static str];

    /// Delivers a stored event to one group's subscriber inside `uow`.
    fn deliver_raw<'a>(
        &'a self,
        app: &'a App,
        group: &'a str,
        raw: &'a RawEnvelope,
        uow: &'a mut dyn UnitOfWork,
        replay: bool,
    ) -> BoxFuture<'a, Result<(), DeliveryFailure>>;

    /// Decodes a stored event as `deliver_raw` would for `group`, without running anything.
    fn check_raw(&self, group: &str, raw: &RawEnvelope) -> Result<(), DeliveryFailure>;

    /// The event's name.
    fn event_name(&self) -> &'static str;

    /// The event's version.
    fn event_version(&self) -> u32;

    /// The groups subscribed.
    fn groups(&self) -> Vec<(&'static str, &'static str)>;
}

/// The wire form of a pending `E`.
pub(crate) fn encode_pending<E: Event>(event: &PendingEvent) -> Result<RawEnvelope, CodecError> {
    match event.envelope.downcast_ref::<Envelope<E>>() {
        Some(envelope) => envelope.to_raw(),
        None => Err(CodecError {
            content_type: <E::Codec as crate::codec::Codec>::CONTENT_TYPE,
            source: format!("a pending `{}` holds another type", E::NAME).into(),
        }),
    }
}

fn envelope_of<E: Event>(event: &PendingEvent) -> Option<Arc<Envelope<E>>> {
    event.envelope.clone().downcast::<Envelope<E>>().ok()
}

impl<E: Event> EventRoute for EventSlot<E> {
    fn run_inline<'a>(
        &'a self,
        app: &'a App,
        event: &'a PendingEvent,
        outgoing: &'a mut Vec<PendingEvent>,
        mut uow: Option<&'a mut dyn UnitOfWork>,
    ) -> Option<BoxFuture<'a, Result<(), DispatchError<Infallible>>>> {
        if self.inline.is_empty() {
            return None;
        }
        let envelope = event.envelope.downcast_ref::<Envelope<E>>()?;
        Some(Box::pin(async move {
            for subscriber in &self.inline {
                let meta = MessageMeta::received(envelope.metadata, envelope.headers.clone());
                let mut ctx = EventContext {
                    app,
                    meta: DispatchMeta::new(&meta),
                    outgoing: &mut *outgoing,
                    delivery: Delivery::Inline,
                    replay: false,
                    uow: match &mut uow {
                        Some(uow) => Some(&mut **uow),
                        None => None,
                    },
                };
                subscriber
                    .handler
                    .call(envelope, &mut ctx)
                    .await
                    .map_err(|source| DispatchFailure::Subscriber {
                        handler: subscriber.name,
                        event: E::NAME,
                        message_id: envelope.metadata.message_id,
                        source,
                    })?;
            }
            Ok(())
        }))
    }

    fn spawn_background(&self, app: &App, event: &PendingEvent) {
        if self.background.is_empty() {
            return;
        }
        let Some(envelope) = envelope_of::<E>(event) else {
            return;
        };
        for subscriber in &self.background {
            let delivery = deliver(app.clone(), subscriber.clone(), envelope.clone());
            app.inner.spawn(delivery);
        }
    }

    fn durable_groups(&self) -> &[&'static str] {
        &self.groups
    }

    fn deliver_raw<'a>(
        &'a self,
        app: &'a App,
        group: &'a str,
        raw: &'a RawEnvelope,
        uow: &'a mut dyn UnitOfWork,
        replay: bool,
    ) -> BoxFuture<'a, Result<(), DeliveryFailure>> {
        Box::pin(async move {
            let envelope = self.decode_for(group, raw)?;
            for subscriber in &self.background {
                if !in_group(subscriber, group) {
                    continue;
                }
                let mut outgoing = Vec::new();
                let meta = MessageMeta::received(envelope.metadata, envelope.headers.clone());
                let mut ctx = EventContext {
                    app,
                    meta: DispatchMeta::new(&meta),
                    outgoing: &mut outgoing,
                    delivery: subscriber.delivery,
                    replay,
                    uow: Some(&mut *uow),
                };
                let outcome =
                    AssertUnwindSafe(within_unit(subscriber.handler.call(&envelope, &mut ctx)))
                        .catch_unwind()
                        .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) if source.is::<crate::handler::Halt>() => {
                        return Err(DeliveryFailure::Halted {
                            handler: subscriber.name,
                            source,
                        });
                    }
                    Ok(Err(source)) if source.is::<crate::handler::Reject>() => {
                        return Err(DeliveryFailure::Rejected {
                            handler: subscriber.name,
                            source,
                        });
                    }
                    Ok(Err(source)) => {
                        return Err(DeliveryFailure::Handler {
                            handler: subscriber.name,
                            source,
                        });
                    }
                    Err(panic) => {
                        return Err(DeliveryFailure::Panicked {
                            handler: subscriber.name,
                            reason: panic_reason(&*panic),
                        });
                    }
                }
                // A replay rebuilds a read model: what it publishes is not published again.
                if !outgoing.is_empty() && !replay {
                    within_unit(complete(app, outgoing, Some(&mut *uow)))
                        .await
                        .map_err(|source| DeliveryFailure::Completion {
                            handler: subscriber.name,
                            source,
                        })?;
                }
            }
            Ok(())
        })
    }

    fn check_raw(&self, group: &str, raw: &RawEnvelope) -> Result<(), DeliveryFailure> {
        self.decode_for(group, raw).map(drop)
    }

    fn event_name(&self) -> &'static str {
        E::NAME
    }

    fn event_version(&self) -> u32 {
        E::VERSION
    }

    fn groups(&self) -> Vec<(&'static str, &'static str)> {
        self.background
            .iter()
            .filter_map(|s| match s.delivery {
                Delivery::Group(group) => Some((group, s.name)),
                Delivery::Inline => None,
            })
            .collect()
    }
}

/// Runs a command handler in a unit of work of the store: its writes, its outbox rows and its
/// inline subscribers commit together, after the handler returned `Ok`.
pub(crate) async fn run_command_in_store<C: Command>(
    app: &App,
    store: &dyn Store,
    slot: &CommandSlot<C>,
    command: C,
    meta: MessageMeta,
) -> Result<C::Output, DispatchError<C::Error>> {
    let mut uow = store.begin().await?;
    let mut cached = Vec::new();
    match handle_in_unit(app, slot, &mut *uow, &mut cached, command, &meta).await {
        Ok((output, wrote)) => {
            uow.commit().await?;
            if wrote {
                store.committed();
            }
            cached
                .into_iter()
                .for_each(crate::aggregate::CacheUpdate::committed);
            Ok(output)
        }
        Err(error) => {
            rollback(uow).await;
            Err(error)
        }
    }
}

/// Runs a command's handler in `uow`, then completes what it published (inline subscribers,
/// outbox rows) in the same unit of work. Returns its output and whether it wrote to the
/// outbox. A failure undoes nothing here: the caller rolls back its unit of work, or its
/// savepoint. A panic of the handler is a typed failure.
async fn handle_in_unit<C: Command>(
    app: &App,
    slot: &CommandSlot<C>,
    uow: &mut dyn UnitOfWork,
    cached: &mut Vec<crate::aggregate::CacheUpdate>,
    command: C,
    meta: &MessageMeta,
) -> Result<(C::Output, bool), DispatchError<C::Error>> {
    let mut ctx = CommandContext::new(app, meta);
    ctx.uow = Some(&mut *uow);
    ctx.cached = Some(cached);
    let outcome = AssertUnwindSafe(within_unit(slot.handler.call(command, &mut ctx)))
        .catch_unwind()
        .await;
    let CommandContext {
        outgoing,
        dispatched,
        ..
    } = ctx;
    let outgoing = outgoing.unwrap_or_default();
    let output = match outcome {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => return Err(DispatchError::Handler(error)),
        Err(panic) => {
            return Err(DispatchFailure::Panicked {
                handler: slot.handler_name,
                reason: panic_reason(&*panic),
            }
            .into());
        }
    };
    let wrote = !outgoing.is_empty() || dispatched;
    if !outgoing.is_empty() {
        within_unit(complete(app, outgoing, Some(uow)))
            .await
            .map_err(DispatchError::widen)?;
    }
    Ok((output, wrote))
}

/// Runs `outgoing` (published outside a command) in a unit of work of the store.
pub(crate) async fn publish_in_store(
    app: &App,
    store: &dyn Store,
    outgoing: Vec<PendingEvent>,
) -> Result<(), DispatchError<Infallible>> {
    let mut uow = store.begin().await?;
    if let Err(error) = within_unit(complete(app, outgoing, Some(&mut *uow))).await {
        rollback(uow).await;
        return Err(error);
    }
    uow.commit().await?;
    store.committed();
    Ok(())
}

/// Runs `command` from inside a handler, in that handler's unit of work `uow`: under a
/// savepoint, so that a failing command undoes its own writes only, and with its events
/// completed (inline subscribers, outbox rows) in the same unit of work. Nothing of it commits
/// unless the unit of work does. Returns whether it wrote to the outbox.
///
/// Tower layers do not wrap it: a layered request is `'static`, and cannot carry the unit of
/// work it borrows.
pub(crate) async fn run_nested<C: Command>(
    app: &App,
    uow: &mut dyn UnitOfWork,
    cached: Option<&mut Vec<crate::aggregate::CacheUpdate>>,
    command: C,
    meta: MessageMeta,
) -> Result<(C::Output, bool), DispatchError<C::Error>> {
    let Some(slot) = app.inner.command_slot::<C>() else {
        return Err(DispatchFailure::NoHandler {
            kind: MessageKind::Command,
            message: std::any::type_name::<C>(),
        }
        .into());
    };
    uow.savepoint().await?;
    let mut nested_cached = Vec::new();
    match handle_in_unit(app, slot, &mut *uow, &mut nested_cached, command, &meta).await {
        Ok((output, wrote)) => {
            uow.release_savepoint().await?;
            // The nested command's cached states wait for the outer commit; dropped (forgotten
            // by their caches) when it failed.
            if let Some(cached) = cached {
                cached.extend(nested_cached);
            }
            Ok((output, wrote))
        }
        Err(error) => {
            undo_nested(uow).await?;
            Err(error)
        }
    }
}

/// Undoes a failed nested command. If even that fails, the unit of work is in an unknown
/// state and the failure is the caller's, so that the outer command cannot commit half of it.
async fn undo_nested(uow: &mut dyn UnitOfWork) -> Result<(), DispatchFailure> {
    uow.rollback_to_savepoint().await?;
    Ok(())
}

async fn rollback(uow: Box<dyn UnitOfWork>) {
    if let Err(error) = uow.rollback().await {
        // The transaction is abandoned either way; the database rolls it back when the
        // connection is reset.
        tracing::warn!(target: "inseam::dispatch", error = &error as &dyn std::error::Error, "rollback failed");
    }
}

/// Completes a unit of work that published `outgoing`: inline subscribers run first (and may
/// publish more), then every event is handed to its background subscribers.
///
/// With a unit of work (the app has a store), the events with group subscribers are written to
/// the outbox in it instead (with `keep_unsubscribed_events`, every event); the store's relay
/// delivers them after commit.
pub(crate) async fn complete(
    app: &App,
    mut outgoing: Vec<PendingEvent>,
    mut uow: Option<&mut dyn UnitOfWork>,
) -> Result<(), DispatchError<Infallible>> {
    let mut next = 0;
    while next < outgoing.len() {
        if outgoing.len() > MAX_EVENTS_PER_UNIT {
            return Err(DispatchFailure::TooManyEvents {
                limit: MAX_EVENTS_PER_UNIT,
                event: outgoing[outgoing.len() - 1].name,
            }
            .into());
        }
        let event = outgoing[next].clone();
        next += 1;
        let Some(route) = app.inner.route(event.type_id) else {
            continue;
        };
        let uow = uow.as_deref_mut();
        if let Some(inline) = route.run_inline(app, &event, &mut outgoing, uow) {
            inline.await?;
        }
    }
    if let Some(uow) = uow {
        let keep_unsubscribed = app.inner.keep_unsubscribed;
        let mut messages = Vec::new();
        for event in &outgoing {
            let groups = app
                .inner
                .route(event.type_id)
                .map(|r| r.durable_groups())
                .unwrap_or_default();
            // An event of a stream is stored whoever subscribes: it is the stream. Another
            // one only when a group is to receive it, or when the app keeps every event.
            if groups.is_empty() && event.stream.is_none() && !keep_unsubscribed {
                continue;
            }
            let envelope = (event.encode)(event).map_err(|source| DispatchFailure::Encode {
                event: event.name,
                source,
            })?;
            messages.push(OutboxMessage {
                envelope,
                groups: app.inner.outbox_groups(groups),
                deliver_at: None,
                stream: event.stream.as_ref().map(|s| s.position.clone()),
            });
        }
        if !messages.is_empty() {
            uow.append(messages).await?;
        }
        return Ok(());
    }
    for event in &outgoing {
        if let Some(route) = app.inner.route(event.type_id) {
            route.spawn_background(app, event);
        }
    }
    Ok(())
}

/// Runs a background subscriber for one event, then completes what it published.
async fn run_subscriber<E: Event>(
    app: &App,
    handler: &dyn ErasedEventHandler<E>,
    delivery: Delivery,
    envelope: &Envelope<E>,
) -> Result<(), BoxError> {
    let mut outgoing = Vec::new();
    let meta = MessageMeta::received(envelope.metadata, envelope.headers.clone());
    let mut ctx = EventContext {
        app,
        meta: DispatchMeta::new(&meta),
        outgoing: &mut outgoing,
        delivery,
        replay: false,
        uow: None,
    };
    handler.call(envelope, &mut ctx).await?;
    if !outgoing.is_empty() {
        complete(app, outgoing, None).await?;
    }
    Ok(())
}

/// One background delivery: never fails or panics outward; failures are logged and counted.
async fn deliver<E: Event>(app: App, subscriber: Arc<Subscriber<E>>, envelope: Arc<Envelope<E>>) {
    let outcome = match &subscriber.service {
        None => {
            AssertUnwindSafe(run_subscriber(
                &app,
                &*subscriber.handler,
                subscriber.delivery,
                &envelope,
            ))
            .catch_unwind()
            .await
        }
        Some(service) => {
            let request = DispatchRequest {
                app: app.clone(),
                kind: MessageKind::Event,
                name: E::NAME,
                type_name: std::any::type_name::<E>(),
                handler: subscriber.name,
                group: match subscriber.delivery {
                    Delivery::Group(group) => Some(group),
                    Delivery::Inline => None,
                },
                message: Box::new(envelope.clone()),
                meta: MessageMeta::received(envelope.metadata, envelope.headers.clone()),
            };
            AssertUnwindSafe(service.clone().oneshot(request).map(|r| r.map(drop)))
                .catch_unwind()
                .await
        }
    };
    let metadata = envelope.metadata;
    let group = match subscriber.delivery {
        Delivery::Group(group) => group,
        Delivery::Inline => "inline",
    };
    match outcome {
        Ok(Ok(())) => app.inner.stats.delivered(),
        Ok(Err(source)) => {
            app.inner.stats.failed();
            let error = DeliveryError {
                handler: subscriber.name,
                delivery: subscriber.delivery,
                event: E::NAME,
                message_id: metadata.message_id,
                source,
            };
            tracing::error!(
                target: "inseam::delivery",
                event = E::NAME,
                handler = subscriber.name,
                group,
                message_id = %metadata.message_id,
                correlation_id = %metadata.correlation_id,
                error = &error as &dyn std::error::Error,
                "subscriber failed"
            );
        }
        Err(panic) => {
            app.inner.stats.panicked();
            let reason = panic_reason(&*panic);
            tracing::error!(
                target: "inseam::delivery",
                event = E::NAME,
                handler = subscriber.name,
                group,
                message_id = %metadata.message_id,
                correlation_id = %metadata.correlation_id,
                panic = %reason,
                "subscriber panicked"
            );
        }
    }
}

fn panic_reason(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Turns the error a layered service returned back into a typed dispatch error: the handler's
/// own error comes back typed, a framework failure keeps its variant, anything else came from
/// a layer.
pub(crate) fn classify<E: std::error::Error + Send + Sync + 'static>(
    kind: MessageKind,
    message: &'static str,
    error: BoxError,
) -> DispatchError<E> {
    match error.downcast::<E>() {
        Ok(own) => DispatchError::Handler(*own),
        Err(error) => match error.downcast::<DispatchFailure>() {
            Ok(failure) => DispatchError::Failed(failure),
            Err(error) => match error.downcast::<crate::store::Conflict>() {
                Ok(conflict) => DispatchFailure::Conflict(*conflict).into(),
                Err(source) => DispatchFailure::Middleware {
                    kind,
                    message,
                    source,
                }
                .into(),
            },
        },
    }
}

fn into_service_error<E: std::error::Error + Send + Sync + 'static>(
    error: DispatchError<E>,
) -> BoxError {
    // The handler's own error travels unwrapped so that layers see it as it is; the framework's
    // failures travel as the failure itself. `classify` undoes both.
    match error {
        DispatchError::Handler(own) => Box::new(own),
        DispatchError::Failed(failure) => match *failure {
            // As itself, so that a layer (`RetryOnConflict`) recognises it whatever the command.
            DispatchFailure::Conflict(conflict) => Box::new(conflict),
            _ => failure,
        },
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a layer replaced the {kind} `{message}` in the dispatch request")]
struct ReplacedMessage {
    kind: MessageKind,
    message: &'static str,
}

/// The innermost service of a layered command: the unit of work.
pub(crate) fn command_service<C: Command>() -> DispatchService {
    BoxCloneSyncService::new(service_fn(|request: DispatchRequest| async move {
        let DispatchRequest {
            app, message, meta, ..
        } = request;
        let command = message.downcast::<C>().map_err(|_| ReplacedMessage {
            kind: MessageKind::Command,
            message: C::NAME,
        })?;
        match app.dispatch_command::<C, _, false>(*command, meta).await {
            Ok(output) => Ok(DispatchResponse(Box::new(output))),
            Err(error) => Err(into_service_error(error)),
        }
    }))
}

/// The innermost service of a layered query.
pub(crate) fn query_service<Q: Query>() -> DispatchService {
    BoxCloneSyncService::new(service_fn(|request: DispatchRequest| async move {
        let DispatchRequest {
            app, message, meta, ..
        } = request;
        let query = message.downcast::<Q>().map_err(|_| ReplacedMessage {
            kind: MessageKind::Query,
            message: Q::NAME,
        })?;
        match app.dispatch_query::<Q, _, false>(*query, meta).await {
            Ok(output) => Ok(DispatchResponse(Box::new(output))),
            Err(error) => Err(into_service_error(error)),
        }
    }))
}

/// The innermost service of a layered background subscriber.
pub(crate) fn event_service<E: Event>(handler: Arc<dyn ErasedEventHandler<E>>) -> DispatchService {
    BoxCloneSyncService::new(service_fn(move |request: DispatchRequest| {
        let handler = handler.clone();
        async move {
            let delivery = match request.group {
                Some(group) => Delivery::Group(group),
                None => Delivery::Inline,
            };
            let DispatchRequest { app, message, .. } = request;
            let envelope = message
                .downcast::<Arc<Envelope<E>>>()
                .map_err(|_| ReplacedMessage {
                    kind: MessageKind::Event,
                    message: E::NAME,
                })?;
            run_subscriber(&app, &*handler, delivery, &envelope).await?;
            Ok(DispatchResponse(Box::new(())))
        }
    }))
}

/// A command that can be dispatched durably: stored in the outbox, run later by its one
/// handler in the relay's unit of work.
pub(crate) trait DurableRoute: Send + Sync {
    fn deliver<'a>(
        &'a self,
        app: &'a App,
        raw: &'a RawEnvelope,
        uow: &'a mut dyn UnitOfWork,
    ) -> BoxFuture<'a, Result<(), DeliveryFailure>>;

    /// Decodes a stored command as `deliver` would, without running its handler.
    fn check(&self, app: &App, raw: &RawEnvelope) -> Result<(), DeliveryFailure>;
}

pub(crate) struct DurableCommand<C>(pub(crate) std::marker::PhantomData<fn() -> C>);

impl<C> DurableCommand<C>
where
    C: Command + serde::de::DeserializeOwned,
{
    /// The command's slot and the command `raw` holds: what delivering and checking a stored
    /// command share.
    fn decode<'a>(
        app: &'a App,
        raw: &RawEnvelope,
    ) -> Result<(&'a CommandSlot<C>, C), DeliveryFailure> {
        let unroutable = || DeliveryFailure::Unroutable {
            group: durable_group_name::<C>().to_owned(),
            name: raw.name.clone(),
            version: raw.version,
        };
        if raw.name != C::NAME {
            return Err(unroutable());
        }
        let Some(slot) = app.inner.command_slot::<C>() else {
            return Err(unroutable());
        };
        let command =
            serde_json::from_slice(&raw.payload).map_err(|source| DeliveryFailure::Decode {
                name: raw.name.clone(),
                version: raw.version,
                source: crate::envelope::WireError::Payload {
                    name: raw.name.clone(),
                    version: raw.version,
                    message_id: raw.metadata.message_id,
                    source: CodecError {
                        content_type: "application/json",
                        source: Box::new(source),
                    },
                },
            })?;
        Ok((slot, command))
    }
}

impl<C> DurableRoute for DurableCommand<C>
where
    C: Command + serde::de::DeserializeOwned,
{
    fn deliver<'a>(
        &'a self,
        app: &'a App,
        raw: &'a RawEnvelope,
        uow: &'a mut dyn UnitOfWork,
    ) -> BoxFuture<'a, Result<(), DeliveryFailure>> {
        Box::pin(async move {
            let (slot, command) = Self::decode(app, raw)?;
            let meta = MessageMeta::received(raw.metadata, raw.headers.clone());
            let mut ctx = CommandContext::new(app, &meta);
            ctx.uow = Some(&mut *uow);
            let outcome = AssertUnwindSafe(within_unit(slot.handler.call(command, &mut ctx)))
                .catch_unwind()
                .await;
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return Err(DeliveryFailure::Handler {
                        handler: slot.handler_name,
                        source: Box::new(error),
                    });
                }
                Err(panic) => {
                    return Err(DeliveryFailure::Panicked {
                        handler: slot.handler_name,
                        reason: panic_reason(&*panic),
                    });
                }
            }
            let outgoing = ctx.outgoing.take().unwrap_or_default();
            drop(ctx);
            if !outgoing.is_empty() {
                within_unit(complete(app, outgoing, Some(uow)))
                    .await
                    .map_err(|source| DeliveryFailure::Completion {
                        handler: slot.handler_name,
                        source,
                    })?;
            }
            Ok(())
        })
    }

    fn check(&self, app: &App, raw: &RawEnvelope) -> Result<(), DeliveryFailure> {
        Self::decode(app, raw).map(drop)
    }
}

/// Why a message meant for the store's outbox (a durable command, a timeout) cannot be written.
pub(crate) const NO_STORE: &str =
    "the app has no store to hold it: give it one with `.store(..)` on the app builder";

/// The outbox message that runs `command` durably at `at` (or as soon as the relay gets to
/// it), with `meta`'s ids.
pub(crate) fn durable_message<C>(
    app: &App,
    meta: MessageMeta,
    at: Option<DateTime<Utc>>,
    command: &C,
) -> Result<OutboxMessage, DispatchError<Infallible>>
where
    C: Command + serde::Serialize,
{
    let group = durable_group_name::<C>();
    if !app.inner.durable.contains_key(group) {
        return Err(DispatchFailure::NotDurable {
            command: type_name::<C>(),
            reason: "it was not declared durable: add `.durable_command::<..>()` to the app builder",
        }
        .into());
    }
    let payload = serde_json::to_vec(command).map_err(|e| DispatchFailure::Encode {
        event: C::NAME,
        source: CodecError {
            content_type: "application/json",
            source: Box::new(e),
        },
    })?;
    let mut headers = meta.headers.clone();
    app.trace_into(&mut headers);
    let envelope = RawEnvelope {
        metadata: meta.metadata(app),
        name: C::NAME.to_owned(),
        version: 1,
        key: None,
        occurred_at: app.now(),
        source: app.inner.source.to_string(),
        headers,
        content_type: "application/json".to_owned(),
        payload,
    };
    Ok(OutboxMessage {
        envelope,
        groups: app.inner.outbox_groups(&[group]),
        deliver_at: at,
        stream: None,
    })
}

/// The outbox message that runs the durable command named `name` with a JSON `payload` (a
/// planned compensation), with `meta`'s ids.
pub(crate) fn durable_named_message(
    app: &App,
    meta: MessageMeta,
    name: &str,
    payload: &serde_json::Value,
) -> Result<OutboxMessage, DispatchError<Infallible>> {
    let group = format!("command:{name}");
    let Some((&group, _)) = app.inner.durable.get_key_value(group.as_str()) else {
        return Err(DispatchFailure::NotDurable {
            command: "a planned compensation",
            reason: "no command of that name was declared durable: add `.durable_command::<..>()` to the app builder",
        }
        .into());
    };
    let payload = serde_json::to_vec(payload).map_err(|e| DispatchFailure::Encode {
        event: group,
        source: CodecError {
            content_type: "application/json",
            source: Box::new(e),
        },
    })?;
    let mut headers = meta.headers.clone();
    app.trace_into(&mut headers);
    Ok(OutboxMessage {
        envelope: RawEnvelope {
            metadata: meta.metadata(app),
            name: name.to_owned(),
            version: 1,
            key: None,
            occurred_at: app.now(),
            source: app.inner.source.to_string(),
            headers,
            content_type: "application/json".to_owned(),
            payload,
        },
        groups: app.inner.outbox_groups(&[group]),
        deliver_at: None,
        stream: None,
    })
}

/// The relay group of a durable command: `command:<name>`, one per command type.
pub(crate) fn durable_group_name<C: Command>() -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<TypeId, &'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    // Leaked once per command type for the life of the process: groups are `&'static str`.
    names
        .entry(TypeId::of::<C>())
        .or_insert_with(|| Box::leak(format!("command:{}", C::NAME).into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Conflict;

    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("the handler refused")]
    struct Refused;

    /// What a caller gets back once an error went through the layers as the service error.
    fn round_trip(error: DispatchError<Refused>) -> DispatchError<Refused> {
        classify(
            MessageKind::Command,
            "tests.refusable",
            into_service_error(error),
        )
    }

    #[test]
    fn errors_cross_the_layers_as_they_were() {
        assert!(matches!(
            round_trip(DispatchError::Handler(Refused)),
            DispatchError::Handler(Refused)
        ));

        let conflict = Conflict {
            stream: "cart-1".into(),
            version: 2,
        };
        assert_eq!(
            round_trip(conflict.clone().into()).conflict(),
            Some(&conflict)
        );

        let failure = Box::new(DispatchFailure::TooManyEvents {
            limit: 3,
            event: "tests.looped",
        });
        let sent: *const DispatchFailure = &*failure;
        match round_trip(DispatchError::Failed(failure)) {
            DispatchError::Failed(back) => {
                assert!(std::ptr::eq(sent, &*back), "the failure was re-allocated");
                assert!(matches!(
                    *back,
                    DispatchFailure::TooManyEvents {
                        limit: 3,
                        event: "tests.looped"
                    }
                ));
            }
            other => panic!("expected the failure back, got {other:?}"),
        }
    }

    #[test]
    fn an_error_of_a_layer_is_a_middleware_failure_naming_the_message() {
        let error =
            classify::<Refused>(MessageKind::Command, "tests.refusable", "not today".into());
        match error.into_failure() {
            Ok(DispatchFailure::Middleware {
                kind,
                message,
                source,
            }) => {
                assert_eq!(kind, MessageKind::Command);
                assert_eq!(message, "tests.refusable");
                assert_eq!(source.to_string(), "not today");
            }
            other => panic!("expected a middleware failure, got {other:?}"),
        }
    }
}
