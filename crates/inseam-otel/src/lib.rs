//! OpenTelemetry for inseam: the W3C trace context of the span that publishes a message travels
//! in the message's envelope, so the spans that deliver it, later or in another process, are
//! its children.
//!
//! inseam's spans are `tracing` spans (`dispatch` from [`TraceLayer`](inseam_core::TraceLayer),
//! `deliver` from the relay); `tracing-opentelemetry` exports them. [`OtelPropagation`] is the
//! [`TracePropagation`] that an app's builder takes to carry their context: it writes
//! `traceparent` (and `tracestate`) into the headers of every event and durable command
//! published under a span, which the outbox row keeps and every transport carries byte for
//! byte, and it makes each delivery's span a child of the context its envelope carries.
//!
//! ```ignore
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::prelude::*;
//!
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_batch_exporter(exporter)               // e.g. opentelemetry_otlp's SpanExporter
//!     .build();
//! tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("shop")))
//!     .init();
//! let app = App::builder()
//!     .layer(TraceLayer::new())                     // a span per dispatch
//!     .trace_propagation(OtelPropagation::new())    // their context through the outbox
//!     /* .. */
//!     .build()
//!     .await?;
//! ```

#![warn(missing_docs)]

use std::fmt;

use inseam_core::{Headers, TracePropagation};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Carries OpenTelemetry trace context in envelope headers: W3C Trace Context (`traceparent`,
/// `tracestate`) unless given another propagator. Install it with
/// `App::builder().trace_propagation(OtelPropagation::new())`; the spans are those of the
/// `tracing` subscriber, which needs a `tracing_opentelemetry` layer for them to have a context.
pub struct OtelPropagation {
    propagator: Box<dyn TextMapPropagator + Send + Sync>,
}

impl OtelPropagation {
    /// W3C Trace Context: `traceparent` and `tracestate` headers.
    pub fn new() -> Self {
        OtelPropagation::with_propagator(TraceContextPropagator::new())
    }

    /// Another propagator. Its header names must be envelope header names (lowercase ASCII
    /// letters and digits: CloudEvents extension attributes); a header it writes under another
    /// name is left out, with a debug event under target `inseam::trace`.
    pub fn with_propagator(propagator: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        OtelPropagation {
            propagator: Box::new(propagator),
        }
    }
}

impl Default for OtelPropagation {
    fn default() -> Self {
        OtelPropagation::new()
    }
}

impl fmt::Debug for OtelPropagation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelPropagation")
            .field("propagator", &self.propagator)
            .finish()
    }
}

impl TracePropagation for OtelPropagation {
    fn inject(&self, headers: &mut Headers) {
        let context = tracing::Span::current().context();
        if !context.span().span_context().is_valid() {
            return;
        }
        self.propagator
            .inject_context(&context, &mut HeaderInjector(headers));
    }

    fn set_parent(&self, span: &tracing::Span, headers: &Headers) {
        let parent = self
            .propagator
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        if !parent.span().span_context().is_valid() {
            return;
        }
        if let Err(error) = span.set_parent(parent) {
            tracing::debug!(target: "inseam::trace", error = %error, "a delivery's span could not take the context its envelope carries");
        }
    }
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Err(error) = self.0.insert(key, value) {
            tracing::debug!(target: "inseam::trace", error = %error, "trace context header left out");
        }
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name).collect()
    }
}
