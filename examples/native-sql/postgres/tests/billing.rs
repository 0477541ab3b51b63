//! The billing module on a fresh database of the PostgreSQL server at `INSEAM_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432`, trust auth): what its handlers write with
//! `sqlx::query!` through the framework's transaction reads back equal, the `receivables`
//! group records each invoice once, and a refused invoice leaves no row.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use inseam::prelude::*;
use native_sql_postgres::{
    BillingError, CREDIT_LIMIT_CENTS, Details, Invoice, Invoices, IssueInvoice, Line, Receivable,
    Receivables,
};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection as _, Executor as _, PgConnection};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// A database of its own on the PostgreSQL server, dropped by [`remove`](Self::remove).
struct TestDatabase {
    server: String,
    name: String,
}

impl TestDatabase {
    async fn create(test: &str) -> TestDatabase {
        let server = std::env::var("INSEAM_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("native_sql_{test}_{}", std::process::id());
        let mut admin = admin(&server).await;
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .execute(AssertSqlSafe(statement))
                .await
                .expect("create the test database");
        }
        TestDatabase { server, name }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    async fn remove(self) {
        admin(&self.server)
            .await
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.name
            )))
            .await
            .expect("drop the test database");
    }
}

async fn admin(server: &str) -> PgConnection {
    let url = format!("{server}/postgres");
    match PgConnection::connect(&url).await {
        Ok(conn) => conn,
        Err(error) => panic!(
            "these tests need PostgreSQL, which is not reachable at {url}: {error}\n\
             start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or point INSEAM_TEST_POSTGRES at a server with trust auth"
        ),
    }
}

/// An instant with microseconds, the precision PostgreSQL keeps.
fn instant(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("a valid instant")
}

fn invoice(customer: &str, issued_at: DateTime<Utc>, lines: &[(&str, u32, i64)]) -> IssueInvoice {
    IssueInvoice {
        id: Uuid::now_v7(),
        customer: customer.to_owned(),
        issued_at,
        details: Details {
            lines: lines
                .iter()
                .map(|&(item, quantity, unit_cents)| Line {
                    item: item.to_owned(),
                    quantity,
                    unit_cents,
                })
                .collect(),
            terms_days: 30,
            note: Some("Zahlbar ohne Abzug — \"net\" 30 days, 100 % ✓".to_owned()),
        },
    }
}

/// The row `cmd` should have written.
fn row_of(cmd: &IssueInvoice) -> Invoice {
    Invoice {
        id: cmd.id,
        customer: cmd.customer.clone(),
        issued_at: cmd.issued_at,
        total_cents: cmd.details.total_cents(),
        details: Json(cmd.details.clone()),
    }
}

async fn started(db: &TestDatabase) -> (SqlStore, App) {
    let store = SqlStore::connect(&db.url())
        .await
        .expect("connect the store");
    let app = native_sql_postgres::app(&store)
        .await
        .expect("migrate and build the app");
    (store, app)
}

async fn receivables_of(app: &App, customer: &str) -> Vec<Receivable> {
    app.query(Receivables {
        customer: customer.to_owned(),
    })
    .await
    .expect("read the receivables")
}

