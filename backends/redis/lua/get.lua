-- idemq get: read a record without changing it.
--
-- KEYS[1]  the record
--
-- Replies nil when absent, else {state, attempts, lease ms left (may be
-- negative once lapsed), record ms left (PTTL)}. Server clock.
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'lease')
if not rec[1] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {rec[1], tonumber(rec[2]) or 0, (tonumber(rec[3]) or 0) - now,
  redis.call('PTTL', KEYS[1])}
