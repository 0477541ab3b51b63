//! The order saga of the seeds, with fake inventory, payment and shipping services: reserve
//! stock → charge payment → create shipment → confirm, with release / refund / reject as
//! compensations and a payment timeout.
//!
//! The services are durable command handlers that answer with events; [`Faults`] makes a step
//! fail, or (payment) not answer at all. The saga records what it received and what it issued
//! in a [`Flow`], so the tests can pin each path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::prelude::*;
use inseam::{AppBuilder, BoxError, ManualClock};

macro_rules! order_messages {
    (commands: $($cmd:ident => $cname:literal),* ; events: $($ev:ident => $ename:literal),* $(,)?) => {
        $(
            #[doc = concat!("The command `", $cname, "`.")]
            #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
            #[command(name = $cname)]
            pub struct $cmd {
                /// The order.
                pub order: String,
            }
        )*
        $(
            #[doc = concat!("The event `", $ename, "`.")]
            #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
            #[event(name = $ename, key = order)]
            pub struct $ev {
                /// The order.
                pub order: String,
            }
        )*
    };
}

order_messages! {
    commands:
        ReserveStock => "inventory.reserve_stock",
        ReleaseStock => "inventory.release_stock",
        ChargePayment => "payments.charge",
        RefundPayment => "payments.refund",
        CreateShipment => "shipping.create_shipment",
        ConfirmOrder => "orders.confirm";
    events:
        OrderPlaced => "orders.placed",
        StockReserved => "inventory.stock_reserved",
        StockUnavailable => "inventory.stock_unavailable",
        StockReleased => "inventory.stock_released",
        PaymentCharged => "payments.charged",
        PaymentDeclined => "payments.declined",
        PaymentRefunded => "payments.refunded",
        ShipmentCreated => "shipping.shipment_created",
        ShipmentFailed => "shipping.shipment_failed",
        OrderConfirmed => "orders.confirmed",
        OrderRejected => "orders.rejected",
}

/// Rejects an order, saying why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(name = "orders.reject")]
pub struct RejectOrder {
    /// The order.
    pub order: String,
    /// Why.
    pub reason: String,
}

/// Places an order: publishes `OrderPlaced`, which starts the saga.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "orders.place")]
pub struct PlaceOrder {
    /// The order.
    pub order: String,
}

/// Which step fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Faults {
    /// Nothing fails.
    #[default]
    None,
    /// Out of stock.
    Stock,
    /// The payment is declined.
    Payment,
    /// The payment gateway never answers.
    PaymentTimeout,
    /// Shipping fails.
    Shipping,
}

/// What the saga received (`←`) and issued (`→`), in order.
#[derive(Debug, Clone, Default)]
pub struct Flow(Arc<Mutex<Vec<String>>>);

impl Flow {
    fn record(&self, line: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    /// The flow so far, one line per step.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The payment timeout.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The events the order saga reacts to.
#[derive(Debug, Clone, PartialEq, EventSet)]
pub enum OrderFlow {
    /// Starts the saga.
    Placed(OrderPlaced),
    /// See [`StockReserved`].
    StockReserved(StockReserved),
    /// See [`StockUnavailable`].
    StockUnavailable(StockUnavailable),
    /// See [`PaymentCharged`].
    PaymentCharged(PaymentCharged),
    /// See [`PaymentDeclined`].
    PaymentDeclined(PaymentDeclined),
    /// See [`ShipmentCreated`].
    ShipmentCreated(ShipmentCreated),
    /// See [`ShipmentFailed`].
    ShipmentFailed(ShipmentFailed),
    /// Ends it.
    Confirmed(OrderConfirmed),
    /// Ends it.
    Rejected(OrderRejected),
}

/// The order saga's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OrderSaga {
    order: String,
    paid: bool,
    compensations: Compensations,
}

fn flow(ctx: &SagaContext<'_, '_>) -> Flow {
    ctx.app().state::<Flow>().cloned().unwrap_or_default()
}

impl OrderSaga {
    async fn issue<C: Command + Serialize>(
        &mut self,
        ctx: &mut SagaContext<'_, '_>,
        command: C,
    ) -> Result<(), BoxError> {
        flow(ctx).record(format!("→ {}", C::NAME));
        ctx.dispatch(command).await?;
        Ok(())
    }

