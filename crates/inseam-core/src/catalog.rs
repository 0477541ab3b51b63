//! The catalog of an app: every message it knows with its name, version and schema, who handles
//! it, who publishes it, who subscribes and which groups are routed where — taken from the
//! registrations when the app is built, and rendered as Markdown, AsyncAPI 3.0 or a Mermaid
//! flow diagram.
//!
//! ```ignore
//! let catalog = app.catalog();
//! std::fs::write("docs/catalog.md", catalog.markdown())?;
//! std::fs::write("docs/asyncapi.yaml", catalog.asyncapi_yaml()?)?;
//! ```
//!
//! The catalog of an app built with a [`Routing`] says which process runs each group and over
//! which transport the others reach it; [`Catalog::routed`] renders a split that is only
//! planned (`Routing::from_file("split.toml")`). An app that one process runs reads as it
//! always did: no processes, no servers, no transports.
//!
//! Who publishes an event and who sends a command are what handlers declare
//! (`#[command_handler(publishes(OrderPlaced))]`, `#[event_handler(group = "..", sends(..))]`,
//! `Saga::SENDS`), plus the events of every aggregate registered with `.aggregate::<A>()`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::marker::PhantomData;

use serde::Serialize;
use serde_json::Value;

use crate::error::{BuildError, WiringProblem};
use crate::message::Event;
use crate::registry::Registration;
use crate::routing::{self, MAIN, Routing};

mod asyncapi;
mod markdown;
mod mermaid;

pub use asyncapi::{AsyncApiError, Components, Document, Info};

/// Everything an app's registrations say about its messages, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catalog {
    /// The app's source (`AppBuilder::source`), the title of the rendered documents.
    pub source: String,
    /// Every command with a handler, or declared.
    pub commands: Vec<CommandDoc>,
    /// Every query with a handler, or declared.
    pub queries: Vec<QueryDoc>,
    /// Every event declared, subscribed to or emitted by an aggregate; inseam's own events
    /// (named `inseam.*`) are marked [`internal`](EventDoc::internal).
    pub events: Vec<EventDoc>,
    /// Every subscriber group.
    pub groups: Vec<GroupDoc>,
    /// Every aggregate registered with `.aggregate::<A>()`.
    pub aggregates: Vec<AggregateDoc>,
    /// The processes, the main one first, when a [`Routing`] runs groups outside the main
    /// process; empty when one process runs everything.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessDoc>,
}

/// A process of a routed app: what it runs and over which transports the others reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessDoc {
    /// Its name: [`MAIN`], or one the routing declares.
    pub name: String,
    /// The transports over which the other processes reach it: its own, or for the main
    /// process those of every other process.
    pub transports: Vec<String>,
    /// The modules whose groups and durable commands it runs; for the main process, every
    /// module no other process claims.
    pub modules: Vec<String>,
    /// The groups it runs.
    pub groups: Vec<&'static str>,
}

/// A command.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandDoc {
    /// Its stable name.
    pub name: &'static str,
    /// Its Rust type.
    pub rust_type: &'static str,
    /// What its handler returns on success.
    pub output: &'static str,
    /// What its handler returns on failure.
    pub error: &'static str,
    /// Its handler (a built app has one for every command it knows).
    pub handler: Option<HandlerDoc>,
    /// Whether it can be dispatched durably (`AppBuilder::durable_command`).
    pub durable: bool,
    /// The JSON schema of its payload, when the type derives `schemars::JsonSchema`.
    pub schema: Option<Value>,
}

/// A query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryDoc {
    /// Its stable name.
    pub name: &'static str,
    /// Its Rust type.
    pub rust_type: &'static str,
    /// What its handler returns on success.
    pub output: &'static str,
    /// What its handler returns on failure.
    pub error: &'static str,
    /// Its handler's name.
    pub handler: Option<&'static str>,
}

/// A handler, with what it declares it emits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HandlerDoc {
    /// The handler's name (its function's path).
    pub name: &'static str,
    /// The events it declares it publishes.
    pub publishes: Vec<EventRef>,
    /// The commands it declares it sends (durably).
    pub sends: Vec<&'static str>,
}

