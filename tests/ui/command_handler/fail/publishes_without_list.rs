use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[derive(Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed")]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[command_handler(publishes = OrderPlaced)]
async fn place_order(_command: PlaceOrder) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
