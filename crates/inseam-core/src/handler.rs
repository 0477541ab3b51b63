//! Handler traits. `#[command_handler]`, `#[query_handler]` and `#[event_handler]` implement
//! them on a marker type named after the function; they can be implemented by hand as well.

use std::fmt;

use stackfuture::StackFuture;

use crate::catalog::{Published, Role};
use crate::context::{CommandContext, EventContext, QueryContext};
use crate::envelope::Envelope;
use crate::extract::PrepareCx;
use crate::message::{Command, Event, Query};
use crate::registry::Registration;

// The boxed error is defined with the other errors, so that the store and the upcasters, which
// return it, need nothing of the handlers. It is still named here, where handlers return it.
pub use crate::error::BoxError;

/// Returned by a group subscriber to say that retrying cannot help: the event goes to the dead
/// letters at once (with this error) and the group moves on.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Reject(pub BoxError);

/// Returned by a group subscriber to stop its whole group at this event: the failure is
/// recorded and the group is paused until resumed by an operator (`store.resume(group)`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Halt(pub BoxError);

impl Reject {
    /// Rejects with `error`.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Reject(error.into())
    }
}

/// Bytes reserved inline for a handler's future. A future that fits is stored without a heap
/// allocation; a larger one (typically a handler awaiting database calls, whose cost dwarfs an
/// allocation) is boxed.
pub const INLINE_FUTURE_SIZE: usize = 128;

/// The type-erased future of a handler: inline when it fits in [`INLINE_FUTURE_SIZE`] bytes.
pub type HandlerFuture<'a, T> = StackFuture<'a, T, INLINE_FUTURE_SIZE>;

/// Wraps a handler's future for dispatch, without allocating when it is small enough.
pub fn handler_future<'a, T, F>(future: F) -> HandlerFuture<'a, T>
where
    F: Future<Output = T> + Send + 'a,
{
    StackFuture::from_or_box(future)
}

/// The handler of one command type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command handler",
    note = "put #[command_handler] on an `async fn(command, ..) -> Result<Output, Error>`"
)]
pub trait CommandHandler: Send + Sync + 'static {
    /// The command it handles.
    type Command: Command;
    /// What its arguments need, looked up at build.
    type Prepared: Send + Sync + 'static;
    /// The handler's name (its function's path), used in errors and logs.
    const NAME: &'static str;
    /// The events it declares it publishes (`publishes(..)` in the handler attribute), for the
    /// catalog.
    const PUBLISHES: &'static [Published] = &[];
    /// The commands it declares it sends (`sends(..)` in the handler attribute), for the
    /// catalog.
    const SENDS: &'static [&'static str] = &[];
    /// Looks up what the arguments need; missing pieces are reported to `cx`.
    fn prepare(cx: &mut PrepareCx<'_>) -> Option<Self::Prepared>;
    /// Handles one command.
    fn call<'a>(
        prepared: &'a Self::Prepared,
        command: Self::Command,
        ctx: &'a mut CommandContext<'_>,
    ) -> HandlerFuture<'a, CommandResult<Self::Command>>;
}

/// The result of handling command `C`.
pub type CommandResult<C> = Result<<C as Command>::Output, <C as Command>::Error>;
/// The result of handling query `Q`.
pub type QueryResult<Q> = Result<<Q as Query>::Output, <Q as Query>::Error>;

/// The handler of one query type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a query handler",
    note = "put #[query_handler] on an `async fn(query, ..) -> Result<Output, Error>`"
)]
pub trait QueryHandler: Send + Sync + 'static {
    /// The query it answers.
    type Query: Query;
    /// What its arguments need, looked up at build.
    type Prepared: Send + Sync + 'static;
    /// The handler's name (its function's path).
    const NAME: &'static str;
    /// Looks up what the arguments need.
    fn prepare(cx: &mut PrepareCx<'_>) -> Option<Self::Prepared>;
    /// Answers one query.
    fn call<'a>(
        prepared: &'a Self::Prepared,
        query: Self::Query,
        ctx: &'a QueryContext<'_>,
    ) -> HandlerFuture<'a, QueryResult<Self::Query>>;
}

/// How a subscriber receives events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// Inside the publishing command's unit of work, before it completes; a failure fails the
    /// command.
    Inline,
    /// After the publishing command completed, under a stable group name.
    Group(&'static str),
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Inline => f.write_str("inline"),
            Delivery::Group(group) => write!(f, "group `{group}`"),
        }
    }
}

