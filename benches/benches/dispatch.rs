//! Dispatch overhead: `send` and `query` against a direct call of the same async fn, and inline
//! `publish` to 1, 4 and 16 subscribers. `send` has two peers doing the same work: the handler
//! as a tower `BoxService` (type-erased, one boxed future per call), and the `mediator` crate's
//! `DefaultAsyncMediator` (a MediatR-style bus). Run with
//! `cargo bench -p inseam-benches --bench dispatch`.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use inseam::TraceLayer;
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

/// The same command for the `mediator` crate, whose requests implement its own trait.
struct MediatorIncrement(u64);

impl mediator::Request<u64> for MediatorIncrement {}

/// A `DefaultAsyncMediator` with the increment handler. Its builder registers handlers with
/// `block_in_place`, which needs a multi-threaded runtime; sends work on any runtime.
fn mediator_bus() -> DefaultAsyncMediator {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    };
    runtime.block_on(async {
        DefaultAsyncMediator::builder()
            .add_handler(|request: MediatorIncrement| async move { request.0.wrapping_add(1) })
            .build()
    })
}

#[derive(Debug, Query)]
#[query(output = u64)]
struct Double(u64);

#[query_handler]
async fn double(q: Double) -> Result<u64, Infallible> {
    Ok(q.0.wrapping_mul(2))
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bench.ticked")]
struct Ticked(u64);

macro_rules! inline_subscribers {
    ($($name:ident),*) => {
        $(
            #[event_handler(inline)]
            async fn $name(ev: &Ticked) {
                black_box(ev.0);
            }
        )*
        const SUBSCRIBERS: &[inseam::Registration] = &[$(<$name as inseam::Handler>::REGISTRATION),*];
    };
}

inline_subscribers!(
    s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16
);

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    }
}

fn build(runtime: &tokio::runtime::Runtime, builder: inseam::AppBuilder) -> App {
    match runtime.block_on(builder.build()) {
        Ok(app) => app,
        Err(error) => panic!("{error}"),
    }
}

fn send(c: &mut Criterion) {
    let runtime = runtime();
    let app = build(
        &runtime,
        App::builder().handler::<increment>().handler::<double>(),
    );
    let traced = build(
        &runtime,
        App::builder()
            .handler::<increment>()
            .layer(TraceLayer::new()),
    );

    let mut group = c.benchmark_group("send");
    group.bench_function("direct call", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(increment(Increment(black_box(1))).await) })
    });
    // Keeping a 16-byte value (two registers, stored and loaded back whole by `black_box`)
    // costs several nanoseconds by itself: compare rows that keep values of the same size.
    group.bench_function("direct call, 16 bytes kept", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(increment(Increment(black_box(1))).await.ok()) })
    });
    group.bench_function("inseam send", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(app.send(Increment(black_box(1))).await) })
    });
    group.bench_function("inseam send, output kept", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(app.send(Increment(black_box(1))).await.unwrap_or(0)) })
    });
    group.bench_function("tower BoxService", |b| {
        b.to_async(&runtime).iter_custom(|iters| async move {
            let mut service: BoxService<Increment, u64, Infallible> =
                BoxService::new(tower::service_fn(increment));
            let start = Instant::now();
            for _ in 0..iters {
                let Ok(ready) = service.ready().await;
                let Ok(output) = ready.call(Increment(black_box(1))).await;
                black_box(output);
            }
            start.elapsed()
        })
    });
    let bus = mediator_bus();
    group.bench_function("mediator crate", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let mut bus = bus.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(bus.send(MediatorIncrement(black_box(1))).await.unwrap_or(0));
                }
                start.elapsed()
            }
        })
    });
    group.bench_function("inseam send, TraceLayer", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(traced.send(Increment(black_box(1))).await) })
    });
    group.finish();

    let mut group = c.benchmark_group("query");
    group.bench_function("direct call", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(double(Double(black_box(1))).await) })
    });
    group.bench_function("inseam query", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(app.query(Double(black_box(1))).await) })
    });
    group.bench_function("inseam query, output kept", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(app.query(Double(black_box(1))).await.unwrap_or(0)) })
    });
    group.finish();
}

fn publish(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("publish inline");
    for n in [1usize, 4, 16] {
        let builder = SUBSCRIBERS[..n]
            .iter()
            .fold(App::builder(), |b, r| b.register(*r));
        let app = build(&runtime, builder);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.to_async(&runtime)
                .iter(|| async { black_box(app.publish(Ticked(black_box(1))).await) })
        });
    }
    group.finish();
}

criterion_group!(benches, send, publish);
criterion_main!(benches);
