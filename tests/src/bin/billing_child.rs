//! The consuming process the broker crash test kills:
//! `billing_child <transport> <broker-url> <database-url>` runs process `billing` of
//! `inseam_tests::billing` (group `billing.ledger`, consumed from the broker into its own
//! database) until it is killed. A message it held when it died comes back after a 2 s ack
//! wait.

use std::process::ExitCode;
use std::time::Duration;

use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam_tests::billing;
use inseam_tests::brokers::Broker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(transport), Some(url), Some(db_url)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: billing_child <transport> <broker-url> <database-url>");
        return ExitCode::FAILURE;
    };
    let Some(broker) = Broker::from_name(transport) else {
        eprintln!("billing_child: no transport `{transport}`");
        return ExitCode::FAILURE;
    };
    match run(broker, url, db_url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("billing_child: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(broker: Broker, url: &str, db_url: &str) -> Result<(), inseam::BoxError> {
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        inbound_ack_wait: Duration::from_secs(2),
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(db_url, SqlStoreOptions::new().relay(relay)).await?;
    billing::create_schema(&store, "billing").await?;
    // Every billing process is the same member, started again after each kill.
    let transport = broker.transport_as(url, Some("billing")).await?;
    let app = billing::app(&store, transport, "billing").await?;
    let _relay = app.start();
    std::future::pending::<()>().await;
    Ok(())
}
