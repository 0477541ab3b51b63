//! The app the crash tests kill: `crash_child <database-url> <first-seq> load|drain`.
//!
//! `load` starts the relay and sends deposits without end, from `first-seq` on; every
//! eleventh fails after writing (and must leave no trace). `drain` starts the relay and exits
//! once no delivery is left.

use std::process::ExitCode;
use std::time::Duration;

use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam_tests::bank::{self, Deposit, Faults};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(first), Some(mode)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: crash_child <database-url> <first-seq> load|drain");
        return ExitCode::FAILURE;
    };
    let Ok(first) = first.parse::<i64>() else {
        eprintln!("first-seq must be a number, got {first}");
        return ExitCode::FAILURE;
    };
    match run(url, first, mode).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crash_child: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(url: &str, first: i64, mode: &str) -> Result<(), Box<dyn std::error::Error>> {
    let relay = RelayOptions {
        poll_interval: Duration::from_millis(50),
        batch_size: 50,
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(url, SqlStoreOptions::new().relay(relay)).await?;
    bank::create_schema(&store).await?;
    let app = bank::app(store.clone(), Faults::default()).await?;
    let relay = app.start();
    match mode {
        "load" => {
            for seq in first.. {
                let amount = if seq % 11 == 0 { -1 } else { 1 };
                let deposit = Deposit {
                    account: format!("acct-{}", seq % 8),
                    amount,
                    seq,
                };
                // A failure is expected for the negative amounts; nothing else may fail.
                if let Err(error) = app.send(deposit).await
                    && amount > 0
                {
                    return Err(error.into());
                }
            }
            Ok(())
        }
        "drain" => {
            loop {
                if store.lag().await?.groups.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            relay.shutdown().await;
            Ok(())
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}
