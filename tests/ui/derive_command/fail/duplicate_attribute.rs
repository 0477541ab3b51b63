use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error, output = String)]
pub struct PlaceOrder {
    pub customer: String,
}

fn main() {}
