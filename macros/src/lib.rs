//! Derive and attribute macros of inseam; use them through the `inseam` crate.
//!
//! - `#[derive(Command)]` and `#[derive(Query)]` implement `Command` / `Query`, with
//!   `#[command(output = Type, error = Type, name = "dotted.name")]` (all optional: the output
//!   defaults to `()`, the error to `Infallible`, the name to the type's name), and declare the
//!   message so that the app checks it has exactly one handler.
//! - `#[derive(Event)]` implements `Event` from
//!   `#[event(name = "orders.order_placed", version = 2, key = field, codec = path::To::Codec)]`:
//!   the dotted name is required, the version defaults to 1, `key` names the field whose value
//!   orders the events, and the codec defaults to JSON.
//! - `#[derive(EventSet)]` on an enum with one tuple variant per event type makes it the event
//!   set of an aggregate.
//! - `#[command_handler]` and `#[query_handler]` go on an `async fn(message, ..) ->
//!   Result<Output, Error>`; `#[event_handler(group = "name")]` or `#[event_handler(inline)]`
//!   on an `async fn(event, ..)` returning `()` or `Result<(), E>`. Each keeps the function as
//!   it is and adds a marker type of the same name that implements the handler trait, so it can
//!   be registered explicitly (`.handler::<place_order>()`) and is also discovered. Parameters
//!   after the message are extractors, or the context taken by reference. Command and event
//!   handlers may declare what they emit, for the catalog: `publishes(EventA, EventB)` and
//!   `sends(CommandA)`.
//! - A message type that also derives `schemars::JsonSchema` gets its payload schema into the
//!   app's catalog.

mod attr;
mod command;
mod event;
mod event_set;
mod handler;
mod query;
mod span;

/// The `__schema` method of a non-generic message: its JSON schema when it derives
/// `schemars::JsonSchema`, found by autoref specialisation.
pub(crate) fn schema_fn() -> proc_macro2::TokenStream {
    quote::quote! {
        fn __schema() -> ::inseam::__private::Option<::inseam::__private::JsonValue> {
            #[allow(unused_imports)]
            use ::inseam::__private::{ViaJsonSchema as _, WithoutSchema as _};
            (&::inseam::__private::SchemaProbe::<Self>::new()).schema()
        }
    }
}

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Implements `Command`, configured with `#[command(output = .., error = .., name = "..")]`.
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    command::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Implements `Query`, configured with `#[query(output = .., error = .., name = "..")]`.
#[proc_macro_derive(Query, attributes(query))]
pub fn derive_query(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    query::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Implements `Event`, configured with
/// `#[event(name = "..", version = N, key = field, codec = Type)]`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Implements `EventSet` for an enum of event types (`enum OrderEvent { Placed(OrderPlaced),
/// .. }`), the events of an aggregate, and `From` each event type into the enum.
#[proc_macro_derive(EventSet)]
pub fn derive_event_set(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event_set::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Makes an `async fn(command, ..) -> Result<Output, Error>` the handler of its command.
#[proc_macro_attribute]
pub fn command_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(handler::Kind::Command, args.into(), item.into()).into()
}

/// Makes an `async fn(query, ..) -> Result<Output, Error>` the handler of its query.
#[proc_macro_attribute]
pub fn query_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(handler::Kind::Query, args.into(), item.into()).into()
}

/// Subscribes an `async fn(event, ..)` to its event, delivered to a group
/// (`#[event_handler(group = "name")]`) or inline (`#[event_handler(inline)]`).
#[proc_macro_attribute]
pub fn event_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(handler::Kind::Event, args.into(), item.into()).into()
}
