//! Request-reply: a queue per request channel that the channel's servers share, and RabbitMQ's
//! direct reply-to (`amq.rabbitmq.reply-to`) for the answers (decision 0020).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use inseam_core::transport::{Request, Requests, Responder, TransportError};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::Instant;

use crate::link::Link;
use crate::{NAME, lapin_error, layout};

/// The pseudo-queue of direct reply-to.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The queue of `channel`'s requests: `<prefix>.rpc.<channel>`.
pub(crate) fn request_queue(
    prefix: &str,
    channel: &str,
    operation: impl Fn() -> String,
) -> Result<String, TransportError> {
    if let Some(problem) = layout::channel_problem(channel) {
        return Err(TransportError::permanent(
            NAME,
            operation(),
            format!("channel `{channel}` cannot name a request queue: {problem}"),
        ));
    }
    let queue = format!("{prefix}.rpc.{channel}");
    if queue.len() > layout::MAX_SHORT {
        return Err(TransportError::permanent(
            NAME,
            operation(),
            format!("channel `{channel}` is too long for a request queue name"),
        ));
    }
    Ok(queue)
}

/// Sends a request and waits for its answer.
pub(crate) async fn request(
    link: &Link,
    queue: &str,
    payload: Bytes,
    timeout: Duration,
    operation: impl Fn() -> String,
) -> Result<Bytes, TransportError> {
    let deadline = Instant::now() + timeout;
    let timed_out =
        || TransportError::transient(NAME, operation(), format!("no answer within {timeout:?}"));
    let asked = tokio::time::timeout_at(deadline, async {
        let channel = link
            .channel()
            .await
            .map_err(|err| TransportError::transient(NAME, operation(), err))?;
        let answer = ask(&channel, queue, &payload, &operation).await;
        let _ = channel.close(200, "inseam: answered".into()).await;
        answer
    })
    .await;
    asked.unwrap_or_else(|_| Err(timed_out()))
}

async fn ask(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    operation: &impl Fn() -> String,
) -> Result<Bytes, TransportError> {
    let failed = |err: lapin::Error| lapin_error(operation(), err);
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(failed)?;
    let mut answers = channel
        .basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed)?;
    let correlation = uuid::Uuid::now_v7().to_string();
    let confirm = channel
        .basic_publish(
            "".into(),
            ShortString::try_new(queue)
                .map_err(|err| TransportError::permanent(NAME, operation(), err.to_string()))?,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            BasicProperties::default()
                .with_reply_to(REPLY_TO.into())
                .with_correlation_id(correlation.as_str().into()),
        )
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(_)) => {
            return Err(TransportError::transient(
                NAME,
                operation(),
                "nobody serves this channel",
            ));
        }
        _ => {
            return Err(TransportError::transient(
                NAME,
                operation(),
                "the server did not take the request",
            ));
        }
    }
    while let Some(answer) = answers.next().await {
        let answer = answer.map_err(failed)?;
        let matches = answer
            .properties
            .correlation_id()
            .as_ref()
            .is_some_and(|id| id.as_str() == correlation);
        if matches {
            return Ok(Bytes::from(answer.data));
        }
    }
    Err(TransportError::transient(
        NAME,
        operation(),
        "the connection closed before the answer came",
    ))
}

/// Declares `channel`'s request queue (it goes with its last server) and consumes it.
pub(crate) async fn serve(
    link: &Link,
    queue: &str,
    operation: impl Fn() -> String,
) -> Result<Box<dyn Requests>, TransportError> {
    let channel = link
        .channel()
        .await
        .map_err(|err| TransportError::transient(NAME, operation(), err))?;
    let failed = |err: lapin::Error| lapin_error(operation(), err);
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed)?;
    let requests = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed)?;
    Ok(Box::new(AmqpRequests { channel, requests }))
}

/// The requests of one channel, from its queue.
struct AmqpRequests {
    channel: Channel,
    requests: lapin::Consumer,
}

#[async_trait]
impl Requests for AmqpRequests {
    async fn next(&mut self) -> Option<Request> {
        loop {
            let delivery = self.requests.next().await?.ok()?;
            // A message without a reply address is no request: nobody waits for an answer.
            let Some(reply_to) = delivery.properties.reply_to().clone() else {
                continue;
            };
            return Some(Request {
                payload: Bytes::from(delivery.data),
                responder: Box::new(AmqpResponder {
                    channel: self.channel.clone(),
                    reply_to,
                    correlation: delivery.properties.correlation_id().clone(),
                }),
            });
        }
    }
}

/// Publishes the answer to the request's reply address.
struct AmqpResponder {
    channel: Channel,
    reply_to: ShortString,
    correlation: Option<ShortString>,
}

#[async_trait]
impl Responder for AmqpResponder {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<(), TransportError> {
        let mut properties = BasicProperties::default();
        if let Some(correlation) = self.correlation {
            properties = properties.with_correlation_id(correlation);
        }
        self.channel
            .basic_publish(
                "".into(),
                self.reply_to,
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await
            .map(|_| ())
            .map_err(|err| TransportError::transient(NAME, "answer a request", err))
    }
}
