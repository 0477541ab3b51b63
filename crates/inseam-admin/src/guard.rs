//! Who may do what: the CSRF cookie, the cross-site checks, the authorisation hook and the
//! token login.

use axum::extract::{FromRequestParts, OriginalUri, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};

use crate::Admin;
use crate::error::Failure;

/// The cookie holding the CSRF token that every form repeats.
pub(crate) const CSRF_COOKIE: &str = "inseam_admin_csrf";
/// The cookie the token login sets.
pub(crate) const LOGIN_COOKIE: &str = "inseam_admin_login";

/// Where the router is mounted (`/admin`; empty at the root), from the URI the request had
/// before [`Router::nest`](axum::Router::nest) stripped it.
fn base(original: Option<&OriginalUri>, path: &str) -> String {
    let Some(original) = original else {
        return String::new();
    };
    let full = original.path();
    full.strip_suffix(path)
        .or_else(|| full.strip_suffix(path.trim_end_matches('/')))
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned()
}

/// Where the router of `request` is mounted.
pub(crate) fn base_of(request: &Request) -> String {
    base(
        request.extensions().get::<OriginalUri>(),
        request.uri().path(),
    )
}

/// The value of cookie `name`.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Compares two secrets in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token as the login cookie holds it.
pub(crate) fn hex(token: &str) -> String {
    use std::fmt::Write as _;
    token.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Whether `typed` is `token` (never when it is empty).
pub(crate) fn token_is(typed: &str, token: &str) -> bool {
    !token.is_empty() && same(typed.as_bytes(), token.as_bytes())
}

/// Whether `parts` carries `token`, as a bearer token or in the login cookie.
pub(crate) fn token_matches(parts: &Parts, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(bearer) = bearer {
        return same(bearer.trim().as_bytes(), token.as_bytes());
    }
    cookie(&parts.headers, LOGIN_COOKIE)
        .is_some_and(|value| same(value.as_bytes(), hex(token).as_bytes()))
}

/// A `Set-Cookie` header for the admin's cookies: on the mount path, `HttpOnly`,
/// `SameSite=Strict`, `Secure` when the options say so, for the browser's session (or deleted,
/// with `value` empty).
pub(crate) fn set_cookie(ctx: &Ctx, name: &str, value: &str) -> Option<HeaderValue> {
    let path = if ctx.base.is_empty() { "/" } else { &ctx.base };
    let expiry = if value.is_empty() { "; Max-Age=0" } else { "" };
    let secure = if ctx.secure_cookies { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Strict{secure}{expiry}"
    ))
    .ok()
}

/// What every page knows of its request.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// Where the router is mounted.
    pub(crate) base: String,
    /// The CSRF token for the page's forms.
    pub(crate) csrf: String,
    /// Whether the token is new, to be set as a cookie.
    pub(crate) new_csrf: bool,
    /// Whether the request may change state.
    pub(crate) authorized: bool,
    /// Whether the router has a token login.
    pub(crate) login: bool,
    /// Whether the request accepts JSON.
    pub(crate) json: bool,
    /// Whether cookies are set `Secure`.
    pub(crate) secure_cookies: bool,
}

impl FromRequestParts<Admin> for Ctx {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, Failure> {
        let base = base(parts.extensions.get::<OriginalUri>(), parts.uri.path());
        let existing = cookie(&parts.headers, CSRF_COOKIE)
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
        let (csrf, new_csrf) = match existing {
            Some(value) => (value.to_owned(), false),
            None => (
                format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                ),
                true,
            ),
        };
        Ok(Ctx {
            base,
            csrf,
            new_csrf,
            authorized: (admin.options.authorize)(parts),
            login: admin.options.token.is_some(),
            json: crate::error::wants_json(&parts.headers),
            secure_cookies: admin.options.secure_cookies,
        })
    }
}

/// A request that may change state: it passed the cross-site checks and the authorisation
/// hook. Its CSRF field is checked with [`Change::check_csrf`] once the form is read.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) ctx: Ctx,
    /// The CSRF cookie as sent.
    cookie: Option<String>,
    /// Whether the request authenticates with a header (no CSRF field needed).
    by_header: bool,
}

