//! The shop's HTTP API (`cargo run -p shop -- serve`): place an order, read an order, list a
//! customer's orders, list, repair and retry dead letters, and the metrics as Prometheus text
//! (`GET /metrics`, once [`install_metrics`](crate::telemetry::install_metrics) installed
//! them). Every request runs in a span (`http_request`), the parent of the spans it causes. Bad input gets a 4xx with a JSON body
//! `{"error": "..."}` that says what was wrong, and nothing is written.
//!
//! [`router_with_admin`] adds inseam's admin page under `/admin`
//! ([`inseam::admin`]): changes there need the token of `SHOP_ADMIN_TOKEN`, typed into its
//! login form (`/admin/login`, which sets a cookie) or sent as `Authorization: Bearer <token>`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use inseam::admin::AdminOptions;
use inseam::sql::SqlStore;
use inseam::{App, DispatchError};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::orders::{CustomerOrders, GetOrder, OrderError, OrderLine, OrderSummary, PlaceOrder};

/// What the handlers share.
#[derive(Debug, Clone)]
struct Shop {
    app: App,
    store: SqlStore,
}

/// The API's routes over `app` and its `store`.
pub fn router(app: App, store: SqlStore) -> Router {
    Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/customers/{customer}/orders", get(customer_orders))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{id}/payload", put(repair_dead_letter))
        .route("/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(traced))
        .with_state(Shop { app, store })
}

/// The API's routes, and the admin page under `/admin`. With `admin_token`, whoever presents
/// it (at `/admin/login`, or as a bearer token) may retry, discard and repair dead letters and
/// pause groups; without, the admin page only reads.
pub fn router_with_admin(app: App, store: SqlStore, admin_token: Option<String>) -> Router {
    let options = AdminOptions::new().title("inseam shop");
    let options = match admin_token {
        Some(token) => options.token(token),
        None => options,
    };
    router(app.clone(), store.clone()).nest("/admin", inseam::admin::router(app, store, options))
}

/// Runs a request in a span of its own, which the spans of its commands and queries (and,
/// through the outbox, of their deliveries) are children of.
async fn traced(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        target: "shop::http",
        "http_request",
        otel.name = %format!("{} {}", request.method(), request.uri().path()),
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The metrics as Prometheus text, with the backlog gauges sampled now.
async fn metrics(State(shop): State<Shop>) -> Result<Response, ApiError> {
    let Some(handle) = crate::telemetry::metrics() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "metrics are off: the process did not install them".into(),
        ));
    };
    shop.store
        .record_gauges(&shop.app)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response())
}

/// An error as the API answers it.
#[derive(Debug)]
struct ApiError(StatusCode, String);

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError(rejection.status(), rejection.body_text())
    }
}

fn order_error(error: DispatchError<OrderError>) -> ApiError {
    let status = match error.handler_error() {
        Some(OrderError::NoLines | OrderError::InvalidQuantity { .. }) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        Some(OrderError::UnknownProduct(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        Some(OrderError::AlreadyPlaced(_)) => StatusCode::CONFLICT,
        Some(OrderError::NotFound(_)) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, error.to_string())
}

/// One line of an order as a client sends it; the quantity is signed so that a negative one
/// gets a clear message rather than a parse error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    quantity: i64,
}

/// An order as a client sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    order_id: String,
    customer: String,
    lines: Vec<LineBody>,
}

#[derive(Debug, Serialize)]
struct Placed {
    order_id: String,
    total_cents: u64,
}

async fn place_order(
    State(shop): State<Shop>,
    body: Result<Json<OrderBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Placed>), ApiError> {
    let Json(body) = body?;
    let unprocessable = |message: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, message);
    if body.order_id.trim().is_empty() {
        return Err(unprocessable("`order_id` must not be empty".into()));
    }
    if body.customer.trim().is_empty() {
        return Err(unprocessable("`customer` must not be empty".into()));
    }
    let mut lines = Vec::with_capacity(body.lines.len());
    for line in body.lines {
        let quantity = u32::try_from(line.quantity)
            .ok()
            .filter(|q| *q > 0)
            .ok_or_else(|| {
                unprocessable(format!(
                    "the quantity of `{}` must be at least 1, got {}",
                    line.sku, line.quantity
                ))
            })?;
        lines.push(OrderLine {
            sku: line.sku,
            quantity,
        });
    }
    let order_id = body.order_id.clone();
    let total_cents = shop
        .app
        .send(PlaceOrder {
            order_id: body.order_id,
            customer: body.customer,
            lines,
        })
        .await
        .map_err(order_error)?;
    Ok((
        StatusCode::CREATED,
        Json(Placed {
            order_id,
            total_cents,
        }),
    ))
}

async fn get_order(
    State(shop): State<Shop>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderSummary>, ApiError> {
    let query = shop.app.query(GetOrder { order_id });
    query.await.map(Json).map_err(order_error)
}

async fn customer_orders(
    State(shop): State<Shop>,
    Path(customer): Path<String>,
) -> Result<Json<Vec<OrderSummary>>, ApiError> {
    let query = shop.app.query(CustomerOrders { customer });
    query.await.map(Json).map_err(order_error)
}

#[derive(Debug, Serialize)]
struct Letter {
    id: i64,
    group: String,
    name: String,
    error: String,
    attempts: i64,
}

impl From<inseam::sql::DeadLetter> for Letter {
    fn from(letter: inseam::sql::DeadLetter) -> Self {
        Letter {
            id: letter.id,
            group: letter.group,
            name: letter.name,
            error: letter.error,
            attempts: letter.attempts,
        }
    }
}

async fn dead_letters(State(shop): State<Shop>) -> Result<Json<Vec<Letter>>, ApiError> {
    let letters = shop
        .store
        .dead_letters(0, 100)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(letters.into_iter().map(Letter::from).collect()))
}

fn dead_letter_error(error: inseam::sql::Error) -> ApiError {
    let status = match &error {
        inseam::sql::Error::DeadLetterNotFound { .. } => StatusCode::NOT_FOUND,
        inseam::sql::Error::RepairRefused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, error.to_string())
}

/// Replaces a dead letter's payload with the JSON body, if its group can read it; a retry
/// then delivers it.
async fn repair_dead_letter(
    State(shop): State<Shop>,
    Path(id): Path<i64>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<Letter>, ApiError> {
    let Json(payload) = body?;
    let payload = serde_json::to_vec(&payload)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let letter = shop
        .store
        .repair_dead_letter(&shop.app, id, payload)
        .await
        .map_err(dead_letter_error)?;
    Ok(Json(Letter::from(letter)))
}

async fn retry_dead_letter(
    State(shop): State<Shop>,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    shop.store
        .retry_dead_letter(id)
        .await
        .map_err(dead_letter_error)?;
    Ok(StatusCode::ACCEPTED)
}
