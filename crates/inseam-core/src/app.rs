//! The app: built once from registrations, then dispatches commands, queries and events.

use std::any::{Any, TypeId, type_name};
use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use chrono::{DateTime, Utc};
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateError, CacheUpdate, Loaded, Source};
use crate::builder::AppBuilder;
use crate::catalog::Catalog;
use crate::clock::{Clock, IdGenerator};
use crate::context::{
    CommandContext, DispatchMeta, MessageMeta, NO_META, PendingEvent, QueryContext,
};
use crate::dispatch::{
    CommandSlot, DurableRoute, EventRoute, NO_STORE, QuerySlot, classify, complete,
    durable_message, publish_in_store, run_command_in_store,
};
use crate::envelope::{Envelope, RawEnvelope};
use crate::error::{BoxError, DispatchError, DispatchFailure};
use crate::extract::Resources;
use crate::message::{Command, Event, MessageKind, Query, SlotIndex};
use crate::middleware::{DispatchRequest, DispatchResponse, DispatchService};
use crate::registry::BuiltSlot;
use crate::store::{DeliveryFailure, RelayHandle, Store, UnitOfWork};
use crate::upcast::{UpcastError, Upcasters};

/// Hashes a `TypeId` by its own bits: the ids are already uniformly distributed.
#[derive(Default)]
pub(crate) struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type TypeMap<V> = HashMap<TypeId, V, BuildHasherDefault<TypeIdHasher>>;

pub(crate) fn freeze<V>(map: HashMap<TypeId, V>) -> TypeMap<V> {
    map.into_iter().collect()
}

type AnySlot = Box<dyn Any + Send + Sync>;

/// The command or query slots of an app: at their type's slot index when it has one (a load
/// and a bounds check per dispatch), by `TypeId` otherwise.
pub(crate) struct Slots {
    indexed: Vec<Option<AnySlot>>,
    by_type: TypeMap<AnySlot>,
    len: usize,
}

impl Slots {
    pub(crate) fn new(built: HashMap<TypeId, BuiltSlot>) -> Self {
        let len = built.len();
        let mut indexed: Vec<Option<AnySlot>> = Vec::new();
        let mut by_type = TypeMap::default();
        for (type_id, BuiltSlot { index, slot }) in built {
            match index {
                Some(index) => {
                    if indexed.len() <= index {
                        indexed.resize_with(index + 1, || None);
                    }
                    indexed[index] = Some(slot);
                }
                None => {
                    by_type.insert(type_id, slot);
                }
            }
        }
        Slots {
            indexed,
            by_type,
            len,
        }
    }

    #[inline]
    fn get<M: 'static>(
        &self,
        index: Option<&'static SlotIndex>,
    ) -> Option<&(dyn Any + Send + Sync)> {
        if let Some(slot) = index
            .and_then(SlotIndex::get)
            .and_then(|index| self.indexed.get(index)?.as_deref())
        {
            return Some(slot);
        }
        self.by_type.get(&TypeId::of::<M>()).map(|slot| &**slot)
    }
}

/// Counters of background deliveries.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
}

