//! The shop in two processes over each broker: the shop binary started twice with
//! `split.toml` (for another broker than NATS, the same file naming that broker's transport),
//! the second as process `billing` (payments and shipping), each on a SQLite file of its own,
//! over a broker server of the test's own. The demo's three orders end as in one process, with
//! the same flows (apart from timing), each process created only its modules' tables, and the
//! envelopes each process received are, byte for byte, the outbox rows the other wrote.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use inseam::sql::SqlStore;
use inseam::sql::sqlx::{self, Row as _};
use inseam_tests::brokers::Broker;

const SHOP: &str = env!("CARGO_BIN_EXE_shop");
const SPLIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/split.toml");

/// The shop binary with no routing or broker settings from the caller's environment.
fn shop(db_url: &str) -> Command {
    let mut command = Command::new(SHOP);
    command
        .env("SHOP_DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .env_remove("INSEAM_CONFIG")
        .env_remove("INSEAM_PROCESS");
    for broker in Broker::ALL {
        command.env_remove(broker.url_env());
    }
    command
}

/// How the split reaches its broker: the routing file and the broker's URL.
struct Split {
    broker: Broker,
    config: PathBuf,
    url: String,
}

impl Split {
    /// `split.toml` as it is for NATS; for another broker, the same file with that broker's
    /// transport, written in `dir`.
    fn new(broker: Broker, url: String, dir: &Path) -> Self {
        let config = if broker == Broker::Nats {
            PathBuf::from(SPLIT)
        } else {
            let text = std::fs::read_to_string(SPLIT).expect("read split.toml");
            assert!(text.contains("transport = \"nats\""), "{text}");
            let path = dir.join(format!("split-{}.toml", broker.name()));
            let text = text.replace(
                "transport = \"nats\"",
                &format!("transport = \"{}\"", broker.name()),
            );
            std::fs::write(&path, text).expect("write the routing file");
            path
        };
        Split {
            broker,
            config,
            url,
        }
    }

    fn command(&self, db_url: &str, process: Option<&str>) -> Command {
        let mut command = shop(db_url);
        command
            .env("INSEAM_CONFIG", &self.config)
            .env(self.broker.url_env(), &self.url);
        command.envs(self.broker.process_env().iter().copied());
        if let Some(process) = process {
            command.env("INSEAM_PROCESS", process);
        }
        command
    }
}

fn text(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

/// The demo's output without what differs from run to run: the first line (the database),
/// the times (`+  12 ms`) and the flows' ids.
fn flows(output: &str) -> String {
    let mut lines = output.lines();
    lines.next();
    let mut text = String::new();
    for line in lines {
        let line = match line
            .strip_prefix("  +")
            .and_then(|rest| rest.split_once(" ms  "))
        {
            Some((_, rest)) => format!("  {rest}"),
            None => line.to_owned(),
        };
        text.push_str(&without_uuids(&line));
        text.push('\n');
    }
    text
}

fn without_uuids(line: &str) -> String {
    let is_uuid = |s: &str| {
        s.len() == 36
            && s.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            })
    };
    let mut out = String::new();
    let mut rest = line;
    while !rest.is_empty() {
        if rest.len() >= 36 && rest.is_char_boundary(36) && is_uuid(&rest[..36]) {
            out.push_str("<id>");
            rest = &rest[36..];
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Starts the billing process and waits for the line that says it runs.
fn start_billing(split: &Split, db_url: &str) -> Child {
    start_billing_with(split.command(db_url, Some("billing")))
}

/// Starts the billing process as `command` says and waits for the line that says it runs.
fn start_billing_with(mut command: Command) -> Child {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the billing process");
    let stdout = child.stdout.take().expect("its standard output");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the billing process said nothing: {:?}", child.try_wait()));
    assert!(
        line.starts_with("inseam shop, process `billing` on ")
            && line.ends_with(": runs payments, shipping; Ctrl-C stops it"),
        "{line}"
    );
    child
}

/// Stops `child` with SIGTERM, as an operator would, and checks it exits cleanly.
fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait for the billing process") {
            assert!(status.success(), "the billing process exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the billing process did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `(message_id, envelope)` of the outbox rows named `names`, by message id.
async fn rows(store: &SqlStore, names: &[&str]) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in names {
        let rows =
            sqlx::query("SELECT message_id, name, envelope FROM inseam_outbox WHERE name = $1")
                .bind((*name).to_owned())
                .fetch_all(store.pool())
                .await
                .unwrap();
        out.extend(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    out.sort();
    out
}

/// `(group, message_id)` of the inbox rows of `groups`.
async fn handled(store: &SqlStore, groups: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in groups {
        let rows = sqlx::query("SELECT grp, message_id FROM inseam_inbox WHERE grp = $1")
            .bind((*group).to_owned())
            .fetch_all(store.pool())
            .await
            .unwrap();
        out.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
    }
    out.sort();
    out
}

async fn tables(store: &SqlStore) -> Vec<String> {
    let rows = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'inseam_%' \
         AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn pairs(store: &SqlStore, sql: &'static str) -> Vec<(String, String)> {
    let rows = sqlx::query(sql).fetch_all(store.pool()).await.unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_split_in_two_processes_over_nats() {
    the_demo_split_in_two_processes(Broker::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_split_in_two_processes_over_redis() {
    the_demo_split_in_two_processes(Broker::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_split_in_two_processes_over_amqp() {
    the_demo_split_in_two_processes(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_split_in_two_processes_over_kafka() {
    the_demo_split_in_two_processes(Broker::Kafka).await;
}

async fn the_demo_split_in_two_processes(broker: Broker) {
    let _alone = inseam_tests::brokers::alone().await;
    let started = Instant::now();
    let server = broker.start();
    let dir = tempfile::tempdir().unwrap();
    let split = Split::new(broker, server.url(), dir.path());
    let url = |file: &str| format!("sqlite://{}", dir.path().join(file).display());

    // The reference: the demo in one process.
    let single = text(
        &shop(&url("single.db")).output().expect("run the demo"),
        "the demo in one process",
    );

    let billing = start_billing(&split, &url("billing.db"));
    let demo = Instant::now();
    let main = split
        .command(&url("main.db"), None)
        .output()
        .expect("run the demo's main process");
    let demo = demo.elapsed();
    let main = text(&main, "the demo's main process");
    terminate(billing);

    let processes = format!(
        "process `main` (catalog, inventory, orders, notifications); `billing` (payments, shipping) over {}",
        broker.name()
    );
    assert!(
        main.lines()
            .next()
            .is_some_and(|line| line.contains(&processes)),
        "{main}"
    );
    let outcomes: Vec<&str> = main.lines().filter(|l| l.starts_with("order-")).collect();
    assert_eq!(
        outcomes,
        [
            "order-1 for alice, 25.00 EUR: confirmed",
            "order-2 for bob, 6.50 EUR: rejected (payment declined)",
            "order-3 for carol, 135.00 EUR: rejected (out of stock: 3 × teapot asked, 1 available)",
        ],
        "{main}"
    );
    // A command and a query answered by the billing process over request-reply: the
    // outputs, and the handler's typed error, as in one process.
    let asked = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("payments, asked synchronously:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        asked(&main),
        [
            "payments, asked synchronously:",
            "  order-1: receipt for order-1: 25.00 EUR; charged 25.00 EUR",
            "  order-2: no receipt: order `order-2` was not charged (declined); not charged: order `order-2` was not charged (declined)",
        ],
        "{main}"
    );
    assert_eq!(asked(&main), asked(&single));
    let steps = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("  order-"))
            .count()
    };
    assert_eq!(steps(&flows(&single)), 10 + 9 + 5, "{single}");
    assert_eq!(flows(&main), flows(&single), "the flows differ:\n{main}");

    let main_store = SqlStore::connect(&url("main.db")).await.unwrap();
    let billing_store = SqlStore::connect(&url("billing.db")).await.unwrap();
    // Each process has the tables of its modules only.
    assert_eq!(
        tables(&main_store).await,
        [
            "catalog_products",
            "inventory_reservations",
            "inventory_stock",
            "notifications_sent",
            "orders_summaries"
        ]
    );
    assert_eq!(
        tables(&billing_store).await,
        ["payments_charges", "shipping_shipments"]
    );
    assert_eq!(
        pairs(
            &billing_store,
            "SELECT order_id, status FROM payments_charges ORDER BY order_id"
        )
        .await,
        [
            ("order-1".to_owned(), "charged".to_owned()),
            ("order-2".to_owned(), "declined".to_owned())
        ]
    );
    assert_eq!(
        pairs(
            &billing_store,
            "SELECT order_id, tracking FROM shipping_shipments"
        )
        .await,
        [("order-1".to_owned(), "TRK-order-1".to_owned())]
    );

    // The commands billing received are the rows the main process wrote, byte for byte, and
    // each was handled once.
    let commands = ["payments.charge", "shipping.create_shipment"];
    let sent = rows(&main_store, &commands).await;
    let names: Vec<&str> = sent.iter().map(|(_, name, _)| name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "payments.charge").count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "shipping.create_shipment")
            .count(),
        1,
        "{names:?}"
    );
    assert_eq!(rows(&billing_store, &commands).await, sent);
    let mut expected: Vec<(String, String)> = sent
        .iter()
        .map(|(id, name, _)| (format!("command:{name}"), id.clone()))
        .collect();
    expected.sort();
    assert_eq!(
        handled(
            &billing_store,
            &[
                "command:payments.charge",
                "command:shipping.create_shipment"
            ]
        )
        .await,
        expected
    );
    // And the events the main process received are billing's rows, byte for byte.
    let answers = [
        "payments.charged",
        "payments.declined",
        "shipping.shipment_created",
    ];
    let answered = rows(&billing_store, &answers).await;
    assert_eq!(answered.len(), 3);
    assert_eq!(rows(&main_store, &answers).await, answered);
    let mut expected: Vec<(String, String)> = answered
        .iter()
        .map(|(id, _, _)| ("orders.fulfilment".to_owned(), id.clone()))
        .collect();
    expected.sort();
    assert_eq!(
        handled(&main_store, &["orders.fulfilment"])
            .await
            .into_iter()
            .filter(|(_, id)| answered.iter().any(|(a, _, _)| a == id))
            .collect::<Vec<_>>(),
        expected
    );
    for store in [&main_store, &billing_store] {
        assert_eq!(store.lag().await.unwrap().dead_letters, 0);
    }
    eprintln!(
        "the demo's main process ran in {demo:?}; {:?} in all",
        started.elapsed()
    );
}

/// A span as `SHOP_TRACES` writes it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: serde_json::Value,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(|v| v.as_str())
    }

    fn delivers(&self, group: &str, message: &str) -> bool {
        self.name == "deliver"
            && self.attribute("group") == Some(group)
            && self.attribute("message_name") == Some(message)
    }
}

fn spans(path: &Path) -> Vec<Span> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the spans in {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let field = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
            Span {
                trace_id: field("trace_id"),
                span_id: field("span_id"),
                parent_span_id: field("parent_span_id"),
                name: field("name"),
                attributes: json["attributes"].clone(),
            }
        })
        .collect()
}

/// How many messages `spans` deliver (a message delivered again after a failed batch has a
/// span per attempt).
fn messages(spans: &[&Span]) -> usize {
    let mut ids: Vec<&str> = spans
        .iter()
        .filter_map(|s| s.attribute("message_id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

/// The span of `spans` whose id is `id`.
fn by_id<'a>(spans: &'a [Span], id: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.span_id == id)
}

/// The demo split over NATS, each process writing its spans to a file (`SHOP_TRACES`): the
/// billing process's deliveries of the saga's commands are in the traces of the main process's
/// orders, children of the main process's deliveries that dispatched them, and the events
/// billing answers with come back to the main process as children of billing's deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_split_over_nats_is_one_trace_across_both_processes() {
    let _alone = inseam_tests::brokers::alone().await;
    let server = Broker::Nats.start();
    let dir = tempfile::tempdir().unwrap();
    let split = Split::new(Broker::Nats, server.url(), dir.path());
    let url = |file: &str| format!("sqlite://{}", dir.path().join(file).display());
    let (main_traces, billing_traces) = (
        dir.path().join("main.jsonl"),
        dir.path().join("billing.jsonl"),
    );

    let mut billing = split.command(&url("billing.db"), Some("billing"));
    billing.env("SHOP_TRACES", &billing_traces);
    let billing = start_billing_with(billing);
    let main = split
        .command(&url("main.db"), None)
        .env("SHOP_TRACES", &main_traces)
        .output()
        .expect("run the demo's main process");
    let main = text(&main, "the demo's main process");
    terminate(billing);
    assert!(
        main.contains("order-1 for alice, 25.00 EUR: confirmed"),
        "{main}"
    );
    let main = spans(&main_traces);
    let billing = spans(&billing_traces);

    // Each order's command starts a trace in the main process.
    let orders: Vec<&Span> = main
        .iter()
        .filter(|s| {
            s.name == "dispatch" && s.attribute("message_name") == Some("orders.place_order")
        })
        .collect();
    assert_eq!(orders.len(), 3, "{main:#?}");
    assert!(orders.iter().all(|s| s.parent_span_id.is_empty()));
    let traces: Vec<&str> = orders.iter().map(|s| s.trace_id.as_str()).collect();

    // Billing charges order-1 and order-2 (order-3 is out of stock), and ships order-1.
    for (command, count) in [("payments.charge", 2), ("shipping.create_shipment", 1)] {
        let group = format!("command:{command}");
        let delivered: Vec<&Span> = billing
            .iter()
            .filter(|s| s.delivers(&group, command))
            .collect();
        assert_eq!(messages(&delivered), count, "{command}: {billing:#?}");
        for span in delivered {
            assert!(
                traces.contains(&span.trace_id.as_str()),
                "{span:?} is in no order's trace"
            );
            let parent = by_id(&main, &span.parent_span_id)
                .unwrap_or_else(|| panic!("the parent of {span:?} is no span of the main process"));
            assert_eq!(parent.trace_id, span.trace_id);
            assert!(
                parent.name == "deliver" && parent.attribute("group") == Some("orders.fulfilment"),
                "{command} was dispatched by the saga's delivery: {parent:?}"
            );
        }
    }
    // What billing answers comes back as children of billing's deliveries.
    for (event, count) in [
        ("payments.charged", 1),
        ("payments.declined", 1),
        ("shipping.shipment_created", 1),
    ] {
        let delivered: Vec<&Span> = main
            .iter()
            .filter(|s| s.delivers("orders.fulfilment", event))
            .collect();
        assert_eq!(messages(&delivered), count, "{event}: {main:#?}");
        for span in delivered {
            let parent = by_id(&billing, &span.parent_span_id)
                .unwrap_or_else(|| panic!("the parent of {span:?} is no span of billing"));
            assert_eq!(parent.trace_id, span.trace_id);
            assert!(parent.name == "deliver", "{parent:?}");
            assert!(traces.contains(&span.trace_id.as_str()));
        }
    }
}
