//! `cargo run -p shop`: creates a fresh shop on an embedded SQLite file (or the database at
//! `SHOP_DATABASE_URL`), seeds the catalog, places three orders (one goes through, one is
//! declined by the payment gateway, one asks for more than is in stock) and prints the
//! timeline of each flow.
//!
//! `cargo run -p shop -- serve [address]`: the HTTP API (default `127.0.0.1:3000`) on
//! `SHOP_DATABASE_URL` (default `sqlite://shop.db`), until Ctrl-C, with the admin page at
//! `/admin` and its metrics as Prometheus text at `GET /metrics`; with `SHOP_ADMIN_TOKEN` set,
//! whoever logs in at `/admin` with that token (or sends it as `Authorization: Bearer <token>`)
//! may retry, discard and repair dead letters.
//!
//! `SHOP_TRACES=<file>` (any mode): the process's spans, exported through OpenTelemetry, are
//! written to that file, one JSON object a line (`shop::telemetry`).
//!
//! `cargo run -p shop -- catalog [directory]`: writes the message catalog (`catalog.md`,
//! `asyncapi.yaml`, `flow.mmd`) from the app's registrations, and the same for the shop split
//! into two processes (`catalog-split.md`, `asyncapi-split.yaml`, `flow-split.mmd`; see
//! `shop::SPLIT`), by default to `examples/shop/docs/`.
//!
//! `cargo run -p shop -- inseam <command>`: the `inseam` operator commands (`status`,
//! `dead-letters`, `flow`, `groups`, `outbox prune`, `projection rebuild`, `catalog`) on
//! `SHOP_DATABASE_URL` (default `sqlite://shop.db`) or `--database-url`, with the shop's
//! registrations: edited payloads are checked against their decoders, projections rebuild.
//!
//! With `INSEAM_CONFIG=examples/shop/split.toml`, the demo and `serve` run the main process
//! of a shop split in two over NATS (`INSEAM_NATS_URL`, default `nats://127.0.0.1:4222`), or
//! over Redis with `transport = "redis"` in the file (`INSEAM_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), over RabbitMQ with `transport = "amqp"` (`INSEAM_AMQP_URL`,
//! default `amqp://127.0.0.1:5672/%2f`);
//! the same command with `INSEAM_PROCESS=billing` runs the billing process (payments and
//! shipping) on a database of its own until Ctrl-C or SIGTERM.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use shop::{Deployment, ShopError, World};

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to standard error: standard output is the demo's. `SHOP_TRACES=<file>`: spans
    // to that file too.
    if let Err(error) = shop::telemetry::from_env() {
        eprintln!("shop: {error}");
        return ExitCode::FAILURE;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("inseam") {
        return operate(&args).await;
    }
    let outcome = match args.first().map(String::as_str) {
        None => demo().await,
        Some("serve") => serve(args.get(1).map_or("127.0.0.1:3000", String::as_str)).await,
        Some("worker") => worker(&args[1..]).await,
        Some("catalog") => catalog(args.get(1).map_or(DOCS, String::as_str)).await,
        Some(other) => Err(ShopError::Dispatch(format!(
            "unknown mode `{other}`: run without arguments for the demo, `serve [address]` or `catalog [directory]`"
        ))),
    };
    shop::telemetry::shutdown_tracing();
    match outcome {
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

/// `shop inseam <command>`: the `inseam` commands with the shop's registrations, on
/// `SHOP_DATABASE_URL` (default `sqlite://shop.db`) unless `--database-url` says otherwise. The
/// database is opened as it is, never migrated.
async fn operate(args: &[String]) -> ExitCode {
    let url = std::env::var("SHOP_DATABASE_URL").unwrap_or_else(|_| "sqlite://shop.db".into());
    let world = World::default();
    inseam::cli::run_with(
        Some(&url),
        |store| async move { Ok(shop::app(&store, &world).await?) },
        args,
    )
    .await
}

/// Where `catalog` writes by default: the shop's `docs/` directory.
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");

/// `shop catalog [directory]`: writes the message catalog (Markdown, AsyncAPI, Mermaid), for
/// one process and for the split.
async fn catalog(dir: &str) -> Result<(), ShopError> {
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)
        .map_err(|e| ShopError::Dispatch(format!("cannot create {}: {e}", dir.display())))?;
    for (name, text) in shop::catalog_files().await? {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| ShopError::Dispatch(format!("cannot write {}: {e}", path.display())))?;
        show(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}

async fn serve(address: &str) -> Result<(), ShopError> {
    // Counted from the start, served at `GET /metrics`.
    shop::telemetry::install_metrics()?;
    let deployment = Deployment::from_env().await?;
    let world = World::default();
    if !deployment.is_main() {
        // Each process has a database of its own.
        let url = std::env::var("SHOP_DATABASE_URL")
            .unwrap_or_else(|_| format!("sqlite://shop-{}.db", deployment.process()));
        return host(&deployment, &url, &world).await;
    }
    let url = std::env::var("SHOP_DATABASE_URL").unwrap_or_else(|_| "sqlite://shop.db".into());
    let store = shop::open_for(&url, &deployment).await?;
    let app = shop::app_for(&store, &world, &deployment).await?;
    let relay = app.start();
    shop::seed(&app).await?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| ShopError::Dispatch(format!("cannot listen on {address}: {e}")))?;
    let admin_token = std::env::var("SHOP_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let changes = if admin_token.is_some() {
        "log in with SHOP_ADMIN_TOKEN to change anything"
    } else {
        "read only: set SHOP_ADMIN_TOKEN to allow changes"
    };
    show(&format!(
        "inseam shop on {url}, serving http://{address} (admin page: http://{address}/admin, {changes})\n"
    ));
    axum::serve(
        listener,
        shop::http::router_with_admin(app, store, admin_token),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(|e| ShopError::Dispatch(e.to_string()))?;
    relay.shutdown().await;
    Ok(())
}

/// `shop worker <from> <to>`: the process the crash test kills. Places the orders
/// `w-<from>`..`w-<to>` (those placed before are refused, and skipped) and relays until killed.
/// Customers `c<i>` with `i % 3 == 1` are declined; orders with `i % 3 == 2` ask for more cups
/// than exist.
async fn worker(args: &[String]) -> Result<(), ShopError> {
    let range = |i: usize| args.get(i).and_then(|a| a.parse::<u32>().ok()).unwrap_or(0);
    let (from, to) = (range(0), range(1));
    let url = std::env::var("SHOP_DATABASE_URL")
        .map_err(|_| ShopError::Dispatch("the worker needs SHOP_DATABASE_URL".into()))?;
    let store = shop::open(&url).await?;
    let world = World::default();
    for i in (from..to).filter(|i| i % 3 == 1) {
        world.gateway.decline(&format!("c{i}"));
    }
    let app = shop::app(&store, &world).await?;
    let _relay = app.start();
    for i in from..to {
        let lines: &[(&str, u32)] = if i % 3 == 2 {
            &[("cup", 1000)]
        } else {
            &[("tea", 1)]
        };
        match shop::place(&app, &format!("w-{i}"), &format!("c{i}"), lines).await {
            Ok(_) => {}
            Err(ShopError::Dispatch(message)) if message.contains("already placed") => {}
            Err(error) => return Err(error),
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// A process other than the main one: runs its modules' groups (consumed from the transport,
/// delivered by its relay) until Ctrl-C or SIGTERM. It serves nothing: the HTTP API's
/// commands and queries are answered by the main process.
async fn host(deployment: &Deployment, url: &str, world: &World) -> Result<(), ShopError> {
    let store = shop::open_for(url, deployment).await?;
    let app = shop::app_for(&store, world, deployment).await?;
    let relay = app.start();
    show(&format!(
        "inseam shop, process `{}` on {url}: runs {}; Ctrl-C stops it\n",
        deployment.process(),
        deployment.modules().join(", ")
    ));
    stopped().await;
    relay.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM where there is one.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Writes to standard output; a closed pipe (`| head`) only cuts the output short.
fn show(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

async fn demo() -> Result<(), ShopError> {
    let deployment = Deployment::from_env().await?;
    let dir = tempfile::tempdir().map_err(|e| ShopError::Dispatch(e.to_string()))?;
    let url = std::env::var("SHOP_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("shop.db").display()));
    let world = World::default();
    world.gateway.decline("bob");
    if !deployment.is_main() {
        return host(&deployment, &url, &world).await;
    }
    if deployment.routing().is_single() {
        show(&format!("inseam shop on {url}\n\n"));
    } else {
        let others: Vec<String> = deployment
            .routing()
            .processes()
            .map(|(name, route)| {
                let runs: Vec<&str> = route
                    .modules
                    .iter()
                    .chain(&route.groups)
                    .map(String::as_str)
                    .collect();
                format!("`{name}` ({}) over {}", runs.join(", "), route.transport)
            })
            .collect();
        show(&format!(
            "inseam shop on {url}, process `main` ({}); {}\n\n",
            deployment.modules().join(", "),
            others.join("; ")
        ));
    }
    let store = shop::open_for(&url, &deployment).await?;
    let app = shop::app_for(&store, &world, &deployment).await?;
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
    // Asked synchronously of payments, which may run in another process: a command and a
    // query answered there (request-reply), one answer an output, one a typed error.
    show("payments, asked synchronously:\n");
    for order in shop::DEMO_ORDERS.iter().take(2) {
        let receipt = app
            .send(shop::payments::IssueReceipt {
                order_id: order.order_id.to_owned(),
            })
            .await;
        let charge = app
            .query(shop::payments::ChargeOf {
                order_id: order.order_id.to_owned(),
            })
            .await;
        let receipt = match receipt {
            Ok(receipt) => receipt,
            Err(inseam::DispatchError::Handler(refused)) => format!("no receipt: {refused}"),
            Err(other) => {
                return Err(ShopError::Dispatch(
                    inseam::error::Report(&other).to_string(),
                ));
            }
        };
        let charge = match charge {
            Ok(cents) => format!("charged {:.2} EUR", cents as f64 / 100.0),
            Err(inseam::DispatchError::Handler(refused)) => format!("not charged: {refused}"),
            Err(other) => {
                return Err(ShopError::Dispatch(
                    inseam::error::Report(&other).to_string(),
                ));
            }
        };
        show(&format!("  {}: {receipt}; {charge}\n", order.order_id));
    }
    relay.shutdown().await;
    Ok(())
}
