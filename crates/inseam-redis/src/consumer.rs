//! A group's durable consumer: one task per partition stream, each reading its partition only
//! while it holds the group's lease on it, one message at a time, into one queue that
//! [`RedisConsumer::fetch`] reads.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use inseam_core::transport::{Acker, Consumer, Incoming, Subscription, TransportError};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::layout::{self, Entry};
use crate::{NAME, RedisOptions, TARGET, command_error, scripts};

/// The longest a blocking read waits before the task looks at its lease again.
const BLOCK_MAX: Duration = Duration::from_secs(1);
/// How often a task that does not hold its lease asks for it.
const ACQUIRE_POLL: Duration = Duration::from_millis(100);
/// How often a consumer looks at its group's members (and renews its own membership) at
/// most: a consumer that joins is dealt its partitions within about this, not a lease period.
const MEMBERSHIP_POLL: Duration = Duration::from_millis(100);
/// How often a partition's acknowledged entries are trimmed, at most.
const TRIM_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What `subscribe` hands to [`RedisConsumer::start`].
pub(crate) struct Setup {
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) options: RedisOptions,
    pub(crate) subscription: Subscription,
}

/// What every task of one consumer shares.
struct Shared {
    conn: ConnectionManager,
    prefix: String,
    group: String,
    /// This consumer's name in the Redis consumer groups, and its token on leases.
    token: String,
    channels: HashSet<String>,
    ack_wait: Duration,
    lease_ttl: Duration,
    trim_acknowledged: bool,
    /// The group's live consumers, sorted by name.
    members: watch::Receiver<Arc<Vec<String>>>,
    health: Health,
}

/// A message handed to the queue and not yet fetched.
struct Pulled {
    received: Instant,
    incoming: Incoming,
}

/// The last failure of each partition's task, cleared when it works again.
struct Health {
    failures: Mutex<Vec<Option<String>>>,
}

impl Health {
    /// Records the partition's state; returns whether it was failing before.
    fn set(&self, partition: u16, failure: Option<String>) -> bool {
        if let Ok(mut failures) = self.failures.lock()
            && let Some(slot) = failures.get_mut(usize::from(partition))
        {
            return std::mem::replace(slot, failure).is_some();
        }
        false
    }

    fn first(&self) -> Option<(usize, String)> {
        let failures = self.failures.lock().ok()?;
        failures
            .iter()
            .enumerate()
            .find_map(|(partition, failure)| failure.clone().map(|f| (partition, f)))
    }
}

/// A durable consumer of one group over Redis Streams. Dropping it stops its tasks and lets go
/// of its partitions; what it handed out and was not acknowledged goes to a consumer of the
/// group again once it has been pending for the subscription's ack wait.
pub struct RedisConsumer {
    shared: Arc<Shared>,
    partitions: u16,
    queue: mpsc::UnboundedReceiver<Pulled>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("group", &self.shared.group)
            .field("consumer", &self.shared.token)
            .field("partitions", &self.partitions)
            .field("ack_wait", &self.shared.ack_wait)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Let go of the leases and the membership at once, rather than after their expiry.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = Arc::clone(&self.shared);
            let partitions = self.partitions;
            runtime.spawn(async move {
                let timeout = shared.lease_ttl;
                let leaving = async {
                    let mut conn = shared.conn.clone();
                    for partition in 0..partitions {
                        let _ = release(&mut conn, &shared, partition).await;
                    }
                    let _ = membership(&mut conn, &shared, false).await;
                };
                let _ = tokio::time::timeout(timeout, leaving).await;
            });
        }
    }
}

/// Joins the group's members (or leaves them): returns the live members, sorted.
async fn membership(
    conn: &mut ConnectionManager,
    shared: &Shared,
    join: bool,
) -> redis::RedisResult<Vec<String>> {
    membership_of(
        conn,
        &shared.prefix,
        &shared.group,
        &shared.token,
        shared.lease_ttl,
        join,
    )
    .await
}

