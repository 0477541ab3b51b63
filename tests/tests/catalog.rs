//! The catalog an app builds from its registrations: every message with who handles,
//! publishes, subscribes and sends it, and the same as Markdown, Mermaid and AsyncAPI.

use inseam::Routing;
use inseam::catalog::{Publisher, Role, Route, SubscriberDoc};
use inseam::prelude::*;
use inseam::transport::InProcess;
use inseam::{AppBuilder, SqlStore};
use inseam_tests::TestDb;
use schemars::JsonSchema;

/// Lends a book.
#[derive(Debug, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "library.lend", output = u32, error = std::io::Error)]
pub struct Lend {
    /// The book.
    pub book: String,
}

/// Reminds a reader to bring a book back.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(name = "library.remind")]
pub struct Remind {
    /// The book.
    pub book: String,
}

/// How many loans there are.
#[derive(Debug, Query)]
#[query(name = "library.loans", output = u32)]
pub struct Loans;

/// A book was lent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "library.book_lent", key = book)]
pub struct BookLent {
    /// The book.
    pub book: String,
    /// For how many days.
    pub days: u32,
}

/// A loan was counted (no schema: the type does not derive `JsonSchema`).
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "stats.loan_counted")]
pub struct LoanCounted {
    /// The running total.
    pub total: u32,
}

#[command_handler(publishes(BookLent))]
async fn lend(cmd: Lend, ctx: &mut CommandContext<'_>) -> Result<u32, std::io::Error> {
    ctx.publish(BookLent {
        book: cmd.book,
        days: 14,
    });
    Ok(1)
}

#[command_handler]
async fn remind(_cmd: Remind) -> Result<(), std::convert::Infallible> {
    Ok(())
}

#[query_handler]
async fn loans(_query: Loans) -> Result<u32, std::convert::Infallible> {
    Ok(0)
}

#[event_handler(inline, publishes(LoanCounted))]
async fn count_loans(_event: &BookLent, ctx: &mut EventContext<'_>) {
    ctx.publish(LoanCounted { total: 1 });
}

#[event_handler(group = "library.reminders", sends(Remind))]
async fn schedule_reminder(_event: &BookLent) {}

fn library_builder() -> AppBuilder {
    App::builder()
        .source("library")
        .handler::<lend>()
        .handler::<remind>()
        .handler::<loans>()
        .handler::<count_loans>()
        .handler::<schedule_reminder>()
        .durable_command::<Remind>()
}

async fn library() -> App {
    library_builder().build().await.unwrap()
}

/// The library on a store, as every process of a split has one.
async fn stored_library(db: &TestDb) -> AppBuilder {
    let store = SqlStore::connect(&db.url).await.unwrap();
    library_builder().store(store)
}

