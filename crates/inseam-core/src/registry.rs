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

use crate::catalog::{
    CommandDoc, EventDoc, EventRef, Gather, HandlerDoc, Member, Published, QueryDoc, Role,
    SubscriberDoc,
};
use crate::codec::Codec;
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
    publishes: &'static [Published],
    sends: &'static [&'static str],
    build: BuildSlot,
}

/// What the catalog shows of a command or query type.
#[derive(Clone, Copy)]
struct MessageInfo {
    name: &'static str,
    output: &'static str,
    error: &'static str,
    schema: fn() -> Option<serde_json::Value>,
    travels: fn() -> bool,
    serve: crate::remote::ServeFn,
}

struct MessageEntry {
    type_name: &'static str,
    info: MessageInfo,
    declared: bool,
    handlers: Vec<HandlerEntry>,
}

struct SubscriberEntry {
    name: &'static str,
    delivery: Delivery,
    role: Role,
    publishes: &'static [Published],
    sends: &'static [&'static str],
    build: BuildSubscriber,
}

struct EventEntry {
    type_name: &'static str,
    name: &'static str,
    version: u32,
    content_type: &'static str,
    schema: fn() -> Option<serde_json::Value>,
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

fn command_info<C: Command>() -> MessageInfo {
    MessageInfo {
        name: C::NAME,
        output: type_name::<C::Output>(),
        error: type_name::<C::Error>(),
        schema: C::__schema,
        travels: crate::remote::command_travels::<C>,
        serve: crate::remote::serve_command::<C>,
    }
}

fn query_info<Q: Query>() -> MessageInfo {
    MessageInfo {
        name: Q::NAME,
        output: type_name::<Q::Output>(),
        error: type_name::<Q::Error>(),
        schema: Q::__schema,
        travels: crate::remote::query_travels::<Q>,
        serve: crate::remote::serve_query::<Q>,
    }
}

fn message_entry<M: 'static>(
    map: &mut HashMap<TypeId, MessageEntry>,
    info: MessageInfo,
) -> &mut MessageEntry {
    map.entry(TypeId::of::<M>())
        .or_insert_with(|| MessageEntry {
            type_name: type_name::<M>(),
            info,
            declared: false,
            handlers: Vec::new(),
        })
}

fn add_handler(entry: &mut MessageEntry, handler: HandlerEntry) {
    // The same handler registered twice (explicitly and discovered) is one handler.
    if !entry.handlers.iter().any(|h| h.name == handler.name) {
        entry.handlers.push(handler);
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
            content_type: <E::Codec as Codec>::CONTENT_TYPE,
            schema: E::__schema,
            assemble: EventSlot::<E>::assemble,
            subscribers: Vec::new(),
        })
}

fn install_command<H: CommandHandler>(wiring: &mut Wiring) {
    let entry = message_entry::<H::Command>(&mut wiring.commands, command_info::<H::Command>());
    add_handler(
        entry,
        HandlerEntry {
            name: H::NAME,
            publishes: H::PUBLISHES,
            sends: H::SENDS,
            build: build_command::<H>,
        },
    );
    declare_published(wiring, H::PUBLISHES);
}

/// Declares the events a handler says it publishes, so that the catalog knows them all.
fn declare_published(wiring: &mut Wiring, published: &[Published]) {
    for event in published {
        event.declaration().install(wiring);
    }
}

fn install_query<H: QueryHandler>(wiring: &mut Wiring) {
    let entry = message_entry::<H::Query>(&mut wiring.queries, query_info::<H::Query>());
    add_handler(
        entry,
        HandlerEntry {
            name: H::NAME,
            publishes: &[],
            sends: &[],
            build: build_query::<H>,
        },
    );
}

fn install_subscriber<H: EventHandler>(wiring: &mut Wiring) {
    let entry = event_entry::<H::Event>(wiring);
    if !entry.subscribers.iter().any(|s| s.name == H::NAME) {
        entry.subscribers.push(SubscriberEntry {
            name: H::NAME,
            delivery: H::DELIVERY,
            role: H::ROLE,
            publishes: H::PUBLISHES,
            sends: H::SENDS,
            build: build_subscriber::<H>,
        });
    }
    declare_published(wiring, H::PUBLISHES);
}

fn declare_command<C: Command>(wiring: &mut Wiring) {
    message_entry::<C>(&mut wiring.commands, command_info::<C>()).declared = true;
}

fn declare_query<Q: Query>(wiring: &mut Wiring) {
    message_entry::<Q>(&mut wiring.queries, query_info::<Q>()).declared = true;
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
    /// Every command and query type with a handler, for routing.
    pub(crate) routable: Vec<crate::remote::Routable>,
    pub(crate) commands: HashMap<TypeId, BuiltSlot>,
    pub(crate) queries: HashMap<TypeId, BuiltSlot>,
    pub(crate) events: HashMap<TypeId, Box<dyn EventRoute>>,
}

impl Wiring {
    pub(crate) fn install(&mut self, registration: &Registration) {
        registration.install(self);
    }

    /// What the catalog shows of this wiring.
    pub(crate) fn gather(&self) -> Gather {
        let mut gather = Gather::default();
        for entry in self.commands.values() {
            let handler = entry.handlers.first().map(|h| HandlerDoc {
                name: h.name,
                publishes: h.publishes.iter().map(|p| p.event).collect(),
                sends: h.sends.to_vec(),
            });
            gather.commands.push(CommandDoc {
                name: entry.info.name,
                rust_type: entry.type_name,
                output: entry.info.output,
                error: entry.info.error,
                handler,
                durable: false,
                schema: (entry.info.schema)(),
            });
        }
        for entry in self.queries.values() {
            gather.queries.push(QueryDoc {
                name: entry.info.name,
                rust_type: entry.type_name,
                output: entry.info.output,
                error: entry.info.error,
                handler: entry.handlers.first().map(|h| h.name),
            });
        }
        for entry in self.events.values() {
            let event = EventRef {
                name: entry.name,
                version: entry.version,
            };
            for sub in &entry.subscribers {
                match sub.delivery {
                    Delivery::Group(group) => gather.members.push(Member {
                        group,
                        role: sub.role,
                        handler: sub.name,
                        event,
                        publishes: sub.publishes,
                        sends: sub.sends,
                    }),
                    Delivery::Inline => gather.inline.push((sub.name, sub.publishes)),
                }
            }
            gather.events.push(EventDoc {
                name: entry.name,
                version: entry.version,
                rust_type: entry.type_name,
                content_type: entry.content_type,
                schema: (entry.schema)(),
                internal: entry.name.starts_with("inseam."),
                publishers: Vec::new(),
                subscribers: entry
                    .subscribers
                    .iter()
                    .map(|sub| SubscriberDoc {
                        handler: sub.name,
                        role: sub.role,
                        group: match sub.delivery {
                            Delivery::Group(group) => Some(group),
                            Delivery::Inline => None,
                        },
                    })
                    .collect(),
            });
        }
        gather
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

        let mut routable = Vec::new();
        for (kind, entries) in [
            (MessageKind::Command, &self.commands),
            (MessageKind::Query, &self.queries),
        ] {
            routable.extend(
                entries
                    .values()
                    .filter(|e| !e.handlers.is_empty())
                    .map(|e| crate::remote::Routable {
                        kind,
                        name: e.info.name,
                        type_name: e.type_name,
                        travels: e.info.travels,
                        serve: e.info.serve,
                    }),
            );
        }
        routable.sort_by_key(|r| r.type_name);
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
                routable,
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