impl Counters {
    pub(crate) fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn panicked(&self) {
        self.panicked.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the app's delivery counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Background deliveries that succeeded.
    pub delivered: u64,
    /// Background deliveries whose subscriber returned an error.
    pub failed: u64,
    /// Background deliveries whose subscriber panicked.
    pub panicked: u64,
}

/// What an app is made of, shared by its clones. The builder fills every field.
pub(crate) struct Core {
    pub(crate) commands: Slots,
    pub(crate) queries: Slots,
    pub(crate) events: TypeMap<Box<dyn EventRoute>>,
    /// Event types by their stored identity: name and version.
    pub(crate) by_name: HashMap<(&'static str, u32), TypeId>,
    /// The groups the relay runs: this process's own and the transports' outbox groups.
    pub(crate) groups: Vec<&'static str>,
    /// Every group of the app, wherever it runs.
    pub(crate) all_groups: Vec<&'static str>,
    /// Groups that run in another process, with the outbox group of their transport.
    pub(crate) remote: HashMap<&'static str, &'static str>,
    pub(crate) routing: crate::routing::Routing,
    pub(crate) transports: HashMap<&'static str, Arc<dyn crate::transport::Transport>>,
    /// Commands and queries, by name, answered by another process.
    pub(crate) remote_commands: HashMap<&'static str, crate::remote::RemoteTarget>,
    pub(crate) remote_queries: HashMap<&'static str, crate::remote::RemoteTarget>,
    /// Commands and queries this process answers for the others.
    pub(crate) served: Vec<crate::remote::Routable>,
    pub(crate) durable: HashMap<&'static str, Box<dyn DurableRoute>>,
    pub(crate) upcasters: Upcasters,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) ids: Arc<dyn IdGenerator>,
    pub(crate) resources: Resources,
    pub(crate) store: Option<Arc<dyn Store>>,
    /// Whether events no group subscribes to are written to the store's outbox too.
    pub(crate) keep_unsubscribed: bool,
    /// Carries trace context in the headers of what is published, when the app has one.
    pub(crate) propagation: Option<Arc<dyn crate::propagation::TracePropagation>>,
    pub(crate) source: Arc<str>,
    pub(crate) runtime: Handle,
    pub(crate) tasks: TaskTracker,
    pub(crate) stats: Counters,
    pub(crate) catalog: Catalog,
    /// `Arc<dyn CachedStates<A>>` per aggregate type with a cache.
    pub(crate) state_caches: TypeMap<Box<dyn Any + Send + Sync>>,
}

impl Core {
    #[inline]
    pub(crate) fn command_slot<C: Command>(&self) -> Option<&CommandSlot<C>> {
        self.commands.get::<C>(C::__slot_index())?.downcast_ref()
    }

    #[inline]
    pub(crate) fn query_slot<Q: Query>(&self) -> Option<&QuerySlot<Q>> {
        self.queries.get::<Q>(Q::__slot_index())?.downcast_ref()
    }

    /// The groups an outbox row for `groups` goes to in this process: a group that runs in
    /// another process is replaced by its transport's outbox group, once per transport.
    pub(crate) fn outbox_groups(&self, groups: &[&'static str]) -> Vec<&'static str> {
        if self.remote.is_empty() {
            return groups.to_vec();
        }
        let mut out: Vec<&'static str> = Vec::with_capacity(groups.len());
        for group in groups {
            let target = self.remote.get(group).copied().unwrap_or(group);
            if !out.contains(&target) {
                out.push(target);
            }
        }
        out
    }

    pub(crate) fn route(&self, event: TypeId) -> Option<&dyn EventRoute> {
        self.events.get(&event).map(|route| &**route)
    }

    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn_on(task, &self.runtime);
    }
}

/// Where a stored message goes: a durable command's route or an event's.
enum Target<'a> {
    Command(&'a dyn DurableRoute),
    Event(&'a dyn EventRoute),
}

/// A built app: the bus that commands, queries and events go through. Cheap to clone.
///
/// ```ignore
/// let app = App::builder().discover().state(db).build().await?;
/// let id = app.send(PlaceOrder { .. }).await?;
/// ```
#[derive(Clone)]
pub struct App {
    pub(crate) inner: Arc<Core>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("commands", &self.inner.commands.len)
            .field("queries", &self.inner.queries.len)
            .field("events", &self.inner.events.len())
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Starts building an app.
    pub fn builder() -> AppBuilder {
        AppBuilder::default()
    }

    /// Sends a command to its handler and returns the handler's typed result.
    ///
    /// Events the handler publishes reach inline subscribers before this returns; their
    /// failure fails the command. Other subscribers receive them once the command completed.
    pub fn send<C: Command>(
        &self,
        command: C,
    ) -> impl Future<Output = Result<C::Output, DispatchError<C::Error>>> + Send + '_ {
        self.dispatch_command::<C, _, true>(command, NoMeta)
    }

    /// Sends a command with given metadata (correlation id, headers, ...).
    pub fn send_with<C: Command>(
        &self,
        command: C,
        meta: MessageMeta,
    ) -> impl Future<Output = Result<C::Output, DispatchError<C::Error>>> + Send + '_ {
        self.dispatch_command::<C, _, true>(command, meta)
    }

