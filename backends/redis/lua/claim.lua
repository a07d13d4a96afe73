-- idemq claim: take records that are absent, released, or whose lease
-- lapsed; n keys in one call, answered as n claims one after the other.
--
-- KEYS[1..n]  the records (hashes: state, token, lease, attempts)
-- ARGV[1]     lease, ms
-- ARGV[2]     retain, ms: a record lives at least max(lease, retain)
-- ARGV[2 + i] the new owner token for KEYS[i]
--
-- Replies a flat array, two integers per key: 0, attempts claimed;
-- 1, 0 done; 2, 0 dead; 3, remaining lease ms in progress. Times come
-- from the server clock, read once per call.
--
-- Numbers go to redis.call as strings made once per call: Redis formats
-- a Lua number argument with snprintf on every call, which costs about
-- as much as the command it is for.
local lease = tonumber(ARGV[1])
local keep = math.max(lease, tonumber(ARGV[2]), 1)
local keep_ms = string.format('%d', keep)
-- Reading TIME before writing is fine from Redis 5 on (scripts replicate
-- their effects, not the script).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = string.format('%d', now + lease)
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local rec = redis.call('HMGET', key, 'state', 'lease', 'attempts')
  local state = rec[1]
  local code, value = 0, 1
  if not state then
    -- The fresh path: no PTTL to compare with.
    redis.call('HSET', key, 'state', 'claimed', 'token', ARGV[i + 2],
      'lease', deadline, 'attempts', '1')
    redis.call('PEXPIRE', key, keep_ms)
  elseif state == 'done' then
    code, value = 1, 0
  elseif state == 'dead' then
    code, value = 2, 0
  else
    local left = 0
    if state == 'claimed' then left = (tonumber(rec[2]) or 0) - now end
    if left > 0 then
      code, value = 3, left
    else
      value = (tonumber(rec[3]) or 0) + 1
      redis.call('HSET', key, 'state', 'claimed', 'token', ARGV[i + 2],
        'lease', deadline, 'attempts', string.format('%d', value))
      -- Never shorten a record's life: a takeover keeps the longer of the two.
      if redis.call('PTTL', key) < keep then
        redis.call('PEXPIRE', key, keep_ms)
      end
    end
  end
  out[2 * i - 1] = code
  out[2 * i] = value
end
return out
