//! Sagas (process managers): persisted state keyed by a correlation id, started by an event,
//! advanced by events, issuing durable commands, compensating on failure, with timeouts.
//!
//! A saga is a durable subscriber group of its own (`Saga::NAME`). Each event of its flow is
//! delivered in the relay's transaction; the saga's state is loaded, the event handled, and the
//! new state, the commands it dispatched, the timeouts it set and the inbox row commit together.
//! A redelivered event is skipped by the inbox; a failing step is retried (and dead-lettered)
//! like any delivery, with the state untouched.
//!
//! Choreography needs none of this: plain `#[event_handler]`s that react to each other's events
//! stay first-class.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::EventSet;
use crate::app::App;
use crate::catalog::{Published, Role};
use crate::codec::Json;
use crate::context::EventContext;
use crate::envelope::{Envelope, Metadata};
use crate::error::{BoxError, DispatchError};
use crate::extract::PrepareCx;
use crate::handler::{Delivery, EventHandler, HandlerFuture, handler_future};
use crate::message::{Command, Event};
use crate::registry::Registration;
use crate::store::{ProcessState, StoreError};

/// A long-running flow across modules.
///
/// ```ignore
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// struct OrderSaga { order: String, compensations: Compensations }
///
/// impl Saga for OrderSaga {
///     const NAME: &'static str = "order_saga";
///     type Event = OrderFlow; // #[derive(EventSet)] enum of the events it reacts to
///     // What it sends, for the catalog.
///     const SENDS: &'static [&'static str] = &[ReserveStock::NAME, ReleaseStock::NAME];
///
///     fn starts(event: &OrderFlow) -> bool { matches!(event, OrderFlow::Placed(_)) }
///
///     async fn handle(&mut self, event: &OrderFlow, ctx: &mut SagaContext<'_, '_>) -> Result<(), BoxError> {
///         match event {
///             OrderFlow::Placed(e) => { ctx.dispatch(ReserveStock { .. }).await?; }
///             OrderFlow::PaymentDeclined(_) => {
///                 ctx.compensate(&mut self.compensations).await?;
///                 ctx.complete();
///             }
///             ..
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Saga: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The saga's name: its subscriber group, and the kind of its stored state.
    const NAME: &'static str;
    /// The events it reacts to.
    type Event: EventSet;
    /// The commands it sends, for the catalog: `&[ReserveStock::NAME, ChargePayment::NAME]`.
    const SENDS: &'static [&'static str] = &[];
    /// The events it publishes, for the catalog.
    const PUBLISHES: &'static [Published] = &[];

    /// Whether `event` starts a new instance. An event for an instance that does not exist and
    /// does not start one is ignored.
    fn starts(event: &Self::Event) -> bool;

    /// Advances the saga on an event of its flow (same correlation id).
    fn handle(
        &mut self,
        event: &Self::Event,
        ctx: &mut SagaContext<'_, '_>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// A timeout set with [`SagaContext::timeout`] fired (unless the saga completed first).
    fn timeout(
        &mut self,
        name: &str,
        ctx: &mut SagaContext<'_, '_>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (name, ctx);
        async { Ok(()) }
    }
}

/// What a saga step can do: dispatch durable commands, publish events, set timeouts, complete.
/// Everything it does commits with the saga's new state.
pub struct SagaContext<'a, 'b> {
    ctx: &'a mut EventContext<'b>,
    saga: &'static str,
    id: &'a str,
    done: bool,
}

