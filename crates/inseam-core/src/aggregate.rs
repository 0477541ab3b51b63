//! Event sourcing: aggregates folded from their events, appended with optimistic concurrency.
//!
//! An [`Aggregate`] is state rebuilt by applying its events in order. A command handler loads
//! one (`ctx.load::<Order>(id)`), decides what happens by emitting events, and saves it
//! (`ctx.save(order)`). The events are appended to the aggregate's stream in the command's unit
//! of work, and they *are* outbox rows: subscribers receive them like any published event, and
//! nothing can be stored without being published or published without being stored. A second
//! writer at the same stream version fails with [`Conflict`](crate::Conflict) and nothing of its
//! command is committed; the `RetryOnConflict` layer runs such commands again on fresh state.

use std::num::NonZeroUsize;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::context::{PendingEvent, StreamSlot, pending_keyed};
use crate::envelope::{Metadata, RawEnvelope, WireError};
use crate::message::Event;
use crate::store::{Snapshot, StoreError, StreamPosition, UnitOfWork};
use crate::upcast::UpcastError;

/// State folded from events.
///
/// ```ignore
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// struct Order { placed: bool, lines: u32 }
///
/// impl Aggregate for Order {
///     const TYPE: &'static str = "order";
///     type Event = OrderEvent;          // an enum with #[derive(EventSet)]
///     const SNAPSHOT_EVERY: u64 = 100;
///
///     fn apply(&mut self, event: &OrderEvent) {
///         match event {
///             OrderEvent::Placed(_) => self.placed = true,
///             OrderEvent::LineAdded(_) => self.lines += 1,
///         }
///     }
/// }
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stream category: the aggregate with id `42` lives in stream `<TYPE>-42`.
    const TYPE: &'static str;
    /// Take a snapshot every this many events (0: never).
    const SNAPSHOT_EVERY: u64 = 0;
    /// The schema version of the snapshots: bump it when the state's serialized form changes,
    /// and older snapshots are ignored (the stream is replayed instead).
    const SNAPSHOT_VERSION: u32 = 1;
    /// The events of this aggregate.
    type Event: EventSet;

    /// Folds one event into the state. It cannot fail: an event is a fact.
    fn apply(&mut self, event: &Self::Event);
}

/// The events of an aggregate: usually an enum with one variant per event type, with
/// `#[derive(EventSet)]`. A single event type is an event set too.
pub trait EventSet: Send + Sync + Sized + 'static {
    /// Hands the event to `stage`, typed ([`Stage::event`], exactly once).
    fn stage(self, stage: &mut Stage<'_>);

    /// Decodes a stored envelope (already upcast to the current version) into the set.
    fn decode(raw: &RawEnvelope) -> Result<Self, WireError>;

    /// The `(name, version)` of every event of the set.
    fn events() -> Vec<(&'static str, u32)>;

    /// Calls `visitor` with every event type of the set.
    fn visit<V: crate::saga::EventVisitor>(visitor: &mut V);
}

impl<E: Event> EventSet for E {
    fn stage(self, stage: &mut Stage<'_>) {
        stage.event(self);
    }

    fn decode(raw: &RawEnvelope) -> Result<Self, WireError> {
        raw.decode::<E>().map(|envelope| envelope.payload)
    }

    fn events() -> Vec<(&'static str, u32)> {
        vec![(E::NAME, E::VERSION)]
    }

    fn visit<V: crate::saga::EventVisitor>(visitor: &mut V) {
        visitor.visit::<E>();
    }
}

/// Where an aggregate's new event is staged, at its position in the stream. An event without a
/// key of its own is keyed by the aggregate's id.
pub struct Stage<'a> {
    app: &'a App,
    id: &'a str,
    parent: Metadata,
    position: Option<StreamPosition>,
    outgoing: &'a mut Vec<PendingEvent>,
}

impl std::fmt::Debug for Stage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Stage<'_> {
    /// Stages `event` at this position. A second call stages nothing: one event per position.
    pub fn event<E: Event>(&mut self, event: E) {
        let Some(position) = self.position.take() else {
            tracing::error!(target: "inseam::aggregate", event = E::NAME, "an event set staged two events for one position; the second was dropped");
            return;
        };
        // Keyed by the aggregate unless the event has a key of its own: a group receives one
        // aggregate's events in order.
        let mut pending = pending_keyed(self.app, event, self.parent, Some(self.id));
        pending.stream = Some(StreamSlot { position });
        self.outgoing.push(pending);
    }
}

