//! A group's durable consumer: one Kafka consumer-group member reading the whole topic on a
//! thread of its own, handing out each partition's messages one at a time (decision 0021).
//!
//! The thread polls librdkafka and files each record under its partition: a record of a
//! channel the group reads waits in the partition's queue, one of another channel is settled
//! at once. [`KafkaConsumer::fetch`] hands out the head of every partition whose head is not
//! already out. An acknowledgement settles its message, and the thread commits each
//! partition's offset soon after: the first offset not yet settled ([`Progress`]), so a commit
//! never passes a message still in flight.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use inseam_core::transport::{Acker, Consumer, Incoming, TransportError};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::layout;
use crate::{NAME, TARGET};

/// A partition whose queue holds this many records stops fetching until it is half empty.
const PAUSE_AT: usize = 256;
/// How long the thread waits in one poll.
const POLL: Duration = Duration::from_millis(50);
/// How often the thread commits the settled progress (acknowledged messages, and records of
/// channels the group does not read) when there is some to commit.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How long a consumer-side failure is reported by an empty fetch.
const FAILURE_SHOWN: Duration = Duration::from_secs(5);
/// How many low bits of a delivery-count commit hold the count (the offset is above them).
const COUNT_BITS: u32 = 16;

/// The settled offsets of one partition: the first unsettled offset is where the group
/// resumes, so a commit is never past a message in flight, whatever came after it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Progress {
    unsettled: BTreeSet<i64>,
    end: Option<i64>,
}

impl Progress {
    /// A record was received: settled at once (a channel the group does not read) or not.
    pub(crate) fn seen(&mut self, offset: i64, settled: bool) {
        if !settled {
            self.unsettled.insert(offset);
        }
        self.end = Some(self.end.map_or(offset + 1, |end| end.max(offset + 1)));
    }

    /// The record at `offset` is done with.
    pub(crate) fn settle(&mut self, offset: i64) {
        self.unsettled.remove(&offset);
    }

    /// The offset to commit: the first unsettled one, or the one after everything received.
    /// `None` before anything was received.
    pub(crate) fn position(&self) -> Option<i64> {
        self.unsettled.first().copied().or(self.end)
    }
}

/// A message handed out: its partition, its offset, and how often it was handed out.
type Handout = (i32, i64, u32);

/// A record waiting in its partition's queue (the head may be out).
struct Buffered {
    offset: i64,
    channel: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

/// The head of a partition, handed out and not settled.
struct Out {
    token: u64,
    since: Instant,
}

/// What the committed offset said about the partition's head when it was assigned.
enum Handed {
    /// Not read yet: nothing is handed out before.
    Unknown { failures: u32 },
    /// The offset handed out, and how often, by an earlier member of the group.
    Known(Option<(i64, u32)>),
}

struct PartitionState {
    generation: u64,
    handed_before: Handed,
    progress: Progress,
    queue: VecDeque<Buffered>,
    /// How often the head was handed out.
    head_handed: u32,
    out: Option<Out>,
    not_before: Option<Instant>,
    paused: bool,
    /// The last committed offset.
    committed: Option<i64>,
}

impl PartitionState {
    fn new(generation: u64) -> Self {
        PartitionState {
            generation,
            handed_before: Handed::Unknown { failures: 0 },
            progress: Progress::default(),
            queue: VecDeque::new(),
            head_handed: 0,
            out: None,
            not_before: None,
            paused: false,
            committed: None,
        }
    }
}

#[derive(Default)]
struct State {
    partitions: HashMap<i32, PartitionState>,
    generation: u64,
    assigned: bool,
    next_token: u64,
    /// Where the next fetch starts looking, so that no partition starves the others.
    cursor: usize,
    failure: Option<(String, std::time::Instant)>,
    fatal: Option<String>,
    stop: bool,
}

/// What the consumer's thread, its context and its ackers share.
pub(crate) struct Core {
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) channels: HashSet<String>,
    pub(crate) ack_wait: Duration,
    pub(crate) request_timeout: Duration,
    state: Mutex<State>,
    notify: Notify,
    /// Held while an offset is computed and committed, so that commits never go backwards.
    commit_lock: Mutex<()>,
}