async fn membership_of(
    conn: &mut ConnectionManager,
    prefix: &str,
    group: &str,
    token: &str,
    ttl: Duration,
    join: bool,
) -> redis::RedisResult<Vec<String>> {
    let mut members: Vec<String> = redis::Script::new(scripts::MEMBERS)
        .key(layout::members_key(prefix, group))
        .arg(token)
        .arg(millis(ttl))
        .arg(if join { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    members.sort();
    Ok(members)
}

async fn release(
    conn: &mut ConnectionManager,
    shared: &Shared,
    partition: u16,
) -> redis::RedisResult<i64> {
    redis::Script::new(scripts::RELEASE)
        .key(layout::lease_key(&shared.prefix, &shared.group, partition))
        .arg(&shared.token)
        .invoke_async(conn)
        .await
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RedisConsumer {
    /// Joins the group's members and starts the membership task and one task per partition.
    pub(crate) async fn start(setup: Setup) -> redis::RedisResult<Self> {
        let Setup {
            client,
            mut conn,
            options,
            subscription,
        } = setup;
        let token = uuid::Uuid::now_v7().to_string();
        let members = membership_of(
            &mut conn,
            &options.prefix,
            &subscription.group,
            &token,
            options.lease_ttl,
            true,
        )
        .await?;
        let (members_tx, members_rx) = watch::channel(Arc::new(members));
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            prefix: options.prefix.clone(),
            group: subscription.group.clone(),
            token,
            channels: subscription.channels.iter().cloned().collect(),
            ack_wait: subscription.ack_wait,
            lease_ttl: options.lease_ttl,
            trim_acknowledged: options.trim_acknowledged,
            members: members_rx,
            health: Health {
                failures: Mutex::new(vec![None; usize::from(options.partitions)]),
            },
        });
        let (tx, queue) = mpsc::unbounded_channel();
        let mut tasks = vec![tokio::spawn(keep_membership(
            Arc::clone(&shared),
            members_tx,
        ))];
        // A blocking read holds its connection: each partition reads on one of its own.
        let reader_timeout = BLOCK_MAX + options.request_timeout;
        for partition in 0..options.partitions {
            let reader = ConnectionManager::new_lazy_with_config(
                client.clone(),
                crate::manager_config(&options, reader_timeout),
            )?;
            let (settle_tx, settle_rx) = mpsc::unbounded_channel();
            let task = PartitionTask {
                shared: Arc::clone(&shared),
                partition,
                stream: layout::stream_key(&options.prefix, partition),
                lease: layout::lease_key(&options.prefix, &subscription.group, partition),
                reader,
                queue: tx.clone(),
                settle_tx,
                settle_rx,
            };
            tasks.push(tokio::spawn(task.run()));
        }
        tracing::debug!(
            target: TARGET,
            group = %shared.group,
            consumer = %shared.token,
            "subscribed"
        );
        Ok(RedisConsumer {
            shared,
            partitions: options.partitions,
            queue,
            tasks,
        })
    }

    /// Moves what is queued into `out`, up to `max`, dropping messages held longer than the ack
    /// wait: their partition's task has handed them out again.
    fn drain(&mut self, first: Option<Pulled>, out: &mut Vec<Incoming>, max: usize) {
        let mut next = first;
        loop {
            let pulled = match next.take() {
                Some(pulled) => pulled,
                None if out.len() < max => match self.queue.try_recv() {
                    Ok(pulled) => pulled,
                    Err(_) => return,
                },
                None => return,
            };
            if pulled.received.elapsed() >= self.shared.ack_wait {
                tracing::debug!(
                    target: TARGET,
                    group = %self.shared.group,
                    channel = %pulled.incoming.channel,
                    "dropped a message held past its ack wait; it is handed out again"
                );
                continue;
            }
            out.push(pulled.incoming);
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        self.drain(None, &mut out, max);
        if !out.is_empty() {
            return Ok(out);
        }
        let deadline = Instant::now() + wait;
        while out.is_empty() {
            match tokio::time::timeout_at(deadline, self.queue.recv()).await {
                Ok(Some(pulled)) => self.drain(Some(pulled), &mut out, max),
                Ok(None) => {
                    return Err(TransportError::permanent(
                        NAME,
                        format!("fetch for group `{}`", self.shared.group),
                        "every partition's task stopped",
                    ));
                }
                Err(_) => break,
            }
        }
        if out.is_empty()
            && let Some((partition, failure)) = self.shared.health.first()
        {
            return Err(TransportError::transient(
                NAME,
                format!(
                    "fetch for group `{}` (partition {partition})",
                    self.shared.group
                ),
                failure,
            ));
        }
        Ok(out)
    }
}

/// Renews this consumer's membership of its group, every [`MEMBERSHIP_POLL`] (at least three
/// times per lease period), and tells the partition tasks who the group's members are.
async fn keep_membership(shared: Arc<Shared>, members: watch::Sender<Arc<Vec<String>>>) {
    let mut conn = shared.conn.clone();
    let every = (shared.lease_ttl / 3).min(MEMBERSHIP_POLL);
    loop {
        tokio::time::sleep(every).await;
        match membership(&mut conn, &shared, true).await {
            Ok(live) => {
                members.send_if_modified(|known| {
                    let changed = **known != live;
                    if changed {
                        tracing::debug!(
                            target: TARGET,
                            group = %shared.group,
                            members = live.len(),
                            "the group's consumers changed"
                        );
                        *known = Arc::new(live);
                    }
                    changed
                });
            }
            Err(err) => tracing::debug!(
                target: TARGET,
                group = %shared.group,
                error = %err,
                "could not renew the consumer's membership"
            ),
        }
    }
}

/// How an acknowledgement or a nack reaches the partition's task.
enum Settled {
    Ack(String),
    Nack(String, Duration),
}

/// The message a partition's task handed out and that is not acknowledged yet.
struct Held {
    entry: Entry,
    attempt: u32,
    state: HeldState,
}

enum HeldState {
    /// Handed out; given again if not settled by then.
    Out { until: Instant },
    /// Nacked or unsettled past its ack wait: given again at that time.
    Due { at: Instant },
}

/// What looking at a partition's pending entries found.
enum Pending {
    /// A pending entry claimed, to hand out.
    Claimed(Held),
    /// A pending entry whose holder may still settle it: look again after this long.
    NotYet(Duration),
    /// Something was cleaned up (an entry of another channel, one trimmed): look again.
    Again,
    /// Nothing pending.
    Clear,
}

/// Reads one group's partition stream while holding the lease on it.
struct PartitionTask {
    shared: Arc<Shared>,
    partition: u16,
    stream: String,
    lease: String,
    /// A connection of its own for `XREADGROUP ... BLOCK`.
    reader: ConnectionManager,
    queue: mpsc::UnboundedSender<Pulled>,
    settle_tx: mpsc::UnboundedSender<Settled>,
    settle_rx: mpsc::UnboundedReceiver<Settled>,
}

/// The queue's reader is gone: the consumer was dropped.
struct Gone;

impl PartitionTask {
    async fn run(mut self) {
        let renew_every = self.shared.lease_ttl / 3;
        let mut holding = false;
        let mut renew_at = Instant::now();
        let mut check_pending = true;
        let mut held: Option<Held> = None;
        let mut trim_wanted = false;
        let mut last_trim = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            while let Ok(settled) = self.settle_rx.try_recv() {
                trim_wanted |= settle(&mut held, settled);
            }
            let preferred = self.preferred();
            if !holding {
                if preferred {
                    match self.take_lease().await {
                        Ok(true) => {
                            holding = true;
                            renew_at = Instant::now() + renew_every;
                            check_pending = true;
                            held = None;
                            self.recovered();
                        }
                        Ok(false) => {}
                        Err(err) => self.failed(format!("could not take its lease: {err}")),
                    }
                }
                if !holding {
                    tokio::time::sleep(ACQUIRE_POLL).await;
                    continue;
                }
            }
            if Instant::now() >= renew_at {
                match self.take_lease().await {
                    Ok(true) => {
                        renew_at = Instant::now() + renew_every;
                        // Pending entries of a consumer that held the partition before, and
                        // lost it while reading, are looked at again.
                        check_pending = true;
                        self.recovered();
                    }
                    Ok(false) => {
                        tracing::warn!(
                            target: TARGET,
                            group = %self.shared.group,
                            partition = self.partition,
                            "lost the lease on the partition; another consumer reads it"
                        );
                        holding = false;
                        held = None;
                        continue;
                    }
                    Err(err) => {
                        self.failed(format!("could not renew its lease: {err}"));
                        // Past the lease's life, another consumer may have it: start over.
                        if Instant::now() >= renew_at + (self.shared.lease_ttl - renew_every) {
                            holding = false;
                            held = None;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            if !preferred && held.is_none() {
                // Another consumer of the group should read it: hand it over between messages.
                let mut conn = self.shared.conn.clone();
                if release(&mut conn, &self.shared, self.partition)
                    .await
                    .is_ok()
                {
                    holding = false;
                    continue;
                }
            }
            if trim_wanted && self.shared.trim_acknowledged && last_trim.elapsed() >= TRIM_EVERY {
                trim_wanted = false;
                last_trim = Instant::now();
                self.trim().await;
            }

            let step = match held.take() {
                Some(current) => {
                    self.step_held(current, &mut held, renew_at, &mut trim_wanted)
                        .await
                }
                None if check_pending => match self.claim_pending().await {
                    Ok(Pending::Claimed(claimed)) => self.hand_out(claimed, &mut held),
                    Ok(Pending::NotYet(wait)) => {
                        let until = (Instant::now() + wait).min(renew_at);
                        tokio::time::sleep_until(until).await;
                        Ok(Ok(()))
                    }
                    Ok(Pending::Again) => Ok(Ok(())),
                    Ok(Pending::Clear) => {
                        check_pending = false;
                        Ok(Ok(()))
                    }
                    Err(err) => Ok(Err(err)),
                },
                None => match self.read_new(renew_at).await {
                    Ok(Some(fresh)) => self.hand_out(fresh, &mut held),
                    Ok(None) => Ok(Ok(())),
                    Err(err) => Ok(Err(err)),
                },
            };
            match step {
                Err(Gone) => return,
                Ok(Ok(())) => backoff = BACKOFF_MIN,
                Ok(Err(failure)) => {
                    self.failed(failure);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Whether this consumer is the one of its group that should read this partition.
    fn preferred(&self) -> bool {
        let members = self.shared.members.borrow();
        layout::preferred_member(&members, self.partition) == Some(self.shared.token.as_str())
    }

    async fn take_lease(&self) -> redis::RedisResult<bool> {
        let mut conn = self.shared.conn.clone();
        let held: i64 = redis::Script::new(scripts::LEASE)
            .key(&self.lease)
            .arg(&self.shared.token)
            .arg(millis(self.shared.lease_ttl))
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Waits for the held message's settlement or its time, and gives it again when due.
    async fn step_held(
        &mut self,
        mut current: Held,
        held: &mut Option<Held>,
        renew_at: Instant,
        trim_wanted: &mut bool,
    ) -> Result<Result<(), String>, Gone> {
        let (wake, due) = match current.state {
            HeldState::Out { until } => (until.min(renew_at), false),
            HeldState::Due { at } => (at.min(renew_at), Instant::now() >= at),
        };
        if !due {
            let id = current.entry.id.clone();
            *held = Some(current);
            match tokio::time::timeout_at(wake, self.settle_rx.recv()).await {
                Ok(Some(settled)) => *trim_wanted |= settle(held, settled),
                Ok(None) => {}
                Err(_) => {
                    if let Some(current) = held.as_mut()
                        && let HeldState::Out { until } = current.state
                        && Instant::now() >= until
                    {
                        tracing::debug!(
                            target: TARGET,
                            group = %self.shared.group,
                            partition = self.partition,
                            entry = %id,
                            "a message stayed unsettled past its ack wait; giving it again"
                        );
                        current.state = HeldState::Due { at: until };
                    }
                }
            }
            return Ok(Ok(()));
        }
        // Due: claim it again, which counts a delivery.
        let mut conn = self.shared.conn.clone();
        let claimed: redis::RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&self.shared.group)
            .arg(&self.shared.token)
            .arg(0)
            .arg(&current.entry.id)
            .query_async(&mut conn)
            .await;
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(err) => {
                *held = Some(current);
                return Ok(Err(format!("could not claim a message again: {err}")));
            }
        };
        let entry = layout::items(&claimed)
            .and_then(|entries| entries.first())
            .map(layout::parse_entry);
        match entry {
            Some(Ok(Some(entry))) => {
                current.entry = entry;
                current.attempt = current.attempt.saturating_add(1);
                self.hand_out(current, held)
            }
            _ => {
                // No longer pending: acknowledged through another path, or trimmed away.
                tracing::warn!(
                    target: TARGET,
                    group = %self.shared.group,
                    partition = self.partition,
                    entry = %current.entry.id,
                    "a message to give again is no longer pending (acknowledged late, or \
                     trimmed from the stream)"
                );
                Ok(Ok(()))
            }
        }
    }

    /// The oldest pending entry of the group on this partition, claimed once it has been
    /// pending for the ack wait (its holder, gone or not, had that long to settle it).
    async fn claim_pending(&mut self) -> Result<Pending, String> {
        let mut conn = self.shared.conn.clone();
        let pending: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.shared.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut conn)
            .await;
        let pending = match pending {
            Ok(pending) => pending,
            Err(err) => return Err(self.read_failed("read its pending messages", err).await),
        };
        let Some(first) = layout::items(&pending)
            .and_then(|entries| entries.first())
            .and_then(layout::items)
        else {
            return Ok(Pending::Clear);
        };
        let (Some(id), Some(idle), Some(count)) = (
            first.first().and_then(layout::text),
            first.get(2).and_then(layout::int),
            first.get(3).and_then(layout::int),
        ) else {
            return Err("the server's XPENDING answer is not understood".to_owned());
        };
        let idle = Duration::from_millis(u64::try_from(idle).unwrap_or(0));
        if idle < self.shared.ack_wait {
            return Ok(Pending::NotYet(self.shared.ack_wait - idle));
        }
        let claimed: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.shared.group)
            .arg(&self.shared.token)
            .arg(millis(self.shared.ack_wait))
            .arg(&id)
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|err| format!("could not claim a pending message: {err}"))?;
        let parts = layout::items(&claimed).unwrap_or_default();
        let deleted: Vec<String> = parts
            .get(2)
            .and_then(layout::items)
            .unwrap_or_default()
            .iter()
            .filter_map(layout::text)
            .collect();
        for gone in &deleted {
            tracing::error!(
                target: TARGET,
                group = %self.shared.group,
                partition = self.partition,
                entry = %gone,
                "a message the group had not acknowledged was trimmed from the stream (see \
                 the `max_len` option); it is lost to this group"
            );
        }
        let entry = parts
            .get(1)
            .and_then(layout::items)
            .and_then(|entries| entries.first());
        let Some(entry) = entry else {
            return Ok(Pending::Again);
        };
        let attempt = u32::try_from(count.saturating_add(1)).unwrap_or(u32::MAX);
        Ok(match self.accept(entry).await? {
            Some(entry) => {
                tracing::debug!(
                    target: TARGET,
                    group = %self.shared.group,
                    partition = self.partition,
                    entry = %entry.id,
                    attempt,
                    "claimed a message left pending"
                );
                Pending::Claimed(Held {
                    entry,
                    attempt,
                    state: HeldState::Out {
                        until: Instant::now(),
                    },
                })
            }
            None => Pending::Again,
        })
    }

    /// The partition's next entry for the group, waiting up to a second (and never past the
    /// lease's renewal) for one.
    async fn read_new(&mut self, renew_at: Instant) -> Result<Option<Held>, String> {
        let block = renew_at
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), BLOCK_MAX);
        let read: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.shared.group)
            .arg(&self.shared.token)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.reader)
            .await;
        let read = match read {
            Ok(read) => read,
            Err(err) => return Err(self.read_failed("read", err).await),
        };
        // [[stream, [entry]]], or nil when nothing came.
        let entry = layout::items(&read)
            .and_then(|streams| streams.first())
            .and_then(layout::items)
            .and_then(|stream| stream.get(1))
            .and_then(layout::items)
            .and_then(|entries| entries.first());
        let Some(entry) = entry else {
            return Ok(None);
        };
        Ok(self.accept(entry).await?.map(|entry| Held {
            entry,
            attempt: 1,
            state: HeldState::Out {
                until: Instant::now(),
            },
        }))
    }

    /// Describes a failed read; when the server no longer knows the group (it restarted
    /// without persistence, or someone removed the stream), creates it again, from the
    /// beginning of what the stream holds.
    async fn read_failed(&self, what: &str, err: redis::RedisError) -> String {
        if err.code() != Some("NOGROUP") {
            return format!("could not {what}: {err}");
        }
        let mut conn = self.shared.conn.clone();
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.shared.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(_) => tracing::warn!(
                target: TARGET,
                group = %self.shared.group,
                stream = %self.stream,
                "the server had lost the group's consumer group (a restart without \
                 persistence?); created it again from the stream's beginning"
            ),
            Err(again) if again.code() == Some("BUSYGROUP") => {}
            Err(again) => return format!("could not {what} ({err}) nor create the group: {again}"),
        }
        format!("could not {what}: {err}")
    }

    /// An entry for the group, or `None` after acknowledging one the group does not read (a
    /// channel it does not read, or an entry that is not inseam's).
    async fn accept(&mut self, entry: &Value) -> Result<Option<Entry>, String> {
        let (id, reason) = match layout::parse_entry(entry) {
            Ok(Some(entry)) if self.shared.channels.contains(&entry.channel) => {
                return Ok(Some(entry));
            }
            Ok(Some(entry)) => (entry.id, None),
            Ok(None) => {
                // Deleted while pending (trimmed): Redis 6.2 still lists it, without fields.
                let id = entry_id(entry);
                tracing::error!(
                    target: TARGET,
                    group = %self.shared.group,
                    partition = self.partition,
                    entry = %id,
                    "a message the group had not acknowledged was trimmed from the stream (see \
                     the `max_len` option); it is lost to this group"
                );
                (id, None)
            }
            Err(problem) => (entry_id(entry), Some(problem)),
        };
        if let Some(problem) = reason {
            tracing::warn!(
                target: TARGET,
                stream = %self.stream,
                problem = %problem,
                "skipped an entry that is not an inseam message"
            );
        }
        let mut conn = self.shared.conn.clone();
        redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.shared.group)
            .arg(&id)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|err| format!("could not skip an entry of another channel: {err}"))?;
        Ok(None)
    }

    /// Hands `current` to the queue and keeps it as the partition's message in flight.
    fn hand_out(
        &self,
        mut current: Held,
        held: &mut Option<Held>,
    ) -> Result<Result<(), String>, Gone> {
        let now = Instant::now();
        current.state = HeldState::Out {
            until: now + self.shared.ack_wait,
        };
        let entry = &current.entry;
        let incoming = Incoming {
            channel: entry.channel.clone(),
            key: entry.key.clone(),
            headers: entry.headers.clone(),
            payload: Bytes::from(entry.payload.clone()),
            attempt: current.attempt,
            acker: Box::new(RedisAcker {
                conn: self.shared.conn.clone(),
                stream: self.stream.clone(),
                group: self.shared.group.clone(),
                id: entry.id.clone(),
                channel: entry.channel.clone(),
                settle: self.settle_tx.clone(),
            }),
        };
        self.queue
            .send(Pulled {
                received: now,
                incoming,
            })
            .map_err(|_| Gone)?;
        *held = Some(current);
        Ok(Ok(()))
    }

    async fn trim(&self) {
        let mut conn = self.shared.conn.clone();
        let trimmed: redis::RedisResult<i64> = redis::Script::new(scripts::TRIM_ACKNOWLEDGED)
            .key(&self.stream)
            .invoke_async(&mut conn)
            .await;
        match trimmed {
            Ok(0) => {}
            Ok(count) => tracing::debug!(
                target: TARGET,
                stream = %self.stream,
                count,
                "trimmed entries every group acknowledged"
            ),
            Err(err) => tracing::debug!(
                target: TARGET,
                stream = %self.stream,
                error = %err,
                "could not trim acknowledged entries"
            ),
        }
    }

    /// Records a failure: a warning when the partition was healthy, then quieter while it
    /// keeps failing (an outage would otherwise warn for every partition at every retry).
    fn failed(&self, failure: String) {
        if self
            .shared
            .health
            .set(self.partition, Some(failure.clone()))
        {
            tracing::debug!(
                target: TARGET,
                group = %self.shared.group,
                partition = self.partition,
                failure = %failure,
                "Redis partition reader still failing; retrying"
            );
        } else {
            tracing::warn!(
                target: TARGET,
                group = %self.shared.group,
                partition = self.partition,
                failure = %failure,
                "Redis partition reader failed; retrying"
            );
        }
    }

    fn recovered(&self) {
        if self.shared.health.set(self.partition, None) {
            tracing::info!(
                target: TARGET,
                group = %self.shared.group,
                partition = self.partition,
                "Redis partition reader works again"
            );
        }
    }
}

