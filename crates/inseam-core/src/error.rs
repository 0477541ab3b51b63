//! Errors: what `send`, `query` and `publish` return, and what `build()` reports.

use std::convert::Infallible;
use std::fmt;

use crate::handler::Delivery;
use crate::message::MessageKind;

/// A boxed error, as tower and `std` use it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error with its causes, on one line: `a: b: c`. An error's `Display` says what failed and
/// its [`source`](std::error::Error::source) why, as the Rust convention goes; this prints both,
/// for logs and messages:
///
/// ```
/// # let error = std::io::Error::other("boom");
/// eprintln!("{}", inseam_core::error::Report(&error));
/// ```
///
/// A cause whose text the chain already ends with is not repeated (some drivers print their
/// source in their own message).
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = cause.source();
        }
        Ok(())
    }
}

/// The most events one unit of work (a command with its inline subscribers) may publish.
pub const MAX_EVENTS_PER_UNIT: usize = 10_000;

/// Why a dispatch failed: the handler's own error, typed, or a failure of the dispatch itself.
///
/// The dispatch's failures are boxed, so that the result of `send` stays as small as the
/// handler's own result and error: `Result<u64, DispatchError<Infallible>>` is 16 bytes, and
/// the path that succeeds does not pay for the size of errors it never returns.
///
/// ```ignore
/// match app.send(Lend { isbn }).await {
///     Ok(loan) => ..,
///     Err(DispatchError::Handler(LendError::NoCopyAvailable(isbn))) => .., // typed
///     Err(error) if error.is_conflict() => ..,                            // retry
///     Err(error) => return Err(error.into()),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError<E> {
    /// The handler returned its declared error.
    #[error(transparent)]
    Handler(E),
    /// The dispatch failed: see [`DispatchFailure`] for what can.
    #[error(transparent)]
    Failed(Box<DispatchFailure>),
}

/// A failure of a dispatch that is not the handler's own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchFailure {
    /// No handler is registered for the message type.
    #[error(
        "no handler for {kind} `{message}`: register one with #[{kind}_handler] and `discover()`, or explicitly with `.handler::<..>()`"
    )]
    NoHandler {
        /// Command or query.
        kind: MessageKind,
        /// The message's Rust type.
        message: &'static str,
    },
    /// An inline subscriber of an event the handler published failed, so the command failed.
    #[error("inline subscriber `{handler}` failed on event `{event}` (message {message_id})")]
    Subscriber {
        /// The subscriber's name.
        handler: &'static str,
        /// The event's name.
        event: &'static str,
        /// The event's id.
        message_id: uuid::Uuid,
        /// The subscriber's error.
        #[source]
        source: BoxError,
    },
    /// One unit of work published more events than [`MAX_EVENTS_PER_UNIT`], typically inline
    /// subscribers that keep publishing events that trigger each other.
    #[error(
        "a unit of work published more than {limit} events (last: `{event}`); inline subscribers are probably publishing events to each other in a cycle"
    )]
    TooManyEvents {
        /// The limit.
        limit: usize,
        /// The event that crossed it.
        event: &'static str,
    },
    /// The store failed: the unit of work could not begin, write the outbox or commit. Nothing
    /// of the unit of work was committed, unless the failure was of the commit itself and the
    /// database cannot tell.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A command dispatched durably (`App::schedule`, `ctx.dispatch`, `ctx.schedule`) cannot be:
    /// it was not declared durable, or there is no store or unit of work to hold it.
    #[error("command `{command}` cannot be dispatched durably: {reason}")]
    NotDurable {
        /// The command's Rust type.
        command: &'static str,
        /// What is missing.
        reason: &'static str,
    },
    /// Another writer appended to a stream this command appended to: nothing was committed.
    /// Retry with fresh state (the `RetryOnConflict` layer does).
    #[error(transparent)]
    Conflict(#[from] crate::store::Conflict),
    /// An event could not be encoded for the outbox.
    #[error("event `{event}` could not be encoded for the outbox")]
    Encode {
        /// The event's name.
        event: &'static str,
        /// The codec's error.
        #[source]
        source: crate::codec::CodecError,
    },
    /// The command's handler panicked. With a store its unit of work was rolled back and
    /// nothing of it committed.
    #[error("handler `{handler}` panicked: {reason}")]
    Panicked {
        /// The handler.
        handler: &'static str,
        /// The panic message.
        reason: String,
    },
    /// A command was sent with `App::send` (or an event published with `App::publish`) from
    /// inside a handler that runs in a unit of work of the store, where it would have
    /// committed apart from that unit of work. Nothing of it ran.
    #[error(
        "`{message}` was sent through `App` from inside a handler's unit of work, where it would commit on its own: send it with `ctx.send(..)` to make it part of the handler's unit of work, or from a task of its own (`tokio::spawn`) to commit it separately"
    )]
    OutsideUnit {
        /// The command's Rust type, or the event's name.
        message: &'static str,
    },
    /// A command or query answered by another process got no answer: the transport failed,
    /// the answer did not come in time, or the framework failed on the other side.
    #[error("{kind} `{message}` is answered by process `{process}`, which did not: {reason}")]
    Remote {
        /// Command or query.
        kind: MessageKind,
        /// The message's name.
        message: &'static str,
        /// The process that answers it.
        process: String,
        /// What went wrong.
        reason: String,
    },
    /// A command answered by another process cannot travel there: it, its output or its
    /// error has no serde (a durable command, whose handler runs there through the outbox).
    #[error(
        "{kind} `{message}` is answered by process `{process}`, but cannot travel there: derive Serialize and Deserialize on it, its output and its error, or dispatch it durably"
    )]
    CannotTravel {
        /// Command or query.
        kind: MessageKind,
        /// The message's name.
        message: &'static str,
        /// The process that answers it.
        process: String,
    },
    /// A middleware layer failed the dispatch (a timeout, a rejection, ...).
    #[error("middleware failed {kind} `{message}`")]
    Middleware {
        /// Command, query or event.
        kind: MessageKind,
        /// The message's stable name.
        message: &'static str,
        /// The layer's error.
        #[source]
        source: BoxError,
    },
}