impl Core {
    pub(crate) fn new(
        group: String,
        topic: String,
        channels: HashSet<String>,
        ack_wait: Duration,
        request_timeout: Duration,
    ) -> Self {
        Core {
            group,
            topic,
            channels,
            ack_wait,
            request_timeout,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            commit_lock: Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self, failure: String) {
        tracing::debug!(target: TARGET, group = %self.group, failure = %failure, "Kafka consumer failure");
        self.state().failure = Some((failure, std::time::Instant::now()));
        self.notify.notify_waiters();
    }

    /// Commits the progress of `partitions` (every assigned partition when `None`) that is
    /// not committed yet (blocking): from the consumer's thread, and before a rebalance takes
    /// partitions away.
    fn commit(
        &self,
        consumer: &BaseConsumer<Context>,
        partitions: Option<&[i32]>,
    ) -> KafkaResult<()> {
        let _serial = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut list = TopicPartitionList::new();
        let mut planned = Vec::new();
        {
            let state = self.state();
            let mut all: Vec<i32> = state.partitions.keys().copied().collect();
            all.sort_unstable();
            for partition in partitions.unwrap_or(&all) {
                let Some(current) = state.partitions.get(partition) else {
                    continue;
                };
                let Some(position) = current.progress.position() else {
                    continue;
                };
                if current.committed == Some(position) {
                    continue;
                }
                list.add_partition_offset(&self.topic, *partition, Offset::Offset(position))?;
                planned.push((*partition, current.generation, position));
            }
        }
        if planned.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let committed = consumer.commit(&list, CommitMode::Sync);
        tracing::debug!(target: TARGET, group = %self.group, took = ?started.elapsed(), ok = committed.is_ok(), "offset commit");
        committed?;
        let mut state = self.state();
        for (partition, generation, point) in planned {
            if let Some(current) = state.partitions.get_mut(&partition)
                && current.generation == generation
            {
                current.committed = Some(point);
            }
        }
        Ok(())
    }
}

/// librdkafka's callbacks: rebalances and logs.
pub(crate) struct Context {
    pub(crate) core: Arc<Core>,
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::log_rdkafka(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(target: TARGET, group = %self.core.group, error = %error, reason, "Kafka consumer error");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // What was settled is committed before another member takes the partitions.
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            if let Err(error) = self.core.commit(consumer, Some(&partitions)) {
                tracing::debug!(target: TARGET, group = %self.core.group, error = %error, "could not commit before a rebalance");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // librdkafka keeps a partition paused across a rebalance (the pause belongs to the
            // client's partition, not to the assignment): one this member paused for a full
            // queue before the group took it away would never fetch again once it came back,
            // its new state not paused. Every assigned partition starts fetching.
            if let Err(error) = consumer.resume(list) {
                tracing::debug!(target: TARGET, group = %self.core.group, error = %error, "could not resume the assigned partitions");
            }
        }
        let mut state = self.core.state();
        match rebalance {
            Rebalance::Assign(list) => {
                state.generation += 1;
                let generation = state.generation;
                for element in list.elements() {
                    state
                        .partitions
                        .insert(element.partition(), PartitionState::new(generation));
                }
                state.assigned = true;
                tracing::debug!(
                    target: TARGET,
                    group = %self.core.group,
                    partitions = ?list.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(),
                    "partitions assigned"
                );
            }
            Rebalance::Revoke(list) => {
                for element in list.elements() {
                    state.partitions.remove(&element.partition());
                }
                tracing::debug!(target: TARGET, group = %self.core.group, "partitions revoked");
            }
            Rebalance::Error(error) => {
                state.failure = Some((
                    format!("the group's rebalance failed: {error}"),
                    std::time::Instant::now(),
                ));
            }
        }
        drop(state);
        self.core.notify.notify_waiters();
    }
}

/// The consumer and what its thread and ackers share.
pub(crate) struct Shared {
    pub(crate) core: Arc<Core>,
    pub(crate) consumer: BaseConsumer<Context>,
    /// A client of the group's companion group (`<topic>.<group>.deliveries`), which never
    /// subscribes: its committed offset for a partition records which message of the
    /// partition was last handed out, and how often (`offset << 16 | count`).
    pub(crate) deliveries: BaseConsumer<crate::Logs>,
}

impl Shared {
    /// Records, in the companion group, how often each of `handed` (partition, offset,
    /// count) was handed out. The commit is sent at once and not waited for (librdkafka sends
    /// it from its own thread, and the consumer's thread serves its answer): a process that
    /// dies handling the message has most likely sent it already, and the member that gets
    /// the partition next counts on from it.
    fn record_handed(&self, handed: &[Handout]) -> KafkaResult<()> {
        let mut list = TopicPartitionList::new();
        for &(partition, offset, count) in handed {
            let encoded = (offset << COUNT_BITS) | i64::from(count.min((1 << COUNT_BITS) - 1));
            list.add_partition_offset(&self.core.topic, partition, Offset::Offset(encoded))?;
        }
        self.deliveries.commit(&list, CommitMode::Async)
    }