    async fn fail(&mut self, ctx: &mut SagaContext<'_, '_>, reason: &str) -> Result<(), BoxError> {
        for name in self.compensations.names().iter().rev() {
            flow(ctx).record(format!("→ {name} (compensation)"));
        }
        ctx.compensate(&mut self.compensations).await?;
        let order = self.order.clone();
        self.issue(
            ctx,
            RejectOrder {
                order,
                reason: reason.to_owned(),
            },
        )
        .await
    }
}

impl Saga for OrderSaga {
    const NAME: &'static str = "order_saga";
    type Event = OrderFlow;

    fn starts(event: &OrderFlow) -> bool {
        matches!(event, OrderFlow::Placed(_))
    }

    async fn handle(
        &mut self,
        event: &OrderFlow,
        ctx: &mut SagaContext<'_, '_>,
    ) -> Result<(), BoxError> {
        let name = match event {
            OrderFlow::Placed(_) => "orders.placed",
            OrderFlow::StockReserved(_) => "inventory.stock_reserved",
            OrderFlow::StockUnavailable(_) => "inventory.stock_unavailable",
            OrderFlow::PaymentCharged(_) => "payments.charged",
            OrderFlow::PaymentDeclined(_) => "payments.declined",
            OrderFlow::ShipmentCreated(_) => "shipping.shipment_created",
            OrderFlow::ShipmentFailed(_) => "shipping.shipment_failed",
            OrderFlow::Confirmed(_) => "orders.confirmed",
            OrderFlow::Rejected(_) => "orders.rejected",
        };
        flow(ctx).record(format!("← {name}"));
        let order = self.order.clone();
        match event {
            OrderFlow::Placed(placed) => {
                self.order = placed.order.clone();
                let order = self.order.clone();
                self.issue(ctx, ReserveStock { order }).await?;
            }
            OrderFlow::StockReserved(_) => {
                self.compensations.push(&ReleaseStock {
                    order: order.clone(),
                })?;
                self.issue(ctx, ChargePayment { order }).await?;
                let at = ctx.now() + PAYMENT_TIMEOUT;
                ctx.timeout("payment", at).await?;
                flow(ctx).record("⏲ payment timeout set".to_owned());
            }
            OrderFlow::StockUnavailable(_) => self.fail(ctx, "out of stock").await?,
            OrderFlow::PaymentCharged(_) => {
                self.paid = true;
                self.compensations.push(&RefundPayment {
                    order: order.clone(),
                })?;
                self.issue(ctx, CreateShipment { order }).await?;
            }
            OrderFlow::PaymentDeclined(_) => {
                self.paid = true;
                self.fail(ctx, "payment declined").await?;
            }
            OrderFlow::ShipmentCreated(_) => self.issue(ctx, ConfirmOrder { order }).await?,
            OrderFlow::ShipmentFailed(_) => self.fail(ctx, "shipping failed").await?,
            OrderFlow::Confirmed(_) | OrderFlow::Rejected(_) => {
                ctx.complete();
                flow(ctx).record("✓ saga complete".to_owned());
            }
        }
        Ok(())
    }

