use inseam::prelude::*;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event_handler(inline)]
async fn reserve_stock(_event: &mut OrderPlaced, _ctx: &mut EventContext<'_>) {}

fn main() {}
