//! One shopping cart written twice, for inseam and for cqrs-es, with the same semantics: an
//! `AddItem` command loads the cart from its events, refuses a checked-out cart, and records one
//! `ItemAdded` event. Neither side takes snapshots.
//!
//! The benchmark in `benches/es_commands.rs` sends the same commands to both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A cart's state, folded the same way on both sides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CartState {
    /// Quantity and unit price (cents) per product.
    pub items: BTreeMap<String, (u32, u64)>,
    /// Checked out: no more changes.
    pub checked_out: bool,
}

impl CartState {
    fn add(&mut self, sku: &str, qty: u32, unit_price: u64) {
        let item = self.items.entry(sku.to_owned()).or_insert((0, unit_price));
        item.0 += qty;
        item.1 = unit_price;
    }
}

/// The cart on inseam: `ctx.load`, `emit`, `ctx.save` in a command handler; the event is
/// appended to the stream `cart-<id>` as an outbox row in the command's transaction.
pub mod on_inseam {
    use inseam::AppBuilder;
    use inseam::prelude::*;

    use super::CartState;

    /// Items were added to a cart.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(name = "cart.item_added")]
    pub struct ItemAdded {
        /// The product.
        pub sku: String,
        /// How many.
        pub qty: u32,
        /// The unit price in cents.
        pub unit_price: u64,
    }

    /// The cart's events.
    #[derive(Debug, Clone, PartialEq, EventSet)]
    pub enum CartEvent {
        /// See [`ItemAdded`].
        Added(ItemAdded),
    }

    /// The cart aggregate.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct Cart(pub CartState);

    impl Aggregate for Cart {
        const TYPE: &'static str = "cart";
        // No snapshots, as on the cqrs-es side (`PersistedEventStore::new_event_store`).
        const SNAPSHOT_EVERY: u64 = 0;
        type Event = CartEvent;

        fn apply(&mut self, event: &CartEvent) {
            match event {
                CartEvent::Added(added) => self.0.add(&added.sku, added.qty, added.unit_price),
            }
        }
    }

    /// Why adding an item failed.
    #[derive(Debug, thiserror::Error)]
    pub enum CartError {
        /// A checked-out cart does not change.
        #[error("cart `{0}` is checked out")]
        CheckedOut(String),
        /// Loading or saving the cart failed.
        #[error(transparent)]
        Aggregate(#[from] AggregateError),
    }

    /// Adds one item to a cart; returns the cart's new version.
    #[derive(Debug, Clone, Serialize, Deserialize, Command)]
    #[command(output = u64, error = CartError, name = "cart.add_item")]
    pub struct AddItem {
        /// The cart.
        pub cart: String,
        /// The product.
        pub sku: String,
        /// How many.
        pub qty: u32,
        /// The unit price in cents.
        pub unit_price: u64,
    }

    #[command_handler]
    async fn add_item(cmd: AddItem, ctx: &mut CommandContext<'_>) -> Result<u64, CartError> {
        let mut cart = ctx.load::<Cart>(&cmd.cart).await?;
        if cart.0.checked_out {
            return Err(CartError::CheckedOut(cmd.cart));
        }
        cart.emit(ItemAdded {
            sku: cmd.sku,
            qty: cmd.qty,
            unit_price: cmd.unit_price,
        });
        Ok(ctx.save(cart).await?)
    }

    /// A durable subscriber of `ItemAdded` in group `cart_projection`: with it, each event's
    /// outbox row also names the group, which reads it by position.
    #[event_handler(group = "cart_projection")]
    async fn project(_added: &Envelope<ItemAdded>) {}

    /// The cart app on `store`, with no subscriber: each command appends one outbox row.
    pub fn app(store: SqlStore) -> AppBuilder {
        App::builder()
            .store(store)
            .handler::<add_item>()
            .aggregate::<Cart>()
    }

    /// The cart app keeping the last committed state of up to `capacity` carts in memory
    /// (`cache_aggregate`): a command on a cart this app saved reads nothing.
    pub fn app_cached(store: SqlStore, capacity: usize) -> AppBuilder {
        app(store).cache_aggregate::<Cart>(capacity)
    }

    /// The cart app with one durable group subscribed to `ItemAdded`.
    pub fn app_with_subscriber(store: SqlStore) -> AppBuilder {
        app(store).handler::<project>()
    }
}

/// The cart on cqrs-es: `Aggregate::handle` writes the event to the sink; `postgres-es` stores
/// it in the `events` table.
pub mod on_cqrs_es {
    use cqrs_es::event_sink::EventSink;
    use cqrs_es::{Aggregate, DomainEvent};
    use postgres_es::PostgresCqrs;
    use serde::{Deserialize, Serialize};

    use super::CartState;

    /// The `events` table of postgres-es (its `db/init.sql`); snapshots are not used.
    pub const SCHEMA: &str = "CREATE TABLE events (
        aggregate_type text NOT NULL,
        aggregate_id text NOT NULL,
        sequence bigint CHECK (sequence >= 0) NOT NULL,
        event_type text NOT NULL,
        event_version text NOT NULL,
        payload json NOT NULL,
        metadata json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, sequence)
    )";

    /// The cart's commands.
    #[derive(Debug, Clone)]
    pub enum CartCommand {
        /// Adds one item.
        AddItem {
            /// The product.
            sku: String,
            /// How many.
            qty: u32,
            /// The unit price in cents.
            unit_price: u64,
        },
    }

    /// The cart's events.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum CartEvent {
        /// Items were added.
        ItemAdded {
            /// The product.
            sku: String,
            /// How many.
            qty: u32,
            /// The unit price in cents.
            unit_price: u64,
        },
    }

    impl DomainEvent for CartEvent {
        fn event_type(&self) -> String {
            match self {
                CartEvent::ItemAdded { .. } => "ItemAdded".to_owned(),
            }
        }

        fn event_version(&self) -> String {
            "1".to_owned()
        }
    }

    /// Why adding an item failed.
    #[derive(Debug, thiserror::Error)]
    pub enum CartError {
        /// A checked-out cart does not change.
        #[error("the cart is checked out")]
        CheckedOut,
    }

    /// The cart aggregate.
    #[derive(Debug, Default, Serialize, Deserialize)]
    pub struct Cart(pub CartState);

    impl Aggregate for Cart {
        const TYPE: &'static str = "cart";
        type Command = CartCommand;
        type Event = CartEvent;
        type Error = CartError;
        type Services = ();

        async fn handle(
            &mut self,
            command: CartCommand,
            _services: &(),
            sink: &EventSink<Self>,
        ) -> Result<(), CartError> {
            if self.0.checked_out {
                return Err(CartError::CheckedOut);
            }
            let CartCommand::AddItem {
                sku,
                qty,
                unit_price,
            } = command;
            sink.write(
                CartEvent::ItemAdded {
                    sku,
                    qty,
                    unit_price,
                },
                self,
            )
            .await;
            Ok(())
        }

        fn apply(&mut self, event: CartEvent) {
            match event {
                CartEvent::ItemAdded {
                    sku,
                    qty,
                    unit_price,
                } => self.0.add(&sku, qty, unit_price),
            }
        }
    }

    /// cqrs-es on the PostgreSQL database at `url`: postgres-es's default pool (10
    /// connections), the event store without snapshots, no query processors.
    pub async fn framework(url: &str) -> PostgresCqrs<Cart> {
        let pool = postgres_es::default_postgress_pool(url).await;
        postgres_es::postgres_cqrs(pool, Vec::new(), ())
    }
}
