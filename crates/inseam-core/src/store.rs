//! The seam between the bus and a durable store: units of work and the outbox.
//!
//! A store (such as `inseam-sql`) implements [`Store`] and [`UnitOfWork`]. With a store, every
//! command runs in a unit of work: the handler's own writes, the outbox rows of the events it
//! published and the run of its inline subscribers commit together, or not at all. A relay
//! owned by the store then delivers the committed outbox rows to every subscribed group through
//! [`App::deliver`](crate::App::deliver).

use std::any::Any;
use std::fmt;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::envelope::{RawEnvelope, WireError};
use crate::error::BoxError;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("the store failed to {operation}")]
pub struct StoreError {
    /// What the store was doing (`begin a transaction`, `write the outbox`, ...).
    pub operation: &'static str,
    /// The driver's error.
    #[source]
    pub source: BoxError,
}

impl StoreError {
    /// A failure of `operation`.
    pub fn new(operation: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError {
            operation,
            source: source.into(),
        }
    }
}

const NO_SAVEPOINTS: &str = "this store cannot nest units of work, so a command sent from inside a handler cannot join the handler's unit of work";

/// One message for the outbox: its encoded envelope and the groups it is bound for.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// The envelope in its wire form.
    pub envelope: RawEnvelope,
    /// Every group that receives it; none for a message stored as a record only (an event of
    /// a stream, or an event no group subscribes to in an app that keeps those).
    pub groups: Vec<&'static str>,
    /// Not delivered before this instant; `None` for right away.
    pub deliver_at: Option<DateTime<Utc>>,
    /// For an event of an event-sourced stream: the stream and the event's version in it. The
    /// store keeps such rows for good (they are the stream) and refuses a second event at the
    /// same position with a [`Conflict`].
    pub stream: Option<StreamPosition>,
}

/// Where an event sits in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream, `<aggregate type>-<id>`.
    pub stream: String,
    /// The event's version in the stream, from 1.
    pub version: u64,
}

/// Another writer appended to a stream first: the optimistic concurrency check failed and
/// nothing of the unit of work was committed. Load the aggregate again and retry (the
/// `RetryOnConflict` layer does it for you).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stream `{stream}` changed concurrently: version {version} was appended by another writer first"
)]
pub struct Conflict {
    /// The stream.
    pub stream: String,
    /// The version both writers wanted to append.
    pub version: u64,
}

/// Why an append to the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A stream position was taken by another writer.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An event read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Its version in the stream.
    pub version: u64,
    /// The envelope as stored (upcast it before decoding: `App::upcast`).
    pub envelope: RawEnvelope,
    /// When it was appended.
    pub recorded_at: DateTime<Utc>,
}

/// The stored state of a process (a saga instance).
#[derive(Debug, Clone)]
pub struct ProcessState {
    /// The serialized state (JSON).
    pub state: Vec<u8>,
    /// Whether the process finished.
    pub done: bool,
}

/// A snapshot of an aggregate's state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: u64,
    /// The aggregate's snapshot schema version.
    pub schema: u32,
    /// The serialized state (JSON).
    pub state: Vec<u8>,
}

/// A durable store: begins units of work and runs the relay that delivers committed outbox rows.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Begins a unit of work: a database transaction, which the store may begin only when the
    /// unit first needs it (`inseam-sql` does on PostgreSQL).
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn UnitOfWork>, StoreError>>;

    /// Told after a unit of work that wrote outbox rows committed, to wake the relay at once.
    fn committed(&self);

    /// Uses `clock` for "now" (when a message is due, retention, timestamps). Called by
    /// `build()` with the app's clock; the default ignores it.
    fn use_clock(&self, clock: std::sync::Arc<dyn crate::clock::Clock>) {
        let _ = clock;
    }

    /// Starts the relay and whatever else the store runs in the background for `app`.
    fn start(&self, app: crate::App) -> RelayHandle;
}

