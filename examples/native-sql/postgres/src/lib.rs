//! `sqlx::query!` and `sqlx::query_as!` in inseam handlers, on PostgreSQL.
//!
//! A billing module. [`IssueInvoice`] inserts an invoice (a `Uuid` id, a `DateTime<Utc>` and
//! a `Json<Details>` column) through the command's transaction and publishes
//! [`InvoiceIssued`]. The `receivables` group reads the invoice back with `query_as!` in its
//! delivery's transaction and records what the customer owes. [`Invoices`] and
//! [`Receivables`] read through the store's native pool.
//!
//! Every query is checked at build time against the schema in `migrations/`, through the
//! offline data in `.sqlx/` (`../prepare.sh` regenerates it).

use chrono::{DateTime, TimeDelta, Utc};
use inseam::BuildError;
use inseam::prelude::*;
use inseam::sql::SqlPool;
use sqlx::types::Json;
use uuid::Uuid;

/// The most a customer may owe, in cents. An invoice that would take them over it is refused.
pub const CREDIT_LIMIT_CENTS: i64 = 500_000;

/// What an invoice is for: one JSONB column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// What was sold.
    pub lines: Vec<Line>,
    /// Days the customer has to pay.
    pub terms_days: u32,
    /// A note printed on the invoice.
    pub note: Option<String>,
}

/// A line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The item sold.
    pub item: String,
    /// How many.
    pub quantity: u32,
    /// The price of one, in cents.
    pub unit_cents: i64,
}

impl Details {
    /// The sum of the lines, in cents.
    pub fn total_cents(&self) -> i64 {
        self.lines
            .iter()
            .map(|line| i64::from(line.quantity) * line.unit_cents)
            .sum()
    }
}

/// Issues an invoice. Returns its total in cents.
#[derive(Debug, Command)]
#[command(output = i64, error = BillingError, name = "billing.issue_invoice")]
pub struct IssueInvoice {
    /// The invoice's id, chosen by the caller.
    pub id: Uuid,
    /// Who pays.
    pub customer: String,
    /// When it was issued. PostgreSQL keeps microseconds.
    pub issued_at: DateTime<Utc>,
    /// What it is for.
    pub details: Details,
}

/// An invoice was issued.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "billing.invoice_issued", version = 1, key = customer)]
pub struct InvoiceIssued {
    /// The invoice.
    pub invoice_id: Uuid,
    /// Who pays.
    pub customer: String,
}

/// A customer's invoices, oldest first.
#[derive(Debug, Query)]
#[query(output = Vec<Invoice>, error = BillingError, name = "billing.invoices")]
pub struct Invoices {
    /// The customer.
    pub customer: String,
}

/// What a customer owes, in the order the invoices were recorded.
#[derive(Debug, Query)]
#[query(output = Vec<Receivable>, error = BillingError, name = "billing.receivables")]
pub struct Receivables {
    /// The customer.
    pub customer: String,
}

/// A row of `invoices`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    /// The id.
    pub id: Uuid,
    /// Who pays.
    pub customer: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// The sum of the lines, in cents.
    pub total_cents: i64,
    /// What it is for.
    pub details: Json<Details>,
}

/// A row of `receivables`.
#[derive(Debug, Clone, PartialEq)]
pub struct Receivable {
    /// The invoice owed.
    pub invoice_id: Uuid,
    /// The `InvoiceIssued` event that recorded it.
    pub event_id: Uuid,
    /// Who owes.
    pub customer: String,
    /// How much, in cents.
    pub amount_cents: i64,
    /// When payment is due.
    pub due_at: DateTime<Utc>,
}

/// Why a billing message failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The invoice would take the customer over [`CREDIT_LIMIT_CENTS`].
    #[error(
        "invoice {invoice} would bring what {customer} owes to {owed} cents, over the credit limit of {limit} cents"
    )]
    CreditLimitExceeded {
        /// The refused invoice.
        invoice: Uuid,
        /// The customer.
        customer: String,
        /// What the customer would owe with it.
        owed: i64,
        /// The limit.
        limit: i64,
    },
    /// An event names an invoice that is not in the database.
    #[error("invoice {0} is not in the database")]
    UnknownInvoice(Uuid),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Why the app could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The store is not on the database this module's SQL is written for.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The module's migrations failed.
    #[error("applying the billing module's migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The app's wiring is wrong.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Applies the module's migrations to the store's database and builds the app around the
