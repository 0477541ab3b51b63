use inseam::prelude::*;

#[derive(Query)]
#[query(output = Vec<u64>, cache = true)]
pub struct ListOrders;

fn main() {}
