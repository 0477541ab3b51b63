use inseam::prelude::*;

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Orders.OrderPlaced")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders..shipped")]
pub struct OrderShipped {
    pub order_id: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = orders.order_cancelled)]
pub struct OrderCancelled {
    pub order_id: u64,
}

fn main() {}