/// The id of a stream entry (`[id, fields]`), empty when it has none.
fn entry_id(entry: &Value) -> String {
    layout::items(entry)
        .and_then(|parts| parts.first())
        .and_then(layout::text)
        .unwrap_or_default()
}

/// Applies a settlement to the message in flight; returns whether it was acknowledged.
fn settle(held: &mut Option<Held>, settled: Settled) -> bool {
    match settled {
        Settled::Ack(id) => {
            if held.as_ref().is_some_and(|h| h.entry.id == id) {
                *held = None;
            }
            true
        }
        Settled::Nack(id, delay) => {
            if let Some(current) = held
                && current.entry.id == id
                && matches!(current.state, HeldState::Out { .. })
            {
                current.state = HeldState::Due {
                    at: Instant::now() + delay,
                };
            }
            false
        }
    }
}

/// Settles one stream entry: `XACK` for an acknowledgement; a nack leaves it pending and has
/// the partition's task give it again after the delay.
struct RedisAcker {
    conn: ConnectionManager,
    stream: String,
    group: String,
    id: String,
    channel: String,
    settle: mpsc::UnboundedSender<Settled>,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        let mut conn = self.conn.clone();
        redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.id)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|err| {
                command_error(format!("acknowledge a message of `{}`", self.channel), err)
            })?;
        // The task may be gone (the consumer dropped): the acknowledgement stands anyway.
        let _ = self.settle.send(Settled::Ack(self.id.clone()));
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        // Without its task (the consumer dropped) the entry stays pending, and the next
        // holder of the partition gives it again after the ack wait.
        let _ = self.settle.send(Settled::Nack(self.id.clone(), delay));
        Ok(())
    }
}
