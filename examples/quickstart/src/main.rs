//! A first inseam app: a library lends books.
//!
//! `LendBook` is a command with one handler that publishes `BookLent`; an inline subscriber
//! keeps the catalog's availability in the same unit of work, and the `reminders` group reacts
//! in the background. `Availability` is a query. Run it with `cargo run -p quickstart`
//! (`RUST_LOG=inseam=debug` shows the dispatch spans).

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use inseam::TraceLayer;
use inseam::prelude::*;

/// Lends a book to a member.
#[derive(Debug, Command)]
#[command(output = u32, error = LendError, name = "library.lend_book")]
pub struct LendBook {
    pub isbn: String,
    pub member: String,
}

/// Why a loan was refused.
#[derive(Debug, thiserror::Error)]
pub enum LendError {
    #[error("no copy of {0} is available")]
    NoCopyAvailable(String),
}

/// A book was lent.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "library.book_lent", version = 1, key = isbn)]
pub struct BookLent {
    pub isbn: String,
    pub member: String,
}

/// How many copies of a book are on the shelf.
#[derive(Debug, Query)]
#[query(output = u32)]
pub struct Availability {
    pub isbn: String,
}

/// The shelf: copies available per ISBN.
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<HashMap<String, u32>>>);

impl Shelf {
    fn copies(&self, isbn: &str) -> u32 {
        self.0
            .lock()
            .map(|s| s.get(isbn).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn take(&self, isbn: &str) {
        if let Ok(mut shelf) = self.0.lock() {
            shelf
                .entry(isbn.to_owned())
                .and_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

#[command_handler]
async fn lend_book(
    cmd: LendBook,
    ctx: &mut CommandContext<'_>,
    State(shelf): State<Shelf>,
) -> Result<u32, LendError> {
    let copies = shelf.copies(&cmd.isbn);
    if copies == 0 {
        return Err(LendError::NoCopyAvailable(cmd.isbn));
    }
    ctx.publish(BookLent {
        isbn: cmd.isbn,
        member: cmd.member,
    });
    Ok(copies - 1)
}

/// Runs before `send` returns: the shelf is never out of date.
#[event_handler(inline)]
async fn take_from_shelf(ev: &Envelope<BookLent>, State(shelf): State<Shelf>) {
    shelf.take(&ev.isbn);
}

/// Runs in the background, after the loan completed.
#[event_handler(group = "reminders")]
async fn schedule_reminder(ev: &Envelope<BookLent>) {
    println!(
        "  [reminders] will remind {} to return {} (event {}, flow {})",
        ev.member,
        ev.isbn,
        ev.message_id(),
        ev.correlation_id()
    );
}

#[query_handler]
async fn availability(
    q: Availability,
    State(shelf): State<Shelf>,
) -> Result<u32, std::convert::Infallible> {
    Ok(shelf.copies(&q.isbn))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    let shelf = Shelf::default();
    shelf
        .0
        .lock()
        .map_err(|_| "shelf lock poisoned")?
        .insert("978-0261103573".into(), 1);

    let app = App::builder()
        .discover()
        .state(shelf)
        .layer(TraceLayer::new())
        .build()
        .await?;

    let isbn = "978-0261103573".to_owned();
    println!(
        "copies on the shelf: {}",
        app.query(Availability { isbn: isbn.clone() }).await?
    );
    let left = app
        .send(LendBook {
            isbn: isbn.clone(),
            member: "ada".into(),
        })
        .await?;
    println!("lent to ada, {left} left");
    match app
        .send(LendBook {
            isbn: isbn.clone(),
            member: "grace".into(),
        })
        .await
    {
        Err(DispatchError::Handler(LendError::NoCopyAvailable(isbn))) => {
            println!("grace must wait: no copy of {isbn}")
        }
        other => println!("unexpected: {other:?}"),
    }
    app.wait_idle().await;
    println!(
        "copies on the shelf: {}",
        app.query(Availability { isbn }).await?
    );
    Ok(())
}
