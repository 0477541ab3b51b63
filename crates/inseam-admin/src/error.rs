//! Refusals and failures, rendered as a page or as JSON by [`render`].

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::html;

/// A request refused (4xx) or failed (5xx), and why.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<inseam_sql::Error> for Failure {
    fn from(error: inseam_sql::Error) -> Self {
        let message = chain(&error);
        match &error {
            inseam_sql::Error::DeadLetterNotFound { .. } => Failure::not_found(message),
            inseam_sql::Error::RepairRefused { .. } => {
                Failure::new(StatusCode::UNPROCESSABLE_ENTITY, message)
            }
            _ => {
                tracing::error!(target: "inseam::admin", error = %message, "the store failed");
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
        }
    }
}

/// An error and its causes, outermost first, joined with `: `.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl IntoResponse for Failure {
    /// The status, with the failure in the extensions for [`render`] to write out.
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = self.status;
        response.extensions_mut().insert(self);
        response
    }
}

/// Whether the request asks for JSON rather than a page.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

/// Whether a response is a page or JSON already.
fn rendered(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html") || t.starts_with("application/json"))
}

/// Writes every failure out: `{"error": "..."}` when the request accepts JSON, a page
/// otherwise. A request that matched no route gets a 404 that says so.
pub(crate) async fn render(request: Request, next: Next) -> Response {
    let json = wants_json(request.headers());
    let base = crate::guard::base_of(&request);
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    let failure = match response.extensions_mut().remove::<Failure>() {
        Some(failure) => failure,
        None if response.status() == StatusCode::METHOD_NOT_ALLOWED => Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("`{base}{path}` does not take this method"),
        ),
        // An extractor's rejection (a malformed query or form): its plain text says why.
        None if response.status().is_client_error() && !rendered(&response) => {
            let status = response.status();
            let body = std::mem::take(response.body_mut());
            let text = axum::body::to_bytes(body, 64 * 1024)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let text = if text.is_empty() {
                status.canonical_reason().unwrap_or("refused").to_owned()
            } else {
                text
            };
            Failure::new(status, text)
        }
        None => return response,
    };
    let mut out = if json {
        (
            failure.status,
            axum::Json(serde_json::json!({ "error": failure.message })),
        )
            .into_response()
    } else {
        let body = format!(
            "<section class=\"failure\"><h1>{} {}</h1><p id=\"reason\">{}</p><p><a href=\"{}\">Back to the overview</a></p></section>",
            failure.status.as_u16(),
            html::esc(failure.status.canonical_reason().unwrap_or("")),
            html::esc(&failure.message),
            html::esc(&html::home(&base)),
        );
        (
            failure.status,
            axum::response::Html(html::layout(&base, "Refused", &body, None)),
        )
            .into_response()
    };
    // Keep what the handler set (cookies), but not its empty body's length.
    for (name, value) in response.headers() {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}
