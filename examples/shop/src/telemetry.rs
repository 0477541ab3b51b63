//! Metrics and traces of the shop, when asked for.
//!
//! - [`install_metrics`] installs the process's Prometheus recorder (the `metrics` facade's);
//!   the HTTP API then serves it as Prometheus text at `GET /metrics`, with the backlog
//!   gauges sampled at each scrape, and the app counts its dispatches ([`inseam::MetricsLayer`]).
//! - [`install_tracing`] exports the process's `tracing` spans through an OpenTelemetry
//!   tracer provider; the app then opens a span per dispatch ([`inseam::TraceLayer`]) and
//!   carries their W3C trace context through the outbox and the brokers
//!   ([`inseam::otel::OtelPropagation`]), so one order's spans, in every process, make one
//!   trace. `SHOP_TRACES=<file>` makes the binary write its spans to a file, one JSON object
//!   a line ([`JsonLinesExporter`]); an OTLP collector takes them from the `opentelemetry-otlp`
//!   crate's exporter in its place (see the README).
//!
//! [`observe`] adds to an app builder what has been installed; the shop's `app_for` calls it.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use inseam::otel::OtelPropagation;
use inseam::{AppBuilder, MetricsLayer, TraceLayer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::ShopError;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();
static TRACES: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the Prometheus recorder of this process (once; later calls return the same
/// handle). Fails when another recorder was installed before.
pub fn install_metrics() -> Result<PrometheusHandle, ShopError> {
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| ShopError::Telemetry(format!("cannot install the metrics recorder: {e}")))?;
    Ok(METRICS.get_or_init(|| handle).clone())
}

/// The Prometheus recorder, if [`install_metrics`] installed it.
pub fn metrics() -> Option<&'static PrometheusHandle> {
    METRICS.get()
}

/// Makes `provider` export this process's spans of level `INFO` and above (inseam's
/// `dispatch` and `deliver`, the HTTP API's `http_request`), and logs go to standard error,
/// filtered by `RUST_LOG` (default `warn`). Installs the process's `tracing` subscriber, so
/// it can be called once, before any other does.
pub fn install_tracing(provider: SdkTracerProvider) -> Result<(), ShopError> {
    let tracer = provider.tracer("shop");
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter());
    tracing_subscriber::registry()
        .with(logs)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(LevelFilter::INFO)
                // A relay worker's every poll is a `relay_batch` span: each would be a trace.
                .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                    !(metadata.is_span() && metadata.name() == "relay_batch")
                })),
        )
        .try_init()
        .map_err(|e| ShopError::Telemetry(format!("cannot install the tracing subscriber: {e}")))?;
    TRACES
        .set(provider)
        .map_err(|_| ShopError::Telemetry("tracing was installed twice".into()))
}

/// Logs to standard error only: standard output is the demo's.
pub fn install_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(log_filter())
        .try_init();
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
}

/// Exports what is left of the spans and stops the exporter: what a process does before it
/// exits.
pub fn shutdown_tracing() {
    if let Some(provider) = TRACES.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(error = %error, "exporting the last spans failed");
    }
}

/// Adds to `builder` what was installed: with metrics, [`MetricsLayer`]; with traces,
/// [`TraceLayer`] and [`OtelPropagation`]. Without either, the builder is unchanged and
/// dispatch pays for neither.
pub fn observe(builder: AppBuilder) -> AppBuilder {
    let builder = if METRICS.get().is_some() {
        builder.layer(MetricsLayer::new())
    } else {
        builder
    };
    if TRACES.get().is_some() {
        builder
            .layer(TraceLayer::new())
            .trace_propagation(OtelPropagation::new())
    } else {
        builder
    }
}

/// Writes spans to a file, one JSON object a line: `trace_id`, `span_id`, `parent_span_id`
/// (empty for a root span), `name`, and `attributes` (name to value, as strings).
pub struct JsonLinesExporter {
    file: Mutex<std::fs::File>,
}

impl JsonLinesExporter {
    /// Appends to `path`, creating it if needed.
    pub fn create(path: &Path) -> Result<Self, ShopError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ShopError::Telemetry(format!("cannot open {}: {e}", path.display())))?;
        Ok(JsonLinesExporter {
            file: Mutex::new(file),
        })
    }
}

impl fmt::Debug for JsonLinesExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLinesExporter").finish_non_exhaustive()
    }
}

impl SpanExporter for JsonLinesExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut text = String::new();
        for span in batch {
            let parent = if span.parent_span_id == opentelemetry::trace::SpanId::INVALID {
                String::new()
            } else {
                span.parent_span_id.to_string()
            };
            let attributes: serde_json::Map<String, serde_json::Value> = span
                .attributes
                .iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string().into()))
                .collect();
            let line = serde_json::json!({
                "trace_id": span.span_context.trace_id().to_string(),
                "span_id": span.span_context.span_id().to_string(),
                "parent_span_id": parent,
                "name": span.name,
                "attributes": attributes,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        // The batch processor calls this on a thread of its own, not on the runtime's.
        let mut file = self.file.lock().map_err(|_| {
            OTelSdkError::InternalFailure("the span file's lock is poisoned".into())
        })?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| OTelSdkError::InternalFailure(format!("cannot write spans: {e}")))
    }
}

/// `SHOP_TRACES=<file>`: spans to that file as JSON lines ([`JsonLinesExporter`]), else logs
/// only. What the binary calls first.
pub fn from_env() -> Result<(), ShopError> {
    match std::env::var_os("SHOP_TRACES") {
        Some(path) => {
            let exporter = JsonLinesExporter::create(Path::new(&path))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .build();
            install_tracing(provider)
        }
        None => {
            install_logs();
            Ok(())
        }
    }
}
