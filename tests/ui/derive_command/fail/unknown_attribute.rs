use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, eror = std::io::Error)]
pub struct PlaceOrder {
    pub customer: String,
}

fn main() {}
