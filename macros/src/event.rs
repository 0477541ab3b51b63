//! `#[derive(Event)]`.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::{
    Data, DeriveInput, Fields, GenericArgument, Ident, LitInt, LitStr, PathArguments, Token, Type,
};

use crate::attr::{self, Errors, Setting};

const ACCEPTED: &[&str] = &["name", "version", "key", "codec"];

const EXAMPLE_NAME: &str = "orders.order_placed";

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let mut name = Setting::<LitStr>::default();
    let mut version = Setting::<LitInt>::default();
    let mut key = Setting::<Ident>::default();
    let mut codec = Setting::<Type>::default();
    // Set even when the value is malformed, which is then the one error reported about it.
    let mut name_given = false;

    attr::parse_helper_attrs(&input.attrs, "event", &mut errors, |k, input, errors| {
        if k == "name" {
            name_given = true;
            attr::expect_eq(k, input, &format!("\"{EXAMPLE_NAME}\""))?;
            let lit = attr::parse_dotted_name(input, "event", EXAMPLE_NAME, errors)?;
            name.set(k, lit, errors);
        } else if k == "version" {
            attr::expect_eq(k, input, "2")?;
            let lit = parse_version(input, errors)?;
            version.set(k, lit, errors);
        } else if k == "key" {
            attr::expect_eq(k, input, "field_name")?;
            let field = parse_key(input)?;
            key.set(k, field, errors);
        } else if k == "codec" {
            attr::expect_eq(k, input, "path::to::Codec")?;
            codec.set(k, input.parse()?, errors);
        } else {
            return Err(attr::unknown_key(k, "#[event(..)]", ACCEPTED));
        }
        Ok(())
    });

    let ident = &input.ident;
    // A malformed `#[event = ..]` was reported already; the missing name would repeat it.
    let malformed = input
        .attrs
        .iter()
        .any(|a| a.path().is_ident("event") && a.meta.require_list().is_err());
    if !name_given && !malformed {
        let message = format_args!(
            "missing #[event(name = \"...\")]: an event needs a stable dotted name, e.g. #[event(name = \"{EXAMPLE_NAME}\")]"
        );
        match input.attrs.iter().find(|a| a.path().is_ident("event")) {
            Some(event_attr) => errors.spanned(event_attr, message),
            None => errors.spanned(ident, message),
        }
    }
    let key_fn = key
        .get()
        .and_then(|field| key_fn(input, field, &mut errors));
    errors.finish()?;

    let name = name.into_inner();
    let version = version
        .into_inner()
        .map_or_else(|| quote!(1), |lit| lit.into_token_stream());
    let codec = codec.into_inner().map_or_else(
        || quote!(::inseam::__private::Json),
        |ty| ty.into_token_stream(),
    );
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let schema = input.generics.params.is_empty().then(crate::schema_fn);
    let submit = input.generics.params.is_empty().then(|| {
        quote! {
            ::inseam::__private::inventory::submit! {
                ::inseam::__private::Registration::declare_event::<#ident>()
            }
        }
    });

    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::inseam::__private::Event for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            type Codec = #codec;
            #key_fn
            #schema
        }
        #submit
    })
}

/// Parses `version = N`, with N >= 1. Returned as the literal so that its span is kept.
fn parse_version(input: syn::parse::ParseStream<'_>, errors: &mut Errors) -> syn::Result<LitInt> {
    let lit = input.parse::<LitInt>().map_err(|error| {
        syn::Error::new(
            error.span(),
            "expected an integer version, e.g. `version = 2`",
        )
    })?;
    match lit.base10_parse::<u32>() {
        Ok(0) => errors.spanned(
            &lit,
            "event versions start at 1: use `version = 1` for the first contract (or leave it out)",
        ),
        Ok(_) => {}
        Err(_) => errors.spanned(&lit, "the version must fit in a u32, e.g. `version = 2`"),
    }
    // Written out unsuffixed so that `2u8` still gives a `u32` constant.
    let value = lit.base10_parse::<u32>().unwrap_or(1);
    Ok(LitInt::new(&value.to_string(), lit.span()))
}

/// Parses `key = field`.
fn parse_key(input: syn::parse::ParseStream<'_>) -> syn::Result<Ident> {
    if input.peek(LitStr) {
        let lit = input.parse::<LitStr>()?;
        return Err(syn::Error::new_spanned(
            &lit,
            format_args!(
                "write the field name without quotes: `key = {}`",
                lit.value()
            ),
        ));
    }
    if input.peek(Token![self]) {
        let token = input.parse::<Token![self]>()?;
        return Err(syn::Error::new_spanned(
            token,
            "write the field name alone: `key = field_name`",
        ));
    }
    input.parse::<Ident>().map_err(|error| {
        syn::Error::new(error.span(), "expected a field name, e.g. `key = order_id`")
    })
}

/// The `key` method reading `field`, or `None` after recording why `field` cannot be the key.
fn key_fn(input: &DeriveInput, field: &Ident, errors: &mut Errors) -> Option<TokenStream> {
    let ident = &input.ident;
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(fields) => fields,
            Fields::Unnamed(_) | Fields::Unit => {
                errors.spanned(
                    field,
                    format_args!(
                        "`key` names a field, but `{ident}` has no named fields; give it named fields or remove `key`"
                    ),
                );
                return None;
            }
        },
        Data::Enum(_) | Data::Union(_) => {
            errors.spanned(
                field,
                format_args!(
                    "`key` names a field of a struct, and `{ident}` is not a struct with named fields; remove `key`"
                ),
            );
            return None;
        }
    };
    let Some(found) = fields
        .named
        .iter()
        .find(|f| f.ident.as_ref() == Some(field))
    else {
        let names = fields
            .named
            .iter()
            .filter_map(|f| f.ident.as_ref())
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ");
        errors.spanned(
            field,
            format_args!(
                "no field `{field}` on `{ident}`; key names the field whose value orders the events (fields: {names})"
            ),
        );
        return None;
    };

    // Through `<T as ToString>`, so that a type without `Display` is reported at the field's
    // type (the type argument carries the user's span).
    let ty = &found.ty;
    let value = match option_payload(ty) {
        Some(payload) => quote! {
            self.#field
                .as_ref()
                .map(|key| <#payload as ::inseam::__private::ToString>::to_string(key))
        },
        None => quote! {
            ::inseam::__private::Some(<#ty as ::inseam::__private::ToString>::to_string(&self.#field))
        },
    };
    Some(quote! {
        fn key(&self) -> ::inseam::__private::Option<::inseam::__private::String> {
            #value
        }
    })
}

/// `T` when `ty` is `Option<T>` (recognised by the last path segment).
fn option_payload(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Path(path) => {
            let segment = path.path.segments.last()?;
            if segment.ident != "Option" {
                return None;
            }
            let PathArguments::AngleBracketed(arguments) = &segment.arguments else {
                return None;
            };
            match arguments.args.first() {
                Some(GenericArgument::Type(payload)) if arguments.args.len() == 1 => Some(payload),
                _ => None,
            }
        }
        Type::Group(group) => option_payload(&group.elem),
        Type::Paren(paren) => option_payload(&paren.elem),
        _ => None,
    }
}
