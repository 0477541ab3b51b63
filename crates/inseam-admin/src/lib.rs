//! An admin web page for an inseam app, as an [axum] router to mount where the app wants it:
//! the flow diagram of the app's catalog, the groups with their lag, dead letters and pause
//! state, the dead letters with their error chain (retry, discard, repair the payload), a flow
//! as a timeline by correlation id, and a search by message id.
//!
//! ```no_run
//! # async fn run(app: inseam_core::App, store: inseam_sql::SqlStore, api: axum::Router) {
//! use inseam_admin::AdminOptions;
//!
//! let admin = inseam_admin::router(app, store, AdminOptions::new().token("s3cret"));
//! let router = api.nest("/admin", admin);
//! # }
//! ```
//!
//! The pages are rendered on the server; the little CSS and JavaScript they use is embedded in
//! this crate and served by the router itself, nothing is fetched from elsewhere.
//!
//! # Access
//!
//! Nothing is served unless the router is mounted. Reading is open to whoever reaches the
//! router; every request that changes state (a `POST`) must pass, in this order:
//!
//! 1. the cross-site checks: a `Sec-Fetch-Site` header, when sent, is `same-origin` or `none`,
//!    and an `Origin` header, when sent, names the host of the `Host` header;
//! 2. the CSRF check: the form's `csrf` field equals the `inseam_admin_csrf` cookie the pages
//!    set (`SameSite=Strict`, `HttpOnly`). A request with an `Authorization` header (a script
//!    or a tool, which a browser never sends across sites without the router's consent) needs
//!    no CSRF field;
//! 3. the app's authorisation hook ([`AdminOptions::authorize`]); by default every change is
//!    refused. [`AdminOptions::token`] installs a hook that accepts a bearer token
//!    (`Authorization: Bearer <token>`) or the cookie the router's login form sets.
//!
//! A refused request is answered `403` and changes nothing. Bad input (a malformed or unknown
//! id, a payload the event's decoder refuses) is answered with a `4xx` page that says why, or
//! with `{"error": "..."}` when the request accepts `application/json`.

mod error;
mod graph;
mod guard;
mod html;
mod pages;

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::http::request::Parts;
use inseam_core::App;
use inseam_sql::SqlStore;

pub use graph::flow_svg;

/// The authorisation hook: whether a request may change state.
type Authorize = dyn Fn(&Parts) -> bool + Send + Sync;

/// How the admin router is set up: who may change state, and what it is called.
#[derive(Clone)]
pub struct AdminOptions {
    authorize: Arc<Authorize>,
    /// The token of [`AdminOptions::token`], for the login form.
    token: Option<Arc<str>>,
    title: String,
    secure_cookies: bool,
}

impl fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: only whether there is one.
        f.debug_struct("AdminOptions")
            .field("token", &self.token.is_some())
            .field("title", &self.title)
            .field("secure_cookies", &self.secure_cookies)
            .finish_non_exhaustive()
    }
}

impl Default for AdminOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl AdminOptions {
    /// Pages to read, every change refused.
    pub fn new() -> Self {
        AdminOptions {
            authorize: Arc::new(|_: &Parts| false),
            token: None,
            title: "inseam admin".to_owned(),
            secure_cookies: false,
        }
    }

    /// Lets the requests for which `authorize` answers `true` change state (retry, discard and
    /// repair dead letters, pause and resume groups). It sees the request's method, URI and
    /// headers; it replaces the hook [`token`](Self::token) installs.
    pub fn authorize(mut self, authorize: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.authorize = Arc::new(authorize);
        self
    }

    /// Lets requests that carry `token` change state: as `Authorization: Bearer <token>`, or in
    /// the cookie that the router's login form (`<mount>/login`) sets once the token is typed
    /// in. The cookie holds the token (hex-encoded), is `HttpOnly` and `SameSite=Strict`, and
    /// lasts as long as the browser's session. An empty token lets nobody in.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token: Arc<str> = token.into().into();
        let expected = Arc::clone(&token);
        self.authorize = Arc::new(move |parts: &Parts| guard::token_matches(parts, &expected));
        self.token = Some(token);
        self
    }

    /// Marks the router's cookies (the CSRF token, the login) `Secure`, so that the browser
    /// sends them over HTTPS only: for an admin page served over HTTPS, as it should be
    /// anywhere but on a loopback address.
    pub fn secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// The title of the pages (`inseam admin` by default).
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }
}

/// What every handler shares.
#[derive(Clone)]
struct Admin {
    app: App,
    store: SqlStore,
    options: Arc<AdminOptions>,
}

/// The admin pages over `app` and its `store`, to mount with [`Router::nest`] (links are
/// relative to where it is mounted) or to serve as it is.
///
/// | Method and path                   | What                                                  |
/// |-----------------------------------|-------------------------------------------------------|
/// | `GET /`                           | groups (lag, oldest age, dead letters, paused), flow diagram |
/// | `GET /dead-letters?after=<id>`    | dead letters with their error chain, 50 a page         |
/// | `GET /dead-letters/<id>`          | one dead letter, its envelope and a payload editor     |
/// | `POST /dead-letters/<id>/retry`   | requeues it                                           |
/// | `POST /dead-letters/<id>/discard` | deletes it                                            |
/// | `POST /dead-letters/<id>/payload` | replaces its payload (form field `payload`) once its group's decoder accepts it |
/// | `POST /groups/<group>/pause`, `/resume` | pauses (form field `reason`) or resumes a group |
/// | `GET /flows/<correlation id>`     | the flow as a timeline (also `/flows?correlation_id=`) |
/// | `GET /messages/<message id>`      | finds a message (also `/messages?message_id=`)        |
/// | `GET /login`, `POST /login`, `POST /logout` | the token login of [`AdminOptions::token`]  |
///
/// A `POST` answers `303 See Other` to the page to show next, or `200` with JSON when the
/// request accepts `application/json`.
pub fn router(app: App, store: SqlStore, options: AdminOptions) -> Router {
    pages::routes(Admin {
        app,
        store,
        options: Arc::new(options),
    })
}