impl std::fmt::Debug for SagaContext<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaContext")
            .field("saga", &self.saga)
            .field("id", &self.id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl SagaContext<'_, '_> {
    /// This instance's id: the flow's correlation id.
    pub fn id(&self) -> &str {
        self.id
    }

    /// The ids of the message being handled.
    pub fn metadata(&self) -> Metadata {
        self.ctx.metadata()
    }

    /// Now, by the app's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.ctx.app().now()
    }

    /// The app.
    pub fn app(&self) -> &App {
        self.ctx.app()
    }

    /// Sends a command in the flow, as part of this step's unit of work: it commits with the
    /// saga's new state, or not at all (see [`EventContext::send`]).
    pub async fn send<C: Command>(
        &mut self,
        command: C,
    ) -> Result<C::Output, DispatchError<C::Error>> {
        self.ctx.send(command).await
    }

    /// Dispatches a durable command in the flow, committed with the saga's state.
    pub async fn dispatch<C>(&mut self, command: C) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + Serialize,
    {
        self.ctx.dispatch(command).await
    }

    /// Dispatches a durable command to run at `at`.
    pub async fn schedule<C>(
        &mut self,
        at: DateTime<Utc>,
        command: C,
    ) -> Result<Uuid, DispatchError<Infallible>>
    where
        C: Command + Serialize,
    {
        self.ctx.schedule(at, command).await
    }

    /// Publishes an event in the flow.
    pub fn publish<E: Event>(&mut self, event: E) {
        self.ctx.publish(event);
    }

    /// Sets a timeout: at `at`, [`Saga::timeout`] runs with `name`, unless the saga completed.
    pub async fn timeout(
        &mut self,
        name: &str,
        at: DateTime<Utc>,
    ) -> Result<Uuid, DispatchError<Infallible>> {
        let timeout = SagaTimeout {
            saga: self.saga.to_owned(),
            id: self.id.to_owned(),
            name: name.to_owned(),
        };
        crate::context::deliver_later(self.ctx, timeout, self.saga, at).await
    }

    /// Runs the planned compensations, most recent first, as durable commands, and empties
    /// the plan.
    pub async fn compensate(
        &mut self,
        plan: &mut Compensations,
    ) -> Result<(), DispatchError<Infallible>> {
        while let Some(step) = plan.0.pop() {
            crate::context::dispatch_named(self.ctx, &step.command, &step.payload).await?;
        }
        Ok(())
    }

    /// Marks the saga finished: its state is kept, later events and timeouts are ignored.
    pub fn complete(&mut self) {
        self.done = true;
    }

    /// Whether [`complete`](Self::complete) was called.
    pub fn is_complete(&self) -> bool {
        self.done
    }
}

/// Compensating commands planned as the saga's steps succeed, run most recent first by
/// [`SagaContext::compensate`]. Keep it in the saga's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Compensations(Vec<PlannedCommand>);

/// One planned compensation: a durable command's name and JSON payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedCommand {
    /// The command's name.
    pub command: String,
    /// Its JSON payload.
    pub payload: serde_json::Value,
}

impl Compensations {
    /// Plans `command` to undo the step that just succeeded.
    pub fn push<C: Command + Serialize>(&mut self, command: &C) -> Result<(), serde_json::Error> {
        self.0.push(PlannedCommand {
            command: C::NAME.to_owned(),
            payload: serde_json::to_value(command)?,
        });
        Ok(())
    }

    /// The planned commands' names, in the order they were planned.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|c| c.command.as_str()).collect()
    }

    /// Whether nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A saga's timeout, delivered to its group when due.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaTimeout {
    /// The saga's name.
    pub saga: String,
    /// The instance's id.
    pub id: String,
    /// The timeout's name.
    pub name: String,
}

impl Event for SagaTimeout {
    const NAME: &'static str = "inseam.saga_timeout";
    const VERSION: u32 = 1;
    type Codec = Json;

    fn key(&self) -> Option<String> {
        Some(format!("{}/{}", self.saga, self.id))
    }
}

