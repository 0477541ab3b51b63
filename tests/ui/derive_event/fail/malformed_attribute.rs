use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed" version = 2)]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_shipped", version, key = "order_id")]
pub struct OrderShipped {
    pub order_id: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event = "orders.order_cancelled"]
pub struct OrderCancelled {
    pub order_id: u64,
}

fn main() {}
