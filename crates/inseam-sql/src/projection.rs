//! Projections: read models kept by a durable subscriber group, rebuildable from the event
//! store.
//!
//! A [`Projection`] applies the events of its set to its tables, in the delivery's transaction
//! (so its checkpoint is the group's inbox: an event applies once). [`SqlStore::rebuild`]
//! replays every stored stream event of the set into a fresh copy of the tables while the live
//! model keeps serving reads, then swaps the copy in; the group is paused meanwhile and resumes
//! on the new model, skipping what the replay already applied.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inseam_core::extract::PrepareCx;
use inseam_core::handler::{EventHandler, Handler, HandlerFuture, handler_future};
use inseam_core::registry::Registration;
use inseam_core::saga::EventVisitor;
use inseam_core::{
    App, AppBuilder, BoxError, Delivery, Envelope, Event, EventContext, EventSet, Halt, Metadata,
    RawEnvelope, Reject,
};
use sqlx::{AssertSqlSafe, Row as _};

use crate::conn::SqlTx;

use crate::error::{Context as _, Error, Result};
use crate::store::{SqlStore, Transactional as _, from_micros, micros};

/// Which copy of a read model a projection writes: the live one, or the one a rebuild fills
/// before it is swapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    next: bool,
}

impl Model {
    /// The live model.
    pub const LIVE: Model = Model { next: false };
    /// The model a rebuild fills.
    pub const NEXT: Model = Model { next: true };

    /// The name of table `base` in this model (`base`, or `base__next` during a rebuild).
    pub fn table(&self, base: &str) -> String {
        if self.next {
            format!("{base}__next")
        } else {
            base.to_owned()
        }
    }

    /// Whether this is the rebuild's copy.
    pub fn is_next(&self) -> bool {
        self.next
    }
}

/// What a projection knows of the event it applies besides its payload.
#[derive(Debug, Clone, Copy)]
pub struct EventInfo<'a> {
    /// Its ids.
    pub metadata: Metadata,
    /// Its key (for an aggregate's event without a key of its own: the aggregate's id).
    pub key: Option<&'a str>,
    /// When it happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// What a projection does when applying an event fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Retry with backoff, then dead-letter (the relay's policy); other keys keep flowing.
    #[default]
    Retry,
    /// Dead-letter the event at once and move on.
    Skip,
    /// Pause the whole projection until [`SqlStore::resume`]: nothing is applied past the
    /// failing event.
    Stop,
}

/// A read model maintained from events.
///
/// ```ignore
/// struct OrderSummaries;
///
/// impl Projection for OrderSummaries {
///     const NAME: &'static str = "order_summaries";
///     type Event = OrderEvent;
///     fn tables(&self) -> &'static [&'static str] { &["order_summary"] }
///     async fn create(&self, tx: &mut SqlTx, model: Model) -> Result<(), sqlx::Error> {
///         let sql = format!("CREATE TABLE IF NOT EXISTS {} (..)", model.table("order_summary"));
///         sqlx::query(AssertSqlSafe(sql)).execute(tx).await.map(drop)
///     }
///     async fn apply(&self, event: &OrderEvent, info: &EventInfo<'_>, tx: &mut SqlTx, model: Model) -> Result<(), BoxError> { .. }
/// }
/// ```
pub trait Projection: Send + Sync + 'static {
    /// Its subscriber group: lag, pause and rebuild go by this name.
    const NAME: &'static str;
    /// What to do when [`apply`](Self::apply) fails.
    const ON_ERROR: OnError = OnError::Retry;
    /// Whether a rebuild fills a copy and swaps it in (the live model serves meanwhile), or
    /// empties the live model and refills it in place.
    const SWAP: bool = true;
    /// The events it applies.
    type Event: EventSet;

    /// The base names of its tables (swapped on rebuild).
    fn tables(&self) -> &'static [&'static str];

    /// Creates its tables in `model` if they do not exist (names from `model.table(..)`).
    fn create(
        &self,
        tx: &mut SqlTx,
        model: Model,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Applies one event to `model`, in the delivery's transaction.
    fn apply(
        &self,
        event: &Self::Event,
        info: &EventInfo<'_>,
        tx: &mut SqlTx,
        model: Model,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The subscriber of projection `P` for event `E`.
pub struct ProjectionStep<P, E>(PhantomData<fn() -> (P, E)>);

impl<P: Projection, E: Event> std::fmt::Debug for ProjectionStep<P, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProjectionStep({}, {})", P::NAME, E::NAME)
    }
}

