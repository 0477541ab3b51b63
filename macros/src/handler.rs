//! `#[command_handler]`, `#[query_handler]` and `#[event_handler]`: a marker type named after
//! the function implements the handler trait by extracting the arguments and calling it.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::{
    FnArg, GenericArgument, Ident, ItemFn, LitStr, PathArguments, ReturnType, Signature, Type,
    TypeReference,
};

use crate::attr::{self, Errors, Setting};
use crate::span;

/// Which handler attribute is being expanded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Command,
    Query,
    Event,
}

impl Kind {
    fn attr(self) -> &'static str {
        match self {
            Kind::Command => "#[command_handler]",
            Kind::Query => "#[query_handler]",
            Kind::Event => "#[event_handler]",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Query => "query",
            Kind::Event => "event",
        }
    }

    /// "a command handler", "an event handler": the kind of handler, with its article.
    fn a_handler(self) -> &'static str {
        match self {
            Kind::Command => "a command handler",
            Kind::Query => "a query handler",
            Kind::Event => "an event handler",
        }
    }

    /// The context type of this kind of handler.
    fn context_type(self) -> &'static str {
        match self {
            Kind::Command => "CommandContext",
            Kind::Query => "QueryContext",
            Kind::Event => "EventContext",
        }
    }

    /// The context parameter as the handler should declare it.
    fn context(self) -> &'static str {
        match self {
            Kind::Command => "&mut CommandContext<'_>",
            Kind::Query => "&QueryContext<'_>",
            Kind::Event => "&mut EventContext<'_>",
        }
    }
}

/// Expands a handler attribute. The function is always emitted unchanged, followed by either
/// the handler impls or every error found.
pub(crate) fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let function = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(function) => function,
        Err(error) => {
            let error = syn::Error::new(
                error.span(),
                format_args!(
                    "{} goes on an `async fn` whose first parameter is the {}",
                    kind.attr(),
                    kind.message()
                ),
            )
            .into_compile_error();
            return quote!(#item #error);
        }
    };
    let generated = expand_fn(kind, args, &function).unwrap_or_else(syn::Error::into_compile_error);
    quote! {
        #function
        #generated
    }
}

/// How an event handler receives the event.
#[derive(Clone, Copy)]
enum EventArg {
    /// `Envelope<E>`
    Envelope,
    /// `&Envelope<E>`
    EnvelopeRef,
    /// `E`
    Payload,
    /// `&E`
    PayloadRef,
}

/// A parameter after the message.
enum Param<'a> {
    Context,
    Extractor(&'a Type),
}

