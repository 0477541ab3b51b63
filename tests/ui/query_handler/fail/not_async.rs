use inseam::prelude::*;

#[derive(Query)]
#[query(output = u64, error = std::io::Error)]
pub struct CountOrders;

#[query_handler]
fn count_orders(_query: CountOrders, _ctx: &QueryContext<'_>) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