impl<P: Projection, E: Event> EventHandler for ProjectionStep<P, E> {
    type Event = E;
    type Prepared = Arc<P>;
    const NAME: &'static str = P::NAME;
    const DELIVERY: Delivery = Delivery::Group(P::NAME);
    const ROLE: inseam_core::catalog::Role = inseam_core::catalog::Role::Projection;

    fn prepare(cx: &mut PrepareCx<'_>) -> Option<Arc<P>> {
        let projection = cx.resources().get::<Arc<P>>().cloned();
        if projection.is_none() {
            cx.missing::<Arc<P>>();
        }
        projection
    }

    fn call<'a>(
        projection: &'a Arc<P>,
        event: &'a Envelope<E>,
        ctx: &'a mut EventContext<'_>,
    ) -> HandlerFuture<'a, Result<(), BoxError>> {
        handler_future(async move {
            let raw = event.to_raw()?;
            let decoded = P::Event::decode(&raw)?;
            let model = if ctx.is_replay() {
                Model::NEXT
            } else {
                Model::LIVE
            };
            let info = EventInfo {
                metadata: event.metadata,
                key: event.key.as_deref(),
                occurred_at: event.occurred_at,
            };
            let applied = projection
                .apply(&decoded, &info, ctx.tx().await?, model)
                .await;
            let Err(error) = applied else {
                return Ok(());
            };
            match P::ON_ERROR {
                OnError::Retry => Err(error),
                OnError::Skip => Err(Box::new(Reject(error)) as BoxError),
                OnError::Stop => Err(Box::new(Halt(error)) as BoxError),
            }
        })
    }
}

impl<P: Projection, E: Event> Handler for ProjectionStep<P, E> {
    const REGISTRATION: Registration = Registration::event::<Self>();
}

/// Registers projections on an app builder.
pub trait Projections {
    /// Registers `projection`: a subscriber in group `P::NAME` for every event of its set.
    fn projection<P: Projection>(self, projection: P) -> Self;
}

impl Projections for AppBuilder {
    fn projection<P: Projection>(self, projection: P) -> Self {
        struct Collect<P>(Option<AppBuilder>, PhantomData<fn() -> P>);
        impl<P: Projection> EventVisitor for Collect<P> {
            fn visit<E: Event>(&mut self) {
                self.0 = self.0.take().map(|b| b.handler::<ProjectionStep<P, E>>());
            }
        }
        let projection = Arc::new(projection);
        let mut registered = self.state_ref::<Registered>().cloned().unwrap_or_default();
        registered.0.retain(|p| p.name() != P::NAME);
        registered.0.push(Arc::new(Erased(projection.clone())));
        let builder = self.state(projection).state(registered);
        let mut collect = Collect::<P>(Some(builder), PhantomData);
        P::Event::visit(&mut collect);
        collect.0.unwrap_or_default()
    }
}

/// A registered projection, its type erased, so that tools can find it by name.
trait AnyProjection: Send + Sync {
    fn name(&self) -> &'static str;
    fn rebuild<'a>(
        &'a self,
        store: &'a SqlStore,
        app: &'a App,
        progress: &'a mut (dyn FnMut(&RebuildProgress) + Send),
    ) -> futures_util::future::BoxFuture<'a, Result<Rebuilt>>;
}

struct Erased<P>(Arc<P>);

impl<P: Projection> AnyProjection for Erased<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn rebuild<'a>(
        &'a self,
        store: &'a SqlStore,
        app: &'a App,
        progress: &'a mut (dyn FnMut(&RebuildProgress) + Send),
    ) -> futures_util::future::BoxFuture<'a, Result<Rebuilt>> {
        Box::pin(store.rebuild(app, &*self.0, progress))
    }
}

/// The projections registered on an app with [`Projections::projection`], by name.
#[derive(Clone, Default)]
struct Registered(Vec<Arc<dyn AnyProjection>>);

/// The names of the projections registered on `app` with [`Projections::projection`], in
/// registration order.
pub fn projection_names(app: &App) -> Vec<&'static str> {
    app.state::<Registered>()
        .map(|r| r.0.iter().map(|p| p.name()).collect())
        .unwrap_or_default()
}

/// How a rebuild is going.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    /// Events replayed so far.
    pub done: u64,
    /// Events to replay (counted at the start).
    pub total: u64,
    /// Events per second so far.
    pub rate: f64,
    /// The time left at this rate.
    pub eta: Option<Duration>,
}

/// A finished rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt {
    /// Events replayed.
    pub events: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// A paused group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// The group.
    pub group: String,
    /// Why.
    pub reason: String,
    /// Since when.
    pub since: chrono::DateTime<chrono::Utc>,
}

const REPLAY_BATCH: i64 = 1000;