/// store. Start the relay with `app.start()` for the `receivables` group to run.
pub async fn app(store: &SqlStore) -> Result<App, SetupError> {
    let pool = store.pool().pg()?;
    sqlx::migrate!().run(pool).await?;
    Ok(App::builder()
        .store(store.clone())
        .state(store.pool().clone())
        .discover()
        .build()
        .await?)
}

#[command_handler]
async fn issue_invoice(
    cmd: IssueInvoice,
    ctx: &mut CommandContext<'_>,
) -> Result<i64, BillingError> {
    let total = cmd.details.total_cents();
    sqlx::query!(
        "INSERT INTO invoices (id, customer, issued_at, total_cents, details)
         VALUES ($1, $2, $3, $4, $5)",
        cmd.id,
        cmd.customer,
        cmd.issued_at,
        total,
        Json(&cmd.details) as _,
    )
    .execute(ctx.pg().await?)
    .await?;
    // Summed after the insert, in the same transaction: a refusal rolls the insert back. (Two
    // invoices of one customer issued at the same instant could both pass; a real ledger
    // would lock the customer's row first.)
    let owed = sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(total_cents), 0)::BIGINT AS "owed!" FROM invoices WHERE customer = $1"#,
        cmd.customer,
    )
    .fetch_one(ctx.pg().await?)
    .await?;
    if owed > CREDIT_LIMIT_CENTS {
        return Err(BillingError::CreditLimitExceeded {
            invoice: cmd.id,
            customer: cmd.customer,
            owed,
            limit: CREDIT_LIMIT_CENTS,
        });
    }
    ctx.publish(InvoiceIssued {
        invoice_id: cmd.id,
        customer: cmd.customer,
    });
    Ok(total)
}

/// Runs after the command committed, in a transaction that also records the event in the
/// group's inbox: the receivable is written once per event.
#[event_handler(group = "receivables")]
async fn record_receivable(
    ev: &Envelope<InvoiceIssued>,
    ctx: &mut EventContext<'_>,
) -> Result<(), BillingError> {
    let invoice = sqlx::query_as!(
        Invoice,
        r#"SELECT id, customer, issued_at, total_cents, details AS "details: Json<Details>"
           FROM invoices WHERE id = $1"#,
        ev.invoice_id,
    )
    .fetch_optional(ctx.pg().await?)
    .await?
    .ok_or(BillingError::UnknownInvoice(ev.invoice_id))?;
    let due_at = invoice.issued_at + TimeDelta::days(invoice.details.terms_days.into());
    sqlx::query!(
        "INSERT INTO receivables (invoice_id, event_id, customer, amount_cents, due_at)
         VALUES ($1, $2, $3, $4, $5)",
        invoice.id,
        ev.message_id(),
        invoice.customer,
        invoice.total_cents,
        due_at,
    )
    .execute(ctx.pg().await?)
    .await?;
    Ok(())
}

#[query_handler]
async fn invoices(
    query: Invoices,
    State(pool): State<SqlPool>,
) -> Result<Vec<Invoice>, BillingError> {
    let invoices = sqlx::query_as!(
        Invoice,
        r#"SELECT id, customer, issued_at, total_cents, details AS "details: Json<Details>"
           FROM invoices WHERE customer = $1 ORDER BY issued_at, id"#,
        query.customer,
    )
    .fetch_all(pool.pg()?)
    .await?;
    Ok(invoices)
}

#[query_handler]
async fn receivables(
    query: Receivables,
    State(pool): State<SqlPool>,
) -> Result<Vec<Receivable>, BillingError> {
    let receivables = sqlx::query_as!(
        Receivable,
        "SELECT invoice_id, event_id, customer, amount_cents, due_at
         FROM receivables WHERE customer = $1 ORDER BY id",
        query.customer,
    )
    .fetch_all(pool.pg()?)
    .await?;
    Ok(receivables)
}
