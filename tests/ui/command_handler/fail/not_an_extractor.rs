use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

pub struct Database;

#[command_handler]
async fn place_order(_command: PlaceOrder, _db: Database) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
