use inseam::prelude::*;

#[command_handler]
async fn place_order() -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
