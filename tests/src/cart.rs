//! A shopping cart, event-sourced: the aggregate the event-sourcing tests and benches share.
//!
//! `ItemAdded` is at version 2: version 1 called the quantity `quantity` and had no unit price;
//! the upcaster [`item_added_v1_to_v2`] reads stored v1 payloads as v2.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use inseam::prelude::*;
use inseam::{AppBuilder, BoxError};
use tokio::sync::Notify;

/// Items were added to a cart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "cart.item_added", version = 2)]
pub struct ItemAdded {
    /// The product.
    pub sku: String,
    /// How many.
    pub qty: u32,
    /// The unit price in cents (0 for v1 events, which had none).
    pub unit_price: u64,
}

/// An item was removed from a cart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "cart.item_removed")]
pub struct ItemRemoved {
    /// The product.
    pub sku: String,
}

/// The cart was checked out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "cart.checked_out")]
pub struct CheckedOut {
    /// The total in cents.
    pub total: u64,
}

/// The cart's events.
#[derive(Debug, Clone, PartialEq, EventSet)]
pub enum CartEvent {
    /// See [`ItemAdded`].
    Added(ItemAdded),
    /// See [`ItemRemoved`].
    Removed(ItemRemoved),
    /// See [`CheckedOut`].
    CheckedOut(CheckedOut),
}

/// A cart's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    /// Quantity and unit price per product.
    pub items: BTreeMap<String, (u32, u64)>,
    /// Checked out: no more changes.
    pub checked_out: bool,
    /// Every event applied.
    pub events: u64,
}

impl Cart {
    /// The total in cents.
    pub fn total(&self) -> u64 {
        self.items
            .values()
            .map(|(qty, price)| u64::from(*qty) * price)
            .sum()
    }
}

impl Aggregate for Cart {
    const TYPE: &'static str = "cart";
    const SNAPSHOT_EVERY: u64 = 100;
    type Event = CartEvent;

    fn apply(&mut self, event: &CartEvent) {
        self.events += 1;
        match event {
            CartEvent::Added(added) => {
                let item = self
                    .items
                    .entry(added.sku.clone())
                    .or_insert((0, added.unit_price));
                item.0 += added.qty;
                item.1 = added.unit_price;
            }
            CartEvent::Removed(removed) => {
                self.items.remove(&removed.sku);
            }
            CartEvent::CheckedOut(_) => self.checked_out = true,
        }
    }
}

/// Why a cart command failed.
#[derive(Debug, thiserror::Error)]
pub enum CartError {
    /// A checked-out cart does not change.
    #[error("cart `{0}` is checked out")]
    CheckedOut(String),
    /// Nothing to check out.
    #[error("cart `{0}` is empty")]
    Empty(String),
    /// Loading or saving the cart failed.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
}

/// Adds `count` items, one `ItemAdded` event each.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(output = u64, error = CartError, name = "cart.add_items")]
pub struct AddItems {
    /// The cart.
    pub cart: String,
    /// The product.
    pub sku: String,
    /// How many events to emit.
    pub count: u32,
}

/// Checks the cart out.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(output = u64, error = CartError, name = "cart.check_out")]
pub struct CheckOut {
    /// The cart.
    pub cart: String,
}

/// Holds every handler until `expected` of them arrived, then lets everyone through: forces
/// concurrent commands to load the same version.
#[derive(Debug, Clone, Default)]
pub struct Gate(Option<Arc<(AtomicUsize, usize, Notify)>>);

impl Gate {
    /// A gate that opens when `expected` handlers are waiting at it.
    pub fn new(expected: usize) -> Self {
        Gate(Some(Arc::new((
            AtomicUsize::new(0),
            expected,
            Notify::new(),
        ))))
    }

    async fn pass(&self) {
        let Some(gate) = &self.0 else { return };
        let (arrived, expected, notify) = &**gate;
        let waiting = notify.notified();
        if arrived.fetch_add(1, Ordering::SeqCst) + 1 >= *expected {
            notify.notify_waiters();
            return;
        }
        waiting.await;
    }
}

#[command_handler]
async fn add_items(
    cmd: AddItems,
    ctx: &mut CommandContext<'_>,
    State(gate): State<Gate>,
) -> Result<u64, CartError> {
    let mut cart = ctx.load::<Cart>(&cmd.cart).await?;
    gate.pass().await;
    if cart.checked_out {
        return Err(CartError::CheckedOut(cmd.cart));
    }
    for _ in 0..cmd.count {
        cart.emit(ItemAdded {
            sku: cmd.sku.clone(),
            qty: 1,
            unit_price: 250,
        });
    }
    Ok(ctx.save(cart).await?)
}

#[command_handler]
async fn check_out(cmd: CheckOut, ctx: &mut CommandContext<'_>) -> Result<u64, CartError> {
    let mut cart = ctx.load::<Cart>(&cmd.cart).await?;
    if cart.checked_out {
        return Err(CartError::CheckedOut(cmd.cart));
    }
    if cart.items.is_empty() {
        return Err(CartError::Empty(cmd.cart));
    }
    let total = cart.total();
    cart.emit(CheckedOut { total });
    ctx.save(cart).await?;
    Ok(total)
}

/// Reads a stored v1 `cart.item_added` (`{"sku", "quantity"}`) as v2.
pub fn item_added_v1_to_v2(mut v1: serde_json::Value) -> Result<serde_json::Value, BoxError> {
    let object = v1
        .as_object_mut()
        .ok_or("cart.item_added v1 payload is not an object")?;
    let quantity = object
        .remove("quantity")
        .ok_or("cart.item_added v1 payload has no `quantity`")?;
    object.insert("qty".into(), quantity);
    object.insert("unit_price".into(), 0.into());
    Ok(v1)
}

/// The cart app's builder on `store`: handlers, the aggregate and its upcaster.
pub fn builder(store: SqlStore, gate: Gate) -> AppBuilder {
    App::builder()
        .store(store)
        .state(gate)
        .handler::<add_items>()
        .handler::<check_out>()
        .aggregate::<Cart>()
        .upcaster("cart.item_added", 1, item_added_v1_to_v2)
}
