//! Request-reply over Redis lists (decision 0019): a list of requests per channel that its
//! servers pop (`BLPOP`), a sorted set of the channel's live servers, and a reply list per
//! requesting connection that one task pops and hands to the waiting requests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use inseam_core::transport::{Request, Requests, Responder, TransportError};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{NAME, RedisOptions, TARGET, command_error, layout, scripts};

/// How long a blocking pop waits before it looks whether anyone still wants its result.
const POP_WAIT: Duration = Duration::from_secs(1);
/// How long an answer nobody took stays in a reply list.
const REPLY_LIFE: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The requests waiting for their answer on one connection, by correlation id.
type Waiting = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Bytes>>>>;

/// The reply list of one connection and the task that pops it.
pub(crate) struct Replies {
    list: String,
    waiting: Waiting,
    task: JoinHandle<()>,
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch on this machine's clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A request as it waits in its channel's list: its deadline on the server's clock (decimal,
/// written by the script that pushes it), `:`, then the reply list's length (2 bytes,
/// big-endian), the reply list, the correlation id (16 bytes) and the payload.
fn encode_request(reply_list: &str, correlation: Uuid, payload: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(reply_list.len()).ok()?;
    let mut out = Vec::with_capacity(2 + reply_list.len() + 16 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(reply_list.as_bytes());
    out.extend_from_slice(correlation.as_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

/// A popped request: its deadline, reply list, correlation id and payload.
fn decode_request(element: &[u8]) -> Option<(u64, String, Uuid, Bytes)> {
    let colon = element.iter().position(|b| *b == b':')?;
    let deadline = std::str::from_utf8(&element[..colon]).ok()?.parse().ok()?;
    let rest = &element[colon + 1..];
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len + 16 {
        return None;
    }
    let (list, rest) = rest.split_at(len);
    let (correlation, payload) = rest.split_at(16);
    Some((
        deadline,
        String::from_utf8(list.to_vec()).ok()?,
        Uuid::from_slice(correlation).ok()?,
        Bytes::copy_from_slice(payload),
    ))
}

impl Replies {
    /// Starts popping this connection's reply list on a connection of its own.
    pub(crate) fn start(
        client: &redis::Client,
        options: &RedisOptions,
    ) -> redis::RedisResult<Self> {
        let list = layout::replies_key(&options.prefix, Uuid::now_v7());
        let reader = ConnectionManager::new_lazy_with_config(
            client.clone(),
            crate::manager_config(options, POP_WAIT + options.request_timeout),
        )?;
        let waiting: Waiting = Arc::default();
        let task = tokio::spawn(pop_replies(reader, list.clone(), Arc::clone(&waiting)));
        Ok(Replies {
            list,
            waiting,
            task,
        })
    }

    /// Sends `payload` to a server of `channel` and waits up to `timeout` for its answer.
    pub(crate) async fn request(
        &self,
        conn: &ConnectionManager,
        options: &RedisOptions,
        channel: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let operation = || format!("send a request on `{channel}`");
        let correlation = Uuid::now_v7();
        let Some(request) = encode_request(&self.list, correlation, &payload) else {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the reply list's name is too long",
            ));
        };
        let (answer, answered) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(correlation, answer);
        let _forget = Forget {
            waiting: &self.waiting,
            correlation,
        };
        let started = tokio::time::Instant::now();
        let mut conn = conn.clone();
        let pushed = tokio::time::timeout(
            timeout,
            redis::Script::new(scripts::REQUEST)
                .key(layout::requests_key(&options.prefix, channel))
                .key(layout::servers_key(&options.prefix, channel))
                .arg(request)
                .arg(millis(timeout).max(1))
                .invoke_async::<i64>(&mut conn),
        )
        .await;
        match pushed {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => {
                return Err(TransportError::transient(
                    NAME,
                    operation(),
                    "no server serves this channel",
                ));
            }
            Ok(Err(err)) => return Err(command_error(operation(), err)),
            Err(_) => {
                return Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!("the server did not take the request within {timeout:?}"),
                ));
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, answered).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(TransportError::transient(
                NAME,
                operation(),
                "the reply reader stopped",
            )),
            Err(_) => Err(TransportError::transient(
                NAME,
                operation(),
                format!("no answer within {timeout:?}"),
            )),
        }
    }
}

