use inseam::prelude::*;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event_handler(group = "inventory", sends(OrderPlaced))]
async fn reserve_stock(_event: &OrderPlaced) {}

fn main() {}
