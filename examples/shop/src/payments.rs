//! Payments, against a deterministic fake gateway that can be told to decline a customer's
//! cards or never to answer for them (a timeout).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use inseam::prelude::*;
use inseam::sql::sqlx;
use schemars::JsonSchema;

/// The fake payment gateway.
#[derive(Debug, Clone, Default)]
pub struct Gateway(Arc<Mutex<Rules>>);

#[derive(Debug, Default)]
struct Rules {
    declines: HashSet<String>,
    silent: HashSet<String>,
}

/// What the gateway answers for a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Approve,
    Decline,
    Silence,
}

impl Gateway {
    /// Declines every charge of `customer`.
    pub fn decline(&self, customer: &str) -> &Self {
        self.rules().declines.insert(customer.to_owned());
        self
    }

    /// Never answers for `customer`: the order saga's payment timeout fires.
    pub fn time_out(&self, customer: &str) -> &Self {
        self.rules().silent.insert(customer.to_owned());
        self
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, customer: &str) -> Answer {
        let rules = self.rules();
        if rules.silent.contains(customer) {
            Answer::Silence
        } else if rules.declines.contains(customer) {
            Answer::Decline
        } else {
            Answer::Approve
        }
    }
}

/// Charges an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "payments.charge", error = PaymentError)]
pub struct ChargePayment {
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer: String,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// Refunds an order's charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "payments.refund", error = PaymentError)]
pub struct RefundPayment {
    /// The order.
    pub order_id: String,
}

/// An order was paid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "payments.charged", key = order_id)]
pub struct PaymentCharged {
    /// The order.
    pub order_id: String,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// The gateway declined an order's payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "payments.declined", key = order_id)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: String,
}

/// An order's payment was refunded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "payments.refunded", key = order_id)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: String,
}

/// Why a payment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[command_handler(publishes(PaymentCharged, PaymentDeclined))]
async fn charge(
    cmd: ChargePayment,
    ctx: &mut CommandContext<'_>,
    State(gateway): State<Gateway>,
) -> Result<(), PaymentError> {
    let status = match gateway.answer(&cmd.customer) {
        Answer::Silence => return Ok(()),
        Answer::Decline => "declined",
        Answer::Approve => "charged",
    };
    sqlx::query(
        "INSERT INTO payments_charges (order_id, amount_cents, status) VALUES ($1, $2, $3)",
    )
    .bind(cmd.order_id.clone())
    .bind(i64::try_from(cmd.amount_cents).unwrap_or(i64::MAX))
    .bind(status)
    .execute(ctx.tx().await?)
    .await?;
    let order_id = cmd.order_id;
    if status == "charged" {
        ctx.publish(PaymentCharged {
            order_id,
            amount_cents: cmd.amount_cents,
        });
    } else {
        ctx.publish(PaymentDeclined { order_id });
    }
    Ok(())
}

#[command_handler(publishes(PaymentRefunded))]
async fn refund(cmd: RefundPayment, ctx: &mut CommandContext<'_>) -> Result<(), PaymentError> {
    sqlx::query("UPDATE payments_charges SET status = 'refunded' WHERE order_id = $1")
        .bind(cmd.order_id.clone())
        .execute(ctx.tx().await?)
        .await?;
    ctx.publish(PaymentRefunded {
        order_id: cmd.order_id,
    });
    Ok(())
}

/// The module's tables.
pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS payments_charges (
    order_id TEXT PRIMARY KEY, amount_cents BIGINT NOT NULL, status TEXT NOT NULL)"];

/// Registers the module.
pub(crate) fn register(builder: inseam::AppBuilder, gateway: Gateway) -> inseam::AppBuilder {
    builder
        .state(gateway)
        .handler::<charge>()
        .handler::<refund>()
        .durable_command::<ChargePayment>()
        .durable_command::<RefundPayment>()
}
