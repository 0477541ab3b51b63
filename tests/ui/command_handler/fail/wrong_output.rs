use inseam::prelude::*;

#[derive(Debug, thiserror::Error)]
#[error("out of stock")]
pub struct OutOfStock;

#[derive(Command)]
#[command(output = u32, error = OutOfStock)]
pub struct PlaceOrder;

#[command_handler]
async fn place_order(_command: PlaceOrder) -> Result<u64, OutOfStock> {
    Ok(1)
}

fn main() {}