fn expand_fn(kind: Kind, args: TokenStream, function: &ItemFn) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let mut emits = Emits::default();
    let delivery = match kind {
        Kind::Event => parse_delivery(args, &mut emits, &mut errors),
        Kind::Command => {
            parse_emits_only(args, &mut emits, &mut errors);
            None
        }
        Kind::Query => {
            if !args.is_empty() {
                errors.spanned(
                    &args,
                    format_args!("{} takes no arguments; remove them", kind.attr()),
                );
            }
            None
        }
    };

    let sig = &function.sig;
    check_signature(kind, sig, &mut errors);

    // The message: the first typed parameter.
    let mut inputs = sig.inputs.iter();
    let mut message = None;
    for input in inputs.by_ref() {
        match input {
            FnArg::Receiver(receiver) => errors.spanned(
                receiver,
                format_args!(
                    "{} goes on a free function, which cannot take `self`; move it out of the impl block",
                    kind.attr()
                ),
            ),
            FnArg::Typed(typed) => {
                message = Some(&*typed.ty);
                break;
            }
        }
    }
    let event_arg = message.and_then(|ty| check_message(kind, ty, &mut errors));
    if message.is_none()
        && !sig
            .inputs
            .iter()
            .any(|input| matches!(input, FnArg::Receiver(_)))
    {
        let (by_value, example) = match kind {
            Kind::Command => (
                ", by value",
                "async fn place_order(command: PlaceOrder, ..)",
            ),
            Kind::Query => (
                ", by value",
                "async fn order_summary(query: GetOrderSummary, ..)",
            ),
            Kind::Event => ("", "async fn on_order_placed(event: &OrderPlaced, ..)"),
        };
        errors.spanned(
            signature_head(sig),
            format_args!(
                "the first parameter of {} is the {}{by_value}, e.g. `{example}`",
                kind.a_handler(),
                kind.message()
            ),
        );
    }

    // The context (one reference parameter at most) and the extractors.
    let mut params = Vec::new();
    let mut has_context = false;
    for input in inputs {
        let ty = match input {
            FnArg::Receiver(receiver) => {
                errors.spanned(receiver, "`self` can only be the first parameter");
                continue;
            }
            FnArg::Typed(typed) => &*typed.ty,
        };
        match ty {
            Type::Reference(reference) => {
                if has_context {
                    errors.spanned(
                        reference,
                        format_args!(
                            "{} takes at most one reference parameter, its context `{}`; take other arguments by value",
                            kind.a_handler(),
                            kind.context()
                        ),
                    );
                    continue;
                }
                check_context(kind, reference, &mut errors);
                has_context = true;
                params.push(Param::Context);
            }
            Type::ImplTrait(_) => errors.spanned(
                ty,
                format_args!(
                    "{} cannot be generic; name the argument's type",
                    kind.a_handler()
                ),
            ),
            _ => params.push(Param::Extractor(ty)),
        }
    }

    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => None,
    };
    if output.is_none() && kind != Kind::Event {
        errors.spanned(
            signature_head(sig),
            format_args!(
                "a {kind} handler returns Result<Output, Error>, with the `output` and `error` of its {kind}: add `-> Result<..>`",
                kind = kind.message()
            ),
        );
    }

    errors.finish()?;
    let (Some(message), Some(event_arg)) = (message, event_arg) else {
        // A missing or invalid message always records an error, so both are present here.
        return Ok(TokenStream::new());
    };

    Ok(generate(
        kind,
        function,
        message,
        event_arg,
        &params,
        output,
        &Settings { delivery, emits },
    ))
}

/// `fn name(params)`, to point at a signature as a whole.
fn signature_head(sig: &Signature) -> TokenStream {
    let mut head = TokenStream::new();
    sig.fn_token.to_tokens(&mut head);
    sig.ident.to_tokens(&mut head);
    sig.paren_token
        .surround(&mut head, |tokens| sig.inputs.to_tokens(tokens));
    head
}

/// Checks what every handler shares: `async`, no generics.
fn check_signature(kind: Kind, sig: &Signature, errors: &mut Errors) {
    if sig.asyncness.is_none() {
        errors.spanned(
            sig.fn_token,
            format_args!(
                "{} needs an async fn: write `async fn {}`",
                kind.attr(),
                sig.ident
            ),
        );
    }
    let generics = &sig.generics;
    if !generics.params.is_empty() {
        errors.spanned(
            &generics.params,
            format_args!(
                "{} cannot be generic: it is registered once, for one {} type; remove the generic parameters",
                kind.a_handler(),
                kind.message()
            ),
        );
    } else if let Some(where_clause) = &generics.where_clause {
        errors.spanned(
            where_clause,
            format_args!("{} cannot have a where clause; remove it", kind.a_handler()),
        );
    }
}

/// Checks the context parameter: the context of this kind of handler (recognised by the last
/// path segment, as rustc would otherwise report the mismatch at the attribute, the wrong way
/// round), taken by `&mut` or, for a query, by `&`.
fn check_context(kind: Kind, reference: &TypeReference, errors: &mut Errors) {
    if let Some(named) = context_kind(&reference.elem).filter(|named| *named != kind) {
        errors.spanned(
            reference,
            format_args!(
                "{} takes its context as `{}`, not `{}`: `{}` is the context of {}",
                kind.a_handler(),
                kind.context(),
                span::pretty(reference),
                named.context_type(),
                named.a_handler()
            ),
        );
        return;
    }
    let wants_mut = kind != Kind::Query;
    if reference.mutability.is_some() != wants_mut {
        errors.spanned(
            reference,
            format_args!(
                "the context of {} is taken as `{}`",
                kind.a_handler(),
                kind.context()
            ),
        );
    }
}

