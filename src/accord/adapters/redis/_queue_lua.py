"""The Lua scripts of the Redis queue adapter: each state change of a job is one atomic script.

A job is one record, stored as the single field `j` of its stream entry, or
as a hash value while it is delayed or dead:

    "<attempt> <failures> <recoveries> <enqueued_at> <failed_at|-> <id bytes> <error bytes>\n"
    followed by the id, the error and the body, unescaped.

One field keeps replies small (the client parses two values per job, not
fourteen), and the body is never decoded or re-encoded on the server. Due
times and lease ages come from the Redis server clock (TIME), so instances
with skewed clocks agree.
"""

from __future__ import annotations

_COMMON = """
local HEADER = '^(%d+) (%d+) (%d+) (%S+) (%S+) (%d+) (%d+)\\n()'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function put(stream, delayed, delayed_jobs, delay, id, record)
  if delay > 0 then
    redis.call('ZADD', delayed, now_ms() + delay, id)
    redis.call('HSET', delayed_jobs, id, record)
  else
    redis.call('XADD', stream, '*', 'j', record)
  end
end
"""

# KEYS: stream, delayed, delayed_jobs, ids
# ARGV: id, record, delay_ms
ENQUEUE = """
if redis.call('HSETNX', KEYS[4], ARGV[1], '1') == 0 then return 0 end
put(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[1], ARGV[2])
return 1
"""

# KEYS: stream, delayed, delayed_jobs
# ARGV: group, consumer, count, promote_limit
# Returns {{entry id, record, entry id, record, ...}, ms until the next delayed job is due (-1: none)}.
CLAIM = """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  local record = redis.call('HGET', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  if record then redis.call('XADD', KEYS[1], '*', 'j', record) end
end
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local out = {}
if got then
  for _, entry in ipairs(got[1][2]) do
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
  end
end
local wait = -1
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt > 0 then wait = math.max(0, tonumber(nxt[2]) - now) end
return {out, wait}
"""

# KEYS: stream, ids
# ARGV: group, then (entry id, job id) pairs. Returns 1 (acknowledged) or 0 (lease lost) per pair.
ACK = """
local out = {}
for i = 2, #ARGV, 2 do
  local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if n == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  end
  out[#out + 1] = n
end
return out
"""

# KEYS: stream
# ARGV: group, consumer, entry ids... Resets the idle time of entries this consumer still holds.
RENEW = """
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: stream, delayed, delayed_jobs
# ARGV: group, entry id, id, record, delay_ms
RETRY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
put(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[5]), ARGV[3], ARGV[4])
return 1
"""

# KEYS: stream, ids, dead, dead_jobs, dead_index
# ARGV: group, entry id, id, record, channel
BURY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], now_ms(), ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[5])
return 1
"""

# KEYS: stream, ids
# ARGV: group, lease_ms, batch, stale_consumer_ms
# Entries idle longer than the lease go back to the end of the stream as new
# entries (attempt and recoveries + 1); the old entry id no longer acknowledges.
RECOVER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[2]), '-', '+', tonumber(ARGV[3]))
local n = 0
for _, p in ipairs(pending) do
  local eid = p[1]
  local e = redis.call('XRANGE', KEYS[1], eid, eid)
  redis.call('XACK', KEYS[1], ARGV[1], eid)
  redis.call('XDEL', KEYS[1], eid)
  if #e == 1 then
    local record = e[1][2][2]
    local a, f, r, t, x, il, el, pos = string.match(record, HEADER)
    if a then
      local header = string.format('%d %s %d %s %s %s %s\\n', tonumber(a) + 1, f, tonumber(r) + 1, t, x, il, el)
      redis.call('XADD', KEYS[1], '*', 'j', header .. string.sub(record, pos))
      n = n + 1
    end
  end
end
if #pending < tonumber(ARGV[3]) then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local m = {}
    for i = 1, #c, 2 do m[c[i]] = c[i + 1] end
    if tonumber(m['pending']) == 0 and tonumber(m['idle']) > tonumber(ARGV[4]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], m['name'])
    end
  end
end
return n
"""

# KEYS: stream
# ARGV: group, consumer. Removes the consumer from the group if it holds nothing.
UNSUBSCRIBE = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if type(p) ~= 'table' or p.err or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: stream, ids, dead, dead_jobs, dead_index
# ARGV: id, channel. Returns 1, 0 (no such dead job) or -1 (the id is pending or running).
REQUEUE = """
local record = redis.call('HGET', KEYS[4], ARGV[1])
if not record then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 0 then return -1 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('HGET', KEYS[5], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[5], ARGV[1]) end
local a, f, r, t, x, il, el, pos = string.match(record, HEADER)
il = tonumber(il)
local id = string.sub(record, pos, pos + il - 1)
local body = string.sub(record, pos + il + tonumber(el))
local header = string.format('%d 0 0 %s - %d 0\\n', tonumber(a) + 1, t, il)
redis.call('XADD', KEYS[1], '*', 'j', header .. id .. body)
return 1
"""

# KEYS: dead, dead_jobs, dead_index
# ARGV: channel, batch. Returns how many dead letters were deleted.
PURGE = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if redis.call('HGET', KEYS[3], id) == ARGV[1] then redis.call('HDEL', KEYS[3], id) end
end
return #ids
"""

# KEYS: stream, delayed, dead
# ARGV: group. Returns {queued, delayed, running, dead}.
STATS = """
local length = redis.call('XLEN', KEYS[1])
local running = 0
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(p) == 'table' and not p.err then running = p[1] end
return {length - running, redis.call('ZCARD', KEYS[2]), running, redis.call('ZCARD', KEYS[3])}
"""

SCRIPTS = {
    name: _COMMON + source
    for name, source in {
        "enqueue": ENQUEUE,
        "claim": CLAIM,
        "ack": ACK,
        "renew": RENEW,
        "retry": RETRY,
        "bury": BURY,
        "recover": RECOVER,
        "unsubscribe": UNSUBSCRIBE,
        "requeue": REQUEUE,
        "purge": PURGE,
        "stats": STATS,
    }.items()
}
