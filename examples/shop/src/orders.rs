//! Orders: the event-sourced `Order` aggregate, the fulfilment saga that drives an order
//! through inventory, payments and shipping, and the order summaries read model.
//!
//! The saga: placed → reserve stock → charge payment (with a timeout) → create shipment →
//! confirm. A failure compensates what succeeded, most recent first (refund, release stock),
//! then rejects the order. One correlation id runs through the whole flow.

use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, AssertSqlSafe, Row as _};
use inseam::sql::{EventInfo, Model, Projection};
use inseam::sql::{SqlPool, SqlTx};
use inseam::{BoxError, Compensations, SagaContext};
use schemars::JsonSchema;

use crate::catalog::GetProducts;
use crate::inventory::{ReleaseStock, ReserveStock, StockReserved, StockUnavailable, Units};
use crate::payments::{ChargePayment, PaymentCharged, PaymentDeclined, RefundPayment};
use crate::shipping::{CreateShipment, ShipmentCreated, ShipmentFailed};

/// How long the saga waits for the payment gateway.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of an order, as the customer asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// A priced line, as placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PricedLine {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// The unit price in cents when the order was placed.
    pub unit_price_cents: u64,
}

/// Places an order.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "orders.place_order", output = u64, error = OrderError)]
pub struct PlaceOrder {
    /// The order's id, chosen by the client (placing the same id twice is refused).
    pub order_id: String,
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<OrderLine>,
}

/// Confirms an order (the saga, once it is shipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "orders.confirm_order", error = OrderError)]
pub struct ConfirmOrder {
    /// The order.
    pub order_id: String,
}

/// Rejects an order (the saga, once a step failed and was compensated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "orders.reject_order", error = OrderError)]
pub struct RejectOrder {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

/// An order was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "orders.order_placed", key = order_id)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// What, priced.
    pub lines: Vec<PricedLine>,
    /// The total in cents.
    pub total_cents: u64,
}

/// An order was confirmed: paid and shipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "orders.order_confirmed", key = order_id)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
}

/// An order was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "orders.order_rejected", key = order_id)]
pub struct OrderRejected {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// Why.
    pub reason: String,
}

/// The order's events.
#[derive(Debug, Clone, PartialEq, EventSet)]
pub enum OrderEvent {
    /// See [`OrderPlaced`].
    Placed(OrderPlaced),
    /// See [`OrderConfirmed`].
    Confirmed(OrderConfirmed),
    /// See [`OrderRejected`].
    Rejected(OrderRejected),
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not placed.
    #[default]
    New,
    /// Placed, in fulfilment.
    Placed,
    /// Paid and shipped.
    Confirmed,
    /// Refused.
    Rejected,
}

/// The order aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Who ordered.
    pub customer: String,
    /// Where it stands.
    pub status: Status,
    /// The total in cents.
    pub total_cents: u64,
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Event = OrderEvent;

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed(placed) => {
                self.customer = placed.customer.clone();
                self.total_cents = placed.total_cents;
                self.status = Status::Placed;
            }
            OrderEvent::Confirmed(_) => self.status = Status::Confirmed,
            OrderEvent::Rejected(_) => self.status = Status::Rejected,
        }
    }
}

