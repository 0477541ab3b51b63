//! Projections on real databases: a read model kept live by its group, rebuilt from the event
//! store with progress while commands keep arriving, swapped in, and equal to both the live
//! model and the aggregates; error strategies skip and stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::BoxError;
use inseam::prelude::*;
use inseam::sql::SqlTx;
use inseam::sql::sqlx::{self, AssertSqlSafe, Row as _};
use inseam::sql::{
    EventInfo, Model, OnError, Projection, RebuildProgress, RelayOptions, SqlStoreOptions,
};
use inseam_tests::cart::{self, AddItems, Cart, CheckOut, CheckedOut, Gate, ItemAdded};
use inseam_tests::{Backend, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(120);

/// The events the totals follow.
#[derive(Debug, Clone, PartialEq, EventSet)]
enum TotalsEvent {
    Added(ItemAdded),
    CheckedOut(CheckedOut),
}

/// Per cart: items, total and whether it was checked out.
struct CartTotals;

impl Projection for CartTotals {
    const NAME: &'static str = "cart_totals";
    type Event = TotalsEvent;

    fn tables(&self) -> &'static [&'static str] {
        &["cart_totals"]
    }

    async fn create(&self, tx: &mut SqlTx, model: Model) -> Result<(), sqlx::Error> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (cart TEXT PRIMARY KEY, items BIGINT NOT NULL, total BIGINT NOT NULL, checked_out BIGINT NOT NULL)",
            model.table("cart_totals")
        );
        sqlx::query(AssertSqlSafe(sql)).execute(tx).await.map(drop)
    }

    async fn apply(
        &self,
        event: &TotalsEvent,
        info: &EventInfo<'_>,
        tx: &mut SqlTx,
        model: Model,
    ) -> Result<(), BoxError> {
        let cart = info.key.ok_or("a cart event without its cart")?.to_owned();
        let table = model.table("cart_totals");
        let (items, total, checked_out) = match event {
            TotalsEvent::Added(added) => (
                i64::from(added.qty),
                i64::from(added.qty) * i64::try_from(added.unit_price)?,
                0,
            ),
            TotalsEvent::CheckedOut(_) => (0, 0, 1),
        };
        let sql = format!(
            "INSERT INTO {table} (cart, items, total, checked_out) VALUES ($1, $2, $3, $4)
             ON CONFLICT (cart) DO UPDATE SET items = {table}.items + excluded.items,
                 total = {table}.total + excluded.total,
                 checked_out = MAX({table}.checked_out, excluded.checked_out)"
        );
        // PostgreSQL spells MAX of two values GREATEST.
        let sql = if tx.backend() == inseam::sql::Backend::Postgres {
            sql.replace("MAX(", "GREATEST(")
        } else {
            sql
        };
        sqlx::query(AssertSqlSafe(sql))
            .bind(cart)
            .bind(items)
            .bind(total)
            .bind(checked_out)
            .execute(tx)
            .await?;
        Ok(())
    }
}

async fn model(store: &SqlStore) -> Vec<(String, i64, i64, i64)> {
    sqlx::query("SELECT cart, items, total, checked_out FROM cart_totals ORDER BY cart")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn drained(store: &SqlStore, group: &str) {
    eventually(WAIT, group, || async {
        let lag = store.lag().await.unwrap();
        lag.groups
            .iter()
            .all(|g| g.group != group || g.pending == 0)
            .then_some(())
    })
    .await;
}

/// `INSEAM_REBUILD_EVENTS`, by default 100,000 on PostgreSQL and 20,000 on SQLite (which
/// runs the same code; the smaller count keeps the suite's time in check).
fn events_total(backend: Backend) -> u32 {
    std::env::var("INSEAM_REBUILD_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(match backend {
            Backend::Postgres => 100_000,
            Backend::Sqlite => 20_000,
        })
}

