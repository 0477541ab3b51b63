//! Spans and type names for diagnostics.

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::ToTokens;

/// The spans of the first and of the last token of `tokens`. Generated code that starts at the
/// first and ends at the last is underlined under all of `tokens` (spans cannot be joined on
/// stable).
pub(crate) fn first_last(tokens: &impl ToTokens) -> (Span, Span) {
    let mut iter = tokens.to_token_stream().into_iter();
    let first = iter.next().map_or_else(Span::call_site, |tree| tree.span());
    let last = iter.last().map_or(first, |tree| tree.span());
    (first, last)
}

/// `tokens` as source text, without the spaces that token printing puts around punctuation
/// (`&PlaceOrder` rather than `& PlaceOrder`).
pub(crate) fn pretty(tokens: &impl ToTokens) -> String {
    let mut out = String::new();
    write_pretty(tokens.to_token_stream(), &mut out);
    out
}

fn write_pretty(tokens: TokenStream, out: &mut String) {
    let mut previous: Option<TokenTree> = None;
    let mut dash = false;
    let mut after_arrow = false;
    for tree in tokens {
        let space = match (&previous, &tree) {
            (None, _) => false,
            (Some(TokenTree::Punct(p)), _) if p.as_char() == ',' => true,
            // `-> T`: spaces around the arrow.
            (Some(_), TokenTree::Punct(p)) if p.as_char() == '-' => true,
            (Some(_), _) if after_arrow => true,
            (
                Some(TokenTree::Ident(_) | TokenTree::Literal(_)),
                TokenTree::Ident(_) | TokenTree::Literal(_),
            ) => true,
            _ => false,
        };
        if space {
            out.push(' ');
        }
        let is_punct = |c| matches!(&tree, TokenTree::Punct(p) if p.as_char() == c);
        after_arrow = dash && is_punct('>');
        dash = is_punct('-');
        match &tree {
            TokenTree::Group(group) => {
                let (open, close) = match group.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::Brace => ("{ ", " }"),
                    Delimiter::None => ("", ""),
                };
                out.push_str(open);
                write_pretty(group.stream(), out);
                out.push_str(close);
            }
            other => out.push_str(&other.to_string()),
        }
        previous = Some(tree);
    }
}

#[cfg(test)]
mod tests {
    use super::pretty;

    #[test]
    fn types_print_as_written() {
        let cases = [
            (quote::quote!(&PlaceOrder), "&PlaceOrder"),
            (
                quote::quote!(&'a mut CommandContext<'_>),
                "&'a mut CommandContext<'_>",
            ),
            (
                quote::quote!(Result<u64, std::io::Error>),
                "Result<u64, std::io::Error>",
            ),
            (quote::quote!(&(A, B)), "&(A, B)"),
            (quote::quote!(&dyn Fn(u8) -> u8), "&dyn Fn(u8) -> u8"),
        ];
        for (tokens, expected) in cases {
            assert_eq!(pretty(&tokens), expected);
        }
    }
}