#[tokio::test]
async fn the_catalog_lists_what_the_registrations_say() {
    let app = library().await;
    let catalog = app.catalog();
    assert_eq!(catalog.source, "library");

    let names: Vec<&str> = catalog.commands.iter().map(|c| c.name).collect();
    assert_eq!(names, ["library.lend", "library.remind"]);
    let lend = catalog.command("library.lend").unwrap();
    assert_eq!(lend.handler.as_ref().unwrap().name, "catalog::lend");
    assert_eq!(lend.output, "u32");
    assert!(!lend.durable);
    assert!(lend.schema.is_some(), "Lend derives JsonSchema");
    let remind = catalog.command("library.remind").unwrap();
    assert!(remind.durable);
    assert_eq!(remind.schema, None, "Remind does not derive JsonSchema");

    assert_eq!(catalog.queries.len(), 1);
    assert_eq!(catalog.queries[0].handler, Some("catalog::loans"));

    // LoanCounted has no subscriber: it is known because `count_loans` declares it.
    let events: Vec<String> = catalog
        .events
        .iter()
        .map(|e| e.reference().to_string())
        .collect();
    assert_eq!(events, ["library.book_lent v1", "stats.loan_counted v1"]);
    let lent = catalog.event("library.book_lent").unwrap();
    assert_eq!(
        lent.publishers,
        [Publisher::CommandHandler("catalog::lend")]
    );
    assert_eq!(
        lent.subscribers,
        [
            SubscriberDoc {
                handler: "catalog::count_loans",
                role: Role::Subscriber,
                group: None,
            },
            SubscriberDoc {
                handler: "catalog::schedule_reminder",
                role: Role::Subscriber,
                group: Some("library.reminders"),
            },
        ]
    );
    let schema = lent.schema.as_ref().unwrap();
    assert_eq!(schema["properties"]["days"]["type"], "integer");
    let counted = catalog.event("stats.loan_counted").unwrap();
    assert_eq!(
        counted.publishers,
        [Publisher::InlineSubscriber("catalog::count_loans")]
    );
    assert_eq!(counted.schema, None);

    let groups: Vec<(&str, Role)> = catalog.groups.iter().map(|g| (g.name, g.role)).collect();
    assert_eq!(
        groups,
        [
            ("command:library.remind", Role::Command),
            ("library.reminders", Role::Subscriber)
        ]
    );
    let reminders = catalog.group("library.reminders").unwrap();
    assert_eq!(reminders.sends, ["library.remind"]);
    // Without a store, a group's events go to background tasks: the catalog says so.
    assert_eq!(reminders.route, Route::Task);
    assert_eq!(catalog.modules(), ["library", "stats"]);

    // A durable command travels like an event: it has a channel; one sent in process does not.
    let doc = serde_json::to_value(catalog.asyncapi()).unwrap();
    assert_eq!(
        doc["channels"]["command.library.remind"]["address"],
        "library.remind"
    );
    assert!(doc["channels"].get("command.library.lend").is_none());
}

#[tokio::test]
async fn the_catalog_renders_as_markdown_mermaid_and_asyncapi() {
    let app = library().await;
    let catalog = app.catalog();
    insta::assert_snapshot!("library.md", catalog.markdown());
    insta::assert_snapshot!("library.mmd", catalog.mermaid());
    insta::assert_snapshot!("library.asyncapi.yaml", catalog.asyncapi_yaml().unwrap());
}

/// The library split in two: the reminders run in process `desk`, reached over NATS. Lending
/// stays in the main process, so `library.book_lent` goes to `desk` over NATS and the durable
/// `library.remind` the reminders send comes back over it.
const DESK: &str = r#"
    [processes.desk]
    transport = "nats"
    groups = ["library.reminders"]
"#;

#[tokio::test]
async fn a_routed_catalog_shows_processes_and_transports() {
    let db = TestDb::sqlite();
    let app = stored_library(&db).await.build().await.unwrap();
    assert!(!app.catalog().is_routed());
    let catalog = app
        .catalog()
        .routed(&Routing::from_toml(DESK).unwrap())
        .unwrap();
    assert!(catalog.is_routed());
    let reminders = catalog.group("library.reminders").unwrap();
    assert_eq!(
        (reminders.process.as_str(), &reminders.transports[..]),
        ("desk", &["nats".to_owned()][..])
    );
    let remind = catalog.group("command:library.remind").unwrap();
    assert_eq!(remind.process, "main");
    let names: Vec<&str> = catalog.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["main", "desk"]);
    assert_eq!(catalog.processes[0].modules, ["library", "stats"]);
    assert_eq!(catalog.processes[1].groups, ["library.reminders"]);

    let doc = serde_json::to_value(catalog.asyncapi()).unwrap();
    assert_eq!(doc["servers"]["nats"]["protocol"], "nats");
    let lent = &doc["channels"]["library.book_lent"];
    assert_eq!(lent["address"], "inseam.*.library.book_lent");
    assert_eq!(lent["servers"][0]["$ref"], "#/servers/nats");
    let receive = &doc["operations"]["library.reminders--receives--library.book_lent.v1"];
    assert_eq!(receive["bindings"]["nats"]["queue"], "library.reminders");
    assert_eq!(receive["bindings"]["nats"]["bindingVersion"], "0.1.0");
    assert_eq!(
        doc["channels"]["command.library.remind"]["address"],
        "inseam.*.library.remind"
    );
    // Nothing that stays in one process is on a server.
    assert!(
        doc["channels"]["stats.loan_counted"]
            .get("servers")
            .is_none()
    );

    insta::assert_snapshot!("library-routed.md", catalog.markdown());
    insta::assert_snapshot!("library-routed.mmd", catalog.mermaid());
    insta::assert_snapshot!(
        "library-routed.asyncapi.yaml",
        catalog.asyncapi_yaml().unwrap()
    );
}

