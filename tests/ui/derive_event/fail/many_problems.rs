use inseam::prelude::*;

// Every problem is reported at once, each at its own token.
#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders-placed", version = 0, key = id, partition = 3, version = 2)]
pub struct OrderPlaced {
    pub order_id: u64,
}

fn main() {}
