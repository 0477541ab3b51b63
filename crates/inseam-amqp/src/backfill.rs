//! A group's first subscription: its queues, and the copy of what was published before.
//!
//! RabbitMQ routes a message only to the queues bound when it is published. The history
//! stream has every message; a group new to the server copies the stream's messages of its
//! channels into one history queue per partition, which its consumers read before the
//! partition's queue. The copy must neither miss nor reorder what is published meanwhile:
//!
//! 1. the history queues are declared, then fence F0 goes into the stream;
//! 2. the group's queues are declared and bound: every message routed from now on reaches
//!    them;
//! 3. after a grace period (for messages routed before the bindings, still on their way to
//!    the stream), fence F1 goes into the stream;
//! 4. the stream is read from its start to F1: each message of the group's channels is
//!    copied to its partition's history queue, those between F0 and F1 marked as possibly in
//!    the group's queue too (a consumer skips them there), and each history queue gets an end
//!    marker.
//!
//! One connection at a time sets a group up: it holds an exclusive queue meanwhile. A setup
//! whose process dies part way leaves a durable marker queue (declared before step 1, deleted
//! after the end markers): the next setup finds it and copies again, after purging the
//! history queues, marking every copied message as possibly in the group's queue (the group's
//! queues may have been bound for a while).

use std::time::Duration;

use futures_util::StreamExt;
use inseam_core::transport::TransportError;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::Instant;

use crate::link::Link;
use crate::topology::{self, Topology};
use crate::{NAME, TARGET, lapin_error, layout};

/// The header of a fence in the history stream (its id).
pub(crate) const FENCE_HEADER: &str = "inseam-fence";
/// The routing key of fences: bound by the stream only.
const FENCE_ROUTING_KEY: &str = "inseam-fence";
/// The header of the end marker of a history queue.
pub(crate) const END_HEADER: &str = "inseam-history-end";
/// The header of a copied message that may be in the group's queue too.
pub(crate) const MAYBE_QUEUED_HEADER: &str = "inseam-maybe-queued";
/// The header of a copied message naming its channel (its routing key is then the history
/// queue's name).
pub(crate) const CHANNEL_HEADER: &str = "inseam-channel";
/// How long after binding the group's queues fence F1 is published.
const GRACE: Duration = Duration::from_millis(500);
/// How long a subscription waits for another connection setting up the same group.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// How many stream messages are read ahead while copying.
const COPY_PREFETCH: u16 = 256;

/// Declares the group's queues and bindings; for a group the server did not have, first
/// copies its history (see the module documentation). Idempotent.
pub(crate) async fn set_up(
    link: &Link,
    topology: &Topology,
    timeout: Duration,
) -> Result<(), TransportError> {
    let operation = || format!("set up group `{}`", topology.group);
    // Another process may be copying a long history meanwhile.
    let deadline = Instant::now() + timeout.max(LOCK_WAIT);
    let lock = acquire_lock(link, topology, deadline).await?;
    let outcome = set_up_locked(link, topology, timeout).await;
    let lock_name = topology.setup_lock();
    if let Err(err) = lock
        .queue_delete(lock_name.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        tracing::debug!(target: TARGET, lock = %lock_name, error = %err, "could not delete the setup lock");
    }
    let _ = lock.close(200, "inseam: set up".into()).await;
    outcome.map_err(|err| match err {
        Failure::Lapin(what, err) => lapin_error(format!("{}: {what}", operation()), err),
        Failure::Other(what) => TransportError::transient(NAME, operation(), what),
    })
}

pub(crate) enum Failure {
    Lapin(String, lapin::Error),
    Other(String),
}

fn at(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Failure {
    let what = what.into();
    move |err| Failure::Lapin(what, err)
}

fn is_soft(err: &lapin::Error, soft: AMQPSoftError) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(soft))
}

/// Declares the group's exclusive setup queue on a channel of its own, waiting while another
/// connection holds it.
async fn acquire_lock(
    link: &Link,
    topology: &Topology,
    deadline: Instant,
) -> Result<Channel, TransportError> {
    let name = topology.setup_lock();
    let operation = || format!("set up group `{}`", topology.group);
    loop {
        let channel = link
            .channel()
            .await
            .map_err(|err| TransportError::transient(NAME, operation(), err))?;
        let declared = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => return Ok(channel),
            Err(err)
                if is_soft(&err, AMQPSoftError::RESOURCELOCKED) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(lapin_error(operation(), err)),
        }
    }
}

