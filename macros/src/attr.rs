//! Attribute parsing shared by the derives and the handler attributes: `key = value` and
//! `flag` lists, with every problem collected rather than the first one returned.

use std::fmt::Display;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Attribute, Ident, LitStr, Token};

/// Collects errors so that all of them are reported at once.
#[derive(Default)]
pub(crate) struct Errors {
    error: Option<syn::Error>,
}

impl Errors {
    /// Records an error spanning `tokens`.
    pub(crate) fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records an error at `span`.
    pub(crate) fn at(&mut self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    /// Records an error (which may itself hold several).
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.error {
            Some(existing) => existing.combine(error),
            None => self.error = Some(error),
        }
    }

    /// `Ok` when nothing was recorded.
    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Parses every `#[name(..)]` attribute among `attrs` as a comma-separated list of `key` or
/// `key = value` items, calling `item` with each key and the stream positioned after it.
///
/// An error returned by `item` is recorded and parsing resumes at the next comma, so one bad
/// value does not hide the problems that follow it.
pub(crate) fn parse_helper_attrs(
    attrs: &[Attribute],
    name: &str,
    errors: &mut Errors,
    mut item: impl FnMut(&Ident, ParseStream<'_>, &mut Errors) -> syn::Result<()>,
) {
    for attr in attrs.iter().filter(|attr| attr.path().is_ident(name)) {
        match attr.meta.require_list() {
            Ok(list) => parse_list(list.tokens.clone(), errors, &mut item),
            Err(_) => errors.spanned(
                attr,
                format_args!(
                    "expected `#[{name}(key = value, ..)]`, with the settings in parentheses"
                ),
            ),
        }
    }
}

/// Parses a comma-separated list of `key` or `key = value` items (the arguments of an
/// attribute macro, or the inside of a helper attribute).
pub(crate) fn parse_list(
    tokens: TokenStream,
    errors: &mut Errors,
    item: &mut impl FnMut(&Ident, ParseStream<'_>, &mut Errors) -> syn::Result<()>,
) {
    let parser = |input: ParseStream<'_>| -> syn::Result<()> {
        while !input.is_empty() {
            match Ident::parse_any(input) {
                Ok(key) => {
                    if let Err(error) = item(&key, input, errors) {
                        errors.push(error);
                        skip_to_comma(input);
                    }
                }
                Err(_) => {
                    let stray = skip_to_comma(input);
                    errors.spanned(stray, "expected a setting name, e.g. `name = \"..\"`");
                }
            }
            if input.is_empty() {
                break;
            }
            if input.parse::<Token![,]>().is_err() {
                let stray = skip_to_comma(input);
                errors.spanned(stray, "expected `,` between settings");
                // Resume after the comma that ended the stray tokens, if any.
                let _ = input.parse::<Token![,]>();
            }
        }
        Ok(())
    };
    if let Err(error) = parser.parse2(tokens) {
        errors.push(error);
    }
}

/// Skips tokens up to (not including) the next comma outside angle brackets, returning them.
fn skip_to_comma(input: ParseStream<'_>) -> TokenStream {
    input
        .step(|cursor| {
            let mut rest = *cursor;
            let mut skipped = TokenStream::new();
            let mut depth = 0usize;
            while let Some((tree, next)) = rest.token_tree() {
                if let TokenTree::Punct(punct) = &tree {
                    match punct.as_char() {
                        ',' if depth == 0 => break,
                        '<' => depth += 1,
                        '>' => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
                skipped.extend([tree]);
                rest = next;
            }
            Ok((skipped, rest))
        })
        .unwrap_or_default()
}

/// Consumes the `=` after `key`, or explains that `key` takes a value like `example`.
pub(crate) fn expect_eq(key: &Ident, input: ParseStream<'_>, example: &str) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>().map(drop)
    } else {
        Err(syn::Error::new_spanned(
            key,
            format_args!("`{key}` takes a value: `{key} = {example}`"),
        ))
    }
}

/// Fails unless `key` is a bare flag (not followed by `= value`).
pub(crate) fn expect_flag(key: &Ident, input: ParseStream<'_>) -> syn::Result<()> {
    if input.peek(Token![=]) {
        Err(syn::Error::new_spanned(
            key,
            format_args!("`{key}` takes no value: write `{key}` alone"),
        ))
    } else {
        Ok(())
    }
}

/// One setting that may appear at most once.
pub(crate) struct Setting<T> {
    value: Option<(Ident, T)>,
}

impl<T> Default for Setting<T> {
    fn default() -> Self {
        Setting { value: None }
    }
}

impl<T> Setting<T> {
    /// Stores `value`, or records a duplicate at the second occurrence of `key`.
    pub(crate) fn set(&mut self, key: &Ident, value: T, errors: &mut Errors) {
        if self.value.is_some() {
            errors.spanned(
                key,
                format_args!("duplicate `{key}` attribute: give `{key}` only once"),
            );
        } else {
            self.value = Some((key.clone(), value));
        }
    }

    /// The key it was given under, if it was given.
    pub(crate) fn key(&self) -> Option<&Ident> {
        self.value.as_ref().map(|(key, _)| key)
    }

    /// The value, if it was given.
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(_, value)| value)
    }

    /// The value, if it was given.
    pub(crate) fn into_inner(self) -> Option<T> {
        self.value.map(|(_, value)| value)
    }
}

/// The error for a key that is not among `accepted`.
pub(crate) fn unknown_key(key: &Ident, attr: &str, accepted: &[&str]) -> syn::Error {
    let list = accepted
        .iter()
        .map(|key| format!("`{key}`"))
        .collect::<Vec<_>>()
        .join(", ");
    syn::Error::new_spanned(
        key,
        format_args!("unknown {attr} attribute `{key}`; the accepted ones are {list}"),
    )
}

/// Whether `name` is a dotted lower-case name such as `orders.order_placed`
/// (`^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$`).
pub(crate) fn is_dotted_name(name: &str) -> bool {
    name.split('.').all(|segment| {
        let mut chars = segment.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    })
}

/// Parses a `name = ".."` value and checks that it is a dotted lower-case name.
pub(crate) fn parse_dotted_name(
    input: ParseStream<'_>,
    kind: &str,
    example: &str,
    errors: &mut Errors,
) -> syn::Result<LitStr> {
    let lit = input.parse::<LitStr>().map_err(|error| {
        syn::Error::new(
            error.span(),
            format_args!("expected a string: `name = \"{example}\"`"),
        )
    })?;
    if !is_dotted_name(&lit.value()) {
        errors.spanned(
            &lit,
            format_args!(
                "invalid {kind} name {:?}: use lower-case segments of [a-z0-9_], each starting with a letter and separated by dots, e.g. \"{example}\"",
                lit.value()
            ),
        );
    }
    Ok(lit)
}

#[cfg(test)]
mod tests {
    use super::is_dotted_name;

    #[test]
    fn dotted_names() {
        for good in ["orders", "orders.order_placed", "a1.b_2.c", "x"] {
            assert!(is_dotted_name(good), "{good}");
        }
        for bad in [
            "",
            "Orders",
            "orders.",
            ".orders",
            "orders..placed",
            "1orders",
            "orders.Placed",
            "orders-placed",
            "_a",
        ] {
            assert!(!is_dotted_name(bad), "{bad}");
        }
    }
}