    /// Dispatches a command, through its layers if `LAYERED`. One state machine for every
    /// path: the path without layers and without a store runs in it directly, the others are
    /// boxed (they allocate anyway).
    pub(crate) async fn dispatch_command<C: Command, M: GivenMeta, const LAYERED: bool>(
        &self,
        command: C,
        meta: M,
    ) -> Result<C::Output, DispatchError<C::Error>> {
        if !self.inner.remote_commands.is_empty()
            && let Some(target) = self.inner.remote_commands.get(C::NAME)
        {
            return Box::pin(crate::remote::send::<C>(
                self,
                target.clone(),
                command,
                meta.into_owned(),
            ))
            .await;
        }
        let Some(slot) = self.inner.command_slot::<C>() else {
            return Err(DispatchFailure::NoHandler {
                kind: MessageKind::Command,
                message: type_name::<C>(),
            }
            .into());
        };
        if LAYERED && let Some(service) = &slot.service {
            return Box::pin(self.send_layered(service, slot, command, meta.into_owned())).await;
        }
        if let Some(store) = &self.inner.store {
            if crate::dispatch::in_unit() {
                return Err(DispatchFailure::OutsideUnit {
                    message: type_name::<C>(),
                }
                .into());
            }
            return Box::pin(run_command_in_store(
                self,
                &**store,
                slot,
                command,
                meta.into_owned(),
            ))
            .await;
        }
        let mut ctx = CommandContext::new(self, meta.get());
        let output = {
            let mut future = pin!(None);
            slot.handler.start(command, &mut ctx, future.as_mut());
            poll_fn(|cx| match future.as_mut().as_pin_mut() {
                Some(future) => future.poll(cx).map_err(DispatchError::Handler),
                // `start` always sets the future.
                None => Poll::Ready(Err(DispatchFailure::NoHandler {
                    kind: MessageKind::Command,
                    message: type_name::<C>(),
                }
                .into())),
            })
            .await?
        };
        if let Some(outgoing) = ctx.outgoing {
            // Boxed so the common case (nothing published) keeps a small future; publishing
            // allocates anyway.
            Box::pin(complete(self, outgoing, None))
                .await
                .map_err(DispatchError::widen)?;
        }
        Ok(output)
    }

    async fn send_layered<C: Command>(
        &self,
        service: &DispatchService,
        slot: &CommandSlot<C>,
        command: C,
        meta: MessageMeta,
    ) -> Result<C::Output, DispatchError<C::Error>> {
        let request = self.request(
            MessageKind::Command,
            C::NAME,
            type_name::<C>(),
            slot.handler_name,
            Box::new(command),
            meta,
        );
        let response = service.clone().oneshot(request).await;
        self.response::<C::Output, C::Error>(MessageKind::Command, C::NAME, response)
    }

    /// Sends a query to its handler.
    pub fn query<Q: Query>(
        &self,
        query: Q,
    ) -> impl Future<Output = Result<Q::Output, DispatchError<Q::Error>>> + Send + '_ {
        self.dispatch_query::<Q, _, true>(query, NoMeta)
    }