impl SqlStore {
    /// Creates the live tables of `projection` if they do not exist.
    pub async fn install<P: Projection>(&self, projection: &P) -> Result<()> {
        let mut tx = self.shared.pool.begin().await.context("begin")?;
        projection
            .create(&mut tx, Model::LIVE)
            .await
            .context("create a projection's tables")?;
        tx.commit().await.context("commit")
    }

    /// Stops delivering to `group` (on every instance) until [`resume`](Self::resume).
    pub async fn pause(&self, group: &str, reason: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.shared.sql.pause.clone()))
            .bind(group.to_owned())
            .bind(reason.to_owned())
            .bind(micros(self.shared.now()))
            .execute(&self.shared.pool)
            .await
            .context("pause a group")?;
        Ok(())
    }

    /// Resumes a paused group.
    pub async fn resume(&self, group: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.shared.sql.resume.clone()))
            .bind(group.to_owned())
            .execute(&self.shared.pool)
            .await
            .context("resume a group")?;
        self.shared.wake();
        Ok(())
    }

    /// The paused groups.
    pub async fn paused(&self) -> Result<Vec<Paused>> {
        let rows = sqlx::query(AssertSqlSafe(self.shared.sql.paused.clone()))
            .fetch_all(&self.shared.pool)
            .await
            .context("list paused groups")?;
        rows.iter()
            .map(|row| {
                Ok(Paused {
                    group: row.try_get(0)?,
                    reason: row.try_get(1)?,
                    since: from_micros(row.try_get(2)?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .context("list paused groups")
    }

    /// Rebuilds projection `P` from the event store: pauses its group, replays every stored
    /// stream event of its set, oldest first, into a fresh copy of its tables (or, without
    /// `SWAP`, into its emptied live tables), swaps the copy in, and resumes the group, which
    /// then skips the events the replay applied. `progress` is called after every batch.
    ///
    /// Only events of streams are kept for good; other events a projection received live are
    /// not replayed.
    pub async fn rebuild<P: Projection>(
        &self,
        app: &App,
        projection: &P,
        mut progress: impl FnMut(&RebuildProgress),
    ) -> Result<Rebuilt> {
        let shared = &self.shared;
        let group = P::NAME;
        let shadow = format!("rebuild:{group}");
        let model = if P::SWAP { Model::NEXT } else { Model::LIVE };
        let names: Vec<&str> = P::Event::events().into_iter().map(|(n, _)| n).collect();
        let names = serde_json::to_string(&names).unwrap_or_default();
        self.pause(group, "rebuilding").await?;
        let started = Instant::now();
        let outcome = async {
            let (mut tx, turn) = shared.begin().await?;
            for table in projection.tables() {
                if P::SWAP || model.is_next() {
                    drop_table(&mut tx, &model.table(table)).await?;
                } else {
                    drop_table(&mut tx, table).await?;
                }
            }
            projection
                .create(&mut tx, model)
                .await
                .context("create the rebuilt tables")?;
            sqlx::query(AssertSqlSafe(shared.sql.clear_inbox.clone()))
                .bind(shadow.clone())
                .execute(&mut tx)
                .await
                .context("clear the rebuild's inbox")?;
            let total: i64 = sqlx::query(AssertSqlSafe(shared.sql.count_replay.clone()))
                .bind(names.clone())
                .fetch_one(&mut tx)
                .await
                .and_then(|row| row.try_get(0))
                .context("count the events to replay")?;
            tx.commit().await.context("commit the rebuild's start")?;
            drop(turn);
            let total = u64::try_from(total).unwrap_or_default();
            let mut done: u64 = 0;
            let mut after: (i64, String, i64) = (i64::MIN, String::new(), 0);
            loop {
                let mut unit = self.begin_unit().await?;
                let rows = sqlx::query(AssertSqlSafe(shared.sql.replay_batch.clone()))
                    .bind(names.clone())
                    .bind(after.0)
                    .bind(after.1.clone())
                    .bind(after.2)
                    .bind(REPLAY_BATCH)
                    .fetch_all(&mut unit.tx)
                    .await
                    .context("read events to replay")?;
                if rows.is_empty() {
                    unit.commit_unit().await.context("end the replay")?;
                    break;
                }
                let mut ids = Vec::with_capacity(rows.len());
                for row in &rows {
                    let message_id: String = row.try_get(0).context("read a replayed event")?;
                    let bytes: Vec<u8> = row.try_get(1).context("read a replayed event")?;
                    after = (
                        row.try_get(2).context("read a replayed event")?,
                        row.try_get(3).context("read a replayed event")?,
                        row.try_get(4).context("read a replayed event")?,
                    );
                    let raw = RawEnvelope::from_json(&bytes)
                        .map_err(|e| replay_failed(&message_id, Box::new(e)))?;
                    let raw = app
                        .upcast(raw)
                        .map_err(|e| replay_failed(&message_id, Box::new(e)))?;
                    app.replay(group, &raw, &mut unit)
                        .await
                        .map_err(|e| replay_failed(&message_id, Box::new(e)))?;
                    ids.push(message_id);
                }
                let ids = serde_json::to_string(&ids).unwrap_or_default();
                sqlx::query(AssertSqlSafe(shared.sql.insert_inbox.clone()))
                    .bind(shadow.clone())
                    .bind(ids)
                    .bind(micros(shared.now()))
                    .execute(&mut unit.tx)
                    .await
                    .context("record replayed events")?;
                unit.commit_unit().await.context("commit a replayed batch")?;
                done += rows.len() as u64;
                let elapsed = started.elapsed().as_secs_f64();
                let rate = if elapsed > 0.0 {
                    done as f64 / elapsed
                } else {
                    0.0
                };
                let eta = (rate > 0.0)
                    .then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate));
                let report = RebuildProgress {
                    done,
                    total,
                    rate,
                    eta,
                };
                tracing::info!(target: "inseam::projection", group, done, total, rate, eta_s = eta.map(|e| e.as_secs_f64()), "rebuilding");
                progress(&report);
            }
            // Swap: the rebuilt tables, the inbox of what they hold, and the group resumes.
            let (mut tx, turn) = shared.begin().await?;
            if P::SWAP {
                for table in projection.tables() {
                    drop_table(&mut tx, table).await?;
                    let rename = format!(
                        "ALTER TABLE {} RENAME TO {}",
                        quoted(&model.table(table))?,
                        quoted(table)?
                    );
                    sqlx::query(AssertSqlSafe(rename))
                        .execute(&mut tx)
                        .await
                        .context("swap a rebuilt table in")?;
                }
            }
            sqlx::query(AssertSqlSafe(shared.sql.clear_inbox.clone()))
                .bind(group)
                .execute(&mut tx)
                .await
                .context("reset the group's inbox")?;
            sqlx::query(AssertSqlSafe(shared.sql.rename_inbox.clone()))
                .bind(group)
                .bind(shadow.clone())
                .execute(&mut tx)
                .await
                .context("move the replayed events to the group's inbox")?;
            sqlx::query(AssertSqlSafe(shared.sql.resume.clone()))
                .bind(group)
                .execute(&mut tx)
                .await
                .context("resume the group")?;
            tx.commit().await.context("commit the swap")?;
            drop(turn);
            shared.wake();
            Ok(done)
        }
        .await;
        match outcome {
            Ok(events) => {
                let elapsed = started.elapsed();
                tracing::info!(target: "inseam::projection", group, events, elapsed_s = elapsed.as_secs_f64(), "rebuilt and swapped in");
                Ok(Rebuilt { events, elapsed })
            }
            Err(error) => {
                if P::SWAP {
                    // The live model is untouched: let it go on.
                    self.resume(group).await?;
                }
                Err(error)
            }
        }
    }
}

impl SqlStore {
    /// Rebuilds the projection registered on `app` under `name` (its group), as
    /// [`rebuild`](Self::rebuild) does: for tools that know a projection by name only. Fails
    /// with [`Error::UnknownProjection`], listing the registered ones, when there is none.
    pub async fn rebuild_named(
        &self,
        app: &App,
        name: &str,
        mut progress: impl FnMut(&RebuildProgress) + Send,
    ) -> Result<Rebuilt> {
        let found = app
            .state::<Registered>()
            .and_then(|r| r.0.iter().find(|p| p.name() == name).cloned());
        let Some(projection) = found else {
            return Err(Error::UnknownProjection {
                name: name.to_owned(),
                known: projection_names(app).join(", "),
            });
        };
        projection.rebuild(self, app, &mut progress).await
    }
}

fn replay_failed(message_id: &str, source: BoxError) -> Error {
    Error::Replay {
        message_id: message_id.to_owned(),
        source,
    }
}

/// A table name as a quoted identifier; only plain names are accepted.
fn quoted(name: &str) -> Result<String> {
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        Ok(format!("\"{name}\""))
    } else {
        Err(Error::InvalidTable {
            name: name.to_owned(),
        })
    }
}

async fn drop_table(tx: &mut SqlTx, name: &str) -> Result<()> {
    let sql = format!("DROP TABLE IF EXISTS {}", quoted(name)?);
    sqlx::query(AssertSqlSafe(sql))
        .execute(tx)
        .await
        .context("drop a table")?;
    Ok(())
}
