//! The app builder: registrations, state, layers, a store and the rest of an app's
//! configuration, gathered before `build()` checks them together and assembles the [`App`].

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tower_layer::Layer;
use tower_service::Service;

use crate::app::{App, Core, Counters, Slots, TypeMap, freeze};
use crate::catalog::{AggregateDoc, EventRef};
use crate::check::{Checked, check};
use crate::clock::{Clock, IdGenerator, SystemClock, V7Ids};
use crate::dispatch::{DurableCommand, DurableRoute, durable_group_name};
use crate::error::{BoxError, BuildError};
use crate::extract::Resources;
use crate::handler::Handler;
use crate::message::{Command, Event, MessageKind, Query};
use crate::middleware::{DispatchRequest, DispatchResponse, DispatchService, LayerScope, Layers};
use crate::registry::{Registration, Wiring, discovered};
use crate::routing::Routing;
use crate::store::Store;
use crate::transport::Transport;
use crate::upcast::Upcasters;

/// Builds an [`App`]: registrations, state, layers; `build()` validates the wiring.
pub struct AppBuilder {
    registrations: Vec<Registration>,
    discover: bool,
    resources: Resources,
    layers: Layers,
    source: String,
    store: Option<Arc<dyn Store>>,
    keep_unsubscribed: bool,
    propagation: Option<Arc<dyn crate::propagation::TracePropagation>>,
    durable: Vec<(&'static str, Box<dyn DurableRoute>)>,
    upcasters: Upcasters,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
    /// Declared aggregates with their events: for the upcaster check and the catalog.
    aggregates: Vec<AggregateDoc>,
    state_caches: TypeMap<Box<dyn Any + Send + Sync>>,
    routing: Routing,
    transports: Vec<Arc<dyn Transport>>,
    request_timeout: std::time::Duration,
}

impl Default for AppBuilder {
    fn default() -> Self {
        AppBuilder {
            registrations: Vec::new(),
            discover: false,
            resources: Resources::default(),
            layers: Layers::default(),
            source: "inseam".to_owned(),
            store: None,
            keep_unsubscribed: false,
            propagation: None,
            durable: Vec::new(),
            upcasters: Upcasters::default(),
            clock: Arc::new(SystemClock),
            ids: Arc::new(V7Ids),
            aggregates: Vec::new(),
            state_caches: TypeMap::default(),
            routing: Routing::single(),
            transports: Vec::new(),
            request_timeout: std::time::Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppBuilder")
            .field("registrations", &self.registrations.len())
            .field("discover", &self.discover)
            .field("resources", &self.resources)
            .field("layers", &self.layers)
            .field("source", &self.source)
            .field("store", &self.store)
            .field("keep_unsubscribed", &self.keep_unsubscribed)
            .field("trace_propagation", &self.propagation.is_some())
            .field("routing", &self.routing)
            .field("transports", &self.transports)
            .finish()
    }
}

impl AppBuilder {
    /// Adds every handler and message declaration linked into the binary (registered by the
    /// derive and handler macros). A crate whose items nothing references is not linked: add
    /// `use that_crate as _;` to the binary.
    pub fn discover(mut self) -> Self {
        self.discover = true;
        self
    }

    /// Registers a handler explicitly: `.handler::<place_order>()` for a function marked with
    /// a handler macro.
    pub fn handler<H: Handler>(mut self) -> Self {
        self.registrations.push(H::REGISTRATION);
        self
    }

    /// Says which process runs which groups (see [`Routing`]); by default one process runs
    /// everything. [`Routing::from_env`] reads it from the file named by `INSEAM_CONFIG`.
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Adds a transport the routing may name (by its [`Transport::name`]).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transports.push(Arc::new(transport));
        self
    }

    /// How long `send` and `query` wait for another process's answer (10 s by default).
    pub fn request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Adds a shared transport the routing may name.
    pub fn transport_arc(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transports.push(transport);
        self
    }

    /// Adds a registration record.
    pub fn register(mut self, registration: Registration) -> Self {
        self.registrations.push(registration);
        self
    }

    /// Declares a command: `build()` then fails unless it has exactly one handler.
    pub fn expect_command<C: Command>(self) -> Self {
        self.register(Registration::declare_command::<C>())
    }

    /// Declares a query: `build()` then fails unless it has exactly one handler.
    pub fn expect_query<Q: Query>(self) -> Self {
        self.register(Registration::declare_query::<Q>())
    }