/// Whether queue `name` exists (a passive declaration, on a channel of its own since a
/// refusal closes the channel).
pub(crate) async fn queue_exists(link: &Link, name: &str) -> Result<bool, Failure> {
    let channel = link
        .channel()
        .await
        .map_err(|err| Failure::Other(err.to_string()))?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "inseam: probed".into()).await;
    match declared {
        Ok(_) => Ok(true),
        Err(err) if is_soft(&err, AMQPSoftError::NOTFOUND) => Ok(false),
        Err(err) => Err(Failure::Lapin(format!("look for queue `{name}`"), err)),
    }
}

async fn set_up_locked(link: &Link, topology: &Topology, timeout: Duration) -> Result<(), Failure> {
    let first_queue = topology.queue(0);
    let marker = topology.copying_marker();
    let exists = queue_exists(link, &first_queue).await?;
    // A setup that died while copying the history: copy it again. (One that died before
    // declaring the group's queues copied nothing yet.)
    let unfinished = exists && topology.history.is_some() && queue_exists(link, &marker).await?;
    let new_group = unfinished || !exists;
    let channel = link
        .channel()
        .await
        .map_err(|err| Failure::Other(err.to_string()))?;
    let outcome = async {
        let Some(max_age) = topology.history.filter(|_| new_group) else {
            for partition in 0..topology.partitions {
                tokio::time::timeout(timeout, topology.declare_partition(&channel, partition))
                    .await
                    .map_err(|_| {
                        Failure::Other(format!("the server did not answer within {timeout:?}"))
                    })?
                    .map_err(at(format!("declare queue `{}`", topology.queue(partition))))?;
            }
            return Ok(());
        };
        if unfinished {
            tracing::info!(target: TARGET, group = %topology.group, "an earlier copy of the group's history did not finish: copying it again");
        } else {
            tracing::info!(target: TARGET, group = %topology.group, "a new group: copying its history");
        }
        channel
            .queue_declare(
                marker.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(at(format!("declare queue `{marker}`")))?;
        topology::declare_exchange(&channel, &topology.exchange)
            .await
            .map_err(at("declare the exchange"))?;
        topology::declare_history(&channel, &topology.exchange, &topology.prefix, max_age)
            .await
            .map_err(at("declare the history stream"))?;
        for partition in 0..topology.partitions {
            topology
                .declare_history_queue(&channel, partition)
                .await
                .map_err(at(format!(
                    "declare queue `{}`",
                    topology.history_queue(partition)
                )))?;
            if unfinished {
                // What the earlier copy left; messages a consumer holds stay with it.
                channel
                    .queue_purge(
                        topology.history_queue(partition).as_str().into(),
                        QueuePurgeOptions::default(),
                    )
                    .await
                    .map_err(at(format!(
                        "purge queue `{}`",
                        topology.history_queue(partition)
                    )))?;
            }
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(at("confirm publishes"))?;
        let first_fence = uuid::Uuid::now_v7().to_string();
        fence(&channel, &topology.exchange, &first_fence).await?;
        for partition in 0..topology.partitions {
            topology
                .declare_partition(&channel, partition)
                .await
                .map_err(at(format!("declare queue `{}`", topology.queue(partition))))?;
        }
        tokio::time::sleep(GRACE).await;
        let last_fence = uuid::Uuid::now_v7().to_string();
        fence(&channel, &topology.exchange, &last_fence).await?;
        let copied = copy(
            link,
            &channel,
            topology,
            (&first_fence, &last_fence),
            unfinished,
            timeout,
        )
        .await?;
        for partition in 0..topology.partitions {
            let mut headers = FieldTable::default();
            headers.insert(END_HEADER.into(), AMQPValue::Boolean(true));
            publish_confirmed(
                &channel,
                "",
                &topology.history_queue(partition),
                &[],
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await?;
        }
        channel
            .queue_delete(marker.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(at(format!("delete queue `{marker}`")))?;
        tracing::info!(target: TARGET, group = %topology.group, copied, "history copied");
        Ok(())
    }
    .await;
    let _ = channel.close(200, "inseam: set up".into()).await;
    outcome
}

async fn fence(channel: &Channel, exchange: &str, id: &str) -> Result<(), Failure> {
    let mut headers = FieldTable::default();
    headers.insert(
        FENCE_HEADER.into(),
        AMQPValue::LongString(LongString::from(id)),
    );
    publish_confirmed(
        channel,
        exchange,
        FENCE_ROUTING_KEY,
        &[],
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await
}

async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), Failure> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        )
        .await
        .map_err(at("publish"))?
        .await
        .map_err(at("publish"))?;
    match confirm {
        Confirmation::Ack(_) => Ok(()),
        _ => Err(Failure::Other(
            "the server did not confirm a publish".to_owned(),
        )),
    }
}

/// Copies the stream's messages of the group's channels, from its start to the second of
/// `fences`, to the history queues, those after the first fence (or all, when `all_maybe_queued`)
/// marked as possibly in the group's queue too. Returns how many it copied.
async fn copy(
    link: &Link,
    publisher: &Channel,
    topology: &Topology,
    (first_fence, last_fence): (&str, &str),
    all_maybe_queued: bool,
    timeout: Duration,
) -> Result<usize, Failure> {
    let stream = topology::history_stream(&topology.prefix);
    let reader = link
        .channel()
        .await
        .map_err(|err| Failure::Other(err.to_string()))?;
    reader
        .basic_qos(COPY_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(at("set the prefetch"))?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let tag = format!("inseam-copy-{}", uuid::Uuid::now_v7().simple());
    let mut deliveries = reader
        .basic_consume(
            stream.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(at(format!("read stream `{stream}`")))?;
    let mut maybe_queued = all_maybe_queued;
    let mut copied = 0;
    let mut confirms = Vec::new();
    loop {
        let delivery = match tokio::time::timeout(timeout, deliveries.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(err))) => {
                return Err(Failure::Lapin(format!("read stream `{stream}`"), err));
            }
            Ok(None) => return Err(Failure::Other(format!("reading stream `{stream}` stopped"))),
            Err(_) => {
                return Err(Failure::Other(format!(
                    "stream `{stream}` gave nothing for {timeout:?} before the fence"
                )));
            }
        };
        reader
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(at("acknowledge a stream message"))?;
        let headers = delivery.properties.headers().as_ref();
        let fence = headers
            .and_then(|h| h.inner().get(FENCE_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            });
        match fence.as_deref() {
            Some(id) if id == last_fence => break,
            Some(id) if id == first_fence => {
                maybe_queued = true;
                continue;
            }
            Some(_) => continue,
            None => {}
        }
        let routing_key = delivery.routing_key.as_str();
        let Some(channel) = layout::channel_of(routing_key) else {
            continue;
        };
        if !topology.channels.iter().any(|c| c == channel) {
            continue;
        }
        let Some(partition) = routing_key
            .split_once('.')
            .and_then(|(p, _)| p.parse::<u16>().ok())
            .filter(|p| *p < topology.partitions)
        else {
            continue;
        };
        let mut properties = delivery.properties.clone();
        let mut table = properties.headers().clone().unwrap_or_default();
        let inner = table.inner().clone();
        let mut cleaned = FieldTable::default();
        for (name, value) in inner {
            if !name.as_str().starts_with("x-") {
                cleaned.insert(name, value);
            }
        }
        table = cleaned;
        if maybe_queued {
            table.insert(MAYBE_QUEUED_HEADER.into(), AMQPValue::Boolean(true));
        }
        table.insert(
            CHANNEL_HEADER.into(),
            AMQPValue::LongString(LongString::from(channel.as_bytes())),
        );
        properties = properties.with_headers(table);
        let confirm = publisher
            .basic_publish(
                "".into(),
                topology.history_queue(partition).into(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await
            .map_err(at("copy a message"))?;
        confirms.push(confirm);
        copied += 1;
    }
    let _ = reader
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let _ = reader.close(200, "inseam: copied".into()).await;
    for confirm in confirms {
        match confirm.await.map_err(at("copy a message"))? {
            Confirmation::Ack(_) => {}
            _ => {
                return Err(Failure::Other(
                    "the server did not confirm a copy".to_owned(),
                ));
            }
        }
    }
    Ok(copied)
}
