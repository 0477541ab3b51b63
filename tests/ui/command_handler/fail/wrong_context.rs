use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[command_handler]
async fn place_order(
    _command: PlaceOrder,
    _ctx: &mut EventContext<'_>,
) -> Result<u64, std::io::Error> {
    Ok(1)
}

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct CancelOrder;

#[command_handler]
async fn cancel_order(
    _command: CancelOrder,
    _ctx: &QueryContext<'_>,
) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
