//! What a handler sees of the dispatch it runs in.

use std::any::{Any, TypeId};
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateError, Loaded};
use crate::app::App;
use crate::dispatch::{NO_STORE, durable_message, durable_named_message};
use crate::envelope::{Envelope, HeaderError, Headers, Metadata};
use crate::error::{DispatchError, DispatchFailure};
use crate::extract::Parts;
use crate::handler::Delivery;
use crate::message::{Command, Event};
use crate::store::UnitOfWork;

/// The metadata a message is dispatched with. Ids are generated lazily, on first use, so a
/// command whose handler publishes nothing and that no middleware inspects costs no id and no
/// clock read.
#[derive(Debug, Default, Clone)]
pub struct MessageMeta {
    message_id: OnceLock<Uuid>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    pub(crate) headers: Headers,
}

impl MessageMeta {
    /// Fresh metadata: a new message id on first use, correlated to itself.
    pub const fn new() -> Self {
        MessageMeta {
            message_id: OnceLock::new(),
            correlation_id: None,
            causation_id: None,
            headers: Headers::new(),
        }
    }

    /// Uses a given message id (for example one received from a client, for idempotency).
    pub fn message_id(self, id: Uuid) -> Self {
        let message_id = OnceLock::new();
        let _ = message_id.set(id);
        MessageMeta { message_id, ..self }
    }

    /// Joins an existing flow.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Records the message that caused this one.
    pub fn causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a header.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, HeaderError> {
        self.headers.insert(name, value)?;
        Ok(self)
    }

    /// Metadata for a message caused by the one with `parent` metadata.
    pub(crate) fn caused_by(parent: Metadata) -> Self {
        MessageMeta::new()
            .correlation_id(parent.correlation_id)
            .causation_id(parent.message_id)
    }

    /// The metadata of a message received with `metadata`.
    pub(crate) fn received(metadata: Metadata, headers: Headers) -> Self {
        MessageMeta {
            correlation_id: Some(metadata.correlation_id),
            causation_id: metadata.causation_id,
            headers,
            ..MessageMeta::new().message_id(metadata.message_id)
        }
    }

    pub(crate) fn metadata(&self, app: &App) -> Metadata {
        let message_id = *self.message_id.get_or_init(|| app.next_id());
        self.with_id(message_id)
    }

    fn with_id(&self, message_id: Uuid) -> Metadata {
        Metadata {
            message_id,
            correlation_id: self.correlation_id.unwrap_or(message_id),
            causation_id: self.causation_id,
        }
    }
}

/// The metadata of a `send` or `query` without any: shared, never written to (a dispatch keeps
/// the id it generates in its own [`DispatchMeta`]).
pub(crate) static NO_META: MessageMeta = MessageMeta::new();

/// The metadata of one dispatch as its context sees it: the caller's [`MessageMeta`], borrowed,
/// and the message id generated for the dispatch on first use when the caller gave none.
///
/// Borrowing keeps the context small (the dispatch future holds it, and is moved when awaited);
/// a `send` without metadata borrows [`NO_META`] and holds no metadata of its own.
pub(crate) struct DispatchMeta<'a> {
    given: &'a MessageMeta,
    generated: OnceLock<Uuid>,
}

impl<'a> DispatchMeta<'a> {
    pub(crate) const fn new(given: &'a MessageMeta) -> Self {
        DispatchMeta {
            given,
            generated: OnceLock::new(),
        }
    }

    pub(crate) fn metadata(&self, app: &App) -> Metadata {
        // The caller's id, or one a layer generated into the caller's metadata, wins; the
        // caller's metadata is never written to, so that `NO_META` can be shared.
        let message_id = match self.given.message_id.get() {
            Some(id) => *id,
            None => *self.generated.get_or_init(|| app.next_id()),
        };
        self.given.with_id(message_id)
    }

    pub(crate) fn headers(&self) -> &'a Headers {
        &self.given.headers
    }
}

impl std::fmt::Debug for DispatchMeta<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageMeta")
            .field(
                "message_id",
                &self.given.message_id.get().or(self.generated.get()),
            )
            .field("correlation_id", &self.given.correlation_id)
            .field("causation_id", &self.given.causation_id)
            .field("headers", &self.given.headers)
            .finish()
    }
}

