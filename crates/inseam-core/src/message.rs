//! The three kinds of message: commands, queries and events.

use std::fmt;

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
