use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(version = 2)]
pub struct OrderShipped {
    pub order_id: u64,
}

fn main() {}