    /// Sends a query with given metadata.
    pub fn query_with<Q: Query>(
        &self,
        query: Q,
        meta: MessageMeta,
    ) -> impl Future<Output = Result<Q::Output, DispatchError<Q::Error>>> + Send + '_ {
        self.dispatch_query::<Q, _, true>(query, meta)
    }

    /// Dispatches a query, through its layers if `LAYERED` (see `dispatch_command`).
    pub(crate) async fn dispatch_query<Q: Query, M: GivenMeta, const LAYERED: bool>(
        &self,
        query: Q,
        meta: M,
    ) -> Result<Q::Output, DispatchError<Q::Error>> {
        if !self.inner.remote_queries.is_empty()
            && let Some(target) = self.inner.remote_queries.get(Q::NAME)
        {
            return Box::pin(crate::remote::query::<Q>(
                self,
                target.clone(),
                query,
                meta.into_owned(),
            ))
            .await;
        }
        let Some(slot) = self.inner.query_slot::<Q>() else {
            return Err(DispatchFailure::NoHandler {
                kind: MessageKind::Query,
                message: type_name::<Q>(),
            }
            .into());
        };
        if LAYERED && let Some(service) = &slot.service {
            return Box::pin(self.query_layered(service, slot, query, meta.into_owned())).await;
        }
        let ctx = QueryContext {
            app: self,
            meta: DispatchMeta::new(meta.get()),
        };
        let mut future = pin!(None);
        slot.handler.start(query, &ctx, future.as_mut());
        poll_fn(|cx| match future.as_mut().as_pin_mut() {
            Some(future) => future.poll(cx).map_err(DispatchError::Handler),
            // `start` always sets the future.
            None => Poll::Ready(Err(DispatchFailure::NoHandler {
                kind: MessageKind::Query,
                message: type_name::<Q>(),
            }
            .into())),
        })
        .await
    }

    async fn query_layered<Q: Query>(
        &self,
        service: &DispatchService,
        slot: &QuerySlot<Q>,
        query: Q,
        meta: MessageMeta,
    ) -> Result<Q::Output, DispatchError<Q::Error>> {
        let request = self.request(
            MessageKind::Query,
            Q::NAME,
            type_name::<Q>(),
            slot.handler_name,
            Box::new(query),
            meta,
        );
        let response = service.clone().oneshot(request).await;
        self.response::<Q::Output, Q::Error>(MessageKind::Query, Q::NAME, response)
    }

    /// Publishes an event outside any command: inline subscribers run before this returns,
    /// the others afterwards.
    pub async fn publish<E: Event>(&self, event: E) -> Result<(), DispatchError<Infallible>> {
        self.publish_with(event, MessageMeta::new()).await
    }

    /// Publishes an event with given metadata.
    pub async fn publish_with<E: Event>(
        &self,
        event: E,
        meta: MessageMeta,
    ) -> Result<(), DispatchError<Infallible>> {
        let metadata = meta.metadata(self);
        let mut headers = meta.headers;
        self.trace_into(&mut headers);
        let envelope = Envelope {
            metadata,
            key: event.key(),
            occurred_at: self.now(),
            source: self.source(),
            headers,
            payload: event,
        };
        let pending = PendingEvent {
            type_id: TypeId::of::<E>(),
            name: E::NAME,
            message_id: metadata.message_id,
            envelope: Arc::new(envelope),
            stream: None,
            encode: crate::dispatch::encode_pending::<E>,
        };
        match &self.inner.store {
            Some(_) if crate::dispatch::in_unit() => {
                Err(DispatchFailure::OutsideUnit { message: E::NAME }.into())
            }
            Some(store) => publish_in_store(self, &**store, vec![pending]).await,
            None => complete(self, vec![pending], None).await,
        }
    }

    /// Starts the store's relay and background work. Without a store nothing runs in the
    /// background beyond in-process deliveries, and the handle is idle.
    pub fn start(&self) -> RelayHandle {
        let handle = match &self.inner.store {
            Some(store) => store.start(self.clone()),
            None => RelayHandle::idle(),
        };
        crate::remote::start_serving(self, &handle);
        handle
    }

    /// Stores a command to be run by its handler at `at` (or right away, if `at` has passed),
    /// by the relay, in a unit of work with the inbox row: at-least-once, with effects once.
    /// The command must have been declared with `AppBuilder::durable_command`.
    pub async fn schedule<C>(
        &self,
        at: DateTime<Utc>,
        command: C,
    ) -> Result<uuid::Uuid, DispatchError<Infallible>>
    where
        C: Command + serde::Serialize + serde::de::DeserializeOwned,
    {
        let Some(store) = &self.inner.store else {
            return Err(DispatchFailure::NotDurable {
                command: type_name::<C>(),
                reason: NO_STORE,
            }
            .into());
        };
        let message = durable_message(self, MessageMeta::new(), Some(at), &command)?;
        let message_id = message.envelope.metadata.message_id;
        let mut uow = store.begin().await?;
        uow.append(vec![message]).await?;
        uow.commit().await?;
        store.committed();
        Ok(message_id)
    }

    /// The shared value of type `T` registered with `.state(..)` on the builder, for code
    /// that is not an extracting handler (sagas, projections).
    pub fn state<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.inner.resources.get::<T>()
    }

    /// Upcasts a stored envelope to its event's current version through the registered
    /// upcasters (unchanged if none applies).
    pub fn upcast(&self, raw: RawEnvelope) -> Result<RawEnvelope, UpcastError> {
        self.inner.upcasters.upcast(raw)
    }

    /// The state cache of aggregate `A`, if it has one.
    pub(crate) fn state_cache<A: Aggregate>(
        &self,
    ) -> Option<Arc<dyn crate::aggregate::CachedStates<A>>> {
        self.inner
            .state_caches
            .get(&TypeId::of::<A>())?
            .downcast_ref::<Arc<dyn crate::aggregate::CachedStates<A>>>()
            .cloned()
    }

    /// Loads aggregate `A` with `id` as it is now, outside any command (for queries).
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, AggregateError> {
        self.read_aggregate(id, None).await
    }

    /// Loads aggregate `A` with `id` as it was at `at`: the events recorded up to then.
    pub async fn load_as_of<A: Aggregate>(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<Loaded<A>, AggregateError> {
        self.read_aggregate(id, Some(at)).await
    }

    /// Appends `events` to aggregate `A` with `id` outside any command, in a unit of work of
    /// its own, and publishes them like a command's (tests' "given" events, imports). `meta`
    /// gives the flow's ids. Returns the new stream version.
    pub async fn append<A: Aggregate>(
        &self,
        id: &str,
        events: Vec<A::Event>,
        meta: MessageMeta,
    ) -> Result<u64, DispatchError<AggregateError>> {
        let Some(store) = &self.inner.store else {
            return Err(DispatchError::Handler(AggregateError::NoStore));
        };
        let mut uow = store.begin().await?;
        let mut cached = Vec::new();
        let outcome = async {
            let mut loaded = crate::aggregate::load::<A>(self, &mut *uow, id, None, Source::Store)
                .await
                .map_err(DispatchError::Handler)?;
            for event in events {
                loaded.emit(event);
            }
            let mut outgoing = Vec::new();
            let version = crate::aggregate::save(
                self,
                meta.metadata(self),
                &mut *uow,
                &mut outgoing,
                &mut cached,
                loaded,
            )
            .await
            .map_err(DispatchError::Handler)?;
            complete(self, outgoing, Some(&mut *uow))
                .await
                .map_err(DispatchError::widen)?;
            Ok::<u64, DispatchError<AggregateError>>(version)
        }
        .await;
        match outcome {
            Ok(version) => {
                uow.commit().await?;
                store.committed();
                cached.into_iter().for_each(CacheUpdate::committed);
                Ok(version)
            }
            Err(error) => {
                if let Err(rollback) = uow.rollback().await {
                    tracing::warn!(target: "inseam::aggregate", error = &rollback as &dyn std::error::Error, "rollback failed");
                }
                Err(error)
            }
        }
    }

    /// The events of `stream` after version `after`, in order, upcast to their current
    /// versions (for tools and tests; handlers load aggregates).
    pub async fn read_stream(
        &self,
        stream: &str,
        after: u64,
    ) -> Result<Vec<crate::store::StoredEvent>, AggregateError> {
        let mut uow = self.begin_read().await?;
        let read = uow.read_stream(stream, after, None).await;
        end_read(uow).await;
        read?
            .into_iter()
            .map(|mut stored| {
                let version = stored.version;
                stored.envelope =
                    self.upcast(stored.envelope)
                        .map_err(|source| AggregateError::Upcast {
                            stream: stream.to_owned(),
                            version,
                            source,
                        })?;
                Ok(stored)
            })
            .collect()
    }

    async fn read_aggregate<A: Aggregate>(
        &self,
        id: &str,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Loaded<A>, AggregateError> {
        let mut uow = self.begin_read().await?;
        let loaded = crate::aggregate::load(self, &mut *uow, id, as_of, Source::Store).await;
        end_read(uow).await;
        loaded
    }

    /// A unit of work for reading only; end it with [`end_read`].
    async fn begin_read(&self) -> Result<Box<dyn UnitOfWork>, AggregateError> {
        let Some(store) = &self.inner.store else {
            return Err(AggregateError::NoStore);
        };
        Ok(store.begin().await?)
    }

    /// Everything the app's registrations say about its messages: render it with
    /// [`Catalog::markdown`], [`Catalog::asyncapi_yaml`] or [`Catalog::mermaid`].
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// Whether `name` is the name of a command declared durable (for tools that show flows).
    pub fn is_durable_command(&self, name: &str) -> bool {
        self.inner
            .durable
            .contains_key(format!("command:{name}").as_str())
    }

    /// Where this process's groups run, and how the others are reached.
    pub fn routing(&self) -> &crate::routing::Routing {
        &self.inner.routing
    }

    /// The transport named `name`, if the app has one.
    pub fn transport(&self, name: &str) -> Option<&Arc<dyn crate::transport::Transport>> {
        self.inner.transports.get(name)
    }

    /// What this process consumes from transports: every group it runs, with the channels
    /// the group reads (its events' names, or a durable command's name), from each transport
    /// another process may publish them on. Empty when one process runs everything.
    pub fn inbound(&self) -> Vec<Inbound> {
        let mut inbound = Vec::new();
        for name in self.inner.routing.inbound_transports() {
            let Some(transport) = self.inner.transports.get(name) else {
                continue;
            };
            for &group in &self.inner.all_groups {
                if self.inner.remote.contains_key(group) {
                    continue;
                }
                let channels: Vec<String> = match group.strip_prefix("command:") {
                    Some(command) => vec![command.to_owned()],
                    None => self
                        .group_events(group)
                        .into_iter()
                        .map(|(event, _)| event.to_owned())
                        .collect(),
                };
                if !channels.is_empty() {
                    inbound.push(Inbound {
                        group,
                        channels,
                        transport: transport.clone(),
                    });
                }
            }
        }
        inbound
    }

    /// The transport an outbox group (`transport:<name>`) publishes to, if `group` is one.
    pub fn outbox_transport(&self, group: &str) -> Option<&Arc<dyn crate::transport::Transport>> {
        let name = group.strip_prefix(crate::routing::OUTBOX_PREFIX)?;
        self.inner.transports.get(name)
    }

    /// The channels this process may publish to transport `name`: the events and durable
    /// commands of the groups reached over it.
    pub fn outbound_channels(&self, name: &str) -> Vec<String> {
        let mut channels = Vec::new();
        for (&group, _) in
            self.inner.remote.iter().filter(|(_, outbox)| {
                outbox.strip_prefix(crate::routing::OUTBOX_PREFIX) == Some(name)
            })
        {
            match group.strip_prefix("command:") {
                Some(command) => channels.push(command.to_owned()),
                None => channels.extend(
                    self.group_events(group)
                        .into_iter()
                        .map(|(event, _)| event.to_owned()),
                ),
            }
        }
        channels.sort_unstable();
        channels.dedup();
        channels
    }

    /// Every group with a durable subscriber, sorted.
    pub fn groups(&self) -> &[&'static str] {
        &self.inner.groups
    }

    /// Delivers a stored event to the subscriber of `group`, inside `uow`: what the store's
    /// relay calls for each outbox row. Events the subscriber publishes are written to the
    /// outbox in the same unit of work.
    pub async fn deliver(
        &self,
        group: &str,
        envelope: &RawEnvelope,
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), DeliveryFailure> {
        self.deliver_as(group, envelope, uow, false).await
    }

    /// Replays a stored event to the subscriber of `group` inside `uow`, to rebuild a read
    /// model: like [`deliver`](Self::deliver), but the subscriber sees `ctx.is_replay()` and
    /// what it publishes is dropped.
    pub async fn replay(
        &self,
        group: &str,
        envelope: &RawEnvelope,
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), DeliveryFailure> {
        self.deliver_as(group, envelope, uow, true).await
    }

    /// The `(name, version)` of every event type with a subscriber, sorted.
    pub fn events(&self) -> Vec<(&'static str, u32)> {
        let mut events: Vec<(&'static str, u32)> = self.inner.by_name.keys().copied().collect();
        events.sort_unstable();
        events
    }

    /// The `(name, version)` of every event `group` subscribes to, sorted.
    pub fn group_events(&self, group: &str) -> Vec<(&'static str, u32)> {
        let mut events: Vec<(&'static str, u32)> = self
            .inner
            .events
            .values()
            .filter(|route| route.groups().iter().any(|(g, _)| *g == group))
            .map(|route| (route.event_name(), route.event_version()))
            .collect();
        events.sort_unstable();
        events
    }

    /// Checks that a stored message would reach the subscriber of `group` as its current type:
    /// routed, upcast and decoded as [`deliver`](Self::deliver) does, without running the
    /// handler or touching a store. What a tool that edits a stored payload (a dead letter's)
    /// asks before accepting it.
    ///
    /// ```
    /// # use inseam_core::{App, RawEnvelope};
    /// # fn check(app: &App, raw: &RawEnvelope) {
    /// match app.check_decodes("ledger", raw) {
    ///     Ok(()) => { /* the ledger's subscriber can read it */ }
    ///     Err(failure) => eprintln!("{failure}"),
    /// }
    /// # }
    /// ```
    pub fn check_decodes(
        &self,
        group: &str,
        envelope: &RawEnvelope,
    ) -> Result<(), DeliveryFailure> {
        match self.delivery_target(group, envelope)? {
            (Target::Command(route), _) => route.check(self, envelope),
            (Target::Event(route), envelope) => route.check_raw(group, &envelope),
        }
    }

    async fn deliver_as(
        &self,
        group: &str,
        envelope: &RawEnvelope,
        uow: &mut dyn UnitOfWork,
        replay: bool,
    ) -> Result<(), DeliveryFailure> {
        let delivery = async {
            match self.delivery_target(group, envelope)? {
                (Target::Command(route), _) => route.deliver(self, envelope, uow).await,
                (Target::Event(route), envelope) => {
                    route.deliver_raw(self, group, &envelope, uow, replay).await
                }
            }
        };
        // A span per delivery, as `TraceLayer` opens one per dispatch (a delivery from the
        // store runs in the relay's unit of work, which no layer can wrap): the parent of
        // what its subscriber does, and, with trace propagation, a child of the span that
        // published the message.
        let span = tracing::info_span!(
            target: "inseam::relay",
            "deliver",
            group,
            message_name = %envelope.name,
            message_id = %envelope.metadata.message_id,
            correlation_id = %envelope.metadata.correlation_id,
        );
        if let Some(propagation) = &self.inner.propagation {
            propagation.set_parent(&span, &envelope.headers);
        }
        delivery.instrument(span).await
    }

    /// Writes the current trace context into `headers`, when the app carries trace context.
    #[inline]
    pub(crate) fn trace_into(&self, headers: &mut crate::envelope::Headers) {
        if let Some(propagation) = &self.inner.propagation {
            propagation.inject(headers);
        }
    }

    /// Where a stored message for `group` goes, with the envelope as its route reads it: an
    /// event's upcast to the version its route decodes, a command's as stored.
    fn delivery_target<'a, 'e>(
        &'a self,
        group: &str,
        envelope: &'e RawEnvelope,
    ) -> Result<(Target<'a>, Cow<'e, RawEnvelope>), DeliveryFailure> {
        if let Some(route) = self.inner.durable.get(group) {
            return Ok((Target::Command(&**route), Cow::Borrowed(envelope)));
        }
        let envelope = if self.inner.upcasters.has(&envelope.name, envelope.version) {
            Cow::Owned(
                self.upcast(envelope.clone())
                    .map_err(|source| DeliveryFailure::Upcast { source })?,
            )
        } else {
            Cow::Borrowed(envelope)
        };
        let route = self
            .inner
            .by_name
            .get(&(envelope.name.as_str(), envelope.version))
            .and_then(|id| self.inner.route(*id));
        match route {
            Some(route) => Ok((Target::Event(route), envelope)),
            None => Err(DeliveryFailure::Unroutable {
                group: group.to_owned(),
                name: envelope.name.clone(),
                version: envelope.version,
            }),
        }
    }

    /// Waits until every background delivery started so far, and every one those start, has
    /// finished.
    pub async fn wait_idle(&self) {
        let tasks = &self.inner.tasks;
        tasks.close();
        tasks.wait().await;
        tasks.reopen();
    }

    /// Delivery counters.
    pub fn stats(&self) -> Stats {
        let counters = &self.inner.stats;
        Stats {
            delivered: counters.delivered.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            panicked: counters.panicked.load(Ordering::Relaxed),
        }
    }

    /// The groups subscribed to each event: `(event name, group, subscriber)`.
    pub fn subscriptions(&self) -> Vec<(&'static str, &'static str, &'static str)> {
        let mut all = Vec::new();
        for route in self.inner.events.values() {
            let name = route.event_name();
            all.extend(
                route
                    .groups()
                    .into_iter()
                    .map(|(group, handler)| (name, group, handler)),
            );
        }
        all.sort_unstable();
        all
    }

    pub(crate) fn next_id(&self) -> Uuid {
        self.inner.ids.next_id()
    }

    /// Now, by the app's clock (the system's unless the builder was given another).
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    pub(crate) fn source(&self) -> Arc<str> {
        self.inner.source.clone()
    }

    fn request(
        &self,
        kind: MessageKind,
        name: &'static str,
        type_name: &'static str,
        handler: &'static str,
        message: Box<dyn Any + Send>,
        meta: MessageMeta,
    ) -> DispatchRequest {
        DispatchRequest {
            app: self.clone(),
            kind,
            name,
            type_name,
            handler,
            group: None,
            message,
            meta,
        }
    }

    fn response<O: 'static, E: std::error::Error + Send + Sync + 'static>(
        &self,
        kind: MessageKind,
        name: &'static str,
        response: Result<DispatchResponse, BoxError>,
    ) -> Result<O, DispatchError<E>> {
        match response {
            Ok(DispatchResponse(output)) => output.downcast::<O>().map(|o| *o).map_err(|_| {
                DispatchFailure::Middleware {
                    kind,
                    message: name,
                    source: format!("a layer replaced the response of {kind} `{name}`").into(),
                }
                .into()
            }),
            Err(error) => Err(classify(kind, name, error)),
        }
    }
}

/// The metadata a dispatch was given: none (`send`, `query`) or the caller's (`send_with`,
/// `query_with`). Without any, the dispatch future holds none either.
pub(crate) trait GivenMeta: Send + Sync + 'static {
    fn get(&self) -> &MessageMeta;
    fn into_owned(self) -> MessageMeta;
}

/// No metadata given: fresh ids on first use.
struct NoMeta;

impl GivenMeta for NoMeta {
    #[inline]
    fn get(&self) -> &MessageMeta {
        &NO_META
    }

    fn into_owned(self) -> MessageMeta {
        MessageMeta::new()
    }
}

impl GivenMeta for MessageMeta {
    #[inline]
    fn get(&self) -> &MessageMeta {
        self
    }

    fn into_owned(self) -> MessageMeta {
        self
    }
}

/// Ends a read-only unit of work (rolled back: it wrote nothing).
async fn end_read(uow: Box<dyn UnitOfWork>) {
    if let Err(error) = uow.rollback().await {
        tracing::debug!(target: "inseam::aggregate", error = &error as &dyn std::error::Error, "ending a read-only transaction failed");
    }
}

/// A group this process consumes from a transport.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The group.
    pub group: &'static str,
    /// The channels it reads.
    pub channels: Vec<String>,
    /// The transport it reads them from.
    pub transport: Arc<dyn crate::transport::Transport>,
}
