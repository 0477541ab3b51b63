use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[command_handler(name = "orders.place_order")]
async fn place_order(_command: PlaceOrder) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
