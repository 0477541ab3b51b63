//! Commands and queries answered by another process: request-reply over a transport.
//!
//! When the routing moves a command's or query's module to another process, `send` and
//! `query` in this process send the message over the transport's request-reply and wait, up to
//! a timeout, for the typed answer: the handler's output, or its error, typed as in process.
//! The message travels as a CloudEvents envelope (with the caller's correlation id) whose data
//! is `{"message": ..}`; the answer as JSON `{"ok": output}`, `{"error": error}` or `{"failure": "why"}` for a failure
//! of the framework on the other side.
//!
//! A message can travel when it, its output and its error serialize and deserialize with
//! serde; the derives find out (autoref specialisation, as for the catalog's schemas).
//! `build()` refuses a routed command or query that cannot, unless it is a durable command
//! (which travels through the outbox), whose `send` from another process then fails with
//! [`DispatchFailure::CannotTravel`](crate::DispatchFailure::CannotTravel).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Serialization of one type, when it has it.
#[derive(Debug)]
pub struct SerdeFns<T> {
    to: fn(&T) -> Result<serde_json::Value, serde_json::Error>,
    from: fn(serde_json::Value) -> Result<T, serde_json::Error>,
}

impl<T> Clone for SerdeFns<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SerdeFns<T> {}

impl<T> SerdeFns<T> {
    /// For an error type with no values (`Infallible`): never written, never read.
    pub fn never() -> Self {
        SerdeFns {
            to: |_| Ok(serde_json::Value::Null),
            from: |_| {
                Err(serde::de::Error::custom(
                    "this message's handler cannot fail, yet its answer says it did",
                ))
            },
        }
    }

    pub(crate) fn write(&self, value: &T) -> Result<serde_json::Value, serde_json::Error> {
        (self.to)(value)
    }

    pub(crate) fn read(&self, value: serde_json::Value) -> Result<T, serde_json::Error> {
        (self.from)(value)
    }
}

/// How a command or query and its answer travel: what the derives give when the message, its
/// output and its error all have serde.
#[derive(Debug)]
pub struct RemoteCodec<M, O, E> {
    pub(crate) message: SerdeFns<M>,
    pub(crate) output: SerdeFns<O>,
    pub(crate) error: SerdeFns<E>,
}

impl<M, O, E> RemoteCodec<M, O, E> {
    /// The codec, if each part has one.
    pub fn assemble(
        message: Option<SerdeFns<M>>,
        output: Option<SerdeFns<O>>,
        error: Option<SerdeFns<E>>,
    ) -> Option<Self> {
        Some(RemoteCodec {
            message: message?,
            output: output?,
            error: error?,
        })
    }
}

/// Finds out whether `T` has serde. Not public API: the derives call
/// `(&SerdeProbe::<T>::new()).serde()`.
#[doc(hidden)]
pub struct SerdeProbe<T>(PhantomData<fn() -> T>);

impl<T> SerdeProbe<T> {
    #[allow(clippy::new_without_default)]
    #[doc(hidden)]
    pub fn new() -> Self {
        SerdeProbe(PhantomData)
    }
}

impl<T> std::fmt::Debug for SerdeProbe<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerdeProbe")
    }
}

/// The probe's answer for a type with serde.
#[doc(hidden)]
pub trait ViaSerde<T> {
    fn serde(&self) -> Option<SerdeFns<T>>;
}

impl<T: Serialize + DeserializeOwned> ViaSerde<T> for SerdeProbe<T> {
    fn serde(&self) -> Option<SerdeFns<T>> {
        Some(SerdeFns {
            to: |value| serde_json::to_value(value),
            from: serde_json::from_value,
        })
    }
}

/// The probe's answer for a type without serde.
#[doc(hidden)]
pub trait WithoutSerde<T> {
    fn serde(&self) -> Option<SerdeFns<T>> {
        None
    }
}

impl<T> WithoutSerde<T> for &SerdeProbe<T> {}

/// The answer on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Answer {
    Ok(serde_json::Value),
    Error(serde_json::Value),
    Failure(String),
}

impl Answer {
    pub(crate) fn to_bytes(&self) -> Bytes {
        // A `Value` always serializes; the fallback only keeps this infallible.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(b"{\"failure\":\"the answer did not encode\"}"))
    }
}

/// Where a routed command or query is answered.
#[derive(Debug, Clone)]
pub(crate) struct RemoteTarget {
    pub(crate) process: String,
    pub(crate) transport: Arc<dyn crate::transport::Transport>,
    pub(crate) timeout: Duration,
}

/// The request-reply channel of a command or query: its name.
pub(crate) fn channel(name: &str) -> String {
    name.to_owned()
}

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::app::App;
use crate::context::MessageMeta;
use crate::envelope::RawEnvelope;
use crate::error::{DispatchError, DispatchFailure};
use crate::message::{Command, MessageKind, Query};
use crate::transport::Requests;

