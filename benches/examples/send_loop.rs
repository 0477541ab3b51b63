//! A plain loop of `send`s (or direct calls) of the trivial handler of the dispatch benchmark,
//! for instruction counts without criterion around it:
//!
//! ```sh
//! cargo build --profile bench -p inseam-benches --example send_loop
//! valgrind --tool=callgrind target/release/examples/send_loop 200000
//! valgrind --tool=callgrind target/release/examples/send_loop 200000 direct
//! ```

use std::convert::Infallible;
use std::hint::black_box;

use inseam::prelude::*;

#[derive(Debug, Command)]
#[command(output = u64)]
struct Increment(u64);

#[command_handler]
async fn increment(cmd: Increment) -> Result<u64, Infallible> {
    Ok(cmd.0.wrapping_add(1))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = match args.next().map(|n| n.parse()) {
        None => 100_000,
        Some(Ok(count)) => count,
        Some(Err(error)) => panic!("the first argument is a number of sends: {error}"),
    };
    let direct = args.next().as_deref() == Some("direct");
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    };
    let app = match runtime.block_on(App::builder().handler::<increment>().build()) {
        Ok(app) => app,
        Err(error) => panic!("{error}"),
    };
    runtime.block_on(async {
        for _ in 0..count {
            if direct {
                black_box(increment(Increment(black_box(1))).await.ok());
            } else {
                black_box(app.send(Increment(black_box(1))).await.ok());
            }
        }
    });
}