    /// The consumer's thread: polls librdkafka until the consumer is dropped.
    pub(crate) fn run(self: Arc<Self>) {
        let mut last_commit = std::time::Instant::now();
        loop {
            if self.core.state().stop {
                break;
            }
            self.read_handed_before();
            // Serves the answers to the delivery count's commits.
            let _ = self.deliveries.poll(Duration::ZERO);
            match self.consumer.poll(POLL) {
                Some(Ok(message)) => self.receive(&message),
                Some(Err(error)) => {
                    let fatal = matches!(
                        error,
                        rdkafka::error::KafkaError::MessageConsumptionFatal(_)
                    );
                    if fatal {
                        self.core.state().fatal = Some(error.to_string());
                    }
                    self.core.failed(format!("consuming failed: {error}"));
                }
                None => {}
            }
            self.resume_drained();
            if last_commit.elapsed() >= COMMIT_EVERY {
                last_commit = std::time::Instant::now();
                if let Err(error) = self.core.commit(&self.consumer, None) {
                    tracing::debug!(target: TARGET, group = %self.core.group, error = %error, "periodic offset commit failed");
                }
            }
        }
        // What was settled and not committed yet (records of other channels) is committed
        // before the consumer leaves the group (when the thread's `Shared` is dropped).
        if let Err(error) = self.core.commit(&self.consumer, None) {
            tracing::debug!(target: TARGET, group = %self.core.group, error = %error, "the last offset commit failed");
        }
        tracing::debug!(target: TARGET, group = %self.core.group, "Kafka consumer stopping");
    }

    /// Reads, for newly assigned partitions, which message an earlier member of the group
    /// handed out last and how often (the companion group's offsets), so that its attempts
    /// go on counting.
    fn read_handed_before(&self) {
        let pending: Vec<(i32, u64)> = {
            let state = self.core.state();
            state
                .partitions
                .iter()
                .filter(|(_, p)| matches!(p.handed_before, Handed::Unknown { .. }))
                .map(|(partition, p)| (*partition, p.generation))
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, _) in &pending {
            list.add_partition(&self.core.topic, *partition);
        }
        let read = self
            .deliveries
            .committed_offsets(list, self.core.request_timeout);
        let mut state = self.core.state();
        match read {
            Ok(list) => {
                for element in list.elements() {
                    let handed = match element.offset() {
                        Offset::Offset(encoded) if encoded >= 0 => Some((
                            encoded >> COUNT_BITS,
                            u32::try_from(encoded & ((1 << COUNT_BITS) - 1)).unwrap_or(0),
                        )),
                        _ => None,
                    };
                    if let Some(current) = state.partitions.get_mut(&element.partition())
                        && matches!(current.handed_before, Handed::Unknown { .. })
                    {
                        current.handed_before = Handed::Known(handed);
                    }
                }
            }
            Err(error) => {
                // After a few failures the partition is handed out anyway, its attempts
                // counted from 1.
                for (partition, generation) in pending {
                    if let Some(current) = state.partitions.get_mut(&partition)
                        && current.generation == generation
                        && let Handed::Unknown { failures } = &mut current.handed_before
                    {
                        *failures += 1;
                        if *failures >= 3 {
                            current.handed_before = Handed::Known(None);
                        }
                    }
                }
                state.failure = Some((
                    format!("could not read the group's committed offsets: {error}"),
                    std::time::Instant::now(),
                ));
            }
        }
        drop(state);
        self.core.notify.notify_waiters();
    }