/// A transaction of a store: the handler's writes and the outbox rows commit together.
pub trait UnitOfWork: Send + 'static {
    /// Writes messages to the outbox, in this transaction.
    fn append<'a>(
        &'a mut self,
        messages: Vec<OutboxMessage>,
    ) -> BoxFuture<'a, Result<(), AppendError>>;

    /// Reads the events of `stream` after version `after`, in order; with `as_of`, only those
    /// recorded at or before that instant.
    fn read_stream<'a>(
        &'a mut self,
        stream: &'a str,
        after: u64,
        as_of: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// The latest snapshot of `stream`, if any.
    fn load_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>>;

    /// Stores `snapshot` as the latest of `stream` (replacing an older one).
    fn save_snapshot<'a>(
        &'a mut self,
        stream: &'a str,
        snapshot: Snapshot,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The state of process `id` of kind `kind` (a saga instance), if stored.
    fn load_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProcessState>, StoreError>>;

    /// Stores the state of process `id` of kind `kind`.
    fn save_process<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        state: ProcessState,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Marks the point a nested command starts at (a command sent from inside a handler with
    /// `ctx.send`): what follows can be undone alone with
    /// [`rollback_to_savepoint`](Self::rollback_to_savepoint), or kept with
    /// [`release_savepoint`](Self::release_savepoint). Savepoints nest. The default refuses,
    /// for stores that cannot nest units of work.
    fn savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::new("set a savepoint", NO_SAVEPOINTS)) })
    }

    /// Keeps what was done since the latest savepoint, as part of this unit of work.
    fn release_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::new("release a savepoint", NO_SAVEPOINTS)) })
    }

    /// Undoes what was done since the latest savepoint, and removes it.
    fn rollback_to_savepoint(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::new("roll back to a savepoint", NO_SAVEPOINTS)) })
    }

    /// Told that the delivery this unit of work runs turned out not to be needed (a saga's
    /// timeout that fired after the saga completed), and why: a store keeps `reason` with the
    /// delivery's inbox row, so that the message's flow says so. The default forgets it.
    fn not_needed(&mut self, reason: &'static str) {
        let _ = reason;
    }

    /// Commits. A store may hold appended rows back until here (to write them in one
    /// statement, or together with other units' rows), so a stream [`Conflict`] can surface
    /// here rather than from [`append`](Self::append); either way nothing was committed.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), AppendError>>;

    /// Rolls back.
    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The store's own type, for the store's extension traits (such as `ctx.tx()`).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Why a durable delivery of one message to one group failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryFailure {
    /// No subscriber of the group handles this name and version in this build.
    #[error("group `{group}` has no subscriber for event `{name}` version {version}")]
    Unroutable {
        /// The group.
        group: String,
        /// The event's name as stored.
        name: String,
        /// The event's version as stored.
        version: u32,
    },
    /// The stored payload does not decode as the event's current type.
    #[error("event `{name}` version {version} does not decode")]
    Decode {
        /// The event's name.
        name: String,
        /// The event's version.
        version: u32,
        /// The codec's error.
        #[source]
        source: WireError,
    },
    /// The stored payload could not be upcast to the event's current version.
    #[error(transparent)]
    Upcast {
        /// The upcaster's error.
        source: crate::upcast::UpcastError,
    },
    /// The subscriber returned an error.
    #[error("handler `{handler}` failed")]
    Handler {
        /// The subscriber.
        handler: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The subscriber rejected the event (`Reject`): retrying cannot help.
    #[error("handler `{handler}` rejected the event")]
    Rejected {
        /// The subscriber.
        handler: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The subscriber asked to stop its group (`Halt`).
    #[error("handler `{handler}` stopped its group")]
    Halted {
        /// The subscriber.
        handler: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The subscriber panicked.
    #[error("handler `{handler}` panicked: {reason}")]
    Panicked {
        /// The subscriber.
        handler: &'static str,
        /// The panic message.
        reason: String,
    },
    /// What the subscriber published could not be completed (an inline subscriber failed, the
    /// outbox write failed, ...).
    #[error("completing what subscriber `{handler}` published failed")]
    Completion {
        /// The subscriber.
        handler: &'static str,
        /// Why.
        #[source]
        source: crate::DispatchError<std::convert::Infallible>,
    },
}

impl DeliveryFailure {
    /// Whether retrying cannot help: the message goes to the dead letters at once.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DeliveryFailure::Unroutable { .. }
                | DeliveryFailure::Decode { .. }
                | DeliveryFailure::Upcast { .. }
                | DeliveryFailure::Rejected { .. }
        )
    }
}

/// The background work a store started; [`RelayHandle::shutdown`] stops it gracefully.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl RelayHandle {
    /// A handle over `tasks`, which stop when `cancel` is cancelled.
    pub fn new(cancel: CancellationToken, tasks: TaskTracker) -> Self {
        RelayHandle { cancel, tasks }
    }

    /// A handle with nothing running (an app without a store).
    pub fn idle() -> Self {
        let tasks = TaskTracker::new();
        tasks.close();
        RelayHandle::new(CancellationToken::new(), tasks)
    }

    /// Stops claiming new work, lets in-flight deliveries finish and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Whether shutdown was requested.
    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Runs `task` with the others: it gets the token cancelled at shutdown, which waits for
    /// it to end.
    pub fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task(self.cancel.clone()));
    }
}
