//! Shipping, against a fake carrier that can be told to refuse a customer's parcels.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use inseam::prelude::*;
use inseam::sql::sqlx;
use schemars::JsonSchema;

/// The fake carrier.
#[derive(Debug, Clone, Default)]
pub struct Carrier(Arc<Mutex<HashSet<String>>>);

impl Carrier {
    /// Refuses every parcel of `customer`.
    pub fn refuse(&self, customer: &str) -> &Self {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(customer.to_owned());
        self
    }

    fn accepts(&self, customer: &str) -> bool {
        !self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(customer)
    }
}

/// Ships an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Command)]
#[command(name = "shipping.create_shipment", error = ShippingError)]
pub struct CreateShipment {
    /// The order.
    pub order_id: String,
    /// Who receives it.
    pub customer: String,
}

/// An order's parcel is on its way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "shipping.shipment_created", key = order_id)]
pub struct ShipmentCreated {
    /// The order.
    pub order_id: String,
    /// The carrier's tracking number.
    pub tracking: String,
}

/// The carrier refused an order's parcel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Event)]
#[event(name = "shipping.shipment_failed", key = order_id)]
pub struct ShipmentFailed {
    /// The order.
    pub order_id: String,
}

/// Why a shipping operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[command_handler(publishes(ShipmentCreated, ShipmentFailed))]
async fn create_shipment(
    cmd: CreateShipment,
    ctx: &mut CommandContext<'_>,
    State(carrier): State<Carrier>,
) -> Result<(), ShippingError> {
    let order_id = cmd.order_id;
    if !carrier.accepts(&cmd.customer) {
        ctx.publish(ShipmentFailed { order_id });
        return Ok(());
    }
    let tracking = format!("TRK-{order_id}");
    sqlx::query("INSERT INTO shipping_shipments (order_id, tracking) VALUES ($1, $2)")
        .bind(order_id.clone())
        .bind(tracking.clone())
        .execute(ctx.tx().await?)
        .await?;
    ctx.publish(ShipmentCreated { order_id, tracking });
    Ok(())
}

/// The module's tables.
pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS shipping_shipments (
    order_id TEXT PRIMARY KEY, tracking TEXT NOT NULL)"];

/// Registers the module.
pub(crate) fn register(builder: inseam::AppBuilder, carrier: Carrier) -> inseam::AppBuilder {
    builder
        .state(carrier)
        .handler::<create_shipment>()
        .durable_command::<CreateShipment>()
}