impl From<crate::store::AppendError> for DispatchFailure {
    fn from(error: crate::store::AppendError) -> Self {
        match error {
            crate::store::AppendError::Conflict(conflict) => DispatchFailure::Conflict(conflict),
            crate::store::AppendError::Store(store) => DispatchFailure::Store(store),
        }
    }
}

impl<E> From<DispatchFailure> for DispatchError<E> {
    #[cold]
    fn from(failure: DispatchFailure) -> Self {
        DispatchError::Failed(Box::new(failure))
    }
}

impl<E> From<crate::store::AppendError> for DispatchError<E> {
    #[cold]
    fn from(error: crate::store::AppendError) -> Self {
        DispatchFailure::from(error).into()
    }
}

impl<E> From<crate::store::StoreError> for DispatchError<E> {
    #[cold]
    fn from(error: crate::store::StoreError) -> Self {
        DispatchFailure::Store(error).into()
    }
}

impl<E> From<crate::store::Conflict> for DispatchError<E> {
    #[cold]
    fn from(conflict: crate::store::Conflict) -> Self {
        DispatchFailure::Conflict(conflict).into()
    }
}

impl<E> DispatchError<E> {
    /// Whether another writer changed a stream first: retrying with fresh state may succeed.
    pub fn is_conflict(&self) -> bool {
        self.conflict().is_some()
    }

    /// The conflict, if another writer changed a stream first.
    pub fn conflict(&self) -> Option<&crate::store::Conflict> {
        match self.failure() {
            Some(DispatchFailure::Conflict(conflict)) => Some(conflict),
            _ => None,
        }
    }

    /// The handler's own error, if that is what failed.
    pub fn handler_error(&self) -> Option<&E> {
        match self {
            DispatchError::Handler(e) => Some(e),
            DispatchError::Failed(_) => None,
        }
    }

    /// The handler's own error, if that is what failed.
    pub fn into_handler_error(self) -> Option<E> {
        match self {
            DispatchError::Handler(e) => Some(e),
            DispatchError::Failed(_) => None,
        }
    }

    /// The dispatch's failure, if it was not the handler's own error.
    pub fn failure(&self) -> Option<&DispatchFailure> {
        match self {
            DispatchError::Handler(_) => None,
            DispatchError::Failed(failure) => Some(failure),
        }
    }

    /// The dispatch's failure, or the error itself (`Err(DispatchError::Handler(e))`) when it
    /// is the handler's own. Handy for matching: after
    /// `app.send(cmd).await.map_err(DispatchError::into_failure)`, the arms read
    /// `Err(Ok(DispatchFailure::Conflict(conflict)))` and
    /// `Err(Err(DispatchError::Handler(e)))`.
    pub fn into_failure(self) -> Result<DispatchFailure, Self> {
        match self {
            DispatchError::Failed(failure) => Ok(*failure),
            handler => Err(handler),
        }
    }
}

