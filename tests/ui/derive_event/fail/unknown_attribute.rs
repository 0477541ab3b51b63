use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", topic = "orders")]
pub struct OrderPlaced {
    pub order_id: u64,
}

fn main() {}
