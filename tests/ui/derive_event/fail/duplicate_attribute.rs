use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 2)]
#[event(version = 3)]
pub struct OrderPlaced {
    pub order_id: u64,
}

fn main() {}