impl DispatchError<Infallible> {
    /// The same failure, for a caller whose handler error is `E` (nothing here is a handler's
    /// error).
    pub fn widen<E>(self) -> DispatchError<E> {
        match self {
            DispatchError::Handler(never) => match never {},
            DispatchError::Failed(failure) => DispatchError::Failed(failure),
        }
    }
}

/// One problem in the wiring of an app, found by `build()`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WiringProblem {
    /// A declared or used command or query has no handler.
    NoHandler {
        /// Command or query.
        kind: MessageKind,
        /// The message's Rust type.
        message: &'static str,
    },
    /// A command or query has more than one handler.
    DuplicateHandlers {
        /// Command or query.
        kind: MessageKind,
        /// The message's Rust type.
        message: &'static str,
        /// Every handler found.
        handlers: Vec<&'static str>,
    },
    /// Two different event types claim the same name and version.
    EventNameClash {
        /// The contested name.
        name: &'static str,
        /// The contested version.
        version: u32,
        /// The Rust types claiming it.
        types: Vec<&'static str>,
    },
    /// One group has several subscribers for the same event.
    DuplicateSubscribers {
        /// The group.
        group: &'static str,
        /// The event's name.
        event: &'static str,
        /// Every subscriber found.
        handlers: Vec<&'static str>,
    },
    /// A handler extracts state that was never provided with `.state(..)`.
    MissingState {
        /// The handler's name.
        handler: &'static str,
        /// The message it handles.
        message: &'static str,
        /// The missing state's type.
        state: &'static str,
    },
    /// An event of version `version` lacks the upcaster from an older version, so stored
    /// payloads of that version could not be read.
    MissingUpcaster {
        /// The event's name.
        event: &'static str,
        /// Its current version.
        version: u32,
        /// The version with no upcaster to the next.
        from: u32,
    },
    /// An upcaster reads a version at or above the event's current one (or an event no
    /// registration knows).
    StrayUpcaster {
        /// The event's name.
        event: &'static str,
        /// The version it reads.
        from: u32,
        /// The event's current version, if the event is known.
        current: Option<u32>,
    },
    /// The app was built outside a tokio runtime.
    NoRuntime,
    /// The routing of groups to processes and transports does not fit the app: what is wrong,
    /// naming the process, group, module or transport.
    Routing(String),
}

impl fmt::Display for WiringProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WiringProblem::NoHandler { kind, message } => write!(
                f,
                "{kind} `{message}` has no handler; add #[{kind}_handler] to an async fn that takes it"
            ),
            WiringProblem::DuplicateHandlers {
                kind,
                message,
                handlers,
            } => {
                write!(f, "{kind} `{message}` has {} handlers (", handlers.len())?;
                write_list(f, handlers)?;
                write!(f, "); a {kind} has exactly one handler")
            }
            WiringProblem::EventNameClash {
                name,
                version,
                types,
            } => {
                write!(
                    f,
                    "event name `{name}` version {version} is used by {} types (",
                    types.len()
                )?;
                write_list(f, types)?;
                write!(f, "); give each its own #[event(name = \"...\")]")
            }
            WiringProblem::DuplicateSubscribers {
                group,
                event,
                handlers,
            } => {
                write!(
                    f,
                    "group `{group}` has {} subscribers for event `{event}` (",
                    handlers.len()
                )?;
                write_list(f, handlers)?;
                write!(f, "); a group handles an event in one subscriber")
            }
            WiringProblem::MissingState {
                handler,
                message,
                state,
            } => write!(
                f,
                "handler `{handler}` for `{message}` extracts state `{state}`, which was never provided; add `.state(..)` with a `{state}` to the builder"
            ),
            WiringProblem::MissingUpcaster {
                event,
                version,
                from,
            } => write!(
                f,
                "event `{event}` is at version {version} but has no upcaster from version {from}; add `.upcaster(\"{event}\", {from}, ..)` to the builder so that stored v{from} payloads can be read"
            ),
            WiringProblem::StrayUpcaster {
                event,
                from,
                current: Some(current),
            } => write!(
                f,
                "an upcaster reads `{event}` version {from}, but the event is at version {current}; upcasters read older versions only"
            ),
            WiringProblem::StrayUpcaster {
                event,
                from,
                current: None,
            } => write!(
                f,
                "an upcaster reads `{event}` version {from}, but no registered event or aggregate has that name"
            ),
            WiringProblem::Routing(problem) => f.write_str(problem),
            WiringProblem::NoRuntime => f.write_str(
                "the app was built outside a tokio runtime; call `build().await` from within one",
            ),
        }
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, items: &[&'static str]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "`{item}`")?;
    }
    Ok(())
}