    fn receive(&self, message: &rdkafka::message::BorrowedMessage<'_>) {
        let partition = message.partition();
        let offset = message.offset();
        let (channel, headers) = layout::decode_headers(message.headers());
        let read = channel
            .as_ref()
            .is_some_and(|channel| self.core.channels.contains(channel));
        let pause = {
            let mut state = self.core.state();
            state.failure = None;
            let Some(current) = state.partitions.get_mut(&partition) else {
                return;
            };
            if current.progress.end.is_some_and(|end| offset < end) {
                // Received already (a fetch that librdkafka repeated).
                return;
            }
            current.progress.seen(offset, !read);
            if let (true, Some(channel)) = (read, channel) {
                current.queue.push_back(Buffered {
                    offset,
                    channel,
                    key: message
                        .key()
                        .map(|key| String::from_utf8_lossy(key).into_owned()),
                    headers,
                    payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
                });
            }
            let pause = !current.paused && current.queue.len() >= PAUSE_AT;
            current.paused |= pause;
            pause
        };
        if pause {
            self.flow(partition, true);
        }
        self.core.notify.notify_waiters();
    }

    fn resume_drained(&self) {
        let drained: Vec<i32> = {
            let mut state = self.core.state();
            state
                .partitions
                .iter_mut()
                .filter(|(_, p)| p.paused && p.queue.len() <= PAUSE_AT / 2)
                .map(|(partition, p)| {
                    p.paused = false;
                    *partition
                })
                .collect()
        };
        for partition in drained {
            self.flow(partition, false);
        }
    }

    fn flow(&self, partition: i32, pause: bool) {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.core.topic, partition);
        let done = if pause {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        if let Err(error) = done {
            tracing::debug!(target: TARGET, group = %self.core.group, partition, pause, error = %error, "could not pause or resume a partition");
        }
    }
}

/// A durable consumer of one group over Kafka. Dropping it leaves the group (its thread
/// closes the librdkafka consumer); what it handed out and was not acknowledged is delivered
/// again to the member that gets the partition.
pub struct KafkaConsumer {
    shared: Arc<Shared>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = &self.shared.core;
        f.debug_struct("KafkaConsumer")
            .field("group", &core.group)
            .field("topic", &core.topic)
            .field("channels", &core.channels)
            .field("ack_wait", &core.ack_wait)
            .finish_non_exhaustive()
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.shared.core.state().stop = true;
    }
}

