//! A plain loop of `send`s (or direct calls, or the same handler through a peer) of the trivial
//! handler of the dispatch benchmark, for instruction counts without criterion around it:
//!
//! ```sh
//! cargo build --profile bench -p inseam-benches --example send_loop
//! valgrind --tool=callgrind target/release/examples/send_loop 200000
//! valgrind --tool=callgrind target/release/examples/send_loop 200000 direct
//! valgrind --tool=callgrind target/release/examples/send_loop 200000 tower
//! valgrind --tool=callgrind target/release/examples/send_loop 200000 mediator
//! ```

use std::convert::Infallible;
use std::hint::black_box;

use inseam::prelude::*;
use mediator::{AsyncMediator as _, DefaultAsyncMediator};
use tower::util::BoxService;
use tower::{Service as _, ServiceExt as _};

#[derive(Debug, Command)]
#[command(output = u64)]
struct Increment(u64);

#[command_handler]
async fn increment(cmd: Increment) -> Result<u64, Infallible> {
    Ok(cmd.0.wrapping_add(1))
}

struct MediatorIncrement(u64);

impl mediator::Request<u64> for MediatorIncrement {}

fn new_runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let built = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread().build()
    };
    match built {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = match args.next().map(|n| n.parse()) {
        None => 100_000,
        Some(Ok(count)) => count,
        Some(Err(error)) => panic!("the first argument is a number of sends: {error}"),
    };
    let runtime = new_runtime(false);
    match args.next().as_deref() {
        Some("direct") => runtime.block_on(async {
            for _ in 0..count {
                black_box(increment(Increment(black_box(1))).await.ok());
            }
        }),
        Some("tower") => runtime.block_on(async {
            let mut service: BoxService<Increment, u64, Infallible> =
                BoxService::new(tower::service_fn(increment));
            for _ in 0..count {
                let Ok(ready) = service.ready().await;
                black_box(ready.call(Increment(black_box(1))).await.ok());
            }
        }),
        Some("mediator") => {
            // Its builder registers handlers with `block_in_place`: a multi-threaded runtime.
            let mut bus = new_runtime(true).block_on(async {
                DefaultAsyncMediator::builder()
                    .add_handler(
                        |request: MediatorIncrement| async move { request.0.wrapping_add(1) },
                    )
                    .build()
            });
            runtime.block_on(async {
                for _ in 0..count {
                    black_box(bus.send(MediatorIncrement(black_box(1))).await.ok());
                }
            });
        }
        Some(other) => panic!("unknown mode `{other}`: direct, tower or mediator"),
        None => {
            let app = match runtime.block_on(App::builder().handler::<increment>().build()) {
                Ok(app) => app,
                Err(error) => panic!("{error}"),
            };
            runtime.block_on(async {
                for _ in 0..count {
                    black_box(app.send(Increment(black_box(1))).await.ok());
                }
            });
        }
    }
}
