use std::rc::Rc;

use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

async fn reserve() {}

#[command_handler]
async fn place_order(_command: PlaceOrder) -> Result<u64, std::io::Error> {
    let count = Rc::new(1);
    reserve().await;
    Ok(*count)
}

fn main() {}