impl KafkaConsumer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        KafkaConsumer { shared }
    }

    /// Waits until the group assigned partitions to this member (possibly none), or `wait`.
    pub(crate) async fn wait_assigned(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.shared.core.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.core.state().assigned {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.shared.core.state().assigned;
            }
        }
    }

    /// Hands out the head of each ready partition, up to `max`; returns what was handed
    /// out (partition, offset, count), to record, and when to look again.
    fn take(&self, max: usize) -> (Vec<Incoming>, Vec<Handout>, Option<Instant>) {
        let core = &self.shared.core;
        let now = Instant::now();
        let mut state = core.state();
        let mut partitions: Vec<i32> = state.partitions.keys().copied().collect();
        partitions.sort_unstable();
        if !partitions.is_empty() {
            let start = state.cursor % partitions.len();
            partitions.rotate_left(start);
            state.cursor = state.cursor.wrapping_add(1);
        }
        let mut out = Vec::new();
        let mut handed = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut soonest = |at: Instant| wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
        for partition in partitions {
            if out.len() >= max {
                break;
            }
            let token = state.next_token;
            let Some(current) = state.partitions.get_mut(&partition) else {
                continue;
            };
            let Handed::Known(before) = current.handed_before else {
                continue;
            };
            if let Some(held) = &current.out {
                let expires = held.since + core.ack_wait;
                if expires > now {
                    soonest(expires);
                    continue;
                }
                // Held past the acknowledgement wait: handed out again, as the broker
                // would to a member that went silent.
                tracing::debug!(target: TARGET, group = %core.group, partition, "a message was held past its ack wait; handing it out again");
                current.out = None;
            }
            if let Some(not_before) = current.not_before {
                if not_before > now {
                    soonest(not_before);
                    continue;
                }
                current.not_before = None;
            }
            let Some(head) = current.queue.front() else {
                continue;
            };
            if current.head_handed == 0
                && let Some((offset, count)) = before
                && offset == head.offset
            {
                current.head_handed = count;
            }
            current.head_handed = current.head_handed.saturating_add(1);
            current.out = Some(Out { token, since: now });
            out.push(Incoming {
                channel: head.channel.clone(),
                key: head.key.clone(),
                headers: head.headers.clone(),
                payload: head.payload.clone(),
                attempt: current.head_handed,
                acker: Box::new(KafkaAcker {
                    shared: Arc::downgrade(&self.shared),
                    partition,
                    generation: current.generation,
                    offset: head.offset,
                    token,
                }),
            });
            handed.push((partition, head.offset, current.head_handed));
            state.next_token = token + 1;
        }
        (out, handed, wake)
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let core = Arc::clone(&self.shared.core);
        let operation = || format!("fetch for group `{}`", core.group);
        let deadline = Instant::now() + wait;
        loop {
            let notified = core.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(fatal) = core.state().fatal.clone() {
                return Err(TransportError::permanent(NAME, operation(), fatal));
            }
            let (out, handed, wake) = self.take(max);
            if !out.is_empty() {
                // How often each message was handed out is recorded in the companion group,
                // so that the member that gets its partition next counts on.
                if let Err(error) = self.shared.record_handed(&handed) {
                    tracing::debug!(target: TARGET, group = %core.group, error = %error, "could not record the delivery count");
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                let state = core.state();
                if let Some((failure, at)) = &state.failure
                    && at.elapsed() < FAILURE_SHOWN
                {
                    return Err(TransportError::transient(
                        NAME,
                        operation(),
                        failure.clone(),
                    ));
                }
                return Ok(Vec::new());
            }
            let until = wake.map_or(deadline, |wake| wake.min(deadline));
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }
}

/// Settles one handed-out message. The consumer's thread commits the partition's offset
/// within [`COMMIT_EVERY`] of an acknowledgement (a commit takes a round trip to the group
/// coordinator, which the caller does not wait for): one commit covers every message settled
/// since the last, and a group's rate is not bounded by one round trip per batch. A crash or
/// a broker restart in between (or a rebalance that gave the member no time to commit first)
/// delivers the message again, and the inbox skips it.
struct KafkaAcker {
    shared: Weak<Shared>,
    partition: i32,
    generation: u64,
    offset: i64,
    token: u64,
}

impl KafkaAcker {
    fn operation(&self, what: &str) -> String {
        format!(
            "{what} the message at offset {} of partition {}",
            self.offset, self.partition
        )
    }

    fn gone(&self, what: &str, why: &str) -> TransportError {
        TransportError::transient(NAME, self.operation(what), why.to_owned())
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(self.gone(
                "acknowledge",
                "its consumer is gone; the group delivers the message again",
            ));
        };
        {
            let mut state = shared.core.state();
            let Some(current) = state
                .partitions
                .get_mut(&self.partition)
                .filter(|p| p.generation == self.generation)
            else {
                return Err(self.gone(
                    "acknowledge",
                    "its partition went to another member of the group, which delivers it again",
                ));
            };
            if current
                .queue
                .front()
                .is_some_and(|head| head.offset == self.offset)
            {
                current.queue.pop_front();
                current.progress.settle(self.offset);
                current.head_handed = 0;
                current.out = None;
                current.not_before = None;
            }
        }
        shared.core.notify.notify_waiters();
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        let Some(shared) = self.shared.upgrade() else {
            // Delivered again anyway, by the member that gets the partition.
            return Ok(());
        };
        {
            let mut state = shared.core.state();
            if let Some(current) = state
                .partitions
                .get_mut(&self.partition)
                .filter(|p| p.generation == self.generation)
                && current
                    .out
                    .as_ref()
                    .is_some_and(|out| out.token == self.token)
            {
                current.out = None;
                current.not_before = Some(Instant::now() + delay);
            }
        }
        shared.core.notify.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn commit_position_stops_at_the_first_unsettled_offset() {
        let mut progress = Progress::default();
        assert_eq!(progress.position(), None);
        for offset in 10..14 {
            progress.seen(offset, false);
        }
        // 11 and 12 are acknowledged while 10 is in flight: nothing can be committed past 10.
        progress.settle(11);
        progress.settle(12);
        assert_eq!(progress.position(), Some(10));
        progress.settle(10);
        assert_eq!(progress.position(), Some(13));
        progress.settle(13);
        assert_eq!(progress.position(), Some(14));
    }

    #[test]
    fn records_settled_on_arrival_move_the_position_only_up_to_an_unsettled_one() {
        let mut progress = Progress::default();
        progress.seen(0, false);
        progress.seen(1, true);
        progress.seen(2, true);
        assert_eq!(progress.position(), Some(0));
        progress.settle(0);
        assert_eq!(progress.position(), Some(3));
    }
}
