//! HTML: escaping, the page layout and the embedded assets.

use std::fmt::Write as _;
use std::time::Duration;

use crate::guard::Ctx;

/// The stylesheet, served at `<mount>/assets/admin.css`.
pub(crate) const CSS: &str = include_str!("../assets/admin.css");
/// The script (confirmations, JSON formatting), served at `<mount>/assets/admin.js`.
pub(crate) const JS: &str = include_str!("../assets/admin.js");

/// `text` escaped for HTML text and attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` escaped for a URL path segment or query value.
pub(crate) fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration as people read it: `4s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub(crate) fn age(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// The overview's path: the mount path itself (`/admin`), or `/` at the root.
pub(crate) fn home(base: &str) -> String {
    if base.is_empty() {
        "/".to_owned()
    } else {
        base.to_owned()
    }
}

/// A hidden CSRF field for a form.
pub(crate) fn csrf_field(ctx: &Ctx) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&ctx.csrf)
    )
}

/// A form of one button that posts to `action`.
pub(crate) fn button(ctx: &Ctx, action: &str, label: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}<button type=\"submit\" class=\"{class}\">{}</button></form>",
        esc(action),
        csrf_field(ctx),
        esc(label),
    )
}

/// A whole page: head, navigation (with the login state when `ctx` is known), `body`.
pub(crate) fn layout(base: &str, title: &str, body: &str, ctx: Option<&Ctx>) -> String {
    let b = esc(base);
    let h = esc(&home(base));
    let mut session = String::new();
    if let Some(ctx) = ctx {
        if ctx.login && ctx.authorized {
            session = format!(
                "<form method=\"post\" action=\"{b}/logout\" class=\"inline\">{}<button type=\"submit\" id=\"logout\">Log out</button></form>",
                csrf_field(ctx)
            );
        } else if ctx.login {
            session = format!("<a href=\"{b}/login\" id=\"login\">Log in</a>");
        } else if !ctx.authorized {
            session = "<span class=\"muted\">read only</span>".to_owned();
        }
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><link rel=\"stylesheet\" href=\"{b}/assets/admin.css\">\
<script src=\"{b}/assets/admin.js\" defer></script></head><body>\
<header><a class=\"brand\" href=\"{h}\">inseam admin</a>\
<nav><a href=\"{h}\">Overview</a><a href=\"{b}/dead-letters\">Dead letters</a></nav>\
<form method=\"get\" action=\"{b}/flows\" class=\"search\"><input name=\"correlation_id\" placeholder=\"correlation id\" aria-label=\"flow by correlation id\"><button type=\"submit\">Flow</button></form>\
<form method=\"get\" action=\"{b}/messages\" class=\"search\"><input name=\"message_id\" placeholder=\"message id\" aria-label=\"message by id\"><button type=\"submit\">Find</button></form>\
<span class=\"session\">{session}</span></header><main>{body}</main></body></html>",
        title = esc(title),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(url("a b/c?é"), "a%20b%2Fc%3F%C3%A9");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(Duration::from_secs(4)), "4s");
        assert_eq!(age(Duration::from_secs(192)), "3m 12s");
        assert_eq!(age(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(age(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d 4h");
    }
}