    /// Declares an event, so its name and version are checked for clashes.
    pub fn event<E: Event>(self) -> Self {
        self.register(Registration::declare_event::<E>())
    }

    /// Provides shared state, extracted by handlers with `State<T>`.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// The state of type `T` given to [`state`](Self::state) so far, if any: for extensions
    /// that add to a value registered once per app.
    pub fn state_ref<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.resources.get::<T>()
    }

    /// Declares a command that can be dispatched durably with `App::schedule`; its handler
    /// runs in the relay under the group `command:<name>`.
    pub fn durable_command<C>(mut self) -> Self
    where
        C: Command + serde::Serialize + serde::de::DeserializeOwned,
    {
        self.durable.push((
            durable_group_name::<C>(),
            Box::new(DurableCommand::<C>(std::marker::PhantomData)),
        ));
        self.expect_command::<C>()
    }

    /// Makes delivery durable: commands run in units of work of `store`, events for groups go
    /// through its outbox, and `App::start` runs its relay.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Writes the events that no group subscribes to into the store's outbox too, as rows with
    /// no deliveries (kept for the outbox retention, like delivered ones), so that a flow read
    /// from the store (`SqlStore::flow`) shows every event a command caused. Without it, such
    /// an event reaches its inline subscribers and is not stored: nothing would read the row.
    /// `inseam-test` turns it on; an app turns it on to see whole flows in production too, at
    /// the price of one outbox row per such event. No effect without a store.
    pub fn keep_unsubscribed_events(mut self) -> Self {
        self.keep_unsubscribed = true;
        self
    }

    /// Carries trace context with messages: every event and durable command published gets the
    /// current span's context in its headers, and every delivery from the store runs in a span
    /// (`deliver`, target `inseam::relay`) whose parent is the context its envelope carries, so
    /// a subscriber's spans join the trace of the request that published the event, also in
    /// another process (`inseam::otel::OtelPropagation` for OpenTelemetry). Without it nothing
    /// is written to headers and dispatch does no propagation work.
    pub fn trace_propagation(
        mut self,
        propagation: impl crate::propagation::TracePropagation,
    ) -> Self {
        self.propagation = Some(Arc::new(propagation));
        self
    }