/// An event published in a unit of work, waiting for it to complete.
#[derive(Clone)]
pub(crate) struct PendingEvent {
    pub(crate) type_id: TypeId,
    pub(crate) name: &'static str,
    pub(crate) message_id: Uuid,
    /// An `Arc<Envelope<E>>`, shared by every subscriber.
    pub(crate) envelope: Arc<dyn Any + Send + Sync>,
    /// Its place in an event-sourced stream.
    pub(crate) stream: Option<StreamSlot>,
    /// Its wire form, for the outbox: an event may be stored although no route knows its type
    /// (an event of a stream, or any event when the app keeps unsubscribed ones).
    pub(crate) encode: fn(&PendingEvent) -> Result<crate::RawEnvelope, crate::CodecError>,
}

/// The place of a pending event in its stream.
#[derive(Clone)]
pub(crate) struct StreamSlot {
    pub(crate) position: crate::store::StreamPosition,
}

impl std::fmt::Debug for PendingEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEvent")
            .field("name", &self.name)
            .field("message_id", &self.message_id)
            .finish()
    }
}

pub(crate) fn pending<E: Event>(app: &App, event: E, parent: Metadata) -> PendingEvent {
    pending_keyed(app, event, parent, None)
}

/// A pending event whose key, if the event declares none, is `fallback_key`.
pub(crate) fn pending_keyed<E: Event>(
    app: &App,
    event: E,
    parent: Metadata,
    fallback_key: Option<&str>,
) -> PendingEvent {
    let metadata = MessageMeta::caused_by(parent).metadata(app);
    let key = event.key().or_else(|| fallback_key.map(str::to_owned));
    let mut headers = Headers::new();
    app.trace_into(&mut headers);
    let envelope = Envelope {
        metadata,
        key,
        occurred_at: app.now(),
        source: app.source(),
        headers,
        payload: event,
    };
    PendingEvent {
        type_id: TypeId::of::<E>(),
        name: E::NAME,
        message_id: metadata.message_id,
        envelope: Arc::new(envelope),
        stream: None,
        encode: crate::dispatch::encode_pending::<E>,
    }
}

/// Writes a durable command caused by `parent` to `uow`'s outbox.
async fn dispatch_durable<C>(
    app: &App,
    parent: Metadata,
    uow: Option<&mut dyn UnitOfWork>,
    at: Option<DateTime<Utc>>,
    command: &C,
) -> Result<Uuid, DispatchError<Infallible>>
where
    C: Command + serde::Serialize,
{
    let Some(uow) = uow else {
        return Err(DispatchFailure::NotDurable {
            command: std::any::type_name::<C>(),
            reason: NO_STORE,
        }
        .into());
    };
    let message = durable_message(app, MessageMeta::caused_by(parent), at, command)?;
    let id = message.envelope.metadata.message_id;
    uow.append(vec![message]).await?;
    Ok(id)
}

/// Writes `event` to the outbox of `ctx`'s unit of work for `group` only, due at `at`.
pub(crate) async fn deliver_later<E: Event>(
    ctx: &mut EventContext<'_>,
    event: E,
    group: &'static str,
    at: DateTime<Utc>,
) -> Result<Uuid, DispatchError<Infallible>> {
    let parent = ctx.meta.metadata(ctx.app);
    let pending = pending(ctx.app, event, parent);
    let envelope = crate::dispatch::encode_pending::<E>(&pending).map_err(|source| {
        DispatchFailure::Encode {
            event: E::NAME,
            source,
        }
    })?;
    let id = pending.message_id;
    let Some(uow) = ctx.unit_of_work() else {
        return Err(DispatchFailure::NotDurable {
            command: E::NAME,
            reason: NO_STORE,
        }
        .into());
    };
    uow.append(vec![crate::store::OutboxMessage {
        envelope,
        groups: vec![group],
        deliver_at: Some(at),
        stream: None,
    }])
    .await?;
    Ok(id)
}