/// Why a saga step failed outside the saga's own code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// Sagas keep their state in the store.
    #[error("saga `{saga}` needs a store: give the app one with `.store(..)` on the app builder")]
    NoStore {
        /// The saga.
        saga: &'static str,
    },
    /// The stored state does not deserialize.
    #[error("the stored state of saga `{saga}` instance `{id}` does not deserialize")]
    State {
        /// The saga.
        saga: &'static str,
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a timeout that fires after its saga completed was not needed, as flows show it.
pub const TIMEOUT_AFTER_COMPLETION: &str = "the saga completed";

enum Step<'a, E> {
    Event(&'a E),
    Timeout(&'a str),
}

/// Loads the instance, runs the step, saves the state: all in the delivery's unit of work.
async fn run<S: Saga>(
    ctx: &mut EventContext<'_>,
    id: &str,
    step: Step<'_, S::Event>,
) -> Result<(), BoxError> {
    let no_store = || SagaError::NoStore { saga: S::NAME };
    let stored = ctx
        .unit_of_work()
        .ok_or_else(no_store)?
        .load_process(S::NAME, id)
        .await?;
    let (mut saga, existed) = match stored {
        Some(stored) if stored.done => {
            if let (Step::Timeout(_), Some(uow)) = (&step, ctx.unit_of_work()) {
                uow.not_needed(TIMEOUT_AFTER_COMPLETION);
            }
            return Ok(());
        }
        Some(stored) => {
            let saga =
                serde_json::from_slice::<S>(&stored.state).map_err(|source| SagaError::State {
                    saga: S::NAME,
                    id: id.to_owned(),
                    source,
                })?;
            (saga, true)
        }
        None => (S::default(), false),
    };
    let mut saga_ctx = SagaContext {
        ctx: &mut *ctx,
        saga: S::NAME,
        id,
        done: false,
    };
    match step {
        Step::Event(event) => {
            if !existed && !S::starts(event) {
                return Ok(());
            }
            saga.handle(event, &mut saga_ctx).await?;
        }
        Step::Timeout(name) => {
            if !existed {
                return Ok(());
            }
            saga.timeout(name, &mut saga_ctx).await?;
        }
    }
    let done = saga_ctx.done;
    let state = serde_json::to_vec(&saga)?;
    ctx.unit_of_work()
        .ok_or_else(no_store)?
        .save_process(S::NAME, id, ProcessState { state, done })
        .await?;
    Ok(())
}

/// The subscriber of saga `S` for event `E` (one of `S::Event`'s).
pub struct SagaStep<S, E>(PhantomData<fn() -> (S, E)>);

impl<S: Saga, E: Event> std::fmt::Debug for SagaStep<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SagaStep({}, {})", S::NAME, E::NAME)
    }
}

impl<S: Saga, E: Event> EventHandler for SagaStep<S, E> {
    type Event = E;
    type Prepared = ();
    const NAME: &'static str = S::NAME;
    const DELIVERY: Delivery = Delivery::Group(S::NAME);
    const SENDS: &'static [&'static str] = S::SENDS;
    const PUBLISHES: &'static [Published] = S::PUBLISHES;
    const ROLE: Role = Role::Saga;

    fn prepare(_: &mut PrepareCx<'_>) -> Option<()> {
        Some(())
    }

    fn call<'a>(
        _: &'a (),
        event: &'a Envelope<E>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>> {
        handler_future(async move {
            // The typed event into the saga's event set, through its wire form.
            let raw = event.to_raw()?;
            let event = S::Event::decode(&raw)?;
            let id = raw.metadata.correlation_id.to_string();
            run::<S>(ctx, &id, Step::Event(&event)).await
        })
    }
}

/// The subscriber of saga `S` for its timeouts.
pub struct SagaTimeouts<S>(PhantomData<fn() -> S>);

impl<S: Saga> std::fmt::Debug for SagaTimeouts<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SagaTimeouts({})", S::NAME)
    }
}

impl<S: Saga> EventHandler for SagaTimeouts<S> {
    type Event = SagaTimeout;
    type Prepared = ();
    const NAME: &'static str = S::NAME;
    const DELIVERY: Delivery = Delivery::Group(S::NAME);
    const SENDS: &'static [&'static str] = S::SENDS;
    const PUBLISHES: &'static [Published] = S::PUBLISHES;
    const ROLE: Role = Role::Saga;

    fn prepare(_: &mut PrepareCx<'_>) -> Option<()> {
        Some(())
    }

    fn call<'a>(
        _: &'a (),
        event: &'a Envelope<SagaTimeout>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>> {
        handler_future(async move {
            if event.saga != S::NAME {
                return Ok(());
            }
            run::<S>(ctx, &event.id, Step::Timeout(&event.name)).await
        })
    }
}

/// Visits the event types of an event set.
pub trait EventVisitor {
    /// Called once per event type.
    fn visit<E: Event>(&mut self);
}

/// The registrations of saga `S`: one subscriber per event of its set, and its timeouts.
pub(crate) fn registrations<S: Saga>() -> Vec<Registration> {
    struct Collect<S>(Vec<Registration>, PhantomData<fn() -> S>);
    impl<S: Saga> EventVisitor for Collect<S> {
        fn visit<E: Event>(&mut self) {
            self.0.push(Registration::event::<SagaStep<S, E>>());
        }
    }
    let mut collect = Collect::<S>(Vec::new(), PhantomData);
    S::Event::visit(&mut collect);
    collect.0.push(Registration::event::<SagaTimeouts<S>>());
    collect.0
}