/// Why an aggregate could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// Event sourcing needs a store.
    #[error("aggregates need a store: give the app one with `.store(..)` on the app builder")]
    NoStore,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event could not be upcast to its current version.
    #[error("event {version} of stream `{stream}` could not be upcast")]
    Upcast {
        /// The stream.
        stream: String,
        /// The event's version in the stream.
        version: u64,
        /// The upcaster's error.
        #[source]
        source: UpcastError,
    },
    /// A stored event does not decode as one of the aggregate's events.
    #[error("event {version} of stream `{stream}` does not decode")]
    Decode {
        /// The stream.
        stream: String,
        /// The event's version in the stream.
        version: u64,
        /// Why.
        #[source]
        source: WireError,
    },
}

/// An aggregate loaded from its stream, with the events emitted since.
#[derive(Debug)]
pub struct Loaded<A: Aggregate> {
    id: String,
    stream: String,
    state: A,
    version: u64,
    emitted: Vec<A::Event>,
    replayed: u64,
}

impl<A: Aggregate> Loaded<A> {
    /// The aggregate's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its stream, `<TYPE>-<id>`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream version it was loaded at (0: no events yet).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the stream had events when loaded.
    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// The state, with the emitted events applied.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// How many events were applied on load (after the snapshot, if one was used).
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// The events emitted since loading, in order.
    pub fn emitted(&self) -> &[A::Event] {
        &self.emitted
    }

    /// Emits an event: applies it to the state at once and stages it for `save`.
    pub fn emit(&mut self, event: impl Into<A::Event>) {
        let event = event.into();
        self.state.apply(&event);
        self.emitted.push(event);
    }

    /// The state, giving up the emitted events.
    pub fn into_state(self) -> A {
        self.state
    }
}

impl<A: Aggregate> Deref for Loaded<A> {
    type Target = A;

    fn deref(&self) -> &A {
        &self.state
    }
}

/// The stream of aggregate `A` with id `id`.
pub fn stream_of<A: Aggregate>(id: &str) -> String {
    format!("{}-{id}", A::TYPE)
}

/// Where [`load`] may find a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The aggregate's cache, if it has one and holds the stream; else the store.
    CacheOrStore,
    /// The store.
    Store,
}

/// Loads `A` with `id` in `uow`: the cached state, if `from` allows and there is one; else the
/// latest usable snapshot, then the events after it; with
/// `as_of`, the state as it was at that instant (events only).
pub(crate) async fn load<A: Aggregate>(
    app: &App,
    uow: &mut dyn UnitOfWork,
    id: &str,
    as_of: Option<DateTime<Utc>>,
    from: Source,
) -> Result<Loaded<A>, AggregateError> {
    let stream = stream_of::<A>(id);
    if from == Source::CacheOrStore
        && as_of.is_none()
        && let Some(cache) = app.state_cache::<A>()
        && let Some((version, state)) = cache.get(&stream)
    {
        return Ok(Loaded {
            id: id.to_owned(),
            stream,
            state,
            version,
            emitted: Vec::new(),
            replayed: 0,
        });
    }
    let mut state = A::default();
    let mut version = 0;
    if A::SNAPSHOT_EVERY > 0
        && as_of.is_none()
        && let Some(snapshot) = uow.load_snapshot(&stream).await?
    {
        if snapshot.schema != A::SNAPSHOT_VERSION {
            tracing::debug!(target: "inseam::aggregate", stream, schema = snapshot.schema, "snapshot of another schema version ignored");
        } else {
            match serde_json::from_slice::<A>(&snapshot.state) {
                Ok(restored) => {
                    state = restored;
                    version = snapshot.version;
                }
                Err(error) => {
                    tracing::warn!(target: "inseam::aggregate", stream, error = &error as &dyn std::error::Error, "snapshot does not deserialize; replaying the stream");
                }
            }
        }
    }
    let mut replayed = 0;
    for stored in uow.read_stream(&stream, version, as_of).await? {
        let raw = app
            .upcast(stored.envelope)
            .map_err(|source| AggregateError::Upcast {
                stream: stream.clone(),
                version: stored.version,
                source,
            })?;
        let event = A::Event::decode(&raw).map_err(|source| AggregateError::Decode {
            stream: stream.clone(),
            version: stored.version,
            source,
        })?;
        state.apply(&event);
        version = stored.version;
        replayed += 1;
    }
    Ok(Loaded {
        id: id.to_owned(),
        stream,
        state,
        version,
        emitted: Vec::new(),
        replayed,
    })
}

