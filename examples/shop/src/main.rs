//! `cargo run -p shop`: creates a fresh shop on an embedded SQLite file (or the database at
//! `SHOP_DATABASE_URL`), seeds the catalog, places three orders (one goes through, one is
//! declined by the payment gateway, one asks for more than is in stock) and prints the
//! timeline of each flow.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use shop::{ShopError, World};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("shop: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to standard output; a closed pipe (`| head`) only cuts the output short.
fn show(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

async fn demo() -> Result<(), ShopError> {
    let dir = tempfile::tempdir().map_err(|e| ShopError::Dispatch(e.to_string()))?;
    let url = std::env::var("SHOP_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("shop.db").display()));
    show(&format!("inseam shop on {url}\n\n"));
    let store = shop::open(&url).await?;
    let world = World::default();
    world.gateway.decline("bob");
    let app = shop::app(&store, &world).await?;
    let relay = app.start();
    shop::seed(&app).await?;

    for order in shop::DEMO_ORDERS {
        let (order_id, customer) = (order.order_id, order.customer);
        let flow = shop::place(&app, order_id, customer, order.lines).await?;
        let summary = shop::settled(&app, order_id, Duration::from_secs(10)).await?;
        let outcome = match &summary.reason {
            Some(reason) => format!("{} ({reason})", summary.status),
            None => summary.status.clone(),
        };
        show(&format!(
            "{order_id} for {customer}, {:.2} EUR: {outcome}\n{}\n",
            summary.total_cents as f64 / 100.0,
            shop::timeline(&store, &app, flow, true).await?
        ));
    }
    relay.shutdown().await;
    Ok(())
}