/// An app built with a routing has it in its catalog, whatever the transport.
#[tokio::test]
async fn an_app_built_with_a_routing_catalogues_it() {
    let routing = Routing::from_toml(&DESK.replace("nats", "in-process")).unwrap();
    let db = TestDb::sqlite();
    let app = stored_library(&db)
        .await
        .routing(routing)
        .transport(InProcess::new())
        .build()
        .await
        .unwrap();
    let catalog = app.catalog();
    assert!(catalog.is_routed());
    let reminders = catalog.group("library.reminders").unwrap();
    assert_eq!(reminders.process, "desk");
    assert_eq!(reminders.transports, ["in-process"]);
    let doc = serde_json::to_value(catalog.asyncapi()).unwrap();
    assert_eq!(doc["servers"]["in-process"]["protocol"], "in-process");
    // Only NATS has subjects: another transport's channel keeps the message's name.
    assert_eq!(
        doc["channels"]["library.book_lent"]["address"],
        "library.book_lent"
    );
    assert!(
        doc["operations"]["library.reminders--receives--library.book_lent.v1"]
            .get("bindings")
            .is_none()
    );

    // A routing that does not fit the app is refused, naming what is wrong.
    let error = catalog
        .routed(&Routing::single().process("desk", "nats", ["lending"]))
        .unwrap_err();
    assert!(error.to_string().contains("module `lending`"), "{error}");
}

/// A payload's shared definitions move to `components.schemas`, so that every reference in
/// the AsyncAPI document resolves inside it.
#[tokio::test]
async fn asyncapi_references_resolve_inside_the_document() {
    #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
    struct Sku(String);
    #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
    struct Line {
        sku: Sku,
    }
    #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, Event)]
    #[event(name = "orders.placed")]
    struct Placed {
        lines: Vec<Line>,
    }
    #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, Event)]
    #[event(name = "orders.amended")]
    struct Amended {
        lines: Vec<Line>,
    }
    #[event_handler(group = "billing")]
    async fn bill(_event: &Placed) {}
    #[event_handler(group = "billing")]
    async fn rebill(_event: &Amended) {}

    let app = App::builder()
        .handler::<bill>()
        .handler::<rebill>()
        .build()
        .await
        .unwrap();
    let doc = serde_json::to_value(app.catalog().asyncapi()).unwrap();
    let payload = &doc["components"]["messages"]["orders.placed.v1"]["payload"];
    assert_eq!(
        payload["schemaFormat"],
        "application/schema+json;version=draft-2020-12"
    );
    assert_eq!(
        payload["schema"]["properties"]["lines"]["items"]["$ref"],
        "#/components/schemas/Line"
    );
    assert_eq!(doc["components"]["schemas"]["Sku"]["type"], "string");
    assert!(payload["schema"].get("$defs").is_none());
    // Both events share `Line` (which refers to `Sku`): each definition is kept once.
    let shared: Vec<&String> = doc["components"]["schemas"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(shared, ["Line", "Sku"]);
    assert_eq!(
        doc["components"]["schemas"]["Line"]["properties"]["sku"]["$ref"],
        "#/components/schemas/Sku"
    );
    let operations: Vec<&String> = doc["operations"].as_object().unwrap().keys().collect();
    assert_eq!(
        operations,
        [
            "billing--receives--orders.amended.v1",
            "billing--receives--orders.placed.v1"
        ]
    );
}