/// Why an order command failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// An order needs at least one line.
    #[error("an order needs at least one line")]
    NoLines,
    /// Quantities are positive.
    #[error("the quantity of `{sku}` must be at least 1, got {quantity}")]
    InvalidQuantity {
        /// The product.
        sku: String,
        /// The quantity given.
        quantity: u32,
    },
    /// A product is not in the catalog.
    #[error("unknown product `{0}`")]
    UnknownProduct(String),
    /// An order id is used once.
    #[error("order `{0}` was already placed")]
    AlreadyPlaced(String),
    /// The order does not exist.
    #[error("no order `{0}`")]
    NotFound(String),
    /// The catalog could not be asked.
    #[error("the catalog failed")]
    Catalog(#[source] DispatchError<crate::catalog::CatalogError>),
    /// Loading or saving the order failed.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[command_handler(publishes(OrderPlaced))]
async fn place_order(cmd: PlaceOrder, ctx: &mut CommandContext<'_>) -> Result<u64, OrderError> {
    if cmd.lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if let Some(line) = cmd.lines.iter().find(|l| l.quantity == 0) {
        return Err(OrderError::InvalidQuantity {
            sku: line.sku.clone(),
            quantity: line.quantity,
        });
    }
    // Prices come from the catalog, through the bus: this module never reads its tables.
    let skus = cmd.lines.iter().map(|l| l.sku.clone()).collect();
    let products = ctx
        .app()
        .query(GetProducts { skus })
        .await
        .map_err(OrderError::Catalog)?;
    let mut lines = Vec::with_capacity(cmd.lines.len());
    for line in cmd.lines {
        let product = products
            .iter()
            .find(|p| p.sku == line.sku)
            .ok_or_else(|| OrderError::UnknownProduct(line.sku.clone()))?;
        lines.push(PricedLine {
            sku: line.sku,
            quantity: line.quantity,
            unit_price_cents: product.price_cents,
        });
    }
    let total_cents = lines
        .iter()
        .map(|l| u64::from(l.quantity) * l.unit_price_cents)
        .sum();
    let mut order = ctx.load::<Order>(&cmd.order_id).await?;
    if order.exists() {
        return Err(OrderError::AlreadyPlaced(cmd.order_id));
    }
    order.emit(OrderPlaced {
        order_id: cmd.order_id,
        customer: cmd.customer,
        lines,
        total_cents,
    });
    ctx.save(order).await?;
    Ok(total_cents)
}

#[command_handler(publishes(OrderConfirmed))]
async fn confirm_order(cmd: ConfirmOrder, ctx: &mut CommandContext<'_>) -> Result<(), OrderError> {
    let mut order = ctx.load::<Order>(&cmd.order_id).await?;
    if order.status != Status::Placed {
        // Already decided: a redelivered command changes nothing.
        return Ok(());
    }
    let customer = order.customer.clone();
    order.emit(OrderConfirmed {
        order_id: cmd.order_id,
        customer,
    });
    ctx.save(order).await?;
    Ok(())
}

#[command_handler(publishes(OrderRejected))]
async fn reject_order(cmd: RejectOrder, ctx: &mut CommandContext<'_>) -> Result<(), OrderError> {
    let mut order = ctx.load::<Order>(&cmd.order_id).await?;
    if order.status != Status::Placed {
        return Ok(());
    }
    let customer = order.customer.clone();
    order.emit(OrderRejected {
        order_id: cmd.order_id,
        customer,
        reason: cmd.reason,
    });
    ctx.save(order).await?;
    Ok(())
}

/// The events the fulfilment saga follows.
#[derive(Debug, Clone, PartialEq, EventSet)]
pub enum FulfilmentEvent {
    /// Starts it.
    Placed(OrderPlaced),
    /// See [`StockReserved`].
    StockReserved(StockReserved),
    /// See [`StockUnavailable`].
    StockUnavailable(StockUnavailable),
    /// See [`PaymentCharged`].
    PaymentCharged(PaymentCharged),
    /// See [`PaymentDeclined`].
    PaymentDeclined(PaymentDeclined),
    /// See [`ShipmentCreated`].
    ShipmentCreated(ShipmentCreated),
    /// See [`ShipmentFailed`].
    ShipmentFailed(ShipmentFailed),
    /// Ends it.
    Confirmed(OrderConfirmed),
    /// Ends it.
    Rejected(OrderRejected),
}

/// The fulfilment saga of one order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fulfilment {
    order_id: String,
    customer: String,
    total_cents: u64,
    paid: bool,
    compensations: Compensations,
}

impl Fulfilment {
    async fn fail(
        &mut self,
        ctx: &mut SagaContext<'_, '_>,
        reason: String,
    ) -> Result<(), BoxError> {
        ctx.compensate(&mut self.compensations).await?;
        ctx.dispatch(RejectOrder {
            order_id: self.order_id.clone(),
            reason,
        })
        .await?;
        Ok(())
    }
}