/// 100,000 events applied live; then rebuilt (with progress) while commands keep arriving:
/// the rebuilt model equals the live one, and, once the group caught up, the aggregates.
async fn rebuild_equals_live(backend: Backend) {
    let db = TestDb::new(backend, "projection_rebuild").await;
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    let app = cart::builder(store.clone(), Gate::default())
        .projection(CartTotals)
        .build()
        .await
        .unwrap();
    store.install(&CartTotals).await.unwrap();
    let relay = app.start();
    let per_command = 500;
    let commands = (events_total(backend) / per_command).max(1);
    let carts = commands.min(100);
    for n in 0..commands {
        let cart = format!("c{:03}", n % carts);
        app.send(AddItems {
            cart,
            sku: format!("sku{}", n % 7),
            count: per_command,
        })
        .await
        .unwrap();
    }
    for n in (0..carts).step_by(3) {
        app.send(CheckOut {
            cart: format!("c{n:03}"),
        })
        .await
        .unwrap();
    }
    drained(&store, "cart_totals").await;
    let live = model(&store).await;
    assert_eq!(live.len(), carts as usize);
    let items: i64 = live.iter().map(|r| r.1).sum();
    assert_eq!(items, i64::from(commands * per_command));

    let reports: Arc<Mutex<Vec<RebuildProgress>>> = Arc::default();
    let seen = reports.clone();
    let rebuilt = store
        .rebuild(&app, &CartTotals, |p| {
            seen.lock().unwrap().push(p.clone());
        })
        .await
        .unwrap();
    let expected_events = u64::from(commands * per_command) + u64::from(carts.div_ceil(3));
    assert_eq!(rebuilt.events, expected_events);
    let reports = reports.lock().unwrap().clone();
    // One report per replayed batch of 1,000.
    assert_eq!(reports.len() as u64, expected_events.div_ceil(1000));
    let last = reports.last().unwrap();
    assert_eq!((last.done, last.total), (expected_events, expected_events));
    assert!(last.rate > 0.0);
    assert_eq!(last.eta, Some(Duration::ZERO));
    assert!(reports.windows(2).all(|w| w[0].done < w[1].done));
    assert_eq!(
        model(&store).await,
        live,
        "rebuilt model equals the live one"
    );

    // A rebuild while commands arrive: the live model serves, the rebuilt one catches up.
    let writer = {
        let app = app.clone();
        tokio::spawn(async move {
            for n in 0..30 {
                app.send(AddItems {
                    cart: format!("late{}", n % 4),
                    sku: "tea".into(),
                    count: 3,
                })
                .await
                .unwrap();
            }
        })
    };
    store.rebuild(&app, &CartTotals, |_| {}).await.unwrap();
    writer.await.unwrap();
    drained(&store, "cart_totals").await;
    relay.shutdown().await;
    assert!(store.paused().await.unwrap().is_empty());
    for (cart, items, total, checked_out) in model(&store).await {
        let state: Cart = app.load::<Cart>(&cart).await.unwrap().into_state();
        let want: u32 = state.items.values().map(|(qty, _)| qty).sum();
        assert_eq!(items, i64::from(want), "items of {cart}");
        assert_eq!(
            total,
            i64::try_from(state.total()).unwrap(),
            "total of {cart}"
        );
        assert_eq!(checked_out == 1, state.checked_out, "checkout of {cart}");
    }
    assert_eq!(model(&store).await.len(), carts as usize + 4);
}

/// Fails on the sku `poison`; records what it applied in `picky`, in the delivery's
/// transaction.
struct Picky<const STOP: bool>;

impl<const STOP: bool> Projection for Picky<STOP> {
    const NAME: &'static str = if STOP { "picky_stop" } else { "picky_skip" };
    const ON_ERROR: OnError = if STOP { OnError::Stop } else { OnError::Skip };
    type Event = ItemAdded;

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn create(&self, _: &mut SqlTx, _: Model) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn apply(
        &self,
        event: &ItemAdded,
        _: &EventInfo<'_>,
        tx: &mut SqlTx,
        _: Model,
    ) -> Result<(), BoxError> {
        if event.sku == "poison" {
            return Err("cannot price poison".into());
        }
        sqlx::query("INSERT INTO picky (grp, sku) VALUES ($1, $2)")
            .bind(Self::NAME)
            .bind(event.sku.clone())
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// `Skip` dead-letters a failing event at once and goes on; `Stop` pauses the projection at
/// the failing event until it is resumed.
async fn error_strategies(backend: Backend) {
    let db = TestDb::new(backend, "projection_errors").await;
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE picky (grp TEXT NOT NULL, sku TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let applied = |group: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query("SELECT sku FROM picky WHERE grp = $1 ORDER BY sku")
                .bind(group)
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<_>>()
        }
    };
    let app = cart::builder(store.clone(), Gate::default())
        .projection(Picky::<false>)
        .projection(Picky::<true>)
        .build()
        .await
        .unwrap();
    let relay = app.start();
    for sku in ["tea", "poison", "cup"] {
        app.send(AddItems {
            cart: "one".into(),
            sku: sku.into(),
            count: 1,
        })
        .await
        .unwrap();
    }
    let letter = eventually(WAIT, "the skipped event dead-lettered", || async {
        let letters = store.dead_letters(0, 10).await.unwrap();
        letters.into_iter().find(|l| l.group == "picky_skip")
    })
    .await;
    assert_eq!(letter.attempts, 1);
    assert_eq!(
        letter.error,
        "handler `picky_skip` rejected the event: cannot price poison"
    );
    eventually(WAIT, "skip goes on", || async {
        (applied("picky_skip").await == ["cup", "tea"]).then_some(())
    })
    .await;
    let paused = eventually(WAIT, "stop pauses the group", || async {
        let paused = store.paused().await.unwrap();
        (!paused.is_empty()).then_some(paused)
    })
    .await;
    assert_eq!(paused[0].group, "picky_stop");
    assert!(
        paused[0].reason.contains("cannot price poison"),
        "{}",
        paused[0].reason
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        applied("picky_stop").await,
        ["tea"],
        "nothing past the failing event"
    );
    relay.shutdown().await;
}

inseam_tests::on_every_backend!(rebuild_equals_live, error_strategies);
