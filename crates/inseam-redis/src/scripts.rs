//! The Lua scripts the transport runs on the server: each is one atomic step.

/// Publishes one message unless its id was published within the deduplication window.
///
/// KEYS: the partition stream, the message id's key. ARGV: the window in ms (`0`: no
/// deduplication), the `MAXLEN ~` bound (`0`: none), then the entry's fields and values.
/// Returns 1 when added, 0 when dropped as a duplicate. The id is remembered only once the
/// entry is in the stream, so a failed `XADD` does not make its retry look like a duplicate.
pub(crate) const PUBLISH: &str = r"
if ARGV[1] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
if ARGV[2] == '0' then
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
if ARGV[1] ~= '0' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
end
return 1
";

/// Takes or renews a lease. KEYS: the lease. ARGV: the holder's token, the lease's life in
/// ms. Returns 1 when the caller holds the lease (now renewed), 0 when another does.
pub(crate) const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Lets go of a lease if the caller holds it. KEYS: the lease. ARGV: the holder's token.
pub(crate) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Joins (renews) or leaves a group's members, dropping those whose membership ran out,
/// on the server's clock. KEYS: the members' sorted set. ARGV: the member's token, the
/// membership's life in ms, `1` to join or `0` to leave. Returns the live members.
pub(crate) const MEMBERS: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Records the partition count of a prefix, or returns the one recorded. KEYS: the layout
/// key. ARGV: the partition count.
pub(crate) const LAYOUT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

/// Trims from a partition stream the entries every group of it acknowledged: those before
/// the oldest entry any group has pending, or has not read yet. KEYS: the stream. Returns
/// how many entries went. A stream without groups is left alone.
pub(crate) const TRIM_ACKNOWLEDGED: &str = r"
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then
  return 0
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local oldest
for _, group in ipairs(groups) do
  local name, pending, last
  for i = 1, #group, 2 do
    local field = group[i]
    if field == 'name' then
      name = group[i + 1]
    elseif field == 'pending' then
      pending = group[i + 1]
    elseif field == 'last-delivered-id' then
      last = group[i + 1]
    end
  end
  local keep = last
  if pending > 0 then
    local first = redis.call('XPENDING', KEYS[1], name, '-', '+', 1)
    if first[1] then
      keep = first[1][1]
    end
  end
  if oldest == nil or less(keep, oldest) then
    oldest = keep
  end
end
if oldest == '0-0' then
  return 0
end
return redis.call('XTRIM', KEYS[1], 'MINID', oldest)
";

/// Queues a request for a server of its channel, if the channel has a live server. KEYS: the
/// channel's request list, its servers' sorted set. ARGV: the request (see `rpc`), the
/// requester's timeout in ms. The request gets its deadline on the server's clock; the list
/// lives at least that long. Returns 1 when queued, 0 when no server serves the channel.
pub(crate) const REQUEST: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) == 0 then
  return 0
end
local life = tonumber(ARGV[2])
redis.call('RPUSH', KEYS[1], string.format('%d', now + life) .. ':' .. ARGV[1])
if redis.call('PTTL', KEYS[1]) < life then
  redis.call('PEXPIRE', KEYS[1], life)
end
return 1
";
