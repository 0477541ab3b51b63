use inseam::prelude::*;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event_handler(group = "inventory", retries = 3)]
async fn reserve_stock(_event: &OrderPlaced) {}

#[event_handler(inline = true)]
async fn notify_customer(_event: &OrderPlaced) {}

fn main() {}