/// Dispatches the durable command named `name` with a JSON `payload`, caused by the event
/// `ctx` handles.
pub(crate) async fn dispatch_named(
    ctx: &mut EventContext<'_>,
    name: &str,
    payload: &serde_json::Value,
) -> Result<Uuid, DispatchError<Infallible>> {
    let parent = ctx.meta.metadata(ctx.app);
    let message = durable_named_message(ctx.app, MessageMeta::caused_by(parent), name, payload)?;
    let id = message.envelope.metadata.message_id;
    let Some(uow) = ctx.unit_of_work() else {
        return Err(DispatchFailure::NotDurable {
            command: "a planned compensation",
            reason: NO_STORE,
        }
        .into());
    };
    uow.append(vec![message]).await?;
    Ok(id)
}

/// The context of a command handler: publish events, read the message's ids and headers.
///
/// Events published here reach inline subscribers before `send` returns and other subscribers
/// only once the command completed successfully; if the handler fails, they are discarded.
pub struct CommandContext<'a> {
    pub(crate) app: &'a App,
    pub(crate) meta: DispatchMeta<'a>,
    /// What the command published; `None` until it publishes, so that a command that
    /// publishes nothing has nothing to drop (the list's drop is an out-of-line call).
    pub(crate) outgoing: Option<Vec<PendingEvent>>,
    /// The unit of work the command runs in: the store's transaction when the app has a store,
    /// the relay's when a durable command is delivered.
    pub(crate) uow: Option<&'a mut dyn UnitOfWork>,
    /// Whether durable commands were written to the unit of work.
    pub(crate) dispatched: bool,
    /// Where the states of the cached aggregates this command saves wait for its commit: lent
    /// by the dispatch that commits it. Without it (a durable command run by the relay), a
    /// saved stream is forgotten by its cache instead.
    pub(crate) cached: Option<&'a mut Vec<crate::aggregate::CacheUpdate>>,
}

