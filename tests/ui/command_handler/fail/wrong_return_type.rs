use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[command_handler]
async fn place_order(_command: PlaceOrder) -> Option<u64> {
    Some(1)
}

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct CancelOrder;

#[command_handler]
async fn cancel_order(_command: CancelOrder) -> Result<String, std::io::Error> {
    Ok(String::new())
}

fn main() {}
