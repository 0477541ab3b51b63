//! Registration records and the wiring they add up to.
//!
//! Explicit registration is the primitive: a [`Registration`] is a function that installs one
//! handler or one message declaration. The handler macros submit the same records to
//! `inventory`, and `discover()` installs every record linked into the binary.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use crate::dispatch::{
    Bound, CommandSlot, EventRoute, EventSlot, Prepared, QuerySlot, Subscriber, command_service,
    event_service, query_service,
};
use crate::error::WiringProblem;
use crate::extract::{PrepareCx, Resources};
use crate::handler::{CommandHandler, Delivery, EventHandler, QueryHandler};
use crate::message::{Command, Event, MessageKind, Query};
use crate::middleware::Layers;

/// One handler or message declaration to install into an app.
#[derive(Clone, Copy)]
pub struct Registration {
    install: fn(&mut Wiring),
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration").finish_non_exhaustive()
    }
}

inventory::collect!(Registration);

impl Registration {
    /// Registers a command handler.
    pub const fn command<H: CommandHandler>() -> Self {
        Registration {
            install: install_command::<H>,
        }
    }

    /// Registers a query handler.
    pub const fn query<H: QueryHandler>() -> Self {
        Registration {
            install: install_query::<H>,
        }
    }

    /// Registers an event subscriber.
    pub const fn event<H: EventHandler>() -> Self {
        Registration {
            install: install_subscriber::<H>,
        }
    }

    /// Declares a command: when discovered, `build()` requires exactly one handler for it.
    pub const fn declare_command<C: Command>() -> Self {
        Registration {
            install: declare_command::<C>,
        }
    }

    /// Declares a query: when discovered, `build()` requires exactly one handler for it.
    pub const fn declare_query<Q: Query>() -> Self {
        Registration {
            install: declare_query::<Q>,
        }
    }

    /// Declares an event, so its name and version are checked for clashes.
    pub const fn declare_event<E: Event>() -> Self {
        Registration {
            install: declare_event::<E>,
        }
    }

    pub(crate) fn install(&self, wiring: &mut Wiring) {
        (self.install)(wiring)
    }
}

/// Every registration linked into the binary.
pub(crate) fn discovered() -> impl Iterator<Item = &'static Registration> {
    inventory::iter::<Registration>.into_iter()
}

/// Builds a slot once the resources and layers are known.
type BuildSlot = fn(&mut BuildCx<'_>) -> Option<BuiltSlot>;
type BuildSubscriber = fn(&mut BuildCx<'_>) -> Option<Box<dyn Any + Send + Sync>>;
type AssembleRoute = fn(Vec<Box<dyn Any + Send + Sync>>) -> Box<dyn EventRoute>;

/// Where the next command and query types get their slot index.
static NEXT_COMMAND_INDEX: AtomicU32 = AtomicU32::new(0);
static NEXT_QUERY_INDEX: AtomicU32 = AtomicU32::new(0);

/// A command's or query's slot, with its message type's slot index when it has one.
pub(crate) struct BuiltSlot {
    pub(crate) index: Option<usize>,
    pub(crate) slot: Box<dyn Any + Send + Sync>,
}

/// What building a slot needs.
pub(crate) struct BuildCx<'a> {
    pub(crate) resources: &'a Resources,
    pub(crate) layers: &'a Layers,
    pub(crate) problems: &'a mut Vec<WiringProblem>,
}

struct HandlerEntry {
    name: &'static str,
    build: BuildSlot,
}

struct MessageEntry {
    type_name: &'static str,
    declared: bool,
    handlers: Vec<HandlerEntry>,
}

struct SubscriberEntry {
    name: &'static str,
    delivery: Delivery,
    build: BuildSubscriber,
}

struct EventEntry {
    type_name: &'static str,
    name: &'static str,
    version: u32,
    assemble: AssembleRoute,
    subscribers: Vec<SubscriberEntry>,
}

/// The handlers and declarations collected for one app, before validation.
#[derive(Default)]
pub struct Wiring {
    commands: HashMap<TypeId, MessageEntry>,
    queries: HashMap<TypeId, MessageEntry>,
    events: HashMap<TypeId, EventEntry>,
}

impl fmt::Debug for Wiring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wiring")
            .field("commands", &self.commands.len())
            .field("queries", &self.queries.len())
            .field("events", &self.events.len())
            .finish()
    }
}

