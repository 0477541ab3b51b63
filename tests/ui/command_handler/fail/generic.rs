use inseam::prelude::*;

#[command_handler]
async fn place_order<C: Command>(_command: C) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {}
