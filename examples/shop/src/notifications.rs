//! Notifications: choreography. Plain subscribers react to the orders' outcome; nothing
//! orchestrates them.

use inseam::prelude::*;
use inseam::sql::SqlPool;
use inseam::sql::sqlx::{self, Row as _};

use crate::orders::{OrderConfirmed, OrderRejected};

/// The messages sent to a customer, oldest first.
#[derive(Debug, Clone, Query)]
#[query(name = "notifications.sent_to", output = Vec<String>, error = sqlx::Error)]
pub struct SentTo {
    /// The customer.
    pub customer: String,
}

async fn send(
    ctx: &mut EventContext<'_>,
    customer: &str,
    message: String,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO notifications_sent (customer, message, message_id) VALUES ($1, $2, $3)",
    )
    .bind(customer.to_owned())
    .bind(message)
    .bind(ctx.metadata().message_id.to_string())
    .execute(ctx.tx().await?)
    .await?;
    Ok(())
}

#[event_handler(group = "notifications")]
async fn order_confirmed(
    ev: &Envelope<OrderConfirmed>,
    ctx: &mut EventContext<'_>,
) -> Result<(), sqlx::Error> {
    let message = format!("Your order {} is on its way.", ev.order_id);
    send(ctx, &ev.customer, message).await
}

#[event_handler(group = "notifications")]
async fn order_rejected(
    ev: &Envelope<OrderRejected>,
    ctx: &mut EventContext<'_>,
) -> Result<(), sqlx::Error> {
    let message = format!(
        "Sorry, your order {} was cancelled: {}.",
        ev.order_id, ev.reason
    );
    send(ctx, &ev.customer, message).await
}

#[query_handler]
async fn sent_to(query: SentTo, State(pool): State<SqlPool>) -> Result<Vec<String>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT message FROM notifications_sent WHERE customer = $1 ORDER BY id")
            .bind(query.customer)
            .fetch_all(&pool)
            .await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// The module's tables (the id column is added per backend).
pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS notifications_sent (
    id {serial}, customer TEXT NOT NULL, message TEXT NOT NULL, message_id TEXT NOT NULL)"];

/// Registers the module.
pub(crate) fn register(builder: inseam::AppBuilder) -> inseam::AppBuilder {
    builder
        .handler::<order_confirmed>()
        .handler::<order_rejected>()
        .handler::<sent_to>()
}
