use inseam::prelude::*;

#[derive(Command)]
#[command(output = u64, error = std::io::Error)]
pub struct PlaceOrder;

// Every problem is reported at once, and the function's own mistake too.
#[command_handler]
fn place_order(_command: &PlaceOrder, _ctx: &CommandContext<'_>) {
    let _: u64 = "not a number";
}

fn main() {}