/// Forgets a request's waiting slot however its wait ends.
struct Forget<'a> {
    waiting: &'a Waiting,
    correlation: Uuid,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.correlation);
    }
}

/// Pops answers and hands each to its waiting request; an answer nobody waits for (its
/// request timed out) is dropped.
async fn pop_replies(mut reader: ConnectionManager, list: String, waiting: Waiting) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let popped: redis::RedisResult<Value> = redis::cmd("BLPOP")
            .arg(&list)
            .arg(POP_WAIT.as_secs_f64())
            .query_async(&mut reader)
            .await;
        match popped {
            Ok(value) => {
                backoff = Duration::from_millis(100);
                let Some(Value::BulkString(element)) = layout::items(&value).and_then(|v| v.get(1))
                else {
                    continue;
                };
                let Some((correlation, answer)) = element.split_at_checked(16) else {
                    continue;
                };
                let Ok(correlation) = Uuid::from_slice(correlation) else {
                    continue;
                };
                let sender = waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&correlation);
                if let Some(sender) = sender {
                    let _ = sender.send(Bytes::copy_from_slice(answer));
                }
            }
            Err(err) => {
                tracing::debug!(target: TARGET, error = %err, "could not pop answers; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The requests of one channel, as one server receives them.
pub(crate) struct RedisRequests {
    wants: mpsc::Sender<oneshot::Sender<Request>>,
    tasks: Vec<JoinHandle<()>>,
    leave: Option<(ConnectionManager, String, String)>,
}

impl fmt::Debug for RedisRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRequests").finish_non_exhaustive()
    }
}

impl Drop for RedisRequests {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Leave the channel's servers at once, so requests are refused rather than left
        // waiting for a server that is gone.
        if let (Some((mut conn, key, token)), Ok(runtime)) =
            (self.leave.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    redis::cmd("ZREM")
                        .arg(key)
                        .arg(token)
                        .query_async::<i64>(&mut conn),
                )
                .await;
            });
        }
    }
}

impl RedisRequests {
    /// Joins `channel`'s servers and starts popping its requests when asked.
    pub(crate) async fn start(
        client: &redis::Client,
        conn: &ConnectionManager,
        options: &RedisOptions,
        channel: &str,
    ) -> redis::RedisResult<Self> {
        let servers = layout::servers_key(&options.prefix, channel);
        let token = Uuid::now_v7().to_string();
        let ttl = options.lease_ttl;
        let mut shared = conn.clone();
        join(&mut shared, &servers, &token, ttl).await?;
        // The server's clock, to drop requests whose requester gave up.
        let time: Vec<String> = redis::cmd("TIME").query_async(&mut shared).await?;
        let server_ms = match time.as_slice() {
            [secs, micros] => {
                secs.parse::<u64>().unwrap_or(0) * 1000 + micros.parse::<u64>().unwrap_or(0) / 1000
            }
            _ => now_ms(),
        };
        let offset = i128::from(server_ms) - i128::from(now_ms());
        let reader = ConnectionManager::new_lazy_with_config(
            client.clone(),
            crate::manager_config(options, POP_WAIT + options.request_timeout),
        )?;
        let (wants, wanted) = mpsc::channel(1);
        let heartbeat = {
            let (mut conn, servers, token) = (shared.clone(), servers.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if let Err(err) = join(&mut conn, &servers, &token, ttl).await {
                        tracing::debug!(
                            target: TARGET,
                            error = %err,
                            "could not renew a request server's membership"
                        );
                    }
                }
            })
        };
        let popper = tokio::spawn(pop_requests(PopRequests {
            reader,
            conn: shared.clone(),
            list: layout::requests_key(&options.prefix, channel),
            offset,
            wanted,
        }));
        Ok(RedisRequests {
            wants,
            tasks: vec![heartbeat, popper],
            leave: Some((shared, servers, token)),
        })
    }
}

