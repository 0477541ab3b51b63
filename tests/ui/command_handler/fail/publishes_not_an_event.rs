use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[derive(Command)]
pub struct ReserveStock;

#[command_handler(publishes(ReserveStock))]
async fn place_order(_command: PlaceOrder) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
