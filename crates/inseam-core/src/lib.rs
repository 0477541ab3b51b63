//! The core of inseam: messages, envelope, registry, bus, contexts, middleware and errors.
//!
//! Applications depend on the `inseam` facade, which re-exports this crate together with the
//! derive and handler macros. Third parties implementing transports, stores or codecs depend on
//! this crate.

#![warn(missing_docs)]

pub mod aggregate;
mod app;
mod builder;
pub mod catalog;
mod check;
pub mod clock;
pub mod codec;
mod context;
mod dispatch;
pub mod envelope;
pub mod error;
pub mod extract;
pub mod handler;
pub mod message;
pub mod middleware;
pub mod propagation;
pub mod registry;
pub mod remote;
pub mod routing;
pub mod saga;
pub mod store;
pub mod transport;
pub mod upcast;

pub use aggregate::{Aggregate, AggregateError, EventSet, Loaded, Stage};
pub use app::{App, Inbound, Stats};
pub use builder::AppBuilder;
pub use catalog::Catalog;
pub use clock::{Clock, IdGenerator, ManualClock, SequentialIds, SystemClock, V7Ids};
pub use codec::{Codec, CodecError, Json};
pub use context::{CommandContext, EventContext, MessageMeta, QueryContext};
pub use envelope::{Envelope, HeaderError, HeaderName, Headers, Metadata, RawEnvelope, WireError};
pub use error::{
    BoxError, BuildError, DeliveryError, DispatchError, DispatchFailure, WiringProblem,
};
pub use extract::{Extract, State};
pub use handler::{CommandHandler, Delivery, EventHandler, Halt, Handler, QueryHandler, Reject};
pub use message::{Command, Event, MessageKind, Query};
pub use middleware::{
    DispatchRequest, DispatchResponse, DispatchService, MetricsLayer, RetryOnConflict, TraceLayer,
};
pub use propagation::TracePropagation;
pub use registry::Registration;
pub use routing::Routing;
pub use store::{
    AppendError, Conflict, DeliveryFailure, OutboxMessage, RelayHandle, Snapshot, Store,
    StoreError, StoredEvent, StreamPosition, UnitOfWork,
};
pub use upcast::UpcastError;
