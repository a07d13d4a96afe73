-- idemq claim: take a record if it is absent, released, or its lease lapsed.
--
-- KEYS[1]  the record (a hash: state, token, lease, attempts)
-- ARGV[1]  the new owner token
-- ARGV[2]  lease, ms
-- ARGV[3]  retain, ms: the record lives at least max(lease, retain)
--
-- Replies {0, attempts} claimed, {1} done, {2} dead,
-- {3, remaining lease ms} in progress. Times come from the server clock.
local rec = redis.call('HMGET', KEYS[1], 'state', 'lease', 'attempts')
local state = rec[1]
if state == 'done' then return {1} end
if state == 'dead' then return {2} end
-- Reading TIME before writing is fine from Redis 5 on (scripts replicate
-- their effects, not the script).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local keep = math.max(lease, tonumber(ARGV[3]), 1)
local attempts = 0
if state then
  if state == 'claimed' then
    local left = (tonumber(rec[2]) or 0) - now
    if left > 0 then return {3, left} end
  end
  attempts = tonumber(rec[3]) or 0
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'claimed', 'token', ARGV[1],
  'lease', string.format('%d', now + lease), 'attempts', attempts)
-- Never shorten a record's life: a takeover keeps the longer of the two.
if state == false or redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
return {0, attempts}