impl std::fmt::Debug for CommandContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandContext")
            .field("meta", &self.meta)
            .field("outgoing", &self.outgoing)
            .field("in_unit_of_work", &self.uow.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> CommandContext<'a> {
    pub(crate) fn new(app: &'a App, meta: &'a MessageMeta) -> Self {
        CommandContext {
            app,
            meta: DispatchMeta::new(meta),
            outgoing: None,
            uow: None,
            dispatched: false,
            cached: None,
        }
    }

    /// The store's unit of work this command runs in, if the app has a store. Stores offer
    /// typed access on top of it (`ctx.tx()` with `inseam-sql`).
    pub fn unit_of_work(&mut self) -> Option<&mut dyn UnitOfWork> {
        match &mut self.uow {
            Some(uow) => Some(&mut **uow),
            None => None,
        }
    }

    /// Publishes an event caused by this command.
    pub fn publish<E: Event>(&mut self, event: E) {
        let parent = self.meta.metadata(self.app);
        let pending = pending(self.app, event, parent);
        self.outgoing.get_or_insert_default().push(pending);
    }

    /// Loads aggregate `A` with `id` in this command's unit of work: its latest snapshot and
    /// the events after it, upcast to their current versions.
    pub async fn load<A: Aggregate>(&mut self, id: &str) -> Result<Loaded<A>, AggregateError> {
        let app = self.app;
        let uow = self.unit_of_work().ok_or(AggregateError::NoStore)?;
        crate::aggregate::load(app, uow, id, None, crate::aggregate::Source::CacheOrStore).await
    }

    /// Appends the events `aggregate` emitted to its stream, in this command's unit of work,
    /// after the version it was loaded at. They are published like any event of this command
    /// (inline subscribers, outbox). If another writer appended first, the command fails with
    /// `DispatchFailure::Conflict` and nothing is committed. Returns the new stream version.
    pub async fn save<A: Aggregate>(
        &mut self,
        aggregate: Loaded<A>,
    ) -> Result<u64, AggregateError> {
        let app = self.app;
        let parent = self.meta.metadata(app);
        let Some(uow) = self.uow.as_deref_mut() else {
            return Err(AggregateError::NoStore);
        };
        let mut forget = Vec::new();
        let cached = self.cached.as_deref_mut().unwrap_or(&mut forget);
        let outgoing = self.outgoing.get_or_insert_default();
        crate::aggregate::save(app, parent, uow, outgoing, cached, aggregate).await
    }

    /// Dispatches a durable command caused by this one: written to the outbox in this unit
    /// of work, so it exists if and only if this command commits; the relay then runs it by
    /// its one handler, at least once with effects once (inbox). Returns the new command's
    /// message id. The command must be declared with `AppBuilder::durable_command`, and the
    /// app needs a store.
    pub async fn dispatch<C>(&mut self, command: C) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize,
    {
        self.schedule_at(None, command).await
    }

    /// Like [`dispatch`](Self::dispatch), but not run before `at`: a timeout, a reminder.
    pub async fn schedule<C>(
        &mut self,
        at: DateTime<Utc>,
        command: C,
    ) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize,
    {
        self.schedule_at(Some(at), command).await
    }

    async fn schedule_at<C>(
        &mut self,
        at: Option<DateTime<Utc>>,
        command: C,
    ) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize,
    {
        let parent = self.meta.metadata(self.app);
        let app = self.app;
        let id = dispatch_durable(app, parent, self.unit_of_work(), at, &command).await?;
        self.dispatched = true;
        Ok(id)
    }

    /// Sends a command caused by this one, as part of this command's unit of work: with a
    /// store, its writes, events and durable commands commit together with this command's, or
    /// not at all (it runs under a savepoint, so that its own failure undoes only its own
    /// writes, and this handler may go on). Without a store it is an ordinary `send` in the
    /// same flow. Tower layers do not wrap a command sent this way.
    pub async fn send<C: Command>(
        &mut self,
        command: C,
    ) -> Result<C::Output, DispatchError<C::Error>> {
        let meta = MessageMeta::caused_by(self.meta.metadata(self.app));
        let Some(uow) = self.uow.as_deref_mut() else {
            return self.app.send_with(command, meta).await;
        };
        let cached = self.cached.as_deref_mut();
        let (output, wrote) = Box::pin(crate::dispatch::run_nested(
            self.app, uow, cached, command, meta,
        ))
        .await?;
        self.dispatched |= wrote;
        Ok(output)
    }

    /// This command's ids.
    pub fn metadata(&self) -> Metadata {
        self.meta.metadata(self.app)
    }

    /// This command's headers.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }

    /// The app.
    pub fn app(&self) -> &App {
        self.app
    }

    #[doc(hidden)]
    pub fn __parts(&self) -> Parts<'_> {
        Parts {
            app: self.app,
            meta: &self.meta,
        }
    }
}

/// The context of a query handler.
#[derive(Debug)]
pub struct QueryContext<'a> {
    pub(crate) app: &'a App,
    pub(crate) meta: DispatchMeta<'a>,
}

impl QueryContext<'_> {
    /// This query's ids.
    pub fn metadata(&self) -> Metadata {
        self.meta.metadata(self.app)
    }

    /// This query's headers.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }

    /// The app.
    pub fn app(&self) -> &App {
        self.app
    }

    #[doc(hidden)]
    pub fn __parts(&self) -> Parts<'_> {
        Parts {
            app: self.app,
            meta: &self.meta,
        }
    }
}

/// The context of an event subscriber: publish further events, send commands in the same flow.
pub struct EventContext<'a> {
    pub(crate) app: &'a App,
    pub(crate) meta: DispatchMeta<'a>,
    pub(crate) outgoing: &'a mut Vec<PendingEvent>,
    pub(crate) delivery: Delivery,
    /// Whether the event is replayed from the event store (a projection rebuild).
    pub(crate) replay: bool,
    /// The unit of work of the publishing command (inline) or of the delivery (durable).
    pub(crate) uow: Option<&'a mut dyn UnitOfWork>,
}

impl std::fmt::Debug for EventContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventContext")
            .field("meta", &self.meta)
            .field("delivery", &self.delivery)
            .field("in_unit_of_work", &self.uow.is_some())
            .finish_non_exhaustive()
    }
}

