//! `#[derive(Query)]`: the same shape as `#[derive(Command)]`.

use proc_macro2::TokenStream;
use syn::DeriveInput;

use crate::command::{RequestKind, expand_request};

const QUERY: RequestKind = RequestKind {
    attr: "query",
    trait_name: "Query",
    declare: "declare_query",
    example_name: "orders.order_summary",
};

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    expand_request(input, &QUERY)
}