/// The kind of handler whose context `ty` names, if it names one.
fn context_kind(ty: &Type) -> Option<Kind> {
    match ty {
        Type::Group(group) => context_kind(&group.elem),
        Type::Paren(paren) => context_kind(&paren.elem),
        Type::Path(path) if path.qself.is_none() => {
            let ident = &path.path.segments.last()?.ident;
            [Kind::Command, Kind::Query, Kind::Event]
                .into_iter()
                .find(|kind| ident == kind.context_type())
        }
        _ => None,
    }
}

/// Checks the message parameter; for an event, also tells how the event is passed.
fn check_message(kind: Kind, ty: &Type, errors: &mut Errors) -> Option<EventArg> {
    match (kind, ty) {
        (Kind::Command | Kind::Query, Type::Reference(reference)) => {
            let inner = &reference.elem;
            errors.spanned(
                ty,
                format_args!(
                    "a {kind} handler takes the {kind} by value: write `{}` instead of `{}`",
                    span::pretty(inner),
                    span::pretty(ty),
                    kind = kind.message()
                ),
            );
            None
        }
        (Kind::Command | Kind::Query, Type::ImplTrait(_)) => {
            errors.spanned(
                ty,
                format_args!(
                    "a {kind} handler takes one concrete {kind} type",
                    kind = kind.message()
                ),
            );
            None
        }
        (Kind::Command | Kind::Query, _) => Some(EventArg::Payload),
        (Kind::Event, Type::Reference(reference)) => {
            if reference.mutability.is_some() {
                errors.spanned(
                    ty,
                    "an event is shared with every subscriber: take it as `&E`, `E`, `&Envelope<E>` or `Envelope<E>`",
                );
                return None;
            }
            Some(match envelope_payload(&reference.elem) {
                Some(_) => EventArg::EnvelopeRef,
                None => EventArg::PayloadRef,
            })
        }
        (Kind::Event, Type::ImplTrait(_)) => {
            errors.spanned(ty, "an event handler takes one concrete event type");
            None
        }
        (Kind::Event, _) => Some(match envelope_payload(ty) {
            Some(_) => EventArg::Envelope,
            None => EventArg::Payload,
        }),
    }
}

/// `E` when `ty` is `Envelope<E>` (recognised by the last path segment).
fn envelope_payload(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    let segment = path.path.segments.last()?;
    if segment.ident != "Envelope" {
        return None;
    }
    let PathArguments::AngleBracketed(arguments) = &segment.arguments else {
        return None;
    };
    let mut arguments = arguments.args.iter();
    match (arguments.next(), arguments.next()) {
        (Some(GenericArgument::Type(payload)), None) => Some(payload),
        _ => None,
    }
}

const BOTH: &str = "an event handler is either delivered to a group or inline, not both: keep `group = \"..\"` or `inline`";

/// Parses `group = ".."` or `inline`.
/// What the handler attribute says.
struct Settings {
    /// An event handler's delivery.
    delivery: Option<TokenStream>,
    /// What the handler declares it emits.
    emits: Emits,
}

/// What a handler declares it emits, for the catalog.
#[derive(Default)]
struct Emits {
    publishes: Setting<Vec<Type>>,
    sends: Setting<Vec<Type>>,
}

