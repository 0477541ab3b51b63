use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[derive(EventSet)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    Shipped { order_id: u64 },
    Cancelled,
    Twice(OrderPlaced, OrderPlaced),
}

fn main() {}
