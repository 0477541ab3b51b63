//! A small app in two processes over a broker: the main process places orders (`sales.place`
//! publishes `sales.order_placed`); group `billing.ledger` of module `billing`, run by process
//! `billing`, records each order in `billing_ledger` and answers `billing.charged`; group
//! `sales.status`, in the main process, records the answer in `sales_charged`. Neither table
//! has a unique key, so a second effect of a message would show as a second row.

use std::sync::Arc;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{SqlPool, SqlStore};
use inseam::transport::Transport;
use inseam::{BuildError, Routing};

/// Places order `order`.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "sales.place", output = ())]
pub struct Place {
    /// The order's number.
    pub order: i64,
}

/// An order was placed.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "sales.order_placed", key = key)]
pub struct OrderPlaced {
    /// The ordering key: one of 16 customers.
    pub key: String,
    /// The order's number.
    pub order: i64,
}

/// Billing charged an order.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "billing.charged", key = key)]
pub struct Charged {
    /// The order's key.
    pub key: String,
    /// The order's number.
    pub order: i64,
}

#[command_handler(publishes(OrderPlaced))]
async fn place(cmd: Place, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(OrderPlaced {
        key: format!("customer-{}", cmd.order % 16),
        order: cmd.order,
    });
    Ok(())
}

async fn record(ctx: &mut EventContext<'_>, table: &str, order: i64) -> Result<(), sqlx::Error> {
    let tx = ctx
        .tx()
        .await
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (order_id) VALUES ($1)"
    )))
    .bind(order)
    .execute(tx)
    .await?;
    Ok(())
}

/// Module `billing`: records the order, answers `Charged`.
#[event_handler(group = "billing.ledger", publishes(Charged))]
async fn charge(ev: &Envelope<OrderPlaced>, ctx: &mut EventContext<'_>) -> Result<(), sqlx::Error> {
    record(ctx, "billing_ledger", ev.order).await?;
    ctx.publish(Charged {
        key: ev.payload.key.clone(),
        order: ev.order,
    });
    Ok(())
}

/// Module `sales`, in the main process: records the answer.
#[event_handler(group = "sales.status")]
async fn charged(ev: &Envelope<Charged>, ctx: &mut EventContext<'_>) -> Result<(), sqlx::Error> {
    record(ctx, "sales_charged", ev.order).await
}

/// Process `billing` runs module `billing`, over transport `transport`; the main process
/// runs the rest. Started as `process` (`main` or `billing`).
pub fn routing(process: &str, transport: &str) -> Routing {
    Routing::from_toml(&format!(
        "[processes.billing]\ntransport = \"{transport}\"\nmodules = [\"billing\"]\n"
    ))
    .unwrap_or_else(|error| panic!("{error}"))
    .this_process(process)
}

/// Creates the table of the module `process` runs.
pub async fn create_schema(store: &SqlStore, process: &str) -> Result<(), sqlx::Error> {
    let table = if process == "billing" {
        "billing_ledger"
    } else {
        "sales_charged"
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {table} (order_id BIGINT NOT NULL)"
    )))
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The app as process `process`, over `transport`.
pub async fn app(
    store: &SqlStore,
    transport: Arc<dyn Transport>,
    process: &str,
) -> Result<App, BuildError> {
    let routing = routing(process, transport.name());
    App::builder()
        .store(store.clone())
        .handler::<place>()
        .handler::<charge>()
        .handler::<charged>()
        .transport_arc(transport)
        .routing(routing)
        .build()
        .await
}

/// The order numbers in `table` (`billing_ledger` or `sales_charged`), one per row, sorted.
pub async fn orders(pool: &SqlPool, table: &str) -> Vec<i64> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT order_id FROM {table} ORDER BY order_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|error| panic!("reading {table}: {error}"));
    rows.iter().map(|r| r.get::<i64, _>(0)).collect()
}

/// The rows per order in `orders` that appear more than once, as `(order, rows)`.
pub fn duplicates(orders: &[i64]) -> Vec<(i64, usize)> {
    let mut out: Vec<(i64, usize)> = Vec::new();
    for &order in orders {
        match out.last_mut() {
            Some((last, count)) if *last == order => *count += 1,
            _ => out.push((order, 1)),
        }
    }
    out.retain(|(_, count)| *count > 1);
    out
}
