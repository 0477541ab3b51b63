//! The in-process transport: a broker held in memory, the reference for the seam's semantics.
//!
//! Every channel is an append-only log, and every message taken gets the next number of one
//! sequence shared by all channels: that sequence is the publish order, across channels, that
//! per-key order follows. Every group keeps, per channel, how far it has looked into that
//! log, and, by sequence number across all its channels, the state of each message it has not
//! acknowledged yet: waiting (perhaps until a nack's delay has passed) or handed out to one
//! consumer until a deadline. A message whose deadline passes without a settlement is handed
//! out again, to any consumer of the group, with its attempt count raised; this is how a
//! consumer that died is recovered.
//!
//! All of it sits behind one mutex, held only for bookkeeping and never across an await. A
//! consumer waiting for messages sleeps on its group's [`Notify`] until a publish, an ack or a
//! nack could have changed what it may take, or until the earliest deadline or nack delay
//! among the group's messages passes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Acker, Capabilities, Consumer, Incoming, KeyOrder, Outgoing, Subscription, Transport,
    TransportError,
};

const NAME: &str = "in-process";

/// How far in the future "never" is when a delay or a wait is too large to add to the clock.
const FAR_FUTURE: Duration = Duration::from_secs(60 * 60 * 24 * 365);

/// A broker in memory, shared by every clone: two apps in one test process that are given
/// clones of one `InProcess` talk to each other through it as two processes would through a
/// real broker.
///
/// It keeps per-key order ([`KeyOrder::PerKey`]) across every channel a group reads, honours
/// a nack's delay and drops a second publish of a message id on a channel. Channels must be
/// [provisioned](Transport::provision) before they are published to or subscribed to, as a
/// real broker would require, so that a missing provisioning step shows up in tests rather
/// than in production.
///
/// [`set_available(false)`](Self::set_available) simulates an outage: until it is switched
/// back on, every operation fails with a transient [`TransportError`] and nothing is lost.
///
/// ```
/// use std::time::Duration;
///
/// use bytes::Bytes;
/// use inseam_core::transport::{InProcess, Outgoing, Subscription, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = InProcess::new();
/// let channels = ["orders.order_placed".to_owned()];
/// broker.provision(&channels).await?;
///
/// let mut consumer = broker
///     .subscribe(&Subscription::new("inventory", channels.clone()))
///     .await?;
/// let outcomes = broker
///     .publish(&[Outgoing {
///         channel: channels[0].clone(),
///         message_id: uuid::Uuid::now_v7(),
///         key: Some("order-1".to_owned()),
///         headers: Vec::new(),
///         payload: Bytes::from_static(br#"{"id":"1"}"#),
///     }])
///     .await;
/// assert!(outcomes.iter().all(Result::is_ok));
///
/// let received = consumer.fetch(10, Duration::from_secs(1)).await?;
/// assert_eq!(received.len(), 1);
/// assert_eq!(received[0].attempt, 1);
/// received[0].ack().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct InProcess {
    shared: Arc<Shared>,
}

impl InProcess {
    /// A new, empty broker.
    pub fn new() -> Self {
        InProcess::default()
    }

    /// Switches the broker on or off. While it is off, publishing, provisioning, subscribing,
    /// fetching, acknowledging and nacking fail with a transient error and change nothing;
    /// consumers waiting in [`Consumer::fetch`] return that error at once. Switched back on,
    /// everything continues where it was: messages handed out before the outage are still
    /// waiting for their settlement (or their acknowledgement wait to run out).
    pub fn set_available(&self, available: bool) {
        tracing::debug!(target: "inseam::transport", transport = NAME, available, "switched");
        let notifies = {
            let mut state = self.shared.lock();
            state.available = available;
            state.all_notifies()
        };
        for notify in notifies {
            notify.notify_waiters();
        }
    }