fn message_entry<M: 'static>(map: &mut HashMap<TypeId, MessageEntry>) -> &mut MessageEntry {
    map.entry(TypeId::of::<M>())
        .or_insert_with(|| MessageEntry {
            type_name: type_name::<M>(),
            declared: false,
            handlers: Vec::new(),
        })
}

fn add_handler(entry: &mut MessageEntry, name: &'static str, build: BuildSlot) {
    // The same handler registered twice (explicitly and discovered) is one handler.
    if !entry.handlers.iter().any(|h| h.name == name) {
        entry.handlers.push(HandlerEntry { name, build });
    }
}

fn event_entry<E: Event>(wiring: &mut Wiring) -> &mut EventEntry {
    wiring
        .events
        .entry(TypeId::of::<E>())
        .or_insert_with(|| EventEntry {
            type_name: type_name::<E>(),
            name: E::NAME,
            version: E::VERSION,
            assemble: EventSlot::<E>::assemble,
            subscribers: Vec::new(),
        })
}

fn install_command<H: CommandHandler>(wiring: &mut Wiring) {
    let entry = message_entry::<H::Command>(&mut wiring.commands);
    add_handler(entry, H::NAME, build_command::<H>);
}

fn install_query<H: QueryHandler>(wiring: &mut Wiring) {
    let entry = message_entry::<H::Query>(&mut wiring.queries);
    add_handler(entry, H::NAME, build_query::<H>);
}

fn install_subscriber<H: EventHandler>(wiring: &mut Wiring) {
    let entry = event_entry::<H::Event>(wiring);
    if !entry.subscribers.iter().any(|s| s.name == H::NAME) {
        entry.subscribers.push(SubscriberEntry {
            name: H::NAME,
            delivery: H::DELIVERY,
            build: build_subscriber::<H>,
        });
    }
}

fn declare_command<C: Command>(wiring: &mut Wiring) {
    message_entry::<C>(&mut wiring.commands).declared = true;
}

fn declare_query<Q: Query>(wiring: &mut Wiring) {
    message_entry::<Q>(&mut wiring.queries).declared = true;
}

fn declare_event<E: Event>(wiring: &mut Wiring) {
    event_entry::<E>(wiring);
}

fn build_command<H: CommandHandler>(cx: &mut BuildCx<'_>) -> Option<BuiltSlot> {
    let prepared = H::prepare(&mut PrepareCx {
        resources: cx.resources,
        handler: H::NAME,
        message: type_name::<H::Command>(),
        problems: cx.problems,
    })?;
    let service = cx
        .layers
        .wrap::<H::Command>(MessageKind::Command, command_service::<H::Command>);
    Some(BuiltSlot {
        index: H::Command::__slot_index().and_then(|index| index.assign(&NEXT_COMMAND_INDEX)),
        slot: Box::new(CommandSlot::<H::Command> {
            handler: Box::new(Prepared::<Bound<H, H::Prepared>>::command(prepared)),
            handler_name: H::NAME,
            service,
        }),
    })
}

fn build_query<H: QueryHandler>(cx: &mut BuildCx<'_>) -> Option<BuiltSlot> {
    let prepared = H::prepare(&mut PrepareCx {
        resources: cx.resources,
        handler: H::NAME,
        message: type_name::<H::Query>(),
        problems: cx.problems,
    })?;
    let service = cx
        .layers
        .wrap::<H::Query>(MessageKind::Query, query_service::<H::Query>);
    Some(BuiltSlot {
        index: H::Query::__slot_index().and_then(|index| index.assign(&NEXT_QUERY_INDEX)),
        slot: Box::new(QuerySlot::<H::Query> {
            handler: Box::new(Prepared::<Bound<H, H::Prepared>>::query(prepared)),
            handler_name: H::NAME,
            service,
        }),
    })
}