/// Stages the emitted events of `aggregate` after its loaded version, and writes a snapshot
/// in `uow` when the new version crosses a multiple of `SNAPSHOT_EVERY`. Returns the new
/// version.
pub(crate) async fn save<A: Aggregate>(
    app: &App,
    parent: Metadata,
    uow: &mut dyn UnitOfWork,
    outgoing: &mut Vec<PendingEvent>,
    cached: &mut Vec<CacheUpdate>,
    aggregate: Loaded<A>,
) -> Result<u64, AggregateError> {
    let Loaded {
        id,
        stream,
        state,
        version: base,
        emitted,
        ..
    } = aggregate;
    let mut version = base;
    for event in emitted {
        version += 1;
        let mut stage = Stage {
            app,
            id: &id,
            parent,
            position: Some(StreamPosition {
                stream: stream.clone(),
                version,
            }),
            outgoing: &mut *outgoing,
        };
        event.stage(&mut stage);
    }
    let every = A::SNAPSHOT_EVERY;
    if every > 0 && version / every > base / every {
        match serde_json::to_vec(&state) {
            Ok(bytes) => {
                uow.save_snapshot(
                    &stream,
                    Snapshot {
                        version,
                        schema: A::SNAPSHOT_VERSION,
                        state: bytes,
                    },
                )
                .await?;
            }
            Err(error) => {
                tracing::warn!(target: "inseam::aggregate", stream, error = &error as &dyn std::error::Error, "state does not serialize; no snapshot taken");
            }
        }
    }
    if version > base
        && let Some(cache) = app.state_cache::<A>()
    {
        cached.push(CacheUpdate(Some(Box::new(PendingState {
            generation: cache.generation(&stream),
            cache,
            stream,
            version,
            state,
        }))));
    }
    Ok(version)
}

/// The last committed state of each of the most recently used streams of one aggregate type,
/// kept in memory by `AppBuilder::cache_aggregate` so that loading it reads nothing.
pub(crate) struct StateCache<A> {
    inner: Mutex<Cached<A>>,
}

struct Cached<A> {
    states: lru::LruCache<String, (u64, A)>,
    /// Per bucket of streams, bumped whenever one of them leaves the cache (forgotten, or
    /// pushed out by capacity). A state committed while its bucket changed is not inserted
    /// afresh: a later version may have been committed, cached and pushed out meanwhile.
    generations: Box<[u64; GENERATION_BUCKETS]>,
    buckets: std::hash::RandomState,
}

/// Buckets of [`Cached::generations`]: enough that streams leaving rarely hold back others.
const GENERATION_BUCKETS: usize = 1024;

impl<A> Cached<A> {
    fn generation(&mut self, stream: &str) -> &mut u64 {
        use std::hash::BuildHasher as _;
        let bucket = self.buckets.hash_one(stream) as usize % GENERATION_BUCKETS;
        &mut self.generations[bucket]
    }

    fn left(&mut self, stream: &str) {
        *self.generation(stream) += 1;
    }
}

impl<A: Aggregate + Clone> StateCache<A> {
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            inner: Mutex::new(Cached {
                states: lru::LruCache::new(
                    NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
                ),
                generations: Box::new([0; GENERATION_BUCKETS]),
                buckets: std::hash::RandomState::new(),
            }),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Cached<A>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`StateCache`] to code generic over any aggregate (cloning needs `A: Clone`, which only
/// aggregates with a cache must be).
pub(crate) trait CachedStates<A>: Send + Sync {
    /// The cached state of `stream` and its version.
    fn get(&self, stream: &str) -> Option<(u64, A)>;
    /// The current generation of `stream`, to give to `put` with a state about to be committed.
    fn generation(&self, stream: &str) -> u64;
    /// Keeps `state` as `stream` at `version`, unless a later version is kept already, or the
    /// stream is not kept and a stream of its bucket left the cache since `generation`.
    fn put(&self, stream: String, version: u64, state: A, generation: u64);
    /// Forgets `stream`.
    fn evict(&self, stream: &str);
}

impl<A: Aggregate + Clone> CachedStates<A> for StateCache<A> {
    fn get(&self, stream: &str) -> Option<(u64, A)> {
        self.inner().states.get(stream).cloned()
    }

    fn generation(&self, stream: &str) -> u64 {
        *self.inner().generation(stream)
    }

    fn put(&self, stream: String, version: u64, state: A, generation: u64) {
        let mut inner = self.inner();
        let unchanged = *inner.generation(&stream) == generation;
        match inner.states.get_mut(&stream) {
            Some(kept) if kept.0 >= version => {}
            Some(kept) => *kept = (version, state),
            None if !unchanged => {}
            None => {
                if let Some((pushed_out, _)) = inner.states.push(stream, (version, state)) {
                    inner.left(&pushed_out);
                }
            }
        }
    }

    fn evict(&self, stream: &str) {
        let mut inner = self.inner();
        if inner.states.pop(stream).is_some() {
            inner.left(stream);
        }
    }
}

/// The state an aggregate is saved with, for its cache: kept when the unit of work commits
/// ([`CacheUpdate::committed`]); dropped otherwise, which forgets the stream, since whether
/// and what another writer committed is then unknown.
pub(crate) struct CacheUpdate(Option<Box<dyn Pending>>);

impl std::fmt::Debug for CacheUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheUpdate").finish_non_exhaustive()
    }
}

