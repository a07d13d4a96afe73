-- idemq renew: extend the caller's lease, fenced by its token.
--
-- KEYS[1]  the record
-- ARGV[1]  the caller's token
-- ARGV[2]  new lease, ms from now (server clock)
--
-- Replies 1 applied, 0 lease lost. Never creates a record.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'claimed' or rec[2] ~= ARGV[1] then return 0 end
-- Reading TIME before writing is fine from Redis 5 on (scripts replicate
-- their effects, not the script).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local extend = math.max(tonumber(ARGV[2]), 1)
redis.call('HSET', KEYS[1], 'lease', string.format('%d', now + extend))
if redis.call('PTTL', KEYS[1]) < extend then
  redis.call('PEXPIRE', KEYS[1], string.format('%d', extend))
end
return 1
