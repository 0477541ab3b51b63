//! A small bank: a deposit writes its row through the store's transaction and publishes
//! `Deposited`; the `ledger` and `audit` groups each record what they handled in an effects
//! table, in their delivery's transaction, so the tests can count effects exactly.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use inseam::prelude::*;
use inseam::sql::SqlPool;
use inseam::sql::sqlx;
use inseam::sql::{Backend, SqlStore};
use inseam::{AppBuilder, BuildError};

/// Deposits `amount` on `account`; `seq` identifies the deposit. A non-positive amount fails
/// after the handler wrote its row and published its event: both must be rolled back.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(output = i64, error = BankError, name = "bank.deposit")]
pub struct Deposit {
    /// The account, also the event's ordering key.
    pub account: String,
    /// The amount.
    pub amount: i64,
    /// A unique number of this deposit.
    pub seq: i64,
}

/// A deposit was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "bank.deposited", version = 1, key = account)]
pub struct Deposited {
    /// The account.
    pub account: String,
    /// The amount.
    pub amount: i64,
    /// The deposit's number.
    pub seq: i64,
}

/// Why a bank operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// Amounts are positive.
    #[error("a deposit must be positive, got {0}")]
    NotPositive(i64),
    /// The ledger was told to fail for this account.
    #[error("ledger unavailable for account {0}")]
    Unavailable(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Accounts the ledger group fails on, until removed.
#[derive(Debug, Clone, Default)]
pub struct Faults(pub Arc<Mutex<HashSet<String>>>);

impl Faults {
    /// Makes the ledger fail for `account`.
    pub fn break_account(&self, account: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(account.to_owned());
    }

    /// Repairs `account`.
    pub fn repair(&self, account: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(account);
    }

    fn fails(&self, account: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(account)
    }
}

#[command_handler]
async fn deposit(cmd: Deposit, ctx: &mut CommandContext<'_>) -> Result<i64, BankError> {
    ctx.publish(Deposited {
        account: cmd.account.clone(),
        amount: cmd.amount,
        seq: cmd.seq,
    });
    sqlx::query("INSERT INTO bank_deposits (seq, account, amount) VALUES ($1, $2, $3)")
        .bind(cmd.seq)
        .bind(cmd.account)
        .bind(cmd.amount)
        .execute(ctx.tx().await?)
        .await?;
    if cmd.amount <= 0 {
        return Err(BankError::NotPositive(cmd.amount));
    }
    Ok(cmd.seq)
}

async fn record(
    ctx: &mut EventContext<'_>,
    group: &str,
    ev: &Envelope<Deposited>,
) -> Result<(), BankError> {
    sqlx::query("INSERT INTO bank_effects (grp, message_id, seq, account) VALUES ($1, $2, $3, $4)")
        .bind(group.to_owned())
        .bind(ev.message_id().to_string())
        .bind(ev.seq)
        .bind(ev.account.clone())
        .execute(ctx.tx().await?)
        .await?;
    Ok(())
}

#[event_handler(group = "ledger")]
async fn ledger(
    ev: &Envelope<Deposited>,
    ctx: &mut EventContext<'_>,
    State(faults): State<Faults>,
) -> Result<(), BankError> {
    if faults.fails(&ev.account) {
        return Err(BankError::Unavailable(ev.account.clone()));
    }
    record(ctx, "ledger", ev).await
}

#[event_handler(group = "audit")]
async fn audit(ev: &Envelope<Deposited>, ctx: &mut EventContext<'_>) -> Result<(), BankError> {
    record(ctx, "audit", ev).await
}

/// A `Deposited` envelope of deposit `seq` on `account`, with fresh ids: what a deposit
/// publishes, for tests that write the outbox directly.
pub fn deposited(seq: i64, account: &str) -> Envelope<Deposited> {
    Envelope {
        metadata: inseam::Metadata {
            message_id: uuid::Uuid::now_v7(),
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: None,
        },
        key: Some(account.to_owned()),
        occurred_at: chrono::Utc::now(),
        source: "inseam".into(),
        headers: inseam::Headers::default(),
        payload: Deposited {
            account: account.to_owned(),
            amount: 1,
            seq,
        },
    }
}

/// The bank's tables.
pub async fn create_schema(store: &SqlStore) -> Result<(), sqlx::Error> {
    let pool = store.pool();
    let serial = match store.backend() {
        Backend::Sqlite => "INTEGER PRIMARY KEY",
        Backend::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bank_deposits (seq BIGINT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL)",
    )
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS bank_effects (id {serial}, grp TEXT NOT NULL, message_id TEXT NOT NULL, seq BIGINT NOT NULL, account TEXT NOT NULL)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// The bank app on `store`.
pub fn builder(store: SqlStore, faults: Faults) -> AppBuilder {
    App::builder()
        .store(store)
        .state(faults)
        .handler::<deposit>()
        .handler::<ledger>()
        .handler::<audit>()
}

/// The bank app on `store`, built.
pub async fn app(store: SqlStore, faults: Faults) -> Result<App, BuildError> {
    builder(store, faults).build().await
}

/// The committed deposits' numbers, sorted.
pub async fn deposits(pool: &SqlPool) -> Vec<i64> {
    use sqlx::Row as _;
    sqlx::query("SELECT seq FROM bank_deposits ORDER BY seq")
        .fetch_all(pool)
        .await
        .map(|rows| rows.iter().map(|r| r.get::<i64, _>(0)).collect())
        .unwrap_or_default()
}

/// What `group` handled, `(seq, account)` in the order it handled them.
pub async fn effects(pool: &SqlPool, group: &str) -> Vec<(i64, String)> {
    use sqlx::Row as _;
    sqlx::query("SELECT seq, account FROM bank_effects WHERE grp = $1 ORDER BY id")
        .bind(group.to_owned())
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)))
                .collect()
        })
        .unwrap_or_default()
}
