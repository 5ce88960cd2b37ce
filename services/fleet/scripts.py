"""The fleet's Redis operations as Lua scripts: each is one atomic round-trip.

Writes check the caller's epoch against its record first, so a worker that lost its
registration (the record expired, Redis restarted empty, a newer process took its id) never
writes a partial index: the script answers 0 and the worker registers and resyncs instead.
Scripts touch keys derived from their arguments (instance ids), so they target a single
Redis, not Redis Cluster.
"""

from __future__ import annotations

from redis.asyncio import Redis

# Lua's unpack() is limited by its C stack (~8000 values); stay well below it.
_CHUNKED = """
local function each_chunk(cmd, key, first, last)
  for i = first, last, 1000 do
    redis.call(cmd, key, unpack(ARGV, i, math.min(i + 999, last)))
  end
end
local function our_epoch(record, epoch)
  return tonumber(redis.call('HGET', record, 'epoch') or '-1') == tonumber(epoch)
end
"""

# KEYS: instances set, our record, our epoch counter.
# ARGV: id, epoch, ttl_ms, record prefix, k, k identity field names, then field/value pairs.
# Returns {'ok'} | {'superseded', epoch} | {'mismatch', other id, field, theirs, ours}.
REGISTER = """
local id, epoch, ttl, prefix, k = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local names, fields, pairs_ = {}, {}, {}
for i = 1, k do names[i] = ARGV[5 + i] end
for i = 6 + k, #ARGV, 2 do
  fields[ARGV[i]] = ARGV[i + 1]
  table.insert(pairs_, ARGV[i]); table.insert(pairs_, ARGV[i + 1])
end
local current = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if current > epoch then return {'superseded', tostring(current)} end
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if other ~= id then
    local theirs = redis.call('HMGET', prefix .. other, unpack(names))
    if redis.call('EXISTS', prefix .. other) == 0 then
      redis.call('SREM', KEYS[1], other)
    else
      for i, name in ipairs(names) do
        if theirs[i] ~= fields[name] then
          return {'mismatch', other, name, tostring(theirs[i]), fields[name]}
        end
      end
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(pairs_))
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SADD', KEYS[1], id)
if tonumber(redis.call('GET', KEYS[3]) or '0') < epoch then redis.call('SET', KEYS[3], epoch) end
return {'ok'}
"""

# KEYS: our record, our block set. ARGV: epoch, ttl_ms, then load field/value pairs. Returns 1 | 0.
HEARTBEAT = _CHUNKED + """
if not our_epoch(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: our record, our block set. ARGV: epoch, ttl_ms, n added, added..., removed... Returns 1 | 0.
PUBLISH = _CHUNKED + """
if not our_epoch(KEYS[1], ARGV[1]) then return 0 end
local n = tonumber(ARGV[3])
if n > 0 then each_chunk('SADD', KEYS[2], 4, 3 + n) end
if #ARGV > 3 + n then each_chunk('SREM', KEYS[2], 4 + n, #ARGV) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: our record, our block set. ARGV: epoch, ttl_ms, every hash we hold. Returns 1 | 0.
RESYNC = _CHUNKED + """
if not our_epoch(KEYS[1], ARGV[1]) then return 0 end
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  each_chunk('SADD', KEYS[2], 3, #ARGV)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: instances set. ARGV: record prefix. Returns {id, {field, value, ...}, ...} of live records.
LIST = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('HGETALL', ARGV[1] .. id)
  if #record == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, id); table.insert(out, record)
  end
end
return out
"""

# KEYS: the candidates' block sets. ARGV: a prompt's block hashes in chain order.
# Returns, per candidate, {leading hashes it holds, size of its set}.
LOOKUP = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = 0
  for j = 1, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[j]) == 1 then n = j else break end
  end
  out[i] = {n, redis.call('SCARD', key)}
end
return out
"""

# KEYS: instances set, our record, our block set. ARGV: id, epoch. Leaves only if still ours.
LEAVE = _CHUNKED + """
if not our_epoch(KEYS[2], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"""


class Scripts:
    """The scripts registered on one client (EVALSHA; reloaded by redis-py after a Redis restart)."""

    def __init__(self, redis: Redis) -> None:
        self.register = redis.register_script(REGISTER)
        self.heartbeat = redis.register_script(HEARTBEAT)
        self.publish = redis.register_script(PUBLISH)
        self.resync = redis.register_script(RESYNC)
        self.list = redis.register_script(LIST)
        self.lookup = redis.register_script(LOOKUP)
        self.leave = redis.register_script(LEAVE)
