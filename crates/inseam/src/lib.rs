//! A framework for Rust modular monoliths: commands, queries and events on a typed in-process
//! bus, registered with derive and attribute macros.
//!
//! Modules talk only through messages. A command has exactly one handler and returns its typed
//! result; a query reads; an event is a fact with a stable contract (name and version) that any
//! number of subscribers receive, inline in the publishing unit of work or in the background
//! under a stable group name.
//!
//! ```
//! use inseam::prelude::*;
//!
//! #[derive(Debug, Command)]
//! #[command(output = u64)]
//! pub struct Add { pub a: u64, pub b: u64 }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! #[event(name = "calc.added", key = a)]
//! pub struct Added { pub a: u64, pub sum: u64 }
//!
//! #[command_handler]
//! async fn add(cmd: Add, ctx: &mut CommandContext<'_>) -> Result<u64, std::convert::Infallible> {
//!     let sum = cmd.a + cmd.b;
//!     ctx.publish(Added { a: cmd.a, sum });
//!     Ok(sum)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = App::builder().handler::<add>().build().await?;
//! assert_eq!(app.send(Add { a: 2, b: 3 }).await?, 5);
//! # Ok(())
//! # }
//! ```
//!
//! See the README for a tour, and `App::builder` for wiring.

#![warn(missing_docs)]

pub use inseam_core::saga::{Compensations, Saga, SagaContext};
pub use inseam_core::{
    Aggregate, AggregateError, AppendError, Clock, Conflict, EventSet, Halt, IdGenerator, Loaded,
    ManualClock, Reject, RetryOnConflict, SequentialIds, Stage, SystemClock, UpcastError, V7Ids,
};
pub use inseam_core::{
    App, AppBuilder, BoxError, BuildError, Catalog, Codec, CodecError, Command, CommandContext,
    CommandHandler, Delivery, DeliveryError, DispatchError, DispatchFailure, DispatchRequest,
    DispatchResponse, DispatchService, Envelope, Event, EventContext, EventHandler, Extract,
    Handler, HeaderError, HeaderName, Headers, Json, MessageKind, MessageMeta, Metadata,
    MetricsLayer, Query, QueryContext, QueryHandler, RawEnvelope, Registration, Routing, State,
    Stats, TraceLayer, TracePropagation, WireError, WiringProblem,
};
pub use inseam_core::{
    aggregate, catalog, clock, codec, envelope, error, extract, handler, message, middleware,
    propagation, registry, routing, saga, store, transport, upcast,
};

/// The admin web page (feature `admin`): the flow diagram, group lag, dead letters (retry,
/// discard, repair) and flows, as an axum router to mount.
#[cfg(feature = "admin")]
pub use inseam_admin as admin;
/// The RabbitMQ (AMQP 0.9.1) transport (feature `amqp`): a group's events consumed durably in
/// another process, in per-key order.
#[cfg(feature = "amqp")]
pub use inseam_amqp as amqp;
/// The `inseam` operator commands (feature `cli`), for an app's own binary to mount:
/// `inseam::cli::run(&app, &store, args)` (status, dead letters with payloads checked against
/// the app's decoders, flows, groups, retention, projection rebuilds, the catalog).
#[cfg(feature = "cli")]
pub use inseam_cli as cli;
/// The Kafka transport (feature `kafka`): a group's events consumed durably in another process,
/// in per-key order.
#[cfg(feature = "kafka")]
pub use inseam_kafka as kafka;
pub use inseam_macros::{Command, Event, Query, command_handler, event_handler, query_handler};
/// The NATS JetStream transport (feature `nats`): a group's events consumed durably in another
/// process, in per-key order.
#[cfg(feature = "nats")]
pub use inseam_nats as nats;
/// OpenTelemetry (feature `otel`): trace context carried through the outbox and brokers in
/// envelope headers, W3C `traceparent`/`tracestate`.
#[cfg(feature = "otel")]
pub use inseam_otel as otel;
/// The Redis Streams transport (feature `redis`): a group's events consumed durably in another
/// process, in per-key order.
#[cfg(feature = "redis")]
pub use inseam_redis as redis;
/// Durable delivery on sqlx (features `sqlite`, `postgres`): the transactional outbox, the
/// relay, inbox deduplication and dead letters.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use inseam_sql as sql;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use inseam_sql::{SqlStore, Transactional};

/// What a module defining messages and handlers needs, in one import.
pub mod prelude {
    pub use inseam_core::saga::{Compensations, Saga, SagaContext};
    pub use inseam_core::{
        Aggregate, AggregateError, App, Command, CommandContext, DispatchError, DispatchFailure,
        Envelope, Event, EventContext, EventSet, Loaded, Metadata, Query, QueryContext,
        RetryOnConflict, State,
    };
    pub use inseam_macros::{
        Command, Event, EventSet, Query, command_handler, event_handler, query_handler,
    };
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub use inseam_sql::{Projections as _, SqlStore, Transactional};
    pub use serde::{Deserialize, Serialize};
}

/// Paths the macros expand to. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use inseam_core::catalog::{Published, SchemaProbe, ViaJsonSchema, WithoutSchema};
    pub use inseam_core::extract::{Extract, Parts, PrepareCx};
    pub use inseam_core::handler::{
        BoxError, CommandHandler, CommandResult, Delivery, EventHandler, Handler, HandlerFuture,
        IntoHandlerResult, QueryHandler, QueryResult, command_future, handler_future, query_future,
    };
    pub use inseam_core::message::SlotIndex;
    pub use inseam_core::registry::Registration;
    pub use inseam_core::remote::{RemoteCodec, SerdeFns, SerdeProbe, ViaSerde, WithoutSerde};
    pub use inseam_core::saga::EventVisitor;
    pub use inseam_core::{
        Command, CommandContext, Envelope, Event, EventContext, EventSet, Json, Query,
        QueryContext, RawEnvelope, Stage, WireError,
    };
    pub use inventory;
    pub use serde_json::Value as JsonValue;
    pub use std::clone::Clone;
    pub use std::option::Option::{self, None, Some};
    pub use std::string::{String, ToString};
    pub use std::vec;
    pub use std::vec::Vec;
}