    /// Sets the CloudEvents `source` of the events this app publishes (default `inseam`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Wraps every dispatch (commands, queries, background event deliveries) in a tower layer.
    /// The first layer added is the outermost.
    pub fn layer<L, S>(mut self, layer: L) -> Self
    where
        L: Layer<DispatchService, Service = S> + Send + Sync + 'static,
        S: Service<DispatchRequest, Response = DispatchResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.layers.push(LayerScope::All, layer);
        self
    }

    /// Wraps every dispatch of one kind (all commands, all queries or all event deliveries).
    pub fn layer_for_kind<L, S>(mut self, kind: MessageKind, layer: L) -> Self
    where
        L: Layer<DispatchService, Service = S> + Send + Sync + 'static,
        S: Service<DispatchRequest, Response = DispatchResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.layers.push(LayerScope::Kind(kind), layer);
        self
    }

    /// Registers an upcaster: it turns a stored JSON payload of event `name` at version `from`
    /// into the payload of version `from + 1`. Chains run wherever stored payloads are read;
    /// `build()` checks that every event of version `n` has upcasters from 1 to `n - 1`.
    pub fn upcaster<F>(mut self, name: &'static str, from: u32, upcast: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync + 'static,
    {
        self.upcasters.insert(name, from, Arc::new(upcast));
        self
    }

    /// Registers saga `S`: a subscriber group `S::NAME` for every event of `S::Event` and for
    /// its timeouts. Its commands must be declared with `.durable_command::<..>()`.
    pub fn saga<S: crate::saga::Saga>(mut self) -> Self {
        self.registrations.extend(crate::saga::registrations::<S>());
        self
    }

    /// Uses `clock` for everything time-dependent (a `ManualClock` in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Uses `ids` for message ids (`SequentialIds` in tests: stable flows and snapshots).
    pub fn ids(mut self, ids: impl IdGenerator) -> Self {
        self.ids = Arc::new(ids);
        self
    }

    /// Declares an event-sourced aggregate, so that `build()` checks its events' upcasters
    /// even when nothing subscribes to them. Declaring it again changes nothing.
    pub fn aggregate<A: crate::aggregate::Aggregate>(mut self) -> Self {
        use crate::aggregate::EventSet as _;
        if self
            .aggregates
            .iter()
            .any(|a| a.rust_type == type_name::<A>())
        {
            return self;
        }
        struct Declare(Vec<Registration>);
        impl crate::saga::EventVisitor for Declare {
            fn visit<E: Event>(&mut self) {
                self.0.push(Registration::declare_event::<E>());
            }
        }
        let mut declare = Declare(Vec::new());
        A::Event::visit(&mut declare);
        self.registrations.extend(declare.0);
        self.aggregates.push(AggregateDoc {
            kind: A::TYPE,
            rust_type: std::any::type_name::<A>(),
            events: A::Event::events()
                .into_iter()
                .map(|(name, version)| EventRef { name, version })
                .collect(),
        });
        self
    }

    /// Declares aggregate `A` (like [`aggregate`](Self::aggregate)) and keeps the last
    /// committed state of up to `capacity` of its streams in memory, so that `ctx.load` of a
    /// recently saved aggregate reads nothing from the store.
    ///
    /// Saving is checked as always: the append is at the version the state was cached at, and
    /// if another writer appended meanwhile, the command fails with `DispatchFailure::Conflict`,
    /// the stream is forgotten and a retry (`RetryOnConflict`) loads it from the store. So a
    /// cached state can be stale only when something other than this app's commands appends to
    /// the stream (another instance, a durable command run by the relay of another process):
    /// then a command that *rejects* on that state does so without a conflict. Cache an
    /// aggregate when this process is its only writer, or when such a rejection is acceptable.
    /// `App::load` and `load_as_of` always read the store.
    pub fn cache_aggregate<A>(mut self, capacity: usize) -> Self
    where
        A: crate::aggregate::Aggregate + Clone,
    {
        let cache: Arc<dyn crate::aggregate::CachedStates<A>> =
            Arc::new(crate::aggregate::StateCache::<A>::new(capacity));
        self.state_caches.insert(TypeId::of::<A>(), Box::new(cache));
        self.aggregate::<A>()
    }

    /// Wraps every dispatch of one message type `M` (a command, a query or an event).
    pub fn layer_for<M: 'static, L, S>(mut self, layer: L) -> Self
    where
        L: Layer<DispatchService, Service = S> + Send + Sync + 'static,
        S: Service<DispatchRequest, Response = DispatchResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.layers
            .push(LayerScope::Message(TypeId::of::<M>()), layer);
        self
    }

    /// Validates the wiring and builds the app. Every problem is reported at once.
    pub async fn build(self) -> Result<App, BuildError> {
        let mut wiring = Wiring::default();
        if self.discover {
            for registration in discovered() {
                wiring.install(registration);
            }
        }
        for registration in &self.registrations {
            wiring.install(registration);
        }
        let checked = check(
            wiring,
            &self.resources,
            &self.layers,
            &self.aggregates,
            &self.upcasters,
        );
        let Checked {
            built,
            gather,
            runtime,
        } = match checked {
            Ok(checked) => checked,
            Err(BuildError::Wiring(mut problems)) => {
                // Routing problems can only be told once the groups are known; with the rest
                // of the wiring broken, report those of the durable commands' groups at least.
                let groups: Vec<&str> = self.durable.iter().map(|(g, _)| *g).collect();
                if groups.is_empty() {
                    return Err(BuildError::Wiring(problems));
                }
                problems.extend(self.routing_problems(&groups));
                return Err(BuildError::Wiring(problems));
            }
        };
        let mut by_name = HashMap::new();
        let mut groups = Vec::new();
        for (id, route) in &built.events {
            by_name.insert((route.event_name(), route.event_version()), *id);
            groups.extend_from_slice(route.durable_groups());
        }
        groups.extend(self.durable.iter().map(|(group, _)| *group));
        groups.sort_unstable();
        groups.dedup();
        let mut problems = self.routing_problems(&groups);
        let transports: HashMap<&'static str, Arc<dyn Transport>> = self
            .transports
            .iter()
            .map(|t| (t.name(), t.clone()))
            .collect();
        // Commands and queries answered by another process, and those this process answers
        // for the others.
        let mut remote_commands = HashMap::new();
        let mut remote_queries = HashMap::new();
        let mut served = Vec::new();
        if !self.routing.is_single() {
            for routable in &built.routable {
                let key = match routable.kind {
                    MessageKind::Command => format!("command:{}", routable.name),
                    _ => routable.name.to_owned(),
                };
                let travels = (routable.travels)();
                match self.routing.transport_to(&key) {
                    None => {
                        if travels {
                            served.push(*routable);
                        }
                    }
                    Some(name) => {
                        let Some(transport) = transports.get(name) else {
                            continue;
                        };
                        // Refused here: a message of a module moved out to a named process,
                        // which the main process's code calls. A message of the main process
                        // seen from a moved-out one is left to fail at run time, if it is ever
                        // sent from there, with `DispatchFailure::CannotTravel`: checking those
                        // would ask serde of every message of every module that stays.
                        let durable = self.durable.iter().any(|(g, _)| *g == key);
                        let moved_out = self.routing.host(&key) != crate::routing::MAIN;
                        if !travels && !durable && moved_out {
                            problems.push(crate::error::WiringProblem::Routing(format!(
                                "{} `{}` ({}) is answered by process `{}`, but cannot travel there: derive Serialize and Deserialize on it, its output and its error",
                                routable.kind,
                                routable.name,
                                routable.type_name,
                                self.routing.host(&key),
                            )));
                        }
                        let target = crate::remote::RemoteTarget {
                            process: self.routing.host(&key).to_owned(),
                            transport: transport.clone(),
                            timeout: self.request_timeout,
                        };
                        match routable.kind {
                            MessageKind::Command => remote_commands.insert(routable.name, target),
                            _ => remote_queries.insert(routable.name, target),
                        };
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(BuildError::Wiring(problems));
        }
        // Groups that run in another process are reached through a transport's outbox group;
        // the relay runs this process's own groups and those outbox groups.
        let mut remote = HashMap::new();
        for &group in &groups {
            if let Some(transport) = self.routing.transport_to(group) {
                remote.insert(group, outbox_group(transport));
            }
        }
        let mut relay_groups: Vec<&'static str> = groups
            .iter()
            .copied()
            .filter(|g| !remote.contains_key(g))
            .chain(remote.values().copied())
            .collect();
        relay_groups.sort_unstable();
        relay_groups.dedup();
        let all_groups = groups;
        let groups = relay_groups;
        let durable: Vec<(&'static str, &'static str)> = self
            .durable
            .iter()
            .map(|(group, _)| (*group, group.strip_prefix("command:").unwrap_or(group)))
            .collect();
        let catalog = gather.finish(
            &self.source,
            &durable,
            self.aggregates,
            self.store.is_some(),
            &self.routing,
        );
        let app = App {
            inner: Arc::new(Core {
                commands: Slots::new(built.commands),
                queries: Slots::new(built.queries),
                events: freeze(built.events),
                by_name,
                groups,
                all_groups,
                remote,
                routing: self.routing,
                transports,
                remote_commands,
                remote_queries,
                served,
                durable: self.durable.into_iter().collect(),
                upcasters: self.upcasters,
                clock: self.clock,
                ids: self.ids,
                resources: self.resources,
                store: self.store,
                keep_unsubscribed: self.keep_unsubscribed,
                propagation: self.propagation,
                source: Arc::from(self.source),
                runtime,
                tasks: TaskTracker::new(),
                stats: Counters::default(),
                catalog,
                state_caches: self.state_caches,
            }),
        };
        if let Some(store) = &app.inner.store {
            store.use_clock(app.inner.clock.clone());
        }
        tracing::debug!(target: "inseam::app", app = ?app, "built");
        Ok(app)
    }

    /// Problems of the routing for an app with `groups`.
    fn routing_problems(&self, groups: &[&str]) -> Vec<crate::error::WiringProblem> {
        let transports: Vec<&str> = self.transports.iter().map(|t| t.name()).collect();
        self.routing
            .problems(groups, &transports)
            .into_iter()
            .map(crate::error::WiringProblem::Routing)
            .collect()
    }
}

/// The relay group that publishes to `transport`: `transport:<name>`, one per transport name.
pub(crate) fn outbox_group(transport: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!("{}{transport}", crate::routing::OUTBOX_PREFIX);
    if let Some(&known) = names.get(name.as_str()) {
        return known;
    }
    // Leaked once per transport name for the life of the process: groups are `&'static str`.
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}
