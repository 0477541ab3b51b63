//! A flow shows every event a command caused, whoever subscribes to it: a group, only an inline
//! subscriber, or nobody.

use std::convert::Infallible;

use inseam::prelude::*;
use inseam_test::TestApp;

#[derive(Debug, Command)]
#[command(output = (), name = "library.lend_book")]
struct LendBook {
    isbn: String,
}

/// The `reminders` group subscribes.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "library.book_lent", key = isbn)]
struct BookLent {
    isbn: String,
}

/// Only an inline subscriber, which runs in the command's unit of work.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "library.shelf_changed", key = isbn)]
struct ShelfChanged {
    isbn: String,
    on_shelf: u32,
}

/// Nobody subscribes.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "library.loan_audited", key = isbn)]
struct LoanAudited {
    isbn: String,
}

#[command_handler(publishes(BookLent, ShelfChanged, LoanAudited))]
async fn lend_book(cmd: LendBook, ctx: &mut CommandContext<'_>) -> Result<(), Infallible> {
    ctx.publish(BookLent {
        isbn: cmd.isbn.clone(),
    });
    ctx.publish(ShelfChanged {
        isbn: cmd.isbn.clone(),
        on_shelf: 0,
    });
    ctx.publish(LoanAudited { isbn: cmd.isbn });
    Ok(())
}

#[event_handler(group = "reminders")]
async fn remind(ev: &Envelope<BookLent>) {
    let _ = &ev.isbn;
}

#[event_handler(inline)]
async fn count_shelf(ev: &Envelope<ShelfChanged>) {
    let _ = ev.on_shelf;
}

fn library(builder: inseam::AppBuilder, _: &SqlStore) -> inseam::AppBuilder {
    builder
        .handler::<lend_book>()
        .handler::<remind>()
        .handler::<count_shelf>()
}

#[tokio::test]
async fn events_nobody_subscribes_to_are_in_the_flow() {
    let test = TestApp::new(library).await.unwrap();

    let flow = test
        .when(LendBook {
            isbn: "978-0261103573".into(),
        })
        .await;

    flow.assert_ok();
    flow.assert_events(&[
        "library.book_lent",
        "library.shelf_changed",
        "library.loan_audited",
    ]);
    insta::assert_snapshot!(flow.text());
}

/// Without `keep_unsubscribed_events` (an app built outside `TestApp`), nothing is written for
/// an event no group receives: the store's flow has the delivered event only.
#[tokio::test]
async fn an_app_stores_only_what_a_group_receives_unless_told_otherwise() {
    let db = inseam_test::TestDatabase::sqlite().unwrap();
    let store = SqlStore::connect(db.url()).await.unwrap();
    let app = library(App::builder().store(store.clone()), &store)
        .build()
        .await
        .unwrap();
    let correlation = uuid::Uuid::now_v7();
    app.send_with(
        LendBook { isbn: "1".into() },
        inseam::MessageMeta::new().correlation_id(correlation),
    )
    .await
    .unwrap();
    let stored: Vec<String> = store
        .flow(correlation)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.envelope.name)
        .collect();
    assert_eq!(stored, ["library.book_lent"]);
}