/// A subscriber of one event type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event handler",
    note = "put #[event_handler(group = \"..\")] or #[event_handler(inline)] on an `async fn(event, ..)`"
)]
pub trait EventHandler: Send + Sync + 'static {
    /// The event it subscribes to.
    type Event: Event;
    /// What its arguments need, looked up at build.
    type Prepared: Send + Sync + 'static;
    /// The handler's name (its function's path).
    const NAME: &'static str;
    /// Inline, or the group it is delivered to.
    const DELIVERY: Delivery;
    /// The events it declares it publishes (`publishes(..)` in the handler attribute), for the
    /// catalog.
    const PUBLISHES: &'static [Published] = &[];
    /// The commands it declares it sends (`sends(..)` in the handler attribute), for the
    /// catalog.
    const SENDS: &'static [&'static str] = &[];
    /// What kind of subscriber it is, for the catalog.
    const ROLE: Role = Role::Subscriber;
    /// Looks up what the arguments need.
    fn prepare(cx: &mut PrepareCx<'_>) -> Option<Self::Prepared>;
    /// Handles one event.
    fn call<'a>(
        prepared: &'a Self::Prepared,
        event: &'a Envelope<Self::Event>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>>;
}

/// A type that registers a handler (the marker types the handler macros generate), for
/// explicit registration with `App::builder().handler::<H>()`.
pub trait Handler {
    /// The handler's registration record.
    const REGISTRATION: Registration;
}

/// What an event handler may return: `()` or `Result<(), E>` for any error `E`.
#[diagnostic::on_unimplemented(
    message = "an event handler must return `()` or `Result<(), E>` with `E` an error type, not `{Self}`"
)]
pub trait IntoHandlerResult {
    /// Converts into the uniform result.
    fn into_handler_result(self) -> Result<(), BoxError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// Checks at compile time that a command handler returns what its command declares: `R` is
/// the command's `Result<Output, Error>`, and only `R` itself implements the trait, so that a
/// mismatch is reported as this trait unimplemented, naming both types, rather than as a
/// projection mismatch.
#[diagnostic::on_unimplemented(
    message = "this handler returns `{Self}`, but a handler of command `{C}` must return `{R}`",
    label = "expected `{R}`",
    note = "a command handler returns `Result<Output, Error>` with the `output` and `error` of its command's `#[command(output = .., error = ..)]`"
)]
pub trait ReturnsCommandResult<C: Command, R> {
    /// The handler's future, as the command's.
    fn cast_future(future: HandlerFuture<'_, Self>) -> HandlerFuture<'_, R>
    where
        Self: Sized;
}

impl<C: Command, R> ReturnsCommandResult<C, R> for R {
    fn cast_future(future: HandlerFuture<'_, R>) -> HandlerFuture<'_, R> {
        future
    }
}

/// Checks at compile time that a query handler returns what its query declares: `R` is the
/// query's `Result<Output, Error>` (see [`ReturnsCommandResult`]).
#[diagnostic::on_unimplemented(
    message = "this handler returns `{Self}`, but a handler of query `{Q}` must return `{R}`",
    label = "expected `{R}`",
    note = "a query handler returns `Result<Output, Error>` with the `output` and `error` of its query's `#[query(output = .., error = ..)]`"
)]
pub trait ReturnsQueryResult<Q: Query, R> {
    /// The handler's future, as the query's.
    fn cast_future(future: HandlerFuture<'_, Self>) -> HandlerFuture<'_, R>
    where
        Self: Sized;
}

impl<Q: Query, R> ReturnsQueryResult<Q, R> for R {
    fn cast_future(future: HandlerFuture<'_, R>) -> HandlerFuture<'_, R> {
        future
    }
}

/// Wraps the future of a handler of command `C` that returns `R`. The return type is a type
/// argument, so that a handler returning something else than its command's result is reported
/// once, at its return type, rather than inside [`handler_future`].
pub fn command_future<'a, C, R, F>(future: F) -> HandlerFuture<'a, CommandResult<C>>
where
    C: Command,
    R: ReturnsCommandResult<C, CommandResult<C>>,
    F: Future<Output = R> + Send + 'a,
{
    R::cast_future(handler_future(future))
}

/// Wraps the future of a handler of query `Q` that returns `R` (see [`command_future`]).
pub fn query_future<'a, Q, R, F>(future: F) -> HandlerFuture<'a, QueryResult<Q>>
where
    Q: Query,
    R: ReturnsQueryResult<Q, QueryResult<Q>>,
    F: Future<Output = R> + Send + 'a,
{
    R::cast_future(handler_future(future))
}