/// The app could not be built; every wiring problem found is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The wiring has problems.
    #[error("{}", WiringReport(.0))]
    Wiring(Vec<WiringProblem>),
}

impl BuildError {
    /// Every problem found.
    pub fn problems(&self) -> &[WiringProblem] {
        match self {
            BuildError::Wiring(problems) => problems,
        }
    }
}

struct WiringReport<'a>(&'a [WiringProblem]);

impl fmt::Display for WiringReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "the app has {n} wiring problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for (i, problem) in self.0.iter().enumerate() {
            write!(f, "\n  {}. {problem}", i + 1)?;
        }
        Ok(())
    }
}

/// A background subscriber's failure, as logged and counted.
#[derive(Debug, thiserror::Error)]
#[error("subscriber `{handler}` ({delivery}) failed on event `{event}` (message {message_id})")]
pub struct DeliveryError {
    /// The subscriber.
    pub handler: &'static str,
    /// Inline or its group.
    pub delivery: Delivery,
    /// The event's name.
    pub event: &'static str,
    /// The event's id.
    pub message_id: uuid::Uuid,
    /// What went wrong.
    #[source]
    pub source: BoxError,
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::mem::size_of;

    use super::*;

    #[test]
    fn a_report_prints_the_causes_once() {
        let failure = DispatchFailure::Subscriber {
            handler: "shop::notify",
            event: "shop.order_placed",
            message_id: uuid::Uuid::nil(),
            source: Box::new(crate::store::StoreError::new(
                "begin a transaction",
                std::io::Error::other("connection refused"),
            )),
        };
        assert_eq!(
            Report(&failure).to_string(),
            "inline subscriber `shop::notify` failed on event `shop.order_placed` (message 00000000-0000-0000-0000-000000000000): the store failed to begin a transaction: connection refused"
        );
        // A cause that its error already prints is not repeated.
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Verbose(#[source] std::io::Error);
        let verbose = Verbose(std::io::Error::other("inner"));
        assert_eq!(Report(&verbose).to_string(), "outer: inner");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the handler refused")]
    struct Refused;

    // The failures are boxed so that a successful `send` moves as little as the handler's own
    // result: a regression here (a variant stored inline) shows up in the dispatch benchmark.
    #[test]
    fn a_dispatch_result_fits_in_two_words() {
        assert_eq!(size_of::<DispatchError<Infallible>>(), size_of::<usize>());
        assert_eq!(size_of::<DispatchError<Refused>>(), size_of::<usize>());
        assert_eq!(size_of::<Result<u64, DispatchError<Infallible>>>(), 16);
        assert_eq!(size_of::<Result<(), DispatchError<Refused>>>(), 16);
    }

    #[test]
    fn the_failure_comes_back_whole_and_the_handlers_error_stays_typed() {
        let conflict = crate::store::Conflict {
            stream: "cart-1".into(),
            version: 3,
        };
        let error: DispatchError<Refused> = conflict.clone().into();
        assert!(error.is_conflict());
        assert_eq!(error.conflict(), Some(&conflict));
        assert_eq!(error.to_string(), conflict.to_string());
        assert!(matches!(
            error.into_failure(),
            Ok(DispatchFailure::Conflict(c)) if c == conflict
        ));

        let own = DispatchError::Handler(Refused);
        assert!(!own.is_conflict() && own.failure().is_none());
        assert_eq!(own.to_string(), "the handler refused");
        assert!(matches!(
            own.into_failure(),
            Err(DispatchError::Handler(Refused))
        ));

        let widened: DispatchError<Refused> =
            DispatchError::<Infallible>::from(DispatchFailure::TooManyEvents {
                limit: 3,
                event: "tests.looped",
            })
            .widen();
        assert!(matches!(
            widened.failure(),
            Some(DispatchFailure::TooManyEvents {
                limit: 3,
                event: "tests.looped"
            })
        ));
    }
}