impl EventContext<'_> {
    /// The store's unit of work this subscriber runs in: the publishing command's for an
    /// inline subscriber, the delivery's for a durable one. `None` without a store.
    pub fn unit_of_work(&mut self) -> Option<&mut dyn UnitOfWork> {
        match &mut self.uow {
            Some(uow) => Some(&mut **uow),
            None => None,
        }
    }

    /// Publishes an event caused by the event being handled.
    pub fn publish<E: Event>(&mut self, event: E) {
        let parent = self.meta.metadata(self.app);
        self.outgoing.push(pending(self.app, event, parent));
    }

    /// Loads aggregate `A` with `id` in this subscriber's unit of work (see
    /// [`CommandContext::load`]).
    pub async fn load<A: Aggregate>(&mut self, id: &str) -> Result<Loaded<A>, AggregateError> {
        let app = self.app;
        let uow = self.unit_of_work().ok_or(AggregateError::NoStore)?;
        crate::aggregate::load(app, uow, id, None, crate::aggregate::Source::CacheOrStore).await
    }

    /// Appends what `aggregate` emitted to its stream in this subscriber's unit of work (see
    /// [`CommandContext::save`]).
    pub async fn save<A: Aggregate>(
        &mut self,
        aggregate: Loaded<A>,
    ) -> Result<u64, AggregateError> {
        let app = self.app;
        let parent = self.meta.metadata(app);
        let Some(uow) = self.uow.as_deref_mut() else {
            return Err(AggregateError::NoStore);
        };
        // When the delivery commits is not known here: the saved stream is forgotten by the
        // cache (when the update drops), and loaded from the store next time.
        let mut forget = Vec::new();
        crate::aggregate::save(app, parent, uow, self.outgoing, &mut forget, aggregate).await
    }

    /// Dispatches a durable command caused by this event, in this subscriber's unit of work:
    /// the relay's for a group subscriber (committed with the inbox row, so exactly once per
    /// delivered event), the publishing command's for an inline one. The relay runs it by its
    /// one handler. See [`CommandContext::dispatch`].
    pub async fn dispatch<C>(&mut self, command: C) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize,
    {
        let parent = self.meta.metadata(self.app);
        dispatch_durable(self.app, parent, self.unit_of_work(), None, &command).await
    }

    /// Like [`dispatch`](Self::dispatch), but not run before `at`: a timeout, a reminder.
    pub async fn schedule<C>(
        &mut self,
        at: DateTime<Utc>,
        command: C,
    ) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize,
    {
        let parent = self.meta.metadata(self.app);
        dispatch_durable(self.app, parent, self.unit_of_work(), Some(at), &command).await
    }

    /// Sends a command in the same flow (same correlation id, caused by this event), as part
    /// of this subscriber's unit of work: the publishing command's for an inline subscriber,
    /// the delivery's for a group subscriber (so it commits with the inbox row: once per
    /// delivered event). It runs under a savepoint (see [`CommandContext::send`]). Without a
    /// store it is an ordinary `send` in the same flow.
    pub async fn send<C: Command>(
        &mut self,
        command: C,
    ) -> Result<C::Output, DispatchError<C::Error>> {
        let meta = MessageMeta::caused_by(self.meta.metadata(self.app));
        let Some(uow) = self.uow.as_deref_mut() else {
            return self.app.send_with(command, meta).await;
        };
        // When the delivery commits is not known here: the nested command's cached
        // aggregates are forgotten (see `save`).
        let (output, _) = Box::pin(crate::dispatch::run_nested(
            self.app, uow, None, command, meta,
        ))
        .await?;
        Ok(output)
    }

    /// The handled event's ids.
    pub fn metadata(&self) -> Metadata {
        self.meta.metadata(self.app)
    }

    /// The handled event's headers.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }

    /// Whether the event is replayed from the event store to rebuild a read model, rather than
    /// delivered live. Events published during a replay are not published.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// Whether this subscriber runs inline or for a group.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The app.
    pub fn app(&self) -> &App {
        self.app
    }

    #[doc(hidden)]
    pub fn __parts(&self) -> Parts<'_> {
        Parts {
            app: self.app,
            meta: &self.meta,
        }
    }
}
