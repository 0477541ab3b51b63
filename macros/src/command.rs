//! `#[derive(Command)]`, and the expansion it shares with `#[derive(Query)]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{DeriveInput, LitStr, Type};

use crate::attr::{self, Errors, Setting};

/// What differs between the derives of the two request kinds.
pub(crate) struct RequestKind {
    /// The helper attribute, e.g. `command`.
    pub(crate) attr: &'static str,
    /// The trait implemented, e.g. `Command`.
    pub(crate) trait_name: &'static str,
    /// The `Registration` constructor that declares the message, e.g. `declare_command`.
    pub(crate) declare: &'static str,
    /// A name to show in the hint of an invalid name.
    pub(crate) example_name: &'static str,
}

const COMMAND: RequestKind = RequestKind {
    attr: "command",
    trait_name: "Command",
    declare: "declare_command",
    example_name: "orders.place_order",
};

const ACCEPTED: &[&str] = &["output", "error", "name"];

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    expand_request(input, &COMMAND)
}

/// Implements `Command` or `Query` for `input` and declares it for discovery.
pub(crate) fn expand_request(input: &DeriveInput, kind: &RequestKind) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let mut output = Setting::<Type>::default();
    let mut error = Setting::<Type>::default();
    let mut name = Setting::<LitStr>::default();

    attr::parse_helper_attrs(
        &input.attrs,
        kind.attr,
        &mut errors,
        |key, input, errors| {
            if key == "output" {
                attr::expect_eq(key, input, "Type")?;
                output.set(key, input.parse()?, errors);
            } else if key == "error" {
                attr::expect_eq(key, input, "Type")?;
                error.set(key, input.parse()?, errors);
            } else if key == "name" {
                attr::expect_eq(key, input, &format!("\"{}\"", kind.example_name))?;
                let lit = attr::parse_dotted_name(input, kind.attr, kind.example_name, errors)?;
                name.set(key, lit, errors);
            } else {
                return Err(attr::unknown_key(
                    key,
                    &format!("#[{}(..)]", kind.attr),
                    ACCEPTED,
                ));
            }
            Ok(())
        },
    );
    errors.finish()?;

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let trait_name = format_ident!("{}", kind.trait_name);
    let declare = format_ident!("{}", kind.declare);
    let output = output
        .into_inner()
        .map_or_else(|| quote!(()), |ty| quote!(#ty));
    let error = error.into_inner();
    // A handler that cannot fail has nothing to send back; every other error type needs serde
    // to travel.
    let error_serde = match &error {
        None => quote!(::inseam::__private::Some(
            ::inseam::__private::SerdeFns::never()
        )),
        Some(ty) => quote!((&::inseam::__private::SerdeProbe::<#ty>::new()).serde()),
    };
    let error = error.map_or_else(|| quote!(::core::convert::Infallible), |ty| quote!(#ty));
    let name = name
        .into_inner()
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));

    // A generic message has no single type to declare; its handlers still register it.
    let submit = input.generics.params.is_empty().then(|| {
        quote! {
            ::inseam::__private::inventory::submit! {
                ::inseam::__private::Registration::#declare::<#ident>()
            }
        }
    });

    // A static in a generic impl would be shared by every instantiation; a generic message is
    // found by its `TypeId` instead.
    let slot_index = input.generics.params.is_empty().then(|| {
        let schema = crate::schema_fn();
        quote! {
            #schema
            #[inline]
            fn __slot_index() -> ::inseam::__private::Option<&'static ::inseam::__private::SlotIndex> {
                static INDEX: ::inseam::__private::SlotIndex = ::inseam::__private::SlotIndex::new();
                ::inseam::__private::Some(&INDEX)
            }

            fn __remote() -> ::inseam::__private::Option<
                ::inseam::__private::RemoteCodec<Self, #output, #error>,
            > {
                #[allow(unused_imports)]
                use ::inseam::__private::{ViaSerde as _, WithoutSerde as _};
                ::inseam::__private::RemoteCodec::assemble(
                    (&::inseam::__private::SerdeProbe::<Self>::new()).serde(),
                    (&::inseam::__private::SerdeProbe::<#output>::new()).serde(),
                    #error_serde,
                )
            }
        }
    });

    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::inseam::__private::#trait_name for #ident #ty_generics #where_clause {
            type Output = #output;
            type Error = #error;
            const NAME: &'static str = #name;
            #slot_index
        }
        #submit
    })
}
