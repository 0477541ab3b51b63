//! Trace context that travels with messages: the span that publishes an event is the parent of
//! the spans that deliver it, through the outbox and through brokers.
//!
//! The core knows no tracing backend. An app that exports traces gives its builder a
//! [`TracePropagation`] (`inseam-otel` has one for OpenTelemetry, W3C `traceparent` and
//! `tracestate`): every event and durable command published then carries the current span's
//! context in its envelope's headers (CloudEvents extension attributes, so the outbox row and
//! the bytes on a broker carry it too), and every delivery runs in a span whose parent is the
//! context its envelope carries. An app without one does no propagation work at all: no header
//! is written, and `send` does not look for one.

use crate::envelope::Headers;

/// Writes the current trace context into the headers of what is published, and reads it back
/// when delivering. Installed with [`AppBuilder::trace_propagation`](crate::AppBuilder::trace_propagation).
pub trait TracePropagation: Send + Sync + 'static {
    /// Writes the context of the current span (`tracing::Span::current()`) into `headers`.
    /// Writes nothing when there is no context to carry.
    fn inject(&self, headers: &mut Headers);

    /// Makes `span` a child of the context that `headers` carry, if they carry one.
    fn set_parent(&self, span: &tracing::Span, headers: &Headers);
}