impl Change {
    /// Refuses a form whose `csrf` field does not match the cookie.
    pub(crate) fn check_csrf(&self, field: Option<&str>) -> Result<(), Failure> {
        if self.by_header {
            return Ok(());
        }
        match (self.cookie.as_deref(), field) {
            (Some(cookie), Some(field)) if same(cookie.as_bytes(), field.as_bytes()) => Ok(()),
            (None, _) => Err(Failure::forbidden(
                "no CSRF cookie: load the page again and resubmit the form",
            )),
            _ => Err(Failure::forbidden(
                "the form's CSRF token does not match its cookie: load the page again and resubmit the form",
            )),
        }
    }
}

/// Refuses a request sent from another site: `Sec-Fetch-Site` other than `same-origin` or
/// `none`, or an `Origin` whose host is not the `Host`.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Failure> {
    // Every value counts: a header sent twice is refused if either says another site.
    let values = |name: header::HeaderName| -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect()
    };
    for site in values(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return Err(Failure::forbidden(format!(
                "cross-site request refused (Sec-Fetch-Site: {site})"
            )));
        }
    }
    let host = values(header::HOST).first().copied().unwrap_or_default();
    for origin in values(header::ORIGIN) {
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'));
        if origin_host != Some(host) {
            return Err(Failure::forbidden(format!(
                "cross-site request refused (Origin {origin} is not this host, {host})"
            )));
        }
    }
    Ok(())
}

impl FromRequestParts<Admin> for Change {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, Failure> {
        same_origin(&parts.headers)?;
        let ctx = Ctx::from_request_parts(parts, admin).await?;
        if !ctx.authorized {
            let how = if ctx.login {
                "log in first"
            } else {
                "the app's authorisation hook refused it"
            };
            return Err(Failure::forbidden(format!(
                "not authorised to change anything: {how}"
            )));
        }
        Ok(Change {
            ctx,
            cookie: cookie(&parts.headers, CSRF_COOKIE).map(str::to_owned),
            by_header: parts.headers.contains_key(header::AUTHORIZATION),
        })
    }
}

/// A login attempt: it passed the cross-site checks; [`Change::check_csrf`] checks its form.
#[derive(Debug, Clone)]
pub(crate) struct SameSite(pub(crate) Change);

impl FromRequestParts<Admin> for SameSite {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, Failure> {
        same_origin(&parts.headers)?;
        let ctx = Ctx::from_request_parts(parts, admin).await?;
        Ok(SameSite(Change {
            ctx,
            cookie: cookie(&parts.headers, CSRF_COOKIE).map(str::to_owned),
            by_header: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_path_is_what_nesting_stripped() {
        let at = |full: &str, path: &str| {
            base(Some(&OriginalUri(full.parse().unwrap_or_default())), path)
        };
        assert_eq!(at("/admin/dead-letters/3", "/dead-letters/3"), "/admin");
        assert_eq!(at("/admin", "/"), "/admin");
        assert_eq!(at("/admin/", "/"), "/admin");
        assert_eq!(at("/", "/"), "");
        assert_eq!(base(None, "/x"), "");
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, HeaderValue::from_static(v));
            }
            map
        };
        assert!(same_origin(&headers(&[])).is_ok());
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])).is_ok());
        let refused = same_origin(&headers(&[("sec-fetch-site", "cross-site")]));
        assert_eq!(
            refused.map_err(|f| f.message),
            Err("cross-site request refused (Sec-Fetch-Site: cross-site)".to_owned())
        );
        assert!(
            same_origin(&headers(&[
                ("origin", "http://127.0.0.1:3000"),
                ("host", "127.0.0.1:3000")
            ]))
            .is_ok()
        );
        assert!(
            same_origin(&headers(&[
                ("origin", "https://evil.example"),
                ("host", "127.0.0.1:3000")
            ]))
            .is_err()
        );
        assert!(same_origin(&headers(&[("origin", "null"), ("host", "h")])).is_err());
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut map = HeaderMap::new();
        map.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; inseam_admin_csrf=abc; b=2"),
        );
        assert_eq!(cookie(&map, CSRF_COOKIE), Some("abc"));
        assert_eq!(cookie(&map, "c"), None);
        assert_eq!(hex("s3"), "7333");
    }
}