impl Saga for Fulfilment {
    const NAME: &'static str = "orders.fulfilment";
    type Event = FulfilmentEvent;
    const SENDS: &'static [&'static str] = &[
        ReserveStock::NAME,
        ReleaseStock::NAME,
        ChargePayment::NAME,
        RefundPayment::NAME,
        CreateShipment::NAME,
        ConfirmOrder::NAME,
        RejectOrder::NAME,
    ];

    fn starts(event: &FulfilmentEvent) -> bool {
        matches!(event, FulfilmentEvent::Placed(_))
    }

    async fn handle(
        &mut self,
        event: &FulfilmentEvent,
        ctx: &mut SagaContext<'_, '_>,
    ) -> Result<(), BoxError> {
        let order_id = self.order_id.clone();
        match event {
            FulfilmentEvent::Placed(placed) => {
                self.order_id = placed.order_id.clone();
                self.customer = placed.customer.clone();
                self.total_cents = placed.total_cents;
                let lines = placed
                    .lines
                    .iter()
                    .map(|l| Units {
                        sku: l.sku.clone(),
                        quantity: l.quantity,
                    })
                    .collect();
                ctx.dispatch(ReserveStock {
                    order_id: self.order_id.clone(),
                    lines,
                })
                .await?;
            }
            FulfilmentEvent::StockReserved(_) => {
                self.compensations.push(&ReleaseStock {
                    order_id: order_id.clone(),
                })?;
                ctx.dispatch(ChargePayment {
                    order_id,
                    customer: self.customer.clone(),
                    amount_cents: self.total_cents,
                })
                .await?;
                let at = ctx.now() + PAYMENT_TIMEOUT;
                ctx.timeout("payment", at).await?;
            }
            FulfilmentEvent::StockUnavailable(short) => {
                let reason = format!(
                    "out of stock: {} × {} asked, {} available",
                    short.requested, short.sku, short.available
                );
                self.fail(ctx, reason).await?;
            }
            FulfilmentEvent::PaymentCharged(_) => {
                self.paid = true;
                self.compensations.push(&RefundPayment {
                    order_id: order_id.clone(),
                })?;
                ctx.dispatch(CreateShipment {
                    order_id,
                    customer: self.customer.clone(),
                })
                .await?;
            }
            FulfilmentEvent::PaymentDeclined(_) => {
                self.paid = true;
                self.fail(ctx, "payment declined".to_owned()).await?;
            }
            FulfilmentEvent::ShipmentCreated(_) => {
                ctx.dispatch(ConfirmOrder { order_id }).await?;
            }
            FulfilmentEvent::ShipmentFailed(_) => {
                self.fail(ctx, "the carrier refused the parcel".to_owned())
                    .await?;
            }
            FulfilmentEvent::Confirmed(_) | FulfilmentEvent::Rejected(_) => ctx.complete(),
        }
        Ok(())
    }

    async fn timeout(&mut self, name: &str, ctx: &mut SagaContext<'_, '_>) -> Result<(), BoxError> {
        if name == "payment" && !self.paid {
            self.paid = true;
            self.fail(ctx, "the payment gateway did not answer".to_owned())
                .await?;
        }
        Ok(())
    }
}

/// An order as the read model has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderSummary {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// `placed`, `confirmed` or `rejected`.
    pub status: String,
    /// The total in cents.
    pub total_cents: u64,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// An order's summary.
#[derive(Debug, Clone, Query)]
#[query(name = "orders.get_order", output = OrderSummary, error = OrderError)]
pub struct GetOrder {
    /// The order.
    pub order_id: String,
}

/// A customer's orders, oldest first.
#[derive(Debug, Clone, Query)]
#[query(name = "orders.customer_orders", output = Vec<OrderSummary>, error = OrderError)]
pub struct CustomerOrders {
    /// The customer.
    pub customer: String,
}

/// The order summaries read model (`orders_summaries`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Summaries;