/// Serves the requests of one command or query type with this process's handler.
pub(crate) type ServeFn = fn(App, Box<dyn Requests>, CancellationToken) -> BoxFuture<'static, ()>;

/// Whether command `C` and its answer can travel.
pub(crate) fn command_travels<C: Command>() -> bool {
    C::__remote().is_some()
}

/// Whether query `Q` and its answer can travel.
pub(crate) fn query_travels<Q: Query>() -> bool {
    Q::__remote().is_some()
}

/// The request for `message`: its envelope, with the caller's ids.
fn request_bytes<M>(
    app: &App,
    name: &'static str,
    fns: &SerdeFns<M>,
    message: &M,
    meta: &MessageMeta,
) -> Result<Bytes, String> {
    // Wrapped, so that a message that is `null` in JSON (a unit struct) is still data.
    let payload = fns
        .write(message)
        .and_then(|value| serde_json::to_vec(&serde_json::json!({ "message": value })))
        .map_err(|e| format!("the message did not encode: {e}"))?;
    let mut headers = meta.headers.clone();
    app.trace_into(&mut headers);
    let envelope = RawEnvelope {
        metadata: meta.metadata(app),
        name: name.to_owned(),
        version: 1,
        key: None,
        occurred_at: app.now(),
        source: app.source().to_string(),
        headers,
        content_type: "application/json".to_owned(),
        payload,
    };
    envelope
        .to_json()
        .map(Bytes::from)
        .map_err(|e| format!("the envelope did not encode: {e}"))
}

/// Sends `message` to the process that answers it and decodes the typed answer.
async fn call<M, O, E>(
    app: &App,
    kind: MessageKind,
    name: &'static str,
    target: RemoteTarget,
    codec: Option<RemoteCodec<M, O, E>>,
    message: M,
    meta: MessageMeta,
) -> Result<O, DispatchError<E>> {
    let failed = |reason: String| -> DispatchError<E> {
        DispatchFailure::Remote {
            kind,
            message: name,
            process: target.process.clone(),
            reason,
        }
        .into()
    };
    let Some(codec) = codec else {
        return Err(DispatchFailure::CannotTravel {
            kind,
            message: name,
            process: target.process.clone(),
        }
        .into());
    };
    let request = request_bytes(app, name, &codec.message, &message, &meta).map_err(&failed)?;
    let answer = target
        .transport
        .request(&channel(name), request, target.timeout)
        .await
        .map_err(|error| failed(crate::error::Report(&error).to_string()))?;
    let answer: Answer = serde_json::from_slice(&answer)
        .map_err(|e| failed(format!("the answer is not one inseam reads: {e}")))?;
    match answer {
        Answer::Ok(value) => codec
            .output
            .read(value)
            .map_err(|e| failed(format!("the output did not decode: {e}"))),
        Answer::Error(value) => match codec.error.read(value) {
            Ok(error) => Err(DispatchError::Handler(error)),
            Err(e) => Err(failed(format!("the error did not decode: {e}"))),
        },
        Answer::Failure(reason) => Err(failed(reason)),
    }
}

/// `send` of a command answered by another process.
pub(crate) async fn send<C: Command>(
    app: &App,
    target: RemoteTarget,
    command: C,
    meta: MessageMeta,
) -> Result<C::Output, DispatchError<C::Error>> {
    call(
        app,
        MessageKind::Command,
        C::NAME,
        target,
        C::__remote(),
        command,
        meta,
    )
    .await
}

/// `query` of a query answered by another process.
pub(crate) async fn query<Q: Query>(
    app: &App,
    target: RemoteTarget,
    query: Q,
    meta: MessageMeta,
) -> Result<Q::Output, DispatchError<Q::Error>> {
    call(
        app,
        MessageKind::Query,
        Q::NAME,
        target,
        Q::__remote(),
        query,
        meta,
    )
    .await
}

/// Reads a request: the message and the caller's metadata.
fn read_request<M>(fns: &SerdeFns<M>, bytes: &[u8]) -> Result<(M, MessageMeta), String> {
    let envelope = RawEnvelope::from_json(bytes).map_err(|e| e.to_string())?;
    let mut wrapped: serde_json::Value = serde_json::from_slice(&envelope.payload)
        .map_err(|e| format!("the request's payload is not JSON: {e}"))?;
    let value = wrapped
        .get_mut("message")
        .map(serde_json::Value::take)
        .ok_or("the request's payload has no `message`")?;
    let message = fns
        .read(value)
        .map_err(|e| format!("the request's payload does not decode: {e}"))?;
    Ok((
        message,
        MessageMeta::received(envelope.metadata, envelope.headers),
    ))
}

