//! The catalog: products and their prices. Other modules ask for prices with [`GetProducts`];
//! nobody else touches `catalog_products`.

use inseam::prelude::*;
use inseam::sql::SqlPool;
use inseam::sql::sqlx::{self, Row as _};

/// A product for sale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// The stock keeping unit.
    pub sku: String,
    /// What it is.
    pub name: String,
    /// Its price in cents.
    pub price_cents: u64,
}

/// Adds a product, or updates its name and price.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "catalog.add_product", error = CatalogError)]
pub struct AddProduct {
    /// The product.
    pub product: Product,
}

/// The products with these SKUs that exist (unknown SKUs are left out).
#[derive(Debug, Clone, Query)]
#[query(name = "catalog.get_products", output = Vec<Product>, error = CatalogError)]
pub struct GetProducts {
    /// The SKUs asked for.
    pub skus: Vec<String>,
}

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[command_handler]
async fn add_product(cmd: AddProduct, ctx: &mut CommandContext<'_>) -> Result<(), CatalogError> {
    let price = i64::try_from(cmd.product.price_cents).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO catalog_products (sku, name, price_cents) VALUES ($1, $2, $3)
         ON CONFLICT (sku) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents",
    )
    .bind(cmd.product.sku)
    .bind(cmd.product.name)
    .bind(price)
    .execute(ctx.tx().await?)
    .await?;
    Ok(())
}

#[query_handler]
async fn get_products(
    query: GetProducts,
    State(pool): State<SqlPool>,
) -> Result<Vec<Product>, CatalogError> {
    let mut products = Vec::with_capacity(query.skus.len());
    // One lookup per SKU: an order has few lines, and the SQL stays portable.
    for sku in query.skus {
        let row = sqlx::query("SELECT name, price_cents FROM catalog_products WHERE sku = $1")
            .bind(sku.clone())
            .fetch_optional(&pool)
            .await?;
        if let Some(row) = row {
            products.push(Product {
                sku,
                name: row.try_get(0)?,
                price_cents: u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or_default(),
            });
        }
    }
    Ok(products)
}

/// The module's tables.
pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS catalog_products (
    sku TEXT PRIMARY KEY, name TEXT NOT NULL, price_cents BIGINT NOT NULL)"];

/// Registers the module.
pub(crate) fn register(builder: inseam::AppBuilder) -> inseam::AppBuilder {
    builder.handler::<add_product>().handler::<get_products>()
}
