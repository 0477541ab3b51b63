use inseam::prelude::*;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event_handler(group = "inventory")]
async fn reserve_stock(_event: &OrderPlaced, _ctx: &mut CommandContext<'_>) {
    // The function is kept, so that its own mistakes are reported too.
    let _: u64 = "not a number";
}

#[event_handler(inline)]
async fn record_order(_event: &OrderPlaced, _ctx: &mut inseam::CommandContext<'_>) {}

#[event_handler(inline)]
async fn count_orders(_event: &OrderPlaced, _ctx: &QueryContext<'_>) {}

fn main() {}
