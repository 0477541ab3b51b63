use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", key = order_id)]
pub struct OrderPlaced(pub u64);

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_changed", key = order_id)]
pub enum OrderChanged {
    Placed { order_id: u64 },
    Cancelled { order_id: u64 },
}

fn main() {}
