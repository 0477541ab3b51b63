use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

#[command_handler]
async fn place_order(
    _command: PlaceOrder,
    _ctx: &mut CommandContext<'_>,
    _other: &mut CommandContext<'_>,
) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