async fn join(
    conn: &mut ConnectionManager,
    servers: &str,
    token: &str,
    ttl: Duration,
) -> redis::RedisResult<()> {
    redis::Script::new(scripts::MEMBERS)
        .key(servers)
        .arg(token)
        .arg(millis(ttl))
        .arg("1")
        .invoke_async::<Vec<String>>(conn)
        .await
        .map(drop)
}

struct PopRequests {
    reader: ConnectionManager,
    conn: ConnectionManager,
    list: String,
    /// The server's clock minus this machine's, in ms.
    offset: i128,
    wanted: mpsc::Receiver<oneshot::Sender<Request>>,
}

/// Pops a request each time `next` asks for one; a request popped for a `next` that was
/// cancelled meanwhile goes back to the head of the list for another server.
async fn pop_requests(mut pop: PopRequests) {
    let mut backoff = Duration::from_millis(100);
    while let Some(want) = pop.wanted.recv().await {
        while !want.is_closed() {
            let popped: redis::RedisResult<Value> = redis::cmd("BLPOP")
                .arg(&pop.list)
                .arg(POP_WAIT.as_secs_f64())
                .query_async(&mut pop.reader)
                .await;
            let element = match popped {
                Ok(value) => {
                    backoff = Duration::from_millis(100);
                    match layout::items(&value).and_then(|v| v.get(1)) {
                        Some(Value::BulkString(element)) => element.clone(),
                        _ => continue,
                    }
                }
                Err(err) => {
                    tracing::debug!(target: TARGET, error = %err, "could not pop requests; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let Some((deadline, reply_list, correlation, payload)) = decode_request(&element)
            else {
                tracing::warn!(target: TARGET, list = %pop.list, "dropped a request that is not inseam's");
                continue;
            };
            let server_now = i128::from(now_ms()) + pop.offset;
            if i128::from(deadline) < server_now {
                tracing::debug!(target: TARGET, list = %pop.list, "dropped a request its sender gave up on");
                continue;
            }
            let request = Request {
                payload,
                responder: Box::new(RedisResponder {
                    conn: pop.conn.clone(),
                    reply_list,
                    correlation,
                }),
            };
            if want.send(request).is_err() {
                let _ = redis::cmd("LPUSH")
                    .arg(&pop.list)
                    .arg(element)
                    .query_async::<i64>(&mut pop.conn)
                    .await;
            }
            break;
        }
    }
}

#[async_trait]
impl Requests for RedisRequests {
    async fn next(&mut self) -> Option<Request> {
        let (want, wanted) = oneshot::channel();
        self.wants.send(want).await.ok()?;
        wanted.await.ok()
    }
}

/// Pushes the answer to the requester's reply list.
struct RedisResponder {
    conn: ConnectionManager,
    reply_list: String,
    correlation: Uuid,
}

#[async_trait]
impl Responder for RedisResponder {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<(), TransportError> {
        let mut conn = self.conn.clone();
        let mut answer = Vec::with_capacity(16 + payload.len());
        answer.extend_from_slice(self.correlation.as_bytes());
        answer.extend_from_slice(&payload);
        redis::pipe()
            .atomic()
            .cmd("RPUSH")
            .arg(&self.reply_list)
            .arg(answer)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&self.reply_list)
            .arg(millis(REPLY_LIFE))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|err| command_error("answer a request".to_owned(), err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let id = Uuid::from_u128(42);
        let mut element = b"1700000000123:".to_vec();
        element.extend(encode_request("inseam:replies:x", id, b"{\"q\":1}").unwrap());
        let (deadline, list, correlation, payload) = decode_request(&element).unwrap();
        assert_eq!(deadline, 1_700_000_000_123);
        assert_eq!(list, "inseam:replies:x");
        assert_eq!(correlation, id);
        assert_eq!(&payload[..], b"{\"q\":1}");
        assert_eq!(decode_request(b"12:\x00\x05ab"), None);
        assert_eq!(decode_request(b"nodeadline"), None);
    }
}
