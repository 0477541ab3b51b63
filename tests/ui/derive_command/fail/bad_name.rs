use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, name = "orders.PlaceOrder")]
pub struct PlaceOrder {
    pub customer: String,
}

fn main() {}
