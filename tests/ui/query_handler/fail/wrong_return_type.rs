use inseam::prelude::*;

#[derive(Query)]
#[query(output = u64, error = std::io::Error)]
pub struct CountOrders;

#[query_handler]
async fn count_orders(_query: CountOrders) -> Option<u64> {
    Some(1)
}

fn main() {}