/// What a handler's result is on the wire.
fn answer<O, E>(
    codec: &RemoteCodec<impl Sized, O, E>,
    result: Result<O, DispatchError<E>>,
) -> Answer
where
    E: std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(output) => match codec.output.write(&output) {
            Ok(value) => Answer::Ok(value),
            Err(e) => Answer::Failure(format!("the output did not encode: {e}")),
        },
        Err(DispatchError::Handler(error)) => match codec.error.write(&error) {
            Ok(value) => Answer::Error(value),
            Err(e) => Answer::Failure(format!("the error did not encode: {e}")),
        },
        Err(error) => Answer::Failure(crate::error::Report(&error).to_string()),
    }
}

/// Runs one received request with this process's handler, through `run`.
type RunFn<M, O, E> = fn(App, M, MessageMeta) -> BoxFuture<'static, Result<O, DispatchError<E>>>;

/// Serves `requests` of the message named `name` with `run`, each request in a task of its
/// own, until cancelled. A message that cannot travel is not served.
fn serve_with<M, O, E>(
    app: App,
    mut requests: Box<dyn Requests>,
    cancel: CancellationToken,
    name: &'static str,
    codec: Option<RemoteCodec<M, O, E>>,
    run: RunFn<M, O, E>,
) -> BoxFuture<'static, ()>
where
    M: Send + 'static,
    O: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    Box::pin(async move {
        let Some(codec) = codec else {
            return;
        };
        let codec = Arc::new(codec);
        loop {
            let request = tokio::select! {
                () = cancel.cancelled() => break,
                request = requests.next() => request,
            };
            let Some(request) = request else { break };
            let (app, codec) = (app.clone(), codec.clone());
            tokio::spawn(async move {
                let reply = match read_request(&codec.message, &request.payload) {
                    Ok((message, meta)) => {
                        // As a delivery's: a child of the caller's span, when traced.
                        let metadata = meta.metadata(&app);
                        let span = tracing::info_span!(
                            target: "inseam::remote",
                            "serve",
                            message_name = name,
                            message_id = %metadata.message_id,
                            correlation_id = %metadata.correlation_id,
                        );
                        if let Some(propagation) = &app.inner.propagation {
                            propagation.set_parent(&span, &meta.headers);
                        }
                        answer(&codec, run(app, message, meta).instrument(span).await)
                    }
                    Err(reason) => Answer::Failure(reason),
                };
                if let Err(error) = request.responder.respond(reply.to_bytes()).await {
                    tracing::warn!(
                        target: "inseam::remote",
                        message = name,
                        error = &error as &dyn std::error::Error,
                        "could not send an answer back"
                    );
                }
            });
        }
    })
}

/// Serves command `C`'s requests until cancelled.
pub(crate) fn serve_command<C: Command>(
    app: App,
    requests: Box<dyn Requests>,
    cancel: CancellationToken,
) -> BoxFuture<'static, ()> {
    serve_with(
        app,
        requests,
        cancel,
        C::NAME,
        C::__remote(),
        |app, command, meta| Box::pin(async move { app.send_with(command, meta).await }),
    )
}

/// Serves query `Q`'s requests until cancelled.
pub(crate) fn serve_query<Q: Query>(
    app: App,
    requests: Box<dyn Requests>,
    cancel: CancellationToken,
) -> BoxFuture<'static, ()> {
    serve_with(
        app,
        requests,
        cancel,
        Q::NAME,
        Q::__remote(),
        |app, query, meta| Box::pin(async move { app.query_with(query, meta).await }),
    )
}

/// A command or query type the app knows, for routing.
#[derive(Clone, Copy)]
pub(crate) struct Routable {
    pub(crate) kind: MessageKind,
    pub(crate) name: &'static str,
    pub(crate) type_name: &'static str,
    pub(crate) travels: fn() -> bool,
    pub(crate) serve: ServeFn,
}

/// Serves, on every transport other processes reach this one over, the commands and queries
/// this process answers for them; part of the app's relay, stopped with it.
pub(crate) fn start_serving(app: &App, handle: &crate::store::RelayHandle) {
    let served = &app.inner.served;
    if served.is_empty() {
        return;
    }
    for name in app.inner.routing.inbound_transports() {
        let Some(transport) = app.inner.transports.get(name) else {
            continue;
        };
        for routable in served {
            let (app, transport, routable) = (app.clone(), transport.clone(), *routable);
            handle.spawn(move |cancel| async move {
                let mut failures = 0u32;
                let requests = loop {
                    match transport.serve(&channel(routable.name)).await {
                        Ok(requests) => break requests,
                        Err(error) => {
                            failures += 1;
                            tracing::warn!(
                                target: "inseam::remote",
                                message = routable.name,
                                transport = transport.name(),
                                error = &error as &dyn std::error::Error,
                                "could not serve requests; trying again"
                            );
                            let pause = Duration::from_millis(100u64 << failures.min(5));
                            tokio::select! {
                                () = cancel.cancelled() => return,
                                () = tokio::time::sleep(pause) => {}
                            }
                        }
                    }
                };
                (routable.serve)(app, requests, cancel).await;
            });
        }
    }
}