trait Pending: Send {
    fn keep(self: Box<Self>);
    fn forget(&self);
}

struct PendingState<A> {
    cache: Arc<dyn CachedStates<A>>,
    stream: String,
    version: u64,
    state: A,
    generation: u64,
}

impl<A: Aggregate> Pending for PendingState<A> {
    fn keep(self: Box<Self>) {
        let PendingState {
            cache,
            stream,
            version,
            state,
            generation,
        } = *self;
        cache.put(stream, version, state, generation);
    }

    fn forget(&self) {
        self.cache.evict(&self.stream);
    }
}

impl CacheUpdate {
    /// The unit of work committed: keep the state.
    pub(crate) fn committed(mut self) {
        if let Some(pending) = self.0.take() {
            pending.keep();
        }
    }
}

impl Drop for CacheUpdate {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            pending.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::message::Event;

    #[derive(Debug, Clone, serde::Serialize, Deserialize)]
    struct Added(u32);

    impl Event for Added {
        const NAME: &'static str = "test.added";
        const VERSION: u32 = 1;
        type Codec = crate::codec::Json;
    }

    #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
    struct Counter(u32);

    impl Aggregate for Counter {
        const TYPE: &'static str = "counter";
        type Event = Added;

        fn apply(&mut self, event: &Added) {
            self.0 += event.0;
        }
    }

    fn kept(cache: &StateCache<Counter>, stream: &str) -> Option<(u64, u32)> {
        cache.get(stream).map(|(version, state)| (version, state.0))
    }

    #[test]
    fn a_later_version_is_never_replaced_by_an_earlier_one() {
        let cache = StateCache::<Counter>::new(10);
        let generation = cache.generation("counter-a");
        cache.put("counter-a".into(), 2, Counter(20), generation);
        cache.put("counter-a".into(), 1, Counter(10), generation);
        assert_eq!(kept(&cache, "counter-a"), Some((2, 20)));
        cache.put("counter-a".into(), 3, Counter(30), generation);
        assert_eq!(kept(&cache, "counter-a"), Some((3, 30)));
    }

    #[test]
    fn a_state_committed_while_its_stream_left_is_not_inserted_afresh() {
        let cache = StateCache::<Counter>::new(10);
        let before = cache.generation("counter-a");
        cache.put("counter-a".into(), 7, Counter(7), before);
        // A later version was cached, then forgotten, while an earlier commit was in flight.
        let in_flight = cache.generation("counter-a");
        cache.evict("counter-a");
        cache.put("counter-a".into(), 6, Counter(6), in_flight);
        assert_eq!(kept(&cache, "counter-a"), None);
        // Forgetting a stream that is not kept changes nothing.
        let now = cache.generation("counter-a");
        cache.evict("counter-a");
        cache.put("counter-a".into(), 8, Counter(8), now);
        assert_eq!(kept(&cache, "counter-a"), Some((8, 8)));
    }

    #[test]
    fn a_stream_pushed_out_by_capacity_counts_as_leaving() {
        let cache = StateCache::<Counter>::new(1);
        let start = cache.generation("counter-a");
        cache.put("counter-a".into(), 1, Counter(1), start);
        let in_flight = cache.generation("counter-a");
        let other = cache.generation("counter-b");
        cache.put("counter-b".into(), 1, Counter(1), other);
        assert_eq!(kept(&cache, "counter-a"), None, "capacity 1");
        cache.put("counter-a".into(), 1, Counter(1), in_flight);
        assert_eq!(kept(&cache, "counter-a"), None);
        assert_eq!(kept(&cache, "counter-b"), Some((1, 1)));
    }

    #[test]
    fn streams_leaving_rarely_hold_back_others() {
        let cache = StateCache::<Counter>::new(10_000);
        let generations: Vec<u64> = (0..100)
            .map(|i| cache.generation(&format!("counter-{i}")))
            .collect();
        for i in 100..108 {
            let stream = format!("counter-{i}");
            cache.put(stream.clone(), 1, Counter(1), cache.generation(&stream));
            cache.evict(&stream);
        }
        let kept_streams = (0..100)
            .filter(|i| {
                let stream = format!("counter-{i}");
                cache.put(stream.clone(), 1, Counter(1), generations[*i]);
                kept(&cache, &stream).is_some()
            })
            .count();
        // 8 streams left: at most 8 of 1,024 buckets changed.
        assert!(kept_streams >= 80, "{kept_streams} of 100 kept");
    }
}
