use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

// Taking the event by value clones it; take `&OrderPlaced` or derive `Clone`.
#[event_handler(group = "inventory")]
async fn reserve_stock(_event: OrderPlaced) {}

#[event_handler(group = "billing")]
async fn bill(_event: Envelope<OrderPlaced>) {}

fn main() {}