impl Projection for Summaries {
    const NAME: &'static str = "orders.summaries";
    type Event = OrderEvent;

    fn tables(&self) -> &'static [&'static str] {
        &["orders_summaries"]
    }

    async fn create(&self, tx: &mut SqlTx, model: Model) -> Result<(), sqlx::Error> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL,
             status TEXT NOT NULL, total_cents BIGINT NOT NULL, reason TEXT, seq BIGINT NOT NULL)",
            model.table("orders_summaries")
        );
        sqlx::query(AssertSqlSafe(sql)).execute(tx).await.map(drop)
    }

    async fn apply(
        &self,
        event: &OrderEvent,
        info: &EventInfo<'_>,
        tx: &mut SqlTx,
        model: Model,
    ) -> Result<(), BoxError> {
        let table = model.table("orders_summaries");
        match event {
            OrderEvent::Placed(placed) => {
                let sql = format!(
                    "INSERT INTO {table} (order_id, customer, status, total_cents, seq)
                     VALUES ($1, $2, 'placed', $3, $4)"
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(placed.order_id.clone())
                    .bind(placed.customer.clone())
                    .bind(i64::try_from(placed.total_cents)?)
                    .bind(info.occurred_at.timestamp_micros())
                    .execute(tx)
                    .await?;
            }
            OrderEvent::Confirmed(confirmed) => {
                let sql = format!("UPDATE {table} SET status = 'confirmed' WHERE order_id = $1");
                sqlx::query(AssertSqlSafe(sql))
                    .bind(confirmed.order_id.clone())
                    .execute(tx)
                    .await?;
            }
            OrderEvent::Rejected(rejected) => {
                let sql = format!(
                    "UPDATE {table} SET status = 'rejected', reason = $2 WHERE order_id = $1"
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(rejected.order_id.clone())
                    .bind(rejected.reason.clone())
                    .execute(tx)
                    .await?;
            }
        }
        Ok(())
    }
}

fn summary(row: &sqlx::any::AnyRow) -> Result<OrderSummary, sqlx::Error> {
    Ok(OrderSummary {
        order_id: row.try_get(0)?,
        customer: row.try_get(1)?,
        status: row.try_get(2)?,
        total_cents: u64::try_from(row.try_get::<i64, _>(3)?).unwrap_or_default(),
        reason: row.try_get(4)?,
    })
}

#[query_handler]
async fn get_order(
    query: GetOrder,
    State(pool): State<SqlPool>,
) -> Result<OrderSummary, OrderError> {
    let row = sqlx::query(
        "SELECT order_id, customer, status, total_cents, reason FROM orders_summaries WHERE order_id = $1",
    )
    .bind(query.order_id.clone())
    .fetch_optional(&pool)
    .await?
    .ok_or(OrderError::NotFound(query.order_id))?;
    Ok(summary(&row)?)
}

#[query_handler]
async fn customer_orders(
    query: CustomerOrders,
    State(pool): State<SqlPool>,
) -> Result<Vec<OrderSummary>, OrderError> {
    let rows = sqlx::query(
        "SELECT order_id, customer, status, total_cents, reason FROM orders_summaries
         WHERE customer = $1 ORDER BY seq, order_id",
    )
    .bind(query.customer)
    .fetch_all(&pool)
    .await?;
    Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
}

/// Registers the module: the aggregate's handlers, the saga, the read model and its queries.
pub(crate) fn register(builder: inseam::AppBuilder) -> inseam::AppBuilder {
    use inseam::sql::Projections as _;
    builder
        .handler::<place_order>()
        .handler::<confirm_order>()
        .handler::<reject_order>()
        .handler::<get_order>()
        .handler::<customer_orders>()
        .aggregate::<Order>()
        // This app is the only writer of its orders: keep recently saved ones in memory.
        .cache_aggregate::<Order>(10_000)
        .durable_command::<ConfirmOrder>()
        .durable_command::<RejectOrder>()
        .saga::<Fulfilment>()
        .projection(Summaries)
}
