use inseam::prelude::*;

#[derive(Serialize, Deserialize)]
pub struct OrderId(u64);

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: OrderId,
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.order_noted", key = order_id)]
pub struct OrderNoted {
    pub order_id: Option<OrderId>,
}

fn main() {}