    /// Whether the broker is on (see [`set_available`](Self::set_available)).
    pub fn is_available(&self) -> bool {
        self.shared.lock().available
    }
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

#[async_trait]
impl Transport for InProcess {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordering: KeyOrder::PerKey,
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: true,
            request_reply: true,
            // Its outage switch loses nothing, acknowledgements included.
            acks_survive_restart: true,
        }
    }

    async fn provision(&self, channels: &[String]) -> Result<(), TransportError> {
        let mut state = self.shared.lock();
        if !state.available {
            return Err(unavailable("provision channels"));
        }
        if let Some(empty) = channels.iter().find(|c| c.is_empty()) {
            return Err(TransportError::permanent(
                NAME,
                format!("provision channel `{empty}`"),
                "a channel name must not be empty",
            ));
        }
        for channel in channels {
            state
                .channels
                .entry(channel.clone())
                .or_insert_with(|| Channel::new(channel));
        }
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let (outcomes, notifies) = {
            let mut state = self.shared.lock();
            if !state.available {
                let outcomes = batch
                    .iter()
                    .map(|m| Err(unavailable(format!("publish to `{}`", m.channel))))
                    .collect();
                return outcomes;
            }
            let mut touched = HashSet::new();
            let outcomes = batch
                .iter()
                .map(|message| {
                    let appended = state.append(message)?;
                    if appended {
                        touched.insert(message.channel.as_str());
                    }
                    Ok(())
                })
                .collect::<Vec<_>>();
            let notifies = state.notifies_for(&touched);
            (outcomes, notifies)
        };
        for notify in notifies {
            notify.notify_waiters();
        }
        outcomes
    }

    async fn request(
        &self,
        channel: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let operation = || format!("send a request on `{channel}`");
        if !self.is_available() {
            return Err(TransportError::transient(
                NAME,
                operation(),
                "the broker is unavailable",
            ));
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        let mut request = Some(super::Request {
            payload,
            responder: Box::new(InProcessResponder(answer)),
        });
        {
            let mut servers = self
                .shared
                .servers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let servers = servers.entry(channel.to_owned()).or_default();
            servers.senders.retain(|sender| !sender.is_closed());
            for _ in 0..servers.senders.len() {
                let index = servers.next % servers.senders.len();
                servers.next = servers.next.wrapping_add(1);
                let Some(next) = request.take() else { break };
                match servers.senders[index].send(next) {
                    Ok(()) => break,
                    Err(returned) => request = Some(returned.0),
                }
            }
        }
        if request.is_some() {
            return Err(TransportError::transient(
                NAME,
                operation(),
                "no server answers this channel",
            ));
        }
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(TransportError::transient(
                NAME,
                operation(),
                "the server dropped the request",
            )),
            Err(_) => Err(TransportError::transient(
                NAME,
                operation(),
                format!("no answer within {timeout:?}"),
            )),
        }
    }

    async fn serve(&self, channel: &str) -> Result<Box<dyn super::Requests>, TransportError> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.shared
            .servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(channel.to_owned())
            .or_default()
            .senders
            .push(sender);
        Ok(Box::new(InProcessRequests(receiver)))
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        let operation = || format!("subscribe group `{}`", subscription.group);
        let mut state = self.shared.lock();
        if !state.available {
            return Err(unavailable(operation()));
        }
        if subscription.channels.is_empty() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "a subscription needs at least one channel",
            ));
        }
        if subscription.max_in_flight == 0 {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "a subscription with `max_in_flight` 0 could never receive a message",
            ));
        }
        if subscription.ack_wait.is_zero() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "a subscription with an `ack_wait` of zero would take back every message at once",
            ));
        }
        if let Some(missing) = subscription
            .channels
            .iter()
            .find(|c| !state.channels.contains_key(c.as_str()))
        {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{missing}` is not provisioned"),
            ));
        }

        let mut channels: Vec<Arc<str>> = Vec::with_capacity(subscription.channels.len());
        for channel in &subscription.channels {
            if !channels.iter().any(|c| **c == **channel) {
                channels.push(Arc::from(channel.as_str()));
            }
        }
        let group = state.groups.entry(subscription.group.clone()).or_default();
        // A group new to a channel starts at the beginning of its log: the messages published
        // before its first subscription are its messages too.
        for channel in &channels {
            group.admitted.entry(channel.to_string()).or_default();
        }
        let notify = Arc::clone(&group.notify);
        let id = state.next_consumer;
        state.next_consumer += 1;
        Ok(Box::new(InProcessConsumer {
            shared: Arc::clone(&self.shared),
            group: Arc::from(subscription.group.as_str()),
            channels,
            notify,
            id,
            max_in_flight: subscription.max_in_flight,
            ack_wait: subscription.ack_wait,
        }))
    }
}

/// A consumer of one group, handed out by [`InProcess::subscribe`].
#[derive(Debug)]
struct InProcessConsumer {
    shared: Arc<Shared>,
    group: Arc<str>,
    channels: Vec<Arc<str>>,
    notify: Arc<Notify>,
    id: u64,
    max_in_flight: usize,
    ack_wait: Duration,
}

#[async_trait]
impl Consumer for InProcessConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        let give_up = later(Instant::now(), wait);
        loop {
            // Registered before looking at the state, so that a publish or a settlement that
            // lands between the look and the sleep still wakes this consumer.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let now = Instant::now();
            let wake = {
                let mut state = self.shared.lock();
                if !state.available {
                    return Err(unavailable(format!("fetch for group `{}`", self.group)));
                }
                let (handouts, wake) = state.take(&Take {
                    group: &self.group,
                    channels: &self.channels,
                    consumer: self.id,
                    room: max.min(self.max_in_flight),
                    max_in_flight: self.max_in_flight,
                    ack_wait: self.ack_wait,
                    now,
                });
                if !handouts.is_empty() || max == 0 {
                    let delivered = handouts
                        .into_iter()
                        .map(|handout| self.incoming(handout))
                        .collect();
                    return Ok(delivered);
                }
                wake
            };
            if now >= give_up {
                return Ok(Vec::new());
            }
            let until = wake.map_or(give_up, |wake| wake.min(give_up));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

impl InProcessConsumer {
    fn incoming(&self, handout: Handout) -> Incoming {
        Incoming {
            channel: handout.channel.to_string(),
            key: handout.message.key.clone(),
            headers: handout.message.headers.clone(),
            payload: handout.message.payload.clone(),
            attempt: handout.attempt,
            acker: Box::new(InProcessAcker {
                shared: Arc::clone(&self.shared),
                notify: Arc::clone(&self.notify),
                group: Arc::clone(&self.group),
                channel: handout.channel,
                sequence: handout.sequence,
                delivery: handout.delivery,
            }),
        }
    }
}

/// Settles one delivery of one message to one group.
#[derive(Debug)]
struct InProcessAcker {
    shared: Arc<Shared>,
    notify: Arc<Notify>,
    group: Arc<str>,
    /// The message's channel, for logs and errors.
    channel: Arc<str>,
    /// The message's number in the broker's sequence.
    sequence: u64,
    /// Which handing out of the message this is: a settlement of a delivery that was
    /// superseded (its acknowledgement wait ran out and the message went out again) is
    /// ignored, since the newer delivery is the one that decides.
    delivery: u64,
}

#[derive(Debug, Clone, Copy)]
enum Settlement {
    Ack,
    Nack(Duration),
}

impl InProcessAcker {
    fn settle(&self, settlement: Settlement) -> Result<(), TransportError> {
        {
            let mut state = self.shared.lock();
            if !state.available {
                let what = match settlement {
                    Settlement::Ack => "acknowledge",
                    Settlement::Nack(_) => "nack",
                };
                return Err(unavailable(format!(
                    "{what} a message of `{}` for group `{}`",
                    self.channel, self.group
                )));
            }
            let Some(group) = state.groups.get_mut(&*self.group) else {
                return Ok(());
            };
            let current = match group.open.get(&self.sequence) {
                Some(Entry {
                    state: EntryState::InFlight { delivery, .. },
                    ..
                }) => *delivery == self.delivery,
                _ => false,
            };
            if !current {
                tracing::debug!(
                    target: "inseam::transport",
                    transport = NAME,
                    group = &*self.group,
                    channel = &*self.channel,
                    ?settlement,
                    "settlement of a superseded or settled delivery ignored"
                );
                return Ok(());
            }
            match settlement {
                Settlement::Ack => {
                    group.open.remove(&self.sequence);
                }
                Settlement::Nack(delay) => {
                    if let Some(entry) = group.open.get_mut(&self.sequence) {
                        entry.state = EntryState::Waiting {
                            not_before: Some(later(Instant::now(), delay)),
                        };
                    }
                }
            }
        }
        // Either frees this message's key for its successors or makes the message itself
        // (after its delay) and the consumer's in-flight room available again.
        self.notify.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Acker for InProcessAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settlement::Ack)
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        self.settle(Settlement::Nack(delay))
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The servers of each request channel, taken in turn.
    servers: Mutex<HashMap<String, Servers>>,
}

#[derive(Default)]
struct Servers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<super::Request>>,
    next: usize,
}

/// The requests of one channel for one server.
struct InProcessRequests(tokio::sync::mpsc::UnboundedReceiver<super::Request>);

#[async_trait]
impl super::Requests for InProcessRequests {
    async fn next(&mut self) -> Option<super::Request> {
        self.0.recv().await
    }
}

/// Sends the answer back to the waiting requester.
struct InProcessResponder(tokio::sync::oneshot::Sender<Bytes>);

#[async_trait]
impl super::Responder for InProcessResponder {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<(), TransportError> {
        self.0.send(payload).map_err(|_| {
            TransportError::transient(NAME, "answer a request", "the requester stopped waiting")
        })
    }
}

impl Shared {
    /// The state, also after a panic elsewhere while it was locked: every change to it is
    /// made in one step under the lock, so a panicking holder cannot leave it half updated.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `try_lock` because a `Debug` call must not wait on (or deadlock with) the broker.
        match self.state.try_lock() {
            Ok(state) => f
                .debug_struct("InProcess")
                .field("available", &state.available)
                .field("channels", &state.channels.len())
                .field("groups", &state.groups.len())
                .finish(),
            Err(_) => f.debug_struct("InProcess").finish_non_exhaustive(),
        }
    }
}

struct State {
    available: bool,
    channels: HashMap<String, Channel>,
    groups: HashMap<String, Group>,
    /// The number the next message taken gets: one sequence over every channel, so that it
    /// orders a key's messages across channels as they were published.
    next_sequence: u64,
    next_delivery: u64,
    next_consumer: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            available: true,
            channels: HashMap::new(),
            groups: HashMap::new(),
            next_sequence: 0,
            next_delivery: 0,
            next_consumer: 0,
        }
    }
}

struct Channel {
    /// Its name, shared by the entries of its messages.
    name: Arc<str>,
    log: Vec<Arc<Stored>>,
    /// Every message id ever appended, for deduplication: the log is never truncated, so
    /// neither is this.
    ids: HashSet<Uuid>,
}

impl Channel {
    fn new(name: &str) -> Self {
        Channel {
            name: Arc::from(name),
            log: Vec::new(),
            ids: HashSet::new(),
        }
    }
}

struct Stored {
    /// Its number in the broker's sequence over all channels.
    sequence: u64,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

#[derive(Default)]
struct Group {
    notify: Arc<Notify>,
    /// How far the group has looked into each of its channels' logs, by channel name: the
    /// messages below this offset are in `open` or acknowledged.
    admitted: HashMap<String, usize>,
    /// The messages the group has not acknowledged yet, of all its channels, by sequence
    /// number: in publish order across channels, the order per-key order follows.
    open: BTreeMap<u64, Entry>,
}

struct Entry {
    channel: Arc<str>,
    message: Arc<Stored>,
    /// How many times the message was handed out to the group.
    attempts: u32,
    state: EntryState,
}

enum EntryState {
    /// Not handed out now: new, nacked (then not before its delay has passed), or handed out
    /// once to a consumer that let its acknowledgement wait run out.
    Waiting { not_before: Option<Instant> },
    /// Handed out to `consumer` and not settled yet.
    InFlight {
        delivery: u64,
        consumer: u64,
        deadline: Instant,
    },
}

/// What one fetch asks of the state.
struct Take<'a> {
    group: &'a str,
    channels: &'a [Arc<str>],
    consumer: u64,
    room: usize,
    max_in_flight: usize,
    ack_wait: Duration,
    now: Instant,
}

/// One message handed out to a consumer.
struct Handout {
    channel: Arc<str>,
    sequence: u64,
    delivery: u64,
    attempt: u32,
    message: Arc<Stored>,
}

impl State {
    /// Appends `message` to its channel's log; `Ok(false)` when its id is already there.
    fn append(&mut self, message: &Outgoing) -> Result<bool, TransportError> {
        let Some(channel) = self.channels.get_mut(&message.channel) else {
            return Err(TransportError::permanent(
                NAME,
                format!("publish to `{}`", message.channel),
                "the channel is not provisioned",
            ));
        };
        if !channel.ids.insert(message.message_id) {
            tracing::debug!(
                target: "inseam::transport",
                transport = NAME,
                channel = %message.channel,
                message_id = %message.message_id,
                "duplicate publish dropped"
            );
            return Ok(false);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        channel.log.push(Arc::new(Stored {
            sequence,
            key: message.key.clone(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        }));
        Ok(true)
    }

    fn notifies_for(&self, channels: &HashSet<&str>) -> Vec<Arc<Notify>> {
        self.groups
            .values()
            .filter(|group| channels.iter().any(|c| group.admitted.contains_key(*c)))
            .map(|group| Arc::clone(&group.notify))
            .collect()
    }

    fn all_notifies(&self) -> Vec<Arc<Notify>> {
        self.groups
            .values()
            .map(|group| Arc::clone(&group.notify))
            .collect()
    }

    /// Hands out what `take.consumer` may have now, and says when something it may not have
    /// yet could become available by itself (a nack's delay or an acknowledgement wait
    /// running out); a publish or a settlement wakes it through the group's `Notify`.
    fn take(&mut self, take: &Take<'_>) -> (Vec<Handout>, Option<Instant>) {
        let State {
            channels,
            groups,
            next_delivery,
            ..
        } = self;
        let Some(group) = groups.get_mut(take.group) else {
            return (Vec::new(), None);
        };
        let Group { admitted, open, .. } = group;

        // First pass: admit what was published since the last look, on every channel of the
        // group (also those this consumer does not read: an earlier message of a key there
        // holds the key back here too), take back the deliveries whose acknowledgement wait
        // ran out, and count what this consumer holds.
        for (name, seen) in admitted.iter_mut() {
            let Some(channel) = channels.get(name) else {
                continue;
            };
            for message in channel.log.iter().skip(*seen) {
                open.insert(
                    message.sequence,
                    Entry {
                        channel: Arc::clone(&channel.name),
                        message: Arc::clone(message),
                        attempts: 0,
                        state: EntryState::Waiting { not_before: None },
                    },
                );
            }
            *seen = channel.log.len();
        }
        let mut wake: Option<Instant> = None;
        let mut held = 0usize;
        for entry in open.values_mut() {
            match entry.state {
                EntryState::InFlight { deadline, .. } if deadline <= take.now => {
                    entry.state = EntryState::Waiting { not_before: None };
                }
                EntryState::InFlight {
                    deadline, consumer, ..
                } => {
                    held += usize::from(consumer == take.consumer);
                    wake = earliest(wake, deadline);
                }
                EntryState::Waiting {
                    not_before: Some(at),
                } if at > take.now => {
                    wake = earliest(wake, at);
                }
                EntryState::Waiting { .. } => {}
            }
        }

        // Second pass: hand out ready messages of this consumer's channels in publish order
        // (the oldest first, so that a busy channel does not starve the others), skipping
        // every message behind an unsettled one of its key on any of the group's channels
        // (handed out, nacked, or just skipped itself).
        let room = take.room.min(take.max_in_flight.saturating_sub(held));
        let mut handouts = Vec::new();
        let mut blocked: HashSet<&str> = HashSet::new();
        for (&sequence, entry) in open.iter_mut() {
            if handouts.len() >= room {
                break;
            }
            let key = entry.message.key.as_deref();
            if key.is_some_and(|key| blocked.contains(key)) {
                continue;
            }
            let ready = match entry.state {
                EntryState::InFlight { .. } => false,
                EntryState::Waiting { not_before } => not_before.is_none_or(|at| at <= take.now),
            };
            let mine = take.channels.iter().any(|c| **c == *entry.channel);
            if ready && mine {
                let delivery = *next_delivery;
                *next_delivery += 1;
                entry.attempts = entry.attempts.saturating_add(1);
                entry.state = EntryState::InFlight {
                    delivery,
                    consumer: take.consumer,
                    deadline: later(take.now, take.ack_wait),
                };
                handouts.push(Handout {
                    channel: Arc::clone(&entry.channel),
                    sequence,
                    delivery,
                    attempt: entry.attempts,
                    message: Arc::clone(&entry.message),
                });
            }
            if let Some(key) = key {
                blocked.insert(key);
            }
        }
        (handouts, wake)
    }
}

fn earliest(current: Option<Instant>, candidate: Instant) -> Option<Instant> {
    Some(current.map_or(candidate, |current| current.min(candidate)))
}

/// `now + delay`, or a year from now when that does not fit in an `Instant`.
fn later(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

fn unavailable(operation: impl Into<String>) -> TransportError {
    TransportError::transient(NAME, operation, "the in-process broker is switched off")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str) -> Vec<String> {
        vec![name.to_owned()]
    }

    fn message(channel: &str, key: Option<&str>, body: &str) -> Outgoing {
        Outgoing {
            channel: channel.to_owned(),
            message_id: Uuid::now_v7(),
            key: key.map(str::to_owned),
            headers: vec![("traceparent".to_owned(), "00-abc-def-01".to_owned())],
            payload: Bytes::from(body.to_owned()),
        }
    }

    async fn broker_with(channels: &[&str]) -> InProcess {
        let broker = InProcess::new();
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        broker.provision(&channels).await.unwrap();
        broker
    }

    async fn publish_ok(broker: &InProcess, batch: &[Outgoing]) {
        let outcomes = broker.publish(batch).await;
        assert_eq!(outcomes.len(), batch.len());
        for outcome in outcomes {
            outcome.unwrap();
        }
    }

    fn bodies(received: &[Incoming]) -> Vec<&[u8]> {
        received.iter().map(|m| &m.payload[..]).collect()
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn an_outage_fails_every_operation_transiently_and_loses_nothing() {
        let broker = broker_with(&["a"]).await;
        let mut consumer = broker
            .subscribe(&Subscription::new("g", channel("a")))
            .await
            .unwrap();
        publish_ok(&broker, &[message("a", Some("k"), "1")]).await;
        let held = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&held), [b"1"]);

        broker.set_available(false);
        assert!(!broker.is_available());
        let outcomes = broker.publish(&[message("a", Some("k"), "2")]).await;
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].as_ref().is_err_and(|e| e.transient));
        assert!(
            broker
                .provision(&channel("b"))
                .await
                .is_err_and(|e| e.transient)
        );
        assert!(
            broker
                .subscribe(&Subscription::new("g", channel("a")))
                .await
                .is_err_and(|e| e.transient)
        );
        assert!(consumer.fetch(10, SHORT).await.is_err_and(|e| e.transient));
        assert!(held[0].ack().await.is_err_and(|e| e.transient));
        assert!(
            held[0]
                .nack(Duration::ZERO)
                .await
                .is_err_and(|e| e.transient)
        );

        broker.set_available(true);
        // The ack that failed changed nothing: the message is still held, and its key blocks
        // nothing else because the failed publish never got in.
        assert!(consumer.fetch(10, SHORT).await.unwrap().is_empty());
        held[0].ack().await.unwrap();
        publish_ok(&broker, &[message("a", Some("k"), "2")]).await;
        let next = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&next), [b"2"]);
        assert_eq!(next[0].attempt, 1);
        // A provisioning that failed during the outage did not half-happen.
        assert!(
            broker
                .publish(&[message("b", None, "x")])
                .await
                .remove(0)
                .is_err_and(|e| !e.transient)
        );
    }

    #[tokio::test]
    async fn an_outage_wakes_a_waiting_fetch_with_an_error() {
        let broker = broker_with(&["a"]).await;
        let mut consumer = broker
            .subscribe(&Subscription::new("g", channel("a")))
            .await
            .unwrap();
        let waiting =
            tokio::spawn(async move { consumer.fetch(10, Duration::from_secs(30)).await });
        tokio::time::sleep(SHORT).await;
        broker.set_available(false);
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_err_and(|e| e.transient));
    }

    #[tokio::test]
    async fn a_second_publish_of_a_message_id_is_dropped_and_reported_ok() {
        let broker = broker_with(&["a", "b"]).await;
        let first = message("a", Some("k"), "1");
        publish_ok(&broker, std::slice::from_ref(&first)).await;
        // Again alone, again within a batch, and twice in one batch.
        publish_ok(&broker, std::slice::from_ref(&first)).await;
        let second = message("a", Some("k"), "2");
        publish_ok(&broker, &[first.clone(), second.clone(), second.clone()]).await;
        // The same id on another channel is another message.
        let mut elsewhere = first.clone();
        elsewhere.channel = "b".to_owned();
        publish_ok(&broker, &[elsewhere]).await;

        let mut consumer = broker
            .subscribe(&Subscription::new("g", ["a", "b"]))
            .await
            .unwrap();
        let mut received = Vec::new();
        loop {
            let batch = consumer.fetch(10, SHORT).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for m in batch {
                m.ack().await.unwrap();
                received.push((m.channel.clone(), m.payload.clone()));
            }
        }
        received.sort();
        assert_eq!(
            received,
            [
                ("a".to_owned(), Bytes::from("1")),
                ("a".to_owned(), Bytes::from("2")),
                ("b".to_owned(), Bytes::from("1")),
            ]
        );
    }

    #[tokio::test]
    async fn unprovisioned_channels_and_broken_subscriptions_are_refused_permanently() {
        let broker = broker_with(&["a"]).await;
        let outcome = broker
            .publish(&[message("nope", None, "1")])
            .await
            .remove(0);
        assert!(outcome.is_err_and(|e| !e.transient));
        let refused = broker
            .subscribe(&Subscription::new("g", ["a", "nope"]))
            .await;
        assert!(refused.is_err_and(|e| !e.transient));
        assert!(
            broker
                .provision(&channel(""))
                .await
                .is_err_and(|e| !e.transient)
        );
        for broken in [
            Subscription {
                max_in_flight: 0,
                ..Subscription::new("g", channel("a"))
            },
            Subscription {
                ack_wait: Duration::ZERO,
                ..Subscription::new("g", channel("a"))
            },
            Subscription::new("g", Vec::<String>::new()),
        ] {
            assert!(broker.subscribe(&broken).await.is_err_and(|e| !e.transient));
        }
    }

    #[tokio::test]
    async fn a_fetch_returns_as_soon_as_a_message_is_published() {
        let broker = broker_with(&["a"]).await;
        let mut consumer = broker
            .subscribe(&Subscription::new("g", channel("a")))
            .await
            .unwrap();
        let started = Instant::now();
        let waiting =
            tokio::spawn(async move { consumer.fetch(10, Duration::from_secs(20)).await });
        tokio::time::sleep(SHORT).await;
        publish_ok(&broker, &[message("a", None, "1")]).await;
        let received = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(bodies(&received), [b"1"]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn at_most_max_in_flight_is_held_per_consumer() {
        let broker = broker_with(&["a"]).await;
        let batch: Vec<_> = (0..10)
            .map(|i| message("a", None, &i.to_string()))
            .collect();
        publish_ok(&broker, &batch).await;
        let mut subscription = Subscription::new("g", channel("a"));
        subscription.max_in_flight = 3;
        let mut first = broker.subscribe(&subscription).await.unwrap();
        let held = first.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&held), [b"0", b"1", b"2"]);
        assert!(first.fetch(10, SHORT).await.unwrap().is_empty());
        // Another consumer of the group has its own room.
        let mut second = broker.subscribe(&subscription).await.unwrap();
        assert_eq!(bodies(&second.fetch(2, SHORT).await.unwrap()), [b"3", b"4"]);
        held[0].ack().await.unwrap();
        assert_eq!(bodies(&first.fetch(10, SHORT).await.unwrap()), [b"5"]);
        assert_eq!(first.fetch(0, SHORT).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_nacked_message_holds_back_its_key_only() {
        let broker = broker_with(&["a"]).await;
        publish_ok(
            &broker,
            &[
                message("a", Some("k"), "k1"),
                message("a", Some("k"), "k2"),
                message("a", Some("other"), "o1"),
            ],
        )
        .await;
        let mut consumer = broker
            .subscribe(&Subscription::new("g", channel("a")))
            .await
            .unwrap();
        let first = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&first), [b"k1", b"o1"]);
        first[1].ack().await.unwrap();
        let nacked_at = Instant::now();
        first[0].nack(Duration::from_millis(300)).await.unwrap();
        let again = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
        assert!(nacked_at.elapsed() >= Duration::from_millis(300));
        assert_eq!(bodies(&again), [b"k1"]);
        assert_eq!(again[0].attempt, 2);
        again[0].ack().await.unwrap();
        let last = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&last), [b"k2"]);
        assert_eq!(last[0].attempt, 1);
    }

    #[tokio::test]
    async fn a_key_keeps_its_order_across_the_channels_of_a_group() {
        let broker = broker_with(&["placed", "confirmed", "shipped"]).await;
        publish_ok(
            &broker,
            &[
                message("placed", Some("order-1"), "placed"),
                message("confirmed", Some("order-1"), "confirmed"),
                message("confirmed", Some("order-2"), "other"),
                message("placed", Some("order-1"), "amended"),
                message("shipped", Some("order-1"), "shipped"),
            ],
        )
        .await;
        let mut consumer = broker
            .subscribe(&Subscription::new("g", ["placed", "confirmed"]))
            .await
            .unwrap();
        // A consumer of the group that reads only `shipped` still waits for the key's
        // earlier messages on the group's other channels.
        let mut shipping = broker
            .subscribe(&Subscription::new("g", ["shipped"]))
            .await
            .unwrap();
        assert!(shipping.fetch(10, SHORT).await.unwrap().is_empty());

        let first = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&first), [&b"placed"[..], b"other"]);
        first[1].ack().await.unwrap();
        first[0].nack(Duration::ZERO).await.unwrap();
        let again = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&again), [b"placed"]);
        assert_eq!(again[0].attempt, 2);
        again[0].ack().await.unwrap();
        let second = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&second), [b"confirmed"]);
        assert_eq!(second[0].channel, "confirmed");
        second[0].ack().await.unwrap();
        let third = consumer.fetch(10, SHORT).await.unwrap();
        assert_eq!(bodies(&third), [b"amended"]);
        assert!(shipping.fetch(10, SHORT).await.unwrap().is_empty());
        third[0].ack().await.unwrap();
        assert_eq!(
            bodies(&shipping.fetch(10, SHORT).await.unwrap()),
            [b"shipped"]
        );
        assert!(consumer.fetch(10, SHORT).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_superseded_delivery_cannot_settle_the_message() {
        let broker = broker_with(&["a"]).await;
        publish_ok(&broker, &[message("a", Some("k"), "1")]).await;
        let mut subscription = Subscription::new("g", channel("a"));
        subscription.ack_wait = Duration::from_millis(100);
        let mut consumer = broker.subscribe(&subscription).await.unwrap();
        let stale = consumer.fetch(10, SHORT).await.unwrap();
        let fresh = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].attempt, 2);
        // The late ack of the first delivery does not settle the second one, which still
        // comes again after its own wait unless it is acknowledged.
        stale[0].ack().await.unwrap();
        let third = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(third[0].attempt, 3);
        third[0].ack().await.unwrap();
        third[0].ack().await.unwrap();
        assert!(
            consumer
                .fetch(10, Duration::from_millis(300))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn clones_share_one_broker() {
        let publisher = broker_with(&["a"]).await;
        let consumer_side = publisher.clone();
        let mut consumer = consumer_side
            .subscribe(&Subscription::new("g", channel("a")))
            .await
            .unwrap();
        publish_ok(&publisher, &[message("a", None, "1")]).await;
        assert_eq!(bodies(&consumer.fetch(10, SHORT).await.unwrap()), [b"1"]);
        publisher.set_available(false);
        assert!(!consumer_side.is_available());
    }
}
