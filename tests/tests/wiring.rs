//! `build()` validates the wiring and reports every problem at once, naming the message types
//! and the handlers involved.
//!
//! This test binary deliberately contains broken wiring, so `discover()` here finds it all.

use inseam::prelude::*;
use inseam::{BuildError, WiringProblem};

#[derive(Debug, Command)]
#[command(output = ())]
struct Ship;

#[derive(Debug, Command)]
struct Forgotten;

#[derive(Debug, Query)]
#[query(output = u32)]
struct CountParcels;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "shipping.parcel_sent", version = 2)]
struct ParcelSent;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "shipping.parcel_sent", version = 2)]
struct ParcelDispatched;

#[derive(Debug, Clone)]
struct Carrier;

#[command_handler]
async fn ship(_: Ship) -> Result<(), std::convert::Infallible> {
    Ok(())
}

#[command_handler]
async fn ship_again(_: Ship) -> Result<(), std::convert::Infallible> {
    Ok(())
}

#[query_handler]
async fn count_parcels(
    _: CountParcels,
    State(_carrier): State<Carrier>,
) -> Result<u32, std::convert::Infallible> {
    Ok(0)
}

#[event_handler(group = "billing")]
async fn bill(_: &ParcelSent) {}

#[event_handler(group = "billing")]
async fn bill_twice(_: &ParcelSent) {}

#[tokio::test]
async fn explicit_registration_reports_every_problem_at_once() {
    let error = App::builder()
        .handler::<ship>()
        .handler::<ship_again>()
        .handler::<count_parcels>()
        .handler::<bill>()
        .handler::<bill_twice>()
        .expect_command::<Forgotten>()
        .event::<ParcelDispatched>()
        .build()
        .await
        .expect_err("the wiring is broken");

    assert_eq!(
        error.to_string(),
        "the app has 5 wiring problems:
  1. command `wiring::Forgotten` has no handler; add #[command_handler] to an async fn that takes it
  2. command `wiring::Ship` has 2 handlers (`wiring::ship`, `wiring::ship_again`); a command has exactly one handler
  3. handler `wiring::count_parcels` for `wiring::CountParcels` extracts state `wiring::Carrier`, which was never provided; add `.state(..)` with a `wiring::Carrier` to the builder
  4. event name `shipping.parcel_sent` version 2 is used by 2 types (`wiring::ParcelDispatched`, `wiring::ParcelSent`); give each its own #[event(name = \"...\")]
  5. group `billing` has 2 subscribers for event `shipping.parcel_sent` (`wiring::bill`, `wiring::bill_twice`); a group handles an event in one subscriber"
    );
    let BuildError::Wiring(problems) = error else {
        unreachable!("one variant")
    };
    assert!(problems.contains(&WiringProblem::DuplicateHandlers {
        kind: inseam::MessageKind::Command,
        message: "wiring::Ship",
        handlers: vec!["wiring::ship", "wiring::ship_again"],
    }));
}

#[tokio::test]
async fn discover_finds_declared_messages_without_handlers() {
    // Every derive declares its message: Forgotten has no handler anywhere in this binary.
    let error = App::builder()
        .discover()
        .state(Carrier)
        .build()
        .await
        .expect_err("broken");
    let problems = error.problems();
    assert!(problems.contains(&WiringProblem::NoHandler {
        kind: inseam::MessageKind::Command,
        message: "wiring::Forgotten",
    }));
    assert!(problems.iter().any(|p| matches!(
        p,
        WiringProblem::DuplicateHandlers {
            message: "wiring::Ship",
            ..
        }
    )));
    assert!(problems.iter().any(|p| matches!(
        p,
        WiringProblem::EventNameClash {
            name: "shipping.parcel_sent",
            ..
        }
    )));
    assert!(
        !problems
            .iter()
            .any(|p| matches!(p, WiringProblem::MissingState { .. })),
        "Carrier was provided"
    );
    assert_eq!(problems.len(), 4, "{error}");
}

#[tokio::test]
async fn the_same_handler_registered_twice_is_one_handler() {
    let app = App::builder()
        .handler::<ship>()
        .handler::<ship>()
        .build()
        .await
        .expect("registering a handler twice is harmless");
    app.send(Ship).await.expect("shipped");
}

#[test]
fn building_outside_a_runtime_is_a_wiring_problem() {
    let future = App::builder().handler::<ship>().build();
    let error = futures_lite_block_on(future).expect_err("no runtime");
    assert_eq!(error.problems(), &[WiringProblem::NoRuntime]);
}

/// Polls a future to completion without a tokio runtime.
fn futures_lite_block_on<F: Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}
