//! `#[derive(EventSet)]`: an enum of event types, one per tuple variant, as the events of an
//! aggregate.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Data, DeriveInput, Fields, Type};

/// Implements `EventSet` for an enum whose variants each wrap one event type, and `From` each
/// event type into the enum.
pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let Data::Enum(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(EventSet)] goes on an enum with one variant per event type, e.g. `enum OrderEvent { Placed(OrderPlaced), Shipped(OrderShipped) }`",
        ));
    };
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            "#[derive(EventSet)] does not support generic enums",
        ));
    }
    let mut errors: Option<syn::Error> = None;
    let mut variants: Vec<(&syn::Ident, &Type)> = Vec::new();
    for variant in &data.variants {
        match &variant.fields {
            Fields::Unnamed(fields) if fields.unnamed.len() == 1 => {
                variants.push((&variant.ident, &fields.unnamed[0].ty));
            }
            _ => {
                let error = syn::Error::new_spanned(
                    variant,
                    format!(
                        "each variant of an event set wraps exactly one event type, e.g. `{}(OrderPlaced)`",
                        variant.ident
                    ),
                );
                match &mut errors {
                    Some(errors) => errors.combine(error),
                    None => errors = Some(error),
                }
            }
        }
    }
    if let Some(errors) = errors {
        return Err(errors);
    }
    if variants.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "an event set needs at least one variant",
        ));
    }
    let ident = &input.ident;
    let set_name = ident.to_string();
    let p = quote!(::inseam::__private);
    let stage_arms = variants.iter().map(|(variant, ty)| {
        // Spanned at the wrapped type: "not an event" points at it.
        let call = quote_spanned!(ty.span()=> stage.event::<#ty>(event));
        quote! { #ident::#variant(event) => #call, }
    });
    let decode_arms = variants.iter().map(|(variant, ty)| {
        quote! {
            if raw.name == <#ty as #p::Event>::NAME && raw.version == <#ty as #p::Event>::VERSION {
                return raw.decode::<#ty>().map(|envelope| #ident::#variant(envelope.payload));
            }
        }
    });
    let names = variants.iter().map(|(_, ty)| {
        quote! { (<#ty as #p::Event>::NAME, <#ty as #p::Event>::VERSION) }
    });
    let tys = variants.iter().map(|(_, ty)| ty);
    let froms = variants.iter().map(|(variant, ty)| {
        quote! {
            impl ::core::convert::From<#ty> for #ident {
                fn from(event: #ty) -> Self {
                    #ident::#variant(event)
                }
            }
        }
    });
    Ok(quote! {
        impl #p::EventSet for #ident {
            fn stage(self, stage: &mut #p::Stage<'_>) {
                match self {
                    #(#stage_arms)*
                }
            }

            fn decode(raw: &#p::RawEnvelope) -> ::core::result::Result<Self, #p::WireError> {
                #(#decode_arms)*
                ::core::result::Result::Err(#p::WireError::NotInSet {
                    found: raw.name.clone(),
                    found_version: raw.version,
                    set: #set_name,
                })
            }

            fn events() -> #p::Vec<(&'static str, u32)> {
                #p::vec![#(#names),*]
            }

            fn visit<V: #p::EventVisitor>(visitor: &mut V) {
                #(visitor.visit::<#tys>();)*
            }
        }
        #(#froms)*
    })
}
