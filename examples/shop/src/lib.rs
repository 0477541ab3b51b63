//! The example shop: six modules of one app, each exposing only its messages.
//!
//! - [`catalog`]: products and prices.
//! - [`orders`]: the event-sourced `Order`, the fulfilment saga, the order summaries.
//! - [`inventory`]: stock and reservations.
//! - [`payments`]: charges and refunds against a fake gateway.
//! - [`shipping`]: shipments with a fake carrier.
//! - [`notifications`]: messages to customers, by choreography.
//!
//! A module's tables carry its name as a prefix, and no module touches another's tables
//! (`tests/boundaries.rs` checks the SQL of every module). Modules talk through commands,
//! queries and events only, so any of them can later move behind a broker.
//!
//! By default one process runs every module. A [`Deployment`] read from the environment
//! (`INSEAM_CONFIG`, `INSEAM_PROCESS`, and the broker's URL: `INSEAM_NATS_URL`,
//! `INSEAM_REDIS_URL`, `INSEAM_AMQP_URL` or `INSEAM_KAFKA_URL`) runs some of
//! them in another process of the same binary over NATS, Redis, RabbitMQ or Kafka; `split.toml` moves payments
//! and shipping to process `billing`. Each process has a database of its own and creates the tables of the modules it
//! runs only.

pub mod catalog;
pub mod http;
pub mod inventory;
pub mod notifications;
pub mod orders;
pub mod payments;
pub mod shipping;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use inseam::routing::{Routing, RoutingError};
use inseam::sql::sqlx::{self, AssertSqlSafe};
use inseam::sql::{Backend, SqlStore};
use inseam::transport::Transport;
use inseam::{App, BuildError, Catalog, MessageMeta};

use crate::catalog::{AddProduct, Product};
use crate::inventory::SetStock;
use crate::orders::{GetOrder, OrderLine, OrderSummary, PlaceOrder};
use crate::payments::Gateway;
use crate::shipping::Carrier;

