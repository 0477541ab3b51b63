use inseam::prelude::*;

pub struct PlaceOrder;

#[command_handler]
async fn place_order(_command: PlaceOrder) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
