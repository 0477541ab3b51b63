//! Heap allocations per dispatch on the path without middleware, counted by a global allocator.
//!
//! `allocation_counter` counts the allocations of the current thread; the runtime here is a
//! current-thread runtime, so everything a dispatch does is counted.

use inseam::prelude::*;

#[derive(Debug, Command)]
#[command(output = u64)]
struct Increment(u64);

#[command_handler]
async fn increment(cmd: Increment) -> Result<u64, std::convert::Infallible> {
    Ok(cmd.0 + 1)
}

/// A handler shaped like real ones: the context, shared state, the command's fields.
#[derive(Debug, Command)]
#[command(output = u64, error = Overdrawn)]
struct Withdraw {
    account: u32,
    amount: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("account {0} is overdrawn")]
struct Overdrawn(u32);

#[derive(Debug, Clone, Default)]
struct Vault(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[command_handler]
async fn withdraw(
    cmd: Withdraw,
    ctx: &mut CommandContext<'_>,
    State(vault): State<Vault>,
) -> Result<u64, Overdrawn> {
    if cmd.amount > 1_000 {
        return Err(Overdrawn(cmd.account));
    }
    let _ = ctx.headers();
    Ok(vault
        .0
        .fetch_add(cmd.amount, std::sync::atomic::Ordering::Relaxed)
        + cmd.amount)
}

#[derive(Debug, Clone)]
struct Offset(u64);

#[derive(Debug, Query)]
#[query(output = u64)]
struct Shifted(u64);

#[query_handler]
async fn shifted(
    q: Shifted,
    State(offset): State<Offset>,
    meta: Metadata,
) -> Result<u64, std::convert::Infallible> {
    let _ = meta;
    Ok(q.0 + offset.0)
}

fn count_allocations<F: Future>(runtime: &tokio::runtime::Runtime, future: F) -> (F::Output, u64) {
    let mut output = None;
    let info = allocation_counter::measure(|| output = Some(runtime.block_on(future)));
    match output {
        Some(output) => (output, info.count_total),
        None => unreachable!("measure runs the closure"),
    }
}

#[test]
fn send_and_query_without_middleware_do_not_allocate() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let app = runtime
        .block_on(
            App::builder()
                .handler::<increment>()
                .handler::<shifted>()
                .handler::<withdraw>()
                .state(Offset(10))
                .state(Vault::default())
                .build(),
        )
        .expect("wiring is valid");

    // Warm up: thread-local state (the id generator's random source, the runtime's context) is
    // initialised once per thread, not per dispatch.
    runtime.block_on(async {
        app.send(Increment(0)).await.expect("handled");
        app.query(Shifted(0)).await.expect("answered");
        app.send(Withdraw {
            account: 7,
            amount: 0,
        })
        .await
        .expect("withdrawn");
    });

    const N: u64 = 10_000;
    let (sum, allocations) = count_allocations(&runtime, async {
        let mut sum = 0;
        for i in 0..N {
            sum += app.send(Increment(i)).await.expect("handled");
        }
        sum
    });
    assert_eq!(sum, (1..=N).sum::<u64>());
    assert_eq!(allocations, 0, "{allocations} allocations in {N} sends");

    let (sum, allocations) = count_allocations(&runtime, async {
        let mut sum = 0;
        for i in 0..N {
            sum += app.query(Shifted(i)).await.expect("answered");
        }
        sum
    });
    assert_eq!(sum, (0..N).map(|i| i + 10).sum::<u64>());
    assert_eq!(allocations, 0, "{allocations} allocations in {N} queries");

    let (total, allocations) = count_allocations(&runtime, async {
        let mut total = 0;
        for i in 0..N {
            total = app
                .send(Withdraw {
                    account: 7,
                    amount: 1,
                })
                .await
                .expect("withdrawn");
            assert!(matches!(
                app.send(Withdraw {
                    account: i as u32,
                    amount: 5_000
                })
                .await,
                Err(DispatchError::Handler(Overdrawn(_)))
            ));
        }
        total
    });
    assert_eq!(total, N, "one warm-up withdrawal of 0, then N of 1");
    assert_eq!(
        allocations,
        0,
        "{allocations} allocations in {} sends to a handler with context and state",
        2 * N
    );
}