impl Emits {
    /// Parses `publishes(..)` or `sends(..)`; `false` if `key` is neither.
    fn parse(
        &mut self,
        key: &Ident,
        input: syn::parse::ParseStream<'_>,
        errors: &mut Errors,
    ) -> syn::Result<bool> {
        let (setting, example) = if key == "publishes" {
            (&mut self.publishes, "publishes(OrderPlaced, OrderRejected)")
        } else if key == "sends" {
            (&mut self.sends, "sends(ReserveStock)")
        } else {
            return Ok(false);
        };
        if !input.peek(syn::token::Paren) {
            return Err(syn::Error::new_spanned(
                key,
                format_args!("`{key}` takes a list of types in parentheses: `{example}`"),
            ));
        }
        let content;
        syn::parenthesized!(content in input);
        let types =
            syn::punctuated::Punctuated::<Type, syn::Token![,]>::parse_terminated(&content)?;
        setting.set(key, types.into_iter().collect(), errors);
        Ok(true)
    }

    /// The handler trait's `PUBLISHES` and `SENDS`.
    fn consts(&self) -> TokenStream {
        let publishes = self.publishes.get().map(|types| {
            let refs = types
                .iter()
                .map(|ty| quote!(::inseam::__private::Published::of::<#ty>()));
            quote!(const PUBLISHES: &'static [::inseam::__private::Published] = &[#(#refs),*];)
        });
        let sends = self.sends.get().map(|types| {
            let names = types
                .iter()
                .map(|ty| quote!(<#ty as ::inseam::__private::Command>::NAME));
            quote!(const SENDS: &'static [&'static str] = &[#(#names),*];)
        });
        quote!(#publishes #sends)
    }
}

/// Parses a command handler's arguments: only `publishes(..)` and `sends(..)`.
fn parse_emits_only(args: TokenStream, emits: &mut Emits, errors: &mut Errors) {
    attr::parse_list(args, errors, &mut |key, input, errors| {
        if emits.parse(key, input, errors)? {
            Ok(())
        } else {
            Err(attr::unknown_key(
                key,
                "#[command_handler(..)]",
                &["publishes", "sends"],
            ))
        }
    });
}

fn parse_delivery(
    args: TokenStream,
    emits: &mut Emits,
    errors: &mut Errors,
) -> Option<TokenStream> {
    let mut group = Setting::<LitStr>::default();
    let mut inline = Setting::<()>::default();
    // Set even when the value is malformed, which is then the one error reported about it.
    let mut delivery_given = false;
    attr::parse_list(args, errors, &mut |key, input, errors| {
        if key == "group" || key == "inline" {
            delivery_given = true;
        }
        if emits.parse(key, input, errors)? {
            return Ok(());
        }
        if key == "group" {
            attr::expect_eq(key, input, "\"inventory\"")?;
            let lit = input.parse::<LitStr>().map_err(|error| {
                syn::Error::new(
                    error.span(),
                    "expected the group as a string: `group = \"inventory\"`",
                )
            })?;
            if !is_group_name(&lit.value()) {
                errors.spanned(
                    &lit,
                    format_args!(
                        "invalid group {:?}: a group is a non-empty name of [a-z0-9_.-], e.g. \"inventory\"",
                        lit.value()
                    ),
                );
            }
            if inline.key().is_some() {
                errors.spanned(key, BOTH);
            }
            group.set(key, lit, errors);
        } else if key == "inline" {
            attr::expect_flag(key, input)?;
            if group.key().is_some() {
                errors.spanned(key, BOTH);
            }
            inline.set(key, (), errors);
        } else {
            return Err(attr::unknown_key(
                key,
                "#[event_handler(..)]",
                &["group", "inline", "publishes", "sends"],
            ));
        }
        Ok(())
    });

    match (group.key(), inline.key()) {
        // Reported at the second of the two.
        (Some(_), Some(_)) => None,
        (None, None) => {
            if delivery_given {
                return None;
            }
            errors.at(
                Span::call_site(),
                "an event handler needs a delivery: `#[event_handler(group = \"name\")]` to be delivered after the publishing command completes, under a stable group name, or `#[event_handler(inline)]` to run inside the publishing command",
            );
            None
        }
        (Some(_), None) => {
            let lit = group.into_inner()?;
            Some(quote!(::inseam::__private::Delivery::Group(#lit)))
        }
        (None, Some(_)) => Some(quote!(::inseam::__private::Delivery::Inline)),
    }
}

/// Whether `group` is a non-empty name of `[a-z0-9_.-]`.
fn is_group_name(group: &str) -> bool {
    !group.is_empty()
        && group
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

fn generate(
    kind: Kind,
    function: &ItemFn,
    message: &Type,
    event_arg: EventArg,
    params: &[Param<'_>],
    output: Option<&Type>,
    settings: &Settings,
) -> TokenStream {
    let delivery = &settings.delivery;
    let vis = &function.vis;
    let name = &function.sig.ident;
    let name_str = name.to_string();

    // Each extractor goes through `<T as Extract>` (rather than a tuple of them), so that a
    // type that is not an extractor is reported at its parameter.
    let extractors: Vec<&Type> = params
        .iter()
        .filter_map(|param| match param {
            Param::Extractor(ty) => Some(*ty),
            Param::Context => None,
        })
        .collect();
    let extract = quote!(::inseam::__private::Extract);
    let prepared: Vec<Ident> = (1..=extractors.len())
        .map(|i| format_ident!("__p{i}"))
        .collect();
    let values: Vec<Ident> = (1..=extractors.len())
        .map(|i| format_ident!("__a{i}"))
        .collect();
    // Parameters named so that a handler without extractors does not warn.
    let (cx, prepared_param) = if extractors.is_empty() {
        (quote!(_cx), quote!(_prepared))
    } else {
        (quote!(cx), quote!(prepared))
    };
    // `<T as Extract>::Prepared` runs from the first to the last token of `T`, so that its
    // unmet bound is underlined there too.
    let prepared_types = extractors.iter().map(|ty| {
        let (first, last) = span::first_last(ty);
        let open = quote_spanned!(first=> <);
        let rest = quote_spanned!(last=> as ::inseam::__private::Extract>::Prepared);
        quote!(#open #ty #rest)
    });
    let emit_consts = settings.emits.consts();
    let prepare = quote! {
        type Prepared = (#(#prepared_types,)*);
        const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", #name_str);
        #emit_consts
        fn prepare(
            #cx: &mut ::inseam::__private::PrepareCx<'_>,
        ) -> ::inseam::__private::Option<Self::Prepared> {
            // Every extractor is prepared before giving up, so that every missing piece is
            // reported.
            #(let #prepared = <#extractors as #extract>::prepare(cx);)*
            ::inseam::__private::Some((#(#prepared?,)*))
        }
    };
    let extracted = (!extractors.is_empty()).then(|| {
        quote! {
            let (#(#prepared,)*) = prepared;
            let parts = ctx.__parts();
            #(let #values = <#extractors as #extract>::extract(#prepared, &parts);)*
        }
    });

    let mut args = Vec::new();
    let message_arg = match (kind, event_arg) {
        (Kind::Command, _) => quote!(command),
        (Kind::Query, _) => quote!(query),
        // `<T as Clone>`, so that an event that is not `Clone` is reported at the parameter's
        // type.
        (Kind::Event, EventArg::Envelope) => {
            quote!(<#message as ::inseam::__private::Clone>::clone(event))
        }
        (Kind::Event, EventArg::EnvelopeRef) => quote!(event),
        (Kind::Event, EventArg::Payload) => {
            quote!(<#message as ::inseam::__private::Clone>::clone(&event.payload))
        }
        (Kind::Event, EventArg::PayloadRef) => quote!(&event.payload),
    };
    args.push(message_arg);
    let mut values_iter = values.iter();
    for param in params {
        match param {
            Param::Context => args.push(quote!(ctx)),
            Param::Extractor(_) => args.extend(values_iter.next().map(ToTokens::to_token_stream)),
        }
    }
    // Spanned at the function's name, so that a future that is not `Send` is reported there.
    // The return type is a type argument, so that one that is not the message's result is
    // reported there, naming the expected `Result`.
    let returned = output.map_or_else(|| quote!(_), ToTokens::to_token_stream);
    let call = match kind {
        Kind::Command => quote_spanned! {name.span()=>
            ::inseam::__private::command_future::<#message, #returned, _>(#name(#(#args),*))
        },
        Kind::Query => quote_spanned! {name.span()=>
            ::inseam::__private::query_future::<#message, #returned, _>(#name(#(#args),*))
        },
        Kind::Event => {
            // The awaited call runs from the first to the last token of the return type, so
            // that a return type without `IntoHandlerResult` is underlined there.
            let (first, last) = output.map_or((name.span(), name.span()), span::first_last);
            let callee = Ident::new(&name_str, first);
            let awaited = quote_spanned!(last=> (#(#args),*).await);
            quote_spanned! {name.span()=>
                ::inseam::__private::handler_future(async move {
                    ::inseam::__private::IntoHandlerResult::into_handler_result(#callee #awaited)
                })
            }
        }
    };

    let event_ty = match event_arg {
        EventArg::Envelope | EventArg::Payload => message,
        EventArg::EnvelopeRef | EventArg::PayloadRef => match message {
            Type::Reference(reference) => &reference.elem,
            other => other,
        },
    };
    let event_ty = envelope_payload(event_ty).unwrap_or(event_ty);

    let (trait_impl, registration) = match kind {
        Kind::Command => (
            quote! {
                impl ::inseam::__private::CommandHandler for #name {
                    type Command = #message;
                    #prepare
                    fn call<'a>(
                        #prepared_param: &'a Self::Prepared,
                        command: Self::Command,
                        ctx: &'a mut ::inseam::__private::CommandContext<'_>,
                    ) -> ::inseam::__private::HandlerFuture<'a, ::inseam::__private::CommandResult<Self::Command>> {
                        #extracted
                        #call
                    }
                }
            },
            quote!(command),
        ),
        Kind::Query => (
            quote! {
                impl ::inseam::__private::QueryHandler for #name {
                    type Query = #message;
                    #prepare
                    fn call<'a>(
                        #prepared_param: &'a Self::Prepared,
                        query: Self::Query,
                        ctx: &'a ::inseam::__private::QueryContext<'_>,
                    ) -> ::inseam::__private::HandlerFuture<'a, ::inseam::__private::QueryResult<Self::Query>> {
                        #extracted
                        #call
                    }
                }
            },
            quote!(query),
        ),
        Kind::Event => (
            quote! {
                impl ::inseam::__private::EventHandler for #name {
                    type Event = #event_ty;
                    const DELIVERY: ::inseam::__private::Delivery = #delivery;
                    #prepare
                    fn call<'a>(
                        #prepared_param: &'a Self::Prepared,
                        event: &'a ::inseam::__private::Envelope<Self::Event>,
                        ctx: &'a mut ::inseam::__private::EventContext<'_>,
                    ) -> ::inseam::__private::HandlerFuture<'a, ::core::result::Result<(), ::inseam::__private::BoxError>> {
                        #extracted
                        #call
                    }
                }
            },
            quote!(event),
        ),
    };

    quote! {
        #[doc(hidden)]
        #[allow(non_camel_case_types, missing_docs, missing_debug_implementations, unreachable_pub)]
        #vis struct #name {}

        #[automatically_derived]
        #trait_impl

        #[automatically_derived]
        impl ::inseam::__private::Handler for #name {
            const REGISTRATION: ::inseam::__private::Registration =
                ::inseam::__private::Registration::#registration::<#name>();
        }

        ::inseam::__private::inventory::submit! {
            ::inseam::__private::Registration::#registration::<#name>()
        }
    }
}
