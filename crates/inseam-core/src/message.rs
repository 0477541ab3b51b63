//! The three kinds of message: commands, queries and events.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;

/// An intent to change the system, handled by exactly one handler.
///
/// Implement it with `#[derive(Command)]`:
///
/// ```ignore
/// #[derive(Debug, Command)]
/// #[command(output = OrderId, error = OrderError)]
/// pub struct PlaceOrder { pub customer: CustomerId }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command",
    label = "not a command",
    note = "add #[derive(Command)] (with #[command(output = .., error = ..)]) to `{Self}`"
)]
pub trait Command: Send + 'static {
    /// What the handler returns on success.
    type Output: Send + 'static;
    /// What the handler returns on failure; it reaches the caller of `send` typed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// A stable name, independent of the Rust path (used by durable dispatch and in logs).
    const NAME: &'static str;

    /// Where apps find this command's handler without a hash lookup. `#[derive(Command)]`
    /// gives every non-generic command its own; without one, apps look the type up by its
    /// `TypeId`. Not public API.
    #[doc(hidden)]
    fn __slot_index() -> Option<&'static SlotIndex> {
        None
    }

    /// The JSON schema of the payload, when the type derives `schemars::JsonSchema` (the derive
    /// finds out). Not public API.
    #[doc(hidden)]
    fn __schema() -> Option<serde_json::Value> {
        None
    }

    /// How it and its answer travel to another process, when they all have serde (the derive
    /// finds out). Not public API.
    #[doc(hidden)]
    fn __remote() -> Option<crate::remote::RemoteCodec<Self, Self::Output, Self::Error>>
    where
        Self: Sized,
    {
        None
    }
}

/// A request for data without side effects, handled by exactly one handler.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a query",
    label = "not a query",
    note = "add #[derive(Query)] (with #[query(output = ..)]) to `{Self}`"
)]
pub trait Query: Send + 'static {
    /// What the handler returns on success.
    type Output: Send + 'static;
    /// What the handler returns on failure.
    type Error: std::error::Error + Send + Sync + 'static;
    /// A stable name, independent of the Rust path.
    const NAME: &'static str;

    /// Where apps find this query's handler (see `Command::__slot_index`). Not public API.
    #[doc(hidden)]
    fn __slot_index() -> Option<&'static SlotIndex> {
        None
    }

    /// The JSON schema of the payload, when the type derives `schemars::JsonSchema` (the derive
    /// finds out). Not public API.
    #[doc(hidden)]
    fn __schema() -> Option<serde_json::Value> {
        None
    }

    /// How it and its answer travel to another process, when they all have serde (the derive
    /// finds out). Not public API.
    #[doc(hidden)]
    fn __remote() -> Option<crate::remote::RemoteCodec<Self, Self::Output, Self::Error>>
    where
        Self: Sized,
    {
        None
    }
}

/// A message type's position in the handler table of every app, the same in all apps of the
/// process: assigned when the first app with a handler for the type is built. It must be
/// unique to one type, which is why only the derives of non-generic messages provide one.
#[doc(hidden)]
#[derive(Debug)]
pub struct SlotIndex(AtomicU32);

const UNASSIGNED: u32 = u32::MAX;

impl SlotIndex {
    /// An index not assigned yet.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        SlotIndex(AtomicU32::new(UNASSIGNED))
    }

    /// The position, `None` before any app with a handler for the type was built.
    #[inline]
    pub(crate) fn get(&self) -> Option<usize> {
        // Relaxed: an app that has a handler for the type assigned the index while it was
        // built, before it could be used.
        match self.0.load(Ordering::Relaxed) {
            UNASSIGNED => None,
            index => Some(index as usize),
        }
    }

    /// The position, taken from `next` the first time; `None` if the positions ran out.
    pub(crate) fn assign(&self, next: &AtomicU32) -> Option<usize> {
        if let Some(index) = self.get() {
            return Some(index);
        }
        let fresh = next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < UNASSIGNED - 1).then_some(n + 1)
            })
            .ok()?;
        // Another thread building an app may have assigned one meanwhile; its index wins and
        // `fresh` stays unused.
        match self
            .0
            .compare_exchange(UNASSIGNED, fresh, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Some(fresh as usize),
            Err(index) => Some(index as usize),
        }
    }
}

/// An immutable fact, in the past tense, with zero or more subscribers.
///
/// Its contract is its `NAME` (dotted, independent of the Rust path) and its `VERSION`; the
/// optional ordering key groups events that must reach a subscriber in order.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event",
    label = "not an event",
    note = "add #[derive(Event)] with #[event(name = \"module.something_happened\")] to `{Self}`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable, dotted name of the event, e.g. `orders.order_placed`.
    const NAME: &'static str;
    /// The version of the event's contract, starting at 1.
    const VERSION: u32;
    /// The codec of the payload on the wire.
    type Codec: Codec;
    /// The ordering key: events with the same key reach each subscriber in order.
    fn key(&self) -> Option<String> {
        None
    }

    /// The JSON schema of the payload, when the type derives `schemars::JsonSchema` (the derive
    /// finds out). Not public API.
    #[doc(hidden)]
    fn __schema() -> Option<serde_json::Value> {
        None
    }
}

/// Which kind of message a dispatch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// A command, sent to its one handler.
    Command,
    /// A query, sent to its one handler.
    Query,
    /// An event, delivered to one subscriber.
    Event,
}

impl MessageKind {
    /// The kind in lower case, as used in logs and errors.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Query => "query",
            MessageKind::Event => "event",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