/// An event a handler declares it publishes: its contract, and its declaration, so that the
/// app knows the event even when nothing subscribes to it.
#[derive(Clone, Copy)]
pub struct Published {
    /// The event's contract.
    pub event: EventRef,
    declare: Registration,
}

impl Published {
    /// Event `E`.
    pub const fn of<E: Event>() -> Self {
        Published {
            event: EventRef {
                name: E::NAME,
                version: E::VERSION,
            },
            declare: Registration::declare_event::<E>(),
        }
    }

    pub(crate) fn declaration(&self) -> &Registration {
        &self.declare
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Published").field(&self.event).finish()
    }
}

/// An event contract: a name and a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EventRef {
    /// The event's stable name.
    pub name: &'static str,
    /// The contract's version.
    pub version: u32,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// An event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDoc {
    /// Its stable name.
    pub name: &'static str,
    /// Its contract's version.
    pub version: u32,
    /// Its Rust type.
    pub rust_type: &'static str,
    /// The media type of its payload on the wire.
    pub content_type: &'static str,
    /// The JSON schema of its payload, when the type derives `schemars::JsonSchema`.
    pub schema: Option<Value>,
    /// One of inseam's own events (saga timeouts and the like), not part of the app's contracts.
    pub internal: bool,
    /// Who publishes it: handlers that declare it, and aggregates whose events include it.
    pub publishers: Vec<Publisher>,
    /// Who receives it.
    pub subscribers: Vec<SubscriberDoc>,
}

impl EventDoc {
    /// The event's contract reference.
    pub fn reference(&self) -> EventRef {
        EventRef {
            name: self.name,
            version: self.version,
        }
    }
}

/// Who publishes an event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Publisher {
    /// A command handler, by name.
    CommandHandler(&'static str),
    /// A subscriber group (its handler or saga declares it).
    Group(&'static str),
    /// An inline subscriber, by name.
    InlineSubscriber(&'static str),
    /// An aggregate, by its type name (`Aggregate::TYPE`).
    Aggregate(&'static str),
}

impl fmt::Display for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Publisher::CommandHandler(name) => write!(f, "command handler `{name}`"),
            Publisher::Group(name) => write!(f, "group `{name}`"),
            Publisher::InlineSubscriber(name) => write!(f, "inline subscriber `{name}`"),
            Publisher::Aggregate(name) => write!(f, "aggregate `{name}`"),
        }
    }
}

/// One subscriber of an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriberDoc {
    /// The handler's name.
    pub handler: &'static str,
    /// What kind of subscriber it is.
    pub role: Role,
    /// Its group; `None` for an inline subscriber, which runs in the publishing unit of work.
    pub group: Option<&'static str>,
}

/// What kind of subscriber a handler is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// A plain event handler.
    Subscriber,
    /// A saga's step.
    Saga,
    /// A projection's step.
    Projection,
    /// The durable delivery of a command to its handler.
    Command,
}

impl Role {
    /// The role in lower case.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Subscriber => "subscriber",
            Role::Saga => "saga",
            Role::Projection => "projection",
            Role::Command => "durable command",
        }
    }
}

/// Where a group's deliveries travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Route {
    /// The store's relay, in this process: outbox to inbox in one database.
    Relay,
    /// A background task of this process, without a store: not durable.
    Task,
}

impl Route {
    /// How the route reads in the rendered documents.
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Relay => "in-process relay (outbox → inbox)",
            Route::Task => "in-process task (no store: not durable)",
        }
    }
}

