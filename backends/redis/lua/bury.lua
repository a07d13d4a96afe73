-- idemq bury: mark the caller's record dead, fenced by its token.
--
-- KEYS[1]  the record
-- ARGV[1]  the caller's token
-- ARGV[2]  keep_for, ms: how long claims answer dead
--
-- Replies 1 applied, 0 lease lost. Never creates a record.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'claimed' or rec[2] ~= ARGV[1] then return 0 end
local keep = tonumber(ARGV[2])
if keep < 1 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'dead')
redis.call('PEXPIRE', KEYS[1], keep)
return 1
