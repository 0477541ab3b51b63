use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", key = order)]
pub struct OrderPlaced {
    pub order_id: u64,
    pub customer: String,
}

fn main() {}
