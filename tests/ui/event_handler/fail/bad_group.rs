use inseam::prelude::*;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event_handler(group = "Inventory Service")]
async fn reserve_stock(_event: &OrderPlaced) {}

#[event_handler(group = "")]
async fn notify_customer(_event: &OrderPlaced) {}

#[event_handler(group = inventory)]
async fn audit(_event: &OrderPlaced) {}

fn main() {}