/// Why the shop could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] inseam::sql::Error),
    /// Creating a module's tables failed.
    #[error("creating the shop's tables failed")]
    Schema(#[source] sqlx::Error),
    /// The app's wiring is wrong.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A command or query failed.
    #[error("{0}")]
    Dispatch(String),
    /// An order did not finish in time.
    #[error("order `{0}` did not finish within {1:?}")]
    Timeout(String, Duration),
    /// The routing file (`INSEAM_CONFIG`) could not be read.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// The NATS transport could not be set up.
    #[error("the NATS transport could not be set up")]
    Nats(#[source] inseam::nats::NatsError),
    /// The Redis transport could not be set up.
    #[error("the Redis transport could not be set up")]
    Redis(#[source] inseam::redis::RedisError),
    /// The RabbitMQ transport could not be set up.
    #[error("the RabbitMQ transport could not be set up")]
    Amqp(#[source] inseam::amqp::AmqpError),
    /// The Kafka transport could not be set up.
    #[error("the Kafka transport could not be set up")]
    Kafka(#[source] inseam::kafka::KafkaError),
    /// Metrics or traces could not be set up (a recorder or subscriber was already
    /// installed, a span file cannot be opened).
    #[error("{0}")]
    Telemetry(String),
    /// The routing names a transport the shop does not know.
    #[error(
        "process `{process}` is reached over transport `{transport}`, which the shop does not provide (it provides `nats`, `redis`, `amqp` and `kafka`)"
    )]
    UnknownTransport {
        /// The process the routing declares.
        process: String,
        /// The transport it names.
        transport: String,
    },
}

/// The shop's modules, each the first segment of its messages' and groups' names.
pub const MODULES: [&str; 6] = [
    "catalog",
    "inventory",
    "orders",
    "payments",
    "shipping",
    "notifications",
];

/// Which of the shop's processes this one is, and the transports that reach the others.
///
/// [`Deployment::single`] is one process running every module. [`Deployment::from_env`] reads
/// the routing file named by `INSEAM_CONFIG` (every process gets the same file) and the name
/// of this process from `INSEAM_PROCESS` (the main process when unset), and connects the
/// transports the file names: `nats`, at `INSEAM_NATS_URL` (default `nats://127.0.0.1:4222`;
/// the other `INSEAM_NATS_*` variables of [`NatsOptions::from_env`] apply), `redis`, at
/// `INSEAM_REDIS_URL` (default `redis://127.0.0.1:6379`; the other `INSEAM_REDIS_*` variables
/// of [`RedisOptions::from_env`] apply), and `amqp` (RabbitMQ), at `INSEAM_AMQP_URL` (default
/// `amqp://127.0.0.1:5672/%2f`; the other `INSEAM_AMQP_*` variables of
/// [`AmqpOptions::from_env`] apply), and `kafka`, at `INSEAM_KAFKA_URL` (default
/// `127.0.0.1:9092`; the other `INSEAM_KAFKA_*` variables of [`KafkaOptions::from_env`]
/// apply).
///
/// The shop's modules reach payments and shipping only through durable commands and events,
/// so those two can run in another process (`split.toml`). Catalog, inventory and orders
/// answer synchronous `send`/`query` calls (the orders' prices, the demo's seed and status
/// polls, the HTTP API), which cannot cross processes yet: they stay in the main process.
///
/// [`NatsOptions::from_env`]: inseam::nats::NatsOptions::from_env
/// [`RedisOptions::from_env`]: inseam::redis::RedisOptions::from_env
/// [`AmqpOptions::from_env`]: inseam::amqp::AmqpOptions::from_env
/// [`KafkaOptions::from_env`]: inseam::kafka::KafkaOptions::from_env
#[derive(Debug, Clone, Default)]
pub struct Deployment {
    routing: Routing,
    transports: Vec<Arc<dyn Transport>>,
}

impl Deployment {
    /// One process running every module.
    pub fn single() -> Self {
        Deployment::default()
    }

    /// The deployment the environment asks for; see the type's documentation.
    pub async fn from_env() -> Result<Self, ShopError> {
        Deployment::connect(Routing::from_env()?).await
    }

    /// Connects the transports `routing` names (their options from the environment).
    pub async fn connect(routing: Routing) -> Result<Self, ShopError> {
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        let mut connected: Vec<&str> = Vec::new();
        for (process, route) in routing.processes() {
            let name = route.transport.as_str();
            if connected.contains(&name) {
                continue;
            }
            match name {
                "nats" => {
                    let options = inseam::nats::NatsOptions::from_env()
                        .map_err(ShopError::Nats)?
                        .client_name(format!("inseam shop, process {}", routing.current()));
                    let nats = inseam::nats::Nats::connect_with(options)
                        .await
                        .map_err(ShopError::Nats)?;
                    transports.push(Arc::new(nats));
                }
                "redis" => {
                    let options =
                        inseam::redis::RedisOptions::from_env().map_err(ShopError::Redis)?;
                    let redis = inseam::redis::Redis::connect_with(options)
                        .await
                        .map_err(ShopError::Redis)?;
                    transports.push(Arc::new(redis));
                }
                "amqp" => {
                    let options = inseam::amqp::AmqpOptions::from_env()
                        .map_err(ShopError::Amqp)?
                        .client_name(format!("inseam shop, process {}", routing.current()));
                    let amqp = inseam::amqp::Amqp::connect_with(options)
                        .await
                        .map_err(ShopError::Amqp)?;
                    transports.push(Arc::new(amqp));
                }
                "kafka" => {
                    let options = inseam::kafka::KafkaOptions::from_env()
                        .map_err(ShopError::Kafka)?
                        .client_id(format!("inseam-shop-{}", routing.current()));
                    let kafka =
                        inseam::kafka::Kafka::connect_with(options).map_err(ShopError::Kafka)?;
                    transports.push(Arc::new(kafka));
                }
                other => {
                    return Err(ShopError::UnknownTransport {
                        process: process.to_owned(),
                        transport: other.to_owned(),
                    });
                }
            }
            connected.push(name);
        }
        Ok(Deployment {
            routing,
            transports,
        })
    }

    /// Where each group runs.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The name of this process (`main` unless `INSEAM_PROCESS` says otherwise).
    pub fn process(&self) -> &str {
        self.routing.current()
    }

    /// Whether this is the main process: the one that runs every module no other claims.
    pub fn is_main(&self) -> bool {
        self.process() == inseam::routing::MAIN
    }

    /// Whether this process runs `module`.
    pub fn runs(&self, module: &str) -> bool {
        self.routing.is_local(module)
    }

    /// The modules this process runs.
    pub fn modules(&self) -> Vec<&'static str> {
        MODULES.into_iter().filter(|m| self.runs(m)).collect()
    }
}

/// The fake outside world the shop talks to.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// The payment gateway.
    pub gateway: Gateway,
    /// The carrier.
    pub carrier: Carrier,
}