/// Waits until `customer` has `count` receivables.
async fn wait_for_receivables(app: &App, customer: &str, count: usize) {
    let start = Instant::now();
    while receivables_of(app, customer).await.len() < count {
        assert!(
            start.elapsed() < WAIT,
            "{customer} has no {count} receivables after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Uuid, the DateTime<Utc> and the Json<Details> a command handler inserted with
/// `query!` read back equal through a query handler's `query_as!`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoice_values_round_trip() {
    let db = TestDatabase::create("round_trip").await;
    let (store, app) = started(&db).await;
    let issued = [
        invoice(
            "acme",
            instant(1_767_225_600_000_001),
            &[("anvil", 2, 12_500), ("rope, 10 m", 1, 1_999)],
        ),
        invoice(
            "acme",
            instant(1_773_480_413_589_793),
            &[("rocket", 1, 99_900)],
        ),
    ];
    let rows: Vec<Invoice> = issued.iter().map(row_of).collect();
    for cmd in issued {
        let total = cmd.details.total_cents();
        assert_eq!(app.send(cmd).await.expect("issue the invoice"), total);
    }

    let read = app
        .query(Invoices {
            customer: "acme".to_owned(),
        })
        .await
        .expect("read the invoices");
    assert_eq!(read, rows);
    assert_eq!(read[0].total_cents, 26_999);

    store.pool().close().await;
    db.remove().await;
}

/// The `receivables` group reads each invoice with `query_as!` in its delivery's transaction
/// and writes exactly one receivable per `InvoiceIssued` event, with the values it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receivables_group_records_each_invoice_once() {
    let db = TestDatabase::create("receivables_once").await;
    let (store, app) = started(&db).await;
    let customers = ["acme", "globex", "initech"];
    let mut issued = Vec::new();
    for i in 0..9_i64 {
        let cmd = invoice(
            customers[i as usize % 3],
            instant(1_767_225_600_000_000 + i * 86_400_000_123),
            &[("widget", 1 + i as u32, 1_000 + i)],
        );
        issued.push(row_of(&cmd));
        app.send(cmd).await.expect("issue the invoice");
    }

    let relay = app.start();
    for customer in customers {
        wait_for_receivables(&app, customer, 3).await;
    }
    relay.shutdown().await;

    let mut event_ids = HashSet::new();
    for customer in customers {
        let receivables = receivables_of(&app, customer).await;
        let expected: Vec<_> = issued
            .iter()
            .filter(|invoice| invoice.customer == customer)
            .collect();
        assert_eq!(receivables.len(), expected.len(), "{customer}");
        for (receivable, invoice) in receivables.iter().zip(expected) {
            assert_eq!(
                receivable,
                &Receivable {
                    invoice_id: invoice.id,
                    event_id: receivable.event_id,
                    customer: customer.to_owned(),
                    amount_cents: invoice.total_cents,
                    due_at: invoice.issued_at + TimeDelta::days(30),
                }
            );
            assert!(event_ids.insert(receivable.event_id), "{receivable:?}");
        }
    }
    assert_eq!(event_ids.len(), issued.len());
    let lag = store.lag().await.expect("read the lag");
    assert!(lag.groups.is_empty(), "{lag:?}");
    assert_eq!(lag.dead_letters, 0);

    store.pool().close().await;
    db.remove().await;
}

/// A handler that fails after its `query!` INSERT leaves no row and no event: the framework
/// rolled its transaction back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_invoice_leaves_no_row() {
    let db = TestDatabase::create("refused").await;
    let (store, app) = started(&db).await;
    let at = instant(1_767_225_600_000_000);
    let first = invoice("acme", at, &[("anvil", 24, 12_500)]);
    let refused = invoice("acme", at + TimeDelta::hours(1), &[("rocket", 3, 99_900)]);
    let last = invoice("acme", at + TimeDelta::hours(2), &[("rope", 10, 1_999)]);
    let (first_row, refused_id, last_row) = (row_of(&first), refused.id, row_of(&last));

    app.send(first).await.expect("issue the first invoice");
    match app.send(refused).await {
        Err(DispatchError::Handler(BillingError::CreditLimitExceeded {
            invoice,
            owed,
            limit,
            ..
        })) => {
            assert_eq!(invoice, refused_id);
            assert_eq!(owed, 300_000 + 299_700);
            assert_eq!(limit, CREDIT_LIMIT_CENTS);
        }
        other => panic!("the invoice over the limit was not refused: {other:?}"),
    }
    app.send(last).await.expect("issue the last invoice");

    let invoices = app
        .query(Invoices {
            customer: "acme".to_owned(),
        })
        .await
        .expect("read the invoices");
    assert_eq!(invoices, [first_row.clone(), last_row.clone()]);

    let relay = app.start();
    wait_for_receivables(&app, "acme", 2).await;
    relay.shutdown().await;
    let owed: Vec<Uuid> = receivables_of(&app, "acme")
        .await
        .iter()
        .map(|receivable| receivable.invoice_id)
        .collect();
    assert_eq!(owed, [first_row.id, last_row.id]);
    let lag = store.lag().await.expect("read the lag");
    assert!(lag.groups.is_empty(), "{lag:?}");
    assert_eq!(lag.dead_letters, 0);

    store.pool().close().await;
    db.remove().await;
}
