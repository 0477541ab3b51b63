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

/// What an order's payment came to: asked synchronously, also by the main process when
/// payments run in another one (request-reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Query)]
#[query(name = "payments.charge_of", output = u64, error = LookupError)]
pub struct ChargeOf {
    /// The order.
    pub order_id: String,
}

/// Issues the receipt of a charged order: a synchronous command, answered by the process that
/// runs payments, with the receipt's number or a typed refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "payments.issue_receipt", output = String, error = LookupError)]
pub struct IssueReceipt {
    /// The order.
    pub order_id: String,
}

/// Why a payment could not be looked up; it travels to the caller typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum LookupError {
    /// No charge went through for the order.
    #[error("order `{order_id}` was not charged ({status})")]
    NotCharged {
        /// The order.
        order_id: String,
        /// What happened instead: `declined`, `refunded`, or `no payment`.
        status: String,
    },
    /// The database failed.
    #[error("the payments could not be read: {0}")]
    Store(String),
}

/// The charged amount of `order_id`, in `conn`.
async fn charged_cents(
    order_id: &str,
    conn: impl sqlx::Executor<'_, Database = sqlx::Any>,
) -> Result<u64, LookupError> {
    use inseam::sql::sqlx::Row as _;
    let row = sqlx::query("SELECT amount_cents, status FROM payments_charges WHERE order_id = $1")
        .bind(order_id.to_owned())
        .fetch_optional(conn)
        .await
        .map_err(|e| LookupError::Store(e.to_string()))?;
    let not_charged = |status: &str| LookupError::NotCharged {
        order_id: order_id.to_owned(),
        status: status.to_owned(),
    };
    let Some(row) = row else {
        return Err(not_charged("no payment"));
    };
    let status: String = row
        .try_get(1)
        .map_err(|e| LookupError::Store(e.to_string()))?;
    if status != "charged" {
        return Err(not_charged(&status));
    }
    let cents: i64 = row
        .try_get(0)
        .map_err(|e| LookupError::Store(e.to_string()))?;
    Ok(u64::try_from(cents).unwrap_or_default())
}

#[query_handler]
async fn charge_of(
    query: ChargeOf,
    State(pool): State<inseam::sql::SqlPool>,
) -> Result<u64, LookupError> {
    charged_cents(&query.order_id, &pool).await
}

#[command_handler]
async fn issue_receipt(
    cmd: IssueReceipt,
    ctx: &mut CommandContext<'_>,
) -> Result<String, LookupError> {
    let tx = ctx
        .tx()
        .await
        .map_err(|e| LookupError::Store(e.to_string()))?;
    let cents = charged_cents(&cmd.order_id, &mut *tx).await?;
    Ok(format!(
        "receipt for {}: {:.2} EUR",
        cmd.order_id,
        cents as f64 / 100.0
    ))
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
        .handler::<charge_of>()
        .handler::<issue_receipt>()
        .durable_command::<ChargePayment>()
        .durable_command::<RefundPayment>()
}