/// Connects to the shop's database (`sqlite://..` or `postgres://..`) and creates its tables.
pub async fn open(url: &str) -> Result<SqlStore, ShopError> {
    open_for(url, &Deployment::single()).await
}

/// Connects to this process's database and creates the tables of the modules it runs.
pub async fn open_for(url: &str, deployment: &Deployment) -> Result<SqlStore, ShopError> {
    let store = SqlStore::connect(url).await?;
    install_for(&store, deployment).await?;
    Ok(store)
}

/// Creates the modules' tables in `store`, if they do not exist.
pub async fn install(store: &SqlStore) -> Result<(), ShopError> {
    install_for(store, &Deployment::single()).await
}

/// Creates the tables of the modules this process runs in `store`, if they do not exist.
pub async fn install_for(store: &SqlStore, deployment: &Deployment) -> Result<(), ShopError> {
    let serial = match store.backend() {
        Backend::Sqlite => "INTEGER PRIMARY KEY",
        Backend::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    let schemas = [
        ("catalog", catalog::SCHEMA),
        ("inventory", inventory::SCHEMA),
        ("payments", payments::SCHEMA),
        ("shipping", shipping::SCHEMA),
        ("notifications", notifications::SCHEMA),
    ];
    let local = schemas
        .into_iter()
        .filter(|(module, _)| deployment.runs(module));
    for statement in local.flat_map(|(_, schema)| schema) {
        sqlx::query(AssertSqlSafe(statement.replace("{serial}", serial)))
            .execute(store.pool())
            .await
            .map_err(ShopError::Schema)?;
    }
    if deployment.runs("orders") {
        store.install(&orders::Summaries).await?;
    }
    Ok(())
}

/// The shop's app on `store`, talking to `world`.
pub async fn app(store: &SqlStore, world: &World) -> Result<App, ShopError> {
    app_for(store, world, &Deployment::single()).await
}

/// The shop's app as the process `deployment` says: its modules' groups run here, the others'
/// are reached over its transports.
pub async fn app_for(
    store: &SqlStore,
    world: &World,
    deployment: &Deployment,
) -> Result<App, ShopError> {
    let mut builder = App::builder()
        .source("shop")
        .store(store.clone())
        .routing(deployment.routing.clone());
    for transport in &deployment.transports {
        builder = builder.transport_arc(Arc::clone(transport));
    }
    let builder = telemetry::observe(builder);
    Ok(configure(builder, store, world).build().await?)
}

/// The split the shop is documented for, `examples/shop/split.toml`: `payments` and
/// `shipping` run in process `billing`, which the main process reaches over NATS (and
/// `billing` the main one; the same file with `transport = "redis"`, `"amqp"` or `"kafka"`
/// splits it over that broker). The catalog renders it from here.
pub const SPLIT: &str = include_str!("../split.toml");

/// The shop's message catalog, as the files under `examples/shop/docs/`: `catalog.md`
/// (Markdown, with the flow diagram), `asyncapi.yaml` (AsyncAPI 3.0) and `flow.mmd` (Mermaid)
/// for the shop as one process, and `catalog-split.md`, `asyncapi-split.yaml` and
/// `flow-split.mmd` for the [`SPLIT`] into two processes.
/// `cargo run -p shop -- catalog` writes them; `tests/catalog.rs` checks they are current.
pub async fn catalog_files() -> Result<Vec<(&'static str, String)>, ShopError> {
    let dir = tempfile::tempdir()
        .map_err(|e| ShopError::Dispatch(format!("cannot create a temporary directory: {e}")))?;
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    let store = open(&url).await?;
    let app = app(&store, &World::default()).await?;
    let catalog = app.catalog();
    let split = Routing::from_toml(SPLIT).map_err(|e| ShopError::Dispatch(e.to_string()))?;
    let split = catalog.routed(&split)?;
    let asyncapi = |catalog: &Catalog| {
        catalog
            .asyncapi_yaml()
            .map_err(|e| ShopError::Dispatch(e.to_string()))
    };
    let files = vec![
        ("catalog.md", catalog.markdown()),
        ("asyncapi.yaml", asyncapi(catalog)?),
        ("flow.mmd", catalog.mermaid()),
        ("catalog-split.md", split.markdown()),
        ("asyncapi-split.yaml", asyncapi(&split)?),
        ("flow-split.mmd", split.mermaid()),
    ];
    store.pool().close().await;
    Ok(files)
}

/// Registers every module on `builder`; queries read through `store`'s pool.
pub fn configure(
    builder: inseam::AppBuilder,
    store: &SqlStore,
    world: &World,
) -> inseam::AppBuilder {
    let builder = builder.state(store.pool().clone());
    let builder = catalog::register(builder);
    let builder = inventory::register(builder);
    let builder = payments::register(builder, world.gateway.clone());
    let builder = shipping::register(builder, world.carrier.clone());
    let builder = notifications::register(builder);
    orders::register(builder)
}

/// The catalog and stock the demo starts with, sent to the catalog and inventory modules (which
/// run in the main process).
pub async fn seed(app: &App) -> Result<(), ShopError> {
    let products = [
        ("tea", "Assam tea, 250 g", 650, 100),
        ("cup", "Porcelain cup", 1200, 20),
        ("teapot", "Cast iron teapot", 4500, 1),
    ];
    for (sku, name, price_cents, stock) in products {
        app.send(AddProduct {
            product: Product {
                sku: sku.into(),
                name: name.into(),
                price_cents,
            },
        })
        .await
        .map_err(|e| ShopError::Dispatch(e.to_string()))?;
        app.send(SetStock {
            sku: sku.into(),
            available: stock,
        })
        .await
        .map_err(|e| ShopError::Dispatch(e.to_string()))?;
    }
    Ok(())
}

/// One of the demo's orders.
#[derive(Debug, Clone, Copy)]
pub struct DemoOrder {
    /// The order's id.
    pub order_id: &'static str,
    /// Who orders.
    pub customer: &'static str,
    /// `(sku, quantity)` per line.
    pub lines: &'static [(&'static str, u32)],
}

