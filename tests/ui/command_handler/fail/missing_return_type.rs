use inseam::prelude::*;

#[derive(Command)]
pub struct PlaceOrder;

#[command_handler]
async fn place_order(_command: PlaceOrder) {}

fn main() {}