fn build_subscriber<H: EventHandler>(cx: &mut BuildCx<'_>) -> Option<Box<dyn Any + Send + Sync>> {
    let prepared = H::prepare(&mut PrepareCx {
        resources: cx.resources,
        handler: H::NAME,
        message: type_name::<H::Event>(),
        problems: cx.problems,
    })?;
    let handler: Arc<dyn crate::dispatch::ErasedEventHandler<H::Event>> =
        Arc::new(Prepared::<Bound<H, H::Prepared>>::event(prepared));
    // Inline subscribers run inside the publishing unit of work, which the command's own
    // layers already wrap; layers apply to background deliveries.
    let service = match H::DELIVERY {
        Delivery::Inline => None,
        Delivery::Group(_) => {
            let handler = handler.clone();
            cx.layers
                .wrap_event::<H::Event>(move || event_service::<H::Event>(handler.clone()))
        }
    };
    Some(Box::new(Subscriber::<H::Event> {
        name: H::NAME,
        delivery: H::DELIVERY,
        handler,
        service,
    }))
}

/// The validated, prepared wiring: what the app dispatches through.
pub(crate) struct Built {
    pub(crate) commands: HashMap<TypeId, BuiltSlot>,
    pub(crate) queries: HashMap<TypeId, BuiltSlot>,
    pub(crate) events: HashMap<TypeId, Box<dyn EventRoute>>,
}

impl Wiring {
    pub(crate) fn install(&mut self, registration: &Registration) {
        registration.install(self);
    }

    /// Validates the wiring and builds every slot, reporting every problem at once.
    pub(crate) fn build(
        self,
        resources: &Resources,
        layers: &Layers,
    ) -> Result<Built, Vec<WiringProblem>> {
        let mut problems = Vec::new();
        let mut cx = BuildCx {
            resources,
            layers,
            problems: &mut problems,
        };

        let commands = build_messages(self.commands, MessageKind::Command, &mut cx);
        let queries = build_messages(self.queries, MessageKind::Query, &mut cx);

        let mut by_contract: HashMap<(&'static str, u32), Vec<&'static str>> = HashMap::new();
        for entry in self.events.values() {
            by_contract
                .entry((entry.name, entry.version))
                .or_default()
                .push(entry.type_name);
        }
        let mut clashes: Vec<_> = by_contract
            .into_iter()
            .filter(|(_, types)| types.len() > 1)
            .collect();
        clashes.sort();
        for ((name, version), mut types) in clashes {
            types.sort_unstable();
            cx.problems.push(WiringProblem::EventNameClash {
                name,
                version,
                types,
            });
        }

        let mut events = HashMap::new();
        let mut entries: Vec<_> = self.events.into_iter().collect();
        entries.sort_by_key(|(_, e)| e.type_name);
        for (type_id, entry) in entries {
            let mut by_group: HashMap<&'static str, Vec<&'static str>> = HashMap::new();
            for sub in &entry.subscribers {
                if let Delivery::Group(group) = sub.delivery {
                    by_group.entry(group).or_default().push(sub.name);
                }
            }
            let mut dups: Vec<_> = by_group.into_iter().filter(|(_, h)| h.len() > 1).collect();
            dups.sort();
            for (group, mut handlers) in dups {
                handlers.sort_unstable();
                cx.problems.push(WiringProblem::DuplicateSubscribers {
                    group,
                    event: entry.name,
                    handlers,
                });
            }
            let subscribers: Vec<_> = entry
                .subscribers
                .iter()
                .filter_map(|s| (s.build)(&mut cx))
                .collect();
            events.insert(type_id, (entry.assemble)(subscribers));
        }

        if problems.is_empty() {
            Ok(Built {
                commands,
                queries,
                events,
            })
        } else {
            Err(problems)
        }
    }
}

fn build_messages(
    entries: HashMap<TypeId, MessageEntry>,
    kind: MessageKind,
    cx: &mut BuildCx<'_>,
) -> HashMap<TypeId, BuiltSlot> {
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort_by_key(|(_, e)| e.type_name);
    let mut slots = HashMap::new();
    for (type_id, entry) in entries {
        match entry.handlers.as_slice() {
            [] if entry.declared => {
                cx.problems.push(WiringProblem::NoHandler {
                    kind,
                    message: entry.type_name,
                });
            }
            [] => {}
            [handler] => {
                if let Some(slot) = (handler.build)(cx) {
                    slots.insert(type_id, slot);
                }
            }
            several => {
                let mut handlers: Vec<_> = several.iter().map(|h| h.name).collect();
                handlers.sort_unstable();
                cx.problems.push(WiringProblem::DuplicateHandlers {
                    kind,
                    message: entry.type_name,
                    handlers,
                });
            }
        }
    }
    slots
}