/// The demo's three orders: alice's goes through, bob's card is declined (the demo's gateway
/// declines bob), carol asks for three teapots when one is in stock.
pub const DEMO_ORDERS: [DemoOrder; 3] = [
    DemoOrder {
        order_id: "order-1",
        customer: "alice",
        lines: &[("tea", 2), ("cup", 1)],
    },
    DemoOrder {
        order_id: "order-2",
        customer: "bob",
        lines: &[("tea", 1)],
    },
    DemoOrder {
        order_id: "order-3",
        customer: "carol",
        lines: &[("teapot", 3)],
    },
];

/// Places an order in a flow of its own; returns the flow's correlation id.
pub async fn place(
    app: &App,
    order_id: &str,
    customer: &str,
    lines: &[(&str, u32)],
) -> Result<uuid::Uuid, ShopError> {
    let correlation = uuid::Uuid::now_v7();
    let order = PlaceOrder {
        order_id: order_id.into(),
        customer: customer.into(),
        lines: lines
            .iter()
            .map(|(sku, quantity)| OrderLine {
                sku: (*sku).into(),
                quantity: *quantity,
            })
            .collect(),
    };
    app.send_with(order, MessageMeta::new().correlation_id(correlation))
        .await
        .map_err(|e| ShopError::Dispatch(e.to_string()))?;
    Ok(correlation)
}

/// Waits until the order is confirmed or rejected in the read model.
pub async fn settled(
    app: &App,
    order_id: &str,
    within: Duration,
) -> Result<OrderSummary, ShopError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let summary = app
            .query(GetOrder {
                order_id: order_id.into(),
            })
            .await;
        if let Ok(summary) = summary
            && summary.status != "placed"
        {
            return Ok(summary);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ShopError::Timeout(order_id.into(), within));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A flow as readable text: every command and event with its correlation id, in the order
/// they were written, with the time since the first and the payload.
pub async fn timeline(
    store: &SqlStore,
    app: &App,
    correlation: uuid::Uuid,
    with_times: bool,
) -> Result<String, ShopError> {
    let flow = store.flow(correlation).await?;
    let start = flow.first().map(|e| e.recorded_at);
    let mut text = String::new();
    for entry in flow {
        let name = &entry.envelope.name;
        let kind = entry.kind(app);
        let data = entry.data();
        let elapsed = start
            .map(|s| (entry.recorded_at - s).num_milliseconds())
            .unwrap_or_default();
        if with_times {
            text.push_str(&format!("  +{elapsed:>4} ms  "));
        } else {
            text.push_str("  ");
        }
        text.push_str(&format!("{kind:<7} {name:<28} {data}\n"));
    }
    Ok(text)
}
