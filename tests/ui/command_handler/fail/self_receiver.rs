use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

pub struct Orders;

impl Orders {
    #[command_handler]
    async fn place_order(&self, _command: PlaceOrder) -> Result<u64, std::io::Error> {
        Ok(1)
    }
}

fn main() {}