/// A subscriber group: one checkpoint, one inbox, one delivery order per key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupDoc {
    /// Its stable name.
    pub name: &'static str,
    /// What kind of handlers it runs.
    pub role: Role,
    /// Where its deliveries travel.
    pub route: Route,
    /// The events it receives (for a durable command's group, none: it receives the command).
    pub events: Vec<EventRef>,
    /// Its handlers' names.
    pub handlers: Vec<&'static str>,
    /// The events its handlers declare they publish.
    pub publishes: Vec<EventRef>,
    /// The commands its handlers declare they send.
    pub sends: Vec<&'static str>,
    /// The process that runs it: [`MAIN`] unless a [`Routing`] moves it.
    pub process: String,
    /// The transports over which the other processes reach it: the transport of its process,
    /// or for a group of the main process those of every other process. Empty when one process
    /// runs everything.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transports: Vec<String>,
}

/// An event-sourced aggregate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateDoc {
    /// Its type name (`Aggregate::TYPE`), the prefix of its streams.
    pub kind: &'static str,
    /// Its Rust type.
    pub rust_type: &'static str,
    /// The events of its stream.
    pub events: Vec<EventRef>,
}

impl Catalog {
    /// The command named `name`.
    pub fn command(&self, name: &str) -> Option<&CommandDoc> {
        self.commands.iter().find(|c| c.name == name)
    }

    /// The current version of the event named `name`.
    pub fn event(&self, name: &str) -> Option<&EventDoc> {
        self.events.iter().rev().find(|e| e.name == name)
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupDoc> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The events that are part of the app's contracts (not inseam's own).
    pub fn contracts(&self) -> impl Iterator<Item = &EventDoc> {
        self.events.iter().filter(|e| !e.internal)
    }

    /// The catalog as a Markdown document: commands, queries, events with their schemas,
    /// groups, aggregates and the flow diagram.
    pub fn markdown(&self) -> String {
        markdown::render(self)
    }

    /// The flow as a Mermaid `flowchart`: commands, events and groups by module, with who
    /// publishes, subscribes and sends.
    pub fn mermaid(&self) -> String {
        mermaid::render(self)
    }

    /// The catalog as an AsyncAPI 3.0 document (serialize it with any serde format).
    pub fn asyncapi(&self) -> Document {
        asyncapi::document(self)
    }

    /// The AsyncAPI 3.0 document as YAML.
    pub fn asyncapi_yaml(&self) -> Result<String, AsyncApiError> {
        asyncapi::yaml(self)
    }

    /// The module of a message or group: its name up to the first dot.
    pub fn module_of(name: &str) -> &str {
        name.split_once('.').map_or(name, |(module, _)| module)
    }

    /// The catalog as it reads when `routing` says which process runs which groups: the same
    /// messages, with each group's process and transports. It documents a split without
    /// starting it, so the routing's transports need not be configured here. It fails, naming
    /// every problem, when the routing does not fit the app: a module or group the app does
    /// not have, a group claimed by two processes, a process that runs nothing.
    pub fn routed(&self, routing: &Routing) -> Result<Catalog, BuildError> {
        let groups: Vec<&str> = self.groups.iter().map(|g| g.name).collect();
        let transports: Vec<&str> = routing
            .processes()
            .map(|(_, route)| route.transport.as_str())
            .collect();
        let problems = routing.problems(&groups, &transports);
        if !problems.is_empty() {
            return Err(BuildError::Wiring(
                problems.into_iter().map(WiringProblem::Routing).collect(),
            ));
        }
        let mut catalog = self.clone();
        catalog.route(routing);
        Ok(catalog)
    }

    /// Whether a routing runs some groups outside the main process.
    pub fn is_routed(&self) -> bool {
        !self.processes.is_empty()
    }

    /// Every module, sorted.
    pub fn modules(&self) -> Vec<&str> {
        let names = self
            .commands
            .iter()
            .map(|c| c.name)
            .chain(self.contracts().map(|e| e.name))
            .chain(
                self.groups
                    .iter()
                    .filter(|g| g.role != Role::Command)
                    .map(|g| g.name),
            );
        let modules: BTreeSet<&str> = names.map(Catalog::module_of).collect();
        modules.into_iter().collect()
    }

