use inseam::prelude::*;

#[derive(Debug, thiserror::Error)]
#[error("no such order")]
pub struct NoSuchOrder;

#[derive(Query)]
#[query(output = u32, error = NoSuchOrder)]
pub struct CountItems;

#[query_handler]
async fn count_items(_query: CountItems) -> Result<u64, NoSuchOrder> {
    Ok(1)
}

fn main() {}
