use inseam::prelude::*;

#[command_handler]
pub struct PlaceOrderHandler;

fn main() {}