    /// Records which process runs each group, and the processes, as `routing` says.
    fn route(&mut self, routing: &Routing) {
        self.processes.clear();
        let mut everyone: Vec<String> = routing
            .processes()
            .map(|(_, route)| route.transport.clone())
            .collect();
        everyone.sort();
        everyone.dedup();
        for group in &mut self.groups {
            let host = routing.host(group.name);
            group.process = host.to_owned();
            group.transports = match routing.processes().find(|(name, _)| *name == host) {
                Some((_, route)) => vec![route.transport.clone()],
                None => everyone.clone(),
            };
        }
        if routing.is_single() {
            return;
        }
        let hosted = |process: &str| -> Vec<&'static str> {
            self.groups
                .iter()
                .filter(|g| g.process == process)
                .map(|g| g.name)
                .collect()
        };
        let claimed: BTreeSet<&str> = routing
            .processes()
            .flat_map(|(_, route)| route.modules.iter().map(String::as_str))
            .collect();
        let mut processes = vec![ProcessDoc {
            name: MAIN.to_owned(),
            transports: everyone.clone(),
            modules: self
                .modules()
                .into_iter()
                .filter(|m| !claimed.contains(m))
                .map(str::to_owned)
                .collect(),
            groups: hosted(MAIN),
        }];
        for (name, route) in routing.processes() {
            let mut modules = route.modules.clone();
            modules.sort();
            modules.dedup();
            processes.push(ProcessDoc {
                name: name.to_owned(),
                transports: vec![route.transport.clone()],
                modules,
                groups: hosted(name),
            });
        }
        self.processes = processes;
    }

    /// The process that runs the groups of `module`.
    fn module_process(&self, module: &str) -> &str {
        self.processes
            .iter()
            .find(|p| p.name != MAIN && p.modules.iter().any(|m| m == module))
            .map_or(MAIN, |p| p.name.as_str())
    }

    /// The process a command runs in: that of its durable group, or for a command sent in
    /// process, that of its module (where the module's code is at home; any process can send
    /// it, the renderings place it with its module).
    fn command_process(&self, command: &str) -> &str {
        match self.group(&format!("command:{command}")) {
            Some(group) => &group.process,
            None => self.module_process(routing::module_of(command)),
        }
    }

    /// The processes an event is published from: those of the groups and command handlers
    /// that declare it. Inline subscribers and aggregates publish in the unit of work that
    /// caused them, which the catalog places with the event's module.
    fn event_senders(&self, event: &EventDoc) -> BTreeSet<&str> {
        event
            .publishers
            .iter()
            .map(|publisher| match publisher {
                Publisher::Group(group) => self.group(group).map_or(MAIN, |g| g.process.as_str()),
                Publisher::CommandHandler(handler) => self
                    .commands
                    .iter()
                    .find(|c| c.handler.as_ref().is_some_and(|h| h.name == *handler))
                    .map_or(MAIN, |c| self.command_process(c.name)),
                Publisher::InlineSubscriber(_) | Publisher::Aggregate(_) => {
                    self.module_process(Catalog::module_of(event.name))
                }
            })
            .collect()
    }

    /// The processes a durable command is sent from: those of the groups and command handlers
    /// that declare they send it.
    fn command_senders(&self, command: &str) -> BTreeSet<&str> {
        let groups = self
            .groups
            .iter()
            .filter(|g| g.role != Role::Command && g.sends.contains(&command))
            .map(|g| g.process.as_str());
        let handlers = self
            .commands
            .iter()
            .filter(|c| {
                c.handler
                    .as_ref()
                    .is_some_and(|h| h.sends.contains(&command))
            })
            .map(|c| self.command_process(c.name));
        groups.chain(handlers).collect()
    }

    /// The transport a message takes from a sender in process `from` to a receiver in process
    /// `to`: none within one process; the receiver's transport when it is not the main
    /// process, otherwise the sender's (as [`Routing::transport_to`] decides at runtime).
    fn transport_between(&self, from: &str, to: &str) -> Option<&str> {
        if from == to {
            return None;
        }
        let named = if to == MAIN { from } else { to };
        self.processes
            .iter()
            .find(|p| p.name == named)
            .and_then(|p| p.transports.first())
            .map(String::as_str)
    }

    /// The transports over which a receiver in process `to` gets a message sent from
    /// `senders`.
    fn transports_into<'a>(&'a self, senders: &BTreeSet<&'a str>, to: &str) -> BTreeSet<&'a str> {
        senders
            .iter()
            .filter_map(|from| self.transport_between(from, to))
            .collect()
    }
}

