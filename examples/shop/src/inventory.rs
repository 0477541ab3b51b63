//! Inventory: stock per product and reservations per order. Reserving is all or nothing; a
//! reservation is released when a later step of the order fails.

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use schemars::JsonSchema;

/// Sets the stock of a product.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "inventory.set_stock", error = InventoryError)]
pub struct SetStock {
    /// The product.
    pub sku: String,
    /// Units available.
    pub available: u32,
}

/// One line of a reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Units {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// Reserves every line of an order, or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "inventory.reserve_stock", error = InventoryError)]
pub struct ReserveStock {
    /// The order.
    pub order_id: String,
    /// What it needs.
    pub lines: Vec<Units>,
}

/// Releases an order's reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "inventory.release_stock", error = InventoryError)]
pub struct ReleaseStock {
    /// The order.
    pub order_id: String,
}

/// Stock was reserved for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "inventory.stock_reserved", key = order_id)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
}

/// An order asked for more than is in stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "inventory.stock_unavailable", key = order_id)]
pub struct StockUnavailable {
    /// The order.
    pub order_id: String,
    /// The first product short.
    pub sku: String,
    /// Units asked for.
    pub requested: u32,
    /// Units available.
    pub available: u32,
}

/// An order's reservation was released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "inventory.stock_released", key = order_id)]
pub struct StockReleased {
    /// The order.
    pub order_id: String,
}

/// Why an inventory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[command_handler]
async fn set_stock(cmd: SetStock, ctx: &mut CommandContext<'_>) -> Result<(), InventoryError> {
    sqlx::query(
        "INSERT INTO inventory_stock (sku, available) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET available = excluded.available",
    )
    .bind(cmd.sku)
    .bind(i64::from(cmd.available))
    .execute(ctx.tx().await?)
    .await?;
    Ok(())
}

#[command_handler(publishes(StockReserved, StockUnavailable))]
async fn reserve_stock(
    cmd: ReserveStock,
    ctx: &mut CommandContext<'_>,
) -> Result<(), InventoryError> {
    for line in &cmd.lines {
        let available: i64 = sqlx::query("SELECT available FROM inventory_stock WHERE sku = $1")
            .bind(line.sku.clone())
            .fetch_optional(ctx.tx().await?)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?
            .unwrap_or(0);
        if available < i64::from(line.quantity) {
            ctx.publish(StockUnavailable {
                order_id: cmd.order_id,
                sku: line.sku.clone(),
                requested: line.quantity,
                available: u32::try_from(available).unwrap_or(0),
            });
            return Ok(());
        }
    }
    for line in &cmd.lines {
        sqlx::query("UPDATE inventory_stock SET available = available - $1 WHERE sku = $2")
            .bind(i64::from(line.quantity))
            .bind(line.sku.clone())
            .execute(ctx.tx().await?)
            .await?;
        sqlx::query(
            "INSERT INTO inventory_reservations (order_id, sku, quantity) VALUES ($1, $2, $3)",
        )
        .bind(cmd.order_id.clone())
        .bind(line.sku.clone())
        .bind(i64::from(line.quantity))
        .execute(ctx.tx().await?)
        .await?;
    }
    ctx.publish(StockReserved {
        order_id: cmd.order_id,
    });
    Ok(())
}

#[command_handler(publishes(StockReleased))]
async fn release_stock(
    cmd: ReleaseStock,
    ctx: &mut CommandContext<'_>,
) -> Result<(), InventoryError> {
    let reserved =
        sqlx::query("SELECT sku, quantity FROM inventory_reservations WHERE order_id = $1")
            .bind(cmd.order_id.clone())
            .fetch_all(ctx.tx().await?)
            .await?;
    for row in reserved {
        let (sku, quantity): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        sqlx::query("UPDATE inventory_stock SET available = available + $1 WHERE sku = $2")
            .bind(quantity)
            .bind(sku)
            .execute(ctx.tx().await?)
            .await?;
    }
    sqlx::query("DELETE FROM inventory_reservations WHERE order_id = $1")
        .bind(cmd.order_id.clone())
        .execute(ctx.tx().await?)
        .await?;
    ctx.publish(StockReleased {
        order_id: cmd.order_id,
    });
    Ok(())
}

/// The module's tables.
pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS inventory_stock (sku TEXT PRIMARY KEY, available BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS inventory_reservations (
        order_id TEXT NOT NULL, sku TEXT NOT NULL, quantity BIGINT NOT NULL)",
];

/// Registers the module: its handlers, and its commands as durable (the order saga sends them).
pub(crate) fn register(builder: inseam::AppBuilder) -> inseam::AppBuilder {
    builder
        .handler::<set_stock>()
        .handler::<reserve_stock>()
        .handler::<release_stock>()
        .durable_command::<ReserveStock>()
        .durable_command::<ReleaseStock>()
}
