use inseam::prelude::*;

#[derive(EventSet)]
pub struct OrderEvents {
    pub placed: u64,
}

fn main() {}