/// Gathers a catalog while the registry is read. Not public API.
#[derive(Debug, Default)]
pub(crate) struct Gather {
    pub(crate) commands: Vec<CommandDoc>,
    pub(crate) queries: Vec<QueryDoc>,
    pub(crate) events: Vec<EventDoc>,
    /// Every group subscriber.
    pub(crate) members: Vec<Member>,
    /// Every inline subscriber with the events it declares it publishes.
    pub(crate) inline: Vec<(&'static str, &'static [Published])>,
}

/// One group subscriber, as gathered.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) group: &'static str,
    pub(crate) role: Role,
    pub(crate) handler: &'static str,
    pub(crate) event: EventRef,
    pub(crate) publishes: &'static [Published],
    pub(crate) sends: &'static [&'static str],
}

impl Gather {
    /// The catalog, with the durable command groups and aggregates the builder knows.
    pub(crate) fn finish(
        mut self,
        source: &str,
        durable: &[(&'static str, &'static str)],
        mut aggregates: Vec<AggregateDoc>,
        stored: bool,
        routing: &Routing,
    ) -> Catalog {
        let route = if stored { Route::Relay } else { Route::Task };
        for command in &mut self.commands {
            command.durable = durable.iter().any(|(_, name)| *name == command.name);
        }
        self.commands.sort_by_key(|c| c.name);
        self.queries.sort_by_key(|q| q.name);

        let mut groups: BTreeMap<&'static str, GroupDoc> = BTreeMap::new();
        for member in &self.members {
            let group = groups.entry(member.group).or_insert_with(|| GroupDoc {
                name: member.group,
                role: member.role,
                route,
                events: Vec::new(),
                handlers: Vec::new(),
                publishes: Vec::new(),
                sends: Vec::new(),
                process: MAIN.to_owned(),
                transports: Vec::new(),
            });
            // One role per group whatever the order members come in (a group mixing roles is
            // a wiring oddity; the catalog shows the first kind in `Role`'s order).
            group.role = group.role.min(member.role);
            group.events.push(member.event);
            group.handlers.push(member.handler);
            group
                .publishes
                .extend(member.publishes.iter().map(|p| p.event));
            group.sends.extend_from_slice(member.sends);
        }
        for &(group, command) in durable {
            let handler = self
                .commands
                .iter()
                .find(|c| c.name == command)
                .and_then(|c| c.handler.as_ref());
            groups.insert(
                group,
                GroupDoc {
                    name: group,
                    role: Role::Command,
                    route,
                    events: Vec::new(),
                    handlers: handler.map(|h| vec![h.name]).unwrap_or_default(),
                    publishes: handler.map(|h| h.publishes.clone()).unwrap_or_default(),
                    sends: handler.map(|h| h.sends.clone()).unwrap_or_default(),
                    process: MAIN.to_owned(),
                    transports: Vec::new(),
                },
            );
        }
        for group in groups.values_mut() {
            sort_dedup(&mut group.events);
            sort_dedup(&mut group.handlers);
            sort_dedup(&mut group.publishes);
            sort_dedup(&mut group.sends);
        }

        // Who publishes each event.
        let mut publishers: BTreeMap<EventRef, Vec<Publisher>> = BTreeMap::new();
        for command in &self.commands {
            if let Some(handler) = &command.handler {
                for event in &handler.publishes {
                    publishers
                        .entry(*event)
                        .or_default()
                        .push(Publisher::CommandHandler(handler.name));
                }
            }
        }
        for group in groups.values().filter(|g| g.role != Role::Command) {
            for event in &group.publishes {
                publishers
                    .entry(*event)
                    .or_default()
                    .push(Publisher::Group(group.name));
            }
        }
        for (handler, events) in &self.inline {
            for published in *events {
                publishers
                    .entry(published.event)
                    .or_default()
                    .push(Publisher::InlineSubscriber(handler));
            }
        }
        for aggregate in &aggregates {
            for event in &aggregate.events {
                publishers
                    .entry(*event)
                    .or_default()
                    .push(Publisher::Aggregate(aggregate.kind));
            }
        }
        for event in &mut self.events {
            if let Some(found) = publishers.get_mut(&event.reference()) {
                event.publishers.append(found);
            }
            event.publishers.sort();
            event.publishers.dedup();
            event
                .subscribers
                .sort_by(|a, b| (a.group, a.handler).cmp(&(b.group, b.handler)));
        }
        self.events.sort_by_key(|e| (e.name, e.version));

        aggregates.sort_by_key(|a| a.kind);
        aggregates.dedup_by_key(|a| a.kind);
        let mut catalog = Catalog {
            source: source.to_owned(),
            commands: self.commands,
            queries: self.queries,
            events: self.events,
            groups: groups.into_values().collect(),
            aggregates,
            processes: Vec::new(),
        };
        catalog.route(routing);
        catalog
    }
}

