use inseam::prelude::*;

#[derive(Query)]
#[query(output = u64, error = std::io::Error)]
pub struct CountOrders;

#[query_handler]
async fn count_orders(
    _query: CountOrders,
    _ctx: &mut CommandContext<'_>,
) -> Result<u64, std::io::Error> {
    Ok(1)
}

#[derive(Query)]
#[query(output = u64, error = std::io::Error)]
pub struct CountItems;

#[query_handler]
async fn count_items(_query: CountItems, _ctx: &EventContext<'_>) -> Result<u64, std::io::Error> {
    Ok(1)
}

fn main() {}