    async fn timeout(&mut self, name: &str, ctx: &mut SagaContext<'_, '_>) -> Result<(), BoxError> {
        flow(ctx).record(format!("⏲ {name} timeout fired"));
        if name == "payment" && !self.paid {
            self.paid = true;
            self.fail(ctx, "payment timed out").await?;
        }
        Ok(())
    }
}

#[command_handler]
async fn place_order(
    cmd: PlaceOrder,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    ctx.publish(OrderPlaced { order: cmd.order });
    Ok(())
}

#[command_handler]
async fn reserve_stock(
    cmd: ReserveStock,
    ctx: &mut CommandContext<'_>,
    State(faults): State<Faults>,
) -> Result<(), std::convert::Infallible> {
    let order = cmd.order;
    if faults == Faults::Stock {
        ctx.publish(StockUnavailable { order });
    } else {
        ctx.publish(StockReserved { order });
    }
    Ok(())
}

#[command_handler]
async fn release_stock(
    cmd: ReleaseStock,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    ctx.publish(StockReleased { order: cmd.order });
    Ok(())
}

#[command_handler]
async fn charge_payment(
    cmd: ChargePayment,
    ctx: &mut CommandContext<'_>,
    State(faults): State<Faults>,
) -> Result<(), std::convert::Infallible> {
    let order = cmd.order;
    match faults {
        Faults::Payment => ctx.publish(PaymentDeclined { order }),
        Faults::PaymentTimeout => {}
        _ => ctx.publish(PaymentCharged { order }),
    }
    Ok(())
}

#[command_handler]
async fn refund_payment(
    cmd: RefundPayment,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    ctx.publish(PaymentRefunded { order: cmd.order });
    Ok(())
}

#[command_handler]
async fn create_shipment(
    cmd: CreateShipment,
    ctx: &mut CommandContext<'_>,
    State(faults): State<Faults>,
) -> Result<(), std::convert::Infallible> {
    let order = cmd.order;
    if faults == Faults::Shipping {
        ctx.publish(ShipmentFailed { order });
    } else {
        ctx.publish(ShipmentCreated { order });
    }
    Ok(())
}

#[command_handler]
async fn confirm_order(
    cmd: ConfirmOrder,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    ctx.publish(OrderConfirmed { order: cmd.order });
    Ok(())
}

#[command_handler]
async fn reject_order(
    cmd: RejectOrder,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    ctx.publish(OrderRejected { order: cmd.order });
    Ok(())
}

/// The order app on `store`: the services, the saga, a manual clock.
pub fn builder(store: SqlStore, faults: Faults, flow: Flow, clock: ManualClock) -> AppBuilder {
    App::builder()
        .store(store)
        .clock(clock)
        .state(faults)
        .state(flow)
        .handler::<place_order>()
        .handler::<reserve_stock>()
        .handler::<release_stock>()
        .handler::<charge_payment>()
        .handler::<refund_payment>()
        .handler::<create_shipment>()
        .handler::<confirm_order>()
        .handler::<reject_order>()
        .durable_command::<ReserveStock>()
        .durable_command::<ReleaseStock>()
        .durable_command::<ChargePayment>()
        .durable_command::<RefundPayment>()
        .durable_command::<CreateShipment>()
        .durable_command::<ConfirmOrder>()
        .durable_command::<RejectOrder>()
        .saga::<OrderSaga>()
}

/// What the notifications module sent: choreography, a plain subscriber reacting to the
/// order's outcome, next to the saga.
#[derive(Debug, Clone, Default)]
pub struct Outbox(Arc<Mutex<Vec<String>>>);

impl Outbox {
    /// The messages sent, in order.
    pub fn sent(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[event_handler(group = "notifications")]
async fn notify_confirmed(ev: &Envelope<OrderConfirmed>, State(outbox): State<Outbox>) {
    outbox
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("order {} confirmed", ev.order));
}

#[event_handler(group = "notifications")]
async fn notify_rejected(ev: &Envelope<OrderRejected>, State(outbox): State<Outbox>) {
    outbox
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("order {} rejected", ev.order));
}

/// [`builder`] with the notifications module subscribed.
pub fn with_notifications(builder: AppBuilder, outbox: Outbox) -> AppBuilder {
    builder
        .state(outbox)
        .handler::<notify_confirmed>()
        .handler::<notify_rejected>()
}