fn sort_dedup<T: Ord>(items: &mut Vec<T>) {
    items.sort();
    items.dedup();
}

/// Writes `text` as a Markdown table cell: pipes escaped, line breaks as spaces.
pub(crate) fn cell(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '\n' => out.push(' '),
            c => out.push(c),
        }
    }
}

/// A comma-separated list of code spans, or a dash.
pub(crate) fn code_list<I, T>(items: I) -> String
where
    I: IntoIterator<Item = T>,
    T: fmt::Display,
{
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "`{item}`");
    }
    if out.is_empty() {
        out.push('–');
    }
    out
}

/// Finds a payload type's JSON schema when it derives `schemars::JsonSchema`, by autoref
/// specialisation: the derives call `(&SchemaProbe::<Self>::new()).schema()`. Not public API.
#[doc(hidden)]
pub struct SchemaProbe<T>(PhantomData<fn() -> T>);

impl<T> SchemaProbe<T> {
    /// A probe for `T`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        SchemaProbe(PhantomData)
    }
}

impl<T> fmt::Debug for SchemaProbe<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SchemaProbe")
    }
}

/// The probe for a type that derives `schemars::JsonSchema`. Not public API.
#[doc(hidden)]
pub trait ViaJsonSchema {
    /// The type's JSON schema.
    fn schema(&self) -> Option<Value>;
}

impl<T: schemars::JsonSchema> ViaJsonSchema for SchemaProbe<T> {
    fn schema(&self) -> Option<Value> {
        Some(sorted(schemars::schema_for!(T).to_value()))
    }
}

/// The probe for any other type: no schema. Not public API.
#[doc(hidden)]
pub trait WithoutSchema {
    /// No schema.
    fn schema(&self) -> Option<Value>;
}

impl<T> WithoutSchema for &SchemaProbe<T> {
    fn schema(&self) -> Option<Value> {
        None
    }
}

/// A type name without the standard library's module paths: `Vec<String>` for
/// `alloc::vec::Vec<alloc::string::String>`.
pub(crate) fn short_type(name: &str) -> String {
    const STD: [&str; 9] = [
        "alloc::string::",
        "alloc::vec::",
        "alloc::boxed::",
        "alloc::collections::btree::map::",
        "core::option::",
        "core::result::",
        "core::convert::",
        "std::collections::hash::map::",
        "chrono::datetime::",
    ];
    let mut short = name.to_owned();
    for prefix in STD {
        short = short.replace(prefix, "");
    }
    short
}

/// `value` with the keys of every object in sorted order, whatever `serde_json`'s features
/// (with `preserve_order`, maps keep insertion order): stable text for snapshots and files.
pub fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}
